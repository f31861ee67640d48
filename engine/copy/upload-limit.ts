/**
 * `--limit-upload RATE`: a token bucket over the bytes sent to the target (SPEC.md 22.6). The bucket holds
 * at most one second of the rate; a frame larger than what it holds (a 1 MiB block under a 64 KiB/s limit)
 * is let through once the debt it makes is paid back, so any frame passes and the average stays the rate.
 * The clock and the sleep are given, so that a test counts bytes against a clock it moves itself.
 */
export interface Clock {
  now(): number;
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

export const realClock: Clock = {
  now: () => performance.now(),
  sleep: (ms, signal) =>
    new Promise<void>((resolve) => {
      if (signal?.aborted) return resolve();
      // An interruption wakes the sleeper at once: the caller's next check throws.
      const done = (): void => {
        clearTimeout(timer);
        signal?.removeEventListener('abort', done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      signal?.addEventListener('abort', done, { once: true });
    }),
};

export class UploadLimit {
  private tokens: number;
  private last: number;
  /** Every byte passed through `take`, exactly. */
  bytesTaken = 0;
  /** Milliseconds `take` waited, summed (by the given clock). */
  waitedMs = 0;
  private queue: Promise<void> = Promise.resolve();

  constructor(
    /** Bytes per second, more than 0. */
    readonly rate: number,
    private readonly clock: Clock = realClock,
    private readonly signal?: AbortSignal,
  ) {
    if (!(rate > 0)) throw new Error('an upload limit needs a rate above 0');
    // Start empty: the first second is not a burst above the rate.
    this.tokens = 0;
    this.last = clock.now();
  }

  /** Resolves when `bytes` may be sent; callers queue in order, so concurrent senders share the rate. */
  take(bytes: number): Promise<void> {
    const turn = this.queue.then(() => this.pass(bytes));
    this.queue = turn.catch(() => undefined);
    return turn;
  }

  private async pass(bytes: number): Promise<void> {
    this.refill();
    this.tokens -= bytes;
    this.bytesTaken += bytes;
    if (this.tokens < 0) {
      const ms = Math.ceil((-this.tokens * 1000) / this.rate);
      this.waitedMs += ms;
      await this.clock.sleep(ms, this.signal);
      this.refill();
    }
  }

  private refill(): void {
    const now = this.clock.now();
    this.tokens = Math.min(this.rate, this.tokens + ((now - this.last) * this.rate) / 1000);
    this.last = now;
  }
}
