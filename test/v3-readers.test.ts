/**
 * The readers on format version 3 (SPEC.md 19.9), on a folder and on S3 (the tests' own Ceph RADOS Gateway):
 * `serve` read by qemu-img (convert, then cmp; compare against the source) while a backup runs beside it,
 * its shared lease in the store for as long as it serves and gone once it has exited on SIGINT/SIGTERM; a lease
 * removed behind it (`unlock --force`) ends serving with ENGINE_LEASE_LOST; `mount` of an ext4 disk, its
 * lease held by the background server and removed by `umount`, nothing left behind.
 *
 * The repositories' lease timing is shortened (T = 12 s, B = 2 s: refreshed every 4 s) so that a lost lease
 * is seen within seconds, as it would be within T/3 = 100 s with the defaults.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { chmod, mkdir, readFile, readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execFile, type ChildProcess } from 'node:child_process';
import { startRgwCluster, type RgwCluster } from './rgw.js';
import { createBucket, v3Env, withRgwStorage } from './s3-helpers.js';
import { qemuImgCompare } from './qemu.js';
import { collectOutput, ENGINE_BIN, exitOf, filesIdentical, parseJson, runEngine, sh, sparseFile, spawnEngine, tempDir, waitFor, withoutProgress, writeRegion, type BackupJson } from './helpers.js';

const MiB = 1024 * 1024;
const BUCKET = 'engine-v3-readers';
let cluster: RgwCluster;
let scratch: { path: string; cleanup: () => Promise<void> };
let image: string;
let small: string;

function env(kind: 'folder' | 's3'): Record<string, string> {
  return {
    ...v3Env(cluster, scratch.path, `cache-${kind}`),
    ENGINE_RUN_DIR: join(scratch.path, `run-${kind}`),
  };
}

beforeAll(async () => {
  scratch = await tempDir('engine-v3-readers-');
  cluster = await startRgwCluster({ memstoreBytes: 512 * MiB });
  await createBucket(cluster, BUCKET);
  // Sparse, with a short last block (of whole sectors: qemu rounds a size up to them). Offsets past 2^32
  // are served.test's: the storage under the server changes nothing there, and a 4 GiB file source costs
  // a read of every hole.
  image = join(scratch.path, 'disk.raw');
  await writeRegion(image, 0, 5 * MiB, 'random', 'head');
  await writeRegion(image, 40 * MiB, 3 * MiB, 'random', 'middle');
  await writeRegion(image, 64 * MiB, 4096, 'text');
  small = join(scratch.path, 'small.raw');
  await writeRegion(small, 0, 3 * MiB, 'random', 'beside');
});

afterAll(async () => {
  await cluster?.stop();
  await scratch?.cleanup();
});

type Lease = { key: string; lease: { command: string; kind: string; expires: string; pid: number } };

/** The lease objects of the repository, with their content. */
async function leasesOf(repo: string): Promise<Lease[]> {
  if (!repo.startsWith('s3://')) {
    const found: Lease[] = [];
    for (const name of await readdir(join(repo, 'leases')).catch(() => [] as string[])) {
      // One released between the listing and the read is gone, not an error.
      const text = await readFile(join(repo, 'leases', name), 'utf8').catch(() => undefined);
      if (name.endsWith('.json') && text !== undefined) found.push({ key: `leases/${name}`, lease: JSON.parse(text) });
    }
    return found;
  }
  return withRgwStorage(cluster, repo, async (storage) => {
    const found: Lease[] = [];
    for await (const info of storage.list('leases/')) {
      const bytes = await storage.get(info.key).catch(() => undefined);
      if (bytes !== undefined) found.push({ key: info.key, lease: JSON.parse(bytes.toString('utf8')) });
    }
    return found;
  });
}

async function packsOf(repo: string): Promise<{ key: string; size: number }[]> {
  if (!repo.startsWith('s3://')) {
    const packs: { key: string; size: number }[] = [];
    for (const sub of await readdir(join(repo, 'packs'))) {
      for (const name of await readdir(join(repo, 'packs', sub))) packs.push({ key: `packs/${sub}/${name}`, size: (await stat(join(repo, 'packs', sub, name))).size });
    }
    return packs;
  }
  return withRgwStorage(cluster, repo, async (storage) => {
    const packs: { key: string; size: number }[] = [];
    for await (const info of storage.list('packs/')) packs.push({ key: info.key, size: info.size });
    return packs;
  });
}

