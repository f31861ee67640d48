/**
 * A compact set of blob ids, keyed by their first 8 bytes: 8 bytes per id instead of ~100 for a Set of
 * hex strings, so verify can mark every referenced chunk of a large repository. Two ids sharing 64-bit
 * prefixes is a 2^-64 event per pair, and errs one way only: `has` may say yes for an id never added, never
 * no for one that was. gc marks live blobs with it, so a collision keeps a dead blob; it never deletes a live one.
 */
export class IdPrefixSet {
  private values = new BigUint64Array(1024);
  private length = 0;
  private sorted = true;

  /** Adds an id; adding one that is already present costs 8 bytes until the next compaction. */
  add(id: Buffer): void {
    if (this.length === this.values.length) {
      this.compact();
      if (this.length > this.values.length / 2) {
        const grown = new BigUint64Array(this.values.length * 2);
        grown.set(this.values.subarray(0, this.length));
        this.values = grown;
      }
    }
    this.values[this.length] = id.readBigUInt64BE(0);
    this.length += 1;
    this.sorted = false;
  }

  has(id: Buffer): boolean {
    this.compact();
    const key = id.readBigUInt64BE(0);
    let low = 0;
    let high = this.length - 1;
    while (low <= high) {
      const mid = Math.floor((low + high) / 2);
      const value = this.values[mid]!;
      if (value === key) return true;
      if (value < key) low = mid + 1;
      else high = mid - 1;
    }
    return false;
  }

  get size(): number {
    this.compact();
    return this.length;
  }

  /** Sorts and drops duplicates, in place: amortised O(n log n) over all adds. */
  private compact(): void {
    if (this.sorted) return;
    const view = this.values.subarray(0, this.length);
    view.sort();
    let kept = 0;
    for (let i = 0; i < view.length; i += 1) {
      if (kept === 0 || view[i] !== view[kept - 1]) view[kept++] = view[i]!;
    }
    this.length = kept;
    this.sorted = true;
  }
}
