/**
 * Walks a source's extent map alongside the pipeline's block order and answers "does this block read as
 * zeros?" without reading it. Extents are consumed lazily, so memory stays flat for any disk size.
 */
import type { Extent } from '../sources/source.js';

export class ZeroExtentCursor {
  private readonly iterator: AsyncIterator<Extent>;
  private current: Extent | undefined;
  private done = false;

  constructor(extents: AsyncIterable<Extent>) {
    this.iterator = extents[Symbol.asyncIterator]();
  }

  /**
   * The answer of isZero when the extent at hand gives it without asking the source for more, else
   * undefined: the common case of a long extent, answered without a promise per block.
   */
  known(offset: number, length: number): boolean | undefined {
    const extent = this.current;
    if (!extent || extent.offset > offset || extent.offset + extent.length <= offset) return undefined;
    if (!extent.zero) return false;
    return extent.offset + extent.length >= offset + length ? true : undefined;
  }

  /**
   * Where the zeros that cover [offset, offset + length) end: the end of the zero extent in which the range
   * ends, or `offset` when some byte of it is not known to read as zeros. A caller takes every whole block up
   * to there in one step, so a hole costs one step per extent, not one per block.
   */
  async zeroEnd(offset: number, length: number): Promise<number> {
    if (!(this.known(offset, length) ?? (await this.isZero(offset, length)))) return offset;
    const extent = this.current!;
    return extent.offset + extent.length;
  }

  /** True when [offset, offset + length) lies entirely in zero extents. Offsets must not go backwards. */
  async isZero(offset: number, length: number): Promise<boolean> {
    let at = offset;
    const end = offset + length;
    while (at < end) {
      while (!this.done && (!this.current || this.current.offset + this.current.length <= at)) {
        const next = await this.iterator.next();
        if (next.done) this.done = true;
        else this.current = next.value;
      }
      const extent = this.current;
      if (!extent || extent.offset > at || extent.offset + extent.length <= at || !extent.zero) return false;
      at = extent.offset + extent.length;
    }
    return true;
  }
}
