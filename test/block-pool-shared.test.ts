/**
 * The server's one worker pool (engine/pipeline/shared-pool.ts), through the engine's library API as the server
 * calls it: jobs side by side on one pool restore byte for byte; one cancelled mid-run leaves the other whole; a
 * task that throws fails only its job, a thread killed fails none; a small job's tasks are sent in turn with a big
 * job's, not after them; slots are the arena's, counted, however many jobs ask.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { join } from 'node:path';
import { backup } from '../dist/engine/backup/backup.js';
import { restore } from '../dist/engine/restore/restore.js';
import { SharedBlockPool, MIN_LEASE_SLOTS, ARENA_BYTES } from '../dist/engine/pipeline/shared-pool.js';
import { LZ4 } from '../dist/repo-format/compression.js';
import { EngineError } from '../dist/repo-format/errors.js';
import { filesIdentical, initRepository, tempDir, writeRegion } from './helpers.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;
let repo: string;
let pool: SharedBlockPool;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-shared-pool-'));
  repo = join(dir, 'repo');
  await initRepository(repo);
  await writeRegion(join(dir, 'big.img'), 0, 48 * MiB, 'random', 'big');
  await writeRegion(join(dir, 'a.img'), 0, 20 * MiB, 'random', 'a');
  await writeRegion(join(dir, 'b.img'), 0, 24 * MiB, 'random', 'b');
  // Two threads, two jobs at once: each job's share of the 64-slot arena is 32 slots.
  pool = new SharedBlockPool({ workers: 2, jobs: 2 });
});

afterAll(async () => {
  await pool?.close();
  await cleanup?.();
});

function backupOf(name: string, options: { signal?: AbortSignal; onProgress?: () => void } = {}): Promise<string> {
  return backup({ repo, from: { kind: 'disks', disks: [{ kind: 'raw', path: join(dir, name), name }] }, sharedPool: pool, ...options }).then(({ record }) => record.id);
}

function restoreOf(id: string, target: string): Promise<unknown> {
  return restore({ repo, backupId: id, target: { kind: 'file', path: target }, sharedPool: pool });
}

/** Every arena's slots free again: no job holds any. */
function allFree(): boolean {
  return pool.slotCounts().every((arena) => arena.free === arena.slots);
}

