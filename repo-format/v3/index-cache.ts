/**
 * The per-host index cache (SPEC.md 19.4): a LevelDB copy of the store's segments, so that deduplication asks
 * a local database and not the store. It is only a cache: the segments are the truth, and whatever happens to
 * the cache (lost, damaged, behind) is mended from them.
 *
 * - Where: `<cache root>/<repository id>/slot-<n>/`. LevelDB admits one process per database, and several
 *   processes of one host back up into one repository at once, so each takes a *slot*: the first one whose
 *   database it can open. LevelDB's own LOCK file (an fcntl lock, released by the kernel when the process
 *   ends, however it ends) is the slot's lock: no pid files, nothing stale after a kill -9.
 * - Catch-up: the cache records every segment it ingested; when opened it lists `index/`, fetches the
 *   segments it has not seen and ingests them, each in one batch with its record, or a large one in parts
 *   of at most CACHE_BATCH entries, the first of which records it *partial* under its ordinal and the last
 *   *ingested*. LevelDB applies a batch whole or not at all and replays its log in order, so a crash or
 *   power loss forgets whole segments from the end, or leaves one partial, which the next catch-up meets
 *   and ingests again as if new, under the same ordinal: the batches need no fsync (what is forgotten is
 *   fetched again). Entries are written straight from the segment's bytes (SegmentView): memory holds the
 *   fetch window and one part's keys and values, never an object per entry.
 * - Rebuild: when a segment it ingested is gone, or a new segment supersedes one it ingested (gc
 *   consolidated), its entries may name packs that gc deletes: it starts again from the effective segments.
 *   A database that LevelDB cannot open as healthy (damaged files), or of another format or repository, is
 *   removed and rebuilt. A rebuild marks the database first (`rebuilding`, synchronously) and clears the mark
 *   only when it has ingested everything: a rebuild cut short is started again at the next open, never
 *   taken for a cache that is merely behind.
 *
 * Keys: 0x00 name → metadata; 0x01 blob id → location (30 bytes, index-entry.ts) || u32 segment ordinal;
 * 0x03 segment key → u32 ordinal || u8 state (1 ingested, 2 superseded when met, so never fetched again,
 * 3 partial: some of its entries are written, under this ordinal).
 * Ordinals map to segment keys in memory: the resolution rule (first segment by key wins) compares keys.
 */
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { levelDb, type LevelDb } from '../leveldb.js';
import type { ChainedBatch } from 'classic-level';
import { CorruptMetadataError, classifyWriteError, EngineError, NoSpaceError } from '../errors.js';
import { ensurePrivateDirectory, makeTreePrivate } from '../file-modes.js';
import { decodeLocation, encodeLocation, type BlobLocation, type IndexEntry } from '../index-entry.js';
import { ID_SIZE, INDEX_ENTRY_SIZE } from '../constants.js';
import { crashPoint } from '../crash-points.js';
import { levelOptions } from '../level-options.js';
import type { Storage } from '../storage/storage.js';
import {
  decodeSegmentHeader,
  entryOffset,
  decodeSupersededNames,
  parseSegmentKey,
  segmentKey,
  SEGMENT_HEADER_SIZE,
  SEGMENT_MAX_OBJECT_SIZE,
  SEGMENT_NAME_SIZE,
  SEGMENT_PREFIX,
  viewSegment,
  type Segment,
  type SegmentName,
  type SegmentView,
} from './segment.js';
import { isStorageError } from '../storage/storage-error.js';
import { segmentWins } from './segment-set.js';
import { consumeInOrder } from './ordered-window.js';
import { collectGarbage } from './collect-garbage.js';

type Db = LevelDb;

const META = 0x00;
const BLOB = 0x01;
const SEGMENT = 0x03;
const FORMAT = 'v3-index-cache 1';
const INGESTED = 1;
const SUPERSEDED = 2;
const PARTIAL = 3;
/** Slots per repository and host: more processes than this at once wait for one (SPEC.md 19.4). */
export const MAX_SLOTS = 64;
/**
 * Segments fetched at once by a catch-up, and the stored bytes they may hold before they are ingested: a
 * store's latency (tens of ms per GET on S3) is paid once per window and not once per segment, and memory
 * stays bounded whatever the segment count. Calls still pass the storage's own concurrency limit.
 */
