/**
 * The index cache's catch-up with many segments in flight (SPEC.md 19.4): segments are fetched through a
 * bounded window whose answers come back in any order, and ingested in key order. The cache it builds must be
 * exactly the one a catch-up fetching one segment at a time builds (the same entry and the same segment for
 * every blob, the same result), and the one the resolution rule defines (segment-set.ts), with a gc segment
 * superseding others among the new ones, blobs named by several segments, and a damaged segment. On a folder
 * (500 segments) and on a real Ceph RGW (300). Small segments cost one GET each. An interrupted catch-up
 * leaves nothing in flight.
 */
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initChecksum } from '../dist/repo-format/checksum.js';
import { LocalStorage } from '../dist/repo-format/storage/local.js';
import { LimitedStorage } from '../dist/repo-format/storage/limit.js';
import type { GetOptions, Storage } from '../dist/repo-format/storage/storage.js';
import { encodeSegment, segmentKey, type Segment, type SegmentEntry, type SegmentName } from '../dist/repo-format/v3/segment.js';
import { resolveIndex } from '../dist/repo-format/v3/segment-set.js';
import { IndexCache, type CatchUpResult } from '../dist/repo-format/v3/index-cache.js';
import { startRgwCluster, type RgwCluster } from './rgw.js';
import { createBucket, withRgwStorage } from './s3-helpers.js';

await initChecksum();
const REPO = 'fedcba9876543210fedcba9876543210';
const dirs: string[] = [];
afterEach(async () => {
  for (const dir of dirs.splice(0)) await rm(dir, { recursive: true, force: true });
});

async function tempDir(prefix: string): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  dirs.push(dir);
  return dir;
}

/** Deterministic pseudo-random numbers (a failing case can be run again). */
function prng(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return state / 2 ** 32;
  };
}

function hex(random: () => number, bytes: number): string {
  let text = '';
  for (let i = 0; i < bytes; i++) text += Math.floor(random() * 256).toString(16).padStart(2, '0');
  return text;
}

/**
 * `count` segments from a few writers; each names 1–6 blobs drawn from a pool small enough that many blobs
 * are named by several segments (the first segment by key must win); one gc segment supersedes 10 of them
 * (and one name that is not present) and names some of their blobs at new places.
 */
function makeSegments(count: number, seed: number): Segment[] {
  const random = prng(seed);
  const writers = Array.from({ length: 7 }, () => hex(random, 16));
  const pool = Array.from({ length: count * 2 }, () => Buffer.from(hex(random, 32), 'hex'));
  const segments: Segment[] = [];
  for (let i = 0; i < count; i++) {
    const name: SegmentName = { writer: writers[i % writers.length]!, seq: Math.floor(i / writers.length) };
    const ids = new Map<string, Buffer>();
    // Segment 20 is larger than the catch-up keeps from its first pass (256 KiB): read twice, header then whole.
    const n = i === 20 ? 5000 : 1 + Math.floor(random() * 6);
    while (ids.size < n) {
      // The large segment's blobs are its own (the pool is smaller than it).
      const id = n > pool.length / 2 ? Buffer.from(hex(random, 32), 'hex') : pool[Math.floor(random() * pool.length)]!;
      ids.set(id.toString('hex'), id);
    }
    const pack = hex(random, 16);
    const entries: SegmentEntry[] = [...ids.values()]
      .sort(Buffer.compare)
      .map((id, k) => ({ id, packId: pack, offset: 32 + k * 200, length: 150, rawLength: 4096, kind: 1, flags: 0 }));
    segments.push({ name, supersedes: [], entries });
  }
  const victims = segments.slice(5, 15);
  const gcPack = hex(random, 16);
  const gcIds = [...new Map(victims.flatMap((s) => s.entries).map((e) => [e.id.toString('hex'), e.id])).values()].sort(Buffer.compare);
  segments.push({
    name: { writer: '8'.repeat(32), seq: 0 },
    supersedes: [...victims.map((s) => s.name), { writer: '0'.repeat(32), seq: 99 }].sort((a, b) => Buffer.compare(Buffer.from(segmentKey(a)), Buffer.from(segmentKey(b)))),
    entries: gcIds.map((id, k) => ({ id, packId: gcPack, offset: 32 + k * 200, length: 150, rawLength: 4096, kind: 1, flags: 0 })),
  });
  return segments;
}

