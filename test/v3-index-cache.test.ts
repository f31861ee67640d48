/**
 * The per-host index cache (SPEC.md 19.4) on real LevelDB: slots for concurrent processes (LevelDB's own lock,
 * in this process and from another one), incremental catch-up by segment names, the resolution rule whatever
 * the order segments arrive in, rebuilds when an ingested segment is gone or superseded, and when the cache
 * is damaged, of another repository, or lost.
 */
import { afterEach, describe, expect, test } from 'vitest';
import { spawn } from 'node:child_process';
import { mkdtemp, rm, writeFile, readdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { getHeapSpaceStatistics } from 'node:v8';
import { join, resolve } from 'node:path';
import { initChecksum } from '../dist/repo-format/checksum.js';
import { MemoryStorage } from '../dist/repo-format/storage/memory.js';
import { encodeSegment, entryAt, segmentKey, type Segment, type SegmentEntry, type SegmentName } from '../dist/repo-format/v3/segment.js';
import { CACHE_BATCH, IndexCache, MAX_SLOTS } from '../dist/repo-format/v3/index-cache.js';
import { LocalStorage } from '../dist/repo-format/storage/local.js';
import { collectGarbage, collectionsAsked } from '../dist/repo-format/v3/collect-garbage.js';

await initChecksum();
const REPO = '0123456789abcdef0123456789abcdef';
const dirs: string[] = [];
afterEach(async () => {
  for (const dir of dirs.splice(0)) await rm(dir, { recursive: true, force: true });
});

async function cacheRoot(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'v3-cache-'));
  dirs.push(dir);
  return dir;
}

function name(writer: string, seq = 0): SegmentName {
  return { writer: writer.repeat(32 / writer.length), seq };
}

function entry(idByte: number, pack: string, offset = 32): SegmentEntry {
  return { id: Buffer.alloc(32, idByte), packId: pack.repeat(32 / pack.length), offset, length: 100, rawLength: 44, kind: 1, flags: 0 };
}

async function store(storage: MemoryStorage, segment: Segment, dataKey?: Buffer): Promise<void> {
  await storage.put(segmentKey(segment.name), encodeSegment(segment, { dataKey }), { ifAbsent: true });
}

describe('slots', () => {
  test('two caches open at once in one process take two slots; a closed slot is reused', async () => {
    const root = await cacheRoot();
    const storage = new MemoryStorage();
    const first = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage });
    const second = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage });
    expect([first.cache.slot, second.cache.slot]).toEqual([0, 1]);
    await first.cache.close();
    const third = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage });
    expect(third.cache.slot).toBe(0);
    await second.cache.close();
    await third.cache.close();
    expect((await readdir(join(root, REPO))).sort()).toEqual(['slot-0', 'slot-1']);
  });

  test('with every slot in use, the next process is refused with ENGINE_REPOSITORY_LOCKED naming the cache', async () => {
    const root = await cacheRoot();
    const storage = new MemoryStorage();
    const open = [];
    for (let i = 0; i < MAX_SLOTS; i++) open.push((await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage })).cache);
    await expect(IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage })).rejects.toMatchObject({ code: 'ENGINE_REPOSITORY_LOCKED', message: expect.stringContaining(join(root, REPO)) });
    for (const cache of open) await cache.close();
  });

  test('a slot held by another process is skipped, and free again once that process is killed', async () => {
    const root = await cacheRoot();
    const module = resolve('dist/repo-format/v3/index-cache.js');
    const memory = resolve('dist/repo-format/storage/memory.js');
    const script = `const { IndexCache } = await import(${JSON.stringify(module)}); const { MemoryStorage } = await import(${JSON.stringify(memory)});
      const { cache } = await IndexCache.open({ cacheRoot: ${JSON.stringify(root)}, repositoryId: ${JSON.stringify(REPO)}, storage: new MemoryStorage() });
      console.log('slot', cache.slot); setInterval(() => {}, 1000);`;
    const child = spawn(resolve('node_modules/.bin/node'), ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    const line = await new Promise<string>((done) => child.stdout.once('data', (chunk: Buffer) => done(chunk.toString().trim())));
    expect(line).toBe('slot 0');
    const storage = new MemoryStorage();
    const mine = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage });
    expect(mine.cache.slot).toBe(1);
    await mine.cache.close();
    child.kill('SIGKILL');
    await new Promise((done) => child.once('exit', done));
    const after = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage });
    expect(after.cache.slot).toBe(0); // the kernel released the dead process's lock
    await after.cache.close();
  });
});

