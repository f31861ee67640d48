/**
 * PackWriter writes frames in the background: many appends in flight at once must still land at the
 * offsets they were given, and seal must wait for all of them.
 */
import { afterAll, beforeAll, expect, test } from 'vitest';
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { forgetSpareFiles, PackWriter, readFrameBytes, scanPack } from '../dist/repo-format/pack-file.js';
import { Md5Stream } from '../dist/repo-format/storage/md5-off-thread.js';
import { BlobWriter, UPLOADS_IN_FLIGHT } from '../dist/repo-format/blob-writer.js';
import type { IndexEntry } from '../dist/repo-format/index-entry.js';
import { MemoryStorage } from '../dist/repo-format/storage/memory.js';
import type { PutOptions, PutSource } from '../dist/repo-format/storage/storage.js';
import { openBlob, sealBlobToBuffer, sha256 } from '../dist/repo-format/blob-codec.js';
import { LZ4 } from '../dist/repo-format/compression.js';
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
  const writes = blobs.map(({ raw, id }) => writer.append(sealBlobToBuffer(KIND_DATA, id, raw, undefined, LZ4), { kind: KIND_DATA, flags: 0, rawLength: raw.length, id }));
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
      return writer.append(sealBlobToBuffer(KIND_DATA, id, raw, undefined, LZ4), { kind: KIND_DATA, flags: 0, rawLength: raw.length, id });
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

/** A store that is not a local folder (as S3), whose puts take `delayMs` and are recorded. */
class SlowStore extends MemoryStorage {
  puts: { key: string; md5: string | undefined; bytesMd5: string }[] = [];
  running = 0;
  mostAtOnce = 0;
  constructor(private readonly delayMs: number) {
    super('slow');
  }
  override async put(key: string, source: PutSource, options?: PutOptions): Promise<void> {
    this.running += 1;
    this.mostAtOnce = Math.max(this.mostAtOnce, this.running);
    try {
      const bytes = source instanceof Uint8Array ? Buffer.from(source) : await readFile(source.file);
      this.puts.push({ key, md5: source instanceof Uint8Array ? undefined : source.md5, bytesMd5: createHash('md5').update(bytes).digest('base64') });
      await new Promise((resolve) => setTimeout(resolve, this.delayMs));
      await super.put(key, source, options);
    } finally {
      this.running -= 1;
    }
  }
}

function frames(count: number, size: number): { frame: Buffer; header: { kind: number; flags: number; rawLength: number; id: Buffer } }[] {
  return Array.from({ length: count }, () => {
    const raw = randomBytes(size);
    const id = sha256(raw);
    return { frame: sealBlobToBuffer(KIND_DATA, id, raw, undefined, LZ4), header: { kind: KIND_DATA, flags: 0, rawLength: raw.length, id } };
  });
}

test('a pack for an object store goes up with the MD5 of its bytes, computed as frames were appended (no second read)', async () => {
  const tempDir = join(root, 'upload-md5');
  await mkdir(tempDir);
  const store = new SlowStore(0);
  const writer = new PackWriter({ store, tempDir });
  const writes = frames(30, 20_000).map(({ frame, header }) => writer.append(frame, header));
  await writer.seal();
  await Promise.all(writes);
  expect(store.puts).toHaveLength(1);
  expect(store.puts[0]!.md5).toBe(store.puts[0]!.bytesMd5);
  // The temporary file, uploaded, is kept as the next pack's buffer: one file, no other.
  expect(await readdir(tempDir)).toHaveLength(1);
  forgetSpareFiles(tempDir);
});

