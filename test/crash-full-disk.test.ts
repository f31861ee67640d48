/**
 * A full disk (part of the fault campaign, test/fault-campaign.ts), on a small real tmpfs: during a backup,
 * and in the middle of gc, prune and repair. The operation finishes through the space reserve or fails with
 * ENGINE_NO_SPACE; after the space is freed: no lock, temporary file or registration left, verify clean,
 * every committed backup restores byte for byte, the next backup succeeds.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { access, copyFile, readdir, readFile, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { parseJson, resumedJson, runEngine, sh, sparseFile, stoppedItself, tempDir, Tmpfs, writeRegion, type BackupJson, type RunResult, expectRestoreIdentical, withoutProgress } from './helpers.js';
import { backupIds, campaign, CampaignRepo, expectVerifies, recordCampaign, type GcJson } from './fault-campaign.js';
import { KIND_DATA, scanPack, SeededRandom } from '../dist/engine/index.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-crash-full-disk-'));
});
afterAll(async () => {
  await recordCampaign('crash-full-disk');
  await cleanup();
});

/**
 * A backup that meets a full disk: the repository (of `format`) on a 48 MiB tmpfs, a first backup of 4 MiB
 * committed, then one of 96 MiB that cannot fit. It fails in one line with ENGINE_NO_SPACE and commits
 * nothing; `nothingLeft` checks the format's own leftovers; the committed backup verifies and restores; after
 * a change of the small source, the next backup commits and restores. Format 3 keeps its host cache (the
 * run's ENGINE_CACHE_DIR) on another file system, so its packs are copied in across file systems.
 */
async function backupMeetsFullDisk(format: 1 | 3, nothingLeft: (repo: string) => Promise<void>): Promise<void> {
  const fs = await Tmpfs.mount(join('/tmp', `engine-full-v${format}-${process.pid}`), 48);
  try {
    const repo = join(fs.path, 'repo');
    expect((await runEngine(['init', repo, '--format', String(format)])).code).toBe(0);
    expect(JSON.parse(await readFile(join(repo, 'config'), 'utf8'))).toMatchObject({ version: format });
    const small = join(dir, `small-v${format}.img`);
    await sparseFile(small, 4 * MiB);
    await writeRegion(small, 0, 4 * MiB, 'random', `small-v${format}`);
    const first = await runEngine(['backup', '--repo', repo, '--source', small, '--json']);
    expect(first.code).toBe(0);
    const firstId = parseJson<BackupJson>(first.stdout).id;
    const large = join(dir, `large-v${format}.img`);
    await sparseFile(large, 96 * MiB);
    await writeRegion(large, 0, 96 * MiB, 'random', `large-v${format}`);
    const full = await runEngine(['backup', '--repo', repo, '--source', large]);
    campaign.injected += 1;
    campaign.fullDisk += 1;
    if (format === 3) campaign.v3 += 1;
    expect(full.code).toBe(1);
    // A backup that outlasts 5 s (a loaded machine) prints a progress line first: how many depends on the speed.
    expect(withoutProgress(full.stderr)).toMatch(/^engine: no space left on the device holding /);
    campaign.noSpace += 1;
    expect(await backupIds(repo)).toEqual([firstId]);
    await nothingLeft(repo);
    await expectVerifies(repo);
    await expectRestoreIdentical(repo, firstId, small, { dir });
    await writeRegion(small, MiB, MiB, 'random', `small-v${format}-changed`);
    const next = await runEngine(['backup', '--repo', repo, '--source', small, '--json']);
    expect(withoutProgress(next.stderr)).toBe('');
    expect(next.code).toBe(0);
    await expectRestoreIdentical(repo, parseJson<BackupJson>(next.stdout).id, small, { dir });
  } finally {
    await fs.unmount();
  }
}

describe('a full disk during a backup', () => {
  // Format 1: its tmp/ and the unfinished pack in it.
  test('format 1: the backup fails, the repository stays consistent, the next backup succeeds', async () => {
    await backupMeetsFullDisk(1, async (repo) => {
      expect(await readdir(join(repo, 'tmp'))).toEqual([]); // the unfinished pack was removed
    });
  });

  test('format 3 on a folder: the backup fails in one line, leaves no lease and no partial object; committed backups restore; the next backup commits', async () => {
    await backupMeetsFullDisk(3, async (repo) => {
      expect(await readdir(join(repo, 'leases'))).toEqual([]);
      // The pack that met the full disk was being copied in from the host cache (another file system): no
      // part of it is left, under its name or as a temporary file; the packs stored before it are garbage.
      expect((await sh('find', [repo, '-name', '*.tmp'])).trim()).toBe('');
    });
  });
});

