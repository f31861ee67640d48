/**
 * Restores one disk's map onto an opened target: restore's "write blocks" phase.
 *
 *   map runs (block order) ──▶ zero runs: skipped on a target that reads as zeros, WRITE_ZEROES where the
 *        │                     target has it (one call per run), zero buffers otherwise
 *        └─▶ chunk blocks, a batch at a time ──▶ one index lookup per batch ──▶ per block, once a slot is
 *            free: the workers open (and check) the chunk into the slot ──▶ written to the target
 *
 * The slots of the worker pool bound what is in flight: a batch waits for a free slot before it launches
 * the next block (the restore's backpressure). A rollback reads the target's block into the slot instead,
 * has it hashed, and writes only a block that differs; `only` limits the writes to a set of blocks.
 * Chunks are checked (xxh64 of the frame, the AES-256-GCM tag in an encrypted repository, then the
 * plaintext's id) before a byte of them reaches the target.
 */
import type { Repository } from '../../repo-format/repository.js';
import { readMap, type MapRun } from '../../repo-format/block-map.js';
import { mapRootOf, type BackupRecord, type DiskRecord } from '../../repo-format/backup-record.js';
import { ID_SIZE, ZERO_ID } from '../../repo-format/constants.js';
import { DiskGeometry } from '../../repo-format/disk-geometry.js';
import { MissingBlobError } from '../../repo-format/errors.js';
import { crashPoint } from '../../repo-format/crash-points.js';
import type { BlobLocation } from '../../repo-format/index-entry.js';
import type { BlockPool } from '../pipeline/block-pool.js';
import { SPAN_BYTES, type OpenResult } from '../pipeline/tasks.js';
import { extendSpan, type FrameLocator } from '../../repo-format/frame-locator.js';
import type { BlockSet } from '../common/block-set.js';
import { CorruptChunkError } from '../errors.js';
import { Interruption } from '../host/interrupt.js';
import type { TargetWriter } from './target-writer.js';
import { pageAlignedZeros } from '../pipeline/aligned-memory.js';
import { RUN_BYTES } from './write-runs.js';

export interface RestoreProgress {
  disk: string;
  bytesDone: number;
  bytesTotal: number;
}

export interface RestoredDisk {
  name: string;
  path: string;
  size: number;
  bytesWritten: number;
  blocksZero: number;
  /** Blocks written to the target (data, or zeros on a target that does not already read as zeros). */
  blocksWritten: number;
  /** Blocks read back from the target and hashed (a rollback that compares). */
  blocksCompared: number;
  /** A rollback through a dirty bitmap: the backup whose checkpoint the bitmap is, and how the written blocks were chosen. */
  rollback?: { bitmap: string; baseBackup: string; blocksDirty: number; blocksChangedSinceBase: number } | undefined;
  /** True when this restore created the target (a new file or qcow2 image); false for an existing one. */
  created: boolean;
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

/** Zeros go to a target with WRITE_ZEROES in spans of this size, checking for an interruption between them. */
const ZERO_SPAN_BYTES = 1024 * 1024 * 1024;

/** A block of a span: its frame lies at `offset` in the span. */
interface SpanMember {
  block: number;
  id: Buffer;
  location: BlobLocation;
  /** Where the frame alone is (read so when the span cannot be read whole). */
  locator: FrameLocator;
  offset: number;
}

/** Blocks whose frames one read fetches (extendSpan). */
interface Span {
  locator: FrameLocator;
  /** Bytes the span covers: the sum of its frames' lengths (the index's). */
  length: number;
  members: SpanMember[];
}

/** A block waiting for its batch's index lookup; `id` null: the restore point holds zeros there (a rollback compares it). */
interface PendingBlock {
  block: number;
  id: Buffer | null;
}

/** Restores `disk` of `record` onto `target`. Exported for other targets to reuse. */
export async function restoreDisk(repo: Repository, pool: BlockPool, record: BackupRecord, disk: DiskRecord, target: TargetWriter, options: RestoreDiskOptions): Promise<RestoredDisk> {
  const restore = new DiskRestore(repo, pool, record, disk, target, options);
  await restore.run();
  return restore.result;
}

class DiskRestore {
  readonly result: RestoredDisk;
  private readonly geometry: DiskGeometry;
  private readonly interruption: Interruption;
  private readonly written: WrittenSpan;
  private readonly zeros: Buffer;
  private readonly batchLimit: number;
  private readonly inFlight = new Set<Promise<void>>();
  private pending: PendingBlock[] = [];
  private failure: unknown;
  private bytesDone = 0;

