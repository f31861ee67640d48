/**
 * The gaps of format 3's crash and fault tables that the other v3 files leave (SPEC.md 19.6, 19.8, 19.9,
 * 19.11, 19.12), through the CLI, on a folder and on S3 (the tests' own Ceph RADOS Gateway):
 * - kill -9 of gc at `gc-v3-entries` (its plan split into entry segments and a switch,
 *   ENGINE_TEST_GC_BATCH): the row's state, the next gc finishes, every backup restores byte for byte;
 * - migrate stopped by SIGINT and SIGTERM before its swap (nothing changed) and after it (it finishes);
 * - restore and verify --read-data losing their shared lease (`unlock --force`; expired while stopped);
 * - repair rebuilding an encrypted repository's lost config, and refusing without its passphrase or key file;
 * - a real clock skew: the engine run under libfaketime against RGW, whose clock is true.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { chmod, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execFile } from 'node:child_process';
import { startRgwCluster, type RgwCluster } from './rgw.js';
import { restoresIdentical, verifiesClean } from './library-calls.js';
import { createBucket, repositoryKeys, repositoryObject, rgwEnv, withRgwStorage } from './s3-helpers.js';
import { collectOutput, continueUntilExit, exitOf, filesIdentical, parseJson, runEngine, spawnEngine, stoppedItself, tempDir, writeRegion, type BackupJson, type RunResult } from './helpers.js';

const MiB = 1024 * 1024;
const BUCKET = 'engine-v3-gaps';
const PASSWORD = 'correct horse battery staple';
const FAKETIME_LIB = '/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1';
let cluster: RgwCluster;
let scratch: { path: string; cleanup: () => Promise<void> };

beforeAll(async () => {
  scratch = await tempDir('engine-v3-gaps-');
  cluster = await startRgwCluster({ memstoreBytes: 1024 * MiB });
  await createBucket(cluster, BUCKET);
});

afterAll(async () => {
  await cluster?.stop();
  await scratch?.cleanup();
});

type Kind = 'folder' | 's3';

function env(kind: Kind, extra: Record<string, string> = {}): Record<string, string> {
  return { ...(kind === 's3' ? rgwEnv(cluster, scratch.path) : {}), ENGINE_CACHE_DIR: join(scratch.path, `cache-${kind}`), ...extra };
}

const repoNamed = (kind: Kind, name: string): string => (kind === 'folder' ? join(scratch.path, `${kind}-${name}`) : `s3://${BUCKET}/${name}`);

/** Every key of a repository, sorted. */
const keysOf = async (where: string): Promise<string[]> => (await repositoryKeys(cluster, where)).sort();

const getObject = (where: string, key: string): Promise<Buffer> => repositoryObject(cluster, where, key);

/** Writes (or, with undefined, deletes) an object behind the engine's back. */
async function setObject(where: string, key: string, bytes: Buffer | undefined): Promise<void> {
  if (!where.startsWith('s3://')) {
    const path = join(where, key);
    if (bytes === undefined) {
      await rm(path, { force: true });
      return;
    }
    await chmod(path, 0o600).catch(() => undefined);
    await writeFile(path, bytes);
    await chmod(path, 0o400);
    return;
  }
  await withRgwStorage(cluster, where, (storage) => (bytes === undefined ? storage.delete(key) : storage.put(key, bytes)));
}

/**
 * The lease timing of the tests that lose a lease (SPEC 19.1: B >= 1 s, 4B < T): short, so that a stopped
 * process's refresh is due (T/3) or its lease past its use (T - B) soon; long enough that a process that runs
 * refreshes in time on a loaded machine (T - B - T/3 = 3 s of slack).
 */
const LEASE_MS = 6000;
const BOUND_MS = 1000;
/** A stopped holder, resumed after this, refreshes its lease first thing (past T/3 since its latest write). */
const PAST_REFRESH_MS = LEASE_MS / 3 + 1000;
/** A stopped holder, resumed after this, counts its lease lost by its monotonic clock (past T - B). */
const PAST_USE_MS = LEASE_MS - BOUND_MS + 1000;

