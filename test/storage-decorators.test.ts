/**
 * The decorators on the in-memory backend, where each behaviour can be provoked exactly: the concurrency
 * limit (bounded, in order, exempt keys never wait, a listing holds a slot only while it fetches, an abort
 * while queued frees nothing it did not take), retries (transient only, a listing resumed where it broke,
 * a create whose answer was lost, giving up on one line, an abort during the pause) and fault injection.
 * The contract over every backend, decorated ones included, is test/storage-conformance.test.ts.
 */
import { expect, test } from 'vitest';
import { FaultInjectingStorage, injectedFailure } from '../dist/repo-format/storage/faults.js';
import { LimitedStorage } from '../dist/repo-format/storage/limit.js';
import { MemoryStorage } from '../dist/repo-format/storage/memory.js';
import { RetryingStorage } from '../dist/repo-format/storage/retry.js';
import { StorageError } from '../dist/repo-format/storage/storage-error.js';
import type { GetOptions, Storage } from '../dist/repo-format/storage/storage.js';

const QUICK = { attempts: 5, baseDelayMs: 1, maxDelayMs: 5, maxElapsedMs: 10_000 };

/** A memory storage whose gets take `ms` and count how many run at once. */
class SlowStorage extends MemoryStorage {
  running = 0;
  peak = 0;
  order: string[] = [];
  constructor(private readonly ms: number) {
    super('slow');
  }
  override async get(key: string, options?: GetOptions): Promise<Buffer> {
    this.running += 1;
    this.peak = Math.max(this.peak, this.running);
    this.order.push(key);
    try {
      await new Promise((resolve) => setTimeout(resolve, this.ms));
      return await super.get(key, options);
    } finally {
      this.running -= 1;
    }
  }
}

test('the limit: never more than N calls at once, served in order of arrival; exempt keys pass a full queue', async () => {
  const slow = new SlowStorage(20);
  for (let i = 0; i < 12; i += 1) await slow.put(`packs/${i}`, Buffer.from([i]));
  await slow.put('leases/l', Buffer.from('lease'));
  const limited = new LimitedStorage(slow, { limit: 3, exempt: (key) => key.startsWith('leases/') });
  const gets = Array.from({ length: 12 }, (_, i) => limited.get(`packs/${i}`));
  await new Promise((resolve) => setTimeout(resolve, 5));
  expect(limited.semaphore.active).toBe(3);
  expect(limited.semaphore.queued).toBe(9);
  // The lease read does not wait behind nine queued pack reads.
  const lease = limited.get('leases/l');
  await new Promise((resolve) => setTimeout(resolve, 5));
  expect(slow.running).toBe(4);
  expect((await lease).toString()).toBe('lease');
  await Promise.all(gets);
  expect(slow.peak).toBe(4);
  expect(slow.order.filter((key) => key.startsWith('packs/'))).toEqual(Array.from({ length: 12 }, (_, i) => `packs/${i}`));
  expect(limited.semaphore.active).toBe(0);
});

test('the limit: a call aborted while queued ends with ENGINE_INTERRUPTED and takes no slot', async () => {
  const slow = new SlowStorage(30);
  await slow.put('a', Buffer.from('a'));
  const limited = new LimitedStorage(slow, { limit: 1 });
  const first = limited.get('a');
  const controller = new AbortController();
  const queued = limited.get('a', { signal: controller.signal });
  controller.abort();
  await expect(queued).rejects.toMatchObject({ code: 'ENGINE_INTERRUPTED' });
  await first;
  expect(limited.semaphore.active).toBe(0);
  expect(limited.semaphore.queued).toBe(0);
});

test('the limit: a listing holds a slot only while it fetches a page, not while its consumer works', async () => {
  const memory = new MemoryStorage();
  for (let i = 0; i < 2500; i += 1) await memory.put(`index/${String(i).padStart(4, '0')}`, Buffer.from('x'));
  const limited = new LimitedStorage(memory, { limit: 1 });
  let seen = 0;
  for await (const info of limited.list('index/')) {
    seen += 1;
    if (info.key === 'index/0500') {
      // Mid-listing, the one slot is free for other calls.
      expect(limited.semaphore.active).toBe(0);
      expect((await limited.get('index/0001')).toString()).toBe('x');
    }
  }
  expect(seen).toBe(2500);
});

