/**
 * Garbage collection: what it reclaims and rewrites (exact counts), a backup committing between its
 * phases (a real interleaving: gc stops itself with SIGSTOP at a crash point, a backup runs, gc resumes),
 * a second gc refused, deletions deferred while a reader is registered, and a refusal to guess.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { mkdir, open, readdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { KIND_DATA, registerReader, scanPack } from '../dist/engine/index.js';
import { parseJson, resumedJson, runEngine, spawnEngine, sparseFile, stoppedItself, tempDir, writeRegion, type BackupJson, expectRestoreIdentical, withoutProgress, backUp } from './helpers.js';

const MiB = 1024 * 1024;
const FRAME_OVERHEAD = 56;
let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-gc-'));
});
afterAll(async () => {
  await cleanup();
});

interface GcJson {
  backups: number;
  backupsCommittedDuringGc: string[];
  packs: { before: number; deleted: string[]; rewritten: string[]; created: string[]; kept: { pack: string; why: string }[]; deferred: string[] };
  chunks: { live: number; removed: number; moved: number };
  bytes: { before: number; deleted: number; written: number; reclaimed: number };
  readers: number;
  markers: { quarantine: string[]; protected: string[]; verifications: string[] };
}

interface VerifyJson {
  ok: boolean;
  problems: unknown[];
  garbage: { tempFiles: string[]; unindexedPacks: string[]; unreferencedBlobs: number };
}

/** An image made of random regions, each [MiB, seed]; returns its path. */
async function image(name: string, regions: [number, string][]): Promise<string> {
  const path = join(dir, name);
  const size = regions.reduce((sum, [n]) => sum + n * MiB, 0);
  await sparseFile(path, size);
  let at = 0;
  for (const [n, seed] of regions) {
    await writeRegion(path, at * MiB, n * MiB, 'random', seed);
    at += n;
  }
  return path;
}

/** A version-1 repository: this file tests gc of versions 1 and 2 (SPEC.md 10.2); version 3's (19.8) is test/v3-gc. */
async function freshRepo(name: string): Promise<string> {
  const repo = join(dir, name);
  expect((await runEngine(['init', '--format', '1', repo])).code).toBe(0);
  return repo;
}

function backupOf(repo: string, source: string, name = 'vm'): Promise<BackupJson> {
  return backUp(repo, ['--source', source, '--name', name], { quiet: true });
}

async function verified(repo: string): Promise<VerifyJson> {
  const result = await runEngine(['verify', '--repo', repo, '--read-data', '--json']);
  const report = parseJson<VerifyJson>(result.stdout);
  expect(report.problems).toEqual([]);
  expect(result.code).toBe(0);
  return report;
}

async function packCount(repo: string): Promise<number> {
  let n = 0;
  for (const sub of await readdir(join(repo, 'packs'))) n += (await readdir(join(repo, 'packs', sub))).length;
  return n;
}

