/**
 * gc's working index on disk (SPEC.md 19.8): the live set, the entries of the segments present (gc's: only
 * those of ids that may be live, through a fixed-size filter of the marked ids; repair's: all), gc's
 * copies and the live entries of the packs it rewrites, in a LevelDB of its own in the slot's temporary
 * folder, so that gc's memory does not grow with the repository (millions of index entries, thousands of
 * segments): it holds one batch of writes (`batch` operations), one segment being read, the fetch window,
 * and per segment and per pack a few numbers.
 *
 * Keys (each a 32-byte blob id after the tag, so that every range iterates in id order):
 * - `0x01 || id` → nothing: the live set (marked blobs).
 * - `0x02 || id || u32 BE ordinal` → location (30 bytes): an entry of the segment whose place in key order
 *   is `ordinal`. For one id, its entries come in key order of their segments: the first one of an
 *   effective segment is the winner (19.3), without any read while the entries are written.
 * - `0x03 || id` → location: gc's copy of a live blob (phase 1, copy).
 * - `0x04 || pack id (16) || u48 BE offset` → id || location: the live winning entries of a pack to rewrite,
 *   by offset.
 * Nothing here outlives gc: the folder is gc's alone (the slot's LevelDB lock) and removed when it ends.
 */
import { rm } from 'node:fs/promises';
import { levelDb, type LevelDb } from '../leveldb.js';
import type { ChainedBatch } from 'classic-level';
import { levelOptions } from '../level-options.js';
import { classifyWriteError } from '../errors.js';
import { decodeLocation, encodeLocation, type BlobLocation, type IndexEntry } from '../index-entry.js';
import type { DeadEntryTest } from '../pack-presence.js';
import { ID_SIZE, INDEX_ENTRY_SIZE, PACK_ID_SIZE } from '../constants.js';
import type { Storage } from '../storage/storage.js';
import { compareKeys } from '../storage/storage.js';
import { isStorageError } from '../storage/storage-error.js';
import { entryOffset, parseSegmentKey, segmentKey, SEGMENT_MAX_OBJECT_SIZE, SEGMENT_PREFIX, viewSegment, type SegmentName } from './segment.js';
import { consumeInOrder } from './ordered-window.js';

type Db = LevelDb;
type Batch = ChainedBatch<Db, Buffer, Buffer>;

const LIVE = 0x01;
const ENTRY = 0x02;
const MOVED = 0x03;
const REWRITE = 0x04;
const NOTHING = Buffer.alloc(0);
/**
 * Writes held before they go to LevelDB in one batch. Each is copied into LevelDB's own batch (a chained
 * batch) when it is made, so memory holds its bytes once, natively, and no object per write lives until the
 * batch is written: with arrays of operations, the 2 x 16384 objects (and their key and value Buffers) that
 * wait outlive V8's young generation and grow the old one (repair at 1M entries: V8 heap 175 MiB).
 */
export const GC_INDEX_BATCH = 16384;
/**
 * Bits of the filter of live ids (4 MiB, whatever the number of blobs): `readSegments({ liveOnly })` writes
 * the entries of the ids it may hold, and passes over the others (most entries of a repository with much
 * garbage), so that gc writes to LevelDB in proportion to the live blobs, not to the index.
 */
const LIVE_FILTER_BITS = 2 ** 25;
/** Segments read at once, and the stored bytes they may hold before they are taken in (as the cache's catch-up). */
const READ_WINDOW = { width: 16, budget: 32 * 1024 * 1024 };

function tagged(tag: number, ...parts: Uint8Array[]): Buffer {
  return Buffer.concat([Buffer.from([tag]), ...parts]);
}

function range(tag: number, prefix: Uint8Array = NOTHING): { gte: Buffer; lt: Buffer } {
  const gte = tagged(tag, prefix);
  // The first key after every key that starts with gte: the prefix plus one, carried (ids and pack ids never
  // end in a run of 0xff that reaches the tag: the tag itself is at most 0x04).
  const lt = Buffer.from(gte);
  let i = lt.length - 1;
  while (lt[i] === 0xff) lt[i--] = 0;
  lt[i]! += 1;
  return { gte, lt };
}

/**
 * A Bloom filter of ids (fixed size: its memory does not grow with the blobs; more blobs only make more
 * false positives, which cost a write and nothing else): `mayHold` is true for every id added. Blob ids are
 * hashes, so four 32-bit words of the id itself serve as the four hash functions.
 */
class IdFilter {
  private readonly bits = new Uint32Array(LIVE_FILTER_BITS / 32);

  add(id: Uint8Array, at = 0): void {
    for (let k = 0; k < 4; k++) {
      const bit = readWord(id, at + 4 * k) % LIVE_FILTER_BITS;
      this.bits[Math.floor(bit / 32)]! |= 1 << bit % 32;
    }
  }

