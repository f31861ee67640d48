/**
 * Many writers at once on format version 3 (issue 14, item 5; SPEC.md 19.3-19.9): four backup processes at
 * once into one repository, on a folder (one host) and on S3 (the tests' own Ceph RADOS Gateway) from two
 * simulated hosts (each its own ENGINE_CACHE_DIR, so its own host id and index cache), two rounds, the
 * second with a restore, a verify --read-data, a gc (with a forgotten backup's chunks to collect) and a serve
 * (read through by qemu-img) running meanwhile. The images share chunks on purpose:
 * some chunks are in all four, some in two, some in one, and each round brings new ones, written with
 * qemu-io from pattern files so that two writers really race to store the same new chunk.
 *
 * After each round: every committed backup restores byte for byte (cmp), verify --read-data is clean (no
 * chunk a record needs is missing or damaged), no lease is left; the concurrent restore and verify exited
 * cleanly, the restore's and the served export's bytes are right, and gc deleted no chunk a record needs
 * (everything still restores and verifies after it).
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { join } from 'node:path';
import { startRgwCluster, type RgwCluster } from './rgw.js';
import { createBucket, repositoryKeys, v3Env } from './s3-helpers.js';
import { qemuIo } from './qemu.js';
import { collectOutput, exitOf, filesIdentical, parseJson, runEngine, sh, sparseFile, spawnEngine, tempDir, writeRegion, type BackupJson } from './helpers.js';

const MiB = 1024 * 1024;
const BUCKET = 'engine-v3-concurrency';
const WRITERS = 4;
/** Chunks (1 MiB blocks) of each 16 MiB image. */
const IMAGE_MIB = 16;
let cluster: RgwCluster;
let scratch: { path: string; cleanup: () => Promise<void> };

/** A 1 MiB pattern file of random bytes, one per name (qemu-io's `write -s`). */
async function pattern(name: string): Promise<string> {
  const path = join(scratch.path, 'patterns', name);
  await writeRegion(path, 0, MiB, 'random', name);
  return path;
}

/** Writes chunk `n` of `image` with the content named `name` (the same name: the same chunk in every image). */
async function chunkWrites(image: string, chunks: [number, string][]): Promise<void> {
  const commands: string[] = [];
  for (const [n, name] of chunks) commands.push(`write -q -s ${await pattern(name)} ${n * MiB} ${MiB}`);
  await qemuIo(image, commands, 'raw');
}

/**
 * The four images of a round, as files under `dir`. Chunks 0-3 are in all four; 4-5 in image i and i+1; 6-9
 * are image i's own; in round 2, chunks 10-12 of each are new, and 6 is rewritten with content new in the
 * round that image i and i+2 share (two writers of a new chunk at once); the rest stays a hole.
 */
async function roundImages(dir: string, round: number): Promise<string[]> {
  const images: string[] = [];
  for (let i = 0; i < WRITERS; i += 1) {
    const image = join(dir, `image-${i}.raw`);
    const chunks: [number, string][] = [];
    if (round === 1) {
      await sparseFile(image, IMAGE_MIB * MiB);
      for (let n = 0; n < 4; n += 1) chunks.push([n, `all-${n}`]);
      for (let n = 4; n < 6; n += 1) chunks.push([n, `pair-${n === 4 ? i : (i + WRITERS - 1) % WRITERS}`]);
      for (let n = 6; n < 10; n += 1) chunks.push([n, `own-${i}-${n}`]);
    } else {
      for (let n = 10; n < 13; n += 1) chunks.push([n, `round-${round}-${i}-${n}`]);
      chunks.push([6, `round-${round}-shared-${i % 2}`]);
    }
    await chunkWrites(image, chunks);
    // What the backup must restore to: a copy taken now (the image changes in the next round).
    const expected = join(dir, `expected-${round}-${i}.raw`);
    await sh('cp', ['--sparse=always', image, expected]);
    images.push(expected);
  }
  return images;
}

