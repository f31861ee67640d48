/**
 * The block map as a content-addressed Merkle tree, built and read against an in-memory page store:
 * shape (depth) for every boundary block count, entries read back block by block, zero pages never
 * stored, damage detected, and incremental rebuilds writing only the pages that changed.
 */
import { describe, expect, test } from 'vitest';
import { createHash } from 'node:crypto';
import { ID_SIZE, KIND_MAP_LEAF, KIND_MAP_NODE, MAP_PAGE_ENTRIES, ZERO_ID } from '../dist/repo-format/constants.js';
import { CorruptMetadataError } from '../dist/repo-format/errors.js';
import { MapBuilder, MapPageReader, mapDepth, mapPageIds, readMap, type LoadPage, type MapRoot } from '../dist/repo-format/block-map.js';

const PAGE_BYTES = MAP_PAGE_ENTRIES * ID_SIZE;

function sha256(data: Uint8Array): Buffer {
  return createHash('sha256').update(data).digest();
}

/** A deterministic non-zero entry for block `i` (variant lets a test change one block's content). */
function entryFor(i: number, variant = ''): Buffer {
  return sha256(Buffer.from(`block ${i}${variant}`));
}

interface StoredPage {
  kind: number;
  page: Buffer;
}

class MemoryPageStore {
  readonly pages = new Map<string, StoredPage>();
  storeCalls = 0;
  loads = 0;

  readonly store = async (kind: number, page: Buffer): Promise<Buffer> => {
    this.storeCalls += 1;
    const id = sha256(page);
    const key = id.toString('hex');
    const known = this.pages.get(key);
    if (known) {
      expect(known.kind).toBe(kind);
      expect(known.page.equals(page)).toBe(true);
    } else {
      this.pages.set(key, { kind, page: Buffer.from(page) });
    }
    return id;
  };

  readonly load: LoadPage = async (id, kind) => {
    this.loads += 1;
    const stored = this.pages.get(id.toString('hex'));
    if (!stored) throw new Error(`page ${id.toString('hex')} is not in the store`);
    expect(stored.kind).toBe(kind);
    return stored.page;
  };
}

async function build(store: MemoryPageStore, blocks: number, entry: (i: number) => Buffer): Promise<MapRoot> {
  const builder = new MapBuilder(blocks, store.store);
  expect(builder.depth).toBe(mapDepth(blocks));
  for (let i = 0; i < blocks; i += 1) await builder.push(entry(i));
  return builder.finish();
}

/** Reads the whole map back as one buffer of blocks × 32 bytes, checking that runs are contiguous. */
async function readAll(map: MapRoot, load: LoadPage): Promise<Buffer> {
  const out = Buffer.alloc(map.blocks * ID_SIZE);
  let next = 0;
  for await (const run of readMap(map, load)) {
    expect(run.firstBlock).toBe(next);
    expect(run.count).toBeGreaterThan(0);
    if (run.entries) {
      expect(run.entries.length).toBe(run.count * ID_SIZE);
      run.entries.copy(out, run.firstBlock * ID_SIZE);
    } // else: all zero, and `out` is already zero there
    next += run.count;
  }
  expect(next).toBe(map.blocks);
  return out;
}

async function collectPageIds(map: MapRoot, load: LoadPage): Promise<{ id: string; kind: number }[]> {
  const ids: { id: string; kind: number }[] = [];
  for await (const page of mapPageIds(map, load)) ids.push({ id: page.id.toString('hex'), kind: page.kind });
  return ids;
}

async function expectRejects(promise: Promise<unknown>): Promise<CorruptMetadataError> {
  const error = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(CorruptMetadataError);
  return error as CorruptMetadataError;
}

async function drain<T>(generator: AsyncGenerator<T>): Promise<T[]> {
  const items: T[] = [];
  for await (const item of generator) items.push(item);
  return items;
}

function assertNoZeroPagesStored(store: MemoryPageStore): void {
  for (const { page } of store.pages.values()) {
    expect(page.length % ID_SIZE).toBe(0);
    expect(page.length).toBeGreaterThan(0);
    expect(page.length).toBeLessThanOrEqual(PAGE_BYTES);
    expect(page.equals(Buffer.alloc(page.length))).toBe(false);
  }
}