  mayHold(id: Uint8Array, at = 0): boolean {
    for (let k = 0; k < 4; k++) {
      const bit = readWord(id, at + 4 * k) % LIVE_FILTER_BITS;
      if ((this.bits[Math.floor(bit / 32)]! & (1 << bit % 32)) === 0) return false;
    }
    return true;
  }
}

function readWord(bytes: Uint8Array, at: number): number {
  return bytes[at]! * 0x1000000 + bytes[at + 1]! * 0x10000 + bytes[at + 2]! * 0x100 + bytes[at + 3]!;
}

function locationOf(value: Buffer, what: string): BlobLocation {
  const location = decodeLocation(value);
  if (!location) throw new Error(`gc's working index holds a bad ${what} (${value.length} bytes)`);
  return location;
}

export interface GcIndexOptions {
  /** Writes held in memory before a batch (default GC_INDEX_BATCH; tests set a small one). */
  batch?: number | undefined;
}

/** A live blob with where the effective segments put it, and gc's copy of it, if any. */
export interface LiveBlob {
  id: Buffer;
  winner: BlobLocation | undefined;
  moved: BlobLocation | undefined;
}

export class GcIndex {
  /** The batch being filled, and how many writes it holds. */
  private pending: Batch | undefined;
  private pendingCount = 0;
  /** Operations handed to LevelDB and not yet written. */
  private queued = 0;
  private writing: Promise<void> = Promise.resolve();
  private failure: unknown;
  /** The most write operations held in memory at once (the bound the tests check). */
  peakHeld = 0;
  /** The segments of the last read, in key order (their ordinals), and which of them are superseded. */
  private segments: { name: SegmentName; entries: number }[] = [];
  private superseded = new Set<number>();
  /** Every id addLive was given (a filter: it may say yes to others). */
  private readonly liveFilter = new IdFilter();
  /** Whether the last read took the entries of (possibly) live ids only, and a blob was marked live since. */
  private readLiveOnly = false;
  private liveSinceRead = false;
  /** Every pack an entry of a segment of the last read names (superseded segments included). */
  readonly namedPacks = new Set<string>();
  /** Copies added (moved). */
  movedCount = 0;
  /** Entries of segments the last read wrote to LevelDB (all of them, or with `liveOnly` those of live ids). */
  entriesWritten = 0;
  /**
   * Entries proven dead (their pack gone from the store, or shorter than the frame: SPEC.md 19.3, 19.8):
   * never a blob's winner while the effective segments name it anywhere else.
   */
  deadEntry: DeadEntryTest | undefined;

  private constructor(
    private readonly db: Db,
    readonly path: string,
    private readonly batch: number,
  ) {}

  /** A new, empty index in `path` (whatever was there is removed first: a dead gc's). */
  static async create(path: string, options: GcIndexOptions = {}): Promise<GcIndex> {
    await rm(path, { recursive: true, force: true });
    const db: Db = await levelDb(path, levelOptions('gc-index', { createIfMissing: true, errorIfExists: true }));
    try {
      await db.open();
    } catch (error) {
      throw classifyWriteError((error as { cause?: unknown }).cause ?? error, path);
    }
    return new GcIndex(db, path, Math.max(1, options.batch ?? GC_INDEX_BATCH));
  }

  async close(): Promise<void> {
    await this.writing.catch(() => undefined);
    const unwritten = this.pending;
    this.pending = undefined;
    this.pendingCount = 0;
    await unwritten?.close().catch(() => undefined);
    await this.db.close().catch(() => undefined);
    await rm(this.path, { recursive: true, force: true }).catch(() => undefined);
  }

  /** Marks a blob live (mark's sink: synchronous; `settle` bounds what waits in memory). */
  addLive(id: Buffer): void {
    this.put(tagged(LIVE, id), NOTHING);
    this.liveFilter.add(id);
    // Its entries were passed over by a read that took only the live ids: read again before `live()`.
    if (this.readLiveOnly) this.liveSinceRead = true;
  }

  /** gc's copy of a live blob, durable in a new pack. */
  addMoved(id: Buffer, location: BlobLocation): void {
    this.put(tagged(MOVED, id), encodeLocation(location));
    this.movedCount += 1;
  }

  /** A live winning entry of a pack gc rewrites. */
  addRewrite(entry: IndexEntry): void {
    const where = Buffer.alloc(PACK_ID_SIZE + 6);
    Buffer.from(entry.packId, 'hex').copy(where, 0, 0, PACK_ID_SIZE);
    where.writeUIntBE(entry.offset, PACK_ID_SIZE, 6);
    this.put(tagged(REWRITE, where), Buffer.concat([entry.id, encodeLocation(entry)]));
  }

