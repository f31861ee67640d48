/**
 * Byte-exact round trips through the real CLI: every kind of content, sizes that are not a multiple of
 * the block size, a sparse disk larger than 4 GiB with data past 2^32, several disks in one backup,
 * restores onto existing files and block devices.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { mkdtemp, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { generateImage } from '../dist/engine/index.js';
import {
  filesIdentical,
  parseJson,
  prefixIdentical,
  runEngine,
  sh,
  sparseFile,
  tempDir,
  writeRegion,
  type BackupJson,
  type Fill,
  withoutProgress,
  holdLoopDeviceLock,
} from './helpers.js';

// About the pipeline: its blocks run in the worker pool whatever the disk's size (a small job otherwise runs them on
// the main thread; inline-blocks.test.ts checks the two agree).
process.env.ENGINE_TEST_BLOCK_WORKERS = 'pool';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

let dir: string;
let repo: string;
let cleanup: () => Promise<void>;

async function backupJson(args: string[]): Promise<BackupJson> {
  const result = await runEngine(['backup', '--repo', repo, '--json', ...args]);
  expect(withoutProgress(result.stderr)).toBe('');
  expect(result.code).toBe(0);
  return parseJson<BackupJson>(result.stdout);
}

async function restoreTo(id: string, to: string, extra: string[] = []): Promise<void> {
  const result = await runEngine(['restore', '--repo', repo, id, '--to', to, ...extra]);
  expect(withoutProgress(result.stderr)).toBe('');
  expect(result.code).toBe(0);
}

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir());
  repo = join(dir, 'repo');
  expect((await runEngine(['init', repo])).code).toBe(0);
});

afterAll(async () => {
  await cleanup();
});

describe('round trips', () => {
  test.each<Fill>(['random', 'zero', 'text', 'repeat'])('%s content, 20 MiB + 4097 bytes', async (fill) => {
    const image = join(dir, `${fill}.img`);
    const size = 20 * MiB + 4097;
    await sparseFile(image, size);
    await writeRegion(image, 0, size, fill, fill);
    const backup = await backupJson(['--source', image]);
    expect(backup.type).toBe('full');
    expect(backup.disks).toHaveLength(1);
    const disk = backup.disks[0]!;
    expect(disk.size).toBe(size);
    expect(disk.bytesRead).toBe(size);
    expect(disk.blocksTotal).toBe(21);
    if (fill === 'zero') {
      expect(disk.blocksZero).toBe(21);
      expect(disk.bytesStored).toBe(0);
    }
    if (fill === 'repeat') expect(disk.blocksNew).toBeLessThanOrEqual(2); // 20 identical blocks + the short last one
    const restored = join(dir, `${fill}.restored`);
    await restoreTo(backup.id, restored);
    expect(await filesIdentical(image, restored)).toBe(true);
    if (fill === 'zero') expect((await stat(restored)).blocks).toBe(0); // zero blocks stay holes
  });

  test('VM-like mixed content, 1 GiB + 4097 bytes', async () => {
    const image = join(dir, 'mixed.img');
    const generated = await generateImage(image, GiB + 4097, 'roundtrip-mixed');
    const backup = await backupJson(['--source', image, '--name', 'mixed']);
    expect(backup.name).toBe('mixed');
    // The generator leaves its zero runs (whole 1 MiB blocks) as holes: exactly what it wrote is read.
    expect(generated.dataBytes).toBeLessThan(GiB);
    expect(backup.disks[0]!.bytesRead).toBe(generated.dataBytes);
    expect(backup.disks[0]!.blocksZero).toBeGreaterThan(0);
    expect(backup.disks[0]!.bytesStored).toBeLessThan(backup.disks[0]!.bytesNew); // lz4 earned its place
    const restored = join(dir, 'mixed.restored');
    await restoreTo(backup.id.slice(0, 8), restored);
    expect(await filesIdentical(image, restored)).toBe(true);
  });

  test('sparse 5 GiB disk with data across and past 2^32', async () => {
    const image = join(dir, 'big-sparse.img');
    const size = 5 * GiB + 123;
    await sparseFile(image, size);
    // Straddles the 4 GiB boundary at an unaligned offset, then data near the (unaligned) end.
    await writeRegion(image, 2 ** 32 - MiB - 5, 3 * MiB, 'random', 'straddle');
    await writeRegion(image, 4.5 * GiB + 7, MiB, 'text', 'far');
    await writeRegion(image, size - 200, 200, 'random', 'tail');
    const backup = await backupJson(['--source', image]);
    const disk = backup.disks[0]!;
    expect(disk.size).toBe(size);
    expect(disk.blocksTotal).toBe(5 * 1024 + 1);
    // 3 MiB at 4095 MiB - 5 spans blocks 4094..4097; 1 MiB at 4608 MiB + 7 spans 2; the last 200 bytes
    // cross from block 5119 into the 123-byte block 5120.
    expect(disk.blocksTotal - disk.blocksZero).toBe(4 + 2 + 2);
    // Only those blocks are read: the holes are found (SEEK_DATA), not read as 5 GiB of zero pages.
    expect(disk.bytesRead).toBe(7 * MiB + 123);
    const restored = join(dir, 'big-sparse.restored');
    await restoreTo(backup.id, restored);
    expect((await stat(restored)).size).toBe(size);
    expect((await stat(restored)).blocks * 512).toBeLessThan(16 * MiB); // holes stayed holes
    expect(await filesIdentical(image, restored)).toBe(true);
  });

  test('a sparse file without qemu-img to map its holes is read whole, and restores exactly', async () => {
    const image = join(dir, 'unmapped.img');
    const size = 16 * MiB + 5;
    await sparseFile(image, size);
    await writeRegion(image, 3 * MiB + 1, MiB, 'random', 'unmapped');
    const bare = await mkdtemp(join(dir, 'bare-path-'));
    const result = await runEngine(['backup', '--repo', repo, '--json', '--source', image], { env: { PATH: bare } });
    expect(withoutProgress(result.stderr)).toBe('');
    expect(result.code).toBe(0);
    const disk = parseJson<BackupJson>(result.stdout).disks[0]!;
    expect(disk.bytesRead).toBe(size);
    expect(disk.blocksTotal - disk.blocksZero).toBe(2);
    // With the map, only the two blocks holding data are read.
    const mapped = await backupJson(['--source', image]);
    expect(mapped.disks[0]!.bytesRead).toBe(2 * MiB);
    const restored = join(dir, 'unmapped.restored');
    await restoreTo(parseJson<BackupJson>(result.stdout).id, restored);
    expect(await filesIdentical(image, restored)).toBe(true);
  });

  test('several disks in one backup: restore one by name, or all into a directory', async () => {
    const a = join(dir, 'vm-a-disk0.img');
    const b = join(dir, 'vm-a-disk1.img');
    await sparseFile(a, 8 * MiB);
    await writeRegion(a, 0, 8 * MiB, 'random', 'disk0');
    await sparseFile(b, 3 * MiB + 1);
    await writeRegion(b, MiB, 2 * MiB + 1, 'text', 'disk1');
    const backup = await backupJson(['--source', a, '--source', b, '--disk-name', 'sda', '--disk-name', 'sdb', '--name', 'vm-a']);
    expect(backup.disks.map((d) => d.name)).toEqual(['sda', 'sdb']);
    const one = join(dir, 'sdb.only');
    await restoreTo(backup.id, one, ['--disk', 'sdb']);
    expect(await filesIdentical(b, one)).toBe(true);
    const all = join(dir, 'all-disks');
    await restoreTo(backup.id, all);
    expect(await filesIdentical(a, join(all, 'sda'))).toBe(true);
    expect(await filesIdentical(b, join(all, 'sdb'))).toBe(true);
    const missing = await runEngine(['restore', '--repo', repo, backup.id, '--disk', 'sdz', '--to', join(dir, 'nope')]);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain('has no disk "sdz" (it has: sda, sdb)');
  });

  test('restore onto an existing larger file writes the whole disk range, zero blocks included', async () => {
    const image = join(dir, 'holey.img');
    await sparseFile(image, 6 * MiB + 99);
    await writeRegion(image, 2 * MiB, MiB, 'random', 'holey');
    const backup = await backupJson(['--source', image]);
    const target = join(dir, 'existing-target.img');
    await sparseFile(target, 8 * MiB);
    await writeRegion(target, 0, 8 * MiB, 'random', 'old-garbage');
    const tailBefore = (await sh('tail', ['-c', String(2 * MiB - 99), target])).length;
    await restoreTo(backup.id, target);
    expect((await stat(target)).size).toBe(8 * MiB); // an existing target is never truncated
    expect(await prefixIdentical(image, target, 6 * MiB + 99)).toBe(true);
    expect((await sh('tail', ['-c', String(2 * MiB - 99), target])).length).toBe(tailBefore);
    const small = join(dir, 'too-small.img');
    await writeFile(small, Buffer.alloc(MiB));
    const refused = await runEngine(['restore', '--repo', repo, backup.id, '--to', small]);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain(`restore target ${small} holds ${MiB} bytes, the disk needs ${6 * MiB + 99}`);
  });

  test('block devices: back up from a loop device and restore onto another', async () => {
    const backing = join(dir, 'loop-src.img');
    const targetBacking = join(dir, 'loop-dst.img');
    await sparseFile(backing, 12 * MiB);
    await writeRegion(backing, MiB, 5 * MiB, 'random', 'loop');
    await sparseFile(targetBacking, 16 * MiB);
    await writeRegion(targetBacking, 0, 16 * MiB, 'random', 'loop-old');
    const release = await holdLoopDeviceLock();
    let source = '';
    let target = '';
    try {
      source = (await sh('losetup', ['--find', '--show', backing])).trim();
      target = (await sh('losetup', ['--find', '--show', targetBacking])).trim();
      const backup = await backupJson(['--source', source, '--disk-name', 'vda']);
      expect(backup.disks[0]!.size).toBe(12 * MiB);
      const show = parseJson<{ disks: { source: { kind: string } }[] }>((await runEngine(['show', '--repo', repo, backup.id, '--json'])).stdout);
      expect(show.disks[0]!.source.kind).toBe('block-device');
      await restoreTo(backup.id, target);
      expect(await prefixIdentical(backing, target, 12 * MiB)).toBe(true);
    } finally {
      if (source) await sh('losetup', ['-d', source]).catch(() => undefined);
      if (target) await sh('losetup', ['-d', target]).catch(() => undefined);
      await release();
    }
  });
});