const CATCH_UP_WINDOW = { width: 16, budget: 32 * 1024 * 1024 };
/**
 * Segments the catch-up's first pass reads whole and keeps for the second (no second GET): those of at most
 * `segment` bytes, while they sum to at most `total` (by the listing's sizes). Others are read twice: their
 * header and names, then whole.
 */
const CATCH_UP_KEPT = { segment: 256 * 1024, total: 16 * 1024 * 1024 };
/**
 * Entries per LevelDB batch while ingesting one segment (one batch per segment when it is smaller): what
 * a part holds in memory (its keys and values, about 70 bytes an entry, and LevelDB's copy of them in its
 * write batch and memtable) is bounded by it, whatever the size of the segment.
 */
export const CACHE_BATCH = 16384;
/**
 * Segments listed by a catch-up from which it ends with a full collection of V8's heap that hands the freed
 * pages back (collectGarbage, V8's last-resort flavour): its per-segment state and the answers of its GETs are
 * garbage by then, in V8's old generation and in a young generation grown to its largest, where they would
 * stay resident under the backup's or restore's own peak. Measured (bench/v3-s3.ts, S3, fresh host cache, a
 * 256 MiB image, 6 interleaved runs, load 19-39; figures in collect-garbage.ts): the peak RSS of a backup over
 * 20,000 segments is that over 100 within the noise (growth -4..+7 MiB, was +19..+30 with a plain major
 * collection); a restore's growth -4..+15 MiB, mean +5 (was +12..+25): what remains is native memory, the
 * main malloc arena's ([heap] in smaps) 6-7 MiB resident over 100 segments and 11-18 over 20,000 when the data
 * phase starts, most of it in use (malloc_trim(0) there gives back 2 MiB).
 * One listing page: a smaller catch-up leaves too little to matter and pays nothing; the collection costs
 * ~50-70 ms of CPU after a 20,000-segment catch-up (~7 CPU-s and ~20 s on S3).
 */
const CATCH_UP_COLLECT_AT = 1000;
const BLOB_KEY_SIZE = 1 + ID_SIZE;
const BLOB_VALUE_SIZE = INDEX_ENTRY_SIZE + 4;
type Put = { type: 'put' | 'del'; key: Buffer; value?: Buffer };

function metaKey(name: string): Buffer {
  return Buffer.concat([Buffer.from([META]), Buffer.from(name, 'utf8')]);
}

function blobKey(id: Uint8Array): Buffer {
  return Buffer.concat([Buffer.from([BLOB]), id]);
}

function segmentRecordKey(key: string): Buffer {
  return Buffer.concat([Buffer.from([SEGMENT]), Buffer.from(key, 'utf8')]);
}

function isLocked(error: unknown): boolean {
  const cause = (error as { cause?: { code?: string } }).cause;
  return cause?.code === 'LEVEL_LOCKED';
}

export interface IndexCacheOptions {
  /** The host's cache directory (default: $ENGINE_CACHE_DIR, ~/.cache/engine, /var/cache/engine as root). */
  cacheRoot: string;
  /** The repository's id (its config): caches of different repositories never mix. */
  repositoryId: string;
  storage: Storage;
  /** Encrypted repositories: segments are sealed. */
  dataKey?: Uint8Array | undefined;
  signal?: AbortSignal | undefined;
  /** Told why the cache was rebuilt (for a notice and for tests). */
  onRebuild?: ((why: string) => void) | undefined;
  /** Entries per LevelDB batch (default CACHE_BATCH, or ENGINE_TEST_CACHE_BATCH; tests set a small one). */
  batch?: number | undefined;
  /**
   * Open the slot without catching up (the caller calls catchUp before any lookup): repair, which replaces
   * every segment and catches up after, so that a catch-up at open would be undone at once.
   */
  catchUpLater?: boolean | undefined;
}