  /** Copies the write into the batch being filled at once: `key` and `value` may be reused when it returns. */
  private put(key: Uint8Array, value: Uint8Array): void {
    if (this.failure !== undefined) throw this.failure;
    this.pending ??= this.db.batch();
    this.pending.put(key as Buffer, value as Buffer);
    this.pendingCount += 1;
    this.peakHeld = Math.max(this.peakHeld, this.pendingCount + this.queued);
    if (this.pendingCount >= this.batch) this.handOver();
  }

  private handOver(): void {
    const batch = this.pending;
    const count = this.pendingCount;
    if (batch === undefined) return;
    this.pending = undefined;
    this.pendingCount = 0;
    this.queued += count;
    this.writing = this.writing.then(async () => {
      try {
        if (this.failure === undefined) await batch.write({ sync: false });
        else await batch.close();
      } catch (error) {
        this.failure ??= classifyWriteError((error as { cause?: unknown }).cause ?? error, this.path);
      } finally {
        this.queued -= count;
      }
    });
  }

  /** Waits while batches handed over are being written (what waits in memory stays under two batches). */
  async settle(): Promise<void> {
    if (this.queued > 0) await this.writing;
    if (this.failure !== undefined) throw this.failure;
  }

  /** Writes everything added so far. */
  async drain(): Promise<void> {
    this.handOver();
    await this.writing;
    if (this.failure !== undefined) throw this.failure;
  }

  /**
   * Reads every segment in the store (the entries of an earlier read are forgotten first), in key order
   * through a bounded window, one segment in memory at a time once taken. A segment deleted since the
   * listing is skipped (superseded); one that cannot be read is returned by key with why. With `liveOnly`,
   * only the entries of ids marked live so far (addLive) are kept, and false positives of the filter: what
   * `live()` and `winners()` need for the live blobs; `namedPacks` and `effectiveEntries` still count every
   * entry. gc marks before it reads, and reads again after it marks more.
   */
  async readSegments(storage: Storage, options: { dataKey?: Uint8Array | undefined; signal?: AbortSignal | undefined; tick?: (() => Promise<void>) | undefined; liveOnly?: boolean | undefined } = {}): Promise<{ damaged: { key: string; why: string }[] }> {
    await this.drain();
    const liveOnly = options.liveOnly === true;
    this.readLiveOnly = liveOnly;
    this.liveSinceRead = false;
    this.entriesWritten = 0;
    await this.db.clear(range(ENTRY));
    this.segments = [];
    this.superseded.clear();
    this.namedPacks.clear();
    const listed: { key: string; size: number }[] = [];
    for await (const info of storage.list(SEGMENT_PREFIX, { signal: options.signal })) if (parseSegmentKey(info.key)) listed.push({ key: info.key, size: info.size });
    listed.sort((a, b) => compareKeys(a.key, b.key));
    const damaged: { key: string; why: string }[] = [];
    const supersededKeys = new Set<string>();
    const presentKeys = new Set<string>();
    const fetch = async ({ key }: { key: string }): Promise<Buffer | 'gone' | 'too-large'> => {
      try {
        return await storage.get(key, { maxSize: SEGMENT_MAX_OBJECT_SIZE, signal: options.signal });
      } catch (error) {
        if (isStorageError(error, 'not-found')) return 'gone';
        if (isStorageError(error, 'too-large')) return 'too-large';
        throw error;
      }
    };
    await consumeInOrder(listed, READ_WINDOW, (item) => item.size, fetch, async ({ key }, bytes) => {
      if (bytes === 'gone') return;
      if (bytes === 'too-large') {
        damaged.push({ key, why: 'larger than any segment' });
        return;
      }
      // Checked whole, its entries taken from its bytes one at a time (no object per entry).
      const segment = viewSegment(bytes, key, { dataKey: options.dataKey });
      if (typeof segment === 'string') {
        damaged.push({ key, why: segment });
        return;
      }
      const ordinal = this.segments.length;
      this.segments.push({ name: segment.name, entries: segment.count });
      const entryKey = Buffer.alloc(1 + ID_SIZE + 4);
      entryKey[0] = ENTRY;
      entryKey.writeUInt32BE(ordinal, 1 + ID_SIZE);
      presentKeys.add(key);
      for (const old of segment.supersedes) supersededKeys.add(segmentKey(old));
      const stored = segment.bytes;
      let lastPack = -1;
      for (let i = 0; i < segment.count; i++) {
        const at = entryOffset(segment, i);
        // Entries come by id, but most of a segment's share a few packs: a pack's name is made once per run.
        if (lastPack < 0 || stored.compare(stored, at + ID_SIZE, at + ID_SIZE + PACK_ID_SIZE, lastPack, lastPack + PACK_ID_SIZE) !== 0) {
          this.namedPacks.add(stored.toString('hex', at + ID_SIZE, at + ID_SIZE + PACK_ID_SIZE));
          lastPack = at + ID_SIZE;
        }
        if (liveOnly && !this.liveFilter.mayHold(stored, at)) continue;
        // One key buffer for every entry, and the location where it lies in the segment: put copies both.
        stored.copy(entryKey, 1, at, at + ID_SIZE);
        this.put(entryKey, stored.subarray(at + ID_SIZE, at + ID_SIZE + INDEX_ENTRY_SIZE));
        this.entriesWritten += 1;
        if (this.pendingCount === 0) await this.settle();
      }
      await options.tick?.();
    });
    await this.drain();
    this.segments.forEach((segment, ordinal) => {
      if (supersededKeys.has(segmentKey(segment.name))) this.superseded.add(ordinal);
    });
    return { damaged };
  }

