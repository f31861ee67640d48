/**
 * `engine copy`: backups of one repository copied into another (SPEC.md 22), in phases:
 *
 *   open the source (its lock or shared lease, as restore takes it) → check the pair (block sizes, not the
 *   same repository) → open the target for writing (its lock or a writer's lease) → select (select.ts) →
 *   plan (plan.ts: skip what the target holds) → per backup, parents first: transfer each disk
 *   (transfer.ts) → flush (packs and index durable) → commit the record (commit.ts) → verify it (verify.ts).
 *
 * The target is written only through its blob writers and commitBackup, the path of a backup: whatever
 * the target's store allows a backup (an append-only bucket, Object Lock) it allows a copy. A copy deletes
 * nothing on the target: an interrupted one leaves packs no record references, garbage for gc (or, on a
 * folder of format 1 or 2, a pack under tmp/ that the next writer removes), never a half record.
 */
import { Repository } from '../../repo-format/repository.js';
import type { BackupRecord } from '../../repo-format/backup-record.js';
import type { Passphrase } from '../../repo-format/passphrase.js';
import { InterruptedError } from '../../repo-format/errors.js';
import { Interruption } from '../host/interrupt.js';
import { selectBackups, type Selection } from './select.js';
import { checkCompatible, planCopy } from './plan.js';
import { newTransfer, transferDisk, type Transfer } from './transfer.js';
import { commitCopy, copiedRecord } from './commit.js';
import { verifyArrival } from './verify.js';
import { UploadLimit, type Clock } from './upload-limit.js';
import { openLocation } from '../../repo-format/v3/location.js';
import type { RepositoryConfig } from '../../repo-format/config.js';

export type { Selection } from './select.js';

export interface CopyOptions {
  /** The source repository: a folder or s3://BUCKET/PREFIX. */
  from: string;
  /** The target repository. */
  to: string;
  fromPassphrase?: Passphrase | undefined;
  toPassphrase?: Passphrase | undefined;
  selection: Selection;
  /** Bytes per second sent to the target at most. */
  limitUpload?: number | undefined;
  /** The clock of the upload limit (tests). */
  clock?: Clock | undefined;
  signal?: AbortSignal | undefined;
  onProgress?: ((progress: CopyProgress) => void) | undefined;
  onNotice?: ((message: string) => void) | undefined;
}

export interface CopyProgress {
  backup: string;
  name: string;
  /** 0-based place of this backup among those copied, and how many are copied. */
  index: number;
  count: number;
  disk: string;
  bytesDone: number;
  bytesTotal: number;
}

export interface CopiedBackup {
  /** The backup's id in the source. */
  source: string;
  /** Its id in the target: the new record, or the one found there already. */
  target: string;
  name: string;
  status: 'copied' | 'skipped';
}

export interface CopyReport {
  from: string;
  to: string;
  backups: CopiedBackup[];
  backupsCopied: number;
  backupsSkipped: number;
  chunksSent: number;
  chunksSkipped: number;
  pagesSent: number;
  bytesRead: number;
  bytesSent: number;
  /** The upload limit's own count (`--limit-upload`): bytes it let through (= bytesSent) and the milliseconds it waited; null without a limit. */
  limit: { rate: number; bytesTaken: number; waitedMs: number } | null;
  /** Damaged records of the source that `all`, a name or `latest` left out. */
  damaged: { id: string; message: string }[];
  durationMs: number;
}

