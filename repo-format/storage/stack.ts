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

/**
 * For the tests only, like ENGINE_CRASH_AT: ENGINE_TEST_RETRY_BASE_MS=n starts the pauses at n ms instead of
 * 200 (the longest pause and the time limit scaled alike), so that a test of a store down for longer than
 * the budget gives up after the same 10 attempts in seconds rather than a minute.
 */
function defaultPolicy(): RetryPolicy {
  const base = Number(process.env.ENGINE_TEST_RETRY_BASE_MS);
  if (!Number.isSafeInteger(base) || base <= 0) return DEFAULT_RETRY_POLICY;
  const scale = base / DEFAULT_RETRY_POLICY.baseDelayMs;
  return { ...DEFAULT_RETRY_POLICY, baseDelayMs: base, maxDelayMs: DEFAULT_RETRY_POLICY.maxDelayMs * scale, maxElapsedMs: DEFAULT_RETRY_POLICY.maxElapsedMs * scale };
}

export function withRetriesAndLimit(backend: Storage, options: StackOptions = {}): RetryingStorage {
  return new RetryingStorage(new LimitedStorage(backend, options.limit), options.retry ?? defaultPolicy(), options.events);
}
