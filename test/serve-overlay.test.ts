/**
 * The writable overlay's write-back cache (engine/serve/overlay.ts, write-back.ts): many small, unaligned,
 * overlapping writes, zeroings and flushes in flight at once read back exactly as a model of the disk says
 * (in the overlay alone with tiny cache limits, so write-back, copy-on-write and eviction run under the writes;
 * and through `engine serve --writable` on one pipelined NBD connection, past the cache's limits); a FLUSH or a
 * FUA write is answered only once its bytes are in the overlay's file (read through /proc while the server is
 * stopped, then kill -9: the overlay vanishes, as SPEC 16.1 says); a full overlay file system is ENOSPC to the
 * guest and loses nothing.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { randomBytes } from 'node:crypto';
import { mkdir, open, readdir, readlink } from 'node:fs/promises';
import { join } from 'node:path';
import { serve } from '../dist/engine/index.js';
import { NbdConnection } from '../dist/engine/nbd/connection.js';
import { parseNbdUri } from '../dist/engine/nbd/uri.js';
import { Overlay } from '../dist/engine/serve/overlay.js';
import { GRANULE, WriteBackCache } from '../dist/engine/serve/write-back.js';
import { exitOf, parseJson, readThroughOverlay, runEngine, sparseFile, spawnEngine, tempDir, Tmpfs, waitFor, writeRegion, type BackupJson } from './helpers.js';
import { RawClient } from './nbd-raw-client.js';

const KiB = 1024;
const MiB = 1024 * KiB;
let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-serve-overlay-'));
});
afterAll(async () => {
  await cleanup();
});

/** A seeded generator: a failing sequence can be replayed. */
function random(seed: number): (n: number) => number {
  let state = seed >>> 0;
  return (n) => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return Math.floor((state / 2 ** 32) * n);
  };
}

type Op = { kind: 'write'; offset: number; data: Buffer } | { kind: 'zero'; offset: number; length: number } | { kind: 'flush' };

/** Operations clustered on a few hot granules and spread over the disk, 1 byte to 3 granules long, the disk's end included. */
function operations(seed: number, count: number, size: number): Op[] {
  const rand = random(seed);
  const hot = [0, 4096 * 3 - 100, Math.floor(size / 2) + 1, size - 5000];
  const ops: Op[] = [];
  for (let i = 0; i < count; i += 1) {
    const pick = rand(100);
    if (pick < 3) {
      ops.push({ kind: 'flush' });
      continue;
    }
    const length = 1 + rand(pick < 60 ? 1500 : 3 * 4096);
    const near = hot[rand(hot.length)]!;
    let offset = pick < 70 ? near + rand(9000) - 4500 : rand(size);
    offset = Math.max(0, Math.min(size - length, offset));
    if (pick < 88) ops.push({ kind: 'write', offset, data: randomBytes(length) });
    else ops.push({ kind: 'zero', offset, length });
  }
  return ops;
}

function applyToModel(model: Buffer, op: Op): void {
  if (op.kind === 'write') op.data.copy(model, op.offset);
  else if (op.kind === 'zero') model.fill(0, op.offset, op.offset + op.length);
}

describe('the overlay under small overlapping writes (tiny cache limits)', () => {
  test('writes, zeroings and flushes in flight at once read back exactly as the model, with write-back and eviction under them', async () => {
    const blockSize = 64 * KiB;
    const size = 2 * MiB + 1000; // a short last granule
    const base = randomBytes(size);
    // Tiny limits: write-back starts at 4 dirty granules and writes wait at 16, 4 clean granules kept.
    const overlay = await Overlay.create(size, blockSize, dir, { dirtyHigh: 4 * 4096, dirtyMax: 16 * 4096, cleanMax: 4 * 4096 });
    const exportBytes = (offset: number, length: number): Promise<Buffer> => readThroughOverlay(overlay, blockSize, offset, Buffer.from(base.subarray(offset, offset + length)));
    const model = Buffer.from(base);
    try {
      const ops = operations(15, 4000, size);
      // Batches of 48 operations issued without waiting (the overlay applies them in call order, as the
      // server calls it in arrival order); the whole disk is compared after each batch.
      for (let start = 0; start < ops.length; start += 48) {
        const batch = ops.slice(start, start + 48);
        const running = batch.map((op) => {
          applyToModel(model, op);
          if (op.kind === 'write') return overlay.write(op.data, op.offset, exportBytes);
          if (op.kind === 'zero') return overlay.zero(op.offset, op.length, exportBytes);
          return overlay.flush();
        });
        await Promise.all(running);
        const got = await exportBytes(0, size);
        if (!got.equals(model)) {
          let at = 0;
          while (got[at] === model[at]) at += 1;
          expect.fail(`after operation ${start + batch.length}: byte ${at} reads ${got[at]}, the model says ${model[at]}`);
        }
      }
      expect(overlay.dirtyBytes).toBeLessThanOrEqual(16 * 4096 + 3 * 4096);
      await overlay.flush();
      expect(overlay.dirtyBytes).toBe(0);
      expect((await exportBytes(0, size)).equals(model)).toBe(true);
    } finally {
      await overlay.close();
    }
  });
});

