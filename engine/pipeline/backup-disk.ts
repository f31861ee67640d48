/**
 * Backs up one disk: the block pipeline.
 *
 *   reader ──slot──▶ workers: zero check + SHA-256 ──▶ in-order assembler ──▶ one index lookup per batch
 *        ▲                                                      │ new blocks: workers seal (lz4, xxh64)
 *        └────────────── slot released ◀── pack writer ◀────────┘ map builder (entries in block order)
 *
 * The reader reads adjacent blocks in runs of RUN_BYTES, one large in-order read each, RUNS_IN_FLIGHT at
 * once (storage's readahead works for one reader going forward), then fans the blocks out to the workers.
 * A source that asks for a constant depth (an NBD export: BlockSource.depth) is read one request at a time
 * instead, its bytes in flight kept at its depth, the next request sent as each reply lands.
 * It runs ahead of the assembler by at most slotCount blocks (the SlotPool is the bound), the
 * assembler looks up a batch of ids at a time (never one LevelDB get per block), and only blocks whose
 * id is not yet in the repository are compressed and written.
 *
 * Incremental: given the parent's map and the dirty extents, only blocks that a dirty byte touches are
 * read; every run of clean blocks takes its entries from the parent's map, so the new map is complete.
 */
import { KIND_DATA, ZERO_ID } from '../../repo-format/constants.js';
import { DiskGeometry } from '../../repo-format/disk-geometry.js';
import { EngineError } from '../../repo-format/errors.js';
import { MapBuilder, MapPageReader } from '../../repo-format/block-map.js';
import type { BlobWriter } from '../../repo-format/blob-writer.js';
import type { DiskRecord, DiskStats } from '../../repo-format/backup-record.js';
import type { Repository } from '../../repo-format/repository.js';
import { readRun, type BlockSource } from '../sources/source.js';
import type { BlockPool } from './block-pool.js';
import type { HashResult } from './tasks.js';
import { Interruption } from '../host/interrupt.js';
import { ZeroExtentCursor } from './zero-extents.js';
import { DirtyCursor, type Range } from './map-cursors.js';
import { BlockQueue } from './block-queue.js';
import { ByteWindow } from './byte-window.js';
import type { MapRoot } from '../../repo-format/block-map.js';

export interface DiskProgress {
  disk: string;
  bytesDone: number;
  bytesTotal: number;
  bytesRead: number;
  bytesNew: number;
  /**
   * The pipeline's items taken so far: one per block read, one per run of zero or unchanged blocks however
   * long it is. The work of a disk is proportional to it, so a thin disk of many TiB with little data takes
   * few steps (its data blocks and its extents), not one per block.
   */
  steps: number;
}

/** What an incremental or differential read needs: the map to take clean blocks from, and what changed. */
export interface IncrementalPlan {
  parent: MapRoot;
  dirty: AsyncIterable<Range>;
}

export interface BackupDiskContext {
  repo: Repository;
  pool: BlockPool;
  dataWriter: BlobWriter;
  metaWriter: BlobWriter;
  signal?: AbortSignal | undefined;
  onProgress?: ((progress: DiskProgress) => void) | undefined;
}

interface InFlight {
  block: number;
  slot: number;
  length: number;
  result: HashResult | undefined;
  done: Promise<void>;
  /** Set for a run of clean blocks taken from the parent map (no slot, nothing read). */
  unchanged?: number;
  /** Set for a run of blocks the source says read as zeros (no slot, nothing read). */
  zeros?: number;
}

/**
 * Bytes read at once from the source: one preadv per run of adjacent blocks (an NBD export is read at a
 * constant depth instead: BlockSource.depth). Measured cold on a 3 GiB ext4 image of /usr (vda, 8 MiB readahead): 1 MiB reads 32 at once
 * 222–341 MiB/s, 8 MiB reads one at a time ~415, two at a time ~585, 16 MiB two at a time ~640.
 */
