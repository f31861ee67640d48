/**
 * Repair: a damaged chunk is reported per backup, disk and offset, set aside by repair, and healed by the
 * next backup of a source that still holds the block; the OLD backup then restores byte for byte.
 * Also a damaged frame header (repair walks past it), a truncated pack, and a damaged index.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readdir, readFile, truncate, writeFile } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { KIND_DATA, scanPack } from '../dist/engine/index.js';
import { filesIdentical, flipByte, parseJson, runEngine, sparseFile, tempDir, writeRegion, type BackupJson, withoutProgress } from './helpers.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-repair-'));
});
afterAll(async () => {
  await cleanup();
});

interface Problem {
  code: string;
  message: string;
  backup?: string;
  disk?: string;
  offset?: number;
  blob?: string;
}

interface RepairJson {
  previousIndex: string;
  index: { packs: number; blobs: number };
  quarantined: { pack: string; offset: number; blob: string | null; why: string }[];
  damaged: Problem[];
  ok: boolean;
}

async function setup(name: string, megabytes: number): Promise<{ repo: string; image: string; backup: BackupJson }> {
  const repo = join(dir, name);
  // Version 1: repair of versions 1 and 2 (their LevelDB index); version 3's (19.12) is test/v3-repair.
  expect((await runEngine(['init', '--format', '1', repo])).code).toBe(0);
  const image = join(dir, `${name}.img`);
  await sparseFile(image, megabytes * MiB);
  await writeRegion(image, 0, megabytes * MiB, 'random', name);
  const made = await runEngine(['backup', '--repo', repo, '--source', image, '--json']);
  expect(made.code).toBe(0);
  return { repo, image, backup: parseJson<BackupJson>(made.stdout) };
}

async function dataPack(repo: string): Promise<{ packId: string; path: string; frames: { offset: number; length: number; id: string }[] }> {
  for (const sub of await readdir(join(repo, 'packs'))) {
    for (const packId of await readdir(join(repo, 'packs', sub))) {
      const scan = await scanPack(repo, packId);
      if (scan.frames.some((f) => f.header.kind === KIND_DATA)) {
        return { packId, path: join(repo, 'packs', sub, packId), frames: scan.frames.map((f) => ({ offset: f.offset, length: f.length, id: f.header.id.toString('hex') })) };
      }
    }
  }
  throw new Error('no data pack');
}

/** The disk offset whose 1 MiB block hashes to `id`. */
async function offsetOf(image: string, id: string): Promise<number> {
  const bytes = await readFile(image);
  for (let at = 0; at < bytes.length; at += MiB) if (createHash('sha256').update(bytes.subarray(at, at + MiB)).digest('hex') === id) return at;
  return -1;
}

async function verifyJson(repo: string, readData = true): Promise<{ code: number; problems: Problem[] }> {
  const result = await runEngine(['verify', '--repo', repo, ...(readData ? ['--read-data'] : []), '--json']);
  return { code: result.code, problems: parseJson<{ problems: Problem[] }>(result.stdout).problems };
}

async function repairJson(repo: string): Promise<{ code: number; report: RepairJson }> {
  const result = await runEngine(['repair', '--repo', repo, '--json']);
  return { code: result.code, report: parseJson<RepairJson>(result.stdout) };
}

/** The heal: a new backup of the same source stores good copies; then nothing is wrong and the old backup restores. */
async function expectHealed(repo: string, image: string, oldId: string, newBlocks: number): Promise<void> {
  const next = await runEngine(['backup', '--repo', repo, '--source', image, '--json']);
  expect(next.code).toBe(0);
  expect(parseJson<BackupJson>(next.stdout).disks[0]!.blocksNew).toBe(newBlocks);
  expect(await verifyJson(repo)).toEqual({ code: 0, problems: [] });
  const target = join(dir, `healed-${oldId}`);
  const restore = await runEngine(['restore', '--repo', repo, oldId, '--to', target]);
  expect(withoutProgress(restore.stderr)).toBe('');
  expect(await filesIdentical(image, target)).toBe(true);
}

