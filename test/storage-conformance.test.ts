/**
 * One contract (repo-format/storage/storage.ts, its header), every backend: the same tests run over
 * - memory (the reference),
 * - memory behind the decorators with injected faults (retries must hide every transient failure, and a
 *   create whose answer was lost must still come out right),
 * - S3 on a real Ceph RADOS Gateway this file starts (test/rgw.ts),
 * - S3 through the fault proxy in front of that gateway (503 SlowDown, resets, answers cut short or lost,
 *   slow answers) with the retry decorator: the contract must hold through the faults,
 * - the local folder (repo-format/storage/local.ts).
 * S3 failures of their own (no bucket, wrong credentials, a gateway killed mid-operation) are in
 * test/s3-storage.test.ts.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { randomBytes } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { FaultInjectingStorage } from '../dist/repo-format/storage/faults.js';
import { LocalStorage } from '../dist/repo-format/storage/local.js';
import { MemoryStorage } from '../dist/repo-format/storage/memory.js';
import { withRetriesAndLimit } from '../dist/repo-format/storage/stack.js';
import type { S3Storage } from '../dist/repo-format/storage/s3.js';
import { isStorageError, type StorageFailure } from '../dist/repo-format/storage/storage-error.js';
import type { ObjectInfo, Storage } from '../dist/repo-format/storage/storage.js';
import { startRgwCluster, type RgwCluster } from './rgw.js';
import { startFaultProxy, type FaultProxy } from './s3-fault-proxy.js';
import { createBucket, openRgwBackend, openRgwStorage, rawPut } from './s3-helpers.js';
import { tempDir } from './helpers.js';

/** A backend under test: storages on fresh, empty roots, and ways to reach behind the engine's back. */
interface Backend {
  name: string;
  /** A new, empty root's name. */
  freshRoot(): string;
  /** A storage on `root` (several may be open on one root at once: separate clients, as separate hosts). */
  open(root: string): Promise<Storage>;
  /** Writes bytes under a key, the engine's key rule unchecked (another program's object). */
  putForeign(storage: Storage, root: string, key: string, bytes: Uint8Array): Promise<void>;
  /** Requests sent to the store so far by this storage, where the backend counts them. */
  requests?(storage: Storage): number;
  /** Whether names outside the key rule are listed (storage.ts: S3 and memory yes, the local folder no). */
  listsForeignNames: boolean;
  /** Whether stat and list give `modified` (the local folder's comes with the v3 branch). */
  setsModified: boolean;
}

const QUICK_RETRIES = { attempts: 12, baseDelayMs: 5, maxDelayMs: 200, maxElapsedMs: 60_000 };

let rootCounter = 0;
const nextRoot = (): string => `r${(rootCounter += 1)}`;

/** Memory storages by root: several "open" calls on one root share its objects. */
const memoryRoots = new Map<string, MemoryStorage>();
function memoryRoot(root: string): MemoryStorage {
  let storage = memoryRoots.get(root);
  if (!storage) memoryRoots.set(root, (storage = new MemoryStorage(root)));
  return storage;
}

/** A seeded generator, so that a failing run injects the same faults again. */
function seeded(seed: number): () => number {
  let state = seed;
  return () => {
    state = (state * 1103515245 + 12345) % 2147483648;
    return state / 2147483648;
  };
}

let cluster: RgwCluster | undefined;
let proxy: FaultProxy | undefined;
const BUCKET = 'conformance';
const openStorages: Storage[] = [];
const remember = <T extends Storage>(storage: T): T => {
  openStorages.push(storage);
  return storage;
};
const s3Of = (storage: Storage): S3Storage => ((storage as { inner?: Storage }).inner ? s3Of((storage as unknown as { inner: Storage }).inner) : (storage as S3Storage));

