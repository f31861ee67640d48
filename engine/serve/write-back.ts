/**
 * The overlay's write-back cache: whole 4 KiB granules of guest data, keyed by granule number (offset /
 * GRANULE), each DIRTY (newer than the overlay's file) or clean (kept for read-modify-write and reads,
 * evicted oldest first beyond `cleanMax`). The overlay (overlay.ts) decides what a granule holds; this
 * module keeps the bytes and moves them to the file:
 *
 * - write-back takes every dirty granule at the moment it starts, sorts them, and writes runs of adjacent
 *   granules with one `pwritev` each (several runs at once); write-backs run one after another, so a
 *   granule's older content never lands after its newer one. A granule changed while its write is in
 *   flight is copied first (the write keeps the bytes it started with) and stays dirty.
 * - sync is group commit: a flush needs an `fdatasync` that started after its data reached the file; it
 *   shares a running one that did, starts its own while fewer than PARALLEL_SYNCS run, and otherwise
 *   shares the next one to start. A sync with nothing written since the last is skipped. A failed
 *   `fdatasync` fails every later flush too: the kernel may have dropped the pages it could not write
 *   (Linux marks them clean), so the overlay can no longer say its data is on stable storage.
 */
import type { FileHandle } from 'node:fs/promises';
import { readFully, writevFully } from '../../repo-format/file-io.js';
import { OverlayFailedError } from '../errors.js';

export const GRANULE = 4096;
/** At most this many granules per `pwritev` (IOV_MAX is 1024 on Linux). */
const RUN_GRANULES = 1024;
/** Runs written at once (libuv's pool has 4 threads by default). */
const PARALLEL_RUNS = 4;
/**
 * fdatasyncs running at once. A flush starts its own as soon as its data is in the file rather than wait
 * for the one running to end: the block layer merges concurrent cache flushes, so a guest that flushes
 * often waits about one sync, not two (nbd-server's threads do the same). Beyond this many, a flush joins
 * the next one to start.
 */
const PARALLEL_SYNCS = 4;

interface Entry {
  data: Buffer;
  dirty: boolean;
  /** The buffer a write-back is writing now: changing the granule meanwhile copies it first. */
  inFlight: Buffer | undefined;
}

export interface WriteBackLimits {
  dirtyHigh: number;
  dirtyMax: number;
  cleanMax: number;
}

export class WriteBackCache {
  private readonly entries = new Map<number, Entry>();
  private readonly dirty = new Set<number>();
  /** Clean entries with no write in flight, oldest first: the ones eviction may drop. */
  private readonly clean = new Map<number, Entry>();
  /** Granules a write-back is writing now: their buffers are held until it ends, dirty or not meanwhile. */
  private inFlightGranules = 0;
  private writeBack: Promise<void> = Promise.resolve();
  /** A write-back that is chained but has not started: it will take whatever is dirty when it does. */
  private queued: Promise<void> | undefined;
  /** Bumped by every completed write to the file; `syncedVersion` is what the last sync covered. */
  private fileVersion = 0;
  private syncedVersion = 0;
  /** The fdatasyncs running, each with the file version it covers. */
  private readonly syncs: { version: number; done: Promise<void> }[] = [];
  private nextSync: Promise<void> | undefined;
  private syncFailure: Error | undefined;

  constructor(
    private readonly handle: FileHandle,
    private readonly size: number,
    private readonly limits: WriteBackLimits,
  ) {}

  get dirtyBytes(): number {
    return this.dirty.size * GRANULE;
  }

  /**
   * The bytes of guest data the cache holds: dirty granules, granules being written (a granule changed
   * meanwhile holds both its new bytes and those being written) and clean ones. Every entry is dirty,
   * clean or in flight, and a dirty one in flight holds two buffers, so this counts each buffer once.
   */
  get heldBytes(): number {
    return (this.dirty.size + this.inFlightGranules + this.clean.size) * GRANULE;
  }

  has(granule: number): boolean {
    return this.entries.has(granule);
  }

