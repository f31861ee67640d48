/**
 * A backup of one or more disks into one backup record, committed in the order SPEC.md requires:
 * data packs durable and indexed → map pages durable and indexed → backup record (the commit point).
 */
import { hostname } from 'node:os';
import { randomBytes } from 'node:crypto';
import { basename } from 'node:path';
import { Repository } from '../repo-format/repository.js';
import { InvalidArgumentError } from '../repo-format/errors.js';
import { diskNameProblem, type BackupRecord, type DiskRecord } from '../repo-format/backup-record.js';
import { BlockPool } from './pipeline/block-pool.js';
import { backupDisk, type DiskProgress } from './pipeline/backup-disk.js';
import { openSource } from './sources/open-source.js';
import type { BlockSource } from './sources/source.js';
import { InterruptedError } from './errors.js';
import { ENGINE_VERSION } from './version.js';

export interface BackupOptions {
  repo: string;
  /** Raw images, block devices or NBD URIs (nbd://host/export, nbd+unix:///export?socket=PATH). */
  sources: string[];
  /** Disk names, one per source; default: each source's file name. */
  diskNames?: string[] | undefined;
  name?: string | undefined;
  workers?: number | undefined;
  signal?: AbortSignal | undefined;
  onProgress?: ((progress: DiskProgress & { diskIndex: number; diskCount: number }) => void) | undefined;
  onNotice?: ((message: string) => void) | undefined;
}

export interface BackupResult {
  record: BackupRecord;
}

function diskNamesFor(sources: BlockSource[], explicit: string[] | undefined): string[] {
  if (explicit && explicit.length > 0 && explicit.length !== sources.length) {
    throw new InvalidArgumentError(`${explicit.length} disk names for ${sources.length} sources: give one --disk-name per --source`);
  }
  const names = explicit && explicit.length > 0 ? explicit : sources.map((source) => source.defaultName);
  const seen = new Set<string>();
  for (const name of names) {
    const problem = diskNameProblem(name);
    if (problem) throw new InvalidArgumentError(`disk name ${JSON.stringify(name)} is not allowed: ${problem}`);
    if (seen.has(name)) throw new InvalidArgumentError(`two disks are named "${name}": give distinct --disk-name values`);
    seen.add(name);
  }
  return names;
}

export async function backup(options: BackupOptions): Promise<BackupResult> {
  if (options.sources.length === 0) throw new InvalidArgumentError('no source given: name at least one disk image or block device');
  const startTime = new Date();
  const sources: BlockSource[] = [];
  let repo: Repository | undefined;
  let pool: BlockPool | undefined;
  try {
    repo = await Repository.open(options.repo, { access: 'exclusive', command: 'backup' });
    // Open every source before writing: a missing disk fails the run with nothing written.
    for (const spec of options.sources) sources.push(await openSource(spec));
    const names = diskNamesFor(sources, options.diskNames);
    const notice = options.onNotice ?? (() => undefined);
    if (repo.openReport.brokeStaleLock) {
      const stale = repo.openReport.brokeStaleLock;
      notice(`removed a stale lock of pid ${stale.pid} on ${stale.hostname} (since ${stale.since})`);
    }
    if (repo.openReport.rebuiltIndex) notice(`the index was missing; rebuilt it from ${repo.openReport.rebuiltIndex.packs} packs`);
    const leftovers = await repo.removeTempFiles();
    if (leftovers > 0) notice(`removed ${leftovers} temporary files left by an interrupted writer`);

    pool = new BlockPool({ blockSize: repo.blockSize, workers: options.workers });
    const dataWriter = repo.createBlobWriter();
    const metaWriter = repo.createBlobWriter();
    const disks: DiskRecord[] = [];
    try {
      for (const [i, source] of sources.entries()) {
        const disk = await backupDisk(source, names[i]!, {
          repo,
          pool,
          dataWriter,
          metaWriter,
          signal: options.signal,
          onProgress: options.onProgress && ((p) => options.onProgress!({ ...p, diskIndex: i, diskCount: sources.length })),
        });
        await source.close();
        disks.push(disk);
      }
      if (options.signal?.aborted) throw new InterruptedError('backup');
      await dataWriter.flush();
      await metaWriter.flush();
    } catch (error) {
      await dataWriter.abort();
      await metaWriter.abort();
      throw error;
    }
    const record: BackupRecord = {
      version: 1,
      id: randomBytes(16).toString('hex'),
      name: options.name ?? (sources.length === 1 ? basename(options.sources[0]!) : names.join('+')),
      type: 'full',
      parent: null,
      startTime: startTime.toISOString(),
      endTime: new Date().toISOString(),
      hostname: hostname(),
      engineVersion: ENGINE_VERSION,
      blockSize: repo.blockSize,
      disks,
    };
    for (const warning of await repo.commitBackup(record)) notice(warning);
    return { record };
  } finally {
    for (const source of sources) await source.dispose();
    await pool?.close().catch(() => undefined);
    await repo?.close();
  }
}