/** T = 12 s, B = 2 s in the repository's config (a folder's file, or the object on S3). */
async function shortenLeases(repo: string): Promise<void> {
  const edit = (bytes: Buffer): Buffer => {
    const config = JSON.parse(bytes.toString('utf8')) as { leases: { timeMs: number; skewBoundMs: number } };
    config.leases = { timeMs: 12_000, skewBoundMs: 2_000 };
    return Buffer.from(JSON.stringify(config));
  };
  if (!repo.startsWith('s3://')) {
    await chmod(join(repo, 'config'), 0o600);
    await writeFile(join(repo, 'config'), edit(await readFile(join(repo, 'config'))));
    await chmod(join(repo, 'config'), 0o400);
    return;
  }
  await withRgwStorage(cluster, repo, async (storage) => storage.put('config', edit(await storage.get('config'))));
}

interface ServeJson {
  backup: string;
  readerToken: string | null;
  lease: string | null;
  exports: { name: string; size: number; uri: string }[];
}

/** Starts `engine serve --json` and waits for its document. */
async function startServe(repo: string, id: string, kind: 'folder' | 's3', socket: string): Promise<{ child: ChildProcess; out: ReturnType<typeof collectOutput>; ready: ServeJson }> {
  const child = spawnEngine(['serve', '--repo', repo, id, '--socket', socket, '--json'], env(kind));
  const out = collectOutput(child);
  while (!out.stdout().trim().endsWith('}')) {
    if (child.exitCode !== null) throw new Error(`serve exited (${child.exitCode}): ${out.stderr()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return { child, out, ready: parseJson<ServeJson>(out.stdout()) };
}

for (const kind of ['folder', 's3'] as const) {
  describe(`readers on version 3, ${kind === 'folder' ? 'a folder' : 'S3 (RGW)'}`, () => {
    let repo: string;
    let id: string;

    beforeAll(async () => {
      repo = kind === 'folder' ? join(scratch.path, 'repo') : `s3://${BUCKET}/repo`;
      const init = await runEngine(['init', '--format', '3', repo], { env: env(kind) });
      expect(init.code, init.stderr).toBe(0);
      await shortenLeases(repo);
      const backup = await runEngine(['backup', '--repo', repo, '--source', image, '--disk-name', 'os', '--json'], { env: env(kind) });
      expect(backup.code, backup.stderr).toBe(0);
      id = parseJson<BackupJson>(backup.stdout).id;
    });

    test('serve holds a shared lease while qemu-img reads the export byte for byte and a backup runs beside it; the signal releases it before the server exits', async () => {
      const socket = join(scratch.path, `serve-${kind}.sock`);
      const { child, out, ready } = await startServe(repo, id, kind, socket);
      try {
        expect(ready.readerToken).toBeNull();
        expect(ready.lease).toMatch(/^leases\/[0-9a-f]{32}\.json$/);
        const held = await leasesOf(repo);
        expect(held.map((l) => [l.key, l.lease.kind, l.lease.command, l.lease.pid])).toEqual([[ready.lease, 'shared', 'serve', child.pid]]);
        const uri = ready.exports[0]!.uri;
        expect(ready.exports.map((e) => [e.name, e.size])).toEqual([['os', 64 * MiB + 4096]]);
        const copy = join(scratch.path, `served-${kind}.raw`);
        await sh('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, copy]);
        expect(await filesIdentical(copy, image)).toBe(true);
        expect(await qemuImgCompare(image, 'raw', uri, 'raw')).toBe(true);
        // A shared lease: a backup goes on beside the server, and restores.
        const beside = await runEngine(['backup', '--repo', repo, '--source', small, '--json'], { env: env(kind) });
        expect(beside.code, beside.stderr).toBe(0);
        // Refreshed (every T/3 = 4 s) and still the server's.
        // Synchronised on the refresh itself, not on 4.5 s (a loaded machine refreshes late).
        const first = held[0]!.lease.expires;
        let later = await leasesOf(repo);
        await waitFor('the lease is refreshed', async () => (later = await leasesOf(repo)).some((l) => l.lease.expires !== first), { child, everyMs: 200 });
        expect(later.map((l) => l.key)).toEqual([ready.lease]);
        expect(Date.parse(later[0]!.lease.expires)).toBeGreaterThan(Date.parse(first));
      } finally {
        // Synchronised on the exit, not on a clock (a loaded machine took 1.8 s): the server releases its lease
        // before it exits, so none is left once it has.
        child.kill(kind === 'folder' ? 'SIGINT' : 'SIGTERM');
        const exit = await exitOf(child);
        expect([exit.code, out.stderr()]).toEqual([0, '']);
        expect(await leasesOf(repo)).toEqual([]);
      }
      await expect(readFile(socket)).rejects.toThrow(/ENOENT/);
    });

    test('a lease removed behind the server (unlock --force) ends serving with ENGINE_LEASE_LOST, in one line; clients are refused from then on', async () => {
      const socket = join(scratch.path, `stolen-${kind}.sock`);
      const { child, out, ready } = await startServe(repo, id, kind, socket);
      const exited = exitOf(child);
      const size = await sh('nbdinfo', ['--size', ready.exports[0]!.uri]);
      expect(Number(size.trim())).toBe(ready.exports[0]!.size);
      const forced = await runEngine(['unlock', '--repo', repo, '--force'], { env: env(kind) });
      expect(forced.code, forced.stderr).toBe(0);
      expect(forced.stdout).toContain(ready.lease!);
      // Found at the next refresh (every T/3 = 4 s): synchronised on the exit, which the test's timeout bounds.
      expect(await exited).toEqual({ code: 1, signal: null });
      // --json: nothing on stderr; the error document follows the ready one, with its stable code, in one line.
      expect(out.stderr()).toBe('');
      const error = parseJson<{ error: { code: string; message: string } }>(out.stdout().slice(out.stdout().indexOf('}\n{') + 2));
      expect(error.error.code).toBe('ENGINE_LEASE_LOST');
      expect(error.error.message).toBe(`the lease ${ready.lease} on ${repo} was lost: it was removed by another process; serving stopped, since a gc may now delete the packs it reads (start it again to serve on)`);
      await expect(sh('nbdinfo', ['--size', ready.exports[0]!.uri])).rejects.toThrow();
      expect(await leasesOf(repo)).toEqual([]);
    });

    test('mount of an ext4 disk: the file reads back, the server holds the lease as mount, umount removes it and leaves nothing', async () => {
      const content = join(scratch.path, `content-${kind}`);
      await mkdir(join(content, 'etc'), { recursive: true });
      await writeFile(join(content, 'etc', 'tuesday.txt'), `the file we want back from ${kind}\n`);
      await writeRegion(join(content, 'big.bin'), 0, 2 * MiB + 17, 'random', `big-${kind}`);
      const fs = join(scratch.path, `ext4-${kind}.raw`);
      await sh('mke2fs', ['-q', '-t', 'ext4', '-d', content, fs, '48M']);
      const backup = await runEngine(['backup', '--repo', repo, '--source', fs, '--disk-name', 'root', '--json'], { env: env(kind) });
      expect(backup.code, backup.stderr).toBe(0);
      const fsId = parseJson<BackupJson>(backup.stdout).id;
      const mountDir = join(scratch.path, `mnt-${kind}`);
      const mounted = await runEngine(['mount', '--repo', repo, fsId.slice(0, 8), mountDir, '--json'], { env: env(kind) });
      expect(mounted.code, mounted.stderr).toBe(0);
      const result = parseJson<{ serverPid: number; readerToken: string | null; lease: string | null; filesystems: { type: string; path: string }[] }>(mounted.stdout);
      try {
        expect(result.readerToken).toBeNull();
        expect(result.filesystems.map((f) => [f.type, f.path])).toEqual([['ext4', join(mountDir, 'root')]]);
        expect(await readFile(join(mountDir, 'root', 'etc', 'tuesday.txt'), 'utf8')).toBe(`the file we want back from ${kind}\n`);
        expect(await filesIdentical(join(mountDir, 'root', 'big.bin'), join(content, 'big.bin'))).toBe(true);
        expect((await leasesOf(repo)).map((l) => [l.key, l.lease.command, l.lease.pid])).toEqual([[result.lease, 'mount', result.serverPid]]);
      } finally {
        const unmounted = await runEngine(['umount', mountDir, '--json'], { env: env(kind) });
        expect(unmounted.code, unmounted.stderr).toBe(0);
        expect(parseJson<{ serverStopped: boolean }>(unmounted.stdout).serverStopped).toBe(true);
      }
      expect(await readdir(mountDir)).toEqual([]);
      expect(await leasesOf(repo)).toEqual([]);
      expect((await readFile('/proc/mounts', 'utf8')).includes(mountDir)).toBe(false);
      expect(await readdir(join(env(kind).ENGINE_RUN_DIR!, 'mounts')).catch(() => [])).toEqual([]);
    });

    test('umount after the background server was killed (kill -9) removes the lease it left', async () => {
      const mountDir = join(scratch.path, `mnt-killed-${kind}`);
      const fs = join(scratch.path, `ext4-${kind}.raw`);
      const backup = await runEngine(['backup', '--repo', repo, '--source', fs, '--disk-name', 'root', '--json'], { env: env(kind) });
      expect(backup.code, backup.stderr).toBe(0);
      const mounted = await runEngine(['mount', '--repo', repo, parseJson<BackupJson>(backup.stdout).id, mountDir, '--json'], { env: env(kind) });
      expect(mounted.code, mounted.stderr).toBe(0);
      const result = parseJson<{ serverPid: number; lease: string }>(mounted.stdout);
      process.kill(result.serverPid, 'SIGKILL');
      expect((await leasesOf(repo)).map((l) => l.key)).toEqual([result.lease]);
      const unmounted = await runEngine(['umount', mountDir, '--json'], { env: env(kind) });
      expect(unmounted.code, unmounted.stderr).toBe(0);
      expect(parseJson<{ serverStopped: boolean }>(unmounted.stdout).serverStopped).toBe(false);
      expect(await leasesOf(repo)).toEqual([]);
    });

    test('a pack cut short behind the engine: the workers reading its frames (from S3 through their own client) name it; restore fails, exit 4', async () => {
      // A backup of data of its own; its data pack (not the small one of map pages) cut to 4 KiB.
      const before = new Set((await packsOf(repo)).map((p) => p.key));
      const own = join(scratch.path, `own-${kind}.raw`);
      await writeRegion(own, 0, 4 * MiB, 'random', `own-${kind}`);
      const backup = await runEngine(['backup', '--repo', repo, '--source', own, '--json'], { env: env(kind) });
      expect(backup.code, backup.stderr).toBe(0);
      const ownId = parseJson<BackupJson>(backup.stdout).id;
      const cut = (await packsOf(repo)).filter((p) => !before.has(p.key)).sort((a, b) => b.size - a.size)[0]!.key;
      if (kind === 'folder') {
        await chmod(join(repo, cut), 0o600);
        await writeFile(join(repo, cut), (await readFile(join(repo, cut))).subarray(0, 4096));
      } else {
        await withRgwStorage(cluster, repo, async (storage) => storage.put(cut, (await storage.get(cut)).subarray(0, 4096)));
      }
      const target = join(scratch.path, `cut-${kind}.raw`);
      const r = await runEngine(['restore', '--repo', repo, ownId, '--to', target], { env: env(kind) });
      expect(r.code, r.stderr).toBe(4);
      expect(r.stderr).toContain(cut.split('/')[2]!);
      expect(r.stderr).toMatch(/pack is truncated/);
      // One line besides progress (a line every 5 s when stderr is not a terminal: a loaded machine reaches it).
      expect(withoutProgress(r.stderr).trim().split('\n')).toHaveLength(1);
    });
  });
}

