/**
 * The copy-on-write overlay of a writable export (`serve --writable`): guest writes go to a temporary
 * sparse file at their own offsets, never to the repository. The file is unlinked as soon as it is open,
 * so it disappears with the process however the process ends.
 *
 * What the overlay holds is tracked per GRANULE (4 KiB), one byte per granule, in a small array per block
 * that was ever written: DATA (the granule's bytes are in the write-back cache or the file) or ZERO (the
 * granule reads as zeros and nothing is stored: WRITE_ZEROES and TRIM of whole granules cost no I/O and no
 * space, so a guest zeroing or discarding its whole disk does not fill the overlay's file system). Memory
 * grows with what the guest wrote, not with the disk. A write (or zeroing) that covers part of a granule
 * is completed with the granule's current content first (read-modify-write), so a DATA granule is always
 * whole.
 *
 * Writes land in a WRITE-BACK CACHE of granules (write-back.ts) and are answered from memory: a guest's
 * small writes cost no system call each (1 KiB writes to one granule are merged there; the file sees the
 * granule once). NBD's contract is that a write is on stable storage once a FLUSH (or the write's own FUA)
 * is answered, not before (proto.md, "Ordering of messages and writes"); so FLUSH writes the dirty
 * granules back, in runs of adjacent granules, then `fdatasync`s the file (group commit: a flush shares a
 * running `fdatasync` that started after its data reached the file, starts its own while fewer than four
 * run, and otherwise shares the next one to start; write-back.ts). Dirty granules
 * are also written back in the background from DIRTY_HIGH bytes on, and a write waits while DIRTY_MAX
 * bytes are dirty or being written: the cache holds at most DIRTY_MAX + CLEAN_MAX and one request,
 * whatever the guest does.
 */
import { chmod, mkdtemp, rm, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MUTABLE_FILE_MODE, openNewFile, PRIVATE_DIRECTORY_MODE } from '../../repo-format/file-modes.js';
import { DiskGeometry } from '../../repo-format/disk-geometry.js';
import { GRANULE, WriteBackCache } from './write-back.js';

export { GRANULE } from './write-back.js';
const DATA = 1;
const ZERO = 2;

/**
 * The backup's content of a range (at most one granule, inside one block) that the overlay does not hold, for
 * read-modify-write: there the backup's bytes are the export's. The buffer is only read, never kept, so it
 * may be a view of a cached chunk.
 */
export type CurrentContent = (offset: number, length: number) => Promise<Buffer>;

export interface OverlayLimits {
  /** Unwritten bytes (dirty or being written) from which write-back starts in the background. */
  dirtyHigh: number;
  /** Unwritten bytes (dirty or being written) at which writes wait for the write-back. */
  dirtyMax: number;
  /** Clean granules kept for read-modify-write and reads. */
  cleanMax: number;
}

export const DEFAULT_OVERLAY_LIMITS: OverlayLimits = { dirtyHigh: 8 * 1024 * 1024, dirtyMax: 32 * 1024 * 1024, cleanMax: 8 * 1024 * 1024 };

export class Overlay {
  /** block → one byte per granule of the block: 0 (not in the overlay), DATA or ZERO. */
  private readonly written = new Map<number, Uint8Array>();
  private readonly granulesPerBlock: number;
  private readonly geometry: DiskGeometry;
  private readonly cache: WriteBackCache;
  private queue: Promise<void> = Promise.resolve();
  /** Bytes the guest wrote or zeroed. */
  bytesWritten = 0;

  private constructor(
    private readonly handle: FileHandle,
    readonly size: number,
    readonly blockSize: number,
    limits: OverlayLimits,
  ) {
    // Block sizes are multiples of 64 KiB (config.ts), so granules never straddle blocks.
    this.granulesPerBlock = blockSize / GRANULE;
    this.geometry = new DiskGeometry(size, blockSize);
    this.cache = new WriteBackCache(handle, size, limits);
  }

