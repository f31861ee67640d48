/**
 * Retries, restic-style (internal/backend/retry): a decorator that repeats a call which failed with a
 * transient StorageError (5xx, SlowDown, resets, timeouts, a body cut short, an upload the store found
 * damaged) after an exponential backoff with jitter, and nothing else: a 4xx that means a bug, a denied
 * request, a missing object fail at once. When it gives up, the error says so on one line: the operation,
 * the key, how many attempts over how long, and the last failure.
 *
 * Two cases need more than "call again":
 * - A create-if-absent whose earlier attempt failed transiently may have succeeded all the same (the store
 *   applied the PUT, the answer was lost). If a later attempt then finds the key taken, the object is read
 *   back: the same bytes mean the earlier attempt created it, and the create succeeded; other bytes mean
 *   another writer won, and the caller gets 'exists'. Creators that race for one key must therefore write
 *   distinct bytes (a lease names its holder, a record its id): two identical bodies cannot be told apart.
 * - A listing that breaks midway resumes after the last key it yielded, so every key is still yielded
 *   exactly once.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { isStorageError, isTransient, StorageError } from './storage-error.js';
import { interruptedError, type CallOptions, type GetOptions, type ListOptions, type ObjectInfo, type PutOptions, type PutSource, type Storage, type StoreTime } from './storage.js';

export interface RetryPolicy {
  /** Attempts in all, the first included. */
  attempts: number;
  /** The first pause; each later one doubles, up to `maxDelayMs`. */
  baseDelayMs: number;
  maxDelayMs: number;
  /** No new attempt starts after this long since the first. */
  maxElapsedMs: number;
}

/**
 * A night's backup rides out a store that is down for about a minute (a gateway restart, a storm of
 * SlowDown): 10 attempts, pauses doubling from 0.2 s to 20 s (about a minute in all), within 3 minutes.
 */
export const DEFAULT_RETRY_POLICY: RetryPolicy = { attempts: 10, baseDelayMs: 200, maxDelayMs: 20_000, maxElapsedMs: 180_000 };

export interface RetryEvents {
  /** Called before each pause: what failed, which attempt, how long the pause. */
  onRetry?: (operation: string, key: string, error: StorageError, attempt: number, delayMs: number) => void;
}

/** The pause before attempt n + 1 (n >= 1): half of the exponential step, plus up to as much again at random ("equal jitter"). */
export function backoffDelay(policy: RetryPolicy, attempt: number, random: () => number = Math.random): number {
  const step = Math.min(policy.maxDelayMs, policy.baseDelayMs * 2 ** Math.min(attempt - 1, 30));
  return step / 2 + random() * (step / 2);
}

function sleep(ms: number, signal: AbortSignal | undefined): Promise<boolean> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve(false);
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve(true);
    }, ms);
    const onAbort = (): void => {
      clearTimeout(timer);
      resolve(false);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

async function sameBytes(source: PutSource, stored: Buffer): Promise<boolean> {
  if (source instanceof Uint8Array) return Buffer.compare(Buffer.from(source.buffer, source.byteOffset, source.byteLength), stored) === 0;
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(source.file)) hash.update(chunk as Buffer);
  return hash.digest().equals(createHash('sha256').update(stored).digest());
}

export class RetryingStorage implements Storage {
  readonly time?: (options?: CallOptions) => Promise<StoreTime>;
  readonly sweepAbandoned?: (olderThan: number, options?: CallOptions) => Promise<number>;

  constructor(
    readonly inner: Storage,
    private readonly policy: RetryPolicy = DEFAULT_RETRY_POLICY,
    private readonly events: RetryEvents = {},
  ) {
    const time = inner.time?.bind(inner);
    if (time) this.time = (options: CallOptions = {}) => this.retry('time', '', options.signal, () => time(options));
    // A sweep is repeatable as a whole: what an earlier attempt removed is not found again (the count is the last attempt's).
    const sweep = inner.sweepAbandoned?.bind(inner);
    if (sweep) this.sweepAbandoned = (olderThan: number, options: CallOptions = {}) => this.retry('sweep', '', options.signal, () => sweep(olderThan, options));
  }

