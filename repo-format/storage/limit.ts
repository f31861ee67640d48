/**
 * A concurrency limit, restic-style (internal/backend/sema): at most `limit` calls run on the backend at
 * once; the others wait in order of arrival. Keys the caller marks as exempt (leases: a lease refresh must
 * never queue behind a minute of pack uploads, or the lease expires) bypass the limit. A listing holds a
 * slot only while it fetches, never while its consumer works on what it yielded.
 */
import { interruptedError, type CallOptions, type GetOptions, type ListOptions, type ObjectInfo, type PutOptions, type PutSource, type Storage, type StoreTime } from './storage.js';

export class Semaphore {
  private running = 0;
  private readonly waiting: (() => void)[] = [];

  constructor(readonly limit: number) {
    if (!Number.isSafeInteger(limit) || limit < 1) throw new RangeError(`a concurrency limit is at least 1, not ${limit}`);
  }

  /** Resolves with true once a slot is held, or false when the signal fires first (no slot held then). */
  acquire(signal?: AbortSignal): Promise<boolean> {
    if (signal?.aborted) return Promise.resolve(false);
    if (this.running < this.limit) {
      this.running += 1;
      return Promise.resolve(true);
    }
    return new Promise((resolve) => {
      const grant = (): void => {
        signal?.removeEventListener('abort', onAbort);
        this.running += 1;
        resolve(true);
      };
      const onAbort = (): void => {
        const index = this.waiting.indexOf(grant);
        if (index >= 0) this.waiting.splice(index, 1);
        resolve(false);
      };
      this.waiting.push(grant);
      signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  release(): void {
    this.running -= 1;
    this.waiting.shift()?.();
  }

  get active(): number {
    return this.running;
  }

  get queued(): number {
    return this.waiting.length;
  }
}

export interface LimitOptions {
  /** Default: the backend's `properties.connections`. */
  limit?: number;
  /** Keys that never wait (leases). */
  exempt?: (key: string) => boolean;
}

export class LimitedStorage implements Storage {
  readonly semaphore: Semaphore;
  private readonly exempt: (key: string) => boolean;
  /** Reading the store's clock never queues (a lease check measures it; a wait would distort it). */
  readonly time?: (options?: CallOptions) => Promise<StoreTime>;
  /** A sweep makes its requests one after another: it holds one slot throughout. */
  readonly sweepAbandoned?: (olderThan: number, options?: CallOptions) => Promise<number>;

  constructor(
    readonly inner: Storage,
    options: LimitOptions = {},
  ) {
    this.semaphore = new Semaphore(options.limit ?? inner.properties.connections);
    this.exempt = options.exempt ?? (() => false);
    const time = inner.time?.bind(inner);
    if (time) this.time = time;
    const sweep = inner.sweepAbandoned?.bind(inner);
    if (sweep) this.sweepAbandoned = (olderThan: number, options: CallOptions = {}) => this.limited('sweep', '', options.signal, () => sweep(olderThan, options));
  }

  get properties(): Storage['properties'] {
    return this.inner.properties;
  }

  private async limited<T>(operation: string, key: string, signal: AbortSignal | undefined, call: () => Promise<T>): Promise<T> {
    if (this.exempt(key)) return call();
    if (!(await this.semaphore.acquire(signal))) throw interruptedError(this.properties.location, operation, key);
    try {
      return await call();
    } finally {
      this.semaphore.release();
    }
  }

  put(key: string, source: PutSource, options: PutOptions = {}): Promise<void> {
    return this.limited('put', key, options.signal, () => this.inner.put(key, source, options));
  }

  get(key: string, options: GetOptions = {}): Promise<Buffer> {
    return this.limited('get', key, options.signal, () => this.inner.get(key, options));
  }

  stat(key: string, options: CallOptions = {}): Promise<ObjectInfo> {
    return this.limited('stat', key, options.signal, () => this.inner.stat(key, options));
  }

  delete(key: string, options: CallOptions = {}): Promise<void> {
    return this.limited('delete', key, options.signal, () => this.inner.delete(key, options));
  }

  async *list(prefix: string, options: ListOptions = {}): AsyncIterable<ObjectInfo> {
    const iterator = this.inner.list(prefix, options)[Symbol.asyncIterator]();
    try {
      for (;;) {
        const next = await this.limited('list', prefix, options.signal, () => iterator.next());
        if (next.done) return;
        yield next.value;
      }
    } finally {
      await iterator.return?.();
    }
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
