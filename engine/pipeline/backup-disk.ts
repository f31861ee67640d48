/**
 * Backs up one disk: the block pipeline.
 *
 *   reader ──slot──▶ workers: zero check + SHA-256 ──▶ in-order assembler ──▶ one index lookup per batch
 *        ▲                                                      │ new blocks: workers seal (lz4, xxh64)
 *        └────────────── slot released ◀── pack writer ◀────────┘ map builder (entries in block order)
 *
 * The reader runs ahead of the assembler by at most slotCount blocks (the SlotPool is the bound), the
 * assembler looks up a batch of ids at a time (never one LevelDB get per block), and only blocks whose
 * id is not yet in the repository are compressed and written.
 *
 * Incremental: given the parent's map and the dirty extents, only blocks that a dirty byte touches are
 * read; every run of clean blocks takes its entries from the parent's map, so the new map is complete.
 */
import { KIND_DATA, ZERO_ID } from '../../repo-format/constants.js';
import { MapBuilder } from '../../repo-format/block-map.js';
import type { BlobWriter } from '../../repo-format/blob-writer.js';
import type { DiskRecord, DiskStats } from '../../repo-format/backup-record.js';
import type { Repository } from '../../repo-format/repository.js';
import type { BlockSource } from '../sources/source.js';
import type { BlockPool } from './block-pool.js';
import type { HashResult } from './tasks.js';
import { Interruption } from '../host/interrupt.js';
import { ZeroExtentCursor } from './zero-extents.js';
import { DirtyCursor, ParentMapCursor, type Range } from './map-cursors.js';
import type { MapRoot } from '../../repo-format/block-map.js';

export interface DiskProgress {
  disk: string;
  bytesDone: number;
  bytesTotal: number;
  bytesRead: number;
  bytesNew: number;
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
}

/** A FIFO the reader fills and the assembler drains; `shift` waits for the next block or the end. */
class BlockQueue {
  private readonly items: InFlight[] = [];
  private waiter: (() => void) | undefined;
  private ended = false;

  push(item: InFlight): void {
    this.items.push(item);
    this.wake();
  }

  end(): void {
    this.ended = true;
    this.wake();
  }

  get isEmpty(): boolean {
    return this.items.length === 0;
  }

  async shift(): Promise<InFlight | undefined> {
    while (this.items.length === 0 && !this.ended) await new Promise<void>((resolve) => (this.waiter = resolve));
    return this.items.shift();
  }

  private wake(): void {
    const waiter = this.waiter;
    this.waiter = undefined;
    waiter?.();
  }
}

/** The block's id as a Buffer view over the worker's answer (no copy). */
function idOf(result: { id: Uint8Array }): Buffer {
  return Buffer.from(result.id.buffer, result.id.byteOffset, result.id.byteLength);
}