export const RUN_BYTES = 8 * 1024 * 1024;
/** Runs read at once: the next is asked for while one is read, and no more, so storage sees one reader going forward. */
export const RUNS_IN_FLIGHT = 2;

/** The block's id as a Buffer view over the worker's answer (no copy). */
function idOf(result: { id: Uint8Array }): Buffer {
  return Buffer.from(result.id.buffer, result.id.byteOffset, result.id.byteLength);
}

/** What sealing a new block gave: its frame's length and flags, in the slot's output. */
type Sealed = Promise<{ frameLength: number; flags: number }>;

export async function backupDisk(source: BlockSource, name: string, context: BackupDiskContext, plan?: IncrementalPlan): Promise<DiskRecord> {
  return new DiskBackup(source, name, context, plan).run();
}

/**
 * One disk's pipeline, in three named stages that run at once: `read` (reader: issues reads and hashes in
 * block order, one slot each), `assemble` (assembler: takes the blocks in order, a batch at a time, and
 * `storeBatch` seals and writes the new ones and maps every one), and the frame writes in the background
 * (`writeFrame`), which free their slot once the frame is on its way to disk. The first failure stops all.
 */
class DiskBackup {
  private readonly geometry: DiskGeometry;
  private readonly interruption: Interruption;
  private readonly stats: DiskStats;
  private readonly parent: MapPageReader | undefined;
  private readonly dirty: DirtyCursor | undefined;
  private readonly zeroExtents: ZeroExtentCursor | undefined;
  private readonly map: MapBuilder;
  private readonly queue: BlockQueue<InFlight>;
  private readonly writes = new Set<Promise<void>>();
  /** The runs being read now (settled, never rejected: a failure is surfaced by their blocks). */
  private readonly reading = new Set<Promise<void>>();
  /** Blocks read at once in one run: RUN_BYTES, but no more than a quarter of the slots, so reading, hashing and writing overlap. */
  private readonly runBlocks: number;
  /** Blocks looked up in the index at once: half the slots, so that the reader always has the other half. */
  private readonly batchLimit: number;
  /** A source read at a constant depth (BlockSource.depth): its bytes in flight. */
  private readonly window: ByteWindow | undefined;
  private readonly started = Date.now();
  private failure: unknown;
  private bytesDone = 0;
  private steps = 0;

  constructor(
    private readonly source: BlockSource,
    private readonly name: string,
    private readonly context: BackupDiskContext,
    plan: IncrementalPlan | undefined,
  ) {
    const { repo, pool } = context;
    this.geometry = new DiskGeometry(source.size, repo.blockSize);
    // Checked per block: the holes of a thin NBD export, or a long clean run, are walked without any I/O.
    this.interruption = new Interruption(context.signal, 'backup');
    const blocks = this.geometry.blocks;
    this.stats = { bytesRead: 0, bytesNew: 0, bytesStored: 0, blocksTotal: blocks, blocksZero: 0, blocksNew: 0, blocksDeduplicated: 0, blocksUnchanged: 0, durationMs: 0 };
    if (plan && plan.parent.blocks !== blocks) throw new EngineError('ENGINE_INTERNAL', `parent map has ${plan.parent.blocks} blocks, the disk ${blocks}`);
    this.parent = plan ? new MapPageReader(plan.parent, repo.loadPage) : undefined;
    this.dirty = plan ? new DirtyCursor(plan.dirty) : undefined;
    this.zeroExtents = source.extents ? new ZeroExtentCursor(source.extents()) : undefined;
    this.map = new MapBuilder(blocks, repo.pageStore(context.metaWriter));
    this.batchLimit = Math.max(1, Math.floor(pool.slots.count / 2));
    // As many items queued as there are slots: enough for every block in flight, and a bound on the
    // slot-less items (zero runs, unchanged spans) too.
    this.queue = new BlockQueue<InFlight>(Math.max(1, pool.slots.count));
    this.runBlocks = Math.max(1, Math.min(Math.floor(RUN_BYTES / repo.blockSize), Math.floor(pool.slots.count / 4)));
    // Never more in flight than the slots hold: a request's bytes land in its block's slot.
    if (source.depth) this.window = new ByteWindow(Math.max(source.depth.requestSize, Math.min(source.depth.bytes, pool.slots.count * repo.blockSize)));
  }

