/**
 * A pack lost from a version-3 repository (deleted behind the engine's back), on a folder and on S3 (the
 * tests' RGW): the next backup finds it missing and stores the chunks again; its record must restore whatever
 * the order of its segment's key and the old segment's (SPEC.md 19.3: the first key wins), which is why it
 * drops the dead entries from the index before it commits (19.7, step 3a). Each round loses the data pack of
 * a fresh backup and backs the same disk up again; the rounds go on until both key orders happened (the
 * writer ids are random: each order comes with probability 1/2 per round), and the test asserts they did.
 * After every round its backups restore byte for byte (cmp), the old one too (content addressing: its
 * chunks are the new copies); every earlier backup is restored again after the kill -9 and after gc:
 * verify --read-data is clean, gc keeps what is needed, and every backup still restores.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { randomBytes } from 'node:crypto';
import { mkdir, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { startRgwCluster, type RgwCluster } from './rgw.js';
import { createBucket, repositoryKeys, repositoryObject, v3Env, withRgwStorage } from './s3-helpers.js';
import { decodeSegment, encodeSegmentPlain, segmentKey, type SegmentEntry } from '../dist/repo-format/v3/segment.js';
import { initChecksum } from '../dist/repo-format/checksum.js';
import { restoresIdentical as restoredIdentical } from './library-calls.js';
import { exitOf, filesIdentical, parseJson, runEngine, spawnEngine, tempDir, withoutProgress, writeRegion, type BackupJson } from './helpers.js';

const MiB = 1024 * 1024;
const BUCKET = 'engine-v3-pack-loss';
/** Rounds at most: both orders fail to show up in 16 rounds with probability 2^-15. */
const MAX_ROUNDS = 16;
let cluster: RgwCluster;
let scratch: { path: string; cleanup: () => Promise<void> };

beforeAll(async () => {
  await initChecksum();
  scratch = await tempDir();
  cluster = await startRgwCluster({ memstoreBytes: 512 * MiB });
  await createBucket(cluster, BUCKET);
});

afterAll(async () => {
  await cluster?.stop();
  await scratch?.cleanup();
});

/** Every object of the repository with its size. */
async function objects(repo: string): Promise<Map<string, number>> {
  const sizes = new Map<string, number>();
  if (repo.startsWith('s3://')) {
    await withRgwStorage(cluster, repo, async (storage) => {
      for await (const info of storage.list('')) sizes.set(info.key, info.size);
    });
    return sizes;
  }
  for (const key of await repositoryKeys(cluster, repo)) sizes.set(key, (await stat(join(repo, key))).size);
  return sizes;
}

/** Deletes one object behind the engine's back. */
async function lose(repo: string, key: string): Promise<void> {
  if (!repo.startsWith('s3://')) return rm(join(repo, key));
  return withRgwStorage(cluster, repo, (storage) => storage.delete(key));
}

/** Cuts one object short behind the engine's back (what a torn copy or a bad disk leaves). */
async function cut(repo: string, key: string, length: number): Promise<void> {
  if (!repo.startsWith('s3://')) return truncate(join(repo, key), length);
  return withRgwStorage(cluster, repo, async (storage) => {
    const short = (await storage.get(key)).subarray(0, length);
    await storage.delete(key);
    await storage.put(key, short);
  });
}

/** Reads one object of the repository. */
const getObject = (repo: string, key: string): Promise<Buffer> => repositoryObject(cluster, repo, key);

/** Writes one object behind the engine's back (a pack or a segment another writer could have written). */
async function putObject(repo: string, key: string, bytes: Buffer): Promise<void> {
  if (!repo.startsWith('s3://')) {
    await mkdir(dirname(join(repo, key)), { recursive: true, mode: 0o700 });
    return writeFile(join(repo, key), bytes, { mode: 0o600, flag: 'wx' });
  }
  return withRgwStorage(cluster, repo, (storage) => storage.put(key, bytes));
}

/** The writer id of a segment key (`index/<writer>-<seq>`). */
const writerOf = (key: string): string => key.slice('index/'.length, 'index/'.length + 32);
/**
 * A writer id of its own for one backup (ENGINE_TEST_SEGMENT_WRITER): eight `high` digits, then the test's own
 * digit (no two tests of one repository share an id), then the round.
 */
