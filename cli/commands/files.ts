/** File-level restore through the appliance VM: `files ls`, `files extract` (SPEC 16.3). */
import { Command } from 'commander';
import { createWriteStream } from 'node:fs';
import type { Writable } from 'node:stream';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { terminalLine } from '../terminal.js';
import { count, printJson } from '../output.js';
import { engine } from '../engine-calls.js';
import { interruptSignal, output, printNotice } from '../context.js';
import * as opt from '../options.js';
import type { FileEntry } from '../../engine/file-restore/files.js';

function mtimeText(mtime: string): string {
  const seconds = Number(mtime.split('.')[0]);
  return Number.isFinite(seconds) && seconds > 0 ? new Date(seconds * 1000).toISOString().replace('.000Z', 'Z') : '-';
}

function entryLine(entry: FileEntry): string {
  const type = entry.type === 'volume' ? 'V' : entry.type === 'directory' ? 'd' : entry.type === 'symlink' ? 'l' : entry.type === 'file' ? '-' : entry.type[0]!;
  const volume = entry.volume ? `  [${entry.volume.type}, ${entry.volume.state}${entry.volume.detail ? `: ${entry.volume.detail}` : ''}]` : '';
  const target = entry.target === null ? '' : ` -> ${entry.target}`;
  return terminalLine(`${type} ${entry.mode.toString(8).padStart(4, '0')} ${String(entry.size).padStart(12)} ${mtimeText(entry.mtime)} ${entry.name}${target}${volume}`);
}

export function registerFilesCommands(program: Command): void {
  const files = program
    .command('files')
    .description('file-level restore through a throw-away appliance VM that reads LVM, ext2/3/4, xfs, btrfs, vfat and NTFS (the guest\'s filesystems are never mounted by this host\'s kernel)');

  files
    .command('ls')
    .description('list a directory of a backup: <disk>/p<N>/…, <disk>/lvm/<VG>/<LV>/…, <disk>/… (no path: the disks and volumes)')
    .addOption(opt.repoOption())
    .argument('<backup-id>', 'backup id or a unique prefix of it')
    .argument('[path]', 'a path naming disk and volume first, e.g. vda/p1/etc', '')
    .option('--disk <name>', 'attach only this disk to the appliance')
    .addOption(opt.passwordFileOption())
    .option('--json', 'print JSON')
    .action(async (id: string, path: string, opts: { repo?: string; disk?: string; passwordFile?: string; json?: boolean }) => {
      output.json = opts.json === true;
      const result = await engine.filesList({ repo: opt.requireRepo(opts.repo), backupId: id, path, disk: opts.disk, passphrase: await opt.loadPassphrase(opts.passwordFile), signal: interruptSignal(), onNotice: printNotice });
      if (output.json) printJson(result);
      else for (const entry of result.entries) process.stdout.write(`${entryLine(entry)}\n`);
    });

  files
    .command('extract')
    .description('extract files or trees from a backup, with their bytes, modes, owners (as root) and times: into a directory, or as a tar archive')
    .addOption(opt.repoOption())
    .argument('<backup-id>', 'backup id or a unique prefix of it')
    .argument('<path...>', 'paths naming disk and volume first, e.g. vda/p1/etc/hostname')
    .option('--to <dir>', 'extract into this directory (made if missing; nothing in it is overwritten, nothing outside it written)', opt.localPath('--to'))
    .option('--tar <file>', 'write one tar archive (POSIX pax) to FILE, or to stdout with -', (value: string) => (value === '-' ? value : opt.localPath('--tar')(value)))
    .option('--disk <name>', 'attach only this disk to the appliance')
    .addOption(opt.passwordFileOption())
    .option('--json', 'print JSON')
    .action(async (id: string, paths: string[], opts: { repo?: string; to?: string; tar?: string; disk?: string; passwordFile?: string; json?: boolean }) => {
      output.json = opts.json === true;
      if ((opts.to === undefined) === (opts.tar === undefined)) throw new InvalidArgumentError('give one of --to DIR or --tar FILE|-');
      if (opts.tar === '-' && output.json) throw new InvalidArgumentError('--tar - writes the archive to stdout: --json cannot share it');
      let tar: Writable | undefined;
      if (opts.tar === '-') tar = process.stdout;
      else if (opts.tar !== undefined) tar = createWriteStream(opts.tar, { flags: 'wx', mode: 0o600 });
      const result = await engine.filesExtract({ repo: opt.requireRepo(opts.repo), backupId: id, paths, to: opts.to, tar, tarName: opts.tar, disk: opts.disk, passphrase: await opt.loadPassphrase(opts.passwordFile), signal: interruptSignal(), onNotice: printNotice });
      if (tar !== undefined && tar !== process.stdout) await new Promise<void>((resolve, reject) => tar!.end((error?: Error | null) => (error ? reject(error) : resolve())));
      for (const skipped of result.skipped) printNotice(`left out ${skipped.name}: ${skipped.why}`);
      if (output.json) printJson(result);
      else if (opts.tar !== '-') process.stdout.write(`${terminalLine(`extracted ${count(result.files, 'file')}, ${count(result.directories, 'directory', 'directories')}, ${count(result.symlinks, 'symlink')}, ${result.bytes} bytes into ${result.to}`)}\n`);
    });
}