describe('serve --writable: pipelined small writes and flush durability', () => {
  let repo: string;
  let image: string;
  let backupId: string;
  const SIZE = 48 * MiB + 3000;

  beforeAll(async () => {
    repo = join(dir, 'repo');
    image = join(dir, 'disk.raw');
    await sparseFile(image, SIZE);
    await writeRegion(image, 0, 5 * MiB, 'random', 'overlay-a');
    await writeRegion(image, 30 * MiB, 2 * MiB + 10, 'random', 'overlay-b');
    expect((await runEngine(['init', repo])).code).toBe(0);
    const backup = await runEngine(['backup', '--repo', repo, '--source', image, '--disk-name', 'os', '--json']);
    expect(backup.code).toBe(0);
    backupId = parseJson<BackupJson>(backup.stdout).id;
  });

  async function imageBytes(): Promise<Buffer> {
    const file = await open(image, 'r');
    try {
      const out = Buffer.alloc(SIZE);
      await file.read(out, 0, SIZE, 0);
      return out;
    } finally {
      await file.close();
    }
  }

  test('one connection, 64 requests in flight, past the cache limits: every byte reads back as the model says', async () => {
    const handle = await serve({ repo, backupId, socket: join(dir, 'pipelined.sock'), writable: true, overlayDir: dir });
    const connection = await NbdConnection.connect(parseNbdUri(handle.exports[0]!.uri));
    const model = await imageBytes();
    try {
      const ops = operations(77, 6000, SIZE);
      // Large writes too: 40 MiB of them push the dirty bytes past the cache's limits (8 MiB starts the
      // write-back, 32 MiB makes writes wait), so the small writes race the write-back.
      const rand = random(5);
      for (let i = 0; i < 40; i += 1) ops.splice(rand(ops.length), 0, { kind: 'write', offset: rand(SIZE - MiB - 4096) + 1, data: randomBytes(MiB) });
      const inFlight = new Set<Promise<void>>();
      for (const op of ops) {
        applyToModel(model, op);
        // One connection: the server receives (and applies) the requests in the order they are sent.
        const sent = op.kind === 'write' ? connection.write(op.data, op.offset) : op.kind === 'zero' ? connection.writeZeroes(op.offset, op.length) : connection.flush();
        const tracked: Promise<void> = sent.finally(() => inFlight.delete(tracked));
        inFlight.add(tracked);
        if (inFlight.size >= 64) await Promise.race(inFlight);
      }
      await Promise.all(inFlight);
      const got = Buffer.alloc(SIZE);
      for (let at = 0; at < SIZE; at += 4 * MiB) await connection.read(got.subarray(at, Math.min(SIZE, at + 4 * MiB)), at);
      if (!got.equals(model)) {
        let at = 0;
        while (got[at] === model[at]) at += 1;
        expect.fail(`byte ${at} reads ${got[at]}, the model says ${model[at]}`);
      }
    } finally {
      await connection.close();
      await handle.close();
    }
  });

  test('a FLUSH reply and a FUA write reply come only once the bytes are in the overlay file; kill -9 then leaves no overlay', async () => {
    const overlayDir = join(dir, 'durable');
    await mkdir(overlayDir, { mode: 0o700 });
    const socket = join(dir, 'durable.sock');
    const server = spawnEngine(['serve', '--repo', repo, backupId, '--socket', socket, '--writable', '--overlay-dir', overlayDir, '--json']);
    let out = '';
    server.stdout!.on('data', (chunk: Buffer) => (out += chunk.toString()));
    try {
      await waitFor('the server listening', () => out.trim().endsWith('}'), { child: server, output: () => out });
      const client = await RawClient.open(socket);
      await client.go('os', false);
      const model = await imageBytes();
      const rand = random(9);
      const written: { offset: number; length: number }[] = [];
      let cookie = 100n;
      // Small unaligned writes, pipelined; none asks for durability.
      for (let i = 0; i < 300; i += 1) {
        const length = 1 + rand(3000);
        const offset = i < 150 ? rand(64 * KiB) : rand(SIZE - length);
        const data = randomBytes(length);
        data.copy(model, offset);
        written.push({ offset, length });
        client.request(1, offset, length, data, 0, (cookie += 1n));
      }
      for (let i = 0; i < 300; i += 1) expect(await client.simpleResult()).toBe(0);
      client.request(3, 0, 0, undefined, 0, (cookie += 1n));
      expect(await client.simpleResult()).toBe(0);
      // The server is stopped at the moment of the reply (what kill -9 would find), and its overlay file read.
      process.kill(server.pid!, 'SIGSTOP');
      const file = await overlayFile(server.pid!);
      for (const { offset, length } of written) {
        const got = Buffer.alloc(length);
        await file.read(got, 0, length, offset);
        expect(got.equals(model.subarray(offset, offset + length)), `the overlay file at ${offset}+${length} after FLUSH`).toBe(true);
      }
      await file.close();
      process.kill(server.pid!, 'SIGCONT');
      // A FUA write is in the file when answered, with no FLUSH.
      const fua = randomBytes(1500);
      client.request(1, 20 * MiB + 77, fua.length, fua, 1, (cookie += 1n));
      expect(await client.simpleResult()).toBe(0);
      process.kill(server.pid!, 'SIGSTOP');
      const again = await overlayFile(server.pid!);
      const got = Buffer.alloc(fua.length);
      await again.read(got, 0, fua.length, 20 * MiB + 77);
      await again.close();
      expect(got.equals(fua)).toBe(true);
      process.kill(server.pid!, 'SIGKILL');
      await exitOf(server);
      client.close();
      // The overlay was unlinked when opened: nothing of it is left (SPEC 16.1).
      expect(await readdir(overlayDir)).toEqual([]);
    } finally {
      if (server.exitCode === null && server.signalCode === null) {
        server.kill('SIGKILL');
        await exitOf(server);
      }
    }
  });

  test('an overlay whose file system fills: FLUSH answers ENOSPC, the written bytes still read back, and a flush after space returns succeeds', async () => {
    const fs = await Tmpfs.mount(join('/tmp', `engine-overlay-full-${process.pid}`), 4);
    const handle = await serve({ repo, backupId, socket: join(dir, 'full.sock'), writable: true, overlayDir: fs.path });
    try {
      const client = await RawClient.open(join(dir, 'full.sock'));
      await client.go('os', false);
      // Leaves 256 KiB: 1 MiB of small writes (held in the cache, answered at once) cannot all be written back.
      await fs.fill(256 * KiB);
      const data = randomBytes(MiB);
      let cookie = 1n;
      for (let at = 0; at < MiB; at += 4000) client.request(1, 10 * MiB + at + 1, Math.min(4000, MiB - at), data.subarray(at, at + 4000), 0, (cookie += 1n));
      for (let at = 0; at < MiB; at += 4000) expect(await client.simpleResult()).toBe(0);
      client.request(3, 0, 0, undefined, 0, (cookie += 1n));
      expect(await client.simpleResult()).toBe(28); // NBD_ENOSPC
      const connection = await NbdConnection.connect(parseNbdUri(handle.exports[0]!.uri));
      const got = Buffer.alloc(MiB);
      await connection.read(got, 10 * MiB + 1);
      expect(got.equals(data)).toBe(true);
      // Space again: the granules stayed dirty, and the next flush writes them.
      await fs.unfill();
      client.request(3, 0, 0, undefined, 0, (cookie += 1n));
      expect(await client.simpleResult()).toBe(0);
      await connection.read(got, 10 * MiB + 1);
      expect(got.equals(data)).toBe(true);
      await connection.close();
      client.close();
    } finally {
      await handle.close();
      await fs.unmount();
    }
  });
});

