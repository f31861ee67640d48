/**
 * How a restore writes a local target (issue 15 item 2): adjacent blocks in runs (one pwritev for several
 * blocks), with O_DIRECT from the page-aligned slots where the file system takes it, the odd-sized tail through
 * the page cache, zero blocks of a new file never written, and one fsync after the last write. The CLI's
 * restore is traced with strace (every write call to the target, from every thread); the restored file is
 * compared byte for byte. FileTarget and RunWriter are checked on a real file too.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { RunWriter, RUN_BYTES } from '../dist/engine/restore/write-runs.js';
import { FileTarget } from '../dist/engine/restore/file-target.js';
import { pageAlignedSharedBuffer } from '../dist/engine/pipeline/aligned-memory.js';
import { BlockPool } from '../dist/engine/pipeline/block-pool.js';
import { restoreDisk } from '../dist/engine/restore/restore-disk.js';
import type { TargetWriter } from '../dist/engine/restore/target-writer.js';
import { Repository } from '../dist/repo-format/repository.js';
import { backUp, ENGINE_BIN, filesIdentical, initRepository, sh, sparseFile, tempDir, writeRegion } from './helpers.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-restore-write-runs-'));
});
afterAll(async () => {
  await cleanup();
});

describe('RunWriter', () => {
  test('writes that wait while a run is written go as runs: lowest offset first, adjacent ones together, a gap or RUN_BYTES ends a run', async () => {
    const calls: { offset: number; lengths: number[] }[] = [];
    let release: () => void = () => undefined;
    const writer = new RunWriter(async (buffers, offset) => {
      calls.push({ offset, lengths: buffers.map((b) => b.length) });
      await new Promise<void>((resolve) => (release = resolve));
    });
    const block = (n = MiB) => Buffer.alloc(n);
    const done: Promise<void>[] = [writer.write(block(), 100 * MiB)];
    // Arrive out of order while the first is being written.
    for (const at of [3, 1, 2, 0, 5, 6]) done.push(writer.write(block(), at * MiB));
    for (let at = 10; at < 10 + RUN_BYTES / MiB + 2; at += 1) done.push(writer.write(block(), at * MiB));
    for (let i = 0; i < 5; i += 1) {
      await new Promise((resolve) => setImmediate(resolve));
      release();
    }
    await Promise.all(done);
    expect(calls).toEqual([
      { offset: 100 * MiB, lengths: [MiB] },
      { offset: 0, lengths: [MiB, MiB, MiB, MiB] },
      { offset: 5 * MiB, lengths: [MiB, MiB] },
      { offset: 10 * MiB, lengths: Array.from({ length: RUN_BYTES / MiB }, () => MiB) },
      { offset: 10 * MiB + RUN_BYTES, lengths: [MiB, MiB] },
    ]);
  });

  test('a failed run fails each of its writes, and the writes after it still go', async () => {
    const writer = new RunWriter(async (_buffers, offset) => {
      if (offset === 0) throw new Error('disk said no');
    });
    const first = writer.write(Buffer.alloc(4096), 0);
    const joined = writer.write(Buffer.alloc(4096), 4096);
    const later = writer.write(Buffer.alloc(4096), 1 * MiB);
    await expect(first).rejects.toThrow('disk said no');
    // The second arrived while the first was already being written, so it makes a run of its own (at 4096).
    await expect(joined).resolves.toBeUndefined();
    await expect(later).resolves.toBeUndefined();
  });
});

describe('FileTarget', () => {
  test('page-aligned slots go with O_DIRECT in runs; memory O_DIRECT refuses and an odd-sized tail go through the page cache; the bytes are right', async () => {
    const path = join(dir, 'target-direct.raw');
    const size = 16 * MiB + 512;
    const target = await FileTarget.open(path, size);
    const slots = pageAlignedSharedBuffer(8 * MiB);
    const expected = Buffer.alloc(size);
    const writes: Promise<void>[] = [];
    for (let i = 0; i < 8; i += 1) {
      const slot = Buffer.from(slots, i * MiB, MiB);
      slot.fill(i + 1);
      slot.copy(expected, i * MiB);
      writes.push(target.write(slot, i * MiB));
    }
    await Promise.all(writes);
    expect(target.writes.directBytes).toBe(8 * MiB);
    expect(target.writes.bufferedBytes).toBe(0);
    // The first write went alone; the seven that waited for it, as one run.
    expect(target.writes.calls).toBe(2);
    const tail = Buffer.alloc(MiB + 512, 0xee);
    tail.copy(expected, 15 * MiB);
    await target.write(tail, 15 * MiB);
    expect(target.writes.bufferedBytes).toBe(MiB + 512);
    // A plain Buffer (malloc'd, not page-aligned): refused by O_DIRECT, written through the page cache.
    const plain = Buffer.alloc(MiB, 0x5a);
    plain.copy(expected, 12 * MiB);
    await target.write(plain, 12 * MiB);
    expect(target.writes.bufferedBytes).toBe(2 * MiB + 512);
    await target.finish();
    expect((await readFile(path)).equals(expected)).toBe(true);
  });
});

interface TraceLine {
  at: number;
  text: string;
}

/** Every line of every thread's strace -ff -ttt file, in time order. */
async function traceLines(prefix: string): Promise<TraceLine[]> {
  const folder = join(prefix, '..');
  const base = prefix.slice(folder.length + 1);
  const lines: TraceLine[] = [];
  for (const name of await readdir(folder)) {
    if (!name.startsWith(`${base}.`)) continue;
    for (const line of (await readFile(join(folder, name), 'utf8')).split('\n')) {
      const match = /^(\d+\.\d+) (.*)$/.exec(line);
      if (match) lines.push({ at: Number(match[1]), text: match[2]! });
    }
  }
  return lines.sort((a, b) => a.at - b.at);
}

