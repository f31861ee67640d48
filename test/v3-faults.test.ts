/**
 * Bad input and faults on format version 3 (issue 14, "Bad input and faults"; SPEC.md 19.5-19.7, 20.3-20.4)
 * for the commands that move data: backup, restore, verify. On S3 (this file's own Ceph RADOS Gateway,
 * test/rgw.ts, and the fault proxy, test/s3-fault-proxy.ts, in front of it) and on a folder where the fault
 * applies. Each fault ends in one line with a stable code (`--json`: the error's code), or in a retry that
 * succeeds; and a backup committed before it still restores byte for byte (cmp) after it, and the next backup
 * commits.
 *
 * Already covered elsewhere and not repeated: init's refusals (a missing bucket, no or wrong credentials, a
 * prefix in use: test/v3-commands.test.ts); verify naming a pack cut short (test/v3-backup.test.ts); each
 * storage failure at the storage interface (test/storage-conformance.test.ts).
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { chmod, mkdir, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { restoresIdentical } from './library-calls.js';
import { startRgwCluster, type RgwCluster } from './rgw.js';
import { startFaultProxy, type FaultProxy } from './s3-fault-proxy.js';
import { createBucket, openRgwStorage, rawPut, repositoryKeys, setLeaseTiming, untilLeasesExpired, v3Env } from './s3-helpers.js';
import { collectOutput, continueUntilExit, filesIdentical, parseJson, runEngine, spawnEngine, stoppedItself, Tmpfs, tempDir, writeRegion, type BackupJson, type RunResult } from './helpers.js';

const MiB = 1024 * 1024;
const BUCKET = 'engine-v3-faults';
let cluster: RgwCluster;
let proxy: FaultProxy;
let scratch: { path: string; cleanup: () => Promise<void> };
let imageA: string;

/** The AWS environment for the cluster's user, through `endpoint` (the gateway, or the fault proxy). */
function s3Env(endpoint = cluster.endpoint, cache = 'cache'): Record<string, string> {
  return { ...v3Env(cluster, scratch.path, cache), AWS_ENDPOINT_URL_S3: endpoint };
}

let images = 0;
async function newImage(megabytes: number): Promise<string> {
  images += 1;
  const path = join(scratch.path, `image-${images}.img`);
  await writeRegion(path, 0, megabytes * MiB, 'random', `v3-faults-${images}`);
  return path;
}

/** One line on stderr, and with --json the error's code on stdout. */
function expectFailure(r: RunResult, code: string, exit = 1): void {
  expect(r.code, r.stderr).toBe(exit);
  expect(r.stderr.trim().split('\n'), r.stderr).toHaveLength(1);
  expect(parseJson<{ error: { code: string } }>(r.stdout).error.code, r.stdout).toBe(code);
}

async function backupOk(repo: string, image: string, env: Record<string, string>): Promise<string> {
  const r = await runEngine(['backup', '--repo', repo, '--source', image, '--json'], { env });
  expect(r.code, r.stderr).toBe(0);
  return parseJson<BackupJson>(r.stdout).id;
}

/** A call of the library in this process (test/library-calls.ts), through the same store (the proxy, its faults). */
async function expectRestores(repo: string, id: string, image: string, env: Record<string, string>): Promise<void> {
  const target = join(scratch.path, `restored-${id}.raw`);
  expect(await restoresIdentical(repo, id, image, target, env)).toBe(true);
  await rm(target, { force: true });
}

const keysUnder = (repo: string): Promise<string[]> => repositoryKeys(cluster, repo);

/** A fresh version-3 repository (folder or S3 prefix) with one committed backup of imageA. */
async function repositoryWithBackup(kind: 'folder' | 's3', name: string): Promise<{ repo: string; env: Record<string, string>; id: string }> {
  const repo = kind === 'folder' ? join(scratch.path, name) : `s3://${BUCKET}/${name}`;
  const env = kind === 'folder' ? { ENGINE_CACHE_DIR: join(scratch.path, 'cache') } : s3Env();
  const init = await runEngine(['init', '--format', '3', repo], { env });
  expect(init.code, init.stderr).toBe(0);
  return { repo, env, id: await backupOk(repo, imageA, env) };
}

beforeAll(async () => {
  scratch = await tempDir('engine-v3-faults-');
  cluster = await startRgwCluster({ memstoreBytes: 768 * MiB });
  await createBucket(cluster, BUCKET);
  proxy = await startFaultProxy(cluster.endpoint, { seed: 14 });
  imageA = await newImage(5);
});

