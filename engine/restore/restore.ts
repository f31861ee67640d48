/**
 * Restores one disk of a backup, or every disk of it into a directory. Each backup's map is complete,
 * so a restore reads exactly one map, whatever the backup's type.
 *
 * Chunks are read from packs by the workers (several in flight), each checked (xxh64 of the frame, the
 * AES-256-GCM tag in an encrypted repository, then the plaintext's id) before a byte of it reaches the target.
 */
import { stat } from 'node:fs/promises';
import { Repository } from '../../repo-format/repository.js';
import { readMap } from '../../repo-format/block-map.js';
import { mapRootOf, type BackupRecord, type DiskRecord } from '../../repo-format/backup-record.js';
import { packPath } from '../../repo-format/pack-file.js';
import { ID_SIZE, ZERO_ID } from '../../repo-format/constants.js';
import { InvalidArgumentError, MissingBlobError } from '../../repo-format/errors.js';
import { checkLocalPath } from '../../repo-format/local-path.js';
import { nameMatches } from '../../repo-format/names.js';
import { BlockPool } from '../pipeline/block-pool.js';
import { CorruptChunkError, DiskNotFoundError, InterruptedError } from '../errors.js';
import { Interruption } from '../host/interrupt.js';
import { refuseInsideRepository } from '../host/write-guard.js';
import { FileTarget, type RestoreTarget } from './file-target.js';
import { refuseDeviceWithData } from './target-in-use.js';
import { restorePointSignature } from './restore-point-signature.js';
import { planLocalTargets, removeCreatedDirectory, singleDisk, type TargetPlan } from './target-plan.js';
import { NbdTarget } from './nbd-target.js';
import { Qcow2Target } from './qcow2-target.js';
import { planRollback } from './rollback-plan.js';
import type { BlockSet } from '../common/block-set.js';
import { crashPoint } from '../../repo-format/crash-points.js';
import { isNbdUri } from '../nbd/uri.js';
import { STATE_DIRTY } from '../nbd/protocol.js';
import type { BlobLocation } from '../../repo-format/index-entry.js';
import type { Passphrase } from '../../repo-format/passphrase.js';

export interface RestoreProgress {
  disk: string;
  bytesDone: number;
  bytesTotal: number;
}

export interface RestoreOptions {
  repo: string;
  /** The passphrase of an encrypted repository. */
  passphrase?: Passphrase | undefined;
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
  /**
   * Overwrite what holds data: a block device with a filesystem, partition table or volume signature, a
   * same-named file in the directory restored into, the backup's own source.
   */
  force?: boolean | undefined;
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
  /** True when this restore created the target (a new file or qcow2 image); false for an existing one. */
  created: boolean;
}

export interface RestoreResult {
  backup: BackupRecord;
  disks: RestoredDisk[];
  /** The directory this restore created for the disks (`--to NEW` of a backup with several disks), or null. */
  createdDirectory: string | null;
}

/**
 * The bytes of a target a restore has written to so far (or is writing): what an interrupted or failed
 * restore says of an existing target, which it cannot undo.
 */
export class WrittenSpan {
  low = Infinity;
  high = 0;

  note(offset: number, length: number): void {
    this.low = Math.min(this.low, offset);
    this.high = Math.max(this.high, offset + length);
  }

  get empty(): boolean {
    return this.low === Infinity;
  }
}

/**
 * What an interrupted restore left: of the target it was writing (if any), and of the disks before it.
 * A created directory left empty is removed with the failure (restore's finally).
 */
function interruptedState(done: readonly RestoredDisk[], plan: TargetPlan | undefined, writing?: { target: RestoreTarget; size: number; written: WrittenSpan }): string {
  const parts: string[] = [];
  if (writing) {
    const { target, size, written } = writing;
    if (target.created) parts.push(`the new ${target instanceof Qcow2Target ? 'image' : 'file'} ${target.path} it was writing was removed`);
    else if (written.empty) parts.push(`target ${target.path} was not written`);
    else parts.push(`target ${target.path} was partially written: bytes ${written.low} to ${written.high - 1} (of ${size}) may differ from both its old content and the backup; the rest of it is unchanged`);
  }
  for (const disk of done) parts.push(`disk ${disk.name} was restored completely to ${disk.path}`);
  if (plan?.createdDirectory && done.length === 0) parts.push(`the directory ${plan.createdDirectory} it created was removed`);
  return parts.length > 0 ? parts.join('; ') : 'nothing was written';
}

