/**
 * The decorators in the order a backend wants them (restic's: retry outside the concurrency limit): a
 * retry pauses without holding a slot, and each attempt queues again behind calls that are already waiting.
 * Fault injection (tests) goes innermost, where a real store's failures happen.
 */
import { LimitedStorage, type LimitOptions } from './limit.js';
import { DEFAULT_RETRY_POLICY, RetryingStorage, type RetryEvents, type RetryPolicy } from './retry.js';
import type { Storage } from './storage.js';

export interface StackOptions {
  retry?: RetryPolicy | undefined;
  events?: RetryEvents | undefined;
  limit?: LimitOptions | undefined;
}

export function withRetriesAndLimit(backend: Storage, options: StackOptions = {}): RetryingStorage {
  return new RetryingStorage(new LimitedStorage(backend, options.limit), options.retry ?? DEFAULT_RETRY_POLICY, options.events);
}