/** The repository's lease timing, shortened (SPEC 19.1: B >= 1 s, 4B < T). */
async function setLeaseTiming(repo: string, timeMs: number, skewBoundMs: number): Promise<void> {
  const config = JSON.parse((await getObject(repo, 'config')).toString('utf8')) as Record<string, unknown>;
  config.leases = { timeMs, skewBoundMs };
  await setObject(repo, 'config', Buffer.from(JSON.stringify(config)));
}

async function image(name: string, megabytes: number, seed = name): Promise<string> {
  const path = join(scratch.path, `${name}.img`);
  await writeRegion(path, 0, megabytes * MiB, 'random', seed);
  return path;
}

async function init(kind: Kind, repo: string, args: string[] = [], extra: Record<string, string> = {}): Promise<void> {
  const r = await runEngine(['init', '--format', '3', ...args, repo], { env: env(kind, extra) });
  expect(r.code, r.stderr).toBe(0);
}

async function backup(kind: Kind, repo: string, source: string, extra: Record<string, string> = {}): Promise<string> {
  const r = await runEngine(['backup', '--repo', repo, '--source', source, '--json'], { env: env(kind, extra) });
  expect(r.code, r.stderr).toBe(0);
  return parseJson<BackupJson>(r.stdout).id;
}

/**
 * Every backup restores byte for byte (cmp) into a new file; verify --read-data is clean and counts them. Calls
 * of the library in this process (test/library-calls.ts), but under a skewed clock (LD_PRELOAD, which only a
 * process of its own can have): there the commands themselves are what is tested.
 */
async function everythingRestores(kind: Kind, repo: string, backups: Map<string, string>, extra: Record<string, string> = {}): Promise<void> {
  const environment = env(kind, extra);
  const ownProcess = environment.LD_PRELOAD !== undefined;
  for (const [id, source] of backups) {
    const target = join(scratch.path, `restore-${id}-${Math.random().toString(16).slice(2)}.raw`);
    if (ownProcess) {
      const r = await runEngine(['restore', '--repo', repo, id, '--to', target], { env: environment });
      expect(r.code, r.stderr).toBe(0);
      expect(await filesIdentical(target, source), `backup ${id} of ${source}`).toBe(true);
    } else {
      expect(await restoresIdentical(repo, id, source, target, environment), `backup ${id} of ${source}`).toBe(true);
    }
    await rm(target, { force: true });
  }
  if (ownProcess) {
    const verified = await runEngine(['verify', '--repo', repo, '--read-data', '--json'], { env: environment });
    expect(verified.code, `${verified.stdout}\n${verified.stderr}`).toBe(0);
    expect(parseJson<{ ok: boolean; backups: number }>(verified.stdout)).toMatchObject({ ok: true, backups: backups.size });
  } else {
    expect(await verifiesClean(repo, environment)).toMatchObject({ ok: true, backups: backups.size });
  }
}

/** One line on stderr, and with --json the error's code on stdout. */
function expectFailure(r: RunResult, code: string, exit = 1): string {
  expect(r.code, `${r.stdout}\n${r.stderr}`).toBe(exit);
  expect(r.stderr.trim().split('\n'), r.stderr).toHaveLength(1);
  const error = parseJson<{ error: { code: string; message: string } }>(r.stdout).error;
  expect(error.code, r.stdout).toBe(code);
  return error.message;
}

const segmentsOf = async (repo: string): Promise<string[]> => (await keysOf(repo)).filter((k) => k.startsWith('index/'));
const packsOf = async (repo: string): Promise<string[]> => (await keysOf(repo)).filter((k) => k.startsWith('packs/'));
const leasesOf = async (repo: string): Promise<string[]> => (await keysOf(repo)).filter((k) => k.startsWith('leases/'));

/**
 * Runs `engine ARGS` until it stops itself at ENGINE_STOP_AT `point`, lets `meanwhile` act while it is stopped
 * (a signal sent then is seen on resumption), resumes it (again at each later stop there) and says how it ended.
 */