interface Committed {
  id: string;
  image: string;
}

/**
 * `serve` of a backup started now: once it listens, qemu-img reads the whole export and it must equal `image`;
 * then SIGTERM, and the server must exit 0. Resolves as `running` does.
 */
function servedAndRead(repo: string, id: string, image: string, socket: string, copy: string, env: Record<string, string>): { done: Promise<{ code: number | null; stdout: string; stderr: string }> } {
  const child = spawnEngine(['serve', '--repo', repo, id, '--socket', socket, '--json'], env);
  const output = collectOutput(child);
  const done = (async () => {
    try {
      while (!output.stdout().trim().endsWith('}')) {
        if (child.exitCode !== null) return { code: child.exitCode, stdout: output.stdout(), stderr: output.stderr() };
        await new Promise((r) => setTimeout(r, 50));
      }
      const uri = parseJson<{ exports: { uri: string }[] }>(output.stdout()).exports[0]!.uri;
      await sh('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, copy]);
      const same = await filesIdentical(copy, image);
      await sh('rm', ['-f', copy]);
      child.kill('SIGTERM');
      const { code } = await exitOf(child);
      return { code: same ? code : -1, stdout: output.stdout(), stderr: `${output.stderr()}${same ? '' : 'the served export differs from the image'}` };
    } finally {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    }
  })();
  return { done };
}

/** A command started now and checked when it ends: exit 0, stderr without error lines. */
function running(args: string[], env: Record<string, string>): { done: Promise<{ code: number | null; stdout: string; stderr: string }> } {
  const child = spawnEngine(args, env);
  const output = collectOutput(child);
  return { done: exitOf(child).then(({ code }) => ({ code, stdout: output.stdout(), stderr: output.stderr() })) };
}

beforeAll(async () => {
  scratch = await tempDir('engine-v3-concurrency-');
  await sh('mkdir', ['-p', join(scratch.path, 'patterns')]);
  cluster = await startRgwCluster({ memstoreBytes: 512 * MiB });
  await createBucket(cluster, BUCKET);
});

afterAll(async () => {
  await cluster?.stop();
  await scratch?.cleanup();
});

for (const kind of ['folder', 's3'] as const) {
  describe(`${WRITERS} backup processes at once on ${kind === 'folder' ? 'a folder (one host)' : 'S3 (RGW), from two hosts'}`, () => {
    let repo: string;
    let dir: string;
    const committed: Committed[] = [];
    /** Process i's environment: on S3, processes 0-1 are host A and 2-3 host B (their own cache directories and host ids). */
    const envOf = (i: number): Record<string, string> => {
      const cache = kind === 'folder' ? 'cache-folder' : `cache-s3-host-${i < WRITERS / 2 ? 'a' : 'b'}`;
      return kind === 'folder' ? { ENGINE_CACHE_DIR: join(scratch.path, cache) } : v3Env(cluster, scratch.path, cache);
    };

    async function backupsAtOnce(images: string[], during: { what: string; done: Promise<{ code: number | null; stdout: string; stderr: string }>; check?: (stdout: string) => Promise<void> }[]): Promise<void> {
      const backups = images.map((image, i) => running(['backup', '--repo', repo, '--source', image, '--name', `disk-${i}`, '--json'], envOf(i)));
      const results = await Promise.all(backups.map((b) => b.done));
      results.forEach((r, i) => {
        expect(r.code, `backup ${i}: ${r.stderr}`).toBe(0);
        committed.push({ id: parseJson<BackupJson>(r.stdout).id, image: images[i]! });
      });
      for (const other of during) {
        const r = await other.done;
        expect(r.code, `${other.what}: ${r.stderr} ${r.stdout.slice(0, 3000)}`).toBe(0);
        await other.check?.(r.stdout);
      }
    }

    async function expectAllRestore(host: number): Promise<void> {
      // Four restores at a time: readers at once are part of what is under test.
      for (let at = 0; at < committed.length; at += WRITERS) {
        await Promise.all(
          committed.slice(at, at + WRITERS).map(async ({ id, image }) => {
            const target = join(dir, `restored-${id}.raw`);
            const r = await runEngine(['restore', '--repo', repo, id, '--to', target], { env: envOf(host) });
            expect(r.code, r.stderr).toBe(0);
            expect(await filesIdentical(target, image), `backup ${id} restored from host ${host}`).toBe(true);
            await sh('rm', ['-f', target]);
          }),
        );
      }
    }

    async function expectVerifiesClean(): Promise<void> {
      const r = await runEngine(['verify', '--repo', repo, '--read-data', '--json'], { env: envOf(WRITERS - 1) });
      expect(r.code, r.stderr).toBe(0);
      const report = parseJson<{ ok: boolean; backups: number; problems: unknown[] }>(r.stdout);
      expect(report.problems).toEqual([]);
      expect(report).toMatchObject({ ok: true, backups: committed.length });
    }

    const leasesLeft = async (): Promise<string[]> => (await repositoryKeys(cluster, repo)).filter((k) => k.startsWith('leases/'));

    beforeAll(async () => {
      dir = join(scratch.path, kind);
      await sh('mkdir', ['-p', dir]);
      repo = kind === 'folder' ? join(dir, 'repo') : `s3://${BUCKET}/${kind}`;
      const init = await runEngine(['init', '--format', '3', repo], { env: envOf(0) });
      expect(init.code, init.stderr).toBe(0);
    });

    test('round 1: four new disks sharing chunks, backed up at once; each restores byte for byte, verify --read-data clean', async () => {
      const images = await roundImages(dir, 1);
      await backupsAtOnce(images, []);
      await expectAllRestore(0);
      await expectVerifiesClean();
      expect(await leasesLeft()).toEqual([]);
    });

    test('round 2: new chunks in each (some new in two at once), four backups at once while a restore, a verify --read-data, a gc and a serve run; everything committed restores on both hosts', async () => {
      // Garbage for the gc that runs during the round: one backup of round 1 forgotten (its own chunks die).
      const doomed = committed.splice(1, 1)[0]!;
      const forgot = await runEngine(['forget', '--repo', repo, doomed.id], { env: envOf(0) });
      expect(forgot.code, forgot.stderr).toBe(0);
      const images = await roundImages(dir, 2);
      const earlier = committed[0]!;
      const served = committed[1]!;
      const restoreTarget = join(dir, 'restored-during.raw');
      const reader = WRITERS - 1; // on S3: the other host than the first backup's
      const during = [
        { what: 'restore during the backups', done: running(['restore', '--repo', repo, earlier.id, '--to', restoreTarget], envOf(reader)).done, check: async () => expect(await filesIdentical(restoreTarget, earlier.image)).toBe(true) },
        {
          what: 'verify --read-data during the backups',
          done: running(['verify', '--repo', repo, '--read-data', '--json'], envOf(reader)).done,
          check: async (stdout: string) => expect(parseJson<{ problems: unknown[] }>(stdout).problems).toEqual([]),
        },
        {
          what: 'gc during the backups',
          done: running(['gc', '--repo', repo, '--json'], envOf(0)).done,
          // It did collect: the forgotten backup's own chunks (4 of them) are gone from the index.
          check: async (stdout: string) => expect(parseJson<{ chunks: { removed: number } }>(stdout).chunks.removed).toBeGreaterThanOrEqual(4),
        },
        { what: 'serve during the backups, read whole by qemu-img', done: servedAndRead(repo, served.id, served.image, join(dir, 'serve.sock'), join(dir, 'served.raw'), envOf(reader)).done },
      ];
      await backupsAtOnce(images, during);
      await expectAllRestore(WRITERS - 1);
      await expectVerifiesClean();
      expect(await leasesLeft()).toEqual([]);
    });
  });
}
