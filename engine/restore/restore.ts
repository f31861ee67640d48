/**
 * Restores one disk of a backup, or every disk of it into a directory. Each backup's map is complete,
 * so a restore reads exactly one map, whatever the backup's type.
 *
 * Chunks are read from packs by the workers (several in flight), each checked (xxh64 of the frame, the
 * AES-256-GCM tag in an encrypted repository, then the plaintext's id) before a byte of it reaches the target.
 */
import { mkdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { Repository } from '../../repo-format/repository.js';
import { readMap } from '../../repo-format/block-map.js';
import { mapRootOf, type BackupRecord, type DiskRecord } from '../../repo-format/backup-record.js';
import { packPath } from '../../repo-format/pack-file.js';
import { ID_SIZE, ZERO_ID } from '../../repo-format/constants.js';
import { InvalidArgumentError, MissingBlobError } from '../../repo-format/errors.js';
import { BlockPool } from '../pipeline/block-pool.js';
import { CorruptChunkError, DiskNotFoundError, InterruptedError } from '../errors.js';
import { FileTarget, type RestoreTarget } from './file-target.js';

export interface RestoreProgress {
  disk: string;
  bytesDone: number;
  bytesTotal: number;
}

export interface RestoreOptions {
  repo: string;
  /** The passphrase of an encrypted repository. */
  passphrase?: string | undefined;
  backupId: string;
  /** Disk name; may be omitted when the backup has one disk, or when `to` is a directory for all disks. */
  disk?: string | undefined;
  to: string;
  /** Another kind of target than a local path (e.g. an imageio upload): opened per disk instead of `to`. */
  openTarget?: ((disk: DiskRecord) => Promise<RestoreTarget>) | undefined;
  /** The target is a new disk that reads as zeros: zero blocks are skipped instead of written. */
  targetIsZeroed?: boolean | undefined;
  workers?: number | undefined;
  signal?: AbortSignal | undefined;
  onProgress?: ((progress: RestoreProgress) => void) | undefined;
}

export interface RestoredDisk {
  name: string;
  path: string;
  size: number;
  bytesWritten: number;
  blocksZero: number;
}

export interface RestoreResult {
  backup: BackupRecord;
  disks: RestoredDisk[];
}

async function isDirectory(path: string): Promise<boolean> {
  return stat(path).then((s) => s.isDirectory(), () => false);
}

/** Which disks go where: one disk to a path, or all disks to files in a directory. */
async function planTargets(record: BackupRecord, disk: string | undefined, to: string): Promise<{ disk: DiskRecord; path: string }[]> {
  if (disk !== undefined) {
    const found = record.disks.find((d) => d.name === disk);
    if (!found) throw new DiskNotFoundError(record.id, disk, record.disks.map((d) => d.name));
    return [{ disk: found, path: (await isDirectory(to)) ? join(to, found.name) : to }];
  }
  if (record.disks.length === 1 && !(await isDirectory(to))) return [{ disk: record.disks[0]!, path: to }];
  if (record.disks.length > 1 && !(await isDirectory(to)) && (await stat(to).then(() => true, () => false))) {
    throw new InvalidArgumentError(`backup ${record.id} has ${record.disks.length} disks: name one with --disk, or restore them all into a directory`);
  }
  await mkdir(to, { recursive: true });
  return record.disks.map((d) => ({ disk: d, path: join(to, d.name) }));
}

export async function restore(options: RestoreOptions): Promise<RestoreResult> {
  const repo = await Repository.open(options.repo, { access: 'exclusive', command: 'restore', passphrase: options.passphrase });
  let pool: BlockPool | undefined;
  try {
    const record = await repo.findBackup(options.backupId);
    const plan = options.openTarget
      ? record.disks.filter((d) => options.disk === undefined || d.name === options.disk).map((disk) => ({ disk, path: '' }))
      : await planTargets(record, options.disk, options.to);
    if (plan.length === 0) throw new DiskNotFoundError(record.id, options.disk ?? '', record.disks.map((d) => d.name));
    pool = new BlockPool({ blockSize: record.blockSize, workers: options.workers, keys: repo.keys });
    const disks: RestoredDisk[] = [];
    for (const { disk, path } of plan) {
      const target = options.openTarget ? await options.openTarget(disk) : await FileTarget.open(path, disk.size, { assumeZeroed: options.targetIsZeroed });
      try {
        disks.push(await restoreDisk(repo, pool, record, disk, target, options));
        await target.finish();
      } catch (error) {
        await target.discard();
        throw error;
      }
    }
    return { backup: record, disks };
  } finally {
    await pool?.close().catch(() => undefined);
    await repo.close();
  }
}

/** Restores one disk's map onto an opened target. Exported for other targets (NBD) to reuse. */
export async function restoreDisk(
  repo: Repository,
  pool: BlockPool,
  record: BackupRecord,
  disk: DiskRecord,
  target: RestoreTarget,
  options: { signal?: AbortSignal | undefined; onProgress?: ((progress: RestoreProgress) => void) | undefined },
): Promise<RestoredDisk> {
  const blockSize = record.blockSize;
  const zeros = Buffer.alloc(blockSize);
  const result: RestoredDisk = { name: disk.name, path: target.path, size: disk.size, bytesWritten: 0, blocksZero: 0 };
  const inFlight = new Set<Promise<void>>();
  let failure: unknown;
  let bytesDone = 0;
  const batchLimit = Math.max(1, pool.slots.count);

  const lengthOf = (block: number): number => Math.min(blockSize, disk.size - block * blockSize);
  const progress = (): void => options.onProgress?.({ disk: disk.name, bytesDone, bytesTotal: disk.size });

  const restoreChunk = async (block: number, id: Buffer, location: { packId: string; offset: number; length: number }): Promise<void> => {
    const slot = await pool.slots.acquire();
    try {
      const diskOffset = block * blockSize;
      const opened = await pool.open({ slot, packPath: packPath(repo.root, location.packId), offset: location.offset, length: location.length, id });
      const where = { backupId: record.id, disk: disk.name, diskOffset, packId: location.packId, packOffset: location.offset, chunk: id.toString('hex') };
      if (!opened.ok) throw new CorruptChunkError(where, opened.why);
      if (opened.rawLength !== lengthOf(block)) throw new CorruptChunkError(where, `chunk holds ${opened.rawLength} bytes, the block needs ${lengthOf(block)}`);
      await target.write(pool.input(slot, opened.rawLength), diskOffset);
      result.bytesWritten += opened.rawLength;
      bytesDone += opened.rawLength;
    } finally {
      pool.slots.release(slot);
    }
  };

  const launch = (work: Promise<void>): void => {
    const tracked = work.catch((error: unknown) => {
      failure ??= error;
    });
    inFlight.add(tracked);
    void tracked.finally(() => inFlight.delete(tracked));
  };

  const writeZeros = async (firstBlock: number, count: number): Promise<void> => {
    result.blocksZero += count;
    for (let block = firstBlock; block < firstBlock + count; block += 1) {
      const length = lengthOf(block);
      if (!target.zeroed) {
        await target.write(zeros.subarray(0, length), block * blockSize);
        result.bytesWritten += length;
      }
      bytesDone += length;
    }
  };

  let pending: { block: number; id: Buffer }[] = [];
  const flushPending = async (): Promise<void> => {
    const locations = await repo.lookup(pending.map((p) => p.id));
    for (const [i, { block, id }] of pending.entries()) {
      const location = locations[i];
      if (!location) {
        throw new MissingBlobError(id.toString('hex'), `chunk for backup ${record.id}, disk ${disk.name}, offset ${block * blockSize}:`);
      }
      // Wait for a slot here rather than queueing unboundedly: this is the restore's backpressure.
      while (pool.slots.available === 0 && failure === undefined) await Promise.race(inFlight);
      if (failure !== undefined) throw failure;
      launch(restoreChunk(block, id, location));
    }
    pending = [];
    progress();
  };

  try {
    for await (const run of readMap(mapRootOf(disk), repo.loadPage)) {
      if (options.signal?.aborted) throw new InterruptedError('restore');
      if (failure !== undefined) throw failure;
      if (run.entries === null) {
        await writeZeros(run.firstBlock, run.count);
        continue;
      }
      for (let i = 0; i < run.count; i += 1) {
        const id = run.entries.subarray(i * ID_SIZE, (i + 1) * ID_SIZE);
        if (ZERO_ID.equals(id)) {
          await writeZeros(run.firstBlock + i, 1);
          continue;
        }
        pending.push({ block: run.firstBlock + i, id: Buffer.from(id) });
        if (pending.length >= batchLimit) await flushPending();
      }
    }
    if (pending.length > 0) await flushPending();
  } finally {
    await Promise.all(inFlight);
  }
  if (failure !== undefined) throw failure;
  progress();
  return result;
}