  static async create(size: number, blockSize: number, dir = tmpdir(), limits: OverlayLimits = DEFAULT_OVERLAY_LIMITS): Promise<Overlay> {
    const work = await mkdtemp(join(dir, 'engine-overlay-'));
    try {
      await chmod(work, PRIVATE_DIRECTORY_MODE);
      const path = join(work, 'overlay');
      // Not truncated to the disk's size: the file grows with what the guest writes, so a 64 TiB thin
      // disk is served writable from a filesystem whose files stop at 16 TiB (ext4) as long as the guest
      // writes below that.
      const handle = await openNewFile(path, 'wx+', MUTABLE_FILE_MODE);
      return new Overlay(handle, size, blockSize, limits);
    } finally {
      // Unlinked while open: the data lives as long as the descriptor, and no crash leaves it behind.
      await rm(work, { recursive: true, force: true });
    }
  }

  touches(block: number): boolean {
    return this.written.has(block);
  }

  /** Whether the overlay alone answers [blockOffset, blockOffset + length) of `block` (no backup read needed). */
  covers(block: number, blockOffset: number, length: number): boolean {
    const map = this.written.get(block);
    if (!map) return false;
    const last = Math.floor((blockOffset + length - 1) / GRANULE);
    for (let g = Math.floor(blockOffset / GRANULE); g <= last; g += 1) if (map[g] === 0) return false;
    return true;
  }

  get blocksTouched(): number {
    return this.written.size;
  }

  /** Bytes the overlay's file occupies on disk (dirty granules still in memory are not counted). */
  async allocatedBytes(): Promise<number> {
    return (await this.handle.stat()).blocks * 512;
  }

  /** Bytes of guest data held in memory and not yet in the file. */
  get dirtyBytes(): number {
    return this.cache.dirtyBytes;
  }

  /**
   * Fills `target` (the bytes of block `block` from `blockOffset`) with what the overlay holds there,
   * leaving the other bytes as they are.
   */
  async readInto(block: number, blockOffset: number, target: Buffer): Promise<void> {
    const map = this.written.get(block);
    if (!map) return;
    const base = this.geometry.offsetOf(block);
    const firstGranule = base / GRANULE;
    let g = Math.floor(blockOffset / GRANULE);
    const lastGranule = Math.floor((blockOffset + target.length - 1) / GRANULE);
    const reads: Promise<void>[] = [];
    while (g <= lastGranule) {
      const state = map[g];
      if (state === 0) {
        g += 1;
        continue;
      }
      // A run of the same state; DATA runs split where a granule is in the cache.
      const cached = state === DATA && this.cache.has(firstGranule + g);
      let end = g;
      while (end + 1 <= lastGranule && map[end + 1] === state && (state !== DATA || this.cache.has(firstGranule + end + 1) === cached)) end += 1;
      const from = Math.max(g * GRANULE, blockOffset) - blockOffset;
      const to = Math.min((end + 1) * GRANULE, blockOffset + target.length) - blockOffset;
      if (state === ZERO) target.fill(0, from, to);
      else if (cached) this.cache.copyOut(base + blockOffset + from, target.subarray(from, to));
      else reads.push(this.cache.readFile(target.subarray(from, to), base + blockOffset + from));
      g = end + 1;
    }
    await Promise.all(reads);
  }

  /**
   * Writes `data` at `offset`. Writes are serialised: two overlapping read-modify-writes must not
   * interleave. Most need no I/O (the granules are whole, or cached), so the queue moves at memory speed.
   */
  write(data: Buffer, offset: number, current: CurrentContent): Promise<void> {
    return this.serialised(async () => {
      // Admitted first: a write refused because the cache cannot be written back changes nothing.
      await this.cache.admit();
      await this.writeGranules(data, offset, current);
      this.bytesWritten += data.length;
    });
  }

