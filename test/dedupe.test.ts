/**
 * Deduplication: unchanged data adds nothing, shared blocks are stored once across images and within one.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { parseJson, runEngine, sparseFile, tempDir, writeRegion, type BackupJson } from './helpers.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;

async function packBytes(repo: string): Promise<{ count: number; bytes: number }> {
  let count = 0;
  let bytes = 0;
  for (const sub of await readdir(join(repo, 'packs'))) {
    for (const name of await readdir(join(repo, 'packs', sub))) {
      count += 1;
      bytes += (await stat(join(repo, 'packs', sub, name))).size;
    }
  }
  return { count, bytes };
}

async function backup(repo: string, source: string): Promise<BackupJson> {
  const result = await runEngine(['backup', '--repo', repo, '--source', source, '--json']);
  expect(result.code).toBe(0);
  return parseJson<BackupJson>(result.stdout);
}

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir());
});
afterAll(async () => {
  await cleanup();
});

describe('deduplication', () => {
  test('a second backup of an unchanged image adds no chunk and no pack', async () => {
    const repo = join(dir, 'repo-unchanged');
    await runEngine(['init', repo]);
    const image = join(dir, 'unchanged.img');
    await sparseFile(image, 24 * MiB + 5);
    await writeRegion(image, 0, 16 * MiB, 'random', 'u1');
    await writeRegion(image, 16 * MiB, 8 * MiB + 5, 'text', 'u2');
    const first = await backup(repo, image);
    expect(first.disks[0]!.blocksNew).toBe(25);
    const before = await packBytes(repo);
    const second = await backup(repo, image);
    expect(second.id).not.toBe(first.id);
    expect(second.disks[0]!.blocksNew).toBe(0);
    expect(second.disks[0]!.bytesNew).toBe(0);
    expect(second.disks[0]!.bytesStored).toBe(0);
    expect(second.disks[0]!.blocksDeduplicated).toBe(25);
    expect(await packBytes(repo)).toEqual(before); // not even a map page: the map is identical
  });

  test('two images sharing half their blocks store about one and a half images', async () => {
    const repo = join(dir, 'repo-half');
    await runEngine(['init', repo]);
    const size = 64 * MiB;
    const a = join(dir, 'half-a.img');
    const b = join(dir, 'half-b.img');
    await sparseFile(a, size);
    await writeRegion(a, 0, size, 'random', 'shared'); // random data: lz4 cannot shrink it
    await sparseFile(b, size);
    await writeRegion(b, 0, size, 'random', 'shared');
    await writeRegion(b, size / 2, size / 2, 'random', 'b-only');
    await backup(repo, a);
    const second = await backup(repo, b);
    expect(second.disks[0]!.blocksNew).toBe(32);
    expect(second.disks[0]!.blocksDeduplicated).toBe(32);
    const { bytes } = await packBytes(repo);
    expect(bytes / size).toBeGreaterThan(1.5);
    expect(bytes / size).toBeLessThan(1.51); // frame and map overhead stays under 1%
  });

  test('identical blocks within one image are stored once', async () => {
    const repo = join(dir, 'repo-repeat');
    await runEngine(['init', repo, '--block-size', '64K']);
    const image = join(dir, 'repeat.img');
    await sparseFile(image, 8 * MiB);
    await writeRegion(image, 0, 8 * MiB, 'repeat', 'r'); // a 64 KiB pattern repeated: every block is the same
    const result = await backup(repo, image);
    expect(result.blockSize).toBe(64 * 1024);
    expect(result.disks[0]!.blocksTotal).toBe(128);
    expect(result.disks[0]!.blocksNew).toBe(1);
    expect(result.disks[0]!.blocksDeduplicated).toBe(127);
  });
});