/** The server's overlay file, opened through /proc (it is unlinked: only its descriptor names it). */
async function overlayFile(pid: number): Promise<Awaited<ReturnType<typeof open>>> {
  const fds = await readdir(`/proc/${pid}/fd`);
  for (const fd of fds) {
    const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
    if (target.includes('engine-overlay-') && target.endsWith('(deleted)')) return open(`/proc/${pid}/fd/${fd}`, 'r');
  }
  throw new Error(`no overlay file among the descriptors of ${pid}`);
}

describe('the write-back cache holds what SPEC 16.1 says while a write-back is slow', () => {
  test('held bytes never exceed dirtyMax + cleanMax + the write admitted below the limit, and the file ends up right', async () => {
    const granules = 64;
    const limits = { dirtyHigh: 4 * GRANULE, dirtyMax: 16 * GRANULE, cleanMax: 4 * GRANULE };
    const bound = limits.dirtyMax + limits.cleanMax + GRANULE; // each write below is one granule
    const file = await open(join(dir, 'write-back-bound'), 'w+');
    let cache: WriteBackCache | undefined;
    let peak = 0;
    const sample = (): void => {
      peak = Math.max(peak, cache!.heldBytes);
    };
    // A real file whose writes take a while (a slow or busy disk): the burst of writes runs while a
    // write-back is in flight, which is when granules are held both dirty and in flight.
    const slow = new Proxy(file, {
      get(target, name, receiver) {
        if (name === 'writev') {
          return async (buffers: Buffer[], position: number) => {
            sample();
            await new Promise((resolve) => setTimeout(resolve, 5));
            return target.writev(buffers, position);
          };
        }
        const value: unknown = Reflect.get(target, name, receiver);
        return typeof value === 'function' ? (value as (...args: unknown[]) => unknown).bind(target) : value;
      },
    });
    cache = new WriteBackCache(slow, granules * GRANULE, limits);
    const rand = random(7);
    const model = new Map<number, number>();
    try {
      for (let i = 0; i < 600; i += 1) {
        // Hot granules rewritten often (changed while in flight: copied) and cold ones spread out.
        const granule = i % 3 === 0 ? rand(granules) : rand(6);
        const value = 1 + (i % 250);
        model.set(granule, value);
        await cache.admit();
        sample();
        if (!cache.patch(granule, 0, Buffer.alloc(GRANULE, value))) cache.put(granule, Buffer.alloc(GRANULE, value));
        sample();
      }
      await cache.flush();
      sample();
      expect(peak).toBeGreaterThan(limits.dirtyMax); // the burst did reach the limit
      expect(peak).toBeLessThanOrEqual(bound);
      for (let granule = 0; granule < granules; granule += 1) {
        const got = Buffer.alloc(GRANULE);
        await cache.readFile(got, granule * GRANULE);
        expect(got.equals(Buffer.alloc(GRANULE, model.get(granule) ?? 0)), `granule ${granule}`).toBe(true);
      }
    } finally {
      await cache.idle();
      await file.close();
    }
  });
});