const backends: Backend[] = [
  {
    name: 'memory',
    freshRoot: nextRoot,
    open: async (root) => memoryRoot(root),
    putForeign: async (_storage, root, key, bytes) => memoryRoot(root).putForeign(key, bytes),
    listsForeignNames: true,
    setsModified: true,
  },
  {
    name: 'memory with injected faults behind retries',
    freshRoot: nextRoot,
    open: async (root) => {
      const random = seeded(root.length * 7919 + Number(root.slice(1)));
      const faulty = new FaultInjectingStorage(
        memoryRoot(`faulty-${root}`),
        [
          { probability: 0.15 },
          { operation: 'put', when: 'after', probability: 0.15 },
          { operation: 'list', probability: 0.3, afterItems: 3 },
        ],
        random,
      );
      return withRetriesAndLimit(faulty, { retry: QUICK_RETRIES, limit: { limit: 8 } });
    },
    putForeign: async (_storage, root, key, bytes) => memoryRoot(`faulty-${root}`).putForeign(key, bytes),
    listsForeignNames: true,
    setsModified: true,
  },
  {
    name: 'S3 on RGW',
    freshRoot: nextRoot,
    open: async (root) => remember(await openRgwBackend(cluster!, `s3://${BUCKET}/plain/${root}`)),
    putForeign: (_storage, root, key, bytes) => rawPut(cluster!, BUCKET, `plain/${root}/${key}`, bytes),
    requests: (storage) => s3Of(storage).client.traffic.requests,
    listsForeignNames: true,
    setsModified: true,
  },
  {
    name: 'S3 through the fault proxy, with retries',
    freshRoot: nextRoot,
    open: async (root) => remember(await openRgwStorage(cluster!, `s3://${BUCKET}/proxied/${root}`, { endpoint: proxy!.endpoint, idleTimeoutMs: 2_000, retry: QUICK_RETRIES })),
    putForeign: (_storage, root, key, bytes) => rawPut(cluster!, BUCKET, `proxied/${root}/${key}`, bytes),
    requests: (storage) => s3Of(storage).client.traffic.requests,
    listsForeignNames: true,
    setsModified: true,
  },
];

let localDir: { path: string; cleanup: () => Promise<void> } | undefined;
backends.push({
  name: 'local folder',
  freshRoot: nextRoot,
  open: async (root) => {
    localDir ??= await tempDir('conformance-local-');
    await mkdir(join(localDir.path, root), { recursive: true, mode: 0o700 });
    return new LocalStorage(join(localDir.path, root));
  },
  putForeign: async (storage, _root, key, bytes) => {
    const path = (storage as LocalStorage).pathOf(key.replace(/[^A-Za-z0-9._/-]/g, '_'));
    await mkdir(dirname(path), { recursive: true });
    // Another program's file, or one changed behind the engine's back (as root, a 0400 file is no obstacle).
    await writeFile(join(dirname(path), key.split('/').pop()!), bytes);
  },
  listsForeignNames: false,
  setsModified: false,
});

beforeAll(async () => {
  cluster = await startRgwCluster({ memstoreBytes: 2 * 1024 ** 3 });
  await createBucket(cluster, BUCKET);
  proxy = await startFaultProxy(cluster.endpoint, { seed: 14 });
  // Every request the storage makes may meet one of these; the retry decorator must ride them all out.
  proxy.addRule({ probability: 0.08, action: { kind: 'slowdown' } });
  proxy.addRule({ method: 'PUT', probability: 0.05, action: { kind: 'reset-request', afterBytes: 100 } });
  proxy.addRule({ method: 'PUT', probability: 0.05, action: { kind: 'lose-response' } });
  proxy.addRule({ method: 'GET', probability: 0.05, action: { kind: 'truncate-response', afterBytes: 10 } });
  proxy.addRule({ method: 'GET', probability: 0.03, action: { kind: 'reset-response', afterBytes: 0 } });
  // A slow answer past the client's idle timeout (2 s here): GETs only, so that no PUT given up on by the
  // client reaches the store later and overwrites a newer one (S3 itself gives no order between the two).
  proxy.addRule({ method: 'GET', probability: 0.02, action: { kind: 'delay', ms: 3_000 } });
});