const writerId = (high: 'f' | '0', test: 'a' | 'b', round: number): string => `${high.repeat(8)}${test}${round.toString(16).padStart(23, '0')}`;

for (const kind of ['folder', 's3'] as const) {
  describe(`a pack lost from a version-3 repository on ${kind === 'folder' ? 'a folder' : 'S3 (RGW)'}`, () => {
    const env = (): Record<string, string> => v3Env(cluster, scratch.path, `cache-${kind}`);
    let repo: string;
    /** Every backup that must restore, with the image it must restore to. */
    const backups: { id: string; image: string }[] = [];

    const backup = async (image: string, writer?: string): Promise<{ id: string; stderr: string }> => {
      // Not --json: the notices are what this test reads on stderr.
      const r = await runEngine(['backup', '--repo', repo, '--source', image], { env: { ...env(), ...(writer ? { ENGINE_TEST_SEGMENT_WRITER: writer } : {}) } });
      expect(r.code, r.stderr).toBe(0);
      const id = /^backup ([0-9a-f]{32}) /.exec(r.stdout)?.[1];
      expect(id, r.stdout).toBeDefined();
      return { id: id!, stderr: r.stderr };
    };

    /** One of several backups started at once (spawned, so that they overlap); its id. */
    const backupAtOnce = async (image: string): Promise<string> => {
      const child = spawnEngine(['backup', '--repo', repo, '--source', image, '--json'], env());
      let stdout = '';
      let stderr = '';
      child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
      child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
      expect((await exitOf(child)).code, stderr).toBe(0);
      return parseJson<BackupJson>(stdout).id;
    };

    /**
     * A copy of the pack at `packKey` under a new id, named by a segment of its own that sorts after `first`
     * (the segment naming the original's four entries): in key order the original's entries shadow the
     * copy's. The copy's id, key and entries.
     */
    const duplicatePack = async (where: string, packKey: string, first: string): Promise<{ copyId: string; copyKey: string; entries: SegmentEntry[] }> => {
      const packId = packKey.slice(packKey.lastIndexOf('/') + 1);
      const copyId = randomBytes(16).toString('hex');
      const copyKey = `packs/${copyId.slice(0, 2)}/${copyId}`;
      const pack = await getObject(where, packKey);
      Buffer.from(copyId, 'hex').copy(pack, 16); // the pack header names its pack (SPEC 6)
      await putObject(where, copyKey, pack);
      const segment = decodeSegment(await getObject(where, first), first);
      if (typeof segment === 'string') throw new Error(segment);
      const entries = segment.entries.filter((entry) => entry.packId === packId).map((entry) => ({ ...entry, packId: copyId }));
      expect(entries).toHaveLength(4);
      const duplicate = { name: { writer: 'f'.repeat(32), seq: 0 }, supersedes: [], entries };
      expect(segmentKey(duplicate.name) > first).toBe(true);
      await putObject(where, segmentKey(duplicate.name), encodeSegmentPlain(duplicate));
      return { copyId, copyKey, entries };
    };

    /**
     * Restored and compared (cmp), a call of the library in this process (test/library-calls.ts): it succeeds
     * and says nothing (the CLI's stderr: its notices) but that it rebuilt the cache or broke a dead lease.
     */
    const restoresIdentical = async (id: string, image: string, where = repo): Promise<void> => {
      const target = join(scratch.path, `restored-${kind}-${id.slice(0, 8)}.raw`);
      const notices: string[] = [];
      const identical = await restoredIdentical(where, id, image, target, env(), undefined, notices);
      expect([identical, notices.filter((n) => !/^(rebuilt this host's index cache|removed the dead shared lease) /.test(n))], `restore of ${id} is identical to ${image}`).toEqual([true, []]);
      await rm(target, { force: true });
    };

    test('pack lost, next backup commits: every backup restores byte for byte, in both key orders of the old and the new segment', async () => {
      repo = kind === 'folder' ? join(scratch.path, 'repo-folder') : `s3://${BUCKET}/repo`;
      const init = await runEngine(['init', '--format', '3', repo], { env: env() });
      expect(init.code, init.stderr).toBe(0);
      const seen = { oldFirst: 0, newFirst: 0 };
      for (let round = 0; round < MAX_ROUNDS && (seen.oldFirst === 0 || seen.newFirst === 0); round++) {
        const image = join(scratch.path, `${kind}-disk-${round}.raw`);
        await writeRegion(image, 0, 4 * MiB, 'random', `${kind}-round-${round}`);
        const before = await objects(repo);
        const old = await backup(image);
        const added = [...(await objects(repo))].filter(([key]) => !before.has(key));
        const oldSegments = added.filter(([key]) => key.startsWith('index/'));
        expect(oldSegments).toHaveLength(1);
        // The largest new pack holds the disk's four chunks (the other, the map page).
        const [lostPack] = added.filter(([key]) => key.startsWith('packs/')).sort((a, b) => b[1] - a[1])[0]!;
        expect(added.find(([key]) => key === lostPack)![1]).toBeGreaterThan(4 * MiB);
        await lose(repo, lostPack);

        const beforeNew = await objects(repo);
        // The new backup's segments sort after the old one's in even rounds and before it in odd ones (the old
        // writer's id is random: 0000… and ffff… fall on either side but for a chance of 2^-32).
        const fresh = await backup(image, writerId(round % 2 === 0 ? 'f' : '0', 'a', round));
        expect(fresh.stderr).toContain(`(missing): this backup did not trust the index entries naming it, and stored again what it found there`);
        expect(fresh.stderr).toContain('dropped 4 index entries naming lost packs from 1 index segment (each replaced by a copy without them)');
        const newSegments = [...(await objects(repo)).keys()].filter((key) => key.startsWith('index/') && !beforeNew.has(key));
        // The backup's own segment and the copy of the old one without its dead entries: one writer.
        expect(newSegments).toHaveLength(2);
        expect(new Set(newSegments.map(writerOf)).size).toBe(1);
        if (writerOf(oldSegments[0]![0]) < writerOf(newSegments[0]!)) seen.oldFirst++;
        else seen.newFirst++;

        // This round's backups restore now; every earlier one is restored again after the crash below and at
        // the end (the third and fourth tests), so each round checks its own rather than all (quadratic).
        backups.push({ id: fresh.id, image }, { id: old.id, image });
        for (const b of backups.slice(-2)) await restoresIdentical(b.id, b.image);
      }
      // Both orders happened: the old segment first (what lost data before the fix) and the new one first.
      expect(seen.oldFirst).toBeGreaterThan(0);
      expect(seen.newFirst).toBeGreaterThan(0);
    });

    // On S3 only: what it checks (the backup proving both copies dead, segment by segment, before its record)
    // lies between store operations, the same on a folder, whose rounds added ~30 s; the folder keeps the
    // single lost pack, the kill -9 after segment-replaced and gc below.
    if (kind === 's3') test('a chunk stored twice at once (two writers, two packs), both packs lost: the next backup restores whichever segment sorts first', async () => {
      // The backup proves the first lost pack dead through the entries that win; once they are dropped the
      // other copy's entries win, and they name a lost pack too: it must find that out before its record.
      // Rounds go on until both writers stored the chunks (neither saw the other's segment in time); the new
      // backup's segments then sort after both old ones (its writer id is chosen).
      let newLast = 0;
      for (let round = 0; round < 20 && newLast === 0; round++) {
        const image = join(scratch.path, `${kind}-twice-${round}.raw`);
        await writeRegion(image, 0, 4 * MiB, 'random', `${kind}-twice-${round}`);
        const before = await objects(repo);
        const both = await Promise.all([backupAtOnce(image), backupAtOnce(image)]);
        const added = [...(await objects(repo))].filter(([key]) => !before.has(key));
        const dataPacks = added.filter(([key, size]) => key.startsWith('packs/') && size > 4 * MiB);
        const oldSegments = added.filter(([key]) => key.startsWith('index/')).map(([key]) => key);
        // One writer saw the other's segment in time and deduplicated: no two copies this round.
        if (dataPacks.length !== 2) continue;
        expect(oldSegments).toHaveLength(2);
        for (const [key] of dataPacks) await lose(repo, key);

        const beforeNew = await objects(repo);
        // The new segment after both old ones: the case that needs the backup to prove the second copy dead too.
        const fresh = await backup(image, writerId('f', 'b', round));
        expect(fresh.stderr).toContain('dropped 8 index entries naming lost packs from 2 index segments (each replaced by a copy without them)');
        const newSegments = [...(await objects(repo)).keys()].filter((key) => key.startsWith('index/') && !beforeNew.has(key));
        expect(newSegments).toHaveLength(3);
        if (oldSegments.every((key) => writerOf(key) < writerOf(newSegments[0]!))) newLast++;
        backups.push({ id: fresh.id, image }, ...both.map((id) => ({ id, image })));
        // This round's backups; the earlier ones again after the crash below and at the end.
        for (const b of backups.slice(-3)) await restoresIdentical(b.id, b.image);
      }
      expect(newLast).toBeGreaterThan(0);
    });

    test('kill -9 of the backup after it replaced the old segment (segment-replaced): no record; the next backup commits and every backup restores', async () => {
      const image = join(scratch.path, `${kind}-crash.raw`);
      await writeRegion(image, 0, 4 * MiB, 'random', `${kind}-crash`);
      const before = await objects(repo);
      const old = await backup(image);
      const [lostPack] = [...(await objects(repo))].filter(([key]) => key.startsWith('packs/') && !before.has(key)).sort((a, b) => b[1] - a[1])[0]!;
      await lose(repo, lostPack);
      const beforeCrash = await objects(repo);
      const crashed = await runEngine(['backup', '--repo', repo, '--source', image], { env: { ...env(), ENGINE_CRASH_AT: 'segment-replaced' } });
      expect(crashed.code, crashed.stderr).toBe(137);
      const added = [...(await objects(repo)).keys()].filter((key) => !beforeCrash.has(key));
      // The re-stored chunks' pack and the copy of the old segment, a dead process's lease; no record, no own segment yet.
      expect([...new Set(added.map((key) => key.split('/')[0]))].sort()).toEqual(['index', 'leases', 'packs']);
      expect(added.filter((key) => key.startsWith('index/'))).toHaveLength(1);
      // Nothing a committed backup needs changed.
      for (const b of backups) await restoresIdentical(b.id, b.image);
      const fresh = await backup(image);
      backups.push({ id: fresh.id, image }, { id: old.id, image });
      // The two that changed; every backup is restored again after gc (the next test).
      for (const b of backups.slice(-2)) await restoresIdentical(b.id, b.image);
    });

    test('a lost pack whose entries shadow a live duplicate (its segment sorts first): gc drops the dead entries and keeps the duplicate', async () => {
      // Two copies of the same chunks, as two writers storing them at once leave (made here exactly: a copy of
      // the pack under a new id, named by a segment whose key sorts after the first). The first copy is lost:
      // its entries still win (19.3). gc counted the live copy as dead bytes (duplicates) and deleted its pack,
      // losing the backup for good; it must pass over the dead entries instead (19.8, "Lost packs").
      // A repository of its own: this case runs alone too (-t).
      const repo = kind === 'folder' ? join(scratch.path, 'repo-shadow') : `s3://${BUCKET}/repo-shadow`;
      const init = await runEngine(['init', '--format', '3', repo], { env: env() });
      expect(init.code, init.stderr).toBe(0);
      const image = join(scratch.path, `${kind}-shadow.raw`);
      await writeRegion(image, 0, 4 * MiB, 'random', `${kind}-shadow`);
      const before = await objects(repo);
      const first = await runEngine(['backup', '--repo', repo, '--source', image, '--json'], { env: env() });
      expect(first.code, first.stderr).toBe(0);
      const original = parseJson<BackupJson>(first.stdout);
      const added = [...(await objects(repo))].filter(([key]) => !before.has(key));
      const [firstSegment] = added.filter(([key]) => key.startsWith('index/')).map(([key]) => key);
      const [lostPack] = added.filter(([key]) => key.startsWith('packs/')).sort((a, b) => b[1] - a[1])[0]!;
      const lostId = lostPack.slice(lostPack.lastIndexOf('/') + 1);
      const { copyId } = await duplicatePack(repo, lostPack, firstSegment!);
      await lose(repo, lostPack);

      // Not --json: the notice is what this test reads on stderr.
      const gc = await runEngine(['gc', '--repo', repo], { env: env() });
      expect(gc.code, gc.stderr).toBe(0);
      expect((await objects(repo)).has(`packs/${copyId.slice(0, 2)}/${copyId}`), 'the live copy is kept').toBe(true);
      const target = join(scratch.path, `restored-${kind}-shadow.raw`);
      const restore = await runEngine(['restore', '--repo', repo, original.id, '--to', target], { env: env() });
      expect(restore.code, restore.stderr).toBe(0);
      expect(await filesIdentical(target, image)).toBe(true);
      await rm(target);
      expect(gc.stderr).toContain(`the index named 1 lost pack(s) (${lostId}): gc drops those entries, every blob a backup needs has another copy`);
      // No entry names the lost pack any more: verify finds nothing missing.
      const verify = await runEngine(['verify', '--repo', repo, '--read-data'], { env: env() });
      expect(verify.code, verify.stdout + verify.stderr).toBe(0);

      // Then the only copy goes too: gc keeps its entries (the blobs are lost, not named nowhere: gc does not
      // refuse), says so, deletes nothing a backup needs, and verify names the pack and the backup.
      const copyKey = `packs/${copyId.slice(0, 2)}/${copyId}`;
      await lose(repo, copyKey);
      const gcAgain = await runEngine(['gc', '--repo', repo], { env: env() });
      expect(gcAgain.code, gcAgain.stderr).toBe(0);
      expect(gcAgain.stderr).toContain(`the index names 1 lost pack(s) (${copyId}) holding the only copy of 4 blob(s) backups need`);
      const damaged = await runEngine(['verify', '--repo', repo], { env: env() });
      expect(damaged.code, damaged.stdout + damaged.stderr).toBe(4);
      expect(damaged.stdout).toContain(`pack ${copyId} is missing (4 index entries name it); backup that lost data with it: ${original.id}`);
      expect(damaged.stdout).toContain('engine gc drops its entries whose blobs have another copy and engine repair all of them');
    });

    test('a pack cut short whose entries shadow a live duplicate: gc drops the dead entries, deletes the cut pack, keeps the duplicate and says so in gc --json; then the only copy cut short: kept, said, reported', async () => {
      // As the lost pack above, but the pack is there, shorter than the frames its entries name (19.3: such an
      // entry is dead). A repository of its own, with a second backup that shares nothing with the first.
      const repo = kind === 'folder' ? join(scratch.path, 'repo-short') : `s3://${BUCKET}/repo-short`;
      const init = await runEngine(['init', '--format', '3', repo], { env: env() });
      expect(init.code, init.stderr).toBe(0);
      const image = join(scratch.path, `${kind}-short.raw`);
      const other = join(scratch.path, `${kind}-short-other.raw`);
      await writeRegion(image, 0, 4 * MiB, 'random', `${kind}-short`);
      await writeRegion(other, 0, 2 * MiB, 'random', `${kind}-short-other`);
      const before = await objects(repo);
      const first = await runEngine(['backup', '--repo', repo, '--source', image, '--json'], { env: env() });
      expect(first.code, first.stderr).toBe(0);
      const original = parseJson<BackupJson>(first.stdout);
      const added = [...(await objects(repo))].filter(([key]) => !before.has(key));
      const [firstSegment] = added.filter(([key]) => key.startsWith('index/')).map(([key]) => key);
      const [shortPack, fullSize] = added.filter(([key]) => key.startsWith('packs/')).sort((a, b) => b[1] - a[1])[0]!;
      const shortId = shortPack.slice(shortPack.lastIndexOf('/') + 1);
      const second = await runEngine(['backup', '--repo', repo, '--source', other, '--json'], { env: env() });
      expect(second.code, second.stderr).toBe(0);
      const unrelated = parseJson<BackupJson>(second.stdout);
      const { copyId, copyKey, entries } = await duplicatePack(repo, shortPack, firstSegment!);
      // Cut before the first frame: every entry naming the pack ends past its end.
      const firstFrame = Math.min(...entries.map((entry) => entry.offset));
      await cut(repo, shortPack, firstFrame);
      expect((await objects(repo)).get(shortPack)).toBe(firstFrame);

      const gc = await runEngine(['gc', '--repo', repo, '--json'], { env: env() });
      expect(gc.code, gc.stderr).toBe(0);
      expect(gc.stderr, 'nothing on stderr with --json').toBe('');
      const report = parseJson<{ packs: { deleted: string[]; rewritten: string[] }; notices: string[] }>(gc.stdout);
      expect(report.notices).toContain(`the index named 1 lost pack(s) (${shortId}): gc drops those entries, every blob a backup needs has another copy`);
      // The cut pack holds no frame any entry can win with: dead bytes, deleted; the duplicate is live, kept.
      expect(report.packs.deleted).toContain(shortId);
      expect(report.packs.deleted).not.toContain(copyId);
      expect(report.packs.rewritten).not.toContain(copyId);
      const after = await objects(repo);
      expect(after.has(shortPack), 'the cut pack is deleted').toBe(false);
      expect(after.get(copyKey), 'the live copy is kept whole').toBe(fullSize);
      await restoresIdentical(original.id, image, repo);
      await restoresIdentical(unrelated.id, other, repo);
      const clean = await runEngine(['verify', '--repo', repo, '--read-data'], { env: env() });
      expect(clean.code, clean.stdout + clean.stderr).toBe(0);

      // Then the only copy is cut short too, in its second frame: gc keeps the dead entries of the blobs with no
      // other copy (lost, not named nowhere: gc does not refuse), deletes nothing a backup needs, and says so;
      // verify names the damage and the backup, whose restore fails in one line; the other backup restores.
      const frames = entries.map((entry) => entry.offset).sort((a, b) => a - b);
      await cut(repo, copyKey, frames[1]!);
      const gcAgain = await runEngine(['gc', '--repo', repo, '--json'], { env: env() });
      expect(gcAgain.code, gcAgain.stderr).toBe(0);
      const again = parseJson<{ packs: { deleted: string[] }; notices: string[] }>(gcAgain.stdout);
      expect(again.notices).toContain(`the index names 1 lost pack(s) (${copyId}) holding the only copy of 3 blob(s) backups need: gc drops the other entries and keeps those; \`engine verify\` names the damaged backups, and backing their disks up again stores those blobs anew`);
      expect(again.packs.deleted).not.toContain(copyId);
      expect((await objects(repo)).get(copyKey), 'the cut copy is kept: its first frame is the only copy of a blob').toBe(frames[1]);
      const damaged = await runEngine(['verify', '--repo', repo, '--read-data', '--json'], { env: env() });
      expect(damaged.code, damaged.stdout + damaged.stderr).toBe(4);
      const problems = parseJson<{ problems: { code: string; message: string; backup?: string; pack?: string }[] }>(damaged.stdout).problems;
      expect(problems.every((p) => p.backup === undefined || p.backup === original.id), JSON.stringify(problems)).toBe(true);
      expect(JSON.stringify(problems)).toContain(original.id);
      expect(JSON.stringify(problems)).toContain(copyId);
      const target = join(scratch.path, `restored-${kind}-short.raw`);
      const restore = await runEngine(['restore', '--repo', repo, original.id, '--to', target], { env: env() });
      expect(restore.code, restore.stderr).toBe(4);
      expect(withoutProgress(restore.stderr).trim().split('\n'), restore.stderr).toHaveLength(1);
      await rm(target, { force: true });
      await restoresIdentical(unrelated.id, other, repo);
    });

    test('verify --read-data is clean; gc keeps what is needed; every backup still restores; verify clean again', async () => {
      const verify = await runEngine(['verify', '--repo', repo, '--read-data', '--json'], { env: env() });
      expect(verify.code, verify.stdout + verify.stderr).toBe(0);
      const gc = await runEngine(['gc', '--repo', repo, '--json'], { env: env() });
      expect(gc.code, gc.stderr).toBe(0);
      for (const b of backups) await restoresIdentical(b.id, b.image);
      const again = await runEngine(['verify', '--repo', repo, '--read-data'], { env: env() });
      expect(again.code, again.stdout + again.stderr).toBe(0);
    });
  });
}