  async run(): Promise<DiskRecord> {
    const reader = this.read().catch((error: unknown) => this.fail(error));
    const assembler = this.assemble().catch((error: unknown) => this.fail(error));
    await Promise.all([reader, assembler]);
    await Promise.all(this.writes);
    if (this.failure !== undefined) throw this.failure;
    const root = await this.map.finish();
    this.stats.durationMs = Date.now() - this.started;
    const { source, name, stats } = this;
    return { name, size: source.size, source: { ...source.description }, mode: 'full', modeReason: null, parent: null, cbt: null, map: { root: root.root.toString('hex'), depth: root.depth, blocks: root.blocks }, stats };
  }

  private fail(error: unknown): void {
    this.failure ??= error;
    this.context.pool.slots.fail(error);
    this.window?.fail(error);
    this.queue.end();
  }

  /**
   * The reader, in block order: runs of adjacent blocks to read (up to runBlocks) are read each as one large
   * read into their slots, at most RUNS_IN_FLIGHT at once, then every block of the run goes to a worker to
   * be hashed; blocks the source says read as zeros, and clean runs of an incremental, break a run and
   * go on as one item each, whatever their length: a hole costs a step per extent, not per block.
   */
  private async read(): Promise<void> {
    const blocks = this.geometry.blocks;
    let runFirst = 0;
    let runCount = 0;
    for (let block = 0; block < blocks && this.failure === undefined; block += 1) {
      await this.interruption.tick();
      const clean = await this.cleanRun(block);
      if (clean > 0) {
        if (runCount > 0) await this.readRun(runFirst, runCount);
        runCount = 0;
        await this.interruption.race(this.queue.push({ block, slot: -1, length: 0, result: undefined, done: Promise.resolve(), unchanged: clean }));
        block += clean - 1;
        continue;
      }
      const zeros = await this.zeroRun(block);
      if (zeros > 0) {
        if (runCount > 0) await this.readRun(runFirst, runCount);
        runCount = 0;
        await this.interruption.race(this.queue.push({ block, slot: -1, length: 0, result: undefined, done: Promise.resolve(), zeros }));
        block += zeros - 1;
        continue;
      }
      if (this.window) {
        await this.readDeep(block);
        continue;
      }
      if (runCount === 0) runFirst = block;
      runCount += 1;
      if (runCount === this.runBlocks) {
        await this.readRun(runFirst, runCount);
        runCount = 0;
      }
    }
    if (runCount > 0 && this.failure === undefined) await this.readRun(runFirst, runCount);
    this.queue.end();
  }

  /** Incremental: how many blocks from `block` on no dirty byte touches (taken from the parent's map, unread). */
  private async cleanRun(block: number): Promise<number> {
    if (!this.dirty) return 0;
    const nextDirty = await this.interruption.race(this.dirty.nextDirtyBlock(block, this.geometry.blockSize, this.geometry.blocks));
    return nextDirty - block;
  }

  /**
   * How many blocks from `block` on the source says read as zeros (a hole, a zero cluster), all in one extent
   * (0 when `block` is not one of them): they are recorded unread. In an incremental the run ends with the
   * dirty range, so that clean blocks still come from the parent's map.
   */
  private async zeroRun(block: number): Promise<number> {
    const { zeroExtents, geometry } = this;
    if (!zeroExtents) return 0;
    const offset = geometry.offsetOf(block);
    // Asking the source for more extents may take long (the holes of a thin disk come merged over many
    // requests), so that wait is interruptible.
    const end = await this.interruption.race(zeroExtents.zeroEnd(offset, geometry.lengthOf(block)));
    if (end === offset) return 0;
    let until = end >= this.source.size ? geometry.blocks : geometry.blockAt(end);
    if (this.dirty) until = Math.min(until, this.dirty.touchedEnd(geometry.blockSize, geometry.blocks));
    return Math.max(1, until - block);
  }