describe('catch-up', () => {
  test('incremental: only new segments are fetched; lookups answer from them', async () => {
    const root = await cacheRoot();
    const storage = new MemoryStorage();
    await store(storage, { name: name('a'), supersedes: [], entries: [entry(1, 'a1'), entry(2, 'a1', 132)] });
    await store(storage, { name: name('b'), supersedes: [], entries: [entry(3, 'b1')] });
    const { cache, catchUp } = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage });
    expect(catchUp).toEqual({ ingested: 2, entries: 3, rebuilt: undefined, damaged: [] });
    await store(storage, { name: name('c'), supersedes: [], entries: [entry(4, 'c1')] });
    expect(await cache.catchUp()).toEqual({ ingested: 1, entries: 1, rebuilt: undefined, damaged: [] });
    expect(await cache.catchUp()).toEqual({ ingested: 0, entries: 0, rebuilt: undefined, damaged: [] });
    const found = await cache.lookup([Buffer.alloc(32, 1), Buffer.alloc(32, 4), Buffer.alloc(32, 9)]);
    expect(found.map((l) => l?.packId)).toEqual(['a1'.repeat(16), 'c1'.repeat(16), undefined]);
    await cache.close();
    // Reopened: nothing to fetch.
    const again = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage });
    expect(again.catchUp).toEqual({ ingested: 0, entries: 0, rebuilt: undefined, damaged: [] });
    expect(await again.cache.counts()).toEqual({ segments: 3, blobs: 4 });
    await again.cache.close();
  });

  test('one blob in two segments: the first segment by key wins, whichever the cache met first', async () => {
    const root = await cacheRoot();
    const storage = new MemoryStorage();
    await store(storage, { name: name('b'), supersedes: [], entries: [entry(1, 'bb')] });
    const { cache } = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage });
    expect((await cache.lookup([Buffer.alloc(32, 1)]))[0]?.packId).toBe('bb'.repeat(16));
    await store(storage, { name: name('a'), supersedes: [], entries: [entry(1, 'aa')] });
    await store(storage, { name: name('c'), supersedes: [], entries: [entry(1, 'cc')] });
    await cache.catchUp();
    expect((await cache.lookup([Buffer.alloc(32, 1)]))[0]?.packId).toBe('aa'.repeat(16));
    expect(await cache.segmentOf(Buffer.alloc(32, 1))).toBe(segmentKey(name('a')));
    await cache.close();
  });

  test('an ingested segment gone from the store, or superseded, makes the cache start again from the segments', async () => {
    const root = await cacheRoot();
    const storage = new MemoryStorage();
    await store(storage, { name: name('a'), supersedes: [], entries: [entry(1, 'a1'), entry(2, 'a1', 132)] });
    await store(storage, { name: name('b'), supersedes: [], entries: [entry(3, 'b1')] });
    const rebuilt: string[] = [];
    const { cache } = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage, onRebuild: (why) => rebuilt.push(why) });
    // gc: blob 1 moved to pack e1, blob 2 dead; segment a superseded (not yet deleted).
    await store(storage, { name: name('e'), supersedes: [name('a')], entries: [entry(1, 'e1')] });
    const result = await cache.catchUp();
    expect(result.rebuilt).toMatch(/superseded/);
    expect((await cache.lookup([Buffer.alloc(32, 1), Buffer.alloc(32, 2), Buffer.alloc(32, 3)])).map((l) => l?.packId)).toEqual(['e1'.repeat(16), undefined, 'b1'.repeat(16)]);
    // gc then deletes segment a: nothing the cache ingested is gone (a was met as superseded), so no rebuild.
    await storage.delete(segmentKey(name('a')));
    expect((await cache.catchUp()).rebuilt).toBeUndefined();
    // A segment deleted behind the engine's back: rebuilt without it.
    await storage.delete(segmentKey(name('b')));
    expect((await cache.catchUp()).rebuilt).toMatch(/gone/);
    expect((await cache.lookup([Buffer.alloc(32, 3)]))[0]).toBeUndefined();
    expect(await cache.counts()).toEqual({ segments: 1, blobs: 1 });
    expect(rebuilt.length).toBe(2);
    await cache.close();
  });

  test('encrypted repositories: sealed segments are read with the data key', async () => {
    const root = await cacheRoot();
    const storage = new MemoryStorage();
    const dataKey = Buffer.alloc(32, 5);
    await store(storage, { name: name('a'), supersedes: [], entries: [entry(1, 'a1')] }, dataKey);
    const { cache } = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage, dataKey });
    expect((await cache.lookup([Buffer.alloc(32, 1)]))[0]?.packId).toBe('a1'.repeat(16));
    await cache.close();
    // Without the key the segment cannot be read: reported by name, not ingested.
    const keyless = await IndexCache.open({ cacheRoot: await cacheRoot(), repositoryId: REPO, storage });
    expect(keyless.catchUp.damaged).toEqual([{ key: segmentKey(name('a')), why: expect.stringMatching(/not a segment/) }]);
    await keyless.cache.close();
  });

  test('a segment cut short or altered behind the engine: reported, skipped, tried again; the others ingested', async () => {
    const root = await cacheRoot();
    const storage = new MemoryStorage();
    await store(storage, { name: name('a'), supersedes: [], entries: [entry(1, 'a1'), entry(2, 'a1', 132)] });
    await store(storage, { name: name('b'), supersedes: [], entries: [entry(3, 'b1')] });
    const whole = await storage.get(segmentKey(name('a')));
    await storage.put(segmentKey(name('a')), whole.subarray(0, whole.length - 70));
    const { cache, catchUp } = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage });
    expect(catchUp).toEqual({ ingested: 1, entries: 1, rebuilt: undefined, damaged: [{ key: segmentKey(name('a')), why: expect.stringMatching(/counts need/) }] });
    expect((await cache.lookup([Buffer.alloc(32, 1), Buffer.alloc(32, 3)])).map((l) => l?.packId)).toEqual([undefined, 'b1'.repeat(16)]);
    // Restored (from a copy): the next catch-up ingests it.
    await storage.put(segmentKey(name('a')), whole);
    expect(await cache.catchUp()).toEqual({ ingested: 1, entries: 2, rebuilt: undefined, damaged: [] });
    await cache.close();
  });
});