  constructor(
    private readonly repo: Repository,
    private readonly pool: BlockPool,
    private readonly record: BackupRecord,
    private readonly disk: DiskRecord,
    private readonly target: TargetWriter,
    private readonly options: RestoreDiskOptions,
  ) {
    this.geometry = new DiskGeometry(disk.size, record.blockSize);
    this.interruption = new Interruption(options.signal, 'restore');
    this.written = options.written ?? new WrittenSpan();
    // Page-aligned, as the slots are: a file target writes it with O_DIRECT.
    this.zeros = pageAlignedZeros(record.blockSize);
    this.batchLimit = Math.max(1, pool.slots.count);
    this.result = { name: disk.name, path: target.path, size: disk.size, bytesWritten: 0, blocksZero: 0, blocksWritten: 0, blocksCompared: 0, created: target.created === true };
  }

  /** Walks the map in block order; every write launched is awaited, the first failure thrown. */
  async run(): Promise<void> {
    try {
      for await (const run of readMap(mapRootOf(this.disk), this.repo.loadPage)) {
        await this.checkpoint();
        if (run.entries === null && !this.options.compare) await this.restoreZeros(run.firstBlock, run.count);
        else await this.takeRun(run);
      }
      if (this.pending.length > 0) await this.flushPending();
      // The last writes may wait on a server that stalls: a signal then stops the restore (they are abandoned).
      await this.interruption.race(Promise.all(this.inFlight));
    } catch (error) {
      await this.abandonWrites();
      throw error;
    } finally {
      await Promise.all(this.inFlight);
    }
    if (this.failure !== undefined) throw this.failure;
    this.progress();
  }

  /**
   * After a failure or an interruption: the target's requests in flight fail at once (TargetWriter.abandon),
   * so that waiting for the work in flight to end, which releases its slots, does not wait on a server.
   */
  private async abandonWrites(): Promise<void> {
    await this.target.abandon?.();
  }

  private async checkpoint(): Promise<void> {
    await this.interruption.tick();
    if (this.failure !== undefined) throw this.failure;
  }

  private progress(): void {
    this.options.onProgress?.({ disk: this.disk.name, bytesDone: this.bytesDone, bytesTotal: this.disk.size });
  }

  /** One run of entries, checked per block, not per map page: a page covers 1024 blocks (1 GiB at 1 MiB blocks). */
  private async takeRun(run: MapRun): Promise<void> {
    for (let i = 0; i < run.count; i += 1) {
      await this.checkpoint();
      const entry = run.entries === null ? ZERO_ID : run.entries.subarray(i * ID_SIZE, (i + 1) * ID_SIZE);
      await this.takeBlock(run.firstBlock + i, ZERO_ID.equals(entry) ? null : Buffer.from(entry));
    }
  }

  private async takeBlock(block: number, id: Buffer | null): Promise<void> {
    const only = this.options.only;
    if (this.options.compare) {
      if (id === null) this.result.blocksZero += 1;
      await this.queue({ block, id });
    } else if (id === null) {
      await this.restoreZeros(block, 1);
    } else if (only !== undefined && !only.has(block)) {
      this.bytesDone += this.geometry.lengthOf(block);
    } else {
      await this.queue({ block, id });
    }
  }

  private async queue(pending: PendingBlock): Promise<void> {
    this.pending.push(pending);
    if (this.pending.length >= this.batchLimit) await this.flushPending();
  }