function checkRollbackOptions(options: RestoreOptions): void {
  if (options.sinceBitmap !== undefined && !options.onlyChanged) throw new InvalidArgumentError('--since-bitmap goes with --only-changed');
  if (!options.onlyChanged) return;
  if (options.toQcow2 !== undefined) throw new InvalidArgumentError('--only-changed rolls back an existing target; --to-qcow2 creates a new one');
  if (options.sinceBitmap !== undefined && !isNbdUri(options.to)) throw new InvalidArgumentError('--since-bitmap needs an NBD target (--to nbd+unix:///…?socket=… exporting the bitmap, e.g. qemu-nbd -B NAME)');
}

/**
 * What a block device target must pass once held exclusively: no filesystem, partition table or volume
 * signature unless --force, or, for a rollback, the same disk as the restore point (same filesystem or
 * partition-table UUID: an older state of this disk, which is what a rollback is for). A device the caller
 * just created (targetIsZeroed) is exempt.
 */
function deviceCheck(repo: Repository, disk: DiskRecord, options: RestoreOptions): ((path: string) => Promise<void>) | undefined {
  if (options.force === true || options.targetIsZeroed === true) return undefined;
  return (path) => refuseDeviceWithData(path, options.onlyChanged ? () => restorePointSignature(repo, disk) : undefined);
}

/** Plans where each disk goes; local paths are checked (write-guard.ts) before anything is written. */
async function planRestore(repo: Repository, record: BackupRecord, options: RestoreOptions, nbd: boolean): Promise<TargetPlan> {
  // A target the caller just created (targetIsZeroed: oVirt's new disks) is not the source it may share a
  // path with (a new disk with the original's id appears under the same /dev/disk/by-id name).
  const guard = { repo: repo.root, force: options.force === true || options.targetIsZeroed === true, rollback: options.onlyChanged === true };
  if (options.openTarget) {
    return { targets: record.disks.filter((d) => options.disk === undefined || nameMatches(d.name, options.disk)).map((disk) => ({ disk, path: '' })), createdDirectory: null };
  }
  if (options.toQcow2 !== undefined) {
    await refuseInsideRepository(options.toQcow2, 'restore target', repo.root);
    return { targets: singleDisk(record, options.disk, options.toQcow2).map((disk) => ({ disk, path: options.toQcow2! })), createdDirectory: null };
  }
  if (nbd) return { targets: singleDisk(record, options.disk, options.to).map((disk) => ({ disk, path: options.to })), createdDirectory: null };
  return planLocalTargets(record, { ...guard, disk: options.disk, to: options.to });
}

export async function restore(options: RestoreOptions): Promise<RestoreResult> {
  checkRollbackOptions(options);
  // Before the repository is opened: a URL is never taken for a relative path.
  if (options.toQcow2 !== undefined) checkLocalPath(options.toQcow2, '--to-qcow2');
  else if (options.openTarget === undefined && !isNbdUri(options.to)) checkLocalPath(options.to, '--to', 'nbd:// and nbd+unix:// URIs');
  const disks: RestoredDisk[] = [];
  let plan: TargetPlan | undefined;
  const interruption = new Interruption(options.signal, 'restore', () => interruptedState(disks, plan));
  interruption.check();
  // A read-only (or full, reserve-less) repository is restored from without the lock (SPEC.md, 12.6).
  const repo = await Repository.open(options.repo, { access: 'exclusive', command: 'restore', passphrase: options.passphrase, readWithoutLock: true, checkInterrupted: () => interruption.check() });
  let pool: BlockPool | undefined;
  let succeeded = false;
  try {
    const record = await repo.findBackup(options.backupId);
    const nbd = options.openTarget === undefined && options.toQcow2 === undefined && isNbdUri(options.to);
    plan = await planRestore(repo, record, options, nbd);
    if (plan.targets.length === 0) throw new DiskNotFoundError(record.id, options.disk ?? '', record.disks.map((d) => d.name));
    pool = new BlockPool({ blockSize: record.blockSize, workers: options.workers, keys: repo.keys });
    const bitmapContext = options.sinceBitmap === undefined ? undefined : `qemu:dirty-bitmap:${options.sinceBitmap}`;
    for (const { disk, path } of plan.targets) {
      interruption.check();
      if (options.onlyChanged && !options.openTarget && !nbd && !(await stat(path).then(() => true, () => false))) {
        throw new InvalidArgumentError(`--only-changed rolls back an existing target; ${path} does not exist`);
      }
      const target: RestoreTarget = options.openTarget
        ? await options.openTarget(disk)
        : options.toQcow2 !== undefined
          ? await Qcow2Target.create(options.toQcow2, disk.size)
          : nbd
            ? await NbdTarget.open(options.to, disk.size, { metaContexts: bitmapContext ? [bitmapContext] : [] })
            : await FileTarget.open(path, disk.size, { assumeZeroed: options.targetIsZeroed, checkDevice: deviceCheck(repo, disk, options) });
      const written = new WrittenSpan();
      try {
        let only: BlockSet | undefined;
        let rollback: RestoredDisk['rollback'];
        if (options.onlyChanged && !target.read) throw new InvalidArgumentError(`--only-changed: target ${target.path} cannot be read back`);
        if (bitmapContext && target instanceof NbdTarget) {
          if (!target.hasContext(bitmapContext)) throw new InvalidArgumentError(`${target.path} exports no dirty bitmap ${options.sinceBitmap} (qemu-nbd -B ${options.sinceBitmap})`);
          const plan = await planRollback(repo, disk, options.sinceBitmap!, target.flaggedRanges(bitmapContext, STATE_DIRTY, disk.size), interruption);
          only = plan.write;
          rollback = { bitmap: options.sinceBitmap!, baseBackup: plan.base.id, blocksDirty: plan.blocksDirty, blocksChangedSinceBase: plan.blocksChangedSinceBase };
        }
        const restored = await restoreDisk(repo, pool, record, disk, target, { ...options, compare: options.onlyChanged === true && only === undefined, only, written });
        if (rollback) restored.rollback = rollback;
        await target.finish();
        disks.push(restored);
      } catch (error) {
        await target.discard();
        if (!(error instanceof InterruptedError)) throw error;
        throw interruption.error(interruptedState(disks, plan, { target, size: disk.size, written }));
      }
    }
    succeeded = true;
    return { backup: record, disks, createdDirectory: plan.createdDirectory };
  } finally {
    // A directory this run created and left empty goes with it.
    if (!succeeded && plan) await removeCreatedDirectory(plan);
    await pool?.close().catch(() => undefined);
    await repo.close();
  }
}

