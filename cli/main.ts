#!/usr/bin/env node
/**
 * `engine`: argument parsing and printing only; every action is one call into engine/.
 */
import { Command, CommanderError } from 'commander';
import { EngineError, InvalidArgumentError } from '../repo-format/errors.js';
import { setNoticeSink } from '../repo-format/notices.js';
import { terminalLine } from './terminal.js';
import { ENGINE_VERSION } from '../engine/version.js';
import { EXIT, exitCodeFor } from './exit-codes.js';
import { COMMAND_GROUPS, commandWord, groupsFor, type CommandGroup } from './command-groups.js';
import { output, printNotice } from './context.js';
import { settleInterrupt } from './interrupt.js';
import { crashPoint } from '../repo-format/crash-points.js';
import type { GlobalOptions } from './options.js';
import { printJson } from './output.js';
import { cliMessage } from './error-wording.js';
import { remote, REMOTE_COMMANDS } from './remote.js';
import { localPath } from './options.js';

function buildProgram(groups: readonly CommandGroup[]): Command {
  const program = new Command('engine')
    .description('Block-level, deduplicating backups of VM disks (oVirt, KVM/libvirt)')
    .version(ENGINE_VERSION)
    .option('--debug', 'print stack traces with errors')
    .option('--server <url>', 'run backup, restore, verify, prune or gc as a job of this running engine server (http[s]://HOST:PORT or its socket path); --repo names one of its repositories')
    .option('--server-token-file <file>', "with --server: the bearer token, from this file (default: $ENGINE_SERVER_TOKEN); never give the token itself as an argument", localPath('--server-token-file'))
    .exitOverride()
    // Commander's own errors follow the same rules as ours: one line "engine: …", nothing on stderr with --json.
    .configureOutput({
      writeErr: (text) => {
        if (!output.json) process.stderr.write(text);
      },
      outputError: (text, write) => write(`engine: ${text.replace(/^error: /, '')}`),
    });

  // ENGINE_TEST_CPU_LOG (bin/engine.js): when the command's own work begins, after loading and parsing.
  if (process.env.ENGINE_TEST_CPU_LOG) program.hook('preAction', () => void performance.mark('engine:action', { detail: process.cpuUsage() }));
  for (const group of groups) group.register(program);
  program.hook('preAction', (_program, command) => {
    const globals = program.opts() as { server?: string; serverTokenFile?: string };
    if (globals.server === undefined) {
      if (globals.serverTokenFile !== undefined) throw new InvalidArgumentError('--server-token-file goes with --server');
      return;
    }
    if (command.parent !== program || !(REMOTE_COMMANDS as readonly string[]).includes(command.name())) throw new InvalidArgumentError(`--server runs ${REMOTE_COMMANDS.join(', ')}; ${command.name()} runs here only`);
    remote.server = globals.server;
    remote.tokenFile = globals.serverTokenFile;
  });
  return program;
}

/** The program with the commands `argv` needs (command-groups.ts): its own command's group, or every command. */
function programFor(argv: string[]): Command {
  const groups = groupsFor(argv);
  const program = buildProgram(groups);
  if (groups === COMMAND_GROUPS) return program;
  // A table that no longer says where the command is defined costs the time saved, never the command.
  const word = commandWord(argv);
  return program.commands.some((command) => command.name() === word) ? program : buildProgram(COMMAND_GROUPS);
}

function reportError(error: unknown, debug: boolean): number {
  if (error instanceof CommanderError) {
    if (error.exitCode === 0) return EXIT.ok;
    if (output.json) printJson({ error: { code: 'ENGINE_INVALID_ARGUMENT', message: error.message.replace(/^error: /, ''), details: {} } });
    return EXIT.usage;
  }
  const engineError = error instanceof EngineError ? error : undefined;
  const code = engineError?.code;
  // One line whatever the source (a tool's stderr, a library's multi-line text): the contract of SPEC 14.
  // The engine's ways out (details.remedies) are worded as this CLI's flags (error-wording.ts).
  const message = cliMessage(error).replace(/\s*\n\s*/g, ' ').trim();
  if (output.json) {
    printJson({ error: { code: code ?? 'ENGINE_INTERNAL', message, details: engineError?.details ?? {} } });
  } else {
    process.stderr.write(`engine: ${terminalLine(message)}\n`);
    if (debug && error instanceof Error && error.stack) process.stderr.write(`${error.stack}\n`);
  }
  return exitCodeFor(code);
}

export async function main(argv: string[]): Promise<number> {
  // Known before parsing, so that even a usage error is reported as JSON.
  output.json = argv.includes('--json');
  // What the repository does on its own (a stale lock broken, a read-only repository read without the
  // lock, the space reserve used, a key file others can read) is said by every command, on stderr, escaped;
  // with --json, stderr stays empty.
  setNoticeSink(printNotice);
  const program = programFor(argv);
  try {
    await program.parseAsync(argv);
    settleInterrupt();
    crashPoint('outcome-written');
    return typeof process.exitCode === 'number' ? process.exitCode : EXIT.ok;
  } catch (error) {
    // The error line is the last: a slow-stop notice due after it is cancelled (cli/interrupt.ts).
    settleInterrupt();
    const code = reportError(error, (program.opts() as GlobalOptions).debug === true);
    crashPoint('outcome-written');
    return code;
  }
}

process.exitCode = await main(process.argv);