/** For the tests only, like ENGINE_CRASH_AT: ENGINE_TEST_CACHE_BATCH=n ingests segments in parts of n entries. */
function testBatch(): number | undefined {
  const n = Number(process.env.ENGINE_TEST_CACHE_BATCH);
  return Number.isSafeInteger(n) && n > 0 ? n : undefined;
}

export interface CatchUpResult {
  /** Segments fetched and ingested by this catch-up. */
  ingested: number;
  /** Entries they held. */
  entries: number;
  /** Why the cache started again from the store's segments, if it did. */
  rebuilt: string | undefined;
  /** Segments that could not be read (not ingested: their blobs count as absent until they can be). */
  damaged: { key: string; why: string }[];
}

export class IndexCache {
  /** Ordinal → segment key, for every segment ingested. */
  private readonly ordinals: string[] = [];
  private readonly known = new Map<string, { ordinal: number; state: number }>();
  private readonly batch: number;
  /** The most operations handed to LevelDB in one batch (the bound the tests check). */
  peakBatch = 0;
  /**
   * A part's keys and values, and a view of each key, made once and used by every part that finds them
   * free (LevelDB copies what it is given: keys when a read is asked, puts when they are added), so that a
   * catch-up does not leave two Buffers of a MiB and 16384 views behind per part for V8 to collect, which
   * it does only once their bytes pass its external-memory threshold (external Buffers 29 -> 113 MiB from
   * 250k to 4M entries). An ingest that runs while another holds them (a writer's own segment during a
   * catch-up) makes its own.
   */
  private scratch: PartScratch | undefined;
  /** Why the cache was emptied at open when its catch-up was left for later: the next catch-up reports it (and ends the rebuild). */
  private resetAtOpen: string | undefined;

  private constructor(
    private db: Db,
    readonly path: string,
    readonly slot: number,
    private readonly options: IndexCacheOptions,
  ) {
    this.batch = Math.max(1, options.batch ?? testBatch() ?? CACHE_BATCH);
  }

  /** Whether the segment under `key` is done with: ingested whole, or recorded superseded (not partial). */
  private settled(key: string): boolean {
    const state = this.known.get(key)?.state;
    return state === INGESTED || state === SUPERSEDED;
  }

  /** Opens a free slot of this host's cache of the repository and catches it up with the store. */
  static async open(options: IndexCacheOptions): Promise<{ cache: IndexCache; catchUp: CatchUpResult }> {
    const dir = join(options.cacheRoot, options.repositoryId);
    await ensurePrivateDirectory(dir);
    for (let slot = 0; slot < MAX_SLOTS; slot++) {
      const path = join(dir, `slot-${slot}`);
      const opened = await openSlot(path, options);
      if (opened === 'locked') continue;
      const cache = new IndexCache(opened.db, path, slot, options);
      try {
        if (opened.reset) await cache.reset(opened.reset);
        await cache.loadSegments();
        if (options.catchUpLater) {
          cache.resetAtOpen = opened.reset;
          return { cache, catchUp: { ingested: 0, entries: 0, rebuilt: undefined, damaged: [] } };
        }
        const catchUp = await cache.catchUp(opened.reset);
        return { cache, catchUp };
      } catch (error) {
        await cache.close().catch(() => undefined);
        throw error;
      }
    }
    throw new EngineError('ENGINE_REPOSITORY_LOCKED', `all ${MAX_SLOTS} slots of the index cache in ${dir} are in use by other processes of this host; run fewer at once`, { path: dir, slots: MAX_SLOTS });
  }

  private async loadSegments(): Promise<void> {
    this.ordinals.length = 0;
    this.known.clear();
    for await (const [key, value] of this.db.iterator({ gte: Buffer.from([SEGMENT]), lt: Buffer.from([SEGMENT + 1]) })) {
      if (value.length !== 5) throw new CorruptMetadataError('the index cache', 'a segment record has a bad length');
      const name = key.subarray(1).toString('utf8');
      const ordinal = value.readUInt32LE(0);
      this.known.set(name, { ordinal, state: value[4]! });
      this.ordinals[ordinal] = name;
    }
  }