export async function backupDisk(source: BlockSource, name: string, context: BackupDiskContext, plan?: IncrementalPlan): Promise<DiskRecord> {
  const { repo, pool, dataWriter } = context;
  // Checked per block: the holes of a thin NBD export, or a long clean run, are walked without any I/O.
  const interruption = new Interruption(context.signal, 'backup');
  const blockSize = repo.blockSize;
  const blockCount = Math.ceil(source.size / blockSize);
  const started = Date.now();
  const stats: DiskStats = {
    bytesRead: 0,
    bytesNew: 0,
    bytesStored: 0,
    blocksTotal: blockCount,
    blocksZero: 0,
    blocksNew: 0,
    blocksDeduplicated: 0,
    blocksUnchanged: 0,
    durationMs: 0,
  };
  if (plan && plan.parent.blocks !== blockCount) throw new Error(`parent map has ${plan.parent.blocks} blocks, the disk ${blockCount}`);
  const parent = plan ? new ParentMapCursor(plan.parent, repo.loadPage) : undefined;
  const dirty = plan ? new DirtyCursor(plan.dirty) : undefined;
  const map = new MapBuilder(blockCount, repo.pageStore(context.metaWriter));
  const queue = new BlockQueue();
  const batchLimit = Math.max(1, Math.floor(pool.slots.count / 2));
  let failure: unknown;
  let bytesDone = 0;

  const writes = new Set<Promise<void>>();
  const zeroExtents = source.extents ? new ZeroExtentCursor(source.extents()) : undefined;

  const fail = (error: unknown): void => {
    failure ??= error;
    pool.slots.fail(error);
    queue.end();
  };

  // Reads are issued as soon as a slot is free, several at once; the queue keeps block order.
  const read = async (): Promise<void> => {
    for (let block = 0; block < blockCount && failure === undefined; block += 1) {
      await interruption.tick();
      if (dirty) {
        const nextDirty = await interruption.race(dirty.nextDirtyBlock(block, blockSize, blockCount));
        if (nextDirty > block) {
          queue.push({ block, slot: -1, length: 0, result: undefined, done: Promise.resolve(), unchanged: nextDirty - block });
          block = nextDirty - 1;
          continue;
        }
      }
      const slot = await pool.slots.acquire();
      const offset = block * blockSize;
      const length = Math.min(blockSize, source.size - offset);
      const item: InFlight = { block, slot, length, result: undefined, done: Promise.resolve() };
      // The extent at hand answers most blocks; asking the source for more extents may take long (the
      // holes of a thin disk come merged over many requests), so that wait is interruptible.
      if (zeroExtents && (zeroExtents.known(offset, length) ?? (await interruption.race(zeroExtents.isZero(offset, length))))) {
        // The source says this block reads as zeros (a hole, a zero cluster): record it without reading.
        item.result = { zero: true };
      } else {
        item.done = (async () => {
          await source.read(pool.input(slot, length), offset);
          stats.bytesRead += length;
          item.result = await pool.hash(slot, length);
        })();
      }
      // A failed read or hash is surfaced by the assembler when it reaches this block.
      item.done.catch(() => undefined);
      queue.push(item);
    }
    queue.end();
  };

  /** Frames are written in the background; a slot is free again once its frame is on its way to disk. */
  const writeFrame = (item: InFlight, id: Buffer, frameLength: number, flags: number): void => {
    const written = dataWriter.add(pool.output(item.slot, frameLength), { kind: KIND_DATA, flags, rawLength: item.length, id });
    const tracked = written.then(
      () => pool.slots.release(item.slot),
      (error: unknown) => fail(error),
    );
    writes.add(tracked);
    void tracked.finally(() => writes.delete(tracked));
  };

  const storeBatch = async (batch: InFlight[]): Promise<void> => {
    const candidates = batch.filter((item) => item.result && !item.result.zero);
    const ids = candidates.map((item) => idOf(item.result as { id: Uint8Array }));
    const known = await dataWriter.known(ids);
    const sealing = new Map<InFlight, Promise<{ frameLength: number; flags: number }>>();
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
    for (const item of batch) {
      const result = item.result!;
      if (result.zero) {
        stats.blocksZero += 1;
        await map.push(ZERO_ID);
        pool.slots.release(item.slot);
      } else {
        const id = idOf(result);
        const sealed = sealing.get(item);
        if (sealed) {
          const { frameLength, flags } = await sealed;
          if (failure !== undefined) throw failure;
          writeFrame(item, id, frameLength, flags);
          stats.blocksNew += 1;
          stats.bytesNew += item.length;
          stats.bytesStored += frameLength;
        } else {
          stats.blocksDeduplicated += 1;
          pool.slots.release(item.slot);
        }
        await map.push(id);
      }
      bytesDone += item.length;
    }
    context.onProgress?.({ disk: name, bytesDone, bytesTotal: source.size, bytesRead: stats.bytesRead, bytesNew: stats.bytesNew });
  };

  /** Clean blocks: the parent's entries, unread. */
  const takeUnchanged = async (item: InFlight): Promise<void> => {
    for (let block = item.block; block < item.block + item.unchanged!; block += 1) {
      await interruption.tick();
      await map.push(await parent!.entry(block));
      bytesDone += Math.min(blockSize, source.size - block * blockSize);
    }
    stats.blocksUnchanged += item.unchanged!;
  };

  const assemble = async (): Promise<void> => {
    let batch: InFlight[] = [];
    for (;;) {
      const item = await queue.shift();
      if (!item || failure !== undefined) break;
      if (item.unchanged !== undefined) {
        if (batch.length > 0) await storeBatch(batch);
        batch = [];
        await takeUnchanged(item);
        continue;
      }
      await item.done;
      batch.push(item);
      // Fill a batch (one index lookup for all of it) while more blocks are in flight; half the slots at
      // most, so the reader always has the other half. When nothing more is in flight, go now.
      if (batch.length >= batchLimit || queue.isEmpty) {
        await storeBatch(batch);
        batch = [];
      }
    }
    if (failure === undefined && batch.length > 0) await storeBatch(batch);
  };

  const reader = read().catch(fail);
  const assembler = assemble().catch(fail);
  await Promise.all([reader, assembler]);
  await Promise.all(writes);
  if (failure !== undefined) throw failure;
  const root = await map.finish();
  stats.durationMs = Date.now() - started;
  return {
    name,
    size: source.size,
    source: { ...source.description },
    mode: 'full',
    modeReason: null,
    parent: null,
    cbt: null,
    map: { root: root.root.toString('hex'), depth: root.depth, blocks: root.blocks },
    stats,
  };
}
