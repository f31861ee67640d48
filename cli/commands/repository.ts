/** Repository and catalogue commands: init, list, show, protect, unprotect, unlock, forget. */
import { Command, Option } from 'commander';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { parseCompression } from '../../repo-format/compression.js';
import { forTerminal } from '../terminal.js';
import { backupJson, printInit, printJson, printList, printProtect, printShow } from '../output.js';
import { engine } from '../engine-calls.js';
import { interruptSignal, output, printResult } from '../context.js';
import * as opt from '../options.js';
import { EXIT } from '../exit-codes.js';
import { unlockWording } from '../error-wording.js';

export function registerRepositoryCommands(program: Command): void {
  registerInit(program);
  registerList(program);
  registerShow(program);
  registerProtection(program);
  registerUnlock(program);
  registerForget(program);
  registerMigrate(program);
}

function registerMigrate(program: Command): void {
  program
    .command('migrate')
    .description('convert a repository of format 1 or 2 on a folder into format 3 (many writers) in place, crash-safe; run again, it finishes one cut short')
    .argument('<repo>', 'the repository (a folder)')
    .addOption(opt.passwordFileOption())
    .option('--json', 'print JSON')
    .action(async (repo: string, opts: { json?: boolean; passwordFile?: string }) => {
      output.json = opts.json === true;
      const report = await engine.migrate({ repo, passphrase: await opt.loadPassphrase(opts.passwordFile), signal: interruptSignal() });
      await printResult(report, (r) => {
        const lines = [
          r.from === 3 && !r.resumed ? `${r.repo} is format version 3 already` : `${r.repo}: format version ${r.from} migrated to 3${r.resumed ? ' (a migration cut short, finished)' : ''}: ${r.segments} index segment(s) naming ${r.blobs} blob(s)`,
        ];
        if (r.removed.length > 0) lines.push(`removed what format 3 has no use for: ${r.removed.join(', ')}`);
        process.stdout.write(`${lines.join('\n')}\n`);
      });
    });
}

function registerInit(program: Command): void {
  program
    .command('init')
    .description('create a repository')
    .argument('<repo>', 'directory to create (must be new or empty), or s3://BUCKET/PREFIX (an empty prefix of an existing bucket)')
    .option('--block-size <size>', 'fixed block size, a power of two from 64K to 16M (default 1M)')
    .addOption(new Option('--format <version>', 'format version: 3 (many writers at once; the default, and always on S3); 1 (plain) or 2 (encrypted) for engines older than format 3').argParser(opt.integerParser('--format', 1, 3)))
    .option('--compression <codec>', 'what new data is compressed with: zstd:LEVEL (1-19), zstd (level 1) or lz4 (default: lz4)')
    .addOption(opt.endpointOption())
    .addOption(opt.regionOption())
    .addOption(opt.caFileOption())
    .option('--encrypt', 'encrypt the repository (AES-256-GCM, keyed chunk ids) under a passphrase of 8 characters or more from --password-file, $ENGINE_PASSWORD_FILE or $ENGINE_PASSWORD')
    .addOption(opt.passwordFileOption())
    .option('--json', 'print the repository config as JSON')
    .action(async (repo: string, opts: { blockSize?: string; compression?: string; format?: number; encrypt?: boolean; passwordFile?: string; json?: boolean } & opt.S3Flags) => {
      output.json = opts.json === true;
      if (!opts.encrypt && opts.passwordFile !== undefined) throw new InvalidArgumentError('--password-file is for an encrypted repository: add --encrypt');
      const passphrase = opts.encrypt ? await opt.loadPassphrase(opts.passwordFile) : undefined;
      if (opts.encrypt && passphrase === undefined) throw new InvalidArgumentError('--encrypt needs a passphrase: give --password-file FILE, or set ENGINE_PASSWORD_FILE or ENGINE_PASSWORD');
      const config = await engine.initRepository(repo, {
        blockSize: opts.blockSize === undefined ? undefined : opt.sizeArgument('--block-size', opts.blockSize, 0, Number.MAX_SAFE_INTEGER),
        passphrase,
        compression: opts.compression === undefined ? undefined : parseCompression(opts.compression),
        format: opts.format,
        s3: opt.s3Settings(opts),
      });
      if (output.json) printJson(config);
      else printInit(repo, config);
    });
}