describe('the write-back cache when the overlay file fails', () => {
  test('a failed fdatasync is ENGINE_OVERLAY_FAILED naming the errno, for that flush and every later one', async () => {
    const file = await open(join(dir, 'write-back-sync-fails'), 'w+');
    // A real file whose fdatasync fails as a failing disk's does (EIO); everything else is the file's own.
    const failing = new Proxy(file, {
      get(target, name, receiver) {
        if (name === 'datasync') return () => Promise.reject(Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO', syscall: 'fdatasync' }));
        const value: unknown = Reflect.get(target, name, receiver);
        return typeof value === 'function' ? (value as (...args: unknown[]) => unknown).bind(target) : value;
      },
    });
    const cache = new WriteBackCache(failing, 16 * GRANULE, { dirtyHigh: 4 * GRANULE, dirtyMax: 16 * GRANULE, cleanMax: 4 * GRANULE });
    try {
      cache.put(3, Buffer.alloc(GRANULE, 7));
      const expected = { code: 'ENGINE_OVERLAY_FAILED', details: { errno: 'EIO' }, message: expect.stringContaining('could not be synced (EIO)') };
      await expect(cache.flush()).rejects.toMatchObject(expected);
      cache.put(4, Buffer.alloc(GRANULE, 8));
      await expect(cache.flush()).rejects.toMatchObject(expected);
    } finally {
      await cache.idle();
      await file.close();
    }
  });
});
