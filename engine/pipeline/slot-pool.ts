/**
 * A fixed set of slot numbers handed out and returned; `acquire` waits when all are taken. This is the
 * pipeline's backpressure: the reader cannot run further ahead than the slots allow, so memory is
 * slotCount × block size whatever the disk size.
 */
export class SlotPool {
  private readonly free: number[];
  /** Waiting acquirers, served strictly in order: a reader of a run is never overtaken by later, smaller asks. */
  private readonly waiters: { count: number; resolve: (slots: number[]) => void; reject: (error: unknown) => void }[] = [];
  private failure: unknown;

  /** `numbers`: the slots' numbers when they are not 0 to count - 1 (a job's lease of a shared arena, shared-pool.ts). */
  constructor(readonly count: number, numbers?: readonly number[]) {
    this.free = numbers ? [...numbers].reverse() : Array.from({ length: count }, (_, i) => count - 1 - i);
  }

  get available(): number {
    return this.free.length;
  }

  async acquire(): Promise<number> {
    const [slot] = await this.acquireMany(1);
    return slot!;
  }

  /** `count` slots at once (at most the pool's size), waiting until that many are free; none is held while it waits. */
  acquireMany(count: number): Promise<number[]> {
    if (this.failure !== undefined) return Promise.reject(this.failure);
    if (count < 1 || count > this.count) return Promise.reject(new RangeError(`${count} slots asked of a pool of ${this.count}`));
    if (this.waiters.length === 0 && this.free.length >= count) return Promise.resolve(this.free.splice(this.free.length - count, count));
    return new Promise((resolve, reject) => this.waiters.push({ count, resolve, reject }));
  }

  /** `count` slots at once, or none (undefined) when fewer are free: a reader of several blocks never holds part of them while it waits. */
  tryAcquire(count: number): number[] | undefined {
    if (this.failure !== undefined) throw this.failure;
    if (this.waiters.length > 0 || this.free.length < count) return undefined;
    return this.free.splice(this.free.length - count, count);
  }

  release(slot: number): void {
    this.free.push(slot);
    for (let waiter = this.waiters[0]; waiter && this.free.length >= waiter.count; waiter = this.waiters[0]) {
      this.waiters.shift();
      waiter.resolve(this.free.splice(this.free.length - waiter.count, waiter.count));
    }
  }

  /** Fails every current and future acquire (the pipeline is shutting down after an error). */
  fail(error: unknown): void {
    this.failure = error;
    for (const waiter of this.waiters.splice(0)) waiter.reject(error);
  }
}
