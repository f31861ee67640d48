/** Repository and catalogue commands: init, list, show, protect, unprotect, unlock, forget. */
import { Command, Option } from 'commander';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { parseCompression } from '../../repo-format/compression.js';
import { OBJECT_LOCK_MAX_MS, OBJECT_LOCK_MIN_MS } from '../../repo-format/config.js';
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
    .option('--object-lock <retention>', 'S3 only: lock every object for this long after it is written (S3 Object Lock; 30d, 12h, 90m, 45s): nobody, these credentials included, can delete or overwrite a backup younger than that; the bucket is created with Object Lock, or must have it (SPEC 20.5)')
    .addOption(new Option('--object-lock-mode <mode>', 'with --object-lock: compliance (no one can shorten it, root included) or governance (users with s3:BypassGovernanceRetention can)').choices(['compliance', 'governance']))
    .option('--json', 'print the repository config as JSON')
    .action(async (repo: string, opts: { blockSize?: string; compression?: string; format?: number; encrypt?: boolean; passwordFile?: string; json?: boolean; objectLock?: string; objectLockMode?: 'compliance' | 'governance' } & opt.S3Flags) => {
      if (opts.objectLockMode !== undefined && opts.objectLock === undefined) throw new InvalidArgumentError('--object-lock-mode goes with --object-lock RETENTION');
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
        objectLock: opts.objectLock === undefined ? undefined : { mode: opts.objectLockMode ?? 'compliance', retentionMs: parseRetention(opts.objectLock) },
      });
      if (output.json) printJson(config);
      else printInit(repo, config);
    });
}

/** `--object-lock 30d`: a whole number and a unit (d, h, m, s), within the config's bounds. */
export function parseRetention(text: string): number {
  const match = /^(\d{1,9})([dhms])$/.exec(text.trim());
  const unit = { d: 86_400_000, h: 3_600_000, m: 60_000, s: 1000 };
  const ms = match ? Number(match[1]) * unit[match[2] as keyof typeof unit] : NaN;
  if (!Number.isSafeInteger(ms) || ms < OBJECT_LOCK_MIN_MS || ms > OBJECT_LOCK_MAX_MS) {
    throw new InvalidArgumentError(`--object-lock ${JSON.stringify(text.slice(0, 40))}: a retention is a whole number and a unit, d, h, m or s (30d, 12h), from 1s to 100 years`);
  }
  return ms;
}

function registerList(program: Command): void {
  program
    .command('list')
    .description('list the backups in a repository, oldest first')
    .addOption(opt.repoOption())
    .addOption(opt.passwordFileOption())
    .addOption(opt.asOfOption())
    .option('--json', 'print JSON')
    .action(async (opts: { repo?: string; passwordFile?: string; json?: boolean; asOf?: number }) => {
      output.json = opts.json === true;
      const passphrase = await opt.loadPassphrase(opts.passwordFile);
      const { backups, damaged, boots } = await engine.listBackups(opt.requireRepo(opts.repo), { passphrase, asOf: opts.asOf });
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
    .addOption(opt.asOfOption())
    .option('--json', 'print JSON')
    .action(async (id: string, opts: { repo?: string; passwordFile?: string; json?: boolean; asOf?: number }) => {
      output.json = opts.json === true;
      const passphrase = await opt.loadPassphrase(opts.passwordFile);
      const { record, boot } = await engine.describeBackup(opt.requireRepo(opts.repo), id, { passphrase, asOf: opts.asOf });
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