describe('one worker pool for many jobs', () => {
  test('two backups at once, then their two restores at once: byte for byte; the slots all given back', async () => {
    const [a, b] = await Promise.all([backupOf('a.img'), backupOf('b.img')]);
    await Promise.all([restoreOf(a, join(dir, 'a.out')), restoreOf(b, join(dir, 'b.out'))]);
    expect(await filesIdentical(join(dir, 'a.out'), join(dir, 'a.img'))).toBe(true);
    expect(await filesIdentical(join(dir, 'b.out'), join(dir, 'b.img'))).toBe(true);
    expect(pool.slotCounts()).toEqual([{ blockSize: MiB, slots: ARENA_BYTES / MiB, free: ARENA_BYTES / MiB }]);
  });

  test('one job cancelled mid-run while another completes: the other restores byte for byte', async () => {
    const controller = new AbortController();
    let started = false;
    const cancelled = backupOf('big.img', { signal: controller.signal, onProgress: () => (started = true) }).then(
      () => 'succeeded',
      (error: unknown) => (error as EngineError).code,
    );
    const other = backupOf('a.img');
    while (!started) await new Promise((resolve) => setImmediate(resolve));
    controller.abort();
    expect(await cancelled).toBe('ENGINE_INTERRUPTED');
    await restoreOf(await other, join(dir, 'a2.out'));
    expect(await filesIdentical(join(dir, 'a2.out'), join(dir, 'a.img'))).toBe(true);
    expect(allFree()).toBe(true);
  });

  test('a task that throws fails only its job; a thread killed mid-run fails none', async () => {
    // A lease that seals without a compression: its worker throws ENGINE_INTERNAL, for this lease's task alone.
    const broken = await pool.lease({ blockSize: MiB, slotCount: 1 });
    const [slot] = await broken.slots.acquireMany(1);
    broken.input(slot!, MiB).fill(7);
    let killed = false;
    const other = backupOf('b.img', {
      onProgress: () => {
        // The first progress: kill one of the two threads under the running backup (its tasks are sent again).
        if (killed) return;
        killed = true;
        void pool.threads[0]?.terminate();
      },
    });
    const thrown = await broken.seal(slot!, MiB, 0, Buffer.alloc(32)).then(() => undefined, (error: unknown) => error);
    expect(thrown).toBeInstanceOf(EngineError);
    expect((thrown as EngineError).code).toBe('ENGINE_INTERNAL');
    broken.slots.release(slot!);
    await broken.close();
    const id = await other;
    expect(killed).toBe(true);
    await restoreOf(id, join(dir, 'b2.out'));
    expect(await filesIdentical(join(dir, 'b2.out'), join(dir, 'b.img'))).toBe(true);
    expect(allFree()).toBe(true);
  });

  test('a thread killed with tasks on it: they are sent again, to the other thread, with the same answers', async () => {
    const lease = await pool.lease({ blockSize: MiB, compression: LZ4 });
    const slots = await lease.slots.acquireMany(lease.slots.count);
    slots.forEach((slot, i) => lease.input(slot, MiB).fill(i));
    const hashAll = (): Promise<string[]> => Promise.all(Array.from({ length: 64 }, (_, i) => lease.hash(slots[i % slots.length]!, MiB).then((h) => (h.zero ? 'zero' : Buffer.from(h.id).toString('hex')))));
    const expected = await hashAll();
    // Both threads are up (the backups above started them): the first 8 tasks go to them at once, 4 each.
    expect(pool.threads).toHaveLength(2);
    const resent = pool.resent;
    const again = hashAll();
    await Promise.resolve();
    await pool.threads[0]!.terminate();
    expect(await again).toEqual(expected);
    expect(pool.resent - resent).toBeGreaterThan(0);
    for (const slot of slots) lease.slots.release(slot);
    await lease.close();
    expect(allFree()).toBe(true);
  });

  test('fairness: a small job\'s tasks are sent in turn with a big job\'s queue, not after it', async () => {
    const big = await pool.lease({ blockSize: MiB, compression: LZ4 });
    const small = await pool.lease({ blockSize: MiB, compression: LZ4, slotCount: MIN_LEASE_SLOTS });
    pool.recordDispatches();
    const from = pool.dispatched.length;
    // The big job asks for 25 tasks (100 blocks, four to a task), then the small one for 2 (8 blocks).
    const bigSlots = await big.slots.acquireMany(big.slots.count);
    const bigHashes = Array.from({ length: 100 }, (_, i) => big.hash(bigSlots[i % bigSlots.length]!, MiB));
    await Promise.resolve();
    const smallSlots = await small.slots.acquireMany(MIN_LEASE_SLOTS);
    const smallHashes = smallSlots.map((s) => small.hash(s, MiB));
    await Promise.all([...bigHashes, ...smallHashes]);
    const order = pool.dispatched.slice(from).map((d) => (d.slots === smallSlots || d.slots.includes(smallSlots[0]!) ? 'small' : 'big'));
    expect(order.filter((o) => o === 'big')).toHaveLength(25);
    expect(order.filter((o) => o === 'small')).toHaveLength(2);
    // Sent FIFO, the small job's would be the 26th and 27th; in turn, right after the 8 tasks the threads hold (2 × 4).
    expect(order.lastIndexOf('small')).toBeLessThanOrEqual(8 + 2 * 2);
    for (const s of bigSlots) big.slots.release(s);
    for (const s of smallSlots) small.slots.release(s);
    await Promise.all([big.close(), small.close()]);
    expect(allFree()).toBe(true);
  });

  test('slots are bounded: a third lease waits while two jobs hold the arena, and gets the slots one gives back', async () => {
    const first = await pool.lease({ blockSize: MiB });
    const second = await pool.lease({ blockSize: MiB });
    expect(first.slots.count + second.slots.count).toBe(ARENA_BYTES / MiB);
    let third: Awaited<ReturnType<typeof pool.lease>> | undefined;
    const waiting = pool.lease({ blockSize: MiB }).then((lease) => (third = lease));
    for (let i = 0; i < 10; i++) await new Promise((resolve) => setImmediate(resolve));
    expect(third).toBeUndefined();
    expect(pool.slotCounts()).toEqual([{ blockSize: MiB, slots: ARENA_BYTES / MiB, free: 0 }]);
    await first.close();
    await waiting;
    expect(third!.slots.count).toBe(first.slots.count);
    await Promise.all([second.close(), third!.close()]);
    // A cancelled wait takes nothing.
    const holder = await pool.lease({ blockSize: MiB, slotCount: ARENA_BYTES / MiB });
    const controller = new AbortController();
    const gaveUp = pool.lease({ blockSize: MiB, signal: controller.signal }).then(() => 'leased', (error: unknown) => (error as EngineError).code);
    controller.abort();
    expect(await gaveUp).toBe('ENGINE_INTERRUPTED');
    await holder.close();
    expect(allFree()).toBe(true);
    // One arena for every job of this block size, whatever ran before.
    expect(pool.slotCounts()).toHaveLength(1);
  });

  test('idle, the pool gives its arenas back; the next jobs make one again and restore byte for byte', async () => {
    expect(allFree()).toBe(true);
    pool.releaseIdle();
    expect(pool.slotCounts()).toEqual([]);
    // The threads still hold runners of the dropped arena: the new arena's jobs must not be given them.
    const id = await backupOf('a.img');
    await restoreOf(id, join(dir, 'a3.out'));
    expect(await filesIdentical(join(dir, 'a3.out'), join(dir, 'a.img'))).toBe(true);
    expect(pool.slotCounts()).toEqual([{ blockSize: MiB, slots: ARENA_BYTES / MiB, free: ARENA_BYTES / MiB }]);
  });
});
