/**
 * The fault campaign on format version 3 (test/fault-campaign.ts; SPEC.md 19.7, 19.8), on a folder and on S3
 * (the tests' own Ceph RADOS Gateway): kill -9 of backup at each point of 19.7's crash table and at random
 * moments, of prune and forget between their record removal and their lease's release, and of gc at random
 * moments (its crash points are test/v3-gc.test.ts's). After each: what
 * the crash left is what the table says (a dead process's lease; packs no segment names; a segment no record
 * references; the record), nothing else; the next command on this host breaks the dead lease at once;
 * verify --read-data is clean and counts the leftovers as garbage; the next backup commits; every committed
 * backup restores byte for byte (cmp). At the end, once the crashed writers' packs are older than T + 2B (the
 * repository's lease timing is shortened to T = 6 s, B = 1 s, and the test waits by the store's times of the
 * packs, not a fixed time), one gc leaves no garbage at all: what the kills left was only garbage gc can reclaim.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { startRgwCluster, type RgwCluster } from './rgw.js';
import { createBucket, repositoryKeys, setLeaseTiming, untilPacksOlderThan, v3Env } from './s3-helpers.js';
import { exitOf, parseJson, runEngine, tempDir } from './helpers.js';
import { campaign, CampaignRepo, recordCampaign } from './fault-campaign.js';
import { SeededRandom } from '../dist/engine/index.js';

const BUCKET = 'engine-crash-v3';
const LEASE_MS = 6_000;
const BOUND_MS = 1_000;
let cluster: RgwCluster;
let scratch: { path: string; cleanup: () => Promise<void> };

beforeAll(async () => {
  scratch = await tempDir('engine-crash-v3-');
  cluster = await startRgwCluster({ memstoreBytes: 1024 * 1024 * 1024 });
  await createBucket(cluster, BUCKET);
});

afterAll(async () => {
  await recordCampaign('crash-v3');
  await cluster?.stop();
  await scratch?.cleanup();
});

/** Every key of the repository. */
const keysOf = (c: CampaignRepo): Promise<string[]> => repositoryKeys(cluster, c.repo);

const kindOf = (key: string): string => key.split('/')[0]!;
/**
 * The leases among the keys. A folder's raw listing also shows the store's temporary files (`.<name>.<hex>.tmp`):
 * a kill during a lease's write leaves one, which no listing of the store yields and nothing reads; gc sweeps it
 * once older than T + 2B, which the last test checks (its listing must hold no `leases/` at all).
 */
const leaseKeys = (keys: string[]): string[] => keys.filter((k) => kindOf(k) === 'leases' && !/\/\.[^/]+\.[0-9a-f]{12}\.tmp$/.test(k));