const DAMAGED = `index/${'7'.repeat(32)}-00000001`;

async function populate(storage: Storage, segments: readonly Segment[], withDamaged = true): Promise<void> {
  for (let i = 0; i < segments.length; i += 32) {
    await Promise.all(segments.slice(i, i + 32).map((segment) => storage.put(segmentKey(segment.name), encodeSegment(segment), { ifAbsent: true })));
  }
  if (!withDamaged) return;
  // A segment altered behind the engine: reported as damaged, in its turn, by both catch-ups.
  const altered = encodeSegment({ name: { writer: '7'.repeat(32), seq: 1 }, supersedes: [], entries: segments[0]!.entries });
  altered[altered.length - 1]! ^= 0xff;
  await storage.put(DAMAGED, altered, { ifAbsent: true });
}

/** The storage whose gets answer after a random delay (so out of order), counting how many run at once. */
function jittered(inner: Storage, seed: number): { storage: Storage; gets: { inFlight: number; maxInFlight: number; started: number; outOfOrder: number } } {
  const random = prng(seed);
  const gets = { inFlight: 0, maxInFlight: 0, started: 0, outOfOrder: 0 };
  let lastFinished = -1;
  const get = async (key: string, options?: GetOptions): Promise<Buffer> => {
    const order = gets.started++;
    gets.inFlight++;
    gets.maxInFlight = Math.max(gets.maxInFlight, gets.inFlight);
    try {
      await new Promise((done) => setTimeout(done, Math.floor(random() * 4)));
      return await inner.get(key, options);
    } finally {
      gets.inFlight--;
      if (order < lastFinished) gets.outOfOrder++;
      lastFinished = Math.max(lastFinished, order);
    }
  };
  const storage = new Proxy(inner, {
    get(target, property) {
      if (property === 'get') return get;
      const value = Reflect.get(target, property) as unknown;
      return typeof value === 'function' ? (value as (...args: unknown[]) => unknown).bind(target) : value;
    },
  });
  return { storage, gets };
}

interface Snapshot {
  result: CatchUpResult;
  blobs: string[];
}

/** Every blob of the cache with its location and the segment it came from, in id order. */
async function snapshot(cache: IndexCache, result: CatchUpResult): Promise<Snapshot> {
  const blobs: string[] = [];
  for await (const entry of cache.blobs()) blobs.push(`${entry.id.toString('hex')} ${entry.packId} ${entry.offset} ${entry.length} ${entry.rawLength} ${entry.kind} ${entry.flags} ${await cache.segmentOf(entry.id)}`);
  return { result, blobs };
}

/** What the resolution rule says the cache must hold (the damaged segment is not ingested). */
function expected(segments: readonly Segment[]): string[] {
  return [...resolveIndex(segments).values()]
    .map(({ entry, segment }) => `${entry.id.toString('hex')} ${entry.packId} ${entry.offset} ${entry.length} ${entry.rawLength} ${entry.kind} ${entry.flags} ${segment}`)
    .sort();
}