describe('a damaged or lost cache is rebuilt from the store', () => {
  test('damaged LevelDB files', async () => {
    const root = await cacheRoot();
    const storage = new MemoryStorage();
    await store(storage, { name: name('a'), supersedes: [], entries: [entry(1, 'a1')] });
    const first = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage });
    await first.cache.close();
    await writeFile(join(root, REPO, 'slot-0', 'CURRENT'), 'MANIFEST-999999\n');
    const { cache, catchUp } = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage });
    expect(catchUp.rebuilt).toMatch(/could not be opened/);
    expect(catchUp.ingested).toBe(1);
    expect((await cache.lookup([Buffer.alloc(32, 1)]))[0]?.packId).toBe('a1'.repeat(16));
    await cache.close();
  });

  test('lost: the cache directory deleted', async () => {
    const root = await cacheRoot();
    const storage = new MemoryStorage();
    await store(storage, { name: name('a'), supersedes: [], entries: [entry(1, 'a1')] });
    await (await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage })).cache.close();
    await rm(join(root, REPO), { recursive: true });
    const { cache, catchUp } = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage });
    expect(catchUp.ingested).toBe(1);
    await cache.close();
  });
});

describe('a rebuild cut short', () => {
  test('is started again at the next open, never taken for a cache that is merely behind', async () => {
    const root = await cacheRoot();
    const storage = new MemoryStorage();
    await store(storage, { name: name('a'), supersedes: [], entries: [entry(1, 'a1')] });
    await store(storage, { name: name('b'), supersedes: [], entries: [entry(2, 'b1')] });
    const { cache } = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage });
    await cache.close();
    // What a kill -9 in the middle of a rebuild leaves: the mark, and part of the old content.
    const { ClassicLevel } = await import('classic-level');
    const db = new ClassicLevel<Buffer, Buffer>(join(root, REPO, 'slot-0'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
    await db.put(Buffer.concat([Buffer.from([0]), Buffer.from('rebuilding')]), Buffer.from('test'));
    // The clear had removed segment a's record but not yet its blob 1 entry (keys go in order).
    await db.del(Buffer.concat([Buffer.from([3]), Buffer.from(segmentKey(name('a')))]));
    await db.close();
    // gc meanwhile replaced segment a (blob 1 moved) and the old one is gone.
    await store(storage, { name: name('e'), supersedes: [name('a')], entries: [] });
    await storage.delete(segmentKey(name('a')));
    const again = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage });
    expect(again.catchUp.rebuilt).toMatch(/cut short/);
    // Blob 1 is dead now: the stale entry (at a pack gc may delete) is gone with the rebuild.
    expect((await again.cache.lookup([Buffer.alloc(32, 1), Buffer.alloc(32, 2)])).map((l) => l?.packId)).toEqual([undefined, 'b1'.repeat(16)]);
    await again.cache.close();
    const third = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage });
    expect(third.catchUp).toEqual({ ingested: 0, entries: 0, rebuilt: undefined, damaged: [] });
    await third.cache.close();
  });
});