describe('mapDepth', () => {
  test('boundaries', () => {
    expect(mapDepth(0)).toBe(0);
    expect(mapDepth(1)).toBe(0);
    expect(mapDepth(1024)).toBe(0);
    expect(mapDepth(1025)).toBe(1);
    expect(mapDepth(1024 * 1024)).toBe(1);
    expect(mapDepth(1024 * 1024 + 1)).toBe(2);
    expect(mapDepth(1024 ** 3)).toBe(2);
    expect(mapDepth(1024 ** 3 + 1)).toBe(3);
  });
});

describe('MapBuilder + readMap + mapPageIds', () => {
  test('0 blocks: root is ZERO_ID, nothing stored, nothing read', async () => {
    const store = new MemoryPageStore();
    const map = await build(store, 0, entryFor);
    expect(map).toEqual({ root: ZERO_ID, depth: 0, blocks: 0 });
    expect(store.pages.size).toBe(0);
    expect(await drain(readMap(map, store.load))).toEqual([]);
    expect(await collectPageIds(map, store.load)).toEqual([]);
  });

  test('1 block', async () => {
    const store = new MemoryPageStore();
    const map = await build(store, 1, entryFor);
    expect(map.depth).toBe(0);
    expect(map.blocks).toBe(1);
    expect(map.root.equals(sha256(entryFor(0)))).toBe(true);
    expect(store.pages.size).toBe(1);
    const [stored] = [...store.pages.values()];
    expect(stored!.kind).toBe(KIND_MAP_LEAF);
    expect(stored!.page.equals(entryFor(0))).toBe(true);
    expect(await drain(readMap(map, store.load))).toEqual([{ firstBlock: 0, count: 1, entries: entryFor(0) }]);
    expect(await collectPageIds(map, store.load)).toEqual([{ id: map.root.toString('hex'), kind: KIND_MAP_LEAF }]);
  });

  test('1 zero block: root is ZERO_ID and read back as one zero run', async () => {
    const store = new MemoryPageStore();
    const map = await build(store, 1, () => ZERO_ID);
    expect(map.root.equals(ZERO_ID)).toBe(true);
    expect(store.pages.size).toBe(0);
    expect(await drain(readMap(map, store.load))).toEqual([{ firstBlock: 0, count: 1, entries: null }]);
    expect(await collectPageIds(map, store.load)).toEqual([]);
  });

  for (const blocks of [1023, 1024, 1025]) {
    test(`${blocks} blocks`, async () => {
      const store = new MemoryPageStore();
      const map = await build(store, blocks, entryFor);
      expect(map.depth).toBe(blocks <= 1024 ? 0 : 1);
      expect(map.blocks).toBe(blocks);
      const expected = Buffer.concat(Array.from({ length: blocks }, (_, i) => entryFor(i)));
      const readBack = await readAll(map, store.load);
      for (let i = 0; i < blocks; i += 1) {
        expect(readBack.subarray(i * ID_SIZE, (i + 1) * ID_SIZE).equals(entryFor(i))).toBe(true);
      }
      expect(readBack.equals(expected)).toBe(true);

      const pages = await collectPageIds(map, store.load);
      expect(pages[0]).toEqual({ id: map.root.toString('hex'), kind: map.depth === 0 ? KIND_MAP_LEAF : KIND_MAP_NODE });
      if (blocks <= 1024) {
        expect(store.pages.size).toBe(1);
        expect(store.pages.get(map.root.toString('hex'))!.page.equals(expected)).toBe(true);
      } else {
        // Two leaves (1024 + 1 entries) and a root of two ids.
        expect(store.pages.size).toBe(3);
        const leaf0 = sha256(expected.subarray(0, PAGE_BYTES));
        const leaf1 = sha256(expected.subarray(PAGE_BYTES));
        const root = store.pages.get(map.root.toString('hex'))!;
        expect(root.kind).toBe(KIND_MAP_NODE);
        expect(root.page.equals(Buffer.concat([leaf0, leaf1]))).toBe(true);
        expect(store.pages.get(leaf1.toString('hex'))!.page.length).toBe(ID_SIZE);
        expect(pages).toEqual([
          { id: map.root.toString('hex'), kind: KIND_MAP_NODE },
          { id: leaf0.toString('hex'), kind: KIND_MAP_LEAF },
          { id: leaf1.toString('hex'), kind: KIND_MAP_LEAF },
        ]);
      }
      expect(new Set(pages.map((p) => p.id))).toEqual(new Set(store.pages.keys()));
      assertNoZeroPagesStored(store);
    });
  }

  test('1024*1024+1 blocks: depth 2, mostly zero, only non-zero pages stored', async () => {
    const blocks = 1024 * 1024 + 1;
    const nonZero = new Map<number, Buffer>([0, 1023, 1024, 500_000, 1024 * 1024 - 1, 1024 * 1024].map((i) => [i, entryFor(i)]));
    const store = new MemoryPageStore();
    const map = await build(store, blocks, (i) => nonZero.get(i) ?? ZERO_ID);
    expect(map.depth).toBe(2);
    expect(map.blocks).toBe(blocks);

    // Leaves holding a non-zero entry: 0 (blocks 0, 1023), 1 (1024), 488 (500000), 1023 (1048575), 1024 (1048576).
    // Level-1 nodes: node 0 (leaves 0..1023) and node 1 (leaf 1024). Plus the root.
    expect(store.pages.size).toBe(5 + 2 + 1);
    assertNoZeroPagesStored(store);
    const kinds = [...store.pages.values()].map((p) => p.kind);
    expect(kinds.filter((k) => k === KIND_MAP_LEAF)).toHaveLength(5);
    expect(kinds.filter((k) => k === KIND_MAP_NODE)).toHaveLength(3);
    const root = store.pages.get(map.root.toString('hex'))!;
    expect(root.page.length).toBe(2 * ID_SIZE);
    // The last leaf holds exactly one entry.
    const lastLeaf = sha256(entryFor(1024 * 1024));
    expect(store.pages.get(lastLeaf.toString('hex'))!.page.length).toBe(ID_SIZE);

    const runs = await drain(readMap(map, store.load));
    const readBack = new Map<number, Buffer>();
    let next = 0;
    for (const run of runs) {
      expect(run.firstBlock).toBe(next);
      next += run.count;
      if (!run.entries) continue;
      for (let j = 0; j < run.count; j += 1) {
        const entry = run.entries.subarray(j * ID_SIZE, (j + 1) * ID_SIZE);
        if (!entry.equals(ZERO_ID)) readBack.set(run.firstBlock + j, Buffer.from(entry));
      }
    }
    expect(next).toBe(blocks);
    expect(runs.filter((r) => r.entries !== null)).toHaveLength(5);
    // Zero leaves are reported as zero runs of one leaf each, never loaded.
    expect(runs.filter((r) => r.entries === null).every((r) => r.count === 1024)).toBe(true);
    expect(runs.filter((r) => r.entries === null)).toHaveLength(1024 - 4);
    expect([...readBack.keys()].sort((a, b) => a - b)).toEqual([...nonZero.keys()]);
    for (const [i, entry] of nonZero) expect(readBack.get(i)!.equals(entry)).toBe(true);

    const pages = await collectPageIds(map, store.load);
    expect(pages).toHaveLength(8);
    expect(new Set(pages.map((p) => p.id))).toEqual(new Set(store.pages.keys()));
    expect(pages.filter((p) => p.kind === KIND_MAP_NODE)).toHaveLength(3);
  });

  test('mixed zero and non-zero entries, including a whole zero leaf', async () => {
    const blocks = 4000;
    // Every third block zero; blocks 1024..2047 (the second leaf) all zero; the last leaf all non-zero.
    const entry = (i: number): Buffer => (i % 3 === 0 || (i >= 1024 && i < 2048) ? ZERO_ID : entryFor(i));
    const store = new MemoryPageStore();
    const map = await build(store, blocks, entry);
    expect(map.depth).toBe(1);
    const readBack = await readAll(map, store.load);
    for (let i = 0; i < blocks; i += 1) {
      expect(readBack.subarray(i * ID_SIZE, (i + 1) * ID_SIZE).equals(entry(i))).toBe(true);
    }
    // Leaves 0, 2, 3 stored; leaf 1 is ZERO_ID in the root.
    expect(store.pages.size).toBe(4);
    assertNoZeroPagesStored(store);
    const root = store.pages.get(map.root.toString('hex'))!.page;
    expect(root.length).toBe(4 * ID_SIZE);
    expect(root.subarray(ID_SIZE, 2 * ID_SIZE).equals(ZERO_ID)).toBe(true);
    const runs = await drain(readMap(map, store.load));
    expect(runs.map((r) => ({ firstBlock: r.firstBlock, count: r.count, zero: r.entries === null }))).toEqual([
      { firstBlock: 0, count: 1024, zero: false },
      { firstBlock: 1024, count: 1024, zero: true },
      { firstBlock: 2048, count: 1024, zero: false },
      { firstBlock: 3072, count: 928, zero: false },
    ]);
    expect(await collectPageIds(map, store.load)).toHaveLength(4);
  });

  test('an all-zero disk of several leaves stores nothing and reads back as zero runs', async () => {
    const store = new MemoryPageStore();
    const map = await build(store, 3000, () => ZERO_ID);
    expect(map.root.equals(ZERO_ID)).toBe(true);
    expect(map.depth).toBe(1);
    expect(store.pages.size).toBe(0);
    expect(store.storeCalls).toBe(0);
    expect(await drain(readMap(map, store.load))).toEqual([{ firstBlock: 0, count: 3000, entries: null }]);
  });

  test('the builder refuses too many or too few entries', async () => {
    const store = new MemoryPageStore();
    const builder = new MapBuilder(2, store.store);
    await builder.push(entryFor(0));
    await expect(builder.finish()).rejects.toThrow('map has 1 of 2 entries');
    await builder.push(entryFor(1));
    await expect(builder.push(entryFor(2))).rejects.toThrow('more map entries than blocks');
  });

  test('a depth that does not fit the block count is CorruptMetadataError', async () => {
    const store = new MemoryPageStore();
    const map = await build(store, 1000, entryFor);
    await expectRejects(drain(readMap({ ...map, depth: 1 }, store.load)));
    const deep = await build(store, 2000, entryFor);
    await expectRejects(drain(readMap({ ...deep, depth: 0 }, store.load)));
    await expectRejects(drain(readMap({ ...deep, depth: 2 }, store.load)));
    // Claiming more blocks than the tree holds at the same depth is caught by the page length check.
    await expectRejects(drain(readMap({ ...map, blocks: 1001 }, store.load)));
  });

  test('a leaf page of the wrong length is CorruptMetadataError', async () => {
    const store = new MemoryPageStore();
    const map = await build(store, 1024, entryFor);
    const key = map.root.toString('hex');
    const good = store.pages.get(key)!;
    store.pages.set(key, { kind: KIND_MAP_LEAF, page: good.page.subarray(0, PAGE_BYTES - ID_SIZE) });
    const error = await expectRejects(drain(readMap(map, store.load)));
    expect(error.message).toContain('holds 1023 entries, expected 1024');
    store.pages.set(key, { kind: KIND_MAP_LEAF, page: Buffer.concat([good.page, Buffer.alloc(ID_SIZE, 1)]) });
    await expectRejects(drain(readMap(map, store.load)));
  });

  test('a node page of the wrong length is CorruptMetadataError', async () => {
    const store = new MemoryPageStore();
    const map = await build(store, 2500, entryFor);
    const key = map.root.toString('hex');
    const good = store.pages.get(key)!;
    expect(good.page.length).toBe(3 * ID_SIZE);
    store.pages.set(key, { kind: KIND_MAP_NODE, page: good.page.subarray(0, 2 * ID_SIZE) });
    const error = await expectRejects(drain(readMap(map, store.load)));
    expect(error.message).toContain('holds 2 children, expected 3');
    // A short last leaf is caught too.
    store.pages.set(key, good);
    const lastLeaf = good.page.subarray(2 * ID_SIZE).toString('hex');
    const leaf = store.pages.get(lastLeaf)!;
    store.pages.set(lastLeaf, { kind: KIND_MAP_LEAF, page: leaf.page.subarray(ID_SIZE) });
    const leafError = await expectRejects(drain(readMap(map, store.load)));
    expect(leafError.message).toContain(`holds ${2500 - 2048 - 1} entries, expected ${2500 - 2048}`);
  });

  test('changing one entry of a 5000-block map and rebuilding stores exactly 2 new pages', async () => {
    const store = new MemoryPageStore();
    const first = await build(store, 5000, entryFor);
    expect(first.depth).toBe(1);
    expect(store.pages.size).toBe(5 + 1); // five leaves and a root
    const before = new Set(store.pages.keys());

    const changed = 2600;
    const second = await build(store, 5000, (i) => (i === changed ? entryFor(i, ' changed') : entryFor(i)));
    const added = [...store.pages.keys()].filter((k) => !before.has(k));
    expect(added).toHaveLength(2);
    const addedKinds = added.map((k) => store.pages.get(k)!.kind).sort();
    expect(addedKinds).toEqual([KIND_MAP_LEAF, KIND_MAP_NODE]);
    expect(added).toContain(second.root.toString('hex'));
    expect(second.root.equals(first.root)).toBe(false);

    // The two roots differ only in the id of leaf 2 (blocks 2048..3071).
    const rootA = store.pages.get(first.root.toString('hex'))!.page;
    const rootB = store.pages.get(second.root.toString('hex'))!.page;
    for (let leaf = 0; leaf < 5; leaf += 1) {
      const same = rootA.subarray(leaf * ID_SIZE, (leaf + 1) * ID_SIZE).equals(rootB.subarray(leaf * ID_SIZE, (leaf + 1) * ID_SIZE));
      expect(same).toBe(leaf !== 2);
    }

    // Both versions still read back correctly from the shared store.
    const a = await readAll(first, store.load);
    const b = await readAll(second, store.load);
    for (let i = 0; i < 5000; i += 1) {
      const ea = a.subarray(i * ID_SIZE, (i + 1) * ID_SIZE);
      const eb = b.subarray(i * ID_SIZE, (i + 1) * ID_SIZE);
      expect(ea.equals(entryFor(i))).toBe(true);
      expect(eb.equals(i === changed ? entryFor(i, ' changed') : entryFor(i))).toBe(true);
    }

    // Rebuilding the same map again adds nothing.
    await build(store, 5000, (i) => (i === changed ? entryFor(i, ' changed') : entryFor(i)));
    expect(store.pages.size).toBe(8);
  });
});