describe('restore from S3 of a large sparse disk', () => {
  test('5 GiB with data across and past 2^32: byte for byte, its zero blocks left as holes, peak RSS within 300 MiB', async () => {
    const big = join(scratch.path, 'big.raw');
    const size = 5 * 1024 * MiB + 12345;
    await sparseFile(big, size);
    await writeRegion(big, 0, 3 * MiB, 'random', 'big-head');
    await writeRegion(big, 2 ** 32 - 2 * MiB, 4 * MiB, 'random', 'big-across'); // blocks on both sides of 2^32
    await writeRegion(big, 4200 * MiB, 2 * MiB, 'random', 'big-past');
    await writeRegion(big, 5 * 1024 * MiB, 12345, 'text'); // the short last block
    const repo = `s3://${BUCKET}/big`;
    expect((await runEngine(['init', '--format', '3', repo], { env: env('s3') })).code).toBe(0);
    const backup = await runEngine(['backup', '--repo', repo, '--source', big, '--json'], { env: env('s3') });
    expect(backup.code, backup.stderr).toBe(0);
    const id = parseJson<BackupJson>(backup.stdout).id;
    const out = join(scratch.path, 'big-restored.raw');
    const rss = join(scratch.path, 'big-restore.rss');
    // GNU time's %M: the peak resident set of the restore process, in KiB.
    await new Promise<void>((resolve, reject) => {
      execFile('/usr/bin/time', ['-f', '%M', '-o', rss, process.execPath, ENGINE_BIN, 'restore', '--repo', repo, id, '--to', out], { env: { ...process.env, ...env('s3') } }, (error, _stdout, stderr) => (error ? reject(new Error(stderr)) : resolve()));
    });
    expect(await filesIdentical(out, big)).toBe(true);
    // 9 MiB and a bit of data: a restore that wrote its zero blocks would have allocated 5 GiB.
    expect((await stat(out)).blocks * 512).toBeLessThan(16 * MiB);
    expect(Number((await readFile(rss, 'utf8')).trim().split('\n').pop()) / 1024).toBeLessThan(300);
  });
});