afterAll(async () => {
  await proxy?.close();
  await cluster?.stop();
  await scratch?.cleanup();
});

describe('the store itself', () => {
  test('a bucket that does not exist: backup, restore and verify say so in one line (ENGINE_STORAGE_NO_BUCKET)', async () => {
    const repo = 's3://no-such-bucket-v3-faults/repo';
    expectFailure(await runEngine(['backup', '--repo', repo, '--source', imageA, '--json'], { env: s3Env() }), 'ENGINE_STORAGE_NO_BUCKET');
    expectFailure(await runEngine(['restore', '--repo', repo, 'abcd', '--to', join(scratch.path, 'never.raw'), '--json'], { env: s3Env() }), 'ENGINE_STORAGE_NO_BUCKET');
    expectFailure(await runEngine(['verify', '--repo', repo, '--json'], { env: s3Env() }), 'ENGINE_STORAGE_NO_BUCKET');
  });

  test('wrong credentials: backup, restore and verify refused in one line (ENGINE_STORAGE_AUTH); the committed backup is intact', async () => {
    const { repo, id } = await repositoryWithBackup('s3', 'wrong-credentials');
    const before = await keysUnder(repo);
    const wrong = { ...s3Env(), AWS_SECRET_ACCESS_KEY: 'not-the-secret-at-all-0123456789abcdefgh' };
    const unknown = { ...s3Env(), AWS_ACCESS_KEY_ID: 'AKIANOSUCHKEY0000000' };
    for (const env of [wrong, unknown]) {
      expectFailure(await runEngine(['backup', '--repo', repo, '--source', imageA, '--json'], { env }), 'ENGINE_STORAGE_AUTH');
      expectFailure(await runEngine(['restore', '--repo', repo, id, '--to', join(scratch.path, 'never.raw'), '--json'], { env }), 'ENGINE_STORAGE_AUTH');
      expectFailure(await runEngine(['verify', '--repo', repo, '--json'], { env }), 'ENGINE_STORAGE_AUTH');
    }
    expect(await keysUnder(repo)).toEqual(before);
    await expectRestores(repo, id, imageA, s3Env());
  });

  test('a prefix that holds something else: backup, restore and verify refuse it as no repository (exit 5) and write nothing there', async () => {
    await rawPut(cluster, BUCKET, 'family/photos/cat.jpg', Buffer.from('not a repository'));
    await rawPut(cluster, BUCKET, 'family/notes.txt', Buffer.from('nor this'));
    const repo = `s3://${BUCKET}/family`;
    expectFailure(await runEngine(['backup', '--repo', repo, '--source', imageA, '--json'], { env: s3Env() }), 'ENGINE_NOT_A_REPOSITORY', 5);
    expectFailure(await runEngine(['restore', '--repo', repo, 'abcd', '--to', join(scratch.path, 'never.raw'), '--json'], { env: s3Env() }), 'ENGINE_NOT_A_REPOSITORY', 5);
    expectFailure(await runEngine(['verify', '--repo', repo, '--json'], { env: s3Env() }), 'ENGINE_NOT_A_REPOSITORY', 5);
    expect(await keysUnder(repo)).toEqual(['notes.txt', 'photos/cat.jpg']);
  });

  test('on a folder: one that does not exist and one that holds something else: backup, restore and verify refuse it as no repository (exit 5) and create nothing, there or in the host cache', async () => {
    const missing = join(scratch.path, 'no-such-folder');
    const other = join(scratch.path, 'family');
    await mkdir(join(other, 'photos'), { recursive: true });
    await writeFile(join(other, 'photos', 'cat.jpg'), 'not a repository');
    await writeFile(join(other, 'notes.txt'), 'nor this');
    const cache = join(scratch.path, 'cache-not-a-repository');
    for (const repo of [missing, other]) {
      expectFailure(await runEngine(['backup', '--repo', repo, '--source', imageA, '--json'], { env: { ENGINE_CACHE_DIR: cache } }), 'ENGINE_NOT_A_REPOSITORY', 5);
      expectFailure(await runEngine(['restore', '--repo', repo, 'abcd', '--to', join(scratch.path, 'never.raw'), '--json'], { env: { ENGINE_CACHE_DIR: cache } }), 'ENGINE_NOT_A_REPOSITORY', 5);
      expectFailure(await runEngine(['verify', '--repo', repo, '--json'], { env: { ENGINE_CACHE_DIR: cache } }), 'ENGINE_NOT_A_REPOSITORY', 5);
    }
    await expect(stat(missing)).rejects.toMatchObject({ code: 'ENOENT' });
    expect(await keysUnder(other)).toEqual(['notes.txt', 'photos/cat.jpg']);
    await expect(stat(cache)).rejects.toMatchObject({ code: 'ENOENT' });
    await expect(stat(join(scratch.path, 'never.raw'))).rejects.toMatchObject({ code: 'ENOENT' });
  });

  test("a clock beyond the bound (the store's Date and Last-Modified moved 10 minutes by the proxy): ENGINE_CLOCK_SKEW before anything is written, no lease left; 20 s is within the bound", async () => {
    const { repo, id } = await repositoryWithBackup('s3', 'skew');
    const before = await keysUnder(repo);
    const skewed = s3Env(proxy.endpoint);
    proxy.addRule({ action: { kind: 'shift-time', ms: 10 * 60_000 } });
    try {
      expectFailure(await runEngine(['backup', '--repo', repo, '--source', await newImage(2), '--json'], { env: skewed }), 'ENGINE_CLOCK_SKEW');
      expectFailure(await runEngine(['restore', '--repo', repo, id, '--to', join(scratch.path, 'never.raw'), '--json'], { env: skewed }), 'ENGINE_CLOCK_SKEW');
      expectFailure(await runEngine(['verify', '--repo', repo, '--json'], { env: skewed }), 'ENGINE_CLOCK_SKEW');
      expect(proxy.injected['shift-time']).toBeGreaterThan(0);
      expect(await keysUnder(repo)).toEqual(before);
      proxy.clearRules();
      proxy.addRule({ action: { kind: 'shift-time', ms: -20_000 } });
      const within = await backupOk(repo, imageA, skewed);
      await expectRestores(repo, within, imageA, skewed);
    } finally {
      proxy.clearRules();
    }
    await expectRestores(repo, id, imageA, s3Env());
  });

  test('a 503 storm (SlowDown on a third of the requests): backup, restore and verify retry through it', async () => {
    const { repo, id } = await repositoryWithBackup('s3', 'storm');
    const env = s3Env(proxy.endpoint);
    const before = proxy.injected.slowdown ?? 0;
    proxy.addRule({ probability: 0.33, action: { kind: 'slowdown' } });
    try {
      const image = await newImage(6);
      const stormy = await backupOk(repo, image, env);
      await expectRestores(repo, stormy, image, env);
      await expectRestores(repo, id, imageA, env);
      const verified = await runEngine(['verify', '--repo', repo, '--read-data', '--json'], { env });
      expect(verified.code, verified.stderr).toBe(0);
    } finally {
      proxy.clearRules();
    }
    expect((proxy.injected.slowdown ?? 0) - before).toBeGreaterThan(5);
  });

  test('pack uploads cut mid-body (reset), changed on the way (BadDigest from Content-MD5) and refused (503): each retried, the backup restores byte for byte', async () => {
    const { repo, id } = await repositoryWithBackup('s3', 'pack-faults');
    const env = s3Env(proxy.endpoint);
    const before = { ...proxy.injected };
    // 80 MiB of random data: three packs, the later ones written over an uploaded pack's file (pack-file.ts).
    const packs = /^\/[^/]+\/.*packs\//;
    proxy.addRule({ method: 'PUT', path: packs, times: 1, action: { kind: 'reset-request', afterBytes: 3 * MiB } });
    proxy.addRule({ method: 'PUT', path: packs, skip: 1, times: 1, action: { kind: 'corrupt-request', atByte: 5 * MiB } });
    proxy.addRule({ method: 'PUT', path: packs, skip: 2, times: 1, action: { kind: 'slowdown', status: 503 } });
    try {
      const image = await newImage(80);
      const faulty = await backupOk(repo, image, env);
      proxy.clearRules();
      await expectRestores(repo, faulty, image, env);
      await expectRestores(repo, id, imageA, env);
    } finally {
      proxy.clearRules();
    }
    for (const kind of ['reset-request', 'corrupt-request', 'slowdown']) expect((proxy.injected[kind] ?? 0) - (before[kind] ?? 0), kind).toBe(1);
  });

  test('a restore reads adjacent frames in one ranged GET; such GETs reset and cut short mid-body are retried and the disk restores byte for byte', async () => {
    const { repo } = await repositoryWithBackup('s3', 'span-resets');
    // 12 blocks, each half random and half text: frames of a little over 512 KiB whatever the repository's
    // compression (lz4 or zstd shrink the text half to almost nothing), three of them in one GET of up to 2 MiB.
    const image = join(scratch.path, 'span-resets.img');
    for (let block = 0; block < 12; block += 1) {
      await writeRegion(image, block * MiB, MiB / 2, 'random', 'span-resets');
      await writeRegion(image, block * MiB + MiB / 2, MiB / 2, 'text', 'span-resets');
    }
    const id = await backupOk(repo, image, s3Env());
    const before = { reset: proxy.injected['reset-response'] ?? 0, cut: proxy.injected['truncate-response'] ?? 0 };
    proxy.answers.largest = 0;
    // Every pack GET after the first (which may be the map's page): two resets, then an answer cut short, each
    // 1.5 MiB into the body, which only a GET of more than one frame reaches (a frame of a 1 MiB block is at
    // most 1 MiB and 56 bytes).
    const packs = /^\/[^/]+\/span-resets\/packs\//;
    proxy.addRule({ method: 'GET', path: packs, skip: 1, times: 2, action: { kind: 'reset-response', afterBytes: 1536 * 1024 } });
    proxy.addRule({ method: 'GET', path: packs, skip: 1, times: 1, action: { kind: 'truncate-response', afterBytes: 1536 * 1024 } });
    try {
      await expectRestores(repo, id, image, s3Env(proxy.endpoint));
    } finally {
      proxy.clearRules();
    }
    expect((proxy.injected['reset-response'] ?? 0) - before.reset).toBe(2);
    expect((proxy.injected['truncate-response'] ?? 0) - before.cut).toBe(1);
    expect(proxy.answers.largest).toBeGreaterThan(1536 * 1024);
  });

  test('a storm longer than the retry budget: the backup fails in one line (ENGINE_STORAGE_UNAVAILABLE, with its attempts); the next backup commits', async () => {
    const { repo, id } = await repositoryWithBackup('s3', 'long-storm');
    const env = s3Env(proxy.endpoint);
    // The backup has its lease and has stored a pack when the store turns to 503: mid-backup. Its pauses start
    // at 10 ms instead of 200 (ENGINE_TEST_RETRY_BASE_MS, tests only): the same 10 attempts, given up after
    // ~2.5 s instead of ~50 s of sleeping; the default budget rides through the storms above.
    const child = spawnEngine(['backup', '--repo', repo, '--source', await newImage(40), '--json'], { ...env, ENGINE_STOP_AT: 'pack-sealed', ENGINE_TEST_RETRY_BASE_MS: '10' });
    const output = collectOutput(child);
    await stoppedItself(child);
    // Every upload of a pack from now on (the lease's own requests pass: its release is not held up by another budget).
    proxy.addRule({ method: 'PUT', path: /\/packs\//, action: { kind: 'slowdown' } });
    try {
      const code = await continueUntilExit(child);
      expectFailure({ code, stdout: output.stdout(), stderr: output.stderr() }, 'ENGINE_STORAGE_UNAVAILABLE');
      expect(parseJson<{ error: { details: { attempts: number } } }>(output.stdout()).error.details.attempts).toBe(10);
    } finally {
      proxy.clearRules();
    }
    const next = await backupOk(repo, imageA, env);
    await expectRestores(repo, next, imageA, env);
    await expectRestores(repo, id, imageA, env);
  });

  test('the gateway killed (kill -9) and restarted mid-backup: the backup retries through and commits; nothing committed is lost', async () => {
    const { repo, id } = await repositoryWithBackup('s3', 'gateway-restart');
    const image = await newImage(12);
    const child = spawnEngine(['backup', '--repo', repo, '--source', image, '--json'], { ...s3Env(), ENGINE_STOP_AT: 'pack-written' });
    const output = collectOutput(child);
    await stoppedItself(child);
    await cluster.killGateway();
    // It goes on to upload its pack into a store that is down; the gateway is back 2 s later.
    const restarted = new Promise((resolve) => setTimeout(resolve, 2000)).then(() => cluster.startGateway());
    const code = await continueUntilExit(child);
    await restarted;
    expect(code, output.stderr()).toBe(0);
    const committed = parseJson<BackupJson>(output.stdout()).id;
    await expectRestores(repo, committed, image, s3Env());
    await expectRestores(repo, id, imageA, s3Env());
    expect(await backupOk(repo, imageA, s3Env())).toMatch(/^[0-9a-f]{32}$/);
  });
});

for (const kind of ['folder', 's3'] as const) {
  describe(`version 3 on ${kind === 'folder' ? 'a folder' : 'S3'}: objects and leases behind the engine's back, a full cache disk`, () => {
    test('a pack deleted, a record cut short, a segment deleted and one cut short: restore and verify name what is wrong; the other backup restores', async () => {
      const { repo, env, id } = await repositoryWithBackup(kind, `damage-${kind}`);
      const store = kind === 's3' ? await openRgwStorage(cluster, repo) : undefined;
      const damage = async (key: string, how: 'delete' | 'cut'): Promise<void> => {
        if (store) {
          if (how === 'delete') await store.delete(key);
          else await store.put(key, (await store.get(key)).subarray(0, 37));
        } else if (how === 'delete') await rm(join(repo, key));
        else {
          await chmod(join(repo, key), 0o600);
          await truncate(join(repo, key), 37);
        }
      };
      try {
        for (const [what, how] of [['packs', 'delete'], ['backups', 'cut'], ['index', 'delete'], ['index', 'cut']] as const) {
          // A backup of its own content: its pack, record and segment are its alone.
          const image = await newImage(3);
          const before = await keysUnder(repo);
          const victim = await backupOk(repo, image, env);
          const key = (await keysUnder(repo)).find((k) => !before.includes(k) && k.startsWith(`${what}/`))!;
          expect(key, `${what} of the new backup`).toBeDefined();
          await damage(key, how);
          const name = key.split('/').pop()!;
          // From this host's cache and from a host that has none (its cache built from the store now).
          for (const readerEnv of [env, { ...env, ENGINE_CACHE_DIR: join(scratch.path, `cache-fresh-${kind}-${what}-${how}`) }]) {
            const target = join(scratch.path, 'damaged.raw');
            const restored = await runEngine(['restore', '--repo', repo, victim, '--to', target, '--json'], { env: readerEnv });
            const segmentCut = what === 'index' && how === 'cut';
            if (segmentCut) {
              const report = parseJson<{ problems: { code: string; path?: string }[] }>((await runEngine(['verify', '--repo', repo, '--json'], { env: readerEnv })).stdout);
              expect(report.problems.filter((p) => p.code === 'SEGMENT_DAMAGED').map((p) => p.path)).toContain(key);
            }
            if (segmentCut && readerEnv === env) {
              // This host's cache holds the segment's entries and the packs are whole: its restore is right.
              expect(restored.code, restored.stderr).toBe(0);
              expect(await filesIdentical(target, image)).toBe(true);
              await rm(target, { force: true });
              continue;
            }
            await rm(target, { force: true });
            expect(restored.code, `${what} ${how}: ${restored.stdout}`).not.toBe(0);
            expect(restored.stderr.trim().split('\n').filter((l) => !/^engine: (removed|rebuilt|index segment)/.test(l)), restored.stderr).toHaveLength(1);
            const code = parseJson<{ error: { code: string; message: string } }>(restored.stdout).error;
            const named = `${code.message} ${restored.stderr}`;
            if (segmentCut) {
              // Its notice names the segment (without --json: with it, notices are not printed).
              const plain = await runEngine(['restore', '--repo', repo, victim, '--to', target], { env: readerEnv });
              await rm(target, { force: true });
              expect(plain.code).toBe(restored.code);
              expect(plain.stderr, 'a host without the segment cached names it').toContain(key);
            }
            if (what === 'index') expect(code.code).toMatch(/ENGINE_MISSING_BLOB|ENGINE_CORRUPT_METADATA/);
            else expect(named, `${what} ${how}`).toContain(what === 'backups' ? victim : name);
            const verified = await runEngine(['verify', '--repo', repo, '--read-data', '--json'], { env: readerEnv });
            expect(verified.code, verified.stderr).toBe(4);
            const report = parseJson<{ problems: { backup?: string; message: string }[] }>(verified.stdout);
            expect(report.problems.some((p) => p.backup === victim || p.message.includes(victim)), verified.stdout).toBe(true);
            if (what !== 'index' || how === 'cut') expect(`${verified.stdout} ${verified.stderr}`).toContain(what === 'backups' ? victim : name);
          }
          await expectRestores(repo, id, imageA, env);
          // The damaged backup is forgotten (its record may be unreadable: --force), the next case gets its own.
          const forgot = await runEngine(['forget', '--repo', repo, victim, '--force'], { env });
          expect(forgot.code, forgot.stderr).toBe(0);
        }
      } finally {
        await store?.close();
      }
      expect(await backupOk(repo, imageA, env)).toMatch(/^[0-9a-f]{32}$/);
    });

    test('a lease removed behind a running backup (unlock --force): the backup stops before its record with ENGINE_LEASE_LOST; nothing committed is lost', async () => {
      const { repo, env, id } = await repositoryWithBackup(kind, `stolen-${kind}`);
      const before = (await keysUnder(repo)).filter((k) => k.startsWith('backups/'));
      const child = spawnEngine(['backup', '--repo', repo, '--source', await newImage(3), '--json'], { ...env, ENGINE_STOP_AT: 'pack-sealed' });
      const output = collectOutput(child);
      await stoppedItself(child);
      const unlocked = await runEngine(['unlock', '--repo', repo, '--force'], { env: { ...env, ENGINE_CACHE_DIR: join(scratch.path, 'cache-other-host') } });
      expect(unlocked.code, unlocked.stderr).toBe(0);
      const code = await continueUntilExit(child);
      expectFailure({ code, stdout: output.stdout(), stderr: output.stderr() }, 'ENGINE_LEASE_LOST');
      expect((await keysUnder(repo)).filter((k) => k.startsWith('backups/'))).toEqual(before);
      await expectRestores(repo, id, imageA, env);
      expect(await backupOk(repo, imageA, env)).toMatch(/^[0-9a-f]{32}$/);
    });

    test('a lease that expired while its backup was paused (lease time 6 s, bound 1 s): the backup stops with ENGINE_LEASE_LOST; a backup meanwhile from another host commits', async () => {
      const { repo, env, id } = await repositoryWithBackup(kind, `expired-${kind}`);
      // The repository's lease timing, shortened (SPEC 19.1 allows any T > 4B, B >= 1 s).
      await setLeaseTiming(cluster, repo, 6000, 1000);
      const image = await newImage(3);
      const child = spawnEngine(['backup', '--repo', repo, '--source', image, '--json'], { ...env, ENGINE_STOP_AT: 'pack-sealed' });
      const output = collectOutput(child);
      await stoppedItself(child);
      // Paused past T + 2B after its latest lease write (its `expires` + 2B): another host judges the lease
      // expired and breaks it, and backs up meanwhile.
      await untilLeasesExpired(cluster, repo, 1000);
      const otherHost = { ...env, ENGINE_CACHE_DIR: join(scratch.path, `cache-other-host-${kind}`) };
      const meanwhile = await backupOk(repo, await newImage(2), otherHost);
      const code = await continueUntilExit(child);
      expectFailure({ code, stdout: output.stdout(), stderr: output.stderr() }, 'ENGINE_LEASE_LOST');
      const ids = (await keysUnder(repo)).filter((k) => k.startsWith('backups/')).map((k) => k.slice('backups/'.length));
      expect(ids.sort()).toEqual([id, meanwhile].sort());
      await expectRestores(repo, id, imageA, env);
      expect(await backupOk(repo, image, env)).toMatch(/^[0-9a-f]{32}$/);
    });

    // On a folder too: the pack being built lies in the cache's slot (SPEC 19.4), on another file system than a
    // folder repository here (the tmpfs), so a folder's pack goes across file systems (EXDEV), not renamed.
    test('a full local cache disk (ENGINE_CACHE_DIR on a small tmpfs): the backup fails in one line (ENGINE_NO_SPACE), leaves no lease; with room the next backup commits', async () => {
      const { repo, env, id } = await repositoryWithBackup(kind, `full-cache-${kind}`);
      const tmpfs = await Tmpfs.mount(join(scratch.path, `tmpfs-${kind}`), 8);
      try {
        const full = { ...env, ENGINE_CACHE_DIR: tmpfs.path };
        // Room for the host id and the index cache, none for a pack being built.
        const image = await newImage(12);
        const r = await runEngine(['backup', '--repo', repo, '--source', image, '--json'], { env: full });
        expectFailure(r, 'ENGINE_NO_SPACE');
        expect((await keysUnder(repo)).filter((k) => k.startsWith('leases/'))).toEqual([]);
        await expectRestores(repo, id, imageA, env);
        const next = await backupOk(repo, image, env);
        await expectRestores(repo, next, image, env);
      } finally {
        await tmpfs.unmount();
      }
    });
  });
}