describe('a catch-up left for later (repair)', () => {
  test('the slot is taken and nothing ingested at open; the first catch-up ingests, and ends a rebuild the open started', async () => {
    const root = await cacheRoot();
    const storage = new MemoryStorage();
    await store(storage, { name: name('a'), supersedes: [], entries: [entry(1, 'a1')] });
    await (await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage })).cache.close();
    await writeFile(join(root, REPO, 'slot-0', 'CURRENT'), 'MANIFEST-999999\n');
    const later = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage, catchUpLater: true });
    expect(later.catchUp).toEqual({ ingested: 0, entries: 0, rebuilt: undefined, damaged: [] });
    expect(later.cache.slot).toBe(0);
    expect(await later.cache.counts()).toEqual({ segments: 0, blobs: 0 });
    const caughtUp = await later.cache.catchUp();
    expect(caughtUp.ingested).toBe(1);
    // The open emptied the damaged cache: this catch-up is the rebuild, and it says so.
    expect(caughtUp.rebuilt).toMatch(/could not be opened/);
    expect((await later.cache.lookup([Buffer.alloc(32, 1)]))[0]?.packId).toBe('a1'.repeat(16));
    await later.cache.close();
    // The rebuild is complete: the next open finds a cache merely current, not one cut short.
    const next = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage });
    expect(next.catchUp).toEqual({ ingested: 0, entries: 0, rebuilt: undefined, damaged: [] });
    await next.cache.close();
  });
});

