/**
 * A disk cut into fixed-size blocks (SPEC.md, section 8): how many blocks, where block b starts, how long it
 * is (every block is `blockSize` bytes but the last, which holds what remains), which blocks a byte range
 * touches. Every reader and writer of a map, a source or a target counts blocks here, so that the last
 * short block is handled the same way everywhere.
 *
 * Plain arithmetic on safe integers: no bitwise operator (they cut at 2^32). Division through floating point
 * is exact here: a quotient of safe integers lies at least 1/blockSize from the next integer, more than half
 * a unit in the last place of any quotient below 2^53/blockSize, so floor and ceil never round across one
 * (test/disk-geometry.test.ts checks this against BigInt arithmetic up to 2^53).
 */

/** Number of blocks of a disk of `size` bytes: ceil(size / blockSize). */
export function blockCount(size: number, blockSize: number): number {
  return Math.ceil(size / blockSize);
}

/** The block holding byte `offset`. */
export function blockAt(offset: number, blockSize: number): number {
  return Math.floor(offset / blockSize);
}

/** The first byte of block `block`. */
export function blockOffset(block: number, blockSize: number): number {
  return block * blockSize;
}

export class DiskGeometry {
  readonly blocks: number;

  constructor(
    readonly size: number,
    readonly blockSize: number,
  ) {
    if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`disk size ${size} is not a whole number of bytes`);
    if (!Number.isSafeInteger(blockSize) || blockSize <= 0) throw new RangeError(`block size ${blockSize} is not a positive whole number`);
    this.blocks = blockCount(size, blockSize);
  }

  /** The first byte of block `block`. */
  offsetOf(block: number): number {
    return blockOffset(block, this.blockSize);
  }

  /** Bytes of block `block`: `blockSize`, or what remains of the disk for the last one. */
  lengthOf(block: number): number {
    return Math.min(this.blockSize, this.size - this.offsetOf(block));
  }

  /** Bytes of blocks [first, first + count): whole blocks, the last block of the disk as short as it is. */
  bytesOf(first: number, count: number): number {
    if (count <= 0) return 0;
    return Math.min(this.offsetOf(first + count), this.size) - this.offsetOf(first);
  }

  /** The block holding byte `offset`. */
  blockAt(offset: number): number {
    return blockAt(offset, this.blockSize);
  }

  /**
   * The blocks a byte range touches, as [first, end), clipped to the disk: a range past the end touches
   * nothing, an empty one nothing either.
   */
  blocksTouched(offset: number, length: number): { first: number; end: number } {
    if (length <= 0 || offset >= this.size) return { first: 0, end: 0 };
    const first = this.blockAt(offset);
    const end = Math.min(this.blocks, this.blockAt(offset + length - 1) + 1);
    return { first, end };
  }
}