async function stoppedThenResumed(args: string[], environment: Record<string, string>, point: string, meanwhile: (child: ReturnType<typeof spawnEngine>) => Promise<void>): Promise<RunResult> {
  const child = spawnEngine(args, { ...environment, ENGINE_STOP_AT: point });
  const out = collectOutput(child);
  await stoppedItself(child);
  await meanwhile(child);
  const code = await continueUntilExit(child);
  // Its output read to the end ('exit' may come before the pipes are drained), and a death by a signal named:
  // a failure then says what ended the process, not only "-1" with no output.
  if (child.stdout && !child.stdout.readableEnded) await new Promise((resolve) => child.once('close', resolve));
  const signal = child.signalCode ? `\n[ended by ${child.signalCode}]` : '';
  return { code, stdout: out.stdout(), stderr: `${out.stderr()}${signal}` };
}

for (const kind of ['folder', 's3'] as const) {
  describe(`format 3's untested rows, ${kind === 'folder' ? 'on a folder' : 'on S3 (RGW)'}`, () => {
    test('kill -9 of gc at gc-v3-entries (its plan split: entry segments, then a switch): gc\'s entry segments lie beside the old ones, every backup restores, the next gc finishes', async () => {
      const repo = repoNamed(kind, 'gc-entries');
      await init(kind, repo);
      const backups = new Map<string, string>();
      const base = await image(`${kind}-gc-base`, 4);
      backups.set(await backup(kind, repo, base), base);
      // Garbage of both kinds: a forgotten backup's chunks and a pack half live (rewritten below 90%).
      const halfA = join(scratch.path, `${kind}-gc-half-a.img`);
      await writeRegion(halfA, 0, 2 * MiB, 'random', `${kind}-half-shared`);
      await writeRegion(halfA, 2 * MiB, 2 * MiB, 'random', `${kind}-half-a`);
      const halfB = join(scratch.path, `${kind}-gc-half-b.img`);
      await writeRegion(halfB, 0, 2 * MiB, 'random', `${kind}-half-shared`);
      const a = await backup(kind, repo, halfA);
      backups.set(await backup(kind, repo, halfB), halfB);
      expect((await runEngine(['forget', '--repo', repo, a], { env: env(kind) })).code).toBe(0);

      const segmentsBefore = await segmentsOf(repo);
      const packsBefore = await packsOf(repo);
      // Two entries a segment: 6 live chunks and their map pages make several entry segments.
      const split = { ENGINE_TEST_GC_BATCH: '2' };
      const crashed = await runEngine(['gc', '--repo', repo, '--rewrite-below', '90%'], { env: env(kind, { ...split, ENGINE_CRASH_AT: 'gc-v3-entries' }) });
      expect(crashed.code, crashed.stderr).toBe(137);
      // The row: gc's first entry segment beside every old one (superseding nothing), no pack deleted, its lease left.
      const segmentsAfter = await segmentsOf(repo);
      expect(segmentsAfter.filter((s) => !segmentsBefore.includes(s))).toHaveLength(1);
      expect(segmentsAfter.filter((s) => segmentsBefore.includes(s)).sort()).toEqual([...segmentsBefore].sort());
      const added = segmentsAfter.find((s) => !segmentsBefore.includes(s))!;
      expect(added.split('/')[1]!.split('-')[0]).not.toBe(segmentsBefore[0]!.split('/')[1]!.split('-')[0]);
      const packsAfter = await packsOf(repo);
      expect(packsBefore.every((p) => packsAfter.includes(p))).toBe(true);
      expect(packsAfter.length).toBeGreaterThan(packsBefore.length); // gc's copies, durable, named by its entry segment at most
      expect(await leasesOf(repo)).toHaveLength(1);
      // Every command opens it (the dead gc's lease is broken at once on this host), everything restores.
      const list = await runEngine(['list', '--repo', repo, '--json'], { env: env(kind) });
      expect(list.code, list.stderr).toBe(0);
      expect(parseJson<{ backups: { id: string }[] }>(list.stdout).backups.map((r) => r.id).sort()).toEqual([...backups.keys()].sort());
      await everythingRestores(kind, repo, backups);
      // The next gc, split too, finishes: several entry segments and a switch; then one unsplit gc consolidates.
      const next = await runEngine(['gc', '--repo', repo, '--rewrite-below', '90%', '--json'], { env: env(kind, split) });
      expect(next.code, next.stderr).toBe(0);
      const report = parseJson<{ segments: { before: number; written: number; deleted: number } }>(next.stdout);
      expect(report.segments.before).toBe(segmentsAfter.length);
      expect(report.segments.written).toBeGreaterThan(2);
      expect(report.segments.deleted).toBe(segmentsAfter.length);
      expect(await segmentsOf(repo)).toHaveLength(report.segments.written);
      await everythingRestores(kind, repo, backups);
      const consolidated = await runEngine(['gc', '--repo', repo, '--json'], { env: env(kind) });
      expect(consolidated.code, consolidated.stderr).toBe(0);
      expect(await segmentsOf(repo)).toHaveLength(1);
      expect(await leasesOf(repo)).toEqual([]);
      await everythingRestores(kind, repo, backups);
    });

    test('kill -9 of backup at index-written (a pack\'s entries pending, no segment yet): the row "during 2-3, before the segment" (a lease and a pack, no segment, no record); verify clean, the next backup commits, everything restores', async () => {
      const repo = repoNamed(kind, 'index-written');
      await init(kind, repo);
      const backups = new Map<string, string>();
      const first = await image(`${kind}-iw-first`, 3);
      backups.set(await backup(kind, repo, first), first);
      const before = await keysOf(repo);
      const crashed = await runEngine(['backup', '--repo', repo, '--source', await image(`${kind}-iw-crashed`, 40)], { env: env(kind, { ENGINE_CRASH_AT: 'index-written' }) });
      expect(crashed.code, crashed.stderr).toBe(137);
      const added = (await keysOf(repo)).filter((k) => !before.includes(k));
      expect([...new Set(added.map((k) => k.split('/')[0]))].sort()).toEqual(['leases', 'packs']);
      expect(added.filter((k) => k.startsWith('packs/')).length).toBeGreaterThanOrEqual(1);
      const verified = await runEngine(['verify', '--repo', repo, '--json'], { env: env(kind) });
      expect(verified.code, verified.stdout).toBe(0);
      expect(parseJson<{ garbage: { unindexedPacks: string[] } }>(verified.stdout).garbage.unindexedPacks.length).toBeGreaterThanOrEqual(1);
      expect(await leasesOf(repo)).toEqual([]);
      const next = await image(`${kind}-iw-next`, 3);
      backups.set(await backup(kind, repo, next), next);
      await everythingRestores(kind, repo, backups);
    });

    test('gc losing its exclusive lease in 2.1 (stopped at gc-v3-entries: removed by unlock --force; expired while stopped): ENGINE_LEASE_LOST in one line, the old segments all effective, every backup restores, the next gc finishes', async () => {
      const repo = repoNamed(kind, 'gc-lease-lost');
      await init(kind, repo);
      const backups = new Map<string, string>();
      for (const name of ['a', 'b']) {
        const source = await image(`${kind}-gcl-${name}`, 3);
        backups.set(await backup(kind, repo, source), source);
      }
      await setLeaseTiming(repo, LEASE_MS, BOUND_MS);
      const split = { ENGINE_TEST_GC_BATCH: '2' };
      const oldSegments = await segmentsOf(repo);
      // 'expired' on S3 only: gc judges its own lease lost by its monotonic clock while it is stopped, between
      // two store operations, so a folder adds nothing to it (the folder's refresh finding its lease gone is
      // 'unlock --force', run on both).
      for (const how of kind === 's3' ? (['unlock --force', 'expired'] as const) : (['unlock --force'] as const)) {
        const ended = await stoppedThenResumed(['gc', '--repo', repo, '--json'], env(kind, split), 'gc-v3-entries', async () => {
          if (how === 'unlock --force') {
            const forced = await runEngine(['unlock', '--repo', repo, '--force'], { env: env(kind) });
            expect(forced.code, forced.stderr).toBe(0);
            await new Promise((resolve) => setTimeout(resolve, PAST_REFRESH_MS)); // past T/3: the refresh finds it gone
          } else {
            await new Promise((resolve) => setTimeout(resolve, PAST_USE_MS)); // past T - B: lost at the next step
          }
        });
        expectFailure(ended, 'ENGINE_LEASE_LOST');
        // The row of 2.1: gc's entry segments (if any stayed) beside every old one, which stay effective.
        const segments = await segmentsOf(repo);
        for (const old of oldSegments) expect(segments).toContain(old);
        expect(await leasesOf(repo)).toEqual([]);
        await everythingRestores(kind, repo, backups);
      }
      const finished = await runEngine(['gc', '--repo', repo, '--json'], { env: env(kind) });
      expect(finished.code, finished.stderr).toBe(0);
      expect(await segmentsOf(repo)).toHaveLength(1);
      await everythingRestores(kind, repo, backups);
    });

    test('repair interrupted (SIGINT) while it reads the packs: exit 130 in one line, its lease gone, nothing in the repository changed; run again it finishes', async () => {
      const repo = repoNamed(kind, 'repair-sigint');
      await init(kind, repo);
      const backups = new Map<string, string>();
      const source = await image(`${kind}-repair-sigint`, 40);
      backups.set(await backup(kind, repo, source), source);
      const before = await keysOf(repo);
      const ended = await stoppedThenResumed(['repair', '--repo', repo, '--json'], env(kind), 'repair-pack-read', async (child) => {
        child.kill('SIGINT');
      });
      expectFailure(ended, 'ENGINE_INTERRUPTED', 130);
      expect(await keysOf(repo)).toEqual(before);
      const again = await runEngine(['repair', '--repo', repo, '--json'], { env: env(kind) });
      expect(again.code, again.stderr).toBe(0);
      expect(await leasesOf(repo)).toEqual([]);
      await everythingRestores(kind, repo, backups);
    });

    describe('restore and verify --read-data that lose their shared lease (lease timing 6 s / 1 s)', () => {
      let repo: string;
      const backups = new Map<string, string>();
      let id: string;
      let source: string;

      beforeAll(async () => {
        repo = repoNamed(kind, 'readers');
        await init(kind, repo);
        // 80 MiB: three packs, 80 blocks; a restore or verify stopped after its first block or pack has more to read.
        source = await image(`${kind}-readers`, 80);
        id = await backup(kind, repo, source);
        backups.set(id, source);
        await setLeaseTiming(repo, LEASE_MS, BOUND_MS);
      });

      /**
       * Runs `args` stopped at `point`, lets `meanwhile` happen, resumes it: it must end with
       * ENGINE_LEASE_LOST in one line (exit 1), the repository's keys as they were but for its lease.
       */
      async function loseLease(args: string[], point: string, meanwhile: () => Promise<void>): Promise<{ message: string }> {
        const before = await keysOf(repo);
        const ended = await stoppedThenResumed([...args, '--json'], env(kind), point, async () => {
          expect(await leasesOf(repo)).toHaveLength(1);
          await meanwhile();
        });
        const message = expectFailure(ended, 'ENGINE_LEASE_LOST');
        expect(await keysOf(repo)).toEqual(before);
        return { message };
      }

      test('restore to a new file, its lease removed by unlock --force: ENGINE_LEASE_LOST at the next read after the refresh finds it, the half-written file removed, nothing in the repository changed', async () => {
        const target = join(scratch.path, `${kind}-lost-new.raw`);
        const { message } = await loseLease(['restore', '--repo', repo, id, '--to', target], 'restore-block-written', async () => {
          const forced = await runEngine(['unlock', '--repo', repo, '--force'], { env: env(kind) });
          expect(forced.code, forced.stderr).toBe(0);
          expect(await leasesOf(repo)).toEqual([]);
          // Past T/3: the refresh is due as soon as the process runs again.
          await new Promise((resolve) => setTimeout(resolve, PAST_REFRESH_MS));
        });
        expect(message).toMatch(/lease/);
        await expect(stat(target)).rejects.toThrow(/ENOENT/);
        await everythingRestores(kind, repo, backups);
      });

      // On S3 only: the restore judges its lease lost by its own monotonic clock while stopped, between two
      // reads of the store; a folder adds nothing (its refresh finding the lease gone is the test above).
      if (kind === 's3') test('restore --force over an existing file, stopped (SIGSTOP) past its lease time and continued: ENGINE_LEASE_LOST; the target is left part-written and the message says so; a restore run again makes it identical', async () => {
        const target = join(scratch.path, `${kind}-lost-existing.raw`);
        await writeRegion(target, 0, 80 * MiB, 'random', 'the old contents');
        const { message } = await loseLease(['restore', '--repo', repo, id, '--to', target, '--force'], 'restore-block-written', async () => {
          // Beyond T - B (5 s) on the monotonic clock: the lease counts as lost at the next read, whoever broke it.
          await new Promise((resolve) => setTimeout(resolve, PAST_USE_MS));
        });
        expect(message).toContain(target);
        expect(await filesIdentical(target, source)).toBe(false);
        const again = await runEngine(['restore', '--repo', repo, id, '--to', target, '--force'], { env: env(kind) });
        expect(again.code, again.stderr).toBe(0);
        expect(await filesIdentical(target, source)).toBe(true);
      });

      test('verify --read-data, its lease removed by unlock --force: ENGINE_LEASE_LOST, nothing changed; and stopped past its lease time: the same', async () => {
        await loseLease(['verify', '--repo', repo, '--read-data'], 'verify-pack-scanned', async () => {
          expect((await runEngine(['unlock', '--repo', repo, '--force'], { env: env(kind) })).code).toBe(0);
          await new Promise((resolve) => setTimeout(resolve, PAST_REFRESH_MS));
        });
        // Stopped past its lease time on S3 only: judged by verify's own monotonic clock, as restore's above.
        if (kind === 's3') {
          await loseLease(['verify', '--repo', repo, '--read-data'], 'verify-pack-scanned', async () => {
            await new Promise((resolve) => setTimeout(resolve, PAST_USE_MS));
          });
        }
        await everythingRestores(kind, repo, backups);
      });
    });

    test('an encrypted repository\'s config deleted: every command refuses it; repair without the passphrase, with a wrong one, without the key file: one line each, nothing written; with it, the config comes back and everything restores', async () => {
      const repo = repoNamed(kind, 'encrypted-config');
      const password = { ENGINE_PASSWORD: PASSWORD };
      await init(kind, repo, ['--encrypt'], password);
      const backups = new Map<string, string>();
      for (const name of ['one', 'two']) {
        const source = await image(`${kind}-enc-${name}`, 3);
        backups.set(await backup(kind, repo, source, password), source);
      }
      const config = await getObject(repo, 'config');
      const keyFile = (JSON.parse(config.toString('utf8')) as { encryption: { keyFile: string } }).encryption.keyFile;
      await setObject(repo, 'config', undefined);
      const damaged = await keysOf(repo);
      expectFailure(await runEngine(['list', '--repo', repo, '--json'], { env: env(kind, password) }), 'ENGINE_NOT_A_REPOSITORY', 5);
      expectFailure(await runEngine(['repair', '--repo', repo, '--json'], { env: env(kind) }), 'ENGINE_PASSPHRASE_REQUIRED', 6);
      expect(await keysOf(repo)).toEqual(damaged);
      expectFailure(await runEngine(['repair', '--repo', repo, '--json'], { env: env(kind, { ENGINE_PASSWORD: 'not the passphrase' }) }), 'ENGINE_NOT_A_REPOSITORY', 5);
      expect(await keysOf(repo)).toEqual(damaged);
      // Without its key file the repository cannot be told from a plain one but by its sealed records: refused.
      const keyBytes = await getObject(repo, keyFile);
      await setObject(repo, keyFile, undefined);
      const withoutKey = await keysOf(repo);
      const message = expectFailure(await runEngine(['repair', '--repo', repo, '--json'], { env: env(kind, password) }), 'ENGINE_NOT_A_REPOSITORY', 5);
      expect(message).toMatch(/key file/);
      expect(await keysOf(repo)).toEqual(withoutKey);
      if (kind === 'folder') {
        await writeFile(join(repo, keyFile), keyBytes, { mode: 0o400 });
      } else {
        await setObject(repo, keyFile, keyBytes);
      }
      expect(await keysOf(repo)).toEqual(damaged);
      const rebuilt = await runEngine(['repair', '--repo', repo, '--json'], { env: env(kind, password) });
      expect(rebuilt.code, rebuilt.stderr).toBe(0);
      const report = parseJson<{ configRebuilt: { version: number; sources: Record<string, string> } }>(rebuilt.stdout);
      expect(report.configRebuilt).toMatchObject({ version: 3, sources: { id: 'index', blockSize: 'records', encryption: 'key file' } });
      // SPEC 3.2: a version-3 config comes back as zstd level 1 whatever the frames hold (no engine that predates
      // zstd may open a repository that may hold zstd frames); everything else as it was.
      expect(JSON.parse((await getObject(repo, 'config')).toString('utf8'))).toMatchObject({ ...JSON.parse(config.toString('utf8')), compression: 'zstd', compressionLevel: 1, created: expect.any(String) });
      await everythingRestores(kind, repo, backups, password);
      expectFailure(await runEngine(['restore', '--repo', repo, [...backups.keys()][0]!, '--to', join(scratch.path, `${kind}-never.raw`), '--json'], { env: env(kind) }), 'ENGINE_PASSPHRASE_REQUIRED', 6);
    });
  });
}

