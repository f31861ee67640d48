/**
 * A fixed set of slot numbers handed out and returned; `acquire` waits when all are taken. This is the
 * pipeline's backpressure: the reader cannot run further ahead than the slots allow, so memory is
 * slotCount × block size whatever the disk size.
 */
export class SlotPool {
  private readonly free: number[];
  private readonly waiters: { resolve: (slot: number) => void; reject: (error: unknown) => void }[] = [];
  private failure: unknown;

  constructor(readonly count: number) {
    this.free = Array.from({ length: count }, (_, i) => count - 1 - i);
  }

  get available(): number {
    return this.free.length;
  }

  acquire(): Promise<number> {
    if (this.failure !== undefined) return Promise.reject(this.failure);
    const slot = this.free.pop();
    if (slot !== undefined) return Promise.resolve(slot);
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  /** `count` slots at once, or none (undefined) when fewer are free: a reader of several blocks never holds part of them while it waits. */
  tryAcquire(count: number): number[] | undefined {
    if (this.failure !== undefined) throw this.failure;
    if (this.free.length < count) return undefined;
    return this.free.splice(this.free.length - count, count);
  }

  release(slot: number): void {
    const waiter = this.waiters.shift();
    if (waiter) waiter.resolve(slot);
    else this.free.push(slot);
  }

  /** Fails every current and future acquire (the pipeline is shutting down after an error). */
  fail(error: unknown): void {
    this.failure = error;
    for (const waiter of this.waiters.splice(0)) waiter.reject(error);
  }
}
