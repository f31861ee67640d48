/**
 * The pipeline's pure pieces, without a disk or root: the slot pool that bounds memory, the cursors that
 * walk a parent map and the dirty extents in block order, and the block set restores use.
 */
import { describe, expect, test } from 'vitest';
import { availableParallelism } from 'node:os';
import { SlotPool } from '../dist/engine/pipeline/slot-pool.js';
import { BlockQueue } from '../dist/engine/pipeline/block-queue.js';
import { BYTES_PER_WORKER, INLINE_MAX_BYTES, runsInline, workersFor } from '../dist/engine/pipeline/block-pool.js';
import { DirtyCursor, mergeRanges, type Range } from '../dist/engine/pipeline/map-cursors.js';
import { BlockSet } from '../dist/engine/common/block-set.js';
import { MapBuilder, MapPageReader, type MapRoot } from '../dist/repo-format/block-map.js';
import { EngineError } from '../dist/repo-format/errors.js';
import { ID_SIZE, MAP_PAGE_ENTRIES, ZERO_ID } from '../dist/repo-format/constants.js';

/** Whether a promise has settled by the time the microtask queue drains. */
async function settled(promise: Promise<unknown>): Promise<boolean> {
  let done = false;
  promise.then(
    () => (done = true),
    () => (done = true),
  );
  await new Promise((resolve) => setImmediate(resolve));
  return done;
}

describe('workers for a job', () => {
  test('as asked, one per core by default, but never more than one per BYTES_PER_WORKER of work, and at least one', () => {
    const cores = availableParallelism();
    expect(workersFor(undefined, undefined)).toBe(cores);
    expect(workersFor(3, undefined)).toBe(3);
    expect(workersFor(4, 0)).toBe(1);
    expect(workersFor(4, 10 * 1024 * 1024)).toBe(1);
    expect(workersFor(4, BYTES_PER_WORKER)).toBe(1);
    expect(workersFor(4, BYTES_PER_WORKER + 1)).toBe(2);
    expect(workersFor(4, 2 ** 40)).toBe(4);
    expect(workersFor(undefined, 2 ** 40)).toBe(cores);
    expect(workersFor(1, 2 ** 40)).toBe(1);
  });
});

describe('small jobs on the main thread', () => {
  test('a job of at most INLINE_MAX_BYTES of known work starts no worker, unless workers were asked for or the tests force the pool', () => {
    const saved = process.env.ENGINE_TEST_BLOCK_WORKERS;
    try {
      delete process.env.ENGINE_TEST_BLOCK_WORKERS;
      expect(runsInline(undefined, 0)).toBe(true);
      expect(runsInline(undefined, INLINE_MAX_BYTES)).toBe(true);
      expect(runsInline(undefined, INLINE_MAX_BYTES + 1)).toBe(false);
      expect(runsInline(undefined, undefined)).toBe(false);
      expect(runsInline(1, 0)).toBe(false);
      process.env.ENGINE_TEST_BLOCK_WORKERS = 'pool';
      expect(runsInline(undefined, 0)).toBe(false);
    } finally {
      if (saved === undefined) delete process.env.ENGINE_TEST_BLOCK_WORKERS;
      else process.env.ENGINE_TEST_BLOCK_WORKERS = saved;
    }
  });
});

describe('SlotPool', () => {
  test('hands out each slot once, lowest first, then makes acquirers wait', async () => {
    const pool = new SlotPool(3);
    expect(pool.available).toBe(3);
    expect([await pool.acquire(), await pool.acquire(), await pool.acquire()]).toEqual([0, 1, 2]);
    expect(pool.available).toBe(0);
    const waiting = pool.acquire();
    expect(await settled(waiting)).toBe(false);
    pool.release(1);
    expect(await waiting).toBe(1);
    expect(pool.available).toBe(0);
  });

  test('waiters are served in order, each with the slot released', async () => {
    const pool = new SlotPool(2);
    await pool.acquire();
    await pool.acquire();
    const served: [string, number][] = [];
    const first = pool.acquire().then((slot) => served.push(['first', slot]));
    const second = pool.acquire().then((slot) => served.push(['second', slot]));
    pool.release(1);
    pool.release(0);
    await Promise.all([first, second]);
    expect(served).toEqual([
      ['first', 1],
      ['second', 0],
    ]);
  });

  test('a release with no waiter returns the slot to the pool', async () => {
    const pool = new SlotPool(1);
    const slot = await pool.acquire();
    pool.release(slot);
    expect(pool.available).toBe(1);
    expect(await pool.acquire()).toBe(slot);
  });

  test('acquireMany waits until that many are free, holds none meanwhile, and is not overtaken by a later single acquire', async () => {
    const pool = new SlotPool(4);
    const taken = await pool.acquireMany(3);
    expect(taken).toHaveLength(3);
    const run = pool.acquireMany(3);
    const single = pool.acquire();
    expect(await settled(run)).toBe(false);
    expect(pool.available).toBe(1); // the one free slot is not held by the waiting run, nor given to the later single acquire
    expect(pool.tryAcquire(1)).toBeUndefined(); // nor taken past the waiters
    expect(await settled(single)).toBe(false);
    pool.release(taken[0]!);
    expect(await settled(run)).toBe(false);
    pool.release(taken[1]!);
    const got = await run;
    expect(new Set(got).size).toBe(3);
    expect(await settled(single)).toBe(false);
    pool.release(taken[2]!);
    expect(got).not.toContain(await single);
    expect(pool.available).toBe(0);
  });

  test('acquireMany refuses more slots than the pool has, rather than wait forever', async () => {
    const pool = new SlotPool(2);
    await expect(pool.acquireMany(3)).rejects.toThrow('3 slots asked of a pool of 2');
    await expect(pool.acquireMany(0)).rejects.toThrow(RangeError);
    expect(pool.available).toBe(2);
  });

  test('fail rejects every waiter and every later acquire with the error', async () => {
    const pool = new SlotPool(1);
    await pool.acquire();
    const waiters = [pool.acquire(), pool.acquire()];
    const error = new Error('pipeline stopped');
    pool.fail(error);
    for (const waiter of waiters) await expect(waiter).rejects.toBe(error);
    await expect(pool.acquire()).rejects.toBe(error);
  });
});