  /**
   * `count` adjacent blocks from `first` read as one run into their slots, once fewer than RUNS_IN_FLIGHT
   * runs are being read; each block is hashed by a worker as soon as the run is in.
   */
  private async readRun(first: number, count: number): Promise<void> {
    const { source, geometry } = this;
    const pool = this.context.pool;
    while (this.reading.size >= RUNS_IN_FLIGHT) await this.interruption.race(Promise.race(this.reading));
    const slots = await this.interruption.race(pool.slots.acquireMany(count));
    const targets = slots.map((slot, i) => pool.input(slot, geometry.lengthOf(first + i)));
    const read = readRun(source, targets, geometry.offsetOf(first)).then(() => {
      for (const target of targets) this.stats.bytesRead += target.length;
    });
    const settled = read.then(
      () => undefined,
      () => undefined,
    );
    this.reading.add(settled);
    void settled.then(() => this.reading.delete(settled));
    for (const [i, slot] of slots.entries()) {
      const length = targets[i]!.length;
      const item: InFlight = { block: first + i, slot, length, result: undefined, done: Promise.resolve() };
      item.done = read.then(async () => {
        item.result = await pool.hash(slot, length);
      });
      // A failed read or hash is surfaced by the assembler when it reaches this block.
      item.done.catch(() => undefined);
      await this.interruption.race(this.queue.push(item));
    }
  }

  /**
   * One block of a source read at a constant depth: its slot taken (waiting while all are held: memory stays
   * the slots'), then its requests sent one by one, each as soon as the window has room for it, so the
   * export always has the window's bytes to answer; the block is hashed once all its replies are in.
   */
  private async readDeep(block: number): Promise<void> {
    const { source, geometry } = this;
    const window = this.window!;
    const pool = this.context.pool;
    const requestSize = source.depth!.requestSize;
    const [slot] = await this.interruption.race(pool.slots.acquireMany(1));
    const length = geometry.lengthOf(block);
    const target = pool.input(slot!, length);
    const offset = geometry.offsetOf(block);
    const requests: Promise<void>[] = [];
    for (let at = 0; at < length; at += requestSize) {
      const bytes = Math.min(requestSize, length - at);
      // Interrupted here: the requests sent so far settle on their own (each has its timeout), unawaited.
      await this.interruption.race(window.take(bytes));
      const request = source.read(target.subarray(at, at + bytes), offset + at);
      requests.push(request);
      void request.then(
        () => window.give(bytes),
        () => window.give(bytes),
      );
    }
    const item: InFlight = { block, slot: slot!, length, result: undefined, done: Promise.resolve() };
    item.done = Promise.all(requests).then(async () => {
      this.stats.bytesRead += length;
      item.result = await pool.hash(slot!, length);
    });
    // A failed read or hash is surfaced by the assembler when it reaches this block.
    item.done.catch(() => undefined);
    await this.interruption.race(this.queue.push(item));
  }

  /** The assembler: blocks in order, a batch at a time (one index lookup for all of it). */
  private async assemble(): Promise<void> {
    let batch: InFlight[] = [];
    for (;;) {
      const item = await this.queue.shift();
      if (!item || this.failure !== undefined) break;
      this.steps += 1;
      if (item.unchanged !== undefined || item.zeros !== undefined) {
        if (batch.length > 0) await this.storeBatch(batch);
        batch = [];
        if (item.unchanged !== undefined) await this.takeUnchanged(item.block, item.unchanged);
        else await this.takeZeros(item.block, item.zeros!);
        this.report();
        continue;
      }
      // A read may never come back (an imageio or NBD server that stalls): waiting for it is interruptible.
      await this.interruption.race(item.done);
      batch.push(item);
      // Fill a batch while more blocks are in flight; when nothing more is in flight, go now.
      if (batch.length >= this.batchLimit || this.queue.isEmpty) {
        await this.storeBatch(batch);
        batch = [];
      }
    }
    if (this.failure === undefined && batch.length > 0) await this.storeBatch(batch);
  }

