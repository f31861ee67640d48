/**
 * How a backup reads a file or block device source (issue 15 item 2): runs into the pipeline's page-aligned
 * slots with O_DIRECT where the file system takes it (no copy out of the page cache), an odd-sized tail and
 * a run whose O_DIRECT read failed through the page cache; the bytes are right either way. And through the CLI:
 * the source's own descriptor opened again with O_DIRECT (strace), its backup restoring byte for byte.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { randomBytes } from 'node:crypto';
import { readFile, writeFile, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { FileSource } from '../dist/engine/sources/file-source.js';
import { pageAlignedSharedBuffer } from '../dist/engine/pipeline/aligned-memory.js';
import { backUp, ENGINE_BIN, filesIdentical, initRepository, runEngine, sh, tempDir } from './helpers.js';

const MiB = 1024 * 1024;

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-file-source-direct-'));
});
afterAll(async () => {
  await cleanup();
});

describe('FileSource', () => {
  test('page-aligned runs are read with O_DIRECT; an odd-sized tail and a run whose O_DIRECT read failed (and every run after it) through the page cache; the bytes are right', async () => {
    const path = join(dir, 'source.raw');
    const content = randomBytes(16 * MiB + 512);
    await writeFile(path, content);
    const source = await FileSource.open(path);
    try {
      const slots = pageAlignedSharedBuffer(17 * MiB);
      const slot = (i: number, length = MiB) => Buffer.from(slots, i * MiB, length);
      const run = Array.from({ length: 8 }, (_, i) => slot(i));
      await source.readRun!(run, 0);
      run.forEach((b, i) => expect(b.equals(content.subarray(i * MiB, (i + 1) * MiB))).toBe(true));
      expect(source.reads).toEqual({ directBytes: 8 * MiB, bufferedBytes: 0 });

      // The disk's last block, 1 MiB + 512 bytes: the whole MiB before it with O_DIRECT, the tail through the cache.
      const tailRun = [slot(8), slot(9, MiB + 512)];
      await source.readRun!(tailRun, 14 * MiB);
      expect(Buffer.concat(tailRun).equals(content.subarray(14 * MiB))).toBe(true);
      expect(source.reads).toEqual({ directBytes: 9 * MiB, bufferedBytes: MiB + 512 });

      // A failed O_DIRECT read: the run comes through the page cache, and from then on every read does. Which
      // memory O_DIRECT refuses depends on the disk (16 bytes past a page: refused by this virtio disk, taken by
      // NVMe and tmpfs), so the failure is made certain here: the source's O_DIRECT handle closed under it (EBADF).
      const direct = (source as unknown as { direct: FileHandle | undefined }).direct;
      expect(direct).toBeDefined();
      await direct!.close();
      const plain = slot(12);
      await source.read(plain, 4 * MiB);
      expect(plain.equals(content.subarray(4 * MiB, 5 * MiB))).toBe(true);
      const again = slot(11);
      await source.read(again, 2 * MiB);
      expect(again.equals(content.subarray(2 * MiB, 3 * MiB))).toBe(true);
      expect(source.reads).toEqual({ directBytes: 9 * MiB, bufferedBytes: 3 * MiB + 512 });
    } finally {
      await source.close();
    }
  });
});

describe('a backup through the CLI', () => {
  test('opens its file source again with O_DIRECT through its descriptor, and restores it byte for byte (odd-sized tail, holes)', async () => {
    const image = join(dir, 'disk.img');
    // 9 MiB + 1000 bytes: a hole, random and text, a tail that is not a whole page.
    const content = Buffer.concat([Buffer.alloc(2 * MiB), randomBytes(3 * MiB), Buffer.from('line of text\n'.repeat(Math.ceil((4 * MiB + 1000) / 13))).subarray(0, 4 * MiB + 1000)]);
    await writeFile(image, content);
    await sh('fallocate', ['--punch-hole', '--offset', '0', '--length', String(2 * MiB), image]);
    const repo = join(dir, 'repo');
    await initRepository(repo);
    const trace = join(dir, 'strace.txt');
    const backup = await backUp(repo, ['--source', image]);
    const traced = join(dir, 'repo-traced');
    await initRepository(traced);
    await sh('strace', ['-f', '-e', 'trace=openat', '-o', trace, process.execPath, ENGINE_BIN, 'backup', '--repo', traced, '--source', image, '--json']);
    // The O_DIRECT open goes through /proc/self/fd/<the descriptor of the image's first open>, not the path:
    // a path re-pointed in between would give another file's bytes.
    const lines = (await readFile(trace, 'utf8')).split('\n').filter((line) => line.includes('openat'));
    const fds = lines.filter((line) => line.includes(`"${image}"`) && !line.includes('O_DIRECT')).map((line) => /= (\d+)$/.exec(line)?.[1]).filter((fd) => fd !== undefined);
    expect(fds.length).toBeGreaterThan(0);
    expect(lines.some((line) => line.includes(image) && line.includes('O_DIRECT'))).toBe(false);
    expect(lines.some((line) => line.includes('O_DIRECT') && fds.some((fd) => line.includes(`"/proc/self/fd/${fd}"`)))).toBe(true);
    const into = join(dir, 'restored.img');
    const restore = await runEngine(['restore', '--repo', repo, backup.id, '--to', into]);
    expect(restore.code, restore.stderr).toBe(0);
    expect(await filesIdentical(image, into)).toBe(true);
  });
});