/** An id for block `b` (never the zero id), and a map of `blocks` blocks whose zero blocks are `zero(b)`, its pages in memory. */
const entryOf = (b: number): Buffer => {
  const id = Buffer.alloc(ID_SIZE, 0xaa);
  id.writeUInt32LE(b, 0);
  return id;
};

async function memoryMap(blocks: number, zero: (b: number) => boolean): Promise<{ root: MapRoot; loadPage: (id: Buffer) => Promise<Buffer>; loads: () => number }> {
  const pages = new Map<string, Buffer>();
  let next = 0;
  const builder = new MapBuilder(blocks, async (_kind, page) => {
    const id = Buffer.alloc(ID_SIZE, 0x55);
    id.writeUInt32LE((next += 1), 0);
    pages.set(id.toString('hex'), Buffer.from(page));
    return id;
  });
  for (let b = 0; b < blocks; b += 1) await builder.push(zero(b) ? ZERO_ID : entryOf(b));
  let loads = 0;
  return {
    root: await builder.finish(),
    loadPage: async (id) => {
      loads += 1;
      return pages.get(id.toString('hex'))!;
    },
    loads: () => loads,
  };
}

describe('BlockQueue (reader to assembler)', () => {
  /** Lets every settled promise's callbacks run. */
  const settle = () => new Promise<void>((resolve) => setImmediate(resolve));

  test('push waits while `limit` items are queued, and goes on when one is taken', async () => {
    const queue = new BlockQueue<number>(3);
    let pushed = 0;
    const producer = (async () => {
      for (let i = 0; i < 10; i += 1) {
        await queue.push(i);
        pushed += 1;
      }
    })();
    await settle();
    expect(pushed).toBe(3);
    expect(queue.length).toBe(3);
    expect(await queue.shift()).toBe(0);
    await settle();
    expect(pushed).toBe(4);
    expect(queue.length).toBe(3);
    const rest: number[] = [];
    for (let i = 1; i < 10; i += 1) rest.push((await queue.shift())!);
    await producer;
    expect(rest).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9]);
    expect(pushed).toBe(10);
  });

  test('end releases a waiting push (the item is dropped) and the consumer drains what is queued, then gets undefined', async () => {
    const queue = new BlockQueue<string>(1);
    await queue.push('a');
    let released = false;
    const waiting = queue.push('b').then(() => (released = true));
    await settle();
    expect(released).toBe(false);
    queue.end();
    await waiting;
    expect(await queue.shift()).toBe('a');
    expect(await queue.shift()).toBeUndefined();
  });

  test('a limit that is not a whole number ≥ 1 is refused', () => {
    expect(() => new BlockQueue<number>(0)).toThrow(RangeError);
  });
});

