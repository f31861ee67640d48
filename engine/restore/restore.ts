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
import { NbdTarget } from './nbd-target.js';
import { Qcow2Target } from './qcow2-target.js';
import { planRollback } from './rollback-plan.js';
import type { BlockSet } from '../block-set.js';
import { isNbdUri } from '../nbd/uri.js';
import { STATE_DIRTY } from '../nbd/protocol.js';
import type { BlobLocation } from '../../repo-format/index-entry.js';

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
  /** A path (new file, existing file or block device, directory) or an NBD URI (an existing export). */
  to: string;
  /** Restore into a new qcow2 image instead of `to`. */
  toQcow2?: string | undefined;
  /** Another kind of target than a local path (e.g. an imageio upload): opened per disk instead of `to`. */
  openTarget?: ((disk: DiskRecord) => Promise<RestoreTarget>) | undefined;
  /** The target is a new disk that reads as zeros: zero blocks are skipped instead of written. */
  targetIsZeroed?: boolean | undefined;
  /** Rollback: read the existing target back and write only the blocks that differ from the restore point. */
  onlyChanged?: boolean | undefined;
  /** With onlyChanged and an NBD target: write only what this dirty bitmap (a backup's checkpoint) implies. */
  sinceBitmap?: string | undefined;
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
  /** Blocks written to the target (data, or zeros on a target that does not already read as zeros). */
  blocksWritten: number;
  /** Blocks read back from the target and hashed (--only-changed without a bitmap). */
  blocksCompared: number;
  /** --since-bitmap: the backup whose checkpoint the bitmap is, and how the written blocks were chosen. */
  rollback?: { bitmap: string; baseBackup: string; blocksDirty: number; blocksChangedSinceBase: number } | undefined;
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

/** One target per disk for a single-target kind (NBD export, new qcow2): the backup must name one disk. */
function singleDisk(record: BackupRecord, disk: string | undefined, what: string): DiskRecord[] {
  if (disk !== undefined) {
    const found = record.disks.find((d) => d.name === disk);
    if (!found) throw new DiskNotFoundError(record.id, disk, record.disks.map((d) => d.name));
    return [found];
  }
  if (record.disks.length !== 1) throw new InvalidArgumentError(`backup ${record.id} has ${record.disks.length} disks: name the one to restore into ${what} with --disk`);
  return [record.disks[0]!];
}

function checkRollbackOptions(options: RestoreOptions): void {
  if (options.sinceBitmap !== undefined && !options.onlyChanged) throw new InvalidArgumentError('--since-bitmap goes with --only-changed');
  if (!options.onlyChanged) return;
  if (options.toQcow2 !== undefined) throw new InvalidArgumentError('--only-changed rolls back an existing target; --to-qcow2 creates a new one');
  if (options.sinceBitmap !== undefined && !isNbdUri(options.to)) throw new InvalidArgumentError('--since-bitmap needs an NBD target (--to nbd+unix:///…?socket=… exporting the bitmap, e.g. qemu-nbd -B NAME)');
}

