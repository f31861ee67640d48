/** engine copy: backups of one repository into another (SPEC.md 22); the flags become one engine call. */
import { Command, Option } from 'commander';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { createProgress } from '../progress.js';
import { printJson } from '../output.js';
import { engine } from '../engine-calls.js';
import { output, printNotice, interruptSignal } from '../context.js';
import { forTerminal } from '../terminal.js';
import { formatBytes } from '../../engine/common/units.js';
import * as opt from '../options.js';
import type { CopyReport, Selection } from '../../engine/copy/copy.js';

interface CopyCliOptions {
  from?: string;
  to?: string;
  all?: boolean;
  name?: string;
  latest?: number;
  json?: boolean;
  limitUpload?: string;
  fromPasswordFile?: string;
  toPasswordFile?: string;
}

export function registerCopyCommand(program: Command): void {
  program
    .command('copy')
    .description('copy backups into another repository (local or S3, plain or encrypted), sending only the chunks it lacks; resumable, idempotent, verified on arrival')
    .argument('[backup-id...]', 'backup ids or unique prefixes of them (their parents come along)')
    .addOption(new Option('--from <repo>', 'the repository copied from: a folder, or s3://BUCKET/PREFIX (default: $ENGINE_REPO)').env('ENGINE_REPO'))
    .option('--to <repo>', 'the repository copied into: a folder, or s3://BUCKET/PREFIX')
    .option('--all', 'every backup of the source')
    .option('--name <name>', 'the backups of this name (with --latest: its newest N)')
    .addOption(new Option('--latest <n>', 'the newest N backups (of --name, when given)').argParser(opt.integerParser('--latest', 1, 1_000_000)))
    .option('--limit-upload <rate>', 'send at most RATE bytes per second to the target (e.g. 50M: 50 MiB/s)')
    .addOption(new Option('--from-password-file <file>', 'file holding the passphrase of an encrypted source (default: $ENGINE_PASSWORD_FILE, else $ENGINE_PASSWORD)').argParser(opt.localPath('--from-password-file')))
    .addOption(new Option('--to-password-file <file>', 'file holding the passphrase of an encrypted target (default: $ENGINE_TO_PASSWORD_FILE, else $ENGINE_TO_PASSWORD)').argParser(opt.localPath('--to-password-file')))
    .option('--json', 'print only the result, as JSON')
    .action(async (ids: string[], opts: CopyCliOptions) => {
      output.json = opts.json === true;
      if (!opts.from) throw new InvalidArgumentError('no source repository: give --from REPO or set ENGINE_REPO');
      if (!opts.to) throw new InvalidArgumentError('no target repository: give --to REPO');
      const selection = selectionOf(ids, opts);
      const limitUpload = opts.limitUpload === undefined ? undefined : opt.sizeArgument('--limit-upload', opts.limitUpload, 1024, Number.MAX_SAFE_INTEGER);
      const fromPassphrase = await opt.loadPassphrase(opts.fromPasswordFile);
      const toPassphrase = await loadTargetPassphrase(opts.toPasswordFile);
      const progress = createProgress({ json: output.json });
      const report = await engine.copyBackups({
        from: opts.from,
        to: opts.to,
        fromPassphrase,
        toPassphrase,
        selection,
        limitUpload,
        signal: interruptSignal(),
        onNotice: printNotice,
        onProgress: (p) => progress.update(`copy ${p.name} ${p.backup.slice(0, 8)} (${p.index + 1}/${p.count}) ${p.disk}`, p.bytesDone, p.bytesTotal),
      });
      progress.done();
      if (output.json) printJson(report);
      else printCopy(forTerminal(report));
    });
}

/** Exactly one way of choosing: ids, --all, --name (with or without --latest), or --latest. */
function selectionOf(ids: string[], opts: CopyCliOptions): Selection {
  const ways = [ids.length > 0, opts.all === true, opts.name !== undefined || opts.latest !== undefined].filter(Boolean).length;
  if (ways !== 1) throw new InvalidArgumentError('say which backups to copy: backup ids, --all, --name NAME, or --latest N (--name with --latest: the newest N of that name)');
  if (ids.length > 0) return { kind: 'ids', ids };
  if (opts.all) return { kind: 'all' };
  if (opts.name !== undefined) return { kind: 'name', name: opts.name, latest: opts.latest };
  return { kind: 'latest', count: opts.latest! };
}

/**
 * The target's passphrase: its own file or variables, never the source's (a plain target given one is
 * refused, ENGINE_NOT_ENCRYPTED: the caller expected encryption).
 */
async function loadTargetPassphrase(file: string | undefined): Promise<Buffer | undefined> {
  const { resolvePassphrase } = await import('../../engine/host/passphrase-source.js');
  const env = { ENGINE_PASSWORD_FILE: process.env.ENGINE_TO_PASSWORD_FILE, ENGINE_PASSWORD: process.env.ENGINE_TO_PASSWORD };
  const resolved = await resolvePassphrase({ file, fileLabel: '--to-password-file', env });
  for (const warning of resolved.warnings) printNotice(warning);
  return resolved.passphrase;
}

function printCopy(report: CopyReport): void {
  const lines: string[] = [];
  for (const b of report.backups) lines.push(`${b.status === 'copied' ? 'copied ' : 'skipped'} ${b.source} -> ${b.target} ${b.name}${b.status === 'skipped' ? ' (already in the target)' : ''}`);
  if (report.backups.length === 0) lines.push('nothing to copy: the source holds no backup');
  else if (report.backupsCopied === 0) lines.push(`nothing to copy: the target holds all ${report.backupsSkipped} selected backup(s)`);
  else lines.push(`${report.backupsCopied} backup(s) copied, ${report.backupsSkipped} already there; ${report.chunksSent} chunk(s) sent, ${report.chunksSkipped} the target had; ${formatBytes(report.bytesRead)} read, ${formatBytes(report.bytesSent)} sent in ${(report.durationMs / 1000).toFixed(1)} s`);
  process.stdout.write(`${lines.join('\n')}\n`);
}
