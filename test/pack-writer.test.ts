/**
 * PackWriter writes frames in the background: many appends in flight at once must still land at the
 * offsets they were given, and seal must wait for all of them.
 */
import { afterAll, beforeAll, expect, test } from 'vitest';
import { randomBytes } from 'node:crypto';
import { mkdir, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { PackWriter, readFrameBytes, scanPack } from '../dist/repo-format/pack-file.js';
import { openBlob, sealBlobToBuffer, sha256 } from '../dist/repo-format/blob-codec.js';
import { initChecksum } from '../dist/repo-format/checksum.js';
import { KIND_DATA } from '../dist/repo-format/constants.js';
import { sh, tempDir } from './helpers.js';

let root: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  await initChecksum();
  ({ path: root, cleanup } = await tempDir());
  await mkdir(join(root, 'tmp'));
  await mkdir(join(root, 'packs'));
});
afterAll(async () => {
  await cleanup();
});

test('200 appends in flight at once land at their offsets; seal waits for every write', async () => {
  const writer = new PackWriter(root);
  const blobs = Array.from({ length: 200 }, (_, i) => {
    const raw = randomBytes(1 + ((i * 7919) % 70000));
    return { raw, id: sha256(raw) };
  });
  const writes = blobs.map(({ raw, id }) => writer.append(sealBlobToBuffer(KIND_DATA, id, raw), { kind: KIND_DATA, flags: 0, rawLength: raw.length, id }));
  const entries = await writer.seal();
  await Promise.all(writes);
  const scan = await scanPack(root, writer.packId);
  expect(scan.damage).toBeUndefined();
  expect(scan.size).toBe(writer.byteSize);
  expect(scan.frames.map((f) => f.offset)).toEqual(entries.map((e) => e.offset));
  for (const [i, entry] of entries.entries()) {
    const opened = openBlob(await readFrameBytes(root, writer.packId, entry.offset, entry.length), blobs[i]!.id);
    expect(typeof opened === 'string' ? opened : opened.plaintext.equals(blobs[i]!.raw)).toBe(true);
  }
});

test('a write that fails (disk full) poisons the pack: seal refuses, nothing is renamed into packs/', async () => {
  const mountPoint = join(root, 'tiny');
  await mkdir(mountPoint);
  await sh('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', mountPoint]);
  try {
    await mkdir(join(mountPoint, 'tmp'));
    await mkdir(join(mountPoint, 'packs'));
    const writer = new PackWriter(mountPoint);
    const writes = Array.from({ length: 6 }, (_, i) => {
      const raw = randomBytes(400 * 1024 + i);
      const id = sha256(raw);
      return writer.append(sealBlobToBuffer(KIND_DATA, id, raw), { kind: KIND_DATA, flags: 0, rawLength: raw.length, id });
    });
    const outcomes = await Promise.allSettled(writes);
    expect(outcomes.some((o) => o.status === 'rejected')).toBe(true);
    await expect(writer.seal()).rejects.toMatchObject({ code: 'ENGINE_NO_SPACE' });
    expect(await readdir(join(mountPoint, 'packs'))).toEqual([]);
    await writer.abort();
    expect(await readdir(join(mountPoint, 'tmp'))).toEqual([]);
  } finally {
    await sh('umount', [mountPoint]);
  }
});