  /**
   * Brings the cache up to the store's segments (SPEC.md 19.4): incremental, or a rebuild when it must.
   * A first pass reads what each new segment supersedes (its header and names only, in a plain repository),
   * the second fetches and ingests; each keeps a bounded window of fetches in flight and takes the answers
   * in key order. Memory holds that window and the superseded names of the new ones.
   */
  async catchUp(alreadyRebuilt?: string): Promise<CatchUpResult> {
    // After the catch-up's own frame is gone: its locals are what the collection is for.
    const { result, listed } = await this.catchUpListed(alreadyRebuilt);
    if (listed >= CATCH_UP_COLLECT_AT) collectGarbage();
    return result;
  }

  /** catchUp, and how many segments the store listed. */
  private async catchUpListed(alreadyRebuilt: string | undefined): Promise<{ result: CatchUpResult; listed: number }> {
    const { storage, signal } = this.options;
    const present: string[] = [];
    const sizes = new Map<string, number>();
    for await (const info of storage.list(SEGMENT_PREFIX, { signal })) {
      if (!parseSegmentKey(info.key)) continue;
      present.push(info.key);
      sizes.set(info.key, info.size);
    }
    const presentSet = new Set(present);
    let rebuilt: string | undefined = alreadyRebuilt ?? this.resetAtOpen;
    // A partial segment's entries are in the cache as much as an ingested one's.
    const gone = [...this.known.entries()].find(([key, { state }]) => state !== SUPERSEDED && !presentSet.has(key));
    if (gone) rebuilt = await this.reset(`segment ${gone[0]} it ingested is gone from the store`);
    const damaged: { key: string; why: string }[] = [];
    const met = new Set<string>();
    const supersededNow = new Set<string>();
    // Both passes fetch through a bounded window (CATCH_UP_WINDOW) and take the answers in key order, so the
    // result is the one of fetching one segment at a time: same damaged list, same ordinals, same winners.
    // What the first pass read whole, kept (up to CATCH_UP_KEPT bytes, by the listing's sizes) so that the
    // second ingests it without a second GET: small segments cost one request each, not two.
    const kept = new Map<string, Buffer>();
    let keptBytes = 0;
    const meet = async (keys: string[]): Promise<void> => {
      // Whether to read a segment whole is decided in key order before its fetch starts: the window asks
      // `weigh` in order, once per key, right before `fetch`.
      const whole = new Set<string>();
      const weigh = (key: string): number => {
        const size = sizes.get(key) ?? 0;
        if (size <= CATCH_UP_KEPT.segment && keptBytes + size <= CATCH_UP_KEPT.total) {
          keptBytes += size;
          whole.add(key);
        }
        // A plain segment's header and names are small; one read whole is weighed by its size.
        return whole.has(key) || this.options.dataKey ? size : SEGMENT_HEADER_SIZE;
      };
      const read = (key: string) => this.supersedesOf(key, whole.has(key));
      await consumeInOrder(keys, CATCH_UP_WINDOW, weigh, read, async (key, { supersedes, bytes }) => {
        if (bytes) kept.set(key, bytes);
        else if (whole.has(key)) keptBytes -= sizes.get(key) ?? 0;
        if (typeof supersedes === 'string') {
          damaged.push({ key, why: supersedes });
          return;
        }
        met.add(key);
        for (const old of supersedes) if (presentSet.has(segmentKey(old))) supersededNow.add(segmentKey(old));
      });
    };
    await meet(present.filter((key) => !this.settled(key)));
    const hit = [...supersededNow].find((key) => this.known.has(key) && this.known.get(key)!.state !== SUPERSEDED);
    if (hit) {
      rebuilt = await this.reset(`segment ${hit} it ingested was superseded`);
      await meet(present.filter((key) => !met.has(key) && !damaged.some((d) => d.key === key)));
    }
    let ingested = 0;
    let entries = 0;
    const toIngest = present.filter((key) => !this.settled(key) && met.has(key));
    // Superseded segments are recorded in their turn (their ordinal is their place in key order), never fetched.
    const weigh = (key: string): number => (supersededNow.has(key) || kept.has(key) ? 0 : (sizes.get(key) ?? 0));
    const fetchUnlessSuperseded = async (key: string): Promise<SegmentView | string | undefined> => {
      if (supersededNow.has(key)) return undefined;
      const earlier = kept.get(key);
      kept.delete(key);
      return this.fetch(key, earlier);
    };
    await consumeInOrder(toIngest, CATCH_UP_WINDOW, weigh, fetchUnlessSuperseded, async (key, segment) => {
      if (segment === undefined) {
        await this.write([this.recordOperation(key, this.ordinalFor(key), SUPERSEDED)], key, SUPERSEDED);
        return;
      }
      if (typeof segment === 'string') {
        damaged.push({ key, why: segment });
        return;
      }
      await this.ingestView(key, segment);
      ingested++;
      entries += segment.count;
    });
    if (rebuilt) {
      await this.db.del(metaKey('rebuilding'), { sync: true });
      this.options.onRebuild?.(rebuilt);
    }
    this.resetAtOpen = undefined;
    // A damaged segment is not recorded: it is tried again at the next catch-up (and verify reports it).
    return { result: { ingested, entries, rebuilt, damaged }, listed: present.length };
  }

