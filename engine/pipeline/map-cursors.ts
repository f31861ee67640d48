/**
 * A cursor that walks, in block order, what an incremental backup needs besides the source and the parent's
 * map (block-map.ts, MapPageReader): the dirty extents (which blocks changed). It consumes them lazily, so
 * memory stays flat whatever the disk size.
 */
import { blockAt, blockOffset } from '../../repo-format/disk-geometry.js';

export interface Range {
  offset: number;
  length: number;
}

export class DirtyCursor {
  private readonly iterator: AsyncIterator<Range>;
  private current: Range | undefined;
  private done = false;

  constructor(dirty: AsyncIterable<Range>) {
    this.iterator = dirty[Symbol.asyncIterator]();
  }

  /** The first block at or after `fromBlock` that any dirty byte touches, or `blockCount` if none. */
  async nextDirtyBlock(fromBlock: number, blockSize: number, blockCount: number): Promise<number> {
    const from = blockOffset(fromBlock, blockSize);
    while (!this.done && (!this.current || this.current.offset + this.current.length <= from)) {
      const next = await this.iterator.next();
      if (next.done) this.done = true;
      else this.current = next.value;
    }
    if (!this.current || this.current.offset + this.current.length <= from) return blockCount;
    return Math.min(blockCount, Math.max(fromBlock, blockAt(this.current.offset, blockSize)));
  }

  /** The block after the last one the dirty range at hand touches (the one nextDirtyBlock last found). */
  touchedEnd(blockSize: number, blockCount: number): number {
    if (!this.current) return blockCount;
    return Math.min(blockCount, Math.ceil((this.current.offset + this.current.length) / blockSize));
  }
}

/** The ranges of `stream` and of `extra` (sorted by offset), in order of offset: what DirtyCursor walks. */
export async function* mergeRanges(stream: AsyncIterable<Range>, extra: readonly Range[]): AsyncGenerator<Range> {
  let next = 0;
  for await (const range of stream) {
    while (next < extra.length && extra[next]!.offset < range.offset) yield extra[next++]!;
    yield range;
  }
  while (next < extra.length) yield extra[next++]!;
}