/**
 * Spans (pushZeros, pushSpan from a parent's map) build the very map that push() of every entry builds —
 * same root, same pages — while whole pages go in as one id at the highest level they fill: a thin disk of
 * many TiB costs its pages, not its blocks (SPEC.md, section 8; issue 15, item 6).
 */
describe('MapBuilder spans', () => {
  /** A layout of `blocks` blocks: data runs (entryFor) and zero runs, as [first, count, 'data' | 'zero']. */
  type Segment = [number, number, 'data' | 'zero'];
  const L1 = MAP_PAGE_ENTRIES;
  const L2 = MAP_PAGE_ENTRIES ** 2;

  function entryOf(segments: Segment[], block: number, variant = ''): Buffer {
    const segment = segments.find(([first, count]) => block >= first && block < first + count)!;
    return segment[2] === 'data' ? entryFor(block, variant) : ZERO_ID;
  }

  async function buildBySpans(store: MemoryPageStore, blocks: number, segments: Segment[]): Promise<MapRoot> {
    const builder = new MapBuilder(blocks, store.store);
    for (const [first, count, kind] of segments) {
      if (kind === 'zero') await builder.pushZeros(count);
      else for (let i = first; i < first + count; i += 1) await builder.push(entryFor(i));
    }
    return builder.finish();
  }

  function storedPages(store: MemoryPageStore): string[] {
    return [...store.pages.entries()].map(([id, { kind, page }]) => `${id}:${kind}:${page.toString('hex')}`).sort();
  }

  // Zero runs that start mid-leaf, cover whole leaves, whole level-1 pages, and reach the short last pages.
  const blocks = 2 * L2 + 3 * L1 + 5;
  const segments: Segment[] = [
    [0, 3, 'data'],
    [3, L1 - 3 + 2 * L1 + 7, 'zero'],
    [3 * L1 + 7, 2, 'data'],
    [3 * L1 + 9, L2 + L1 - (3 * L1 + 9) + 3, 'zero'], // to the middle of level-1 page 1's second leaf
    [L2 + L1 + 3, L1, 'data'],
    [L2 + 2 * L1 + 3, blocks - (L2 + 2 * L1 + 3), 'zero'], // all of level-1 page 2 (short) and the rest
  ];

  test('zero runs give the same root and pages as push() of each ZERO_ID, with ZERO_ID at the levels they fill', async () => {
    const byBlock = new MemoryPageStore();
    const expected = await build(byBlock, blocks, (i) => entryOf(segments, i));
    const bySpan = new MemoryPageStore();
    const got = await buildBySpans(bySpan, blocks, segments);
    expect(got).toEqual(expected);
    expect(got.depth).toBe(2);
    expect(storedPages(bySpan)).toEqual(storedPages(byBlock));
    assertNoZeroPagesStored(bySpan);
    // The root: level-1 pages 0 and 1 hold data, page 2 (the short one, all zero) is ZERO_ID.
    const root = await bySpan.load(got.root, KIND_MAP_NODE);
    expect(root.length).toBe(3 * ID_SIZE);
    expect(root.subarray(2 * ID_SIZE).equals(ZERO_ID)).toBe(true);
    // Level-1 page 0: leaves 1 and 2 are zero, leaf 3 holds data, leaves 4.. are zero.
    const page0 = await bySpan.load(root.subarray(0, ID_SIZE), KIND_MAP_NODE);
    const child = (page: Buffer, i: number) => page.subarray(i * ID_SIZE, (i + 1) * ID_SIZE);
    expect([1, 2, 4, 1023].map((i) => child(page0, i).equals(ZERO_ID))).toEqual([true, true, true, true]);
    expect([0, 3].map((i) => child(page0, i).equals(ZERO_ID))).toEqual([false, false]);
    expect((await readAll(got, bySpan.load)).equals(await readAll(expected, byBlock.load))).toBe(true);
  });

  test('a zero run of 2^34 blocks (16 PiB at 1 MiB) goes in as pages, not blocks', async () => {
    const huge = 2 ** 34 + 1000;
    const store = new MemoryPageStore();
    const builder = new MapBuilder(huge, store.store);
    expect(builder.depth).toBe(3);
    const dataAt = [0, 2 ** 33 + 5, huge - 1];
    let next = 0;
    for (const block of dataAt) {
      await builder.pushZeros(block - next);
      await builder.push(entryFor(block));
      next = block + 1;
    }
    const map = await builder.finish();
    // Each data block stores its leaf and the node pages above it: 3 paths of 4 pages, and nothing else.
    expect(store.pages.size).toBe(10); // the root is shared by all three paths
    const found: number[] = [];
    let zeros = 0;
    for await (const run of readMap(map, store.load)) {
      if (run.entries === null) {
        zeros += run.count;
        continue;
      }
      for (let i = 0; i < run.count; i += 1) {
        const entry = run.entries.subarray(i * ID_SIZE, (i + 1) * ID_SIZE);
        if (entry.equals(ZERO_ID)) zeros += 1;
        else {
          expect(entry.equals(entryFor(run.firstBlock + i))).toBe(true);
          found.push(run.firstBlock + i);
        }
      }
    }
    expect(found).toEqual(dataAt);
    expect(zeros).toBe(huge - dataAt.length);
  });

  test("unchanged spans from the parent's map (MapPageReader) give the map of every entry pushed, reading only the edge pages", async () => {
    const parentStore = new MemoryPageStore();
    const parent = await build(parentStore, blocks, (i) => entryOf(segments, i));
    // The child changes blocks 5, L2 + L1 + 10 and the last one; every other block is the parent's.
    const changed = [5, L2 + L1 + 10, blocks - 1];
    const childEntry = (i: number) => (changed.includes(i) ? entryFor(i, 'changed') : entryOf(segments, i));
    const byBlock = new MemoryPageStore();
    for (const page of parentStore.pages.values()) await byBlock.store(page.kind, page.page);
    const expected = await build(byBlock, blocks, childEntry);

    const store = new MemoryPageStore();
    for (const page of parentStore.pages.values()) await store.store(page.kind, page.page);
    store.loads = 0;
    const reader = new MapPageReader(parent, store.load);
    const builder = new MapBuilder(blocks, store.store);
    let next = 0;
    for (const block of changed) {
      await builder.pushSpan(block - next, reader);
      await builder.push(childEntry(block));
      next = block + 1;
    }
    const got = await builder.finish();
    expect(got).toEqual(expected);
    expect(storedPages(store)).toEqual(storedPages(byBlock));
    // Pages read: the root, the level-1 pages 0 and 1 on the changed paths and the two leaves the spans cut
    // there (those of blocks 5 and L2 + L1 + 10); the last block's path (level-1 page 2) is ZERO_ID, never
    // read. Never every leaf of the parent.
    expect(store.loads).toBe(5);
  });

  test('MapPageReader reads entries and page ids by position, and refuses a block past the map', async () => {
    const store = new MemoryPageStore();
    const map = await build(store, blocks, (i) => entryOf(segments, i));
    const reader = new MapPageReader(map, store.load);
    for (const block of [0, 2, 3, 3 * L1 + 8, L2 + L1 + 3, L2 + 2 * L1 + 2, blocks - 1]) {
      expect((await reader.entry(block)).equals(entryOf(segments, block))).toBe(true);
    }
    expect((await reader.pageId(2, 0)).equals(map.root)).toBe(true);
    expect((await reader.pageId(1, 2 * L2)).equals(ZERO_ID)).toBe(true);
    expect((await reader.pageId(0, L1)).equals(ZERO_ID)).toBe(true);
    await expectRejects(reader.entry(blocks));
  });
});