  /** The segment under `key` (or in `read`, its bytes read already), checked whole, or why it is damaged. */
  private async fetch(key: string, read?: Buffer): Promise<SegmentView | string> {
    const bytes = read ?? (await this.read(key));
    return typeof bytes === 'string' ? bytes : viewSegment(bytes, key, { dataKey: this.options.dataKey });
  }

  /** The bytes of the segment under `key`, or why they are not a segment's. */
  private async read(key: string): Promise<Buffer | string> {
    try {
      return await this.options.storage.get(key, { maxSize: SEGMENT_MAX_OBJECT_SIZE, signal: this.options.signal });
    } catch (error) {
      if (isStorageError(error, 'too-large')) return 'larger than any segment';
      throw error;
    }
  }

  /**
   * What the segment under `key` supersedes: from its header and names alone when plain, else whole. With
   * `whole`, a plain segment is read whole instead (one GET, not two): its bytes come back with the answer
   * (as `bytes`), for the catch-up to keep and ingest without fetching them again. The answer is the one the
   * ranged gets would give, taken from the same bytes.
   */
  private async supersedesOf(key: string, whole = false): Promise<{ supersedes: SegmentName[] | string; bytes?: Buffer | undefined }> {
    if (this.options.dataKey) {
      const bytes = await this.read(key);
      const segment = typeof bytes === 'string' ? bytes : viewSegment(bytes, key, { dataKey: this.options.dataKey });
      return { supersedes: typeof segment === 'string' ? segment : segment.supersedes, bytes: whole && typeof bytes !== 'string' ? bytes : undefined };
    }
    const { storage, signal } = this.options;
    if (whole) {
      const bytes = await this.read(key);
      if (typeof bytes !== 'string') return { supersedes: supersedesIn(bytes), bytes };
    }
    try {
      const header = decodeSegmentHeader(await storage.get(key, { range: { offset: 0, length: SEGMENT_HEADER_SIZE }, signal }));
      if (typeof header === 'string') return { supersedes: header };
      if (header.superseded === 0) return { supersedes: [] };
      const names = await storage.get(key, { range: { offset: SEGMENT_HEADER_SIZE, length: header.superseded * SEGMENT_NAME_SIZE }, signal });
      return { supersedes: decodeSupersededNames(names, 0, header.superseded, header.name) };
    } catch (error) {
      if (isStorageError(error, 'out-of-range')) return { supersedes: 'shorter than its header says' };
      throw error;
    }
  }

  /** Empties the cache (a rebuild follows); returns why, for the result. */
  private async reset(why: string): Promise<string> {
    await this.db.put(metaKey('rebuilding'), Buffer.from(why), { sync: true });
    await this.db.clear({ gt: metaKey('rebuilding') });
    await this.db.put(metaKey('format'), Buffer.from(FORMAT), { sync: true });
    await this.db.put(metaKey('repository'), Buffer.from(this.options.repositoryId), { sync: true });
    this.ordinals.length = 0;
    this.known.clear();
    return why;
  }