test('the MD5 thread hashes each stream in the order of its updates, bytes of a SharedArrayBuffer in place and others copied', async () => {
  const shared = new SharedArrayBuffer(4 * 1024 * 1024);
  const slots = Buffer.from(shared);
  randomBytes(slots.length).copy(slots);
  const big = randomBytes(3 * 1024 * 1024);
  const streams = [new Md5Stream(), new Md5Stream(), new Md5Stream()];
  const expected = streams.map(() => createHash('md5'));
  const updates: Promise<void>[] = [];
  for (let i = 0; i < 60; i++) {
    const s = i % 3;
    // Slices of a SharedArrayBuffer (as the pipeline's frames), views into a larger buffer, small copies.
    const bytes = i % 2 === 0 ? Buffer.from(shared, (i * 65_537) % (3 * 1024 * 1024), 1 + ((i * 7919) % 900_000)) : big.subarray(i * 1000, i * 1000 + 1 + ((i * 104_729) % 500_000));
    expected[s]!.update(bytes);
    updates.push(streams[s]!.update(bytes));
  }
  await Promise.all(updates);
  expect(await Promise.all(streams.map((stream) => stream.digest()))).toEqual(expected.map((hash) => hash.digest('base64')));
  expect(await new Md5Stream().digest()).toBe(createHash('md5').digest('base64'));
});

test('a spare upload file written over by a shorter pack: only the new pack goes up, its MD5 right', async () => {
  const tempDir = join(root, 'upload-spare');
  await mkdir(tempDir);
  const store = new SlowStore(0);
  const sizes = [60, 10, 35];
  const packs: PackWriter[] = [];
  for (const count of sizes) {
    const writer = new PackWriter({ store, tempDir });
    const writes = frames(count, 20_000).map(({ frame, header }) => writer.append(frame, header));
    await writer.seal();
    await Promise.all(writes);
    packs.push(writer);
    // The same file each time: a spare, written over.
    expect(await readdir(tempDir)).toHaveLength(1);
  }
  for (const [i, put] of store.puts.entries()) expect(put.md5, `pack ${i}`).toBe(put.bytesMd5);
  for (const writer of packs) {
    const scan = await scanPack(store, writer.packId);
    expect(scan.damage).toBeUndefined();
    expect(scan.size).toBe(writer.byteSize);
  }
  // Its folder emptied behind the writer's back: the spare it remembers is gone, a new file takes its place.
  await rm(tempDir, { recursive: true });
  await mkdir(tempDir);
  const writer = new PackWriter({ store, tempDir });
  const writes = frames(3, 20_000).map(({ frame, header }) => writer.append(frame, header));
  await writer.seal();
  await Promise.all(writes);
  expect(store.puts).toHaveLength(sizes.length + 1);
  expect(store.puts.at(-1)!.md5).toBe(store.puts.at(-1)!.bytesMd5);
  expect((await scanPack(store, writer.packId)).size).toBe(writer.byteSize);
  forgetSpareFiles(tempDir);
});

test(`a blob writer into an object store uploads up to ${UPLOADS_IN_FLIGHT} packs at once, indexes them in the order they were filled, and pushes back so the packs waiting stay bounded`, async () => {
  const tempDir = join(root, 'upload-parallel');
  await mkdir(tempDir);
  const store = new SlowStore(40);
  const indexed: IndexEntry[] = [];
  const index = { lookup: async (ids: readonly Buffer[]) => ids.map(() => undefined), addEntries: async (entries: readonly IndexEntry[]) => void indexed.push(...entries) };
  // Packs of ~4 frames: 40 frames make ~10 packs.
  const writer = new BlobWriter({ store, tempDir }, index, 80_000);
  const blobs = frames(40, 20_000);
  let mostWaiting = 0;
  for (const { frame, header } of blobs) {
    // A pipeline with a few slots awaits its oldest write before it takes another block.
    await writer.add(frame, header);
    mostWaiting = Math.max(mostWaiting, (await readdir(tempDir)).length);
  }
  await writer.flush();
  expect(store.mostAtOnce).toBe(UPLOADS_IN_FLIGHT);
  // Being sealed, waiting (2), and the one filling: never more on the local disk.
  expect(mostWaiting).toBeLessThanOrEqual(UPLOADS_IN_FLIGHT + 2 + 1);
  expect(indexed.map((e) => e.id.toString('hex'))).toEqual(blobs.map((b) => b.header.id.toString('hex')));
  for (const put of store.puts) expect(put.md5).toBe(put.bytesMd5);
  // What stays are the spare buffers for the next packs, no more than were ever in use at once.
  expect((await readdir(tempDir)).length).toBeLessThanOrEqual(UPLOADS_IN_FLIGHT + 2 + 1);
  forgetSpareFiles(tempDir);
});
