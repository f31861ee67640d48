/**
 * The copy-on-write overlay of a writable export (`serve --writable`): guest writes go to a temporary
 * sparse file at their own offsets, never to the repository. The file is unlinked as soon as it is open,
 * so it disappears with the process however the process ends.
 *
 * Which bytes the overlay holds is tracked per GRANULE (4 KiB), one byte per granule, in a small array
 * per block that was ever written: memory grows with what the guest wrote, not with the disk. A write
 * that covers part of a granule is completed with the granule's current content first (read-modify-write),
 * so a granule in the overlay is always whole.
 */
import { mkdtemp, open, rm, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const GRANULE = 4096;
const ZERO_STEP = 1024 * 1024;

export class Overlay {
  /** block → one byte per granule of the block, 1 where the overlay holds the granule. */
  private readonly written = new Map<number, Uint8Array>();
  private queue: Promise<void> = Promise.resolve();
  bytesWritten = 0;

  private constructor(
    private readonly handle: FileHandle,
    readonly size: number,
    readonly blockSize: number,
  ) {}

  static async create(size: number, blockSize: number, dir = tmpdir()): Promise<Overlay> {
    const work = await mkdtemp(join(dir, 'engine-overlay-'));
    try {
      const path = join(work, 'overlay');
      const handle = await open(path, 'w+', 0o600);
      await handle.truncate(size);
      return new Overlay(handle, size, blockSize);
    } finally {
      // Unlinked while open: the data lives as long as the descriptor, and no crash leaves it behind.
      await rm(work, { recursive: true, force: true });
    }
  }

  touches(block: number): boolean {
    return this.written.has(block);
  }

  get blocksTouched(): number {
    return this.written.size;
  }

  /**
   * Fills `target` (the bytes of block `block` from `blockOffset`) with what the overlay holds there,
   * leaving the other bytes as they are.
   */
  async readInto(block: number, blockOffset: number, target: Buffer): Promise<void> {
    const map = this.written.get(block);
    if (!map) return;
    const base = block * this.blockSize;
    let g = Math.floor(blockOffset / GRANULE);
    const lastGranule = Math.floor((blockOffset + target.length - 1) / GRANULE);
    while (g <= lastGranule) {
      if (map[g] !== 1) {
        g += 1;
        continue;
      }
      let end = g;
      while (end + 1 <= lastGranule && map[end + 1] === 1) end += 1;
      const from = Math.max(g * GRANULE, blockOffset);
      const to = Math.min((end + 1) * GRANULE, blockOffset + target.length);
      await this.readFully(target.subarray(from - blockOffset, to - blockOffset), base + from);
      g = end + 1;
    }
  }

  /**
   * Writes `data` at `offset`. `current` reads the export's present content of a range (for partial
   * granules). Writes are serialised: two overlapping read-modify-writes must not interleave.
   */
  write(data: Buffer, offset: number, current: (offset: number, length: number) => Promise<Buffer>): Promise<void> {
    return this.serialised(async () => {
      const start = Math.floor(offset / GRANULE) * GRANULE;
      const end = Math.min(this.size, Math.ceil((offset + data.length) / GRANULE) * GRANULE);
      let whole = data;
      if (start !== offset || end !== offset + data.length) {
        whole = await current(start, end - start);
        data.copy(whole, offset - start);
      }
      await this.writeFully(whole, start);
      this.mark(start, end);
      this.bytesWritten += data.length;
    });
  }

  /** Zeroes a range (WRITE_ZEROES and TRIM), in bounded steps. */
  async zero(offset: number, length: number, current: (offset: number, length: number) => Promise<Buffer>): Promise<void> {
    for (let at = offset; at < offset + length; at += ZERO_STEP) {
      await this.write(Buffer.alloc(Math.min(ZERO_STEP, offset + length - at)), at, current);
    }
  }

  async flush(): Promise<void> {
    await this.serialised(() => this.handle.datasync());
  }

  async close(): Promise<void> {
    await this.queue.catch(() => undefined);
    await this.handle.close();
  }

  private mark(start: number, end: number): void {
    for (let g = start / GRANULE; g < end / GRANULE; g += 1) {
      const offset = g * GRANULE;
      const block = Math.floor(offset / this.blockSize);
      let map = this.written.get(block);
      if (!map) {
        map = new Uint8Array(Math.ceil(this.blockSize / GRANULE));
        this.written.set(block, map);
      }
      map[(offset - block * this.blockSize) / GRANULE] = 1;
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
