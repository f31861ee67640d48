/**
 * Thin disks of many TiB (issue 15, item 6): a backup, an incremental and a restore cost the data and the
 * map's pages, not the disk's size. A sparse raw file and a thin qcow2 of 12 TiB (2^43.6 bytes, blocks far
 * past 2^32 bytes' worth) hold a few MiB at offsets that are not block-aligned; the restored file must hold
 * exactly those bytes there and holes everywhere else (qemu-img map of the restored file). No timing is
 * asserted: the work is counted. The backups run through the library so that the pipeline's `steps` (its
 * progress events: one per block read, one per run of zero or unchanged blocks) can be asserted exactly:
 * the data's blocks plus the runs between them. The per-block walk this replaced queued one item per zero
 * block (12.5 million here).
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { backup, type BackupDisk } from '../dist/engine/index.js';
import type { BackupRecord } from '../dist/repo-format/backup-record.js';
import { initRepository, runEngine, sh, sparseFile, tempDir, withoutProgress } from './helpers.js';
import { qcow2, qemuIo } from './qemu.js';

const MiB = 1024 * 1024;
const TiB = 1024 * 1024 * MiB;
const SIZE = 12 * TiB;
const BLOCK = MiB;

let dir: string;
let repo: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir());
  repo = join(dir, 'repo');
  await initRepository(repo);
});

afterAll(async () => {
  await cleanup();
});

interface Region {
  offset: number;
  data: Buffer;
}

/** Writes the regions into a file (sparse elsewhere). */
async function writeRegions(path: string, regions: Region[]): Promise<void> {
  const handle = await open(path, 'r+');
  try {
    for (const { offset, data } of regions) await handle.write(data, 0, data.length, offset);
  } finally {
    await handle.close();
  }
}

/** The bytes of `path` at each region equal the region's. */
async function expectRegions(path: string, regions: Region[]): Promise<void> {
  const handle = await open(path, 'r');
  try {
    for (const { offset, data } of regions) {
      const got = Buffer.alloc(data.length);
      const { bytesRead } = await handle.read(got, 0, got.length, offset);
      expect(bytesRead).toBe(data.length);
      expect(got.equals(data), `bytes at ${offset}`).toBe(true);
    }
  } finally {
    await handle.close();
  }
}

/** Block-aligned [start, end) of every block a region touches, merged, in order. */
function blocksOf(regions: Region[]): { start: number; end: number }[] {
  const spans = regions
    .map(({ offset, data }) => ({ start: Math.floor(offset / BLOCK) * BLOCK, end: Math.ceil((offset + data.length) / BLOCK) * BLOCK }))
    .sort((a, b) => a.start - b.start);
  const merged: { start: number; end: number }[] = [];
  for (const span of spans) {
    const last = merged[merged.length - 1];
    if (last && span.start <= last.end) last.end = Math.max(last.end, span.end);
    else merged.push({ ...span });
  }
  return merged;
}

/** The restored file is `SIZE` bytes whose allocated extents lie inside the blocks the regions touch: holes elsewhere. */
async function expectHolesOutside(path: string, regions: Region[]): Promise<void> {
  const map = JSON.parse(await sh('qemu-img', ['map', '--output=json', '-f', 'raw', path])) as { start: number; length: number; data: boolean; zero: boolean }[];
  const last = map[map.length - 1]!;
  expect(last.start + last.length).toBe(SIZE);
  const allowed = blocksOf(regions);
  const allocated = map.filter((extent) => extent.data);
  // One allocated extent per run of touched blocks (the data has no all-zero 4 KiB page inside a run).
  expect(allocated.length).toBe(allowed.length);
  for (const extent of allocated) {
    const inside = allowed.some(({ start, end }) => extent.start >= start && extent.start + extent.length <= end);
    expect(inside, `allocated ${extent.start}+${extent.length} outside the data's blocks`).toBe(true);
  }
}

async function restoreTo(id: string, target: string): Promise<void> {
  const result = await runEngine(['restore', '--repo', repo, id, '--to', target]);
  expect(withoutProgress(result.stderr)).toBe('');
  expect(result.code).toBe(0);
}

/** Backs one disk up through the library: the record, and the pipeline's steps (its last progress event's). */
async function backUpCounted(disk: BackupDisk): Promise<{ record: BackupRecord; steps: number }> {
  let steps = -1;
  const { record } = await backup({ repo, from: { kind: 'disks', disks: [disk] }, onProgress: (progress) => (steps = progress.steps) });
  return { record, steps };
}