describe('engine gc', () => {
  test('deletes what only pruned backups referenced, rewrites a sparse pack, and every kept backup restores', async () => {
    const repo = await freshRepo('repo-reclaim');
    const first = await image('first.img', [[8, 'shared'], [12, 'old']]);
    const old = await backupOf(repo, first);
    const second = await image('second.img', [[8, 'shared'], [12, 'new']]);
    const kept = await backupOf(repo, second);
    expect((await runEngine(['prune', '--repo', repo, '--keep-last', '1'])).code).toBe(0);
    expect(await packCount(repo)).toBe(4); // prune removes records only

    const dry = parseJson<GcJson>((await runEngine(['gc', '--repo', repo, '--dry-run', '--json'])).stdout);
    expect(dry.packs.deleted.length).toBe(2);
    expect(await packCount(repo)).toBe(4);

    const result = await runEngine(['gc', '--repo', repo, '--json']);
    expect(result.code).toBe(0);
    const report = parseJson<GcJson>(result.stdout);
    // The first backup's map pack is dead; its data pack (20 chunks, 8 still live: 40%) is rewritten.
    expect(report.packs.before).toBe(4);
    expect(report.packs.deleted.length).toBe(2);
    expect(report.packs.rewritten.length).toBe(1);
    expect(report.packs.created.length).toBe(1);
    expect(report.chunks).toEqual({ live: 8 + 12 + 1, removed: 12 + 1, moved: 8 });
    expect(report.bytes.written).toBe(32 + 8 * (MiB + FRAME_OVERHEAD));
    expect(report.bytes.reclaimed).toBe(report.bytes.deleted - report.bytes.written);
    expect(report.bytes.reclaimed).toBeGreaterThan(12 * MiB);
    expect(await packCount(repo)).toBe(3);
    const after = await verified(repo);
    expect(after.garbage).toMatchObject({ tempFiles: [], unindexedPacks: [], unreferencedBlobs: 0 });
    await expectRestoreIdentical(repo, kept.id, second, { dir });
    expect((await runEngine(['restore', '--repo', repo, old.id, '--to', join(dir, 'gone')])).code).toBe(1); // pruned

    const again = parseJson<GcJson>((await runEngine(['gc', '--repo', repo, '--json'])).stdout);
    expect(again.packs.deleted).toEqual([]);
    expect(again.bytes.reclaimed).toBe(0);
    // The next backup of the pruned content stores it again and restores.
    const back = await backupOf(repo, first);
    expect(back.disks[0]!.blocksNew).toBe(12);
    await expectRestoreIdentical(repo, back.id, first, { dir });
  });

  test('a backup that commits between the phases keeps what it references; a second gc is refused meanwhile', async () => {
    const repo = await freshRepo('repo-interleave');
    const x = await image('x.img', [[4, 'x1'], [6, 'x2']]);
    await backupOf(repo, x);
    const y = await image('y.img', [[4, 'x1'], [6, 'y']]);
    const by = await backupOf(repo, y);
    expect((await runEngine(['prune', '--repo', repo, '--keep-last', '1'])).code).toBe(0); // bx goes: x2 and its map are dead

    // Round 1: an unrelated backup commits while gc copies; gc's temp packs survive that backup's cleanup of tmp/.
    let child = spawnEngine(['gc', '--repo', repo, '--json'], { ENGINE_STOP_AT: 'gc-copied' });
    await stoppedItself(child);
    const z = await image('z.img', [[3, 'z']]);
    const bz = await backupOf(repo, z, 'other');
    const second = await runEngine(['gc', '--repo', repo]);
    expect(second.code).toBe(3);
    expect(second.stderr).toContain(`is locked by pid ${child.pid} on host`);
    expect(second.stderr).toContain('(gc)');
    let { code, json } = await resumedJson<GcJson>(child);
    expect(code).toBe(0);
    expect(json.backupsCommittedDuringGc).toEqual([bz.id]);
    expect(json.packs.rewritten.length).toBe(1); // bx's data pack: 4 of 10 chunks live
    expect(json.packs.created.length).toBe(1);
    expect(json.packs.kept).toEqual([]);
    expect(json.chunks.moved).toBe(4);
    await verified(repo);
    await expectRestoreIdentical(repo, by.id, y, { dir });
    await expectRestoreIdentical(repo, bz.id, z, { dir });

    // Round 2: pruned content comes back while gc runs. gc marked it dead; the backup deduplicated against
    // it (still indexed, still in its packs); phase 3 sees the new record and deletes nothing it needs.
    const k = await image('k.img', [[4, 'k1'], [6, 'k2']]);
    await backupOf(repo, k, 'k');
    const newer = await image('k-newer.img', [[4, 'k1']]);
    await backupOf(repo, newer, 'k');
    expect(parseJson<{ removed: number }>((await runEngine(['prune', '--repo', repo, '--keep-last', '1', '--json'])).stdout).removed).toBe(1);
    const beforePacks = await packCount(repo);
    child = spawnEngine(['gc', '--repo', repo, '--json'], { ENGINE_STOP_AT: 'gc-marked' });
    await stoppedItself(child);
    const revived = await backupOf(repo, k, 'k');
    expect(revived.disks[0]!.blocksNew).toBe(0); // every chunk deduplicated against what gc found dead
    ({ code, json } = await resumedJson<GcJson>(child));
    expect(code).toBe(0);
    expect(json.backupsCommittedDuringGc).toEqual([revived.id]);
    expect(json.packs.deleted).toEqual([]);
    expect(json.packs.created).toEqual([]);
    // The pruned backup's data pack (to rewrite: 4 of 10 live) and its map pack (dead) both hold revived blobs.
    expect(json.packs.kept.length).toBe(2);
    for (const kept of json.packs.kept) expect(kept.why).toMatch(/is referenced by a backup committed during gc$/);
    expect(await packCount(repo)).toBe(beforePacks);
    expect((await verified(repo)).garbage.tempFiles).toEqual([]);
    await expectRestoreIdentical(repo, revived.id, k, { dir });
    await expectRestoreIdentical(repo, by.id, y, { dir });
    await expectRestoreIdentical(repo, bz.id, z, { dir });
  });

  test('with a reader registered, deletions are deferred; a later gc finishes them', async () => {
    const repo = await freshRepo('repo-reader');
    const a = await image('reader-a.img', [[5, 'ra']]);
    await backupOf(repo, a);
    const b = await image('reader-b.img', [[5, 'rb']]);
    const kept = await backupOf(repo, b);
    await runEngine(['prune', '--repo', repo, '--keep-last', '1']);
    const reader = await registerReader(repo, 'serve', [kept.id]);
    let report: GcJson;
    try {
      report = parseJson<GcJson>((await runEngine(['gc', '--repo', repo, '--json'])).stdout);
      expect(report.readers).toBe(1);
      expect(report.packs.deleted).toEqual([]);
      expect(report.packs.deferred.length).toBe(2);
      expect(await packCount(repo)).toBe(4);
      const garbage = (await verified(repo)).garbage;
      expect(garbage.unindexedPacks.sort()).toEqual(report.packs.deferred.sort());
    } finally {
      await reader.release();
    }
    const later = parseJson<GcJson>((await runEngine(['gc', '--repo', repo, '--json'])).stdout);
    expect(later.packs.deleted.sort()).toEqual(report.packs.deferred.sort());
    expect(await packCount(repo)).toBe(2);
    await verified(repo);
    await expectRestoreIdentical(repo, kept.id, b, { dir });
  });

  test('a damaged record with no good copy stops gc before it changes anything, naming the way on', async () => {
    const repo = await freshRepo('repo-refuse');
    const a = await image('refuse-a.img', [[2, 'fa']]);
    const one = await backupOf(repo, a);
    const b = await image('refuse-b.img', [[2, 'fb']]);
    await backupOf(repo, b, 'other');
    await writeFile(join(repo, 'backups', one.id), '{"version": 1,');
    // The index catalogue's copy goes too: the index is rebuilt from the packs and the (damaged) file.
    await rm(join(repo, 'index'), { recursive: true });
    const result = await runEngine(['gc', '--repo', repo]);
    expect(result.code).toBe(4);
    expect(result.stderr).toContain(`backup record ${one.id} is damaged: not valid JSON, and the index holds no good copy of it`);
    expect(result.stderr).not.toMatch(/is damaged: .* is damaged/);
    expect(result.stderr).toContain('deletes nothing');
    expect(result.stderr).toContain(`engine forget ${one.id}`);
    expect(await packCount(repo)).toBe(4);
  });

  test('removes markers that name nothing, keeps the quarantine record of damage a backup still references', async () => {
    const repo = await freshRepo('repo-markers');
    const a = await image('markers-a.img', [[3, 'ma']]);
    const damagedBackup = await backupOf(repo, a);
    const b = await image('markers-b.img', [[2, 'mb']]);
    const gone = await backupOf(repo, b, 'other');
    for (const id of [damagedBackup.id, gone.id]) expect((await runEngine(['protect', '--repo', repo, id])).code).toBe(0);
    await rm(join(repo, 'backups', gone.id)); // a record deleted by hand: its marker now names nothing
    const strayPack = 'ab'.repeat(16);
    await mkdir(join(repo, 'quarantine'), { recursive: true });
    await writeFile(join(repo, 'quarantine', `${strayPack}-32.json`), JSON.stringify({ pack: strayPack, offset: 32, blob: null, why: 'test', since: new Date().toISOString() }));

    // Block 0 of the first backup damaged and set aside by repair; no good copy exists.
    let damaged: { pack: string; offset: number } | undefined;
    for (const sub of await readdir(join(repo, 'packs'))) {
      for (const packId of await readdir(join(repo, 'packs', sub))) {
        const frames = (await scanPack(repo, packId)).frames;
        if (frames.length !== 3 || frames[0]!.header.kind !== KIND_DATA) continue;
        const handle = await open(join(repo, 'packs', sub, packId), 'r+');
        await handle.write(Buffer.from([0xff, 0x00, 0xff]), 0, 3, frames[0]!.offset + 48 + 500);
        await handle.close();
        damaged = { pack: packId, offset: frames[0]!.offset };
      }
    }
    expect(damaged).toBeDefined();
    expect((await runEngine(['repair', '--repo', repo])).code).toBe(4);
    const damagedKey = `${damaged!.pack}-${damaged!.offset}`;
    const quarantineFiles = async (): Promise<string[]> => (await readdir(join(repo, 'quarantine'))).sort();
    expect(await quarantineFiles()).toEqual([`${damagedKey}.json`, `${strayPack}-32.json`].sort());

    const dry = parseJson<GcJson>((await runEngine(['gc', '--repo', repo, '--dry-run', '--json'])).stdout);
    expect(dry.markers).toEqual({ quarantine: [`${strayPack}-32`], protected: [gone.id], verifications: [] });
    expect((await quarantineFiles()).length).toBe(2);
    expect((await readdir(join(repo, 'protected'))).length).toBe(2);

    // The damaged pack's two good chunks are copied and the pack deleted; its record stays, since the
    // first backup still needs that chunk and has no other copy.
    const result = await runEngine(['gc', '--repo', repo, '--rewrite-below', '100%', '--json']);
    expect(result.code).toBe(0);
    const report = parseJson<GcJson>(result.stdout);
    expect(report.packs.deleted).toContain(damaged!.pack);
    expect(report.markers).toEqual({ quarantine: [`${strayPack}-32`], protected: [gone.id], verifications: [] });
    expect(await quarantineFiles()).toEqual([`${damagedKey}.json`]);
    expect(await readdir(join(repo, 'protected'))).toEqual([damagedBackup.id]);
    // gc can still mark past the damaged chunk (it would refuse if the record were gone).
    const again = await runEngine(['gc', '--repo', repo, '--json']);
    expect(withoutProgress(again.stderr)).toBe('');
    expect(again.code).toBe(0);
    expect(parseJson<GcJson>(again.stdout).markers).toEqual({ quarantine: [], protected: [], verifications: [] });

    // The next backup of the source stores a good copy: the record names nothing any more, and goes.
    await backupOf(repo, a);
    const healed = parseJson<GcJson>((await runEngine(['gc', '--repo', repo, '--json'])).stdout);
    expect(healed.markers).toEqual({ quarantine: [damagedKey], protected: [], verifications: [] });
    expect(await quarantineFiles()).toEqual([]);
    expect((await verified(repo)).garbage.unreferencedBlobs).toBe(0);
    await expectRestoreIdentical(repo, damagedBackup.id, a, { dir });
  });
});