  get properties(): Storage['properties'] {
    return this.inner.properties;
  }

  /** Runs `attempt` until it succeeds, fails for good, or the policy is spent (also for a backend's own calls, as S3's opening check). */
  async retry<T>(operation: string, key: string, signal: AbortSignal | undefined, attempt: (n: number, lastError: StorageError | undefined) => Promise<T>): Promise<T> {
    const started = performance.now();
    let lastError: StorageError | undefined;
    for (let n = 1; ; n += 1) {
      try {
        return await attempt(n, lastError);
      } catch (error) {
        if (!isTransient(error)) throw error;
        lastError = error as StorageError;
        const elapsed = performance.now() - started;
        const delay = Math.max(backoffDelay(this.policy, n), lastError.storage.retryAfterMs ?? 0);
        if (n >= this.policy.attempts || elapsed + delay > this.policy.maxElapsedMs) throw this.gaveUp(lastError, n, elapsed);
        this.events.onRetry?.(operation, key, lastError, n, delay);
        if (!(await sleep(delay, signal))) throw interruptedError(this.properties.location, operation, key);
      }
    }
  }

  private gaveUp(last: StorageError, attempts: number, elapsedMs: number): StorageError {
    const seconds = (elapsedMs / 1000).toFixed(1);
    return new StorageError(last.reason, `${last.message} (gave up after ${attempts} attempts over ${seconds} s)`, { ...last.storage, attempts }, { transient: false, cause: last });
  }

  put(key: string, source: PutSource, options: PutOptions = {}): Promise<void> {
    return this.retry('put', key, options.signal, async (_n, lastError) => {
      try {
        await this.inner.put(key, source, options);
      } catch (error) {
        // An earlier attempt may have created the object before its answer was lost.
        if (options.ifAbsent && lastError !== undefined && isStorageError(error, 'exists')) {
          let stored: Buffer | undefined;
          try {
            stored = await this.inner.get(key, { signal: options.signal });
          } catch (readError) {
            // Not knowing is not losing: a transient failure of the read-back is retried like the create.
            if (isTransient(readError)) throw readError;
          }
          if (stored && (await sameBytes(source, stored))) return;
        }
        throw error;
      }
    });
  }

  get(key: string, options: GetOptions = {}): Promise<Buffer> {
    return this.retry('get', key, options.signal, () => this.inner.get(key, options));
  }

  stat(key: string, options: CallOptions = {}): Promise<ObjectInfo> {
    return this.retry('stat', key, options.signal, () => this.inner.stat(key, options));
  }

  delete(key: string, options: CallOptions = {}): Promise<void> {
    return this.retry('delete', key, options.signal, () => this.inner.delete(key, options));
  }

  async *list(prefix: string, options: ListOptions = {}): AsyncIterable<ObjectInfo> {
    let after = options.startAfter;
    // The budget counts from the first failure since the listing last made progress.
    let started = performance.now();
    let failures = 0;
    for (;;) {
      try {
        for await (const info of this.inner.list(prefix, { ...options, startAfter: after })) {
          after = info.key;
          if (failures > 0) {
            failures = 0;
            started = performance.now();
          }
          yield info;
        }
        return;
      } catch (error) {
        if (!isTransient(error)) throw error;
        if (failures === 0) started = performance.now();
        failures += 1;
        const last = error as StorageError;
        const elapsed = performance.now() - started;
        const delay = Math.max(backoffDelay(this.policy, failures), last.storage.retryAfterMs ?? 0);
        if (failures >= this.policy.attempts || elapsed + delay > this.policy.maxElapsedMs) throw this.gaveUp(last, failures, elapsed);
        this.events.onRetry?.('list', prefix, last, failures, delay);
        if (!(await sleep(delay, options.signal))) throw interruptedError(this.properties.location, 'list', prefix);
      }
    }
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