  /** Clean blocks: the parent's entries, unread; its whole pages by id, unread too. */
  private async takeUnchanged(first: number, count: number): Promise<void> {
    await this.interruption.tick();
    await this.map.pushSpan(count, this.parent!);
    this.bytesDone += this.geometry.bytesOf(first, count);
    this.stats.blocksUnchanged += count;
  }

  /** Blocks the source says read as zeros: whole pages of them become one ZERO_ID at the highest level. */
  private async takeZeros(first: number, count: number): Promise<void> {
    await this.interruption.tick();
    await this.map.pushZeros(count);
    this.bytesDone += this.geometry.bytesOf(first, count);
    this.stats.blocksZero += count;
  }

  /** A batch in block order: the new blocks sealed, then every block mapped (and the new ones written). */
  private async storeBatch(batch: InFlight[]): Promise<void> {
    const sealing = await this.sealNew(batch);
    for (const item of batch) {
      await this.storeBlock(item, sealing.get(item));
      this.bytesDone += item.length;
    }
    this.report();
  }

  private report(): void {
    const stats = this.stats;
    this.context.onProgress?.({ disk: this.name, bytesDone: this.bytesDone, bytesTotal: this.source.size, bytesRead: stats.bytesRead, bytesNew: stats.bytesNew, steps: this.steps });
  }

  /**
   * One index lookup for the batch's data blocks; each id neither in the repository nor claimed earlier in
   * the batch is claimed (BlobWriter: no other writer stores it meanwhile) and sealed by a worker (lz4, frame).
   */
  private async sealNew(batch: InFlight[]): Promise<Map<InFlight, Sealed>> {
    const { dataWriter, pool } = this.context;
    const candidates = batch.filter((item) => item.result && !item.result.zero);
    const ids = candidates.map((item) => idOf(item.result as { id: Uint8Array }));
    const known = await dataWriter.known(ids);
    const sealing = new Map<InFlight, Sealed>();
    const claimedHere = new Set<string>();
    candidates.forEach((item, i) => {
      const hex = ids[i]!.toString('hex');
      if (known[i] || claimedHere.has(hex)) return;
      claimedHere.add(hex);
      dataWriter.claim(ids[i]!);
      const sealed = pool.seal(item.slot, item.length, KIND_DATA, ids[i]!);
      sealed.catch(() => undefined);
      sealing.set(item, sealed);
    });
    return sealing;
  }

  /** One block into the map: zero, new (its frame written), or deduplicated; its slot freed unless a write holds it. */
  private async storeBlock(item: InFlight, sealed: Sealed | undefined): Promise<void> {
    const { pool } = this.context;
    const stats = this.stats;
    const result = item.result!;
    if (result.zero) {
      stats.blocksZero += 1;
      await this.map.push(ZERO_ID);
      pool.slots.release(item.slot);
      return;
    }
    const id = idOf(result);
    if (sealed) {
      const { frameLength, flags } = await sealed;
      if (this.failure !== undefined) throw this.failure;
      this.writeFrame(item, id, frameLength, flags);
      stats.blocksNew += 1;
      stats.bytesNew += item.length;
      stats.bytesStored += frameLength;
    } else {
      stats.blocksDeduplicated += 1;
      pool.slots.release(item.slot);
    }
    await this.map.push(id);
  }

  /** Frames are written in the background; a slot is free again once its frame is on its way to disk. */
  private writeFrame(item: InFlight, id: Buffer, frameLength: number, flags: number): void {
    const { dataWriter, pool } = this.context;
    const written = dataWriter.add(pool.output(item.slot, frameLength), { kind: KIND_DATA, flags, rawLength: item.length, id });
    const tracked = written.then(
      () => pool.slots.release(item.slot),
      (error: unknown) => this.fail(error),
    );
    this.writes.add(tracked);
    void tracked.finally(() => this.writes.delete(tracked));
  }
}