describe('ingest in bounded parts (19.4)', () => {
  /** `count` entries with ids ascending (a counter, then `fill`), in pack `pack`. */
  function many(count: number, pack: string, fill = 0x77): SegmentEntry[] {
    return Array.from({ length: count }, (_, i) => {
      const id = Buffer.alloc(32, fill);
      id.writeUInt32BE(i, 0);
      return { id, packId: pack.repeat(32 / pack.length), offset: 32 + i, length: 100, rawLength: 44, kind: 1, flags: 0 };
    });
  }

  test('whatever a segment holds, LevelDB is handed at most one part (CACHE_BATCH entries) and the record at once; every entry is found', async () => {
    const root = await cacheRoot();
    const storage = new MemoryStorage();
    const count = CACHE_BATCH * 2 + 5;
    const entries = many(count, 'e1');
    await store(storage, { name: name('e'), supersedes: [], entries });
    const { cache, catchUp } = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage });
    expect(catchUp).toEqual({ ingested: 1, entries: count, rebuilt: undefined, damaged: [] });
    expect(cache.peakBatch).toBeGreaterThan(0);
    expect(cache.peakBatch).toBeLessThanOrEqual(CACHE_BATCH + 1);
    const found = await cache.lookup(entries.map((e) => e.id));
    expect(found.every((l, i) => l?.offset === entries[i]!.offset && l.packId === entries[i]!.packId)).toBe(true);
    expect(await cache.counts()).toEqual({ segments: 1, blobs: count });
    // A small part size holds too (the writers' own ingest goes the same way).
    const small = await IndexCache.open({ cacheRoot: await cacheRoot(), repositoryId: REPO, storage, batch: 7 });
    expect(small.cache.peakBatch).toBeLessThanOrEqual(8);
    const own = { name: name('f'), supersedes: [], entries: many(50, 'f1', 0x88) };
    await small.cache.ingest(own);
    expect(small.cache.peakBatch).toBeLessThanOrEqual(8);
    expect((await small.cache.lookup([own.entries[49]!.id]))[0]?.packId).toBe('f1'.repeat(16));
    expect(await small.cache.counts()).toEqual({ segments: 2, blobs: count + 50 });
    await small.cache.close();
    await cache.close();
  });

  test('ingests at once (a writer own segment during a catch-up) each keep their own part buffers: every entry of both is found where its segment says', async () => {
    const root = await cacheRoot();
    const storage = new MemoryStorage();
    const { cache } = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage, batch: 64 });
    // The first ingest leaves its part buffers for the next; then two at once, each of several parts: the
    // second must not write into the buffers the first is reading LevelDB's answer for and putting from.
    await cache.ingest({ name: name('a'), supersedes: [], entries: many(64, 'a1', 0x11) });
    const b = { name: name('b'), supersedes: [], entries: many(200, 'b1', 0x22) };
    const c = { name: name('c'), supersedes: [], entries: many(200, 'c1', 0x33) };
    await Promise.all([cache.ingest(b), cache.ingest(c)]);
    for (const segment of [b, c]) {
      const found = await cache.lookup(segment.entries.map((e) => e.id));
      expect(found.map((l) => `${l?.packId}@${l?.offset}`)).toEqual(segment.entries.map((e) => `${e.packId}@${e.offset}`));
    }
    expect(await cache.counts()).toEqual({ segments: 3, blobs: 464 });
    await cache.close();
  });

  /** A child process catches up from the folder `repo` in parts of 2 entries and is killed after its first part. */
  async function killedAfterFirstPart(root: string, repo: string): Promise<void> {
    const script = `const { IndexCache } = await import(${JSON.stringify(resolve('dist/repo-format/v3/index-cache.js'))});
      const { LocalStorage } = await import(${JSON.stringify(resolve('dist/repo-format/storage/local.js'))});
      const { initChecksum } = await import(${JSON.stringify(resolve('dist/repo-format/checksum.js'))});
      await initChecksum();
      await IndexCache.open({ cacheRoot: ${JSON.stringify(root)}, repositoryId: ${JSON.stringify(REPO)}, storage: new LocalStorage(${JSON.stringify(repo)}) });
      console.log('not killed');`;
    const child = spawn(resolve('node_modules/.bin/node'), ['--input-type=module', '-e', script], {
      stdio: ['ignore', 'pipe', 'inherit'],
      env: { ...process.env, ENGINE_CRASH_AT: 'cache-part-written', ENGINE_TEST_CACHE_BATCH: '2' },
    });
    let out = '';
    child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
    const signal = await new Promise<NodeJS.Signals | null>((done) => child.once('exit', (_code, sig) => done(sig)));
    expect(out).toBe('');
    expect(signal).toBe('SIGKILL');
  }

  async function folderStore(): Promise<{ repo: string; storage: LocalStorage }> {
    const repo = await cacheRoot();
    return { repo, storage: new LocalStorage(repo) };
  }

  test('kill -9 after the first part of a segment: the next catch-up ingests it again under its own ordinal, and a segment sorting first that arrived meanwhile still wins (19.3)', async () => {
    const root = await cacheRoot();
    const { repo, storage } = await folderStore();
    // c: four blobs, ingested in parts of two; the child dies after the part holding blobs 1 and 2.
    await store(storage as never, { name: name('c'), supersedes: [], entries: [entry(1, 'c1'), entry(2, 'c1', 132), entry(3, 'c1', 232), entry(4, 'c1', 332)] });
    await killedAfterFirstPart(root, repo);
    // Meanwhile: a (names blob 9) and b (names blob 1 elsewhere); both sort before c, so b's blob 1 wins.
    await store(storage as never, { name: name('a'), supersedes: [], entries: [entry(9, 'a1')] });
    await store(storage as never, { name: name('b'), supersedes: [], entries: [entry(1, 'b1')] });
    const { cache, catchUp } = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage, batch: 2 });
    expect(catchUp).toEqual({ ingested: 3, entries: 6, rebuilt: undefined, damaged: [] });
    const ids = [1, 2, 3, 4, 9].map((b) => Buffer.alloc(32, b));
    expect((await cache.lookup(ids)).map((l) => l?.packId.slice(0, 2))).toEqual(['b1', 'c1', 'c1', 'c1', 'a1']);
    expect(await Promise.all(ids.map((id) => cache.segmentOf(id)))).toEqual([name('b'), name('c'), name('c'), name('c'), name('a')].map(segmentKey));
    expect(await cache.counts()).toEqual({ segments: 3, blobs: 5 });
    await cache.close();
  });

  test.each([
    { after: 'superseded and deleted (gc)', deleted: true, why: /segment index\/c+-00000000 it ingested is gone/ },
    { after: 'superseded by a new segment while it is still there', deleted: false, why: /superseded/ },
  ])('kill -9 after the first part of a segment, then that segment $after: the cache starts again and names none of its entries', async ({ deleted, why }) => {
    const root = await cacheRoot();
    const { repo, storage } = await folderStore();
    await store(storage as never, { name: name('c'), supersedes: [], entries: [entry(1, 'c1'), entry(2, 'c1', 132), entry(3, 'c1', 232)] });
    await killedAfterFirstPart(root, repo);
    await store(storage as never, { name: name('d'), supersedes: [name('c')], entries: [entry(3, 'd1')] });
    if (deleted) await storage.delete(segmentKey(name('c')));
    const { cache, catchUp } = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage, batch: 2 });
    expect(catchUp.rebuilt).toMatch(why);
    expect((await cache.lookup([1, 2, 3].map((b) => Buffer.alloc(32, b)))).map((l) => l?.packId.slice(0, 2))).toEqual([undefined, undefined, 'd1']);
    await cache.close();
  });
});