function registerList(program: Command): void {
  program
    .command('list')
    .description('list the backups in a repository, oldest first')
    .addOption(opt.repoOption())
    .addOption(opt.passwordFileOption())
    .option('--json', 'print JSON')
    .action(async (opts: { repo?: string; passwordFile?: string; json?: boolean }) => {
      output.json = opts.json === true;
      const passphrase = await opt.loadPassphrase(opts.passwordFile);
      const { backups, damaged, boots } = await engine.listBackups(opt.requireRepo(opts.repo), { passphrase });
      if (output.json) printJson({ backups: backups.map((b) => backupJson(b, boots[b.id] ?? null)), damaged });
      else printList(forTerminal(backups), forTerminal(damaged), forTerminal(boots));
    });
}

function registerShow(program: Command): void {
  program
    .command('show')
    .description('show one backup')
    .addOption(opt.repoOption())
    .argument('<backup-id>', 'backup id or a unique prefix of it')
    .addOption(opt.passwordFileOption())
    .option('--json', 'print JSON')
    .action(async (id: string, opts: { repo?: string; passwordFile?: string; json?: boolean }) => {
      output.json = opts.json === true;
      const passphrase = await opt.loadPassphrase(opts.passwordFile);
      const { record, boot } = await engine.describeBackup(opt.requireRepo(opts.repo), id, { passphrase });
      if (output.json) printJson(backupJson(record, boot));
      else printShow(forTerminal(record), boot === null ? null : forTerminal(boot));
    });
}

function registerProtection(program: Command): void {
  for (const wanted of [true, false]) {
    program
      .command(wanted ? 'protect' : 'unprotect')
      .description(wanted ? 'protect a backup: prune never removes it' : 'let prune remove a backup again')
      .addOption(opt.repoOption())
      .argument('<backup-id>', 'backup id or a unique prefix of it')
      .addOption(opt.passwordFileOption())
      .option('--json', 'print JSON')
      .action(async (id: string, opts: { repo?: string; json?: boolean; passwordFile?: string }) => {
        output.json = opts.json === true;
        const result = await engine.setProtection(opt.requireRepo(opts.repo), id, wanted, { passphrase: await opt.loadPassphrase(opts.passwordFile) });
        await printResult(result, printProtect);
      });
  }
}

function registerUnlock(program: Command): void {
  program
    .command('unlock')
    .description('say what holds the repository and remove stale locks and registrations; --force also those that cannot be proven stale (another host\'s, an older engine\'s)')
    .addOption(opt.repoOption())
    .option('--force', 'also remove a lock whose holder cannot be proven gone (another host, an older engine, even a running process): only when you know it no longer works on the repository')
    .option('--json', 'print JSON')
    .action(async (opts: { repo?: string; force?: boolean; json?: boolean }) => {
      output.json = opts.json === true;
      const report = unlockWording(await engine.unlock({ repo: opt.requireRepo(opts.repo), force: opts.force }));
      await printResult(report, async (safe) => (await import('../output-resilience.js')).printUnlock(safe));
      if (report.locked) process.exitCode = EXIT.locked;
    });
}

function registerForget(program: Command): void {
  program
    .command('forget')
    .description('remove one backup by id, also one whose record is damaged (prune removes by policy); gc then reclaims its space')
    .addOption(opt.repoOption())
    .argument('<backup-id>', 'backup id or a unique prefix of it')
    .option('--force', 'forget a damaged record even when the index holds a good copy that engine repair would restore')
    .addOption(opt.passwordFileOption())
    .option('--json', 'print JSON')
    .action(async (id: string, opts: { repo?: string; force?: boolean; json?: boolean; passwordFile?: string }) => {
      output.json = opts.json === true;
      const result = await engine.forget({ repo: opt.requireRepo(opts.repo), backupId: id, force: opts.force, passphrase: await opt.loadPassphrase(opts.passwordFile) });
      await printResult(result, async (safe) => (await import('../output-resilience.js')).printForget(safe));
    });
}