describe("MapPageReader (a parent's map read by block)", () => {
  test('gives each block its entry across pages, zero runs as the zero id', async () => {
    const blocks = 2 * MAP_PAGE_ENTRIES + 10;
    const zero = (b: number): boolean => b >= MAP_PAGE_ENTRIES && b < 2 * MAP_PAGE_ENTRIES; // a whole zero page
    const map = await memoryMap(blocks, zero);
    const cursor = new MapPageReader(map.root, map.loadPage);
    for (let b = 0; b < blocks; b += 1) expect((await cursor.entry(b)).equals(zero(b) ? ZERO_ID : entryOf(b))).toBe(true);
  });

  test('skipping forward loads only the pages on the path to the block (lazily), and repeating a block is allowed', async () => {
    const blocks = 3 * MAP_PAGE_ENTRIES;
    const map = await memoryMap(blocks, () => false);
    const cursor = new MapPageReader(map.root, map.loadPage);
    expect(map.loads()).toBe(0);
    expect((await cursor.entry(5)).equals(entryOf(5))).toBe(true);
    expect((await cursor.entry(5)).equals(entryOf(5))).toBe(true);
    const afterFirst = map.loads();
    expect((await cursor.entry(3 * MAP_PAGE_ENTRIES - 1)).equals(entryOf(3 * MAP_PAGE_ENTRIES - 1))).toBe(true);
    expect(map.loads()).toBe(afterFirst + 1); // the third leaf, not the second it skips; the root was loaded once
  });

  test('a map shorter than the disk it is read for: ENGINE_CORRUPT_METADATA naming the map, not a bare error', async () => {
    const map = await memoryMap(4, () => false);
    const cursor = new MapPageReader(map.root, map.loadPage);
    expect((await cursor.entry(3)).equals(entryOf(3))).toBe(true);
    const error = await cursor.entry(4).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(EngineError);
    expect((error as EngineError).code).toBe('ENGINE_CORRUPT_METADATA');
    expect((error as EngineError).message).toBe(`block map ${map.root.root.toString('hex').slice(0, 16)}… is damaged: it covers 4 blocks, and block 4 of the disk it is read for was asked`);
  });
});

async function* ranges(list: Range[]): AsyncGenerator<Range> {
  yield* list;
}

describe('DirtyCursor', () => {
  const BS = 4096;

  test('the first block at or after a block that a dirty byte touches, ranges not aligned to blocks', async () => {
    const cursor = new DirtyCursor(ranges([
      { offset: 100, length: 10 }, // block 0
      { offset: 3 * BS - 1, length: 2 }, // the last byte of block 2 and the first of block 3
      { offset: 10 * BS, length: 5 * BS }, // blocks 10 to 14
    ]));
    expect(await cursor.nextDirtyBlock(0, BS, 100)).toBe(0);
    expect(await cursor.nextDirtyBlock(1, BS, 100)).toBe(2);
    expect(await cursor.nextDirtyBlock(3, BS, 100)).toBe(3);
    expect(await cursor.nextDirtyBlock(4, BS, 100)).toBe(10);
    expect(await cursor.nextDirtyBlock(12, BS, 100)).toBe(12); // inside a range: the block itself
    expect(await cursor.nextDirtyBlock(15, BS, 100)).toBe(100); // none left: the block count
    expect(await cursor.nextDirtyBlock(50, BS, 100)).toBe(100);
  });

  test('a dirty range past the end of the disk does not reach past the block count; no ranges at all', async () => {
    expect(await new DirtyCursor(ranges([{ offset: 200 * BS, length: BS }])).nextDirtyBlock(0, BS, 100)).toBe(100);
    expect(await new DirtyCursor(ranges([])).nextDirtyBlock(0, BS, 100)).toBe(100);
  });

  test('offsets past 2^32 (a large disk): block arithmetic without bitwise operators', async () => {
    const big = 2 ** 40;
    const cursor = new DirtyCursor(ranges([{ offset: big + 5, length: 1 }]));
    expect(await cursor.nextDirtyBlock(0, BS, big / BS + 10)).toBe(big / BS);
  });
});

describe('mergeRanges', () => {
  test('the ranges of a stream and of a sorted list, in order of offset', async () => {
    const merged: Range[] = [];
    for await (const range of mergeRanges(ranges([{ offset: 10, length: 1 }, { offset: 30, length: 1 }]), [{ offset: 0, length: 1 }, { offset: 20, length: 1 }, { offset: 40, length: 1 }])) merged.push(range);
    expect(merged.map((r) => r.offset)).toEqual([0, 10, 20, 30, 40]);
    const onlyExtra: Range[] = [];
    for await (const range of mergeRanges(ranges([]), [{ offset: 5, length: 1 }])) onlyExtra.push(range);
    expect(onlyExtra).toEqual([{ offset: 5, length: 1 }]);
  });
});

describe('BlockSet', () => {
  test('adds and finds blocks, counts each once', () => {
    const set = new BlockSet();
    for (const b of [0, 7, 8, 32767, 32768, 7]) set.add(b);
    expect(set.size).toBe(5);
    for (const b of [0, 7, 8, 32767, 32768]) expect(set.has(b)).toBe(true);
    for (const b of [1, 6, 9, 32766, 32769, 65536]) expect(set.has(b)).toBe(false);
  });

  test('memory follows the regions touched, not the highest block: block numbers past 2^32', () => {
    const set = new BlockSet();
    const far = 2 ** 40 + 3; // a 64 PiB disk at 1 KiB blocks
    set.add(far);
    set.add(far + 1);
    set.add(1);
    expect(set.has(far)).toBe(true);
    expect(set.has(far + 1)).toBe(true);
    expect(set.has(far + 2)).toBe(false);
    expect(set.has(far - 2 ** 32)).toBe(false); // a bitwise 32-bit wrap would alias these
    expect(set.size).toBe(3);
    expect(set.memoryBytes).toBe(2 * 4096);
  });
});