describe('eachIngested (the pack-loss path, 19.7 step 3a)', () => {
  test('gives each ingested segment in key order as a view of its bytes checked whole (no object per entry); one gone since is skipped', async () => {
    const root = await cacheRoot();
    const storage = new MemoryStorage();
    const a = { name: name('a'), supersedes: [], entries: [entry(1, 'a1'), entry(2, 'a1', 132)] };
    const b = { name: name('b'), supersedes: [], entries: [entry(3, 'b1'), entry(4, 'b1', 132), entry(5, 'b1', 232)] };
    const c = { name: name('c'), supersedes: [], entries: [entry(6, 'c1')] };
    for (const segment of [c, a, b]) await store(storage, segment);
    const { cache } = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage });
    await storage.delete(segmentKey(b.name));
    const seen: { key: string; entries: SegmentEntry[] }[] = [];
    await cache.eachIngested(async (view) => {
      // A view: the segment's bytes and where its entries are, not an array of decoded entries.
      expect(view).not.toHaveProperty('entries');
      expect(Buffer.isBuffer(view.bytes)).toBe(true);
      seen.push({ key: segmentKey(view.name), entries: Array.from({ length: view.count }, (_, i) => entryAt(view, i)) });
    });
    expect(seen).toEqual([a, c].map((segment) => ({ key: segmentKey(segment.name), entries: segment.entries })));
    await cache.close();
  });
});

describe('memory after a large catch-up', () => {
  /** The young generation's committed size (V8's new space), in bytes. */
  function youngGeneration(): number {
    return getHeapSpaceStatistics().find((space) => space.space_name === 'new_space')!.space_size;
  }

  /**
   * A fresh cache opened (and caught up) over `count` empty segments, the young generation grown first to its
   * largest by objects that survive a few collections, as a catch-up's do: the collections the catch-up asked
   * for, and the young generation's size before and after it.
   */
  async function catchUpOver(count: number): Promise<{ collections: number; before: number; after: number }> {
    const storage = new MemoryStorage();
    for (let seq = 0; seq < count; seq++) await store(storage, { name: name('c', seq), supersedes: [], entries: [] });
    const root = await cacheRoot();
    const kept: { i: number; s: string }[] = [];
    for (let i = 0; i < 3_000_000; i++) {
      const o = { i, s: `x${i}` };
      if (i % 10 === 0) kept.push(o);
    }
    kept.length = 0;
    const asked = collectionsAsked();
    const before = youngGeneration();
    const { cache, catchUp } = await IndexCache.open({ cacheRoot: root, repositoryId: REPO, storage });
    const after = youngGeneration();
    const collections = collectionsAsked() - asked;
    expect(catchUp.ingested).toBe(count);
    await cache.close();
    return { collections, before, after };
  }

  // Whether V8 grows or shrinks its young generation over a smaller catch-up is its own heuristics' business:
  // what the engine decides is whether to ask for the collection, and what that collection leaves.
  test('a catch-up that listed a thousand segments or more ends with the collection that hands memory back (the young generation at its smallest after it); a smaller one asks for none', async () => {
    collectGarbage();
    const smallest = youngGeneration();
    const small = await catchUpOver(999);
    expect(small.collections).toBe(0);
    const large = await catchUpOver(1000);
    expect(large.collections).toBe(1);
    expect(large.before).toBeGreaterThan(smallest);
    expect(large.after).toBe(smallest);
  });
});