  /** The ordinal of the segment under `key`: the one it has (a partial one's), or the next. */
  private ordinalFor(key: string): number {
    return this.known.get(key)?.ordinal ?? this.ordinals.length;
  }

  private recordOperation(key: string, ordinal: number, state: number): Put {
    const value = Buffer.alloc(5);
    value.writeUInt32LE(ordinal, 0);
    value[4] = state;
    return { type: 'put', key: segmentRecordKey(key), value };
  }

  /** Writes one batch (operations, or a chained batch); when it holds the record of the segment under `key` (in `state`), notes it. */
  private async write(operations: Put[] | ChainedBatch<Db, Buffer, Buffer>, key: string, state: number | undefined): Promise<void> {
    this.peakBatch = Math.max(this.peakBatch, operations.length);
    try {
      if (Array.isArray(operations)) await this.db.batch(operations as { type: 'put'; key: Buffer; value: Buffer }[], { sync: false });
      else await operations.write({ sync: false });
    } catch (error) {
      throw classifyWriteError(error, this.path);
    }
    if (state === undefined) return;
    const ordinal = this.ordinalFor(key);
    this.ordinals[ordinal] = key;
    this.known.set(key, { ordinal, state });
  }

  /**
   * Ingests one segment: each entry is kept unless the cache already holds the blob from a segment that
   * wins over this one. A writer ingests its own segments this way, once they are durable in the store.
   */
  async ingest(segment: Segment): Promise<void> {
    const { entries } = segment;
    await this.ingestEntries(segmentKey(segment.name), entries.length, (i, keys, keyAt, values, valueAt) => {
      entries[i]!.id.copy(keys, keyAt);
      encodeLocation(entries[i]!).copy(values, valueAt);
    });
  }

  /** Ingests a segment checked whole, its entries taken from its bytes (the id, then the location, as stored). */
  private async ingestView(key: string, view: SegmentView): Promise<void> {
    await this.ingestEntries(key, view.count, (i, keys, keyAt, values, valueAt) => {
      const at = entryOffset(view, i);
      view.bytes.copy(keys, keyAt, at, at + ID_SIZE);
      view.bytes.copy(values, valueAt, at + ID_SIZE, at + ID_SIZE + INDEX_ENTRY_SIZE);
    });
  }

  /**
   * Ingests the `count` entries of the segment under `key` in parts of at most `batch`: `place` copies entry
   * i's id and location where it is told. A part's keys and values are two allocations (LevelDB copies what
   * it writes), not two per entry. Several parts: the first records the segment partial (its ordinal, so
   * that the entries written are known to be its own), the last ingested; the next catch-up ingests a
   * partial one again.
   */
  private async ingestEntries(key: string, count: number, place: (i: number, keys: Buffer, keyAt: number, values: Buffer, valueAt: number) => void): Promise<void> {
    if (this.settled(key)) return;
    const ordinal = this.ordinalFor(key);
    const size = Math.min(this.batch, count);
    const shared = this.scratch !== undefined && this.scratch.ids.length >= size ? this.scratch : undefined;
    if (shared) this.scratch = undefined;
    const scratch = shared ?? partScratch(size);
    try {
      await this.ingestParts(key, count, ordinal, scratch, place);
    } finally {
      // Kept for the next ingest when it is the largest a part may be (small segments make small ones).
      if (scratch.ids.length === this.batch && this.scratch === undefined) this.scratch = scratch;
    }
  }