describe('migrate interrupted (SIGINT, SIGTERM): before its swap it stops with nothing changed, from the swap on it finishes; its lock goes, a rerun finishes, everything restores', () => {
  const rows = [
    ['SIGINT', 'migrate-segment-written'],
    ['SIGTERM', 'migrate-segment-written'],
    ['SIGINT', 'migrate-index-swapped'],
    ['SIGTERM', 'migrate-index-swapped'],
  ] as const;
  test.each(rows)('%s at %s', async (signal, point) => {
    const repo = join(scratch.path, `migrate-${signal}-${point}`);
    const made = await runEngine(['init', '--format', '1', repo], { env: env('folder') });
    expect(made.code, made.stderr).toBe(0);
    const backups = new Map<string, string>();
    for (const name of ['a', 'b']) {
      const source = await image(`migrate-${signal}-${point}-${name}`, 3);
      backups.set(await backup('folder', repo, source), source);
    }
    const before = await keysOf(repo);
    const child = spawnEngine(['migrate', repo, '--json'], env('folder', { ENGINE_STOP_AT: point }));
    const out = collectOutput(child);
    await stoppedItself(child);
    const exited = exitOf(child);
    child.kill(signal);
    const signalled = performance.now();
    child.kill('SIGCONT');
    const { code } = await exited;
    const stoppedAfter = performance.now() - signalled;
    expect(stoppedAfter).toBeLessThan(1000);
    const config = JSON.parse(await readFile(join(repo, 'config'), 'utf8')) as { version: number };
    if (point === 'migrate-segment-written') {
      // Row "in 1": a version-1 repository, what migrate wrote under tmp/ at most; the lock free.
      expect(code, out.stderr()).toBe(130);
      expect(out.stderr().trim().split('\n')).toHaveLength(1);
      expect(parseJson<{ error: { code: string } }>(out.stdout()).error.code).toBe('ENGINE_INTERRUPTED');
      expect(config.version).toBe(1);
      const after = await keysOf(repo);
      expect(after.filter((k) => !k.startsWith('tmp/') && !k.startsWith('index/'))).toEqual(before.filter((k) => !k.startsWith('tmp/') && !k.startsWith('index/')));
      expect(after.some((k) => k.startsWith('index/CURRENT'))).toBe(true);
      // The lock is free: a version-1 backup (an exclusive writer) runs at once.
      const source = await image(`migrate-${signal}-${point}-c`, 2);
      backups.set(await backup('folder', repo, source), source);
      const rerun = await runEngine(['migrate', repo, '--json'], { env: env('folder') });
      expect(rerun.code, rerun.stderr).toBe(0);
      expect(parseJson<{ from: number; resumed: boolean }>(rerun.stdout)).toMatchObject({ from: 1, resumed: false });
    } else {
      // From the swap on it finishes: version 3, nothing of version 1 left, the lock gone.
      expect(code, out.stderr()).toBe(0);
      expect(parseJson<{ version: number }>(out.stdout()).version).toBe(3);
      expect(config.version).toBe(3);
      const rerun = await runEngine(['migrate', repo, '--json'], { env: env('folder') });
      expect(rerun.code, rerun.stderr).toBe(0);
      expect(parseJson<{ from: number; removed: string[] }>(rerun.stdout)).toMatchObject({ from: 3, removed: [] });
    }
    const top = (await readdir(repo)).sort();
    expect(top.filter((n) => ['lock', 'index.v2', 'tmp', 'readers', 'writers', 'reserve'].includes(n))).toEqual([]);
    expect(JSON.parse(await readFile(join(repo, 'config'), 'utf8'))).toMatchObject({ version: 3 });
    await everythingRestores('folder', repo, backups);
  });
});