  /**
   * One index lookup for the batch, then each block launched as soon as a slot is free; blocks whose frames
   * lie one after another in a pack of a store of objects go as one span (one read, one ranged GET).
   */
  private async flushPending(): Promise<void> {
    const pending = this.pending;
    this.pending = [];
    const wanted = pending.filter((p) => p.id !== null);
    const found = await this.repo.lookup(wanted.map((p) => p.id!));
    const locations = new Map(wanted.map((p, i) => [p.block, found[i]]));
    for (let i = 0; i < pending.length; ) {
      await this.interruption.tick();
      const { block, id } = pending[i]!;
      const location = locations.get(block);
      if (id !== null && !location) {
        throw new MissingBlobError(id.toString('hex'), `chunk for backup ${this.record.id}, disk ${this.disk.name}, offset ${this.geometry.offsetOf(block)}:`);
      }
      const span = this.options.compare ? undefined : this.spanFrom(pending, i, locations);
      if (span) {
        // Its slots are taken together, synchronously: a span never holds some while waiting for the rest.
        let slots: number[] | undefined;
        while ((slots = this.failure === undefined ? this.pool.slots.tryAcquire(span.members.length) : undefined) === undefined && this.failure === undefined) await this.interruption.race(Promise.race(this.inFlight));
        if (this.failure !== undefined) throw this.failure;
        this.launch(this.restoreSpan(span, slots!));
        i += span.members.length;
        continue;
      }
      // Wait for a slot here rather than queueing unboundedly: this is the restore's backpressure. The writes
      // holding the slots may wait on a server that stalls: that wait is interruptible.
      while (this.pool.slots.available === 0 && this.failure === undefined) await this.interruption.race(Promise.race(this.inFlight));
      if (this.failure !== undefined) throw this.failure;
      this.launch(this.options.compare ? this.compareBlock(block, id, location) : this.restoreChunk(block, id!, location!));
      i += 1;
    }
    this.progress();
  }

  /**
   * The blocks from pending[first] on whose frames follow one another in one pack of a store of objects
   * (extendSpan), at most SPAN_BYTES and a quarter of the slots (so that several spans are in flight), when
   * there are at least two of them.
   */
  private spanFrom(pending: PendingBlock[], first: number, locations: Map<number, BlobLocation | undefined>): Span | undefined {
    const maxMembers = Math.max(1, Math.floor(this.pool.slots.count / 4));
    const members: SpanMember[] = [];
    let locator: FrameLocator | undefined;
    let length = 0;
    for (let i = first; i < pending.length && members.length < maxMembers; i += 1) {
      const { block, id } = pending[i]!;
      const location = id === null ? undefined : locations.get(block);
      if (id === null || !location) break;
      const next = this.repo.locateFrame(location);
      if (!next) break;
      const extended = locator === undefined ? next : extendSpan(locator, next, SPAN_BYTES);
      if (!extended) break;
      members.push({ block, id, location, locator: next, offset: length });
      locator = extended;
      length += location.length;
    }
    return locator !== undefined && members.length >= 2 ? { locator, length, members } : undefined;
  }

  /** A span's frames read at once and opened into `slots` by a worker, then each block written. */
  private async restoreSpan(span: Span, slots: number[]): Promise<void> {
    try {
      const opened = await this.pool.openSpan(span.locator, span.length, span.members.map((m, k) => ({ slot: slots[k]!, offset: m.offset, length: m.location.length, id: new Uint8Array(m.id), locator: m.locator })));
      for (const [k, member] of span.members.entries()) {
        await this.writeOpened(slots[k]!, member.block, member.id, member.location, opened[k]!);
        this.bytesDone += this.geometry.lengthOf(member.block);
      }
    } finally {
      for (const slot of slots) this.pool.slots.release(slot);
    }
  }

  private launch(work: Promise<void>): void {
    const tracked = work.catch((error: unknown) => {
      this.failure ??= error;
    });
    this.inFlight.add(tracked);
    void tracked.finally(() => this.inFlight.delete(tracked));
  }

  private async restoreChunk(block: number, id: Buffer, location: BlobLocation): Promise<void> {
    const slot = await this.pool.slots.acquire();
    try {
      await this.writeChunk(slot, block, id, location);
      this.bytesDone += this.geometry.lengthOf(block);
    } finally {
      this.pool.slots.release(slot);
    }
  }

  /** Rollback: the target's block is read into a slot and hashed by a worker; only a difference is written. */
  private async compareBlock(block: number, id: Buffer | null, location: BlobLocation | undefined): Promise<void> {
    const slot = await this.pool.slots.acquire();
    try {
      const length = this.geometry.lengthOf(block);
      await this.target.read!(this.pool.input(slot, length), this.geometry.offsetOf(block));
      const hashed = await this.pool.hash(slot, length);
      this.result.blocksCompared += 1;
      const same = id === null ? hashed.zero : !hashed.zero && id.equals(Buffer.from(hashed.id));
      if (!same) {
        if (id === null) await this.zeroBlocks(block, 1);
        else await this.writeChunk(slot, block, id, location!);
      }
      this.bytesDone += length;
    } finally {
      this.pool.slots.release(slot);
    }
  }

