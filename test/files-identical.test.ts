/**
 * The comparison every restore test relies on (filesIdentical in test/helpers.ts): byte for byte and
 * length for length, on small files through cmp and on large sparse ones through qemu-img compare. A
 * difference anywhere is seen: one byte in the data, in a hole, in a partial last sector, or one more
 * byte at the end.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { open, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { filesIdentical, sparseFile, tempDir, writeRegion } from './helpers.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-files-identical-'));
});
afterAll(async () => {
  await cleanup();
});

async function poke(path: string, offset: number, byte: number): Promise<void> {
  const handle = await open(path, 'r+');
  await handle.write(Buffer.from([byte]), 0, 1, offset);
  await handle.close();
}

describe.each([
  ['a small file (cmp)', 3 * MiB + 123],
  ['a sparse file past 2^32 (qemu-img compare)', 5 * 1024 * MiB + 123],
])('%s', (_name, size) => {
  let original: string;

  beforeAll(async () => {
    original = join(dir, `original-${size}.raw`);
    await sparseFile(original, size);
    await writeRegion(original, MiB, MiB, 'random', 'identical');
    await writeRegion(original, size - 100, 100, 'text', 'tail');
  });

  async function copy(name: string): Promise<string> {
    const path = join(dir, `${name}-${size}.raw`);
    await sparseFile(path, size);
    await writeRegion(path, MiB, MiB, 'random', 'identical');
    await writeRegion(path, size - 100, 100, 'text', 'tail');
    return path;
  }

  test('an identical copy is identical, with holes where the original has them or zeros written there', async () => {
    expect(await filesIdentical(original, await copy('same'))).toBe(true);
    const zeros = await copy('zeros');
    await writeRegion(zeros, 0, MiB, 'zero');
    await writeRegion(zeros, 2 * MiB, MiB, 'zero');
    expect(await filesIdentical(zeros, original)).toBe(true);
  });

  test('one byte changed in the data, in a hole or in the partial last sector is a difference', async () => {
    for (const offset of [MiB + 4096, 2 * MiB + 7, size - 1, size - 90]) {
      const other = await copy(`changed-${offset}`);
      await poke(other, offset, 0x55);
      expect(await filesIdentical(original, other)).toBe(false);
      expect(await filesIdentical(other, original)).toBe(false);
    }
  });

  test('one byte more or less (a zero) is a difference', async () => {
    const longer = await copy('longer');
    await truncate(longer, size + 1);
    expect(await filesIdentical(original, longer)).toBe(false);
    const shorter = await copy('shorter');
    await truncate(shorter, size - 1);
    expect(await filesIdentical(shorter, original)).toBe(false);
  });
});