  /**
   * Zeroes a range (WRITE_ZEROES and TRIM): whole granules are only marked ZERO; a partial granule at
   * either end is completed and written like any write.
   */
  zero(offset: number, length: number, current: CurrentContent): Promise<void> {
    return this.serialised(async () => {
      await this.cache.admit();
      const end = offset + length;
      const wholeStart = Math.min(end, Math.ceil(offset / GRANULE) * GRANULE);
      // The disk's last granule may be short: it ends at the disk's end, and is then whole.
      const wholeEnd = Math.max(wholeStart, end === this.size ? end : Math.floor(end / GRANULE) * GRANULE);
      if (wholeStart > offset) await this.writeGranules(Buffer.alloc(wholeStart - offset), offset, current);
      if (wholeEnd > wholeStart) {
        this.mark(wholeStart, wholeEnd, ZERO);
        this.cache.forget(wholeStart / GRANULE, Math.ceil(wholeEnd / GRANULE));
      }
      if (end > wholeEnd) await this.writeGranules(Buffer.alloc(end - wholeEnd), wholeEnd, current);
      this.bytesWritten += length;
    });
  }

  /**
   * Every write answered before this call is in the file and the file is synced when it resolves (NBD
   * FLUSH, and FUA after its write). Not queued behind the writes: answered writes are in the cache.
   */
  flush(): Promise<void> {
    return this.cache.flush();
  }

  async close(): Promise<void> {
    await this.queue.catch(() => undefined);
    await this.cache.idle();
    await this.handle.close();
  }

  /** The body of a write; the caller holds the queue. */
  private async writeGranules(data: Buffer, offset: number, current: CurrentContent): Promise<void> {
    const end = offset + data.length;
    if (end <= offset) return;
    const first = Math.floor(offset / GRANULE);
    const last = Math.floor((end - 1) / GRANULE);
    for (let g = first; g <= last; g += 1) {
      const start = g * GRANULE;
      const granuleEnd = Math.min(this.size, start + GRANULE);
      const from = Math.max(offset, start);
      const to = Math.min(end, granuleEnd);
      const bytes = data.subarray(from - offset, to - offset);
      if (from === start && to === granuleEnd) this.cache.put(g, Buffer.concat([bytes], GRANULE));
      else if (!this.cache.patch(g, from - start, bytes)) {
        // Completed with the granule's present content first; cached (with the write in it) in one step
        // once that is read, so a failed read leaves the cache as it was.
        const content = await this.presentContent(g, current);
        bytes.copy(content, from - start);
        this.cache.put(g, content);
      }
      // Per granule: a later granule's failed read leaves the earlier ones consistent (cached and DATA).
      this.mark(start, granuleEnd, DATA);
    }
  }

  /** Granule `g`'s present content (GRANULE bytes, zeros past the disk's end), when it is not cached. */
  private async presentContent(g: number, current: CurrentContent): Promise<Buffer> {
    const start = g * GRANULE;
    const length = Math.min(GRANULE, this.size - start);
    const state = this.stateOf(start);
    const content = Buffer.alloc(GRANULE);
    if (state === DATA) await this.cache.readFile(content.subarray(0, length), start);
    else if (state !== ZERO) (await current(start, length)).copy(content);
    return content;
  }

  private stateOf(offset: number): number {
    const block = this.geometry.blockAt(offset);
    return this.written.get(block)?.[(offset - this.geometry.offsetOf(block)) / GRANULE] ?? 0;
  }

  /** Sets granules [start, end) (start granule-aligned; end aligned or the disk's end) to `state`, block by block. */
  private mark(start: number, end: number, state: number): void {
    for (let at = start; at < end; ) {
      const block = this.geometry.blockAt(at);
      const blockStart = this.geometry.offsetOf(block);
      const upTo = Math.min(end, blockStart + this.blockSize);
      let map = this.written.get(block);
      if (!map) {
        map = new Uint8Array(this.granulesPerBlock);
        this.written.set(block, map);
      }
      map.fill(state, (at - blockStart) / GRANULE, Math.ceil((upTo - blockStart) / GRANULE));
      at = upTo;
    }
  }

  private serialised<T>(work: () => Promise<T>): Promise<T> {
    const result = this.queue.then(work);
    this.queue = result.then(() => undefined, () => undefined);
    return result;
  }
}