/** The runs of blocks outside the blocks the regions touch: each is one step, however long. */
function gapsBetween(regions: Region[]): number {
  let gaps = 0;
  let at = 0;
  for (const { start, end } of blocksOf(regions)) {
    if (start > at) gaps += 1;
    at = end;
  }
  return at < SIZE ? gaps + 1 : gaps;
}

function touchedBlocks(regions: Region[]): number {
  return blocksOf(regions).reduce((sum, { start, end }) => sum + (end - start) / BLOCK, 0);
}

describe('a 12 TiB thin disk', () => {
  // Unaligned, across a block boundary, past 2^32 and 2^40 bytes, and in the disk's last block.
  const regions: Region[] = [
    { offset: 3 * TiB + 12345, data: randomBytes(2 * MiB) },
    { offset: 8 * TiB, data: randomBytes(MiB) },
    { offset: SIZE - 1000, data: randomBytes(1000) },
  ];

  test('sparse raw file: the full reads the data only, the restore holds its bytes and holes elsewhere', async () => {
    const source = join(dir, 'thin.raw');
    await sparseFile(source, SIZE);
    await writeRegions(source, regions);
    const { record: full, steps } = await backUpCounted({ kind: 'raw', path: source });
    const disk = full.disks[0]!.stats;
    const touched = touchedBlocks(regions);
    // Zeros before the data at 3 TiB, between it and 8 TiB, and from there to the last block (data).
    expect(gapsBetween(regions)).toBe(3);
    expect(steps).toBe(touched + 3);
    expect(disk.blocksTotal).toBe(SIZE / BLOCK);
    expect(disk.bytesRead).toBe(touched * BLOCK);
    expect(disk.blocksZero).toBe(SIZE / BLOCK - touched);
    expect(disk.blocksNew).toBe(touched);
    const target = join(dir, 'thin-restored.raw');
    await restoreTo(full.id, target);
    await expectRegions(target, regions);
    await expectHolesOutside(target, regions);
    const verify = await runEngine(['verify', '--repo', repo, '--read-data']);
    expect(verify.code).toBe(0);
  });

  test('thin qcow2 with --image: the incremental reads the changed blocks only and restores as the image is', async () => {
    const image = join(dir, 'thin.qcow2');
    await qcow2(image, String(SIZE));
    const pattern = (regions: Region[]) => regions.map(({ offset, data }) => `write -P 0x${data[0]!.toString(16)} ${offset} ${data.length}`);
    const filled = (offset: number, length: number, byte: number): Region => ({ offset, data: Buffer.alloc(length, byte) });
    const first = [filled(5 * TiB + 4097, 3 * MiB, 0x5a), filled(11 * TiB, MiB, 0x6b)];
    await qemuIo(image, pattern(first));
    const full = await backUpCounted({ kind: 'image', path: image });
    expect(full.record.disks[0]!.stats.bytesRead).toBe(touchedBlocks(first) * BLOCK);
    expect(gapsBetween(first)).toBe(3);
    expect(full.steps).toBe(touchedBlocks(first) + 3);

    // Changed: one region overwritten in part, one new region past 2^43 bytes; everything else unchanged.
    const second = [filled(5 * TiB + 4097 + MiB, 4096, 0x7c), filled(10 * TiB + 7 * MiB + 1, 5000, 0x3d)];
    await qemuIo(image, pattern(second));
    const { record: incremental, steps } = await backUpCounted({ kind: 'image', path: image });
    const disk = incremental.disks[0]!.stats;
    expect(incremental.type).toBe('incremental');
    // The two changed blocks, and the three unchanged runs around them.
    expect(gapsBetween(second)).toBe(3);
    expect(steps).toBe(touchedBlocks(second) + 3);
    expect(disk.bytesRead).toBe(touchedBlocks(second) * BLOCK);
    expect(disk.blocksUnchanged).toBe(SIZE / BLOCK - touchedBlocks(second));

    const target = join(dir, 'thin-qcow2-restored.raw');
    await restoreTo(incremental.id, target);
    // What the image holds now: the first regions with the second written over them.
    const now: Region[] = [...first, ...second].map(({ offset, data }) => ({ offset, data: Buffer.from(data) }));
    const overlap = now[0]!;
    overlap.data.fill(0x7c, MiB, MiB + 4096);
    await expectRegions(target, now);
    await expectHolesOutside(target, now);
    const compare = await sh('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', target, image]);
    expect(compare).toMatch(/Images are identical/);
  });
});