test('retries: transient failures are repeated until the call succeeds; a final one is not repeated', async () => {
  const faulty = new FaultInjectingStorage(new MemoryStorage(), [{ operation: 'put', times: 3 }]);
  const retrying = new RetryingStorage(faulty, QUICK);
  await retrying.put('config', Buffer.from('c'));
  expect(faulty.injected).toHaveLength(3);
  faulty.addRule({ operation: 'get', error: injectedFailure('denied') });
  const retries: number[] = [];
  const watched = new RetryingStorage(faulty, QUICK, { onRetry: (_op, _key, _error, attempt) => retries.push(attempt) });
  await expect(watched.get('config')).rejects.toMatchObject({ code: 'ENGINE_STORAGE_DENIED' });
  expect(retries).toEqual([]);
  expect(faulty.injected.filter((fault) => fault.operation === 'get')).toHaveLength(1);
});

test('retries: giving up says so on one line, with the attempts, and is no longer transient', async () => {
  const faulty = new FaultInjectingStorage(new MemoryStorage(), [{ operation: 'stat' }]);
  const error = (await new RetryingStorage(faulty, QUICK).stat('x').catch((e: unknown) => e)) as StorageError;
  expect(error).toBeInstanceOf(StorageError);
  expect(error.code).toBe('ENGINE_STORAGE_UNAVAILABLE');
  expect(error.transient).toBe(false);
  expect(error.storage.attempts).toBe(5);
  expect(error.message).toMatch(/gave up after 5 attempts over \d+\.\d s\)$/);
  expect(error.message).not.toContain('\n');
});

test('retries: an abort during the pause between attempts ends the call at once', async () => {
  const faulty = new FaultInjectingStorage(new MemoryStorage(), [{ operation: 'get' }]);
  const retrying = new RetryingStorage(faulty, { attempts: 5, baseDelayMs: 60_000, maxDelayMs: 60_000, maxElapsedMs: 600_000 });
  const controller = new AbortController();
  setTimeout(() => controller.abort(), 20);
  const started = performance.now();
  await expect(retrying.get('x', { signal: controller.signal })).rejects.toMatchObject({ code: 'ENGINE_INTERRUPTED' });
  // Before the 60-s pause would have ended: the abort ended it (no tighter clock bound, which load can break).
  expect(performance.now() - started).toBeLessThan(60_000);
});

test('retries: a listing that breaks midway resumes after the last key it yielded; each key once, in order', async () => {
  const memory = new MemoryStorage();
  const keys = Array.from({ length: 3000 }, (_, i) => `packs/${String(i).padStart(4, '0')}`);
  for (const key of keys) await memory.put(key, Buffer.from('p'));
  const faulty = new FaultInjectingStorage(memory, [
    { operation: 'list', times: 1, afterItems: 999 },
    { operation: 'list', times: 1, afterItems: 1 },
    { operation: 'list', times: 1, afterItems: 0 },
  ]);
  const listed: string[] = [];
  for await (const info of new RetryingStorage(faulty, QUICK).list('packs/')) listed.push(info.key);
  expect(listed).toEqual(keys);
  expect(faulty.injected).toHaveLength(3);
});

test('retries: a create whose answer was lost succeeds on retry; a rival create with other bytes gets exists', async () => {
  const memory = new MemoryStorage();
  const faulty = new FaultInjectingStorage(memory, [{ operation: 'put', when: 'after', times: 2 }]);
  const retrying = new RetryingStorage(faulty, QUICK);
  await retrying.put('backups/a', Buffer.from('mine'), { ifAbsent: true });
  // The rival's first attempt is "lost" after the store refused it: the retry reads back other bytes.
  await memory.put('backups/b', Buffer.from('theirs'));
  await expect(retrying.put('backups/b', Buffer.from('mine'), { ifAbsent: true })).rejects.toMatchObject({ reason: 'exists' });
  expect((await memory.get('backups/a')).toString()).toBe('mine');
  expect((await memory.get('backups/b')).toString()).toBe('theirs');
});

test('retries: when the read-back of a lost create fails transiently, the create is retried, never answered "exists"', async () => {
  const memory = new MemoryStorage();
  const faulty = new FaultInjectingStorage(memory, [
    { operation: 'put', when: 'after', times: 1 },
    { operation: 'get', times: 2 },
  ]);
  await new RetryingStorage(faulty, QUICK).put('leases/x.json', Buffer.from('holder 1'), { ifAbsent: true });
  expect(faulty.injected.map((fault) => fault.operation)).toEqual(['put', 'get', 'get']);
});

test('decorators pass the store clock through when the backend has one, and only then', async () => {
  const memory: Storage = new MemoryStorage();
  expect(new RetryingStorage(new LimitedStorage(memory)).time).toBeUndefined();
  const clocked: Storage = Object.assign(new MemoryStorage(), { time: async () => ({ storeMs: 1, localMs: 2, uncertaintyMs: 3 }) });
  const stacked = new RetryingStorage(new LimitedStorage(new FaultInjectingStorage(clocked)));
  expect(await stacked.time!()).toEqual({ storeMs: 1, localMs: 2, uncertaintyMs: 3 });
});
