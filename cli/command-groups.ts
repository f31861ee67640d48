/**
 * The CLI's commands, by the module that defines them, in the order of `engine --help`. A command line names one
 * command (its first word that is not an option): only its group is defined, not all ~25 commands with their
 * options and parsers (measured: ~5 ms of CPU per process, of the ~45 between Node's start and the command's action;
 * the test suite starts the CLI some 3,800 times). Help without a command, `completion`, a word that names no command
 * (commander's suggestion of a near name needs them all) and a stale table define every group.
 */
import type { Command } from 'commander';
import { registerRepositoryCommands } from './commands/repository.js';
import { registerBackupCommand } from './commands/backup.js';
import { registerRestoreCommand } from './commands/restore.js';
import { registerCopyCommand } from './commands/copy.js';
import { registerInstantAccessCommands } from './commands/instant-access.js';
import { registerMaintenanceCommands } from './commands/maintenance.js';
import { registerOvirtCommands } from './commands/ovirt.js';
import { registerToolCommands } from './commands/tools.js';
import { registerFilesCommands } from './commands/files.js';
import { registerServerCommand } from './commands/server.js';

export interface CommandGroup {
  /** The top-level commands `register` defines (test/cli.test.ts holds this to what it does define). */
  readonly names: readonly string[];
  readonly register: (program: Command) => void;
}

export const COMMAND_GROUPS: readonly CommandGroup[] = [
  { names: ['init', 'list', 'show', 'protect', 'unprotect', 'unlock', 'forget', 'migrate'], register: registerRepositoryCommands },
  { names: ['backup'], register: registerBackupCommand },
  { names: ['restore'], register: registerRestoreCommand },
  { names: ['copy'], register: registerCopyCommand },
  { names: ['serve', 'mount', 'umount'], register: registerInstantAccessCommands },
  { names: ['verify', 'prune', 'gc', 'repair'], register: registerMaintenanceCommands },
  { names: ['ovirt'], register: registerOvirtCommands },
  { names: ['files'], register: registerFilesCommands },
  // completion prints a script of every command: it defines them all (commandWord).
  { names: ['bench', 'demo', 'completion'], register: registerToolCommands },
  { names: ['server'], register: registerServerCommand },
];

/**
 * The command a command line (process.argv) names: its first word after the program that is not an option or
 * the value of one (--server URL, --server-token-file FILE), or undefined.
 */
export function commandWord(argv: readonly string[]): string | undefined {
  const args = argv.slice(2);
  for (let i = 0; i < args.length; i += 1) {
    const arg = args[i]!;
    // The program's options that take a value as the next word (`--server URL`): that word is no command.
    if (PROGRAM_OPTIONS_WITH_VALUE.includes(arg)) i += 1;
    else if (!arg.startsWith('-')) return arg;
  }
  return undefined;
}

/** main.ts's program options whose value may follow as a separate word. */
const PROGRAM_OPTIONS_WITH_VALUE: readonly string[] = ['--server', '--server-token-file'];

/** The groups to define for `argv`: the one that defines its command, or all of them. */
export function groupsFor(argv: readonly string[]): readonly CommandGroup[] {
  const word = commandWord(argv);
  if (word === undefined || word === 'completion') return COMMAND_GROUPS;
  const group = COMMAND_GROUPS.find((g) => g.names.includes(word));
  return group === undefined ? COMMAND_GROUPS : [group];
}
