/**
 * Format version 3 end to end through the CLI (SPEC.md 19.7, 19.9), on a folder and on S3 (the tests' own
 * Ceph RADOS Gateway, test/rgw.ts): backup → list/show → restore byte for byte (cmp); two backup processes
 * at once into one repository, of distinct images sharing chunks, both committed and restorable; what lies
 * in the store afterwards (packs, segments, records; no lease left); the host cache as SPEC 19.4 places it.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readdir, stat, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { startRgwCluster, type RgwCluster } from './rgw.js';
import { createBucket, repositoryKeys, repositoryObject, v3Env, withRgwStorage } from './s3-helpers.js';
import { qcow2, qemuImgCompare, qemuIo, qemuNbd } from './qemu.js';
import { exitOf, filesIdentical, parseJson, runEngine, signalUntilExit, spawnEngine, stoppedItself, tempDir, writeRegion, type BackupJson } from './helpers.js';

const MiB = 1024 * 1024;
const BUCKET = 'engine-v3-backup';
let cluster: RgwCluster;
let scratch: { path: string; cleanup: () => Promise<void> };
let imageA: string;
let imageB: string;

const env = (cache: string): Record<string, string> => v3Env(cluster, scratch.path, cache);
const keysOf = (where: string): Promise<string[]> => repositoryKeys(cluster, where);

beforeAll(async () => {
  scratch = await tempDir();
  cluster = await startRgwCluster({ memstoreBytes: 768 * MiB });
  await createBucket(cluster, BUCKET);
  // Two disks that share their first 12 MiB and differ after it (and past 2^32 in B: a sparse image).
  imageA = join(scratch.path, 'a.img');
  imageB = join(scratch.path, 'b.img');
  await writeRegion(imageA, 0, 12 * MiB, 'random', 'shared');
  await writeRegion(imageA, 12 * MiB, 8 * MiB, 'random', 'only-a');
  await writeRegion(imageB, 0, 12 * MiB, 'random', 'shared');
  await writeRegion(imageB, 12 * MiB, 6 * MiB, 'random', 'only-b');
  await writeRegion(imageB, 4 * 1024 * MiB + 3 * MiB, 2 * MiB, 'random', 'past-4g');
});

afterAll(async () => {
  await cluster?.stop();
  await scratch?.cleanup();
});

for (const kind of ['folder', 's3'] as const) {
  describe(`version 3 on ${kind === 'folder' ? 'a folder' : 'S3 (RGW)'}`, () => {
    let repo: string;
    const cache = `cache-${kind}`;
    const ids: Record<string, string> = {};

    test('init, then backup of a disk: packs, one segment, the record; no lease left; the cache slot in $ENGINE_CACHE_DIR', async () => {
      repo = kind === 'folder' ? join(scratch.path, 'repo-folder') : `s3://${BUCKET}/repo`;
      const init = await runEngine(['init', '--format', '3', '--json', repo], { env: env(cache) });
      expect(init.code, init.stderr).toBe(0);
      const repositoryId = parseJson<{ id: string }>(init.stdout).id;
      const r = await runEngine(['backup', '--repo', repo, '--source', imageA, '--json'], { env: env(cache) });
      expect(r.code, r.stderr).toBe(0);
      ids.a = parseJson<BackupJson>(r.stdout).id;
      const keys = await keysOf(repo);
      expect(keys.filter((k) => k.startsWith('backups/'))).toEqual([`backups/${ids.a}`]);
      expect(keys.filter((k) => k.startsWith('index/'))).toHaveLength(1);
      expect(keys.filter((k) => k.startsWith('packs/')).length).toBeGreaterThanOrEqual(2);
      expect(keys.filter((k) => k.startsWith('leases/'))).toEqual([]);
      expect(keys.filter((k) => !/^(config|backups\/|index\/|packs\/)/.test(k))).toEqual([]);
      const cacheDir = join(scratch.path, cache);
      expect((await readdir(cacheDir)).sort()).toEqual(['host-id', repositoryId].sort());
      // The slot's temporary folder goes with the process; the slot (the LevelDB) stays for the next one.
      expect(await readdir(join(cacheDir, repositoryId))).toEqual(['slot-0']);
      expect((await stat(cacheDir)).mode & 0o777).toBe(0o700);
    });

    test('two backup processes at once, of images sharing chunks: both committed, list and show see them, each restores byte for byte', async () => {
      const first = spawnEngine(['backup', '--repo', repo, '--source', imageB, '--name', 'b', '--json'], env(cache));
      const second = spawnEngine(['backup', '--repo', repo, '--source', imageA, '--name', 'a-again', '--json'], env(cache));
      const out = { first: '', second: '', errFirst: '', errSecond: '' };
      first.stdout!.on('data', (d: Buffer) => (out.first += d.toString()));
      second.stdout!.on('data', (d: Buffer) => (out.second += d.toString()));
      first.stderr!.on('data', (d: Buffer) => (out.errFirst += d.toString()));
      second.stderr!.on('data', (d: Buffer) => (out.errSecond += d.toString()));
      const [a, b] = await Promise.all([exitOf(first), exitOf(second)]);
      expect([a.code, out.errFirst]).toEqual([0, '']);
      expect([b.code, out.errSecond]).toEqual([0, '']);
      ids.b = parseJson<BackupJson>(out.first).id;
      ids.again = parseJson<BackupJson>(out.second).id;
      const again = parseJson<BackupJson>(out.second);
      // A's blocks are all in the repository from the first backup: none is stored again.
      expect(again.disks[0]!.blocksNew).toBe(0);
      expect(again.disks[0]!.blocksDeduplicated).toBe(20);
      const list = await runEngine(['list', '--repo', repo, '--json'], { env: env(cache) });
      expect(list.code, list.stderr).toBe(0);
      expect(parseJson<{ backups: { id: string }[] }>(list.stdout).backups.map((x) => x.id).sort()).toEqual([ids.a, ids.b, ids.again].sort());
      const show = await runEngine(['show', '--repo', repo, ids.b!.slice(0, 8), '--json'], { env: env(cache) });
      expect(show.code, show.stderr).toBe(0);
      expect(parseJson<{ id: string; name: string }>(show.stdout)).toMatchObject({ id: ids.b, name: 'b' });
      expect((await keysOf(repo)).filter((k) => k.startsWith('index/')).length).toBeGreaterThanOrEqual(2);
      for (const [id, image] of [[ids.a, imageA], [ids.b, imageB], [ids.again, imageA]] as const) {
        const target = join(scratch.path, `${kind}-${id}.raw`);
        const r = await runEngine(['restore', '--repo', repo, id!, '--to', target, '--json'], { env: env(cache) });
        expect(r.code, r.stderr).toBe(0);
        expect(await filesIdentical(target, image)).toBe(true);
      }
      expect((await keysOf(repo)).filter((k) => k.startsWith('leases/'))).toEqual([]);
    });

    test('another host (its own cache directory and host id) catches up from the store and restores what this one wrote', async () => {
      const target = join(scratch.path, `${kind}-other-host.raw`);
      const r = await runEngine(['restore', '--repo', repo, ids.b!, '--to', target], { env: env(`${cache}-other-host`) });
      expect(r.code, r.stderr).toBe(0);
      expect(await filesIdentical(target, imageB)).toBe(true);
      const hosts = await Promise.all([cache, `${cache}-other-host`].map(async (dir) => (await import('node:fs/promises')).readFile(join(scratch.path, dir, 'host-id'), 'utf8')));
      expect(hosts[0]).not.toBe(hosts[1]);
    });

    test('SIGINT after a pack was stored: exit 130 within the run, no record, no segment, no lease left; the next backup commits and restores', async () => {
      const big = join(scratch.path, `${kind}-big.img`);
      await writeRegion(big, 0, 48 * MiB, 'random', `big-${kind}`);
      const before = await keysOf(repo);
      const child = spawnEngine(['backup', '--repo', repo, '--source', big, '--name', 'big'], { ...env(cache), ENGINE_STOP_AT: 'pack-sealed' });
      let stderr = '';
      child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
      await stoppedItself(child);
      const exit = await signalUntilExit(child);
      expect([exit.code, stderr]).toEqual([130, expect.stringContaining('interrupted')]);
      const after = await keysOf(repo);
      const added = after.filter((k) => !before.includes(k));
      // Only the packs it stored: garbage for gc (SPEC 19.8), named by no segment and no record.
      expect(added.length).toBeGreaterThan(0);
      expect(added.filter((k) => !k.startsWith('packs/'))).toEqual([]);
      const again = await runEngine(['backup', '--repo', repo, '--source', big, '--name', 'big', '--json'], { env: env(cache) });
      expect(again.code, again.stderr).toBe(0);
      const target = join(scratch.path, `${kind}-big.raw`);
      const r = await runEngine(['restore', '--repo', repo, parseJson<BackupJson>(again.stdout).id, '--to', target], { env: env(cache) });
      expect(r.code, r.stderr).toBe(0);
      expect(await filesIdentical(target, big)).toBe(true);
      ids.big = parseJson<BackupJson>(again.stdout).id;
    });

    test('backup of an NBD export (qemu-nbd serving a qcow2 image), restored and compared with qemu-img compare', async () => {
      const image = join(scratch.path, `${kind}-nbd.qcow2`);
      await qcow2(image, '64M');
      await qemuIo(image, ['write -P 0x5a 1M 3M', 'write -P 0x33 40M 1M']);
      const served = await qemuNbd(image, scratch.path, { exportName: 'vda' });
      try {
        const r = await runEngine(['backup', '--repo', repo, '--source', served.uri, '--name', 'nbd-disk', '--json'], { env: env(cache) });
        expect(r.code, r.stderr).toBe(0);
        ids.nbd = parseJson<BackupJson>(r.stdout).id;
      } finally {
        await served.stop();
      }
      const target = join(scratch.path, `${kind}-nbd.raw`);
      const restored = await runEngine(['restore', '--repo', repo, ids.nbd!, '--to', target], { env: env(cache) });
      expect(restored.code, restored.stderr).toBe(0);
      expect(await qemuImgCompare(target, 'raw', image, 'qcow2')).toBe(true);
    });

    test('protect, prune (which keeps a protected backup), unprotect, prune again, forget: records removed under the shared lease', async () => {
      const later = await runEngine(['backup', '--repo', repo, '--source', imageA, '--name', 'b', '--json'], { env: env(cache) });
      expect(later.code, later.stderr).toBe(0);
      ids.b2 = parseJson<BackupJson>(later.stdout).id;
      expect((await runEngine(['protect', '--repo', repo, ids.b!], { env: env(cache) })).code).toBe(0);
      const kept = await runEngine(['prune', '--repo', repo, '--keep-last', '1', '--json'], { env: env(cache) });
      expect(kept.code, kept.stderr).toBe(0);
      expect(parseJson<{ removed: number }>(kept.stdout).removed).toBe(0);
      expect((await runEngine(['unprotect', '--repo', repo, ids.b!], { env: env(cache) })).code).toBe(0);
      const pruned = await runEngine(['prune', '--repo', repo, '--keep-last', '1', '--json'], { env: env(cache) });
      expect(pruned.code, pruned.stderr).toBe(0);
      expect(parseJson<{ removed: number; backups: { id: string; keep: boolean }[] }>(pruned.stdout).backups.filter((x) => !x.keep).map((x) => x.id)).toEqual([ids.b]);
      const forgot = await runEngine(['forget', '--repo', repo, ids.again!], { env: env(cache) });
      expect(forgot.code, forgot.stderr).toBe(0);
      const keys = await keysOf(repo);
      expect(keys.filter((k) => k.startsWith('backups/')).sort()).toEqual([`backups/${ids.a}`, `backups/${ids.b2}`, `backups/${ids.nbd}`, `backups/${ids.big}`].sort());
      expect(keys.filter((k) => k.startsWith('leases/') || k.startsWith('protected/'))).toEqual([]);
      const target = join(scratch.path, `${kind}-b2.raw`);
      const r = await runEngine(['restore', '--repo', repo, ids.b2!, '--to', target], { env: env(cache) });
      expect(r.code, r.stderr).toBe(0);
      expect(await filesIdentical(target, imageA)).toBe(true);
    });

    test('an encrypted version-3 repository: segments sealed, backup restores byte for byte, verify --read-data clean; a wrong passphrase is refused', async () => {
      const secret = kind === 'folder' ? join(scratch.path, 'repo-folder-encrypted') : `s3://${BUCKET}/encrypted`;
      const withPassword = { ...env(cache), ENGINE_PASSWORD: 'correct horse battery staple' };
      expect((await runEngine(['init', '--format', '3', '--encrypt', secret], { env: withPassword })).code).toBe(0);
      const r = await runEngine(['backup', '--repo', secret, '--source', imageA, '--json'], { env: withPassword });
      expect(r.code, r.stderr).toBe(0);
      const id = parseJson<BackupJson>(r.stdout).id;
      const target = join(scratch.path, `${kind}-encrypted.raw`);
      const restored = await runEngine(['restore', '--repo', secret, id, '--to', target], { env: withPassword });
      expect(restored.code, restored.stderr).toBe(0);
      expect(await filesIdentical(target, imageA)).toBe(true);
      const verified = await runEngine(['verify', '--repo', secret, '--read-data', '--json'], { env: withPassword });
      expect(verified.code, verified.stderr).toBe(0);
      expect(parseJson<{ ok: boolean }>(verified.stdout).ok).toBe(true);
      // The segment is sealed: the blob ids of the plain image do not appear in it.
      const segmentKey = (await keysOf(secret)).find((k) => k.startsWith('index/'))!;
      const bytes = await repositoryObject(cluster, secret, segmentKey);
      expect(bytes.subarray(0, 4).toString('latin1')).toBe('EENC');
      const wrong = await runEngine(['list', '--repo', secret], { env: { ...env(cache), ENGINE_PASSWORD: 'not the passphrase at all' } });
      expect(wrong.code).toBe(6);
    });

    test('verify --read-data reads every frame and finds nothing wrong; a pack cut short behind the engine is named (exit 4)', async () => {
      const clean = await runEngine(['verify', '--repo', repo, '--read-data', '--json'], { env: env(cache) });
      expect(clean.code, clean.stderr).toBe(0);
      const report = parseJson<{ ok: boolean; backups: number; problems: unknown[]; bytesRead?: number }>(clean.stdout);
      expect(report.ok).toBe(true);
      expect(report.problems).toEqual([]);
      expect(report.backups).toBe(4);
      const pack = (await keysOf(repo)).filter((k) => k.startsWith('packs/'))[0]!;
      if (kind === 'folder') {
        await truncate(join(repo, pack), 100);
      } else {
        await withRgwStorage(cluster, repo, async (storage) => storage.put(pack, (await storage.get(pack)).subarray(0, 100)));
      }
      const damaged = await runEngine(['verify', '--repo', repo, '--read-data', '--json'], { env: env(cache) });
      expect(damaged.code).toBe(4);
      expect(damaged.stdout).toContain(pack.split('/')[2]!);
      expect(parseJson<{ ok: boolean }>(damaged.stdout).ok).toBe(false);
    });
  });
}
