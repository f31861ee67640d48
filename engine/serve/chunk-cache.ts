/**
 * Decoded chunks for the NBD server: an LRU bounded in bytes, and a loader that reads each chunk from its
 * pack through the block workers (frame checksum, lz4, SHA-256 against the chunk's id: a chunk is checked
 * every time it is read from disk, never trusted) and merges concurrent loads of the same chunk.
 */
import type { FrameReader } from '../../repo-format/pack-file.js';
import type { BlockPool } from '../pipeline/block-pool.js';
import type { ChunkLocation } from './block-table.js';

export class ChunkCache {
  private readonly entries = new Map<number, Buffer>();
  private bytes = 0;
  hits = 0;
  misses = 0;

  constructor(readonly budgetBytes: number) {}

  get(key: number): Buffer | undefined {
    const value = this.entries.get(key);
    if (value === undefined) {
      this.misses += 1;
      return undefined;
    }
    this.hits += 1;
    // Map iteration order is insertion order: re-inserting makes this the most recently used.
    this.entries.delete(key);
    this.entries.set(key, value);
    return value;
  }

  has(key: number): boolean {
    return this.entries.has(key);
  }

  set(key: number, value: Buffer): void {
    if (value.length > this.budgetBytes) return;
    const old = this.entries.get(key);
    if (old) {
      this.bytes -= old.length;
      this.entries.delete(key);
    }
    this.entries.set(key, value);
    this.bytes += value.length;
    for (const [oldest, buffer] of this.entries) {
      if (this.bytes <= this.budgetBytes) break;
      this.entries.delete(oldest);
      this.bytes -= buffer.length;
    }
  }

  get size(): number {
    return this.bytes;
  }
}

/** Why a chunk could not be served; the caller names the backup, disk and offset. */
export class ChunkUnreadable extends Error {}

export class ChunkLoader {
  private readonly loading = new Map<number, Promise<Buffer>>();

  constructor(
    private readonly pool: BlockPool,
    /** Reads frames from the repository's store: a store of its own (versions 1 and 2, serving after the lock went), or the repository holding its lease (version 3). */
    private readonly frames: FrameReader,
    readonly cache: ChunkCache,
  ) {}

  /** The plaintext of a chunk (`expectedLength` bytes), from the cache or its pack. */
  load(key: number, location: ChunkLocation, expectedLength: number): Promise<Buffer> {
    const cached = this.cache.get(key);
    if (cached) return Promise.resolve(cached);
    return this.fetch(key, location, expectedLength);
  }

  /**
   * The chunk if the cache holds it (counted as a hit or a miss), else undefined: then `fetch` it. A reader
   * asks this first so that a hit costs no chunk location (the guest's small reads hit the same chunk).
   */
  cached(key: number): Buffer | undefined {
    return this.cache.get(key);
  }

  /** The chunk from its pack, after `cached` missed: joins a load of it under way, or starts one. */
  fetch(key: number, location: ChunkLocation, expectedLength: number): Promise<Buffer> {
    let pending = this.loading.get(key);
    if (!pending) {
      pending = this.read(location, expectedLength).finally(() => this.loading.delete(key));
      this.loading.set(key, pending);
      void pending.then((chunk) => this.cache.set(key, chunk), () => undefined);
    }
    return pending;
  }

  /** Whether a load of `key` is worth starting for read-ahead (not cached, not loading, a slot free). */
  idle(key: number): boolean {
    return !this.cache.has(key) && !this.loading.has(key) && this.pool.slots.available > 1;
  }

  private async read(location: ChunkLocation, expectedLength: number): Promise<Buffer> {
    const slot = await this.pool.slots.acquire();
    try {
      const opened = await this.pool.open(slot, { locator: this.frames.locateFrame(location), read: () => this.frames.readFrame(location) }, location.id);
      if (!opened.ok) throw new ChunkUnreadable(`chunk ${location.id.toString('hex').slice(0, 16)}… in pack ${location.packId} at offset ${location.offset} is damaged: ${opened.why}`);
      if (opened.rawLength !== expectedLength) throw new ChunkUnreadable(`chunk ${location.id.toString('hex').slice(0, 16)}… holds ${opened.rawLength} bytes, the block needs ${expectedLength}`);
      return Buffer.from(this.pool.input(slot, opened.rawLength));
    } finally {
      this.pool.slots.release(slot);
    }
  }
}