export async function restore(options: RestoreOptions): Promise<RestoreResult> {
  checkRollbackOptions(options);
  // A read-only (or full, reserve-less) repository is restored from without the lock (SPEC.md, 12.6).
  const repo = await Repository.open(options.repo, { access: 'exclusive', command: 'restore', passphrase: options.passphrase, readWithoutLock: true });
  let pool: BlockPool | undefined;
  try {
    const record = await repo.findBackup(options.backupId);
    const nbd = options.openTarget === undefined && options.toQcow2 === undefined && isNbdUri(options.to);
    const plan = options.openTarget
      ? record.disks.filter((d) => options.disk === undefined || d.name === options.disk).map((disk) => ({ disk, path: '' }))
      : options.toQcow2 !== undefined || nbd
        ? singleDisk(record, options.disk, options.toQcow2 ?? options.to).map((disk) => ({ disk, path: options.toQcow2 ?? options.to }))
        : await planTargets(record, options.disk, options.to);
    if (plan.length === 0) throw new DiskNotFoundError(record.id, options.disk ?? '', record.disks.map((d) => d.name));
    pool = new BlockPool({ blockSize: record.blockSize, workers: options.workers, keys: repo.keys });
    const disks: RestoredDisk[] = [];
    const bitmapContext = options.sinceBitmap === undefined ? undefined : `qemu:dirty-bitmap:${options.sinceBitmap}`;
    for (const { disk, path } of plan) {
      if (options.onlyChanged && !options.openTarget && !nbd && !(await stat(path).then(() => true, () => false))) {
        throw new InvalidArgumentError(`--only-changed rolls back an existing target; ${path} does not exist`);
      }
      const target: RestoreTarget = options.openTarget
        ? await options.openTarget(disk)
        : options.toQcow2 !== undefined
          ? await Qcow2Target.create(options.toQcow2, disk.size)
          : nbd
            ? await NbdTarget.open(options.to, disk.size, { metaContexts: bitmapContext ? [bitmapContext] : [] })
            : await FileTarget.open(path, disk.size, { assumeZeroed: options.targetIsZeroed });
      try {
        let only: BlockSet | undefined;
        let rollback: RestoredDisk['rollback'];
        if (options.onlyChanged && !target.read) throw new InvalidArgumentError(`--only-changed: target ${target.path} cannot be read back`);
        if (bitmapContext && target instanceof NbdTarget) {
          if (!target.hasContext(bitmapContext)) throw new InvalidArgumentError(`${target.path} exports no dirty bitmap ${options.sinceBitmap} (qemu-nbd -B ${options.sinceBitmap})`);
          const plan = await planRollback(repo, disk, options.sinceBitmap!, target.flaggedRanges(bitmapContext, STATE_DIRTY, disk.size));
          only = plan.write;
          rollback = { bitmap: options.sinceBitmap!, baseBackup: plan.base.id, blocksDirty: plan.blocksDirty, blocksChangedSinceBase: plan.blocksChangedSinceBase };
        }
        const restored = await restoreDisk(repo, pool, record, disk, target, { ...options, compare: options.onlyChanged === true && only === undefined, only });
        if (rollback) restored.rollback = rollback;
        disks.push(restored);
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

export interface RestoreDiskOptions {
  signal?: AbortSignal | undefined;
  onProgress?: ((progress: RestoreProgress) => void) | undefined;
  /** Read every block back from the target (workers hash it) and write only those that differ. */
  compare?: boolean | undefined;
  /** Write only these blocks; the others are left as they are. */
  only?: BlockSet | undefined;
}

/**
 * Restores one disk's map onto an opened target. Exported for other targets to reuse.
 *
 * Zero blocks: skipped on a target that reads as zeros, WRITE_ZEROES where the target has it (one call per
 * run of zero blocks), zero buffers otherwise.
 */
export async function restoreDisk(repo: Repository, pool: BlockPool, record: BackupRecord, disk: DiskRecord, target: RestoreTarget, options: RestoreDiskOptions): Promise<RestoredDisk> {
  const blockSize = record.blockSize;
  const zeros = Buffer.alloc(blockSize);
  const result: RestoredDisk = { name: disk.name, path: target.path, size: disk.size, bytesWritten: 0, blocksZero: 0, blocksWritten: 0, blocksCompared: 0 };
  const inFlight = new Set<Promise<void>>();
  let failure: unknown;
  let bytesDone = 0;
  const batchLimit = Math.max(1, pool.slots.count);
  const only = options.only;

  const lengthOf = (block: number): number => Math.min(blockSize, disk.size - block * blockSize);
  const progress = (): void => options.onProgress?.({ disk: disk.name, bytesDone, bytesTotal: disk.size });
  const whereOf = (block: number, id: Buffer, location: BlobLocation) => ({ backupId: record.id, disk: disk.name, diskOffset: block * blockSize, packId: location.packId, packOffset: location.offset, chunk: id.toString('hex') });

  /** Opens a chunk into `slot` (the workers check it) and writes it. */
  const writeChunk = async (slot: number, block: number, id: Buffer, location: BlobLocation): Promise<void> => {
    const opened = await pool.open({ slot, packPath: packPath(repo.root, location.packId), offset: location.offset, length: location.length, id });
    if (!opened.ok) throw new CorruptChunkError(whereOf(block, id, location), opened.why);
    if (opened.rawLength !== lengthOf(block)) throw new CorruptChunkError(whereOf(block, id, location), `chunk holds ${opened.rawLength} bytes, the block needs ${lengthOf(block)}`);
    await target.write(pool.input(slot, opened.rawLength), block * blockSize);
    result.bytesWritten += opened.rawLength;
    result.blocksWritten += 1;
  };

  /** Writes zeros over blocks [first, first + count) of a target that does not read as zeros. */
  const zeroBlocks = async (first: number, count: number): Promise<void> => {
    const offset = first * blockSize;
    const length = Math.min(count * blockSize, disk.size - offset);
    if (target.writeZeroes) await target.writeZeroes(offset, length);
    else for (let at = offset; at < offset + length; at += blockSize) await target.write(zeros.subarray(0, Math.min(blockSize, offset + length - at)), at);
    result.bytesWritten += length;
    result.blocksWritten += count;
  };

  const restoreChunk = async (block: number, id: Buffer, location: BlobLocation): Promise<void> => {
    const slot = await pool.slots.acquire();
    try {
      await writeChunk(slot, block, id, location);
      bytesDone += lengthOf(block);
    } finally {
      pool.slots.release(slot);
    }
  };

  /** Rollback: the target's block is read into a slot and hashed by a worker; only a difference is written. */
  const compareBlock = async (block: number, id: Buffer | null, location: BlobLocation | undefined): Promise<void> => {
    const slot = await pool.slots.acquire();
    try {
      const length = lengthOf(block);
      await target.read!(pool.input(slot, length), block * blockSize);
      const hashed = await pool.hash(slot, length);
      result.blocksCompared += 1;
      const same = id === null ? hashed.zero : !hashed.zero && id.equals(Buffer.from(hashed.id));
      if (!same) {
        if (id === null) await zeroBlocks(block, 1);
        else await writeChunk(slot, block, id, location!);
      }
      bytesDone += length;
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

  /** Zero blocks of the restore point, as runs, honouring `only`. */
  const restoreZeros = async (first: number, count: number): Promise<void> => {
    result.blocksZero += count;
    if (only === undefined) {
      // One run, whatever its length: a zero subtree of a 1 PiB map is one step, not 2^30.
      if (!target.zeroed) await zeroBlocks(first, count);
      bytesDone += Math.min(count * blockSize, disk.size - first * blockSize);
      return;
    }
    let runStart = -1;
    const flushRun = async (end: number): Promise<void> => {
      if (runStart >= 0 && !target.zeroed) await zeroBlocks(runStart, end - runStart);
      runStart = -1;
    };
    for (let block = first; block < first + count; block += 1) {
      const wanted = only === undefined || only.has(block);
      if (wanted && runStart < 0) runStart = block;
      if (!wanted) await flushRun(block);
      bytesDone += lengthOf(block);
    }
    await flushRun(first + count);
  };

  let pending: { block: number; id: Buffer | null }[] = [];
  const flushPending = async (): Promise<void> => {
    const wanted = pending.filter((p) => p.id !== null);
    const found = await repo.lookup(wanted.map((p) => p.id!));
    const locations = new Map(wanted.map((p, i) => [p.block, found[i]]));
    for (const { block, id } of pending) {
      const location = locations.get(block);
      if (id !== null && !location) {
        throw new MissingBlobError(id.toString('hex'), `chunk for backup ${record.id}, disk ${disk.name}, offset ${block * blockSize}:`);
      }
      // Wait for a slot here rather than queueing unboundedly: this is the restore's backpressure.
      while (pool.slots.available === 0 && failure === undefined) await Promise.race(inFlight);
      if (failure !== undefined) throw failure;
      launch(options.compare ? compareBlock(block, id, location) : restoreChunk(block, id!, location!));
    }
    pending = [];
    progress();
  };
  const queue = async (block: number, id: Buffer | null): Promise<void> => {
    pending.push({ block, id });
    if (pending.length >= batchLimit) await flushPending();
  };

  try {
    for await (const run of readMap(mapRootOf(disk), repo.loadPage)) {
      if (options.signal?.aborted) throw new InterruptedError('restore');
      if (failure !== undefined) throw failure;
      if (run.entries === null && !options.compare) {
        await restoreZeros(run.firstBlock, run.count);
        continue;
      }
      for (let i = 0; i < run.count; i += 1) {
        const block = run.firstBlock + i;
        const entry = run.entries === null ? ZERO_ID : run.entries.subarray(i * ID_SIZE, (i + 1) * ID_SIZE);
        const zero = ZERO_ID.equals(entry);
        if (options.compare) {
          if (zero) result.blocksZero += 1;
          await queue(block, zero ? null : Buffer.from(entry));
        } else if (zero) {
          await restoreZeros(block, 1);
        } else if (only !== undefined && !only.has(block)) {
          bytesDone += lengthOf(block);
        } else {
          await queue(block, Buffer.from(entry));
        }
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