  /** Copies cached bytes from `offset` into `target`; every granule of the range must be cached. */
  copyOut(offset: number, target: Buffer): void {
    for (let done = 0; done < target.length; ) {
      const granule = Math.floor((offset + done) / GRANULE);
      const from = offset + done - granule * GRANULE;
      const n = Math.min(GRANULE - from, target.length - done);
      this.entries.get(granule)!.data.copy(target, done, from, from + n);
      done += n;
    }
  }

  /**
   * Writes `bytes` into cached granule `granule` at `at` and marks it dirty; false when it is not cached.
   * Synchronous on purpose: between finding the buffer and changing it no write-back may start, or it could
   * write a buffer that changes under it and then call the granule clean.
   */
  patch(granule: number, at: number, bytes: Buffer): boolean {
    const entry = this.entries.get(granule);
    if (!entry) return false;
    if (entry.data === entry.inFlight) entry.data = Buffer.from(entry.data);
    bytes.copy(entry.data, at);
    this.markDirty(granule, entry);
    return true;
  }

  /** Caches `data` (GRANULE bytes, owned by the cache from now on) as granule `granule`'s content, dirty. */
  put(granule: number, data: Buffer): void {
    const entry = this.entries.get(granule);
    if (entry) {
      entry.data = data;
      this.markDirty(granule, entry);
    } else {
      const created: Entry = { data, dirty: false, inFlight: undefined };
      this.entries.set(granule, created);
      this.markDirty(granule, created);
    }
  }

  /** Drops granules [from, to) (they read as zeros now): a write in flight for one of them is harmless. */
  forget(from: number, to: number): void {
    const drop = (granule: number): void => {
      this.entries.delete(granule);
      this.dirty.delete(granule);
      this.clean.delete(granule);
    };
    if (to - from <= this.entries.size) {
      for (let g = from; g < to; g += 1) if (this.entries.has(g)) drop(g);
    } else {
      for (const g of [...this.entries.keys()]) if (g >= from && g < to) drop(g);
    }
  }

  /**
   * Called before a write: evicts clean granules beyond `cleanMax`, starts a write-back from `dirtyHigh`
   * unwritten bytes (dirty or in flight) on, and waits for it from `dirtyMax` on (failing the write if it
   * fails). Granules in flight count: a write-back takes the dirty set when it starts, and not counting
   * what it still holds would let the guest dirty another `dirtyMax` meanwhile. So the cache holds at most
   * `dirtyMax + cleanMax` plus the one write admitted below the limit (heldBytes).
   */
  async admit(): Promise<void> {
    this.evict();
    if (this.unwrittenBytes < this.limits.dirtyHigh) return;
    const writeBack = this.writeBackSoon();
    if (this.unwrittenBytes < this.limits.dirtyMax) {
      writeBack.catch(() => undefined); // a later flush or full cache reports it
      return;
    }
    await writeBack;
    // Checked again: a flush may have chained a write-back of its own meanwhile.
    while (this.unwrittenBytes >= this.limits.dirtyMax) await this.writeBackSoon();
  }

  /** Everything dirty now is written to the file and synced when this resolves. */
  async flush(): Promise<void> {
    if (this.syncFailure) throw this.syncFailure;
    await this.writeBackSoon();
    await this.sync();
  }

  /** Waits for the write-backs and syncs under way (before closing the file). */
  async idle(): Promise<void> {
    await this.writeBack.catch(() => undefined);
    await Promise.allSettled(this.syncs.map((running) => running.done));
    await this.nextSync?.catch(() => undefined);
  }

  /** Reads `target.length` bytes of the file at `position`; past its end reads zeros. */
  async readFile(target: Buffer, position: number): Promise<void> {
    target.fill(0, await readFully(this.handle, target, position));
  }

  private get unwrittenBytes(): number {
    return (this.dirty.size + this.inFlightGranules) * GRANULE;
  }

  private markDirty(granule: number, entry: Entry): void {
    entry.dirty = true;
    this.dirty.add(granule);
    this.clean.delete(granule);
  }

