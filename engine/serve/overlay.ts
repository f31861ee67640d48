/**
 * The copy-on-write overlay of a writable export (`serve --writable`): guest writes go to a temporary
 * sparse file at their own offsets, never to the repository. The file is unlinked as soon as it is open,
 * so it disappears with the process however the process ends.
 *
 * What the overlay holds is tracked per GRANULE (4 KiB), one byte per granule, in a small array per block
 * that was ever written: DATA (the file holds the granule's bytes) or ZERO (the granule reads as zeros and
 * nothing is stored: WRITE_ZEROES and TRIM of whole granules cost no I/O and no space, so a guest zeroing
 * or discarding its whole disk does not fill the overlay's file system). Memory grows with what the guest
 * wrote, not with the disk. A write (or zeroing) that covers part of a granule is completed with the
 * granule's current content first (read-modify-write), so a DATA granule in the file is always whole.
 */
import { chmod, mkdtemp, rm, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MUTABLE_FILE_MODE, openNewFile, PRIVATE_DIRECTORY_MODE } from '../../repo-format/file-modes.js';
import { DiskGeometry } from '../../repo-format/disk-geometry.js';

export const GRANULE = 4096;
const DATA = 1;
const ZERO = 2;

/** The export's present content of a range (backup merged with the overlay), for read-modify-write. */
export type CurrentContent = (offset: number, length: number) => Promise<Buffer>;

export class Overlay {
  /** block → one byte per granule of the block: 0 (not in the overlay), DATA or ZERO. */
  private readonly written = new Map<number, Uint8Array>();
  private readonly granulesPerBlock: number;
  private readonly geometry: DiskGeometry;
  private queue: Promise<void> = Promise.resolve();
  /** Bytes the guest wrote or zeroed. */
  bytesWritten = 0;

  private constructor(
    private readonly handle: FileHandle,
    readonly size: number,
    readonly blockSize: number,
  ) {
    this.granulesPerBlock = Math.ceil(blockSize / GRANULE);
    this.geometry = new DiskGeometry(size, blockSize);
  }

  static async create(size: number, blockSize: number, dir = tmpdir()): Promise<Overlay> {
    const work = await mkdtemp(join(dir, 'engine-overlay-'));
    try {
      await chmod(work, PRIVATE_DIRECTORY_MODE);
      const path = join(work, 'overlay');
      // Not truncated to the disk's size: the file grows with what the guest writes, so a 64 TiB thin
      // disk is served writable from a filesystem whose files stop at 16 TiB (ext4) as long as the guest
      // writes below that.
      const handle = await openNewFile(path, 'wx+', MUTABLE_FILE_MODE);
      return new Overlay(handle, size, blockSize);
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

  /** Bytes the overlay's file occupies on disk. */
  async allocatedBytes(): Promise<number> {
    return (await this.handle.stat()).blocks * 512;
  }

  /**
   * Fills `target` (the bytes of block `block` from `blockOffset`) with what the overlay holds there,
   * leaving the other bytes as they are.
   */
  async readInto(block: number, blockOffset: number, target: Buffer): Promise<void> {
    const map = this.written.get(block);
    if (!map) return;
    const base = this.geometry.offsetOf(block);
    let g = Math.floor(blockOffset / GRANULE);
    const lastGranule = Math.floor((blockOffset + target.length - 1) / GRANULE);
    while (g <= lastGranule) {
      const state = map[g];
      if (state === 0) {
        g += 1;
        continue;
      }
      let end = g;
      while (end + 1 <= lastGranule && map[end + 1] === state) end += 1;
      const from = Math.max(g * GRANULE, blockOffset) - blockOffset;
      const to = Math.min((end + 1) * GRANULE, blockOffset + target.length) - blockOffset;
      if (state === ZERO) target.fill(0, from, to);
      else await this.readFully(target.subarray(from, to), base + blockOffset + from);
      g = end + 1;
    }
  }

  /**
   * Writes `data` at `offset`. Writes are serialised: two overlapping read-modify-writes must not
   * interleave.
   */
  write(data: Buffer, offset: number, current: CurrentContent): Promise<void> {
    return this.serialised(async () => {
      await this.writeGranules(data, offset, current);
      this.bytesWritten += data.length;
    });
  }

  /**
   * Zeroes a range (WRITE_ZEROES and TRIM): whole granules are only marked ZERO; a partial granule at
   * either end is read, zeroed in part and written whole.
   */
  zero(offset: number, length: number, current: CurrentContent): Promise<void> {
    return this.serialised(async () => {
      const end = offset + length;
      const wholeStart = Math.min(end, Math.ceil(offset / GRANULE) * GRANULE);
      // The disk's last granule may be short: it ends at the disk's end, and is then whole.
      const wholeEnd = Math.max(wholeStart, end === this.size ? end : Math.floor(end / GRANULE) * GRANULE);
      if (wholeStart > offset) await this.writeGranules(Buffer.alloc(wholeStart - offset), offset, current);
      if (wholeEnd > wholeStart) this.mark(wholeStart, wholeEnd, ZERO);
      if (end > wholeEnd) await this.writeGranules(Buffer.alloc(end - wholeEnd), wholeEnd, current);
      this.bytesWritten += length;
    });
  }

  async flush(): Promise<void> {
    await this.serialised(() => this.handle.datasync());
  }

  async close(): Promise<void> {
    await this.queue.catch(() => undefined);
    await this.handle.close();
  }

  /** The body of a write; the caller holds the queue. */
  private async writeGranules(data: Buffer, offset: number, current: CurrentContent): Promise<void> {
    const start = Math.floor(offset / GRANULE) * GRANULE;
    const end = Math.min(this.size, Math.ceil((offset + data.length) / GRANULE) * GRANULE);
    if (end <= start) return;
    let whole = data;
    if (start !== offset || end !== offset + data.length) {
      whole = await current(start, end - start);
      data.copy(whole, offset - start);
    }
    await this.writeFully(whole, start);
    this.mark(start, end, DATA);
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

  private async writeFully(data: Buffer, position: number): Promise<void> {
    let done = 0;
    while (done < data.length) done += (await this.handle.write(data, done, data.length - done, position + done)).bytesWritten;
  }

  private async readFully(target: Buffer, position: number): Promise<void> {
    let done = 0;
    while (done < target.length) {
      const { bytesRead } = await this.handle.read(target, done, target.length - done, position + done);
      if (bytesRead === 0) {
        target.fill(0, done);
        return;
      }
      done += bytesRead;
    }
  }
}