  private async ingestParts(key: string, count: number, ordinal: number, scratch: PartScratch, place: (i: number, keys: Buffer, keyAt: number, values: Buffer, valueAt: number) => void): Promise<void> {
    const { keys, values } = scratch;
    for (let start = 0; ; start += this.batch) {
      const n = Math.min(this.batch, count - start);
      const last = start + n >= count;
      for (let i = 0; i < n; i++) {
        const keyAt = i * BLOB_KEY_SIZE;
        const valueAt = i * BLOB_VALUE_SIZE;
        keys[keyAt] = BLOB;
        place(start + i, keys, keyAt + 1, values, valueAt);
        values.writeUInt32LE(ordinal, valueAt + INDEX_ENTRY_SIZE);
      }
      const ids = n === scratch.ids.length ? scratch.ids : scratch.ids.slice(0, n);
      const current = n === 0 ? [] : await this.db.getMany(ids);
      // A chained batch: each put is copied into LevelDB's batch at once, so that no array of operations
      // (and no copy of it) lives until the write, only the part's two buffers.
      const batch = this.db.batch();
      for (let i = 0; i < n; i++) {
        const existing = current[i];
        if (existing !== undefined && existing.length === BLOB_VALUE_SIZE) {
          const held = existing.readUInt32LE(INDEX_ENTRY_SIZE);
          // Its own entry (written by an earlier part of an ingest cut short) is there already.
          if (held === ordinal) continue;
          const holder = this.ordinals[held];
          if (holder !== undefined && !segmentWins(key, holder)) continue;
        }
        batch.put(ids[i]!, values.subarray(i * BLOB_VALUE_SIZE, (i + 1) * BLOB_VALUE_SIZE));
      }
      const state = last ? INGESTED : start === 0 ? PARTIAL : undefined;
      if (state !== undefined) {
        const record = this.recordOperation(key, ordinal, state);
        batch.put(record.key, record.value!);
      }
      await this.write(batch, key, state);
      if (last) return;
      crashPoint('cache-part-written');
    }
  }

  /**
   * Every segment this cache ingested (effective as of its last catch-up), fetched again from the store and
   * given to `visit` one at a time in key order, at most two fetched ahead, each as a view of its bytes
   * checked whole (no object per entry: memory holds at most three segments' bytes). One that cannot be
   * read now (or is gone) is skipped: its blobs count as absent already, or it was superseded meanwhile.
   */
  async eachIngested(visit: (segment: SegmentView) => Promise<void>): Promise<void> {
    const keys = [...this.known].filter(([, { state }]) => state === INGESTED).map(([key]) => key).sort();
    const fetchIfThere = async (key: string): Promise<SegmentView | string> => {
      try {
        return await this.fetch(key);
      } catch (error) {
        if (isStorageError(error, 'not-found')) return 'gone';
        throw error;
      }
    };
    await consumeInOrder(keys, { width: 2, budget: 2 }, () => 1, fetchIfThere, async (_key, segment) => {
      if (typeof segment !== 'string') await visit(segment);
    });
  }

  /** Where each blob is, by the store's segments as of the last catch-up; undefined for unknown ids. */
  async lookup(ids: readonly Buffer[]): Promise<(BlobLocation | undefined)[]> {
    if (ids.length === 0) return [];
    const values = await this.db.getMany(ids.map(blobKey));
    return values.map((value, i) => {
      if (value === undefined) return undefined;
      const location = value.length === INDEX_ENTRY_SIZE + 4 ? decodeLocation(value.subarray(0, INDEX_ENTRY_SIZE)) : undefined;
      if (!location) throw new CorruptMetadataError('the index cache', `the entry of blob ${ids[i]!.toString('hex')} has a bad length; it is rebuilt at the next open`);
      return location;
    });
  }

  /** Every blob's entry, by id (verify walks the index): one entry in memory at a time. */
  async *blobs(): AsyncGenerator<IndexEntry> {
    for await (const [key, value] of this.db.iterator({ gte: Buffer.from([BLOB]), lt: Buffer.from([BLOB + 1]) })) {
      const location = value.length === INDEX_ENTRY_SIZE + 4 ? decodeLocation(value.subarray(0, INDEX_ENTRY_SIZE)) : undefined;
      if (!location) throw new CorruptMetadataError('the index cache', `the entry of blob ${key.subarray(1).toString('hex')} has a bad length; it is rebuilt at the next open`);
      yield { id: Buffer.from(key.subarray(1)), ...location };
    }
  }