  /** Opens a chunk into `slot` (the workers check it) and writes it. */
  private async writeChunk(slot: number, block: number, id: Buffer, location: BlobLocation): Promise<void> {
    const opened = await this.pool.open(slot, { locator: this.repo.locateFrame(location), read: () => this.repo.readFrame(location) }, id);
    await this.writeOpened(slot, block, id, location, opened);
  }

  /** Writes a chunk a worker opened into `slot`, once its checks passed. */
  private async writeOpened(slot: number, block: number, id: Buffer, location: BlobLocation, opened: OpenResult): Promise<void> {
    const offset = this.geometry.offsetOf(block);
    const length = this.geometry.lengthOf(block);
    const where = () => ({ backupId: this.record.id, disk: this.disk.name, diskOffset: offset, packId: location.packId, packOffset: location.offset, chunk: id.toString('hex') });
    if (!opened.ok) throw new CorruptChunkError(where(), opened.why);
    if (opened.rawLength !== length) throw new CorruptChunkError(where(), `chunk holds ${opened.rawLength} bytes, the block needs ${length}`);
    this.written.note(offset, opened.rawLength);
    await this.target.write(this.pool.input(slot, opened.rawLength), offset);
    this.result.bytesWritten += opened.rawLength;
    this.result.blocksWritten += 1;
    if (this.result.blocksWritten === 1) crashPoint('restore-block-written');
  }

  /** Zero blocks of the restore point, as runs, honouring `only`. */
  private async restoreZeros(first: number, count: number): Promise<void> {
    this.result.blocksZero += count;
    const only = this.options.only;
    if (only === undefined) {
      // One run, whatever its length: a zero subtree of a 1 PiB map is one step, not 2^30.
      if (!this.target.zeroed) await this.zeroBlocks(first, count);
      this.bytesDone += this.geometry.bytesOf(first, count);
      return;
    }
    let runStart = -1;
    const flushRun = async (end: number): Promise<void> => {
      if (runStart >= 0 && !this.target.zeroed) await this.zeroBlocks(runStart, end - runStart);
      runStart = -1;
    };
    for (let block = first; block < first + count; block += 1) {
      await this.interruption.tick();
      const wanted = only.has(block);
      if (wanted && runStart < 0) runStart = block;
      if (!wanted) await flushRun(block);
      this.bytesDone += this.geometry.lengthOf(block);
    }
    await flushRun(first + count);
  }

  /**
   * Writes zeros over blocks [first, first + count) of a target that does not read as zeros; a long run
   * goes in spans, checking for an interruption between them. Without WRITE_ZEROES, a run's worth of zero
   * buffers is handed to the target at once, so that a file target writes them as one run (write-runs.ts).
   */
  private async zeroBlocks(first: number, count: number): Promise<void> {
    const offset = this.geometry.offsetOf(first);
    const end = offset + this.geometry.bytesOf(first, count);
    const batchLimit = Math.max(1, Math.floor(RUN_BYTES / this.geometry.blockSize));
    let batch: Promise<void>[] = [];
    const settle = async (): Promise<void> => {
      const settled = await Promise.allSettled(batch);
      batch = [];
      const failed = settled.find((s) => s.status === 'rejected');
      if (failed) throw failed.reason;
    };
    try {
      for (let at = offset; at < end; ) {
        await this.interruption.tick();
        const span = this.target.writeZeroes ? Math.min(ZERO_SPAN_BYTES, end - at) : Math.min(this.geometry.blockSize, end - at);
        this.written.note(at, span);
        if (this.target.writeZeroes) await this.interruption.race(this.target.writeZeroes(at, span));
        else batch.push(this.target.write(this.zeros.subarray(0, span), at));
        if (batch.length >= batchLimit) await settle();
        this.result.bytesWritten += span;
        at += span;
      }
    } catch (error) {
      // The writes still end before this returns (failed at once where the target can), but the first
      // failure (an interruption, say) is the one reported, not a write that failed after it.
      await this.abandonWrites();
      await settle().catch(() => undefined);
      throw error;
    }
    await settle();
    this.result.blocksWritten += count;
  }
}