describe('a restore to a new file, traced', () => {
  test('data blocks in runs (O_DIRECT), the tail buffered, holes never written, one fsync after the last write; past 4 GiB', async () => {
    const image = join(dir, 'image.raw');
    // Not a whole number of blocks, nor of pages: its last block is 512 bytes past a page boundary.
    const size = 4 * GiB + 3 * MiB + 512;
    await sparseFile(image, size);
    await writeRegion(image, 0, 6 * MiB, 'random', 'a');
    await writeRegion(image, 9 * MiB, MiB, 'text');
    await writeRegion(image, 4 * GiB, 3 * MiB + 512, 'random', 'b');
    const repo = join(dir, 'repo');
    await initRepository(repo);
    const id = (await backUp(repo, ['--source', image])).id;
    const restored = join(dir, 'restored.raw');
    const prefix = join(dir, 'trace');
    await sh('strace', ['-ff', '-ttt', '-s', '0', '-e', 'trace=openat,close,pwrite64,pwritev,pwritev2,write,fsync,fdatasync', '-o', prefix, process.execPath, ENGINE_BIN, 'restore', '--repo', repo, id, '--to', restored, '--json']);
    expect(await filesIdentical(image, restored)).toBe(true);

    // The target's descriptors as they are opened and closed, and every call on them.
    const open = new Map<number, { direct: boolean }>();
    const writes: { offset: number; length: number; direct: boolean }[] = [];
    const syncs: { at: number; call: string }[] = [];
    let lastWriteAt = 0;
    let directOpens = 0;
    for (const { at, text } of await traceLines(prefix)) {
      const opened = /^openat\(AT_FDCWD, "([^"]*)", ([^)]*)\) = (\d+)$/.exec(text);
      if (opened) {
        const fd = Number(opened[3]);
        // The O_DIRECT descriptor is opened through /proc/self/fd of the target's first one, never by its path
        // again (a path re-pointed between the two opens would be written into another file).
        const again = /^\/proc\/self\/fd\/(\d+)$/.exec(opened[1]!);
        const direct = opened[2]!.includes('O_DIRECT');
        if (opened[1] === restored && !direct) {
          open.set(fd, { direct: false });
        } else if (again && open.has(Number(again[1])) && direct) {
          open.set(fd, { direct: true });
          directOpens += 1;
        } else if (opened[1] === restored) {
          throw new Error(`the target was opened by its path with ${opened[2]}`);
        } else {
          open.delete(fd);
        }
        continue;
      }
      const closed = /^close\((\d+)\)/.exec(text);
      if (closed) {
        open.delete(Number(closed[1]));
        continue;
      }
      const call = /^(pwrite64|pwritev2?|write|fsync|fdatasync)\((\d+)/.exec(text);
      if (!call) continue;
      const fd = open.get(Number(call[2]));
      if (!fd) continue;
      if (call[1] === 'fsync' || call[1] === 'fdatasync') {
        syncs.push({ at, call: call[1] });
        continue;
      }
      const vector = /^pwritev2?\(\d+, \[.*\], (\d+), (\d+)(?:, \w+)?\) = (\d+)$/.exec(text);
      const single = /^pwrite64\(\d+, .*, (\d+), (\d+)\) = (\d+)$/.exec(text);
      if (vector) writes.push({ offset: Number(vector[2]), length: Number(vector[3]), direct: fd.direct });
      else if (single) writes.push({ offset: Number(single[2]), length: Number(single[3]), direct: fd.direct });
      else throw new Error(`a write to the target this test cannot read: ${text}`);
      lastWriteAt = at;
    }
    expect(directOpens).toBe(1);
    // Exactly the data blocks, each byte once: blocks 0-5, 9, and the three and a half past 4 GiB.
    const ranges = writes.map((w) => [w.offset, w.offset + w.length] as const).sort((a, b) => a[0] - b[0]);
    const merged: [number, number][] = [];
    for (const [start, end] of ranges) {
      const last = merged[merged.length - 1];
      if (last && start < last[1]) throw new Error(`bytes ${start}-${last[1]} written twice`);
      if (last && start === last[1]) last[1] = end;
      else merged.push([start, end]);
    }
    expect(merged).toEqual([
      [0, 6 * MiB],
      [9 * MiB, 10 * MiB],
      [4 * GiB, size],
    ]);
    // At most one call per data block (11): blocks join a run only when they wait for the write before them,
    // which depends on the disk's speed (the runs themselves: the FileTarget and RunWriter tests above).
    expect(writes.length).toBeLessThanOrEqual(11);
    // Every whole page-aligned block with O_DIRECT; the last block (3 MiB + 512 past 4 GiB: 512 bytes) through the page cache.
    expect(writes.filter((w) => !w.direct).map((w) => [w.offset, w.length])).toEqual([[4 * GiB + 3 * MiB, 512]]);
    // Durable before it reports success: exactly one fsync of the target after the last write.
    expect(syncs.filter((s) => s.call === 'fsync' && s.at >= lastWriteAt).length).toBe(1);
    await rm(restored, { force: true });
  });
});