export async function copyBackups(options: CopyOptions): Promise<CopyReport> {
  const started = performance.now();
  const notice = options.onNotice ?? (() => undefined);
  const report: CopyReport = { from: options.from, to: options.to, backups: [], backupsCopied: 0, backupsSkipped: 0, chunksSent: 0, chunksSkipped: 0, pagesSent: 0, bytesRead: 0, bytesSent: 0, limit: null, damaged: [], durationMs: 0 };
  const interruption = new Interruption(options.signal, 'copy', () => interruptedState(report));
  interruption.check();
  let source: Repository | undefined;
  let target: Repository | undefined;
  let transfer: Transfer | undefined;
  let limit: UploadLimit | undefined;
  try {
    // The source as restore opens it: its lock (format 1, 2) or a shared lease (3), so no prune or gc
    // removes what the copy reads; a read-only source is read without them (SPEC.md 12.6, 19.9).
    source = await Repository.open(options.from, { access: 'exclusive', command: 'copy-from', passphrase: options.fromPassphrase, readWithoutLock: true, checkInterrupted: () => interruption.check(), manyWriters: true, signal: options.signal, onNotice: notice });
    // Refused before the target is locked or written.
    checkCompatible(options.from, options.to, source.config, await configOf(options.to, notice));
    target = await Repository.open(options.to, { access: 'exclusive', command: 'copy', passphrase: options.toPassphrase, requireEncryption: options.toPassphrase !== undefined, useReserve: false, checkInterrupted: () => interruption.check(), manyWriters: true, signal: options.signal, onNotice: notice });
    checkCompatible(options.from, options.to, source.config, target.config);
    const selected = await selectBackups(source, options.selection);
    report.damaged = selected.damaged;
    for (const d of selected.damaged) notice(`backup ${d.id} of the source is damaged and is not copied: ${d.message}`);
    const plan = await planCopy(source, target, selected.records);
    limit = options.limitUpload === undefined ? undefined : new UploadLimit(options.limitUpload, options.clock, options.signal);
    transfer = newTransfer(source, target, limit, interruption);
    const toCopy = plan.steps.filter((s) => s.existing === null).length;
    let index = 0;
    for (const step of plan.steps) {
      if (step.existing !== null) {
        report.backups.push({ source: step.source.id, target: step.existing, name: step.source.name, status: 'skipped' });
        report.backupsSkipped += 1;
        continue;
      }
      interruption.check();
      const record = await copyOne(transfer, step.source, index, toCopy, options.onProgress);
      const written = copiedRecord(step.source, step.identity, record.disks, plan.idMap);
      await commitCopy(target, written, notice);
      plan.idMap.set(step.source.id, written.id);
      report.backups.push({ source: step.source.id, target: written.id, name: step.source.name, status: 'copied' });
      report.backupsCopied += 1;
      await verifyArrival(target, written, interruption);
      index += 1;
    }
    return report;
  } catch (error) {
    await transfer?.dataWriter.abort();
    await transfer?.metaWriter.abort();
    if (error instanceof InterruptedError) throw interruption.error();
    throw error;
  } finally {
    if (transfer) Object.assign(report, { chunksSent: transfer.counters.chunksSent, chunksSkipped: transfer.counters.chunksSkipped, pagesSent: transfer.counters.pagesSent, bytesRead: transfer.counters.bytesRead, bytesSent: transfer.counters.bytesSent });
    if (limit) report.limit = { rate: limit.rate, bytesTaken: limit.bytesTaken, waitedMs: limit.waitedMs };
    report.durationMs = Math.round(performance.now() - started);
    await target?.close();
    await source?.close();
  }
}

/** The disks of one backup carried over and made durable on the target (not yet committed): the record with the target's maps. */
async function copyOne(t: Transfer, record: BackupRecord, index: number, count: number, onProgress: CopyOptions['onProgress']): Promise<BackupRecord> {
  const disks = [];
  const bytesTotal = record.disks.reduce((sum, d) => sum + d.size, 0);
  let before = 0;
  for (const disk of record.disks) {
    disks.push(
      await transferDisk(t, record.id, disk, record.blockSize, (blocks) =>
        onProgress?.({ backup: record.id, name: record.name, index, count, disk: disk.name, bytesDone: before + Math.min(disk.size, blocks * record.blockSize), bytesTotal }),
      ),
    );
    before += disk.size;
  }
  // Packs sealed and indexed (data first, then the map pages that reference it) before the record.
  await t.dataWriter.flush();
  await t.metaWriter.flush();
  return { ...record, disks };
}

function interruptedState(report: CopyReport): string {
  const copied = report.backups.filter((b) => b.status === 'copied').length;
  return copied === 0 ? 'no backup was committed on the target; a rerun resumes' : `${copied} backup(s) were committed on the target before it (the one in progress was not); a rerun resumes`;
}

/** The target's config read before its lock or lease is taken: a pair that cannot be copied is refused having written nothing. */
async function configOf(where: string, notice: (message: string) => void): Promise<RepositoryConfig> {
  const store = await openLocation(where, { onWarning: notice });
  try {
    return await Repository.loadConfig(where, store);
  } finally {
    await store.close();
  }
}