  /** The segment a blob's entry came from (tests, verify). */
  async segmentOf(id: Buffer): Promise<string | undefined> {
    const value = await this.db.get(blobKey(id));
    return value === undefined ? undefined : this.ordinals[value.readUInt32LE(INDEX_ENTRY_SIZE)];
  }

  /** Segments ingested, and blobs held. */
  async counts(): Promise<{ segments: number; blobs: number }> {
    let blobs = 0;
    for await (const _ of this.db.keys({ gte: Buffer.from([BLOB]), lt: Buffer.from([BLOB + 1]) })) blobs++;
    return { segments: [...this.known.values()].filter((s) => s.state === INGESTED).length, blobs };
  }

  async close(): Promise<void> {
    await this.db.close();
    await makeTreePrivate(this.path).catch(() => undefined);
  }
}

/** A part's keys and values (batch entries' worth) and a view of each key (LevelDB's getMany takes an array). */
interface PartScratch {
  keys: Buffer;
  values: Buffer;
  ids: Buffer[];
}

function partScratch(entries: number): PartScratch {
  const keys = Buffer.allocUnsafe(entries * BLOB_KEY_SIZE);
  const values = Buffer.allocUnsafe(entries * BLOB_VALUE_SIZE);
  const ids = Array.from({ length: entries }, (_, i) => keys.subarray(i * BLOB_KEY_SIZE, (i + 1) * BLOB_KEY_SIZE));
  return { keys, values, ids };
}

/**
 * Opens the slot's database, or says it is taken. A database that cannot be opened healthy, or that is
 * another format's or another repository's, is removed and created anew (`reset` says why).
 */
async function openSlot(path: string, options: IndexCacheOptions): Promise<{ db: Db; reset: string | undefined } | 'locked'> {
  let reset: string | undefined;
  for (let attempt = 0; attempt < 2; attempt++) {
    const db: Db = await levelDb(path, levelOptions('index-cache', { createIfMissing: true }));
    try {
      await db.open();
    } catch (error) {
      if (isLocked(error)) return 'locked';
      const full = classifyWriteError(error, path);
      if (full instanceof NoSpaceError) throw full;
      if (attempt > 0) throw error;
      reset = `the cache could not be opened (${String((error as { cause?: unknown }).cause ?? error)})`;
      await rm(path, { recursive: true, force: true });
      continue;
    }
    await makeTreePrivate(path).catch(() => undefined);
    const format = await db.get(metaKey('format'));
    const repository = await db.get(metaKey('repository'));
    const interrupted = await db.get(metaKey('rebuilding'));
    if (format?.toString() === FORMAT && repository?.toString() === options.repositoryId) {
      // Catch-up rebuilds: the interrupted rebuild's mark stays until that rebuild completes.
      return { db, reset: reset ?? (interrupted === undefined ? undefined : `an earlier rebuild was cut short (${interrupted.toString()})`) };
    }
    const empty = format === undefined && repository === undefined;
    if (!empty) reset ??= `the cache held ${format?.toString() ?? 'no format'} of repository ${repository?.toString() ?? 'unknown'}`;
    await db.clear();
    await db.put(metaKey('format'), Buffer.from(FORMAT), { sync: true });
    await db.put(metaKey('repository'), Buffer.from(options.repositoryId), { sync: true });
    return { db, reset };
  }
  throw new Error('unreachable');
}

/** What a plain segment's bytes say it supersedes: exactly what its ranged reads would (supersedesOf). */
function supersedesIn(bytes: Buffer): SegmentName[] | string {
  if (bytes.length < SEGMENT_HEADER_SIZE) return 'shorter than its header says';
  const header = decodeSegmentHeader(bytes.subarray(0, SEGMENT_HEADER_SIZE));
  if (typeof header === 'string') return header;
  if (header.superseded === 0) return [];
  const end = SEGMENT_HEADER_SIZE + header.superseded * SEGMENT_NAME_SIZE;
  if (bytes.length < end) return 'shorter than its header says';
  return decodeSupersededNames(bytes.subarray(SEGMENT_HEADER_SIZE, end), 0, header.superseded, header.name);
}