describe('an interrupted restore', () => {
  test('reports the interruption, not a write that failed after it', async () => {
    // A disk of zeros restored onto a target that does not read as zeros: zeros are written, a batch of
    // writes in flight at once (RUN_BYTES), with a check for an interruption between blocks.
    const repo = join(dir, 'interrupt-repo');
    const image = join(dir, 'interrupt.raw');
    await sparseFile(image, 64 * MiB);
    await initRepository(repo);
    const backup = await backUp(repo, ['--source', image, '--disk-name', 'os']);
    const opened = await Repository.open(repo, { access: 'exclusive', command: 'restore', readWithoutLock: true, manyWriters: true });
    const controller = new AbortController();
    const writes: number[] = [];
    // The first write is still pending when the interruption comes (SIGINT: the CLI aborts the signal),
    // and then fails, as a write to a full disk would.
    const target: TargetWriter = {
      path: join(dir, 'interrupt-target'),
      zeroed: false,
      write: async (_data, offset) => {
        writes.push(offset);
        if (writes.length === 1) controller.abort('SIGINT');
        await new Promise((resolve) => setTimeout(resolve, 20));
        throw Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' });
      },
      finish: async () => undefined,
      discard: async () => undefined,
    };
    let pool: BlockPool | undefined;
    try {
      const record = await opened.findBackup(backup.id);
      pool = new BlockPool({ blockSize: record.blockSize, workers: 1, keys: opened.keys, workBytes: 0 });
      const error = await restoreDisk(opened, pool, record, record.disks[0]!, target, { signal: controller.signal }).then(
        () => undefined,
        (failure: unknown) => failure,
      );
      expect(writes.length).toBeGreaterThanOrEqual(1);
      // ENGINE_INTERRUPTED is what the CLI reports with exit code 130 (SPEC.md 14.3).
      expect(error).toMatchObject({ code: 'ENGINE_INTERRUPTED' });
      expect((error as Error).message).toMatch(/^restore was interrupted/);
    } finally {
      await pool?.close();
      await opened.close();
    }
  });
});
