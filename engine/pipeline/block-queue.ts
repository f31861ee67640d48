/**
 * The FIFO between a disk's reader and its assembler (backup-disk.ts). It is bounded by item count, not
 * by the slots the items hold: a zero run or an unchanged span holds no slot, so without a bound an
 * incremental whose dirty ranges are all holes (after an fstrim) would queue one item per range, without
 * limit. `push` waits while `limit` items are queued; `shift` waits for the next item or the end.
 */
export class BlockQueue<T> {
  private readonly items: T[] = [];
  private consumer: (() => void) | undefined;
  private readonly producers: (() => void)[] = [];
  private ended = false;

  constructor(readonly limit: number) {
    if (!Number.isInteger(limit) || limit < 1) throw new RangeError(`queue limit ${limit}: must be a whole number ≥ 1`);
  }

  /** Queues `item` once fewer than `limit` are queued; after `end` (a failure) it is dropped at once. */
  async push(item: T): Promise<void> {
    while (this.items.length >= this.limit && !this.ended) await new Promise<void>((resolve) => this.producers.push(resolve));
    if (this.ended) return;
    this.items.push(item);
    this.wakeConsumer();
  }

  /** No more items: the consumer drains what is queued, then gets undefined; waiting producers go on. */
  end(): void {
    this.ended = true;
    this.wakeConsumer();
    this.wakeProducers();
  }

  get isEmpty(): boolean {
    return this.items.length === 0;
  }

  get length(): number {
    return this.items.length;
  }

  async shift(): Promise<T | undefined> {
    while (this.items.length === 0 && !this.ended) await new Promise<void>((resolve) => (this.consumer = resolve));
    const item = this.items.shift();
    this.wakeProducers();
    return item;
  }

  private wakeConsumer(): void {
    const consumer = this.consumer;
    this.consumer = undefined;
    consumer?.();
  }

  private wakeProducers(): void {
    for (const producer of this.producers.splice(0)) producer();
  }
}