async function catchUpBothWays(storage: Storage, segments: readonly Segment[]): Promise<void> {
  // One segment at a time: a concurrency limit of 1 under the catch-up.
  const sequential = await IndexCache.open({ cacheRoot: await tempDir('v3-window-seq-'), repositoryId: REPO, storage: new LimitedStorage(storage, { limit: 1 }) });
  const one = await snapshot(sequential.cache, sequential.catchUp);
  await sequential.cache.close();
  const { storage: windowed, gets } = jittered(storage, 7);
  const opened = await IndexCache.open({ cacheRoot: await tempDir('v3-window-'), repositoryId: REPO, storage: windowed });
  const many = await snapshot(opened.cache, opened.catchUp);
  await opened.cache.close();
  // Many in flight, answering out of order, and never more than the window.
  expect(gets.maxInFlight).toBeGreaterThan(1);
  expect(gets.maxInFlight).toBeLessThanOrEqual(16);
  expect(gets.outOfOrder).toBeGreaterThan(0);
  // One GET per segment (the damaged one included), read whole in the first pass and not again in the
  // second; the large one twice (its header, then whole); the superseded ones once (never fetched whole).
  expect(gets.started).toBe(segments.length + 1 + 1);
  // Ingested: every segment but the 10 superseded ones and the damaged one.
  expect(many.result).toEqual({ ingested: segments.length - 10, entries: segments.filter((_, i) => i < 5 || i >= 15).reduce((sum, s) => sum + s.entries.length, 0), rebuilt: undefined, damaged: [{ key: DAMAGED, why: expect.any(String) }] });
  expect(many.result).toEqual(one.result);
  expect(many.blobs.length).toBe(one.blobs.length);
  for (let i = 0; i < one.blobs.length; i++) expect(many.blobs[i]).toBe(one.blobs[i]);
  expect(many.blobs).toEqual(expected(segments));
  // No blob resolves to a superseded segment; some resolve to the gc segment that supersedes them (others
  // to a segment whose key sorts before it).
  const victims = new Set(segments.slice(5, 15).map((s) => segmentKey(s.name)));
  expect(many.blobs.filter((line) => victims.has(line.split(' ').at(-1)!))).toEqual([]);
  expect(many.blobs.filter((line) => line.endsWith(segmentKey(segments.at(-1)!.name))).length).toBeGreaterThan(0);
}

describe('catch-up through a window of fetches', () => {
  test('500 segments on a folder: the same cache, entry by entry, as fetching one at a time', async () => {
    const storage = new LocalStorage(await tempDir('v3-window-repo-'));
    const segments = makeSegments(500, 1);
    await populate(storage, segments);
    await catchUpBothWays(storage, segments);
  });

  test('an incremental catch-up meeting a gc segment that supersedes segments it ingested starts again, as before', async () => {
    const storage = new LocalStorage(await tempDir('v3-window-repo-'));
    const segments = makeSegments(200, 2);
    await populate(storage, segments.slice(0, 100));
    const root = await tempDir('v3-window-');
    const { storage: windowed } = jittered(storage, 3);
    const opened = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage: windowed });
    await populate(storage, segments.slice(100), false);
    const again = await opened.cache.catchUp();
    expect(again.rebuilt).toMatch(/superseded/);
    expect(again.ingested).toBe(segments.length - 10);
    expect((await snapshot(opened.cache, again)).blobs).toEqual(expected(segments));
    await opened.cache.close();
  });

  test('interrupted mid-way: it stops with no fetch left in flight; the next open completes it', async () => {
    const storage = new LocalStorage(await tempDir('v3-window-repo-'));
    const segments = makeSegments(300, 4);
    await populate(storage, segments);
    const root = await tempDir('v3-window-');
    const controller = new AbortController();
    const { storage: windowed, gets } = jittered(storage, 5);
    const watch = setInterval(() => {
      if (gets.started > 150) controller.abort();
    }, 1);
    const failure = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage: windowed, signal: controller.signal }).then(() => undefined, (error: unknown) => error);
    // The folder backend reports a read cut short by the signal as a storage error (its own behaviour, not
    // the catch-up's); either way the catch-up stops and rethrows it.
    expect(failure).toBeInstanceOf(Error);
    expect(controller.signal.aborted).toBe(true);
    clearInterval(watch);
    expect(gets.inFlight).toBe(0);
    const opened = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage });
    expect((await snapshot(opened.cache, opened.catchUp)).blobs).toEqual(expected(segments));
    await opened.cache.close();
  });
});

describe('on S3 (Ceph RGW)', () => {
  let cluster: RgwCluster;
  beforeAll(async () => {
    cluster = await startRgwCluster({ memstoreBytes: 256 * 1024 * 1024 });
    await createBucket(cluster, 'engine-v3-window');
  }, 120_000);
  afterAll(async () => {
    await cluster?.stop();
  });

  test('300 segments: the same cache, entry by entry, as fetching one at a time', async () => {
    await withRgwStorage(cluster, `s3://engine-v3-window/${randomBytes(4).toString('hex')}`, async (storage) => {
      const segments = makeSegments(300, 9);
      await populate(storage, segments);
      await catchUpBothWays(storage, segments);
    });
  }, 120_000);
});