/** What Date.now() says in a Node process run with `extra` in its environment, less the true time. */
async function clockOffsetUnder(extra: Record<string, string>): Promise<number> {
  const before = Date.now();
  const stdout = await new Promise<string>((resolve, reject) =>
    execFile(process.execPath, ['-e', 'process.stdout.write(String(Date.now()))'], { env: { ...process.env, ...extra } }, (error, out) => (error ? reject(error) : resolve(out))),
  );
  return Number(stdout) - before;
}

describe('a real clock skew: the engine under libfaketime against RGW, whose clock is true (SPEC 19.6, B = 60 s)', () => {
  const skewed = (offset: string): Record<string, string> => ({ LD_PRELOAD: FAKETIME_LIB, FAKETIME: offset, FAKETIME_NO_CACHE: '1', DONT_FAKE_MONOTONIC: '1' });

  test('faketime moves what Node\'s Date.now() returns (and not the monotonic clock)', async () => {
    const ahead = await clockOffsetUnder(skewed('+5m'));
    expect(ahead).toBeGreaterThan(299_000);
    expect(ahead).toBeLessThan(310_000);
    const behind = await clockOffsetUnder(skewed('-5m'));
    expect(behind).toBeGreaterThan(-301_000);
    expect(behind).toBeLessThan(-290_000);
  });

  test('5 minutes ahead and behind: backup, restore and verify fail with ENGINE_CLOCK_SKEW in one line and write nothing; 20 s ahead and behind works', async () => {
    const repo = `s3://${BUCKET}/skew`;
    await init('s3', repo);
    const source = await image('skew-first', 3);
    const id = await backup('s3', repo, source);
    const before = await keysOf(repo);
    for (const offset of ['+5m', '-5m']) {
      const message = expectFailure(await runEngine(['backup', '--repo', repo, '--source', await image('skew-never', 2), '--json'], { env: env('s3', skewed(offset)) }), 'ENGINE_CLOCK_SKEW');
      expect(message).toMatch(/clock/);
      const target = join(scratch.path, 'skew-never.raw');
      expectFailure(await runEngine(['restore', '--repo', repo, id, '--to', target, '--json'], { env: env('s3', skewed(offset)) }), 'ENGINE_CLOCK_SKEW');
      await expect(stat(target)).rejects.toThrow(/ENOENT/);
      expectFailure(await runEngine(['verify', '--repo', repo, '--json'], { env: env('s3', skewed(offset)) }), 'ENGINE_CLOCK_SKEW');
      expect(await keysOf(repo)).toEqual(before);
    }
    const backups = new Map([[id, source]]);
    for (const offset of ['+20s', '-20s']) {
      const within = await image(`skew-within${offset}`, 2);
      backups.set(await backup('s3', repo, within, skewed(offset)), within);
      await everythingRestores('s3', repo, backups, skewed(offset));
    }
    expect(await leasesOf(repo)).toEqual([]);
  });
});