describe('engine repair', () => {
  test('a damaged chunk: verify names it, repair sets it aside, the next backup heals the old one', async () => {
    const { repo, image, backup } = await setup('chunk', 12);
    const pack = await dataPack(repo);
    const victim = pack.frames[5]!;
    await flipByte(pack.path, victim.offset + 48 + 4321);
    const offset = await offsetOf(image, victim.id);
    expect(offset).toBeGreaterThanOrEqual(0);

    const before = await verifyJson(repo);
    expect(before.code).toBe(4);
    expect(before.problems.map((p) => p.code).sort()).toEqual(['CHUNK_DAMAGED', 'FRAME_DAMAGED']);
    expect(before.problems).toContainEqual(expect.objectContaining({ code: 'CHUNK_DAMAGED', backup: backup.id, disk: 'chunk.img', offset, blob: victim.id }));

    const { code, report } = await repairJson(repo);
    expect(code).toBe(4);
    expect(report.previousIndex).toBe('readable');
    expect(report.quarantined).toEqual([expect.objectContaining({ pack: pack.packId, offset: victim.offset, blob: victim.id, why: 'checksum mismatch' })]);
    expect(report.damaged).toEqual([expect.objectContaining({ code: 'CHUNK_DAMAGED', backup: backup.id, disk: 'chunk.img', offset, blob: victim.id })]);
    expect(report.index.blobs).toBe(12 - 1 + 1); // eleven good chunks and the map page

    // Known damage is reported once, against the backup that needs it, not as a new frame problem.
    const after = await verifyJson(repo);
    expect(after.code).toBe(4);
    expect(after.problems).toEqual([expect.objectContaining({ code: 'CHUNK_DAMAGED', backup: backup.id, disk: 'chunk.img', offset, blob: victim.id })]);
    expect(after.problems[0]!.message).toContain('quarantined by repair');
    await expectHealed(repo, image, backup.id, 1);
    // gc copes with the quarantined frame's pack.
    expect((await runEngine(['gc', '--repo', repo])).code).toBe(0);
    expect(await verifyJson(repo)).toEqual({ code: 0, problems: [] });
  });

  test('a damaged frame header: repair walks past it and keeps the good frames behind it', async () => {
    const { repo, image, backup } = await setup('header', 10);
    const pack = await dataPack(repo);
    const victim = pack.frames[3]!;
    await flipByte(pack.path, victim.offset); // the frame magic: the pack's frame chain breaks here
    const before = await verifyJson(repo, false);
    expect(before.code).toBe(4);
    expect(before.problems.map((p) => p.code)).toContain('PACK_DAMAGED');
    const { report } = await repairJson(repo);
    expect(report.quarantined).toEqual([expect.objectContaining({ pack: pack.packId, offset: victim.offset, blob: victim.id })]);
    expect(report.index.blobs).toBe(10 - 1 + 1);
    expect(report.damaged.map((d) => [d.code, d.offset])).toEqual([['CHUNK_DAMAGED', await offsetOf(image, victim.id)]]);
    await expectHealed(repo, image, backup.id, 1);
  });

  test('a truncated pack: every blob the cut took is named, then healed', async () => {
    const { repo, image, backup } = await setup('cut', 8);
    const pack = await dataPack(repo);
    const cutAt = pack.frames[5]!.offset + 1000;
    await truncate(pack.path, cutAt);
    const { report } = await repairJson(repo);
    expect(report.quarantined.map((q) => q.blob).sort()).toEqual(pack.frames.slice(5).map((f) => f.id).sort());
    expect(report.damaged.length).toBe(3);
    await expectHealed(repo, image, backup.id, 3);
  });

  test('a damaged index (CURRENT): verify says so, repair rebuilds it, nothing is lost', async () => {
    const { repo, image, backup } = await setup('index', 4);
    await writeFile(join(repo, 'index', 'CURRENT'), 'MANIFEST-999999\n');
    const verify = await runEngine(['verify', '--repo', repo, '--json']);
    expect(verify.code).toBe(4);
    expect(parseJson<{ error: { code: string; message: string } }>(verify.stdout).error).toMatchObject({ code: 'ENGINE_CORRUPT_METADATA' });
    expect(verify.stdout).toContain('engine repair');
    const { code, report } = await repairJson(repo);
    expect(code).toBe(0);
    expect(report).toMatchObject({ previousIndex: 'unreadable', quarantined: [], damaged: [], ok: true, index: { blobs: 5 } });
    expect(await verifyJson(repo)).toEqual({ code: 0, problems: [] });
    await expectHealed(repo, image, backup.id, 0);
  });
});