describe('a full disk during gc, prune and repair', () => {
  let fs: Tmpfs;
  let c: CampaignRepo;

  beforeAll(async () => {
    fs = await Tmpfs.mount(join('/tmp', `engine-full-maintenance-${process.pid}`), 64);
    c = new CampaignRepo(join(fs.path, 'repo'), dir, new SeededRandom('full-disk'));
    // Format 1: the lock, the space reserve, tmp/ and writers/ are what these cases are about.
    expect((await runEngine(['init', c.repo, '--format', '1'])).code).toBe(0);
  });
  afterAll(async () => {
    await fs?.unmount();
  });

  /** An operation that met a full disk failed with ENGINE_NO_SPACE (exit 1) and said so in its JSON. */
  function expectNoSpace(code: number | null, stdout: string): void {
    expect(code).toBe(1);
    expect(parseJson<{ error: { code: string } }>(stdout).error.code).toBe('ENGINE_NO_SPACE');
    campaign.noSpace += 1;
  }

  /** After the space is freed: no lock, no temp file, no registration left; verify clean; everything restores. */
  async function afterFullDisk(): Promise<void> {
    await fs.unfill();
    expect(await access(join(c.repo, 'lock')).then(() => true, () => false)).toBe(false);
    expect(await readdir(join(c.repo, 'tmp'))).toEqual([]);
    expect(await readdir(join(c.repo, 'writers')).catch(() => [])).toEqual([]);
    const garbage = await c.verifies();
    expect(garbage.tempFiles).toEqual([]);
    await c.restoresAll();
  }

  /** Two backups of 12 MiB sharing 4, the older pruned: its data pack is a third live (rewritten), its map pack dead. */
  async function garbage(round: string): Promise<void> {
    const image = join(dir, `full-${round}.img`);
    await sparseFile(image, 12 * MiB);
    await writeRegion(image, 0, 4 * MiB, 'random', 'full-shared');
    await writeRegion(image, 4 * MiB, 8 * MiB, 'random', `full-${round}`);
    await c.backupOf(image, 'vm');
    expect((await c.run(['prune', '--keep-last', '1'])).code).toBe(0);
    await c.forgetRemoved();
  }

  test('gc: the disk fills while it copies (it deletes the dead, rewrites nothing), then when it comes back for the lock (the reserve takes it); nothing is lost', async () => {
    await garbage('g1');
    await garbage('g2');
    const packs = (await c.packFiles()).length;

    // Full in phase 2: the copy of the live chunks (4 MiB) meets 2.5 MiB of free space. The pack to
    // rewrite stays (kept, saying why); the dead map pack still goes.
    let child = c.spawn(['gc', '--json'], { ENGINE_STOP_AT: 'gc-marked' });
    await stoppedItself(child);
    await fs.fill(2.5 * MiB);
    let resumed = await resumedJson<GcJson & { packs: { kept: { pack: string; why: string }[] } }>(child);
    c.count('fullDisk');
    expect(resumed.code).toBe(0);
    expect(resumed.json.packs.rewritten).toEqual([]);
    expect(resumed.json.packs.kept.map((k) => k.why)).toEqual([expect.stringMatching(/^not rewritten: no space left for its \d+ live bytes; the next gc rewrites it with the room this one frees$/)]);
    expect(resumed.json.packs.deleted.length).toBe(1);
    expect((await c.packFiles()).length).toBe(packs - 1);
    await afterFullDisk();

    // Full when phase 3 needs the lock again: it takes it in the space reserve and commits the rewrite.
    child = c.spawn(['gc', '--json'], { ENGINE_STOP_AT: 'gc-copied' });
    await stoppedItself(child);
    expect((await readdir(join(c.repo, 'tmp'))).length).toBe(1);
    await fs.fill(0);
    resumed = await resumedJson(child);
    c.count('fullDisk');
    expect(resumed.code).toBe(0);
    expect(resumed.json.packs.rewritten.length).toBe(1);
    expect(resumed.json.packs.deleted.length).toBe(1);
    expect(resumed.json.chunks.moved).toBe(4);
    expect((await stat(join(c.repo, 'reserve'))).size).toBeGreaterThan(0);
    await afterFullDisk();

    const finished = await c.run(['gc', '--json']);
    expect(finished.code).toBe(0);
    const report = parseJson<GcJson>(finished.stdout);
    expect(report.packs.rewritten).toEqual([]);
    expect(report.packs.deleted).toEqual([]);
    expect((await c.verifies()).unreferencedBlobs).toBe(0);
    await c.restoresAll();
  });

  test('prune: on a full disk it removes through the space reserve; without one it refuses before removing anything; a disk that fills mid-way does not stop it', async () => {
    const image = join(dir, 'full-prune.img');
    await sparseFile(image, MiB);
    const three = async (round: string): Promise<void> => {
      for (let i = 0; i < 3; i += 1) {
        await writeRegion(image, 0, MiB, 'random', `full-prune-${round}-${i}`);
        const copy = join(dir, `full-prune-${round}-${i}.img`);
        await copyFile(image, copy);
        await c.backupOf(copy, `prune-${round}`);
      }
    };
    // With the reserve: a disk full to the last byte does not stop it.
    await three('reserve');
    await fs.fill(0);
    const pruned = await c.run(['prune', '--keep-last', '1', '--json']);
    c.count('fullDisk');
    expect(pruned.code).toBe(0);
    expect(parseJson<{ removed: number }>(pruned.stdout).removed).toBe(2);
    await c.forgetRemoved();
    await afterFullDisk();

    // Without a reserve (used up, or an older repository): no room for the lock, then room for the lock
    // but not for the index's new MANIFEST; it refuses before removing anything, naming what to do.
    await three('none');
    const before = await c.ids();
    for (const leave of [0, 4096]) {
      await rm(join(c.repo, 'reserve'), { force: true });
      await fs.fill(leave);
      const refused = await c.run(['prune', '--keep-last', '1', '--json']);
      c.count('fullDisk');
      expectNoSpace(refused.code, refused.stdout);
      const message = parseJson<{ error: { message: string } }>(refused.stdout).error.message;
      expect(message).toContain(leave === 0 ? `${c.repo}` : `${c.repo}/index`);
      if (leave === 0) expect(message).toContain('no space is set aside to take the lock with');
      expect(await c.ids()).toEqual(before);
      await afterFullDisk();
    }

    // Filled right after the first of two removals: the second removal still goes through.
    const child = c.spawn(['prune', '--keep-last', '1', '--json'], { ENGINE_STOP_AT: 'prune-record-removed' });
    await stoppedItself(child);
    await fs.fill(0);
    child.kill('SIGCONT');
    // Stops again after the second removal.
    await stoppedItself(child);
    const { code, json } = await resumedJson<{ removed: number }>(child);
    c.count('fullDisk');
    expect(code).toBe(0);
    expect(json.removed).toBe(2);
    await c.forgetRemoved();
    expect((await c.ids()).length).toBe(before.length - 2);
    await afterFullDisk();
  });

  test('repair: at every amount of free space it either finishes or fails with ENGINE_NO_SPACE, leaving the damage where verify finds it', async () => {
    const packs = await c.undamagedPacks();
    let damaged: string | undefined;
    for (const path of packs) {
      const frame = (await scanPack(c.repo, path.split('/').pop()!)).frames.find((f) => f.header.kind === KIND_DATA);
      if (!frame || damaged) continue;
      await c.flipBit(path, frame.offset + 48 + 700);
      damaged = path.split('/').pop()!;
    }
    expect(damaged).toBeDefined();
    c.count('damage');
    const failedAt = new Set<string>();
    let repaired: RunResult | undefined;
    for (const leave of [0, 4096, 16384, 24576, 32768, 65536, 262144]) {
      // Without the space reserve (12.6), which would let it finish at once: where does it fail?
      await rm(join(c.repo, 'reserve'), { force: true });
      await fs.fill(leave);
      const result = await c.run(['repair', '--json']);
      c.count('fullDisk');
      // Finished: exit 4 while a backup references the damaged chunk, 0 when none does (the flipped frame
      // may belong to a blob only garbage refers to; which pack holds what depends on random pack ids).
      if (result.code === 4 || result.code === 0) {
        const damagedRefs = parseJson<{ damaged: unknown[] }>(result.stdout).damaged.length;
        expect(result.code === 4).toBe(damagedRefs > 0);
        repaired = result;
        break;
      }
      expectNoSpace(result.code, result.stdout);
      const path = parseJson<{ error: { details: { path: string } } }>(result.stdout).error.details.path;
      failedAt.add(path.slice(c.repo.length + 1).replace(/\.[0-9a-f]+$/, ''));
      await fs.unfill();
      expect(await readdir(join(c.repo, 'tmp'))).toEqual([]);
      // Nothing was set aside or replaced: verify still names the damage exactly.
      const verified = await c.run(['verify', '--read-data', '--json']);
      expect(verified.code).toBe(4);
      const problems = parseJson<{ problems: { code: string; pack?: string }[] }>(verified.stdout).problems;
      expect(problems.filter((p) => p.code === 'FRAME_DAMAGED').map((p) => p.pack)).toEqual([damaged]);
    }
    campaign.detected += 1;
    // Before it had the room to finish it failed at several points: its lock, the new index it builds, the
    // old index it reads (opening LevelDB writes); nowhere else.
    expect(failedAt.has('lock')).toBe(true);
    expect(failedAt.has('tmp/index-repair')).toBe(true);
    for (const place of failedAt) expect(['lock', 'tmp/index-repair', 'index']).toContain(place);
    expect(repaired).toBeDefined();
    campaign.repaired += 1;
    expect(parseJson<{ quarantined: { pack: string }[] }>(repaired!.stdout).quarantined.map((q) => q.pack)).toEqual([damaged]);
    await fs.unfill();
    for (const d of new Set(parseJson<{ damaged: { backup: string }[] }>(repaired!.stdout).damaged.map((x) => x.backup))) {
      const hurt = c.committed.find((b) => b.id === d)!;
      await c.backupOf(hurt.source, hurt.name);
    }
    await afterFullDisk();
    // And the next backup succeeds.
    await c.backupOf(c.committed[0]!.source, c.committed[0]!.name);
  });
});
