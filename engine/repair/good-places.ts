/**
 * The offsets of the good frames of every pack, 8 bytes per frame (a Float64Array per pack, in the
 * increasing order the walk finds them): repair asks, for each entry of the old index, whether a good
 * frame sits where it points.
 */
export class GoodPlaces {
  private readonly byPack = new Map<string, Float64Array>();

  /** `offsets`: increasing, as a pack walk finds its frames. */
  addPack(packId: string, offsets: readonly number[]): void {
    this.byPack.set(packId, Float64Array.from(offsets));
  }

  has(packId: string, offset: number): boolean {
    const offsets = this.byPack.get(packId);
    if (!offsets) return false;
    let low = 0;
    let high = offsets.length - 1;
    while (low <= high) {
      const mid = Math.floor((low + high) / 2);
      const value = offsets[mid]!;
      if (value === offset) return true;
      if (value < offset) low = mid + 1;
      else high = mid - 1;
    }
    return false;
  }
}
