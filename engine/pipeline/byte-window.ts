/**
 * The bytes a reader keeps in flight at a server: `take` waits until `bytes` more fit under the limit, `give`
 * returns them as each reply lands, so the reader sends the next request at once (a constant depth, as
 * nbdcopy keeps, never batches that drain before the next is sent). After `fail`, every take rejects.
 */
export class ByteWindow {
  private used = 0;
  private readonly waiters: { bytes: number; resolve: () => void; reject: (error: unknown) => void }[] = [];
  private failure: unknown;

  constructor(readonly limit: number) {
    if (!Number.isInteger(limit) || limit < 1) throw new RangeError(`window of ${limit} bytes: must be a whole number ≥ 1`);
  }

  get inFlight(): number {
    return this.used;
  }

  /** Waits until `bytes` more fit (a take larger than the limit waits for an empty window), in order of asking. */
  take(bytes: number): Promise<void> {
    if (this.failure !== undefined) return Promise.reject(this.failure);
    if (this.waiters.length === 0 && this.fits(bytes)) {
      this.add(bytes);
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => this.waiters.push({ bytes, resolve, reject }));
  }

  give(bytes: number): void {
    this.used -= bytes;
    for (let waiter = this.waiters[0]; waiter && this.fits(waiter.bytes); waiter = this.waiters[0]) {
      this.waiters.shift();
      this.add(waiter.bytes);
      waiter.resolve();
    }
  }

  fail(error: unknown): void {
    this.failure ??= error;
    for (const waiter of this.waiters.splice(0)) waiter.reject(error);
  }

  private fits(bytes: number): boolean {
    return this.used === 0 || this.used + bytes <= this.limit;
  }

  private add(bytes: number): void {
    this.used += bytes;
  }
}
