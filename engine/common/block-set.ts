/**
 * A set of block numbers whose memory follows the blocks in it, not the disk's size: a bitmap per region
 * of 32768 blocks (4 KiB), allocated when the region gets its first block. A rollback that writes a few
 * blocks of a 64 TiB disk holds a few KiB, where one byte per block would hold 64 MiB (and 16 GiB for a
 * record claiming 1 PiB at 64 KiB blocks).
 */
const REGION_BLOCKS = 32768;

export class BlockSet {
  private readonly regions = new Map<number, Uint8Array>();
  size = 0;

  add(block: number): void {
    const region = Math.floor(block / REGION_BLOCKS);
    let bits = this.regions.get(region);
    if (!bits) this.regions.set(region, (bits = new Uint8Array(REGION_BLOCKS / 8)));
    const at = block - region * REGION_BLOCKS;
    const byte = Math.floor(at / 8);
    const mask = 1 << (at % 8); // a bit within one byte: `at % 8` is below 8, never an offset
    if ((bits[byte]! & mask) === 0) {
      bits[byte] = bits[byte]! | mask;
      this.size += 1;
    }
  }

  has(block: number): boolean {
    const region = Math.floor(block / REGION_BLOCKS);
    const bits = this.regions.get(region);
    if (!bits) return false;
    const at = block - region * REGION_BLOCKS;
    return (bits[Math.floor(at / 8)]! & (1 << (at % 8))) !== 0;
  }

  /** Bytes the bitmaps hold. */
  get memoryBytes(): number {
    return this.regions.size * (REGION_BLOCKS / 8);
  }
}