/** Zeros go to a target with WRITE_ZEROES in spans of this size, checking for an interruption between them. */
const ZERO_SPAN_BYTES = 1024 * 1024 * 1024;

export interface RestoreDiskOptions {
  signal?: AbortSignal | undefined;
  onProgress?: ((progress: RestoreProgress) => void) | undefined;
  /** Read every block back from the target (workers hash it) and write only those that differ. */
  compare?: boolean | undefined;
  /** Write only these blocks; the others are left as they are. */
  only?: BlockSet | undefined;
  /** Updated with every range written (before the write is issued), for what an interruption says. */
  written?: WrittenSpan | undefined;
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
  const result: RestoredDisk = { name: disk.name, path: target.path, size: disk.size, bytesWritten: 0, blocksZero: 0, blocksWritten: 0, blocksCompared: 0, created: target.created === true };
  const interruption = new Interruption(options.signal, 'restore');
  const written = options.written ?? new WrittenSpan();
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
    written.note(block * blockSize, opened.rawLength);
    await target.write(pool.input(slot, opened.rawLength), block * blockSize);
    result.bytesWritten += opened.rawLength;
    result.blocksWritten += 1;
    if (result.blocksWritten === 1) crashPoint('restore-block-written');
  };

  /**
   * Writes zeros over blocks [first, first + count) of a target that does not read as zeros; a long run
   * goes in spans, checking for an interruption between them.
   */
  const zeroBlocks = async (first: number, count: number): Promise<void> => {
    const offset = first * blockSize;
    const end = Math.min(offset + count * blockSize, disk.size);
    for (let at = offset; at < end; ) {
      await interruption.tick();
      const span = target.writeZeroes ? Math.min(ZERO_SPAN_BYTES, end - at) : Math.min(blockSize, end - at);
      written.note(at, span);
      if (target.writeZeroes) await target.writeZeroes(at, span);
      else await target.write(zeros.subarray(0, span), at);
      result.bytesWritten += span;
      at += span;
    }
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
      await interruption.tick();
      const wanted = only.has(block);
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
      await interruption.tick();
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
      await interruption.tick();
      if (failure !== undefined) throw failure;
      if (run.entries === null && !options.compare) {
        await restoreZeros(run.firstBlock, run.count);
        continue;
      }
      for (let i = 0; i < run.count; i += 1) {
        // Per block, not per map page: a page covers 1024 blocks (1 GiB at 1 MiB blocks).
        await interruption.tick();
        if (failure !== undefined) throw failure;
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