for (const kind of ['folder', 's3'] as const) {
  describe(`fault campaign on version 3, ${kind === 'folder' ? 'on a folder' : 'on S3 (RGW)'}: kill -9 of backup, prune and forget`, () => {
    let c: CampaignRepo;
    let cacheRoot: string;
    let repositoryId: string;
    /** The image of the first backup: backed up again after every kill (the next backup commits). */
    let earlier: string;

    /** The files the cache slots' temporary folders hold (packs being built): SPEC 19.4. */
    async function slotTempFiles(): Promise<string[]> {
      const dir = join(cacheRoot, repositoryId);
      const files: string[] = [];
      for (const entry of await readdir(dir).catch(() => [] as string[])) {
        if (entry.endsWith('.tmp')) files.push(...(await readdir(join(dir, entry))).map((f) => `${entry}/${f}`));
      }
      return files;
    }

    /**
     * What follows every kill: the dead process's lease is there, and only until the next command on this
     * host (verify) breaks it; verify --read-data is clean; the next backup commits; everything restores.
     */
    async function afterKill(leftLease: boolean): Promise<{ unindexedPacks: number; unreferencedBlobs: number }> {
      c.count('crashes');
      expect(leaseKeys(await keysOf(c))).toHaveLength(leftLease ? 1 : 0);
      const garbage = await c.verifies();
      expect(leaseKeys(await keysOf(c))).toEqual([]);
      // The verify took the dead process's slot (the first free one) and cleared its temporary folder.
      expect(await slotTempFiles()).toEqual([]);
      await c.backupOf(earlier, 'earlier');
      await c.restoresAll();
      await c.prunes(1);
      await c.forgetRemoved();
      return { unindexedPacks: garbage.unindexedPacks.length, unreferencedBlobs: garbage.unreferencedBlobs };
    }

    beforeAll(async () => {
      cacheRoot = join(scratch.path, `cache-${kind}`);
      const repo = kind === 'folder' ? join(scratch.path, 'repo') : `s3://${BUCKET}/campaign`;
      const env = kind === 's3' ? v3Env(cluster, scratch.path, `cache-${kind}`) : { ENGINE_CACHE_DIR: cacheRoot };
      c = new CampaignRepo(repo, scratch.path, new SeededRandom(`crash-v3-${kind}`), [], env, true);
      const init = await runEngine(['init', '--format', '3', '--json', repo], { env });
      expect(init.code, init.stderr).toBe(0);
      repositoryId = parseJson<{ id: string }>(init.stdout).id;
      // A short lease timing (SPEC 19.1: B >= 1 s, 4B < T) so that gc may delete the packs crashed writers
      // left (older than T + 2B by the store's clock) within the test; every kill here is on this host, where a
      // dead holder's lease is broken at once whatever T is.
      await setLeaseTiming(cluster, repo, LEASE_MS, BOUND_MS);
      earlier = await c.randomImage(`${kind}-earlier`, 6);
      await c.backupOf(earlier, 'earlier');
    });

    // SPEC.md 19.7's crash table, in its order: during 1 (the lease); during 2-3, before the segment (a pack
    // being built, a pack stored); after the segment, before the record; after the record.
    //
    // On S3 only: each point lies between two store operations (the store is never mid-request when the process
    // dies there), so what is left is the protocol's (leases, packs, index, backups above the store) and the same on
    // either backend; a folder's own code (temporary file, then rename) is cut short by the random kills below.
    test.each(kind === 's3' ? ['lease-held', 'pack-written', 'pack-sealed', 'before-record', 'segment-written', 'record-written'] : [])('kill -9 of backup at %s', async (point) => {
      // 12 MiB of new data: one pack, sealed at the end of the backup, which reaches every point.
      const image = await c.randomImage(`${kind}-${point}`, 12);
      const before = await keysOf(c);
      const crashed = await c.run(['backup', '--source', image, '--name', 'big'], { env: { ENGINE_CRASH_AT: point } });
      expect(crashed.code, crashed.stderr).toBe(137);
      const added = (await keysOf(c)).filter((k) => !before.includes(k));
      const addedKinds = [...new Set(added.map(kindOf))].sort();
      const expectedKinds: Record<string, string[]> = {
        'lease-held': ['leases'],
        'pack-written': ['leases'],
        'pack-sealed': ['leases', 'packs'],
        'before-record': ['leases', 'packs'],
        'segment-written': ['index', 'leases', 'packs'],
        'record-written': ['backups', 'index', 'leases', 'packs'],
      };
      expect(addedKinds).toEqual(expectedKinds[point]);
      // A pack being built lies in the slot's temporary folder, in the cache, never in the store.
      if (point === 'pack-written') expect((await slotTempFiles()).length).toBeGreaterThan(0);
      const committedByCrash = added.filter((k) => kindOf(k) === 'backups').map((k) => k.split('/')[1]!);
      for (const id of committedByCrash) c.committed.push({ id, source: image, name: 'big' });
      const garbage = await afterKill(true);
      // What the crash left counts as garbage (for gc), never as a problem.
      if (point === 'pack-sealed' || point === 'before-record') expect(garbage.unindexedPacks).toBeGreaterThan(0);
      if (point === 'segment-written') expect(garbage.unreferencedBlobs).toBeGreaterThan(0);
      // The image goes once no committed backup needs it (prune keeps the newest of each name).
      if (!c.committed.some((x) => x.source === image)) await rm(image, { force: true });
    });

    test('kill -9 of backup at random moments', async () => {
      const image = await c.randomImage(`${kind}-random`, 40);
      for (let round = 0; round < 2; round += 1) {
        const before = new Set(await c.ids());
        const child = c.spawn(['backup', '--source', image, '--name', 'random', '--workers', '1']);
        await new Promise((resolve) => setTimeout(resolve, 200 + c.random.below(2000)));
        child.kill('SIGKILL');
        await exitOf(child);
        const after = await c.ids();
        for (const id of after.filter((x) => !before.has(x))) c.committed.push({ id, source: image, name: 'random' });
        const leases = leaseKeys(await keysOf(c)).length;
        expect(leases).toBeLessThanOrEqual(1);
        await afterKill(leases === 1);
      }
    });

    test('kill -9 of prune between two record removals, and of forget after its record removal', async () => {
      const extra = await c.randomImage(`${kind}-prune`, 2);
      for (let i = 0; i < 3; i += 1) await c.backupOf(extra, 'prune-extra');
      const count = c.committed.length;
      const pruned = await c.run(['prune', '--keep-last', '1'], { env: { ENGINE_CRASH_AT: 'prune-record-removed' } });
      expect(pruned.code, pruned.stderr).toBe(137);
      await c.forgetRemoved();
      // One record is gone (removed whole), the others intact: prune, run again, finishes the job.
      expect(c.committed.length).toBe(count - 1);
      await afterKill(true);
      const victim = await c.backupOf(extra, 'forget-me');
      const forgot = await c.run(['forget', victim], { env: { ENGINE_CRASH_AT: 'forget-record-removed' } });
      expect(forgot.code, forgot.stderr).toBe(137);
      await c.forgetRemoved();
      expect(c.committed.map((x) => x.id)).not.toContain(victim);
      await afterKill(true);
      const leaseOnly = await c.run(['prune', '--keep-last', '1'], { env: { ENGINE_CRASH_AT: 'lease-held' } });
      expect(leaseOnly.code).toBe(137);
      await afterKill(true);
    });

    test('kill -9 of gc at random moments, with garbage to collect', async () => {
      for (let round = 0; round < 2; round += 1) {
        // A forgotten backup's packs are gc's work: it copies nothing live and deletes them.
        const doomed = await c.backupOf(await c.randomImage(`${kind}-gc-${round}`, 4), 'gc-doomed');
        expect((await c.run(['forget', doomed])).code).toBe(0);
        await c.forgetRemoved();
        const child = c.spawn(['gc']);
        await new Promise((resolve) => setTimeout(resolve, 300 + c.random.below(1500)));
        child.kill('SIGKILL');
        const { signal, code } = await exitOf(child);
        // A gc that finished before the kill is no fault.
        if (signal !== 'SIGKILL') {
          expect(code).toBe(0);
          continue;
        }
        const leases = leaseKeys(await keysOf(c)).length;
        expect(leases).toBeLessThanOrEqual(1);
        await afterKill(leases === 1);
        const finished = await c.run(['gc']);
        expect(finished.code, finished.stderr).toBe(0);
      }
    });

    test('what the kills left is only garbage: past T + 2B, one gc leaves none, and everything restores', async () => {
      // Every pack in the store older than T + 2B by the store's clock: those the kills left among them.
      await untilPacksOlderThan(cluster, c.repo, LEASE_MS + 2 * BOUND_MS);
      const gc = await c.run(['gc', '--json']);
      expect(gc.code, gc.stderr).toBe(0);
      const garbage = await c.verifies();
      expect(garbage.unindexedPacks).toEqual([]);
      expect(garbage.unreferencedBlobs).toBe(0);
      expect([...new Set((await keysOf(c)).map(kindOf))].sort()).toEqual(['backups', 'config', 'index', 'packs']);
      await c.restoresAll();
    });

    test('the campaign lost nothing', () => {
      expect(campaign.lost).toBe(0);
      expect(campaign.v3).toBeGreaterThan(0);
    });
  });
}