afterAll(async () => {
  for (const storage of openStorages) await storage.close();
  await proxy?.close();
  await cluster?.stop();
  await localDir?.cleanup();
});

/** Resolves with the StorageError reason the call failed with (fails the test if it succeeded). */
async function failure(call: Promise<unknown>): Promise<StorageFailure> {
  try {
    await call;
  } catch (error) {
    if (isStorageError(error)) return error.reason;
    throw error;
  }
  throw new Error('the call succeeded; a failure was expected');
}

/** Keys and sizes of a listing (`modified` has its own test). */
async function collect(iterable: AsyncIterable<ObjectInfo>): Promise<{ key: string; size: number }[]> {
  const items: { key: string; size: number }[] = [];
  for await (const item of iterable) items.push({ key: item.key, size: item.size });
  return items;
}

async function putMany(storage: Storage, keys: string[], bytes: (key: string) => Uint8Array, parallel = 16): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: parallel }, async () => {
      while (next < keys.length) {
        const key = keys[next++]!;
        await storage.put(key, bytes(key));
      }
    }),
  );
}

describe.each(backends)('$name', (backend) => {
  const fresh = async (): Promise<{ root: string; storage: Storage }> => {
    const root = backend.freshRoot();
    return { root, storage: await backend.open(root) };
  };

  test('put then get gives back the bytes, from memory and from a file; an empty object too', async () => {
    const { storage } = await fresh();
    const bytes = randomBytes(300_001);
    await storage.put('packs/ab/one', bytes);
    expect((await storage.get('packs/ab/one')).equals(bytes)).toBe(true);
    const { path, cleanup } = await tempDir();
    try {
      const file = join(path, 'source');
      const fromFile = randomBytes(1024 * 1024 + 3);
      await writeFile(file, fromFile);
      await storage.put('packs/ab/two', { file });
      expect((await storage.get('packs/ab/two')).equals(fromFile)).toBe(true);
    } finally {
      await cleanup();
    }
    await storage.put('empty', new Uint8Array(0));
    expect((await storage.get('empty')).length).toBe(0);
    expect(await storage.stat('empty')).toMatchObject({ key: 'empty', size: 0 });
  });

  test('put replaces an object whole', async () => {
    const { storage } = await fresh();
    await storage.put('leases/a.json', Buffer.from('first, longer version'));
    await storage.put('leases/a.json', Buffer.from('second'));
    expect((await storage.get('leases/a.json')).toString()).toBe('second');
    expect((await storage.stat('leases/a.json')).size).toBe(6);
  });

  test('put ifAbsent creates once; a second create fails with "exists" and the first bytes stay', async () => {
    const { storage } = await fresh();
    await storage.put('backups/b1', Buffer.from('winner'), { ifAbsent: true });
    expect(await failure(storage.put('backups/b1', Buffer.from('loser'), { ifAbsent: true }))).toBe('exists');
    expect((await storage.get('backups/b1')).toString()).toBe('winner');
  });

  test('of 24 concurrent creators of one key on 4 separate clients, exactly one wins and its bytes are stored', async () => {
    const root = backend.freshRoot();
    const clients = await Promise.all([1, 2, 3, 4].map(() => backend.open(root)));
    for (let round = 0; round < 3; round += 1) {
      const key = `leases/race-${round}.json`;
      const outcomes = await Promise.all(
        Array.from({ length: 24 }, async (_, i) => {
          const body = Buffer.from(`creator ${i}`);
          try {
            await clients[i % 4]!.put(key, body, { ifAbsent: true });
            return { i, won: true };
          } catch (error) {
            if (isStorageError(error, 'exists')) return { i, won: false };
            throw error;
          }
        }),
      );
      const winners = outcomes.filter((outcome) => outcome.won);
      expect(winners).toHaveLength(1);
      expect((await clients[0]!.get(key)).toString()).toBe(`creator ${winners[0]!.i}`);
    }
  });

  test('a ranged get answers exactly the bytes asked, anywhere in the object', async () => {
    const { storage } = await fresh();
    const bytes = randomBytes(1024 * 1024 + 17);
    await storage.put('packs/cd/ranged', bytes);
    const ranges = [
      { offset: 0, length: 1 },
      { offset: bytes.length - 1, length: 1 },
      { offset: 65_535, length: 2 },
      { offset: 123_457, length: 500_000 },
      { offset: 0, length: bytes.length },
      { offset: 1, length: bytes.length - 1 },
    ];
    for (const range of ranges) {
      const got = await storage.get('packs/cd/ranged', { range });
      expect(got.length).toBe(range.length);
      expect(got.equals(bytes.subarray(range.offset, range.offset + range.length))).toBe(true);
    }
  });

  test('a range past the end is out-of-range, never a short read', async () => {
    const { storage } = await fresh();
    await storage.put('packs/cd/short', randomBytes(1000));
    expect(await failure(storage.get('packs/cd/short', { range: { offset: 990, length: 11 } }))).toBe('out-of-range');
    expect(await failure(storage.get('packs/cd/short', { range: { offset: 1000, length: 1 } }))).toBe('out-of-range');
    expect(await failure(storage.get('packs/cd/short', { range: { offset: 2 ** 40, length: 4096 } }))).toBe('out-of-range');
    await expect(storage.get('packs/cd/short', { range: { offset: -1, length: 1 } })).rejects.toMatchObject({ code: 'ENGINE_INVALID_ARGUMENT' });
    await expect(storage.get('packs/cd/short', { range: { offset: 0, length: 0 } })).rejects.toMatchObject({ code: 'ENGINE_INVALID_ARGUMENT' });
  });

  test('an object cut short behind the engine\'s back: reads of its old extent fail out-of-range', async () => {
    const { root, storage } = await fresh();
    const bytes = randomBytes(64 * 1024);
    await storage.put('packs/ef/cut', bytes);
    await backend.putForeign(storage, root, 'packs/ef/cut', bytes.subarray(0, 40_000));
    expect(await failure(storage.get('packs/ef/cut', { range: { offset: 39_000, length: 2_000 } }))).toBe('out-of-range');
    expect((await storage.get('packs/ef/cut', { range: { offset: 0, length: 40_000 } })).equals(bytes.subarray(0, 40_000))).toBe(true);
    expect((await storage.stat('packs/ef/cut')).size).toBe(40_000);
  });

  test('a whole-object get refuses an object larger than maxSize', async () => {
    const { storage } = await fresh();
    await storage.put('config', randomBytes(5000));
    expect(await failure(storage.get('config', { maxSize: 4999 }))).toBe('too-large');
    expect((await storage.get('config', { maxSize: 5000 })).length).toBe(5000);
  });

  test('a missing object: get, ranged get and stat are not-found; delete succeeds', async () => {
    const { storage } = await fresh();
    expect(await failure(storage.get('packs/00/missing'))).toBe('not-found');
    expect(await failure(storage.get('packs/00/missing', { range: { offset: 0, length: 10 } }))).toBe('not-found');
    expect(await failure(storage.stat('packs/00/missing'))).toBe('not-found');
    await storage.delete('packs/00/missing');
  });

  test('delete removes the object from reads and listings, and deleting again succeeds', async () => {
    const { storage } = await fresh();
    await storage.put('index/w-1.idx', Buffer.from('x'));
    await storage.put('index/w-2.idx', Buffer.from('y'));
    await storage.delete('index/w-1.idx');
    await storage.delete('index/w-1.idx');
    expect(await failure(storage.stat('index/w-1.idx'))).toBe('not-found');
    expect((await collect(storage.list('index/'))).map((info) => info.key)).toEqual(['index/w-2.idx']);
  });

  test('list: every key under the prefix once, ascending, with sizes; startAfter is exclusive; nothing outside', async () => {
    const { storage } = await fresh();
    const keys = ['packs/0a/p2', 'packs/0a/p1', 'packs/1b/p3', 'packsX', 'index/s1', 'packs/0a/p1.tmp', 'packs/0a-z'];
    for (const [i, key] of keys.entries()) await storage.put(key, randomBytes(i + 1));
    const packs = await collect(storage.list('packs/'));
    expect(packs).toEqual([
      // "-" sorts before "/": the order is the keys' bytes, not a walk of folders.
      { key: 'packs/0a-z', size: 7 },
      { key: 'packs/0a/p1', size: 2 },
      { key: 'packs/0a/p1.tmp', size: 6 },
      { key: 'packs/0a/p2', size: 1 },
      { key: 'packs/1b/p3', size: 3 },
    ]);
    expect((await collect(storage.list('packs'))).map((info) => info.key)).toEqual(['packs/0a-z', 'packs/0a/p1', 'packs/0a/p1.tmp', 'packs/0a/p2', 'packs/1b/p3', 'packsX']);
    expect((await collect(storage.list('packs/', { startAfter: 'packs/0a/p1.tmp' }))).map((info) => info.key)).toEqual(['packs/0a/p2', 'packs/1b/p3']);
    expect((await collect(storage.list('packs/', { startAfter: 'packs/0a' }))).map((info) => info.key)).toEqual(['packs/0a-z', 'packs/0a/p1', 'packs/0a/p1.tmp', 'packs/0a/p2', 'packs/1b/p3']);
    expect((await collect(storage.list('')))).toHaveLength(keys.length);
    expect(await collect(storage.list('nothing/'))).toEqual([]);
    // Another root of the same store sees none of it, even one whose name starts with this one's.
    const other = await backend.open(`${backend.freshRoot()}`);
    expect(await collect(other.list(''))).toEqual([]);
  });

  test('list streams page by page: 2500 keys arrive once each, in order; a consumer that stops early fetched one page', async () => {
    const { storage } = await fresh();
    const keys = Array.from({ length: 2500 }, (_, i) => `index/${String(i * 7919 % 2500).padStart(5, '0')}-seg`);
    await putMany(storage, keys, (key) => Buffer.from(key));
    const listed = await collect(storage.list('index/'));
    expect(listed.map((info) => info.key)).toEqual([...keys].sort());
    expect(listed.every((info) => info.size === 'index/00000-seg'.length)).toBe(true);
    const resumed = await collect(storage.list('index/', { startAfter: 'index/01234-seg' }));
    expect(resumed[0]!.key).toBe('index/01235-seg');
    expect(resumed).toHaveLength(2500 - 1235);
    if (backend.requests) {
      const before = backend.requests(storage);
      for await (const info of storage.list('index/')) {
        expect(info.key).toBe('index/00000-seg');
        break;
      }
      // One page of 1000 keys, not the 3 pages that hold them all (the proxied backend may retry that page).
      const sent = backend.requests(storage) - before;
      expect(sent).toBeGreaterThanOrEqual(1);
      expect(sent).toBeLessThan(3);
      const beforeAll = backend.requests(storage);
      await collect(storage.list('index/'));
      expect(backend.requests(storage) - beforeAll).toBeGreaterThanOrEqual(3);
    }
  });

  test('objects another program wrote under the root are listed as they are', async () => {
    const { root, storage } = await fresh();
    await storage.put('packs/aa/ours', Buffer.from('ours'));
    await backend.putForeign(storage, root, 'packs/aa/their file (copy)', Buffer.from('theirs'));
    await backend.putForeign(storage, root, 'packs/aa/theirs.bak', Buffer.from('theirs too'));
    expect(await collect(storage.list('packs/'))).toEqual([
      { key: 'packs/aa/ours', size: 4 },
      ...(backend.listsForeignNames ? [{ key: 'packs/aa/their file (copy)', size: 6 }] : []),
      { key: 'packs/aa/theirs.bak', size: 10 },
    ]);
  });

  test('keys outside the rule are refused before anything is sent (ENGINE_INVALID_ARGUMENT)', async () => {
    const { storage } = await fresh();
    for (const key of ['', '/abs', 'a//b', 'a/../b', '../escape', '.hidden', 'a/', 'with space', 'x'.repeat(1025)]) {
      await expect(storage.put(key, Buffer.from('x')), key).rejects.toMatchObject({ code: 'ENGINE_INVALID_ARGUMENT' });
      await expect(storage.get(key), key).rejects.toMatchObject({ code: 'ENGINE_INVALID_ARGUMENT' });
    }
    await expect(collect(storage.list('../'))).rejects.toMatchObject({ code: 'ENGINE_INVALID_ARGUMENT' });
    expect(await collect(storage.list(''))).toEqual([]);
  });

  test('an aborted signal ends every call with ENGINE_INTERRUPTED, and a put that was interrupted stored nothing', async () => {
    const { storage } = await fresh();
    await storage.put('config', Buffer.from('cfg'));
    const signal = AbortSignal.abort();
    await expect(storage.put('backups/x', Buffer.from('x'), { signal, ifAbsent: true })).rejects.toMatchObject({ code: 'ENGINE_INTERRUPTED' });
    await expect(storage.get('config', { signal })).rejects.toMatchObject({ code: 'ENGINE_INTERRUPTED' });
    await expect(storage.stat('config', { signal })).rejects.toMatchObject({ code: 'ENGINE_INTERRUPTED' });
    await expect(storage.delete('config', { signal })).rejects.toMatchObject({ code: 'ENGINE_INTERRUPTED' });
    await expect(collect(storage.list('', { signal }))).rejects.toMatchObject({ code: 'ENGINE_INTERRUPTED' });
    expect(await failure(storage.stat('backups/x'))).toBe('not-found');
    expect((await storage.get('config')).toString()).toBe('cfg');
  });

  test('stat and list say when an object was written, by the store\'s clock', async () => {
    const { storage } = await fresh();
    const before = Date.now();
    await storage.put('leases/m.json', Buffer.from('{}'));
    const after = Date.now();
    const stat = await storage.stat('leases/m.json');
    const [listed] = await (async () => {
      const all: ObjectInfo[] = [];
      for await (const info of storage.list('leases/')) all.push(info);
      return all;
    })();
    if (!backend.setsModified) {
      expect(stat.modified).toBeUndefined();
      return;
    }
    // S3 gives whole seconds (HEAD) or milliseconds (a listing); RGW runs on this host's clock.
    for (const modified of [stat.modified, listed!.modified]) {
      expect(modified).toBeGreaterThanOrEqual(before - 1_000);
      expect(modified).toBeLessThanOrEqual(after + 1_000);
    }
  });

  test('the store\'s clock, where the backend has one, is read with a bounded uncertainty', async () => {
    const { storage } = await fresh();
    if (!storage.time) {
      // Memory and the local folder share this host's clock: the contract says time is then absent.
      expect(backend.name.startsWith('S3')).toBe(false);
      return;
    }
    const time = await storage.time();
    expect(time.uncertaintyMs).toBeGreaterThanOrEqual(500);
    // RGW runs on this host: the same clock, within the Date header's second and the round trip.
    expect(Math.abs(time.localMs - time.storeMs)).toBeLessThanOrEqual(time.uncertaintyMs);
  });
});

test('the fault proxy really injected faults during the proxied run', () => {
  expect(proxy!.injected.slowdown ?? 0).toBeGreaterThan(0);
  expect(proxy!.injected['lose-response'] ?? 0).toBeGreaterThan(0);
  expect(proxy!.injected['truncate-response'] ?? 0).toBeGreaterThan(0);
  expect(proxy!.injected['reset-request'] ?? 0).toBeGreaterThan(0);
});