  private evict(): void {
    let over = this.clean.size * GRANULE - this.limits.cleanMax;
    // Called before every write: under the limit it costs no iterator.
    if (over <= 0) return;
    for (const granule of this.clean.keys()) {
      if (over <= 0) break;
      this.clean.delete(granule);
      this.entries.delete(granule);
      over -= GRANULE;
    }
  }

  private writeBackSoon(): Promise<void> {
    if (this.queued) return this.queued;
    const run = this.writeBack
      .catch(() => undefined)
      .then(() => {
        this.queued = undefined;
        return this.writeDirty();
      });
    this.queued = run;
    this.writeBack = run;
    return run;
  }

  private async writeDirty(): Promise<void> {
    if (this.dirty.size === 0) return;
    const granules = [...this.dirty].sort((a, b) => a - b);
    this.dirty.clear();
    const taken: { granule: number; entry: Entry }[] = [];
    for (const granule of granules) {
      const entry = this.entries.get(granule)!;
      entry.dirty = false;
      entry.inFlight = entry.data;
      taken.push({ granule, entry });
    }
    this.inFlightGranules += taken.length;
    const runs: { position: number; buffers: Buffer[] }[] = [];
    for (let i = 0; i < taken.length; ) {
      const start = i;
      while (i + 1 < taken.length && i + 1 - start < RUN_GRANULES && taken[i + 1]!.granule === taken[i]!.granule + 1) i += 1;
      i += 1;
      const position = taken[start]!.granule * GRANULE;
      const buffers = taken.slice(start, i).map(({ granule, entry }) => entry.inFlight!.subarray(0, Math.min(GRANULE, this.size - granule * GRANULE)));
      runs.push({ position, buffers });
    }
    let failure: unknown;
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < runs.length && failure === undefined) {
        const run = runs[next++]!;
        try {
          await this.writeRun(run.buffers, run.position);
        } catch (error) {
          failure ??= error;
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(PARALLEL_RUNS, runs.length) }, worker));
    if (failure === undefined) this.fileVersion += 1;
    this.inFlightGranules -= taken.length;
    for (const { granule, entry } of taken) {
      entry.inFlight = undefined;
      if (this.entries.get(granule) !== entry || entry.dirty) continue;
      // Not all of it may have reached the file: the granule stays dirty and the next write-back retries.
      if (failure !== undefined) this.markDirty(granule, entry);
      else this.clean.set(granule, entry);
    }
    // What was written is clean now: beyond `cleanMax` it goes at once, not at the next write.
    this.evict();
    if (failure !== undefined) throw failure;
  }

  private async writeRun(buffers: Buffer[], position: number): Promise<void> {
    const length = buffers.reduce((sum, b) => sum + b.length, 0);
    const written = await writevFully(this.handle, buffers, position);
    if (written < length) throw new OverlayFailedError(`the overlay file took no bytes at offset ${position + written}`);
  }

  private sync(): Promise<void> {
    if (this.syncFailure) return Promise.reject(this.syncFailure);
    const version = this.fileVersion;
    if (version <= this.syncedVersion) return Promise.resolve();
    // A running sync covers this flush only if it started after the flush's data reached the file.
    const covering = this.syncs.find((running) => running.version >= version);
    if (covering) return covering.done;
    if (this.syncs.length < PARALLEL_SYNCS) return this.startSync(version);
    this.nextSync ??= Promise.race(this.syncs.map((running) => running.done))
      .catch(() => undefined)
      .then(() => {
        this.nextSync = undefined;
        return this.sync();
      });
    return this.nextSync;
  }

  private startSync(version: number): Promise<void> {
    const running: { version: number; done: Promise<void> } = {
      version,
      done: this.handle
        .datasync()
        .then(
          () => {
            this.syncedVersion = Math.max(this.syncedVersion, version);
          },
          (error: Error) => {
            const errno = (error as NodeJS.ErrnoException).code;
            this.syncFailure ??= new OverlayFailedError(`the overlay file could not be synced (${errno ?? error.message}): writes since the last flush may be lost`, errno, { cause: error });
            throw this.syncFailure;
          },
        )
        .finally(() => {
          this.syncs.splice(this.syncs.indexOf(running), 1);
        }),
    };
    this.syncs.push(running);
    return running.done;
  }
}