  /** The names of the segments of the last read, in key order (superseded ones too: the switch names them). */
  segmentNames(): SegmentName[] {
    return this.segments.map((segment) => segment.name);
  }

  /** Entries of the effective segments of the last read (duplicates counted). */
  get effectiveEntries(): number {
    return this.segments.reduce((total, segment, ordinal) => total + (this.superseded.has(ordinal) ? 0 : segment.entries), 0);
  }

  /**
   * The winning entry of every blob the effective segments name, in id order (19.3: first segment by key),
   * passing over entries proven dead (`deadEntry`) to the blob's first live entry: a lost pack's entry must
   * not shadow a live duplicate, which gc would otherwise count as dead bytes and delete (19.8). A blob whose
   * every entry is dead keeps its first: it is lost, and the index goes on saying where it was.
   */
  async *winners(): AsyncGenerator<IndexEntry> {
    if (this.liveSinceRead) throw new Error("gc's working index: blobs were marked live after a read of the live ids' entries only; read the segments again");
    let current: Buffer | undefined;
    let chosen: IndexEntry | undefined;
    let firstDead: IndexEntry | undefined;
    for await (const [key, value] of this.db.iterator(range(ENTRY))) {
      if (this.superseded.has(key.readUInt32BE(1 + ID_SIZE))) continue;
      const id = key.subarray(1, 1 + ID_SIZE);
      if (!current?.equals(id)) {
        if (current) yield (chosen ?? firstDead)!;
        current = Buffer.from(id);
        chosen = undefined;
        firstDead = undefined;
      }
      if (chosen) continue;
      const entry: IndexEntry = { id: current, ...locationOf(value, 'entry') };
      if (this.deadEntry?.(entry)) firstDead ??= entry;
      else chosen = entry;
    }
    if (current) yield (chosen ?? firstDead)!;
  }

  /** Every live blob in id order, joined with its winning entry and its copy (merge of sorted ranges). */
  async *live(): AsyncGenerator<LiveBlob> {
    await this.drain();
    const winners = new Cursor(this.winners());
    const moved = new Cursor(this.ranged(MOVED));
    for await (const key of this.db.keys(range(LIVE))) {
      const id = Buffer.from(key.subarray(1));
      yield { id, winner: await winners.seek(id), moved: await moved.seek(id) };
    }
  }

  /** The live winning entries of a pack to rewrite (addRewrite), by offset. */
  async *rewriteEntries(packId: string): AsyncGenerator<IndexEntry> {
    await this.drain();
    for await (const [, value] of this.db.iterator(range(REWRITE, Buffer.from(packId, 'hex').subarray(0, PACK_ID_SIZE)))) {
      yield { id: Buffer.from(value.subarray(0, ID_SIZE)), ...locationOf(value.subarray(ID_SIZE), 'entry to rewrite') };
    }
  }

  private async *ranged(tag: number): AsyncGenerator<IndexEntry> {
    for await (const [key, value] of this.db.iterator(range(tag))) {
      if (value.length !== INDEX_ENTRY_SIZE) throw new Error(`gc's working index holds a bad value under ${key.toString('hex')}`);
      yield { id: Buffer.from(key.subarray(1)), ...locationOf(value, 'copy') };
    }
  }
}

/** A position in an id-ordered stream, moved forward only: the merge join of `live()`. */
class Cursor {
  private head: IndexEntry | undefined;
  private done = false;

  constructor(private readonly source: AsyncIterator<IndexEntry>) {}

  /** The item with this id, if the stream has one; every item before it is passed over. */
  async seek(id: Buffer): Promise<BlobLocation | undefined> {
    while (!this.done) {
      if (!this.head) {
        const next = await this.source.next();
        if (next.done) {
          this.done = true;
          return undefined;
        }
        this.head = next.value;
      }
      const order = Buffer.compare(this.head.id, id);
      if (order > 0) return undefined;
      const head = this.head;
      this.head = undefined;
      if (order === 0) {
        const { id: _, ...location } = head;
        return location;
      }
    }
    return undefined;
  }
}
