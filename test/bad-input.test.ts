/**
 * Bad input gets a clear error and loses nothing: missing and changing sources, things that are not
 * repositories, newer formats, damaged packs and records, a lost index, locks.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { spawn } from 'node:child_process';
import { hostname } from 'node:os';
import { mkdir, readFile, readdir, rm, stat, truncate, writeFile, open } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { backup, EngineError, KIND_DATA, scanPack, initRepository } from '../dist/engine/index.js';
import { processIdentity } from '../dist/repo-format/process-alive.js';
import { folderKeys } from './s3-helpers.js';
import { exitOf, filesIdentical, parseJson, runEngine, sparseFile, tempDir, writeRegion, type BackupJson, withoutProgress } from './helpers.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir());
});
afterAll(async () => {
  await cleanup();
});

/**
 * A version-1 repository: these cases look into what versions 1 and 2 keep in the folder (the lock, the
 * LevelDB index/, the 256 packs/ folders made by init, a newer version's refusal); version 3's bad input
 * (packs, records and segments deleted or cut short, leases, clocks) is test/v3-faults, v3-gaps, v3-pack-loss.
 */
async function freshRepo(name: string): Promise<string> {
  const repo = join(dir, name);
  const result = await runEngine(['init', '--format', '1', repo]);
  expect(result.code).toBe(0);
  return repo;
}

async function randomImage(name: string, size: number): Promise<string> {
  const image = join(dir, name);
  await sparseFile(image, size);
  await writeRegion(image, 0, size, 'random', name);
  return image;
}

async function backupOk(repo: string, image: string): Promise<BackupJson> {
  const result = await runEngine(['backup', '--repo', repo, '--source', image, '--json']);
  expect(withoutProgress(result.stderr)).toBe('');
  expect(result.code).toBe(0);
  return parseJson<BackupJson>(result.stdout);
}

async function packIds(repo: string): Promise<string[]> {
  const ids: string[] = [];
  for (const sub of await readdir(join(repo, 'packs'))) ids.push(...(await readdir(join(repo, 'packs', sub))));
  return ids;
}

/** A fresh folder repository of the given format (the source cases run on format 1 and on format 3). */
async function freshRepoOf(format: 1 | 3, name: string): Promise<string> {
  const repo = join(dir, `${name}-v${format}`);
  const result = await runEngine(['init', '--format', String(format), repo]);
  expect(result.code, result.stderr).toBe(0);
  return repo;
}

for (const format of [1, 3] as const) {
  describe(`sources (format ${format} folder)`, () => {
    test('a missing source fails before anything is written', async () => {
      const repo = await freshRepoOf(format, 'repo-missing-source');
      const before = await folderKeys(repo);
      const result = await runEngine(['backup', '--repo', repo, '--source', join(dir, 'no-such.img')]);
      expect(result.code).toBe(1);
      expect(result.stderr.trim()).toBe(`engine: cannot read source ${join(dir, 'no-such.img')}: ENOENT: no such file or directory, open '${join(dir, 'no-such.img')}'`);
      expect(await folderKeys(join(repo, 'backups'))).toEqual([]);
      expect(await folderKeys(join(repo, 'packs'))).toEqual([]);
      // Format 3: no segment, no lease left behind either: the store holds what init wrote, nothing more.
      if (format === 3) expect(await folderKeys(repo)).toEqual(before);
    });

    test('a source that is neither a file nor a block device is refused', async () => {
      const repo = await freshRepoOf(format, 'repo-dir-source');
      const result = await runEngine(['backup', '--repo', repo, '--source', dir]);
      expect(result.code).toBe(1);
      expect(result.stderr).toContain('not a regular file or a block device');
      expect(await folderKeys(join(repo, 'backups'))).toEqual([]);
    });

    test('a source that shrinks while it is read fails the backup and commits nothing', async () => {
      const repo = await freshRepoOf(format, 'repo-shrink');
      const image = await randomImage(`shrinking-v${format}.img`, 64 * MiB);
      let truncated = false;
      const error = await backup({
        repo,
        from: { kind: 'disks', disks: [{ kind: 'raw', path: image }] },
        onProgress: (p) => {
          if (!truncated && p.bytesDone >= 8 * MiB) {
            truncated = true;
            void truncate(image, 20 * MiB);
          }
        },
      }).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(truncated).toBe(true);
      expect(error).toBeInstanceOf(EngineError);
      expect((error as EngineError).code).toBe('ENGINE_SOURCE_CHANGED');
      expect((error as EngineError).message).toMatch(/changed while it was read: it ended at offset \d+, but had 67108864 bytes/);
      expect(await folderKeys(join(repo, 'backups'))).toEqual([]);
      // Format 3: the run's lease is gone (what it uploaded is named by no record: garbage for gc).
      if (format === 3) expect(await folderKeys(join(repo, 'leases'))).toEqual([]);
      const verify = await runEngine(['verify', '--repo', repo, '--read-data']);
      expect(verify.code, verify.stdout + verify.stderr).toBe(0);
      const next = await runEngine(['backup', '--repo', repo, '--source', image, '--json']); // the next backup succeeds
      expect(next.code, next.stderr).toBe(0);
      const restored = join(dir, `shrunk-v${format}.restored`);
      const restore = await runEngine(['restore', '--repo', repo, parseJson<BackupJson>(next.stdout).id, '--to', restored]);
      expect(restore.code, restore.stderr).toBe(0);
      expect(await filesIdentical(restored, image)).toBe(true);
      await rm(restored);
    });
  });
}

describe('repositories', () => {
  test('a path that is not a repository', async () => {
    const result = await runEngine(['list', '--repo', dir]);
    expect(result.code).toBe(5);
    expect(result.stderr.trim()).toBe(`engine: ${dir} is not an engine repository: it has no config file`);
    const notJson = join(dir, 'not-a-repo');
    await mkdir(notJson);
    await writeFile(join(notJson, 'config'), 'hello');
    const second = await runEngine(['verify', '--repo', notJson]);
    expect(second.code).toBe(5);
    expect(second.stderr).toContain('config is not JSON');
    const init = await runEngine(['init', notJson]);
    expect(init.code).toBe(1);
    expect(init.stderr).toContain('already holds a repository or other files');
  });

  test('a repository written by a newer format version is refused, untouched', async () => {
    const repo = await freshRepo('repo-newer');
    const config = JSON.parse(await readFile(join(repo, 'config'), 'utf8')) as Record<string, unknown>;
    config.version = 2;
    await writeFile(join(repo, 'config'), JSON.stringify(config));
    for (const args of [['list'], ['backup', '--source', join(dir, 'x')], ['verify']]) {
      const result = await runEngine([...args, '--repo', repo]);
      expect(result.code).toBe(5);
      expect(result.stderr).toContain(`repository ${repo} has format version 2; this engine reads versions up to 1: upgrade the engine`);
    }
    await expect(stat(join(repo, 'lock'))).rejects.toThrow();
  });

  test('the repository comes from ENGINE_REPO when --repo is absent', async () => {
    const repo = await freshRepo('repo-env');
    const result = await runEngine(['list', '--json'], { env: { ENGINE_REPO: repo } });
    expect(result.code).toBe(0);
    expect(parseJson<{ backups: unknown[] }>(result.stdout).backups).toEqual([]);
  });
});

describe('damage', () => {
  test('a corrupt frame: restore fails naming backup, disk and offset; verify --read-data reports it', async () => {
    const repo = await freshRepo('repo-corrupt');
    const image = await randomImage('corrupt.img', 12 * MiB);
    const good = await backupOk(repo, image);
    // Damage one data frame's payload.
    let damagedId = '';
    for (const packId of await packIds(repo)) {
      const scan = await scanPack(repo, packId);
      const frame = scan.frames.find((f) => f.header.kind === KIND_DATA);
      if (!frame) continue;
      damagedId = frame.header.id.toString('hex');
      const path = join(repo, 'packs', packId.slice(0, 2), packId);
      const handle = await open(path, 'r+');
      const byte = Buffer.alloc(1);
      await handle.read(byte, 0, 1, frame.offset + 48 + 1000);
      byte[0] = byte[0]! ^ 0xff;
      await handle.write(byte, 0, 1, frame.offset + 48 + 1000);
      await handle.close();
      break;
    }
    // Where that chunk sits in the disk: the block whose SHA-256 is the chunk id.
    const bytes = await readFile(image);
    let diskOffset = -1;
    for (let at = 0; at < bytes.length; at += MiB) {
      if (createHash('sha256').update(bytes.subarray(at, at + MiB)).digest('hex') === damagedId) diskOffset = at;
    }
    expect(diskOffset).toBeGreaterThanOrEqual(0);
    const target = join(dir, 'corrupt.restored');
    const restore = await runEngine(['restore', '--repo', repo, good.id, '--to', target]);
    expect(restore.code).toBe(4);
    expect(restore.stderr).toContain(`backup ${good.id}, disk corrupt.img, offset ${diskOffset}: chunk ${damagedId.slice(0, 16)}`);
    expect(restore.stderr).toContain('checksum mismatch');
    await expect(stat(target)).rejects.toThrow(); // a failed restore leaves no half-written new file
    const verify = await runEngine(['verify', '--repo', repo, '--read-data', '--json']);
    expect(verify.code).toBe(4);
    const report = parseJson<{ ok: boolean; problems: { code: string; backup?: string; disk?: string; offset?: number; blob?: string }[] }>(verify.stdout);
    expect(report.ok).toBe(false);
    expect(report.problems.find((p) => p.code === 'FRAME_DAMAGED')?.blob).toBe(damagedId);
    expect(report.problems).toContainEqual(expect.objectContaining({ code: 'CHUNK_DAMAGED', backup: good.id, disk: 'corrupt.img', offset: diskOffset, blob: damagedId }));
  });

  test('a truncated pack is reported by verify and by restore', async () => {
    const repo = await freshRepo('repo-truncated');
    const image = await randomImage('truncated.img', 6 * MiB);
    const good = await backupOk(repo, image);
    let truncatedPack = '';
    for (const packId of await packIds(repo)) {
      const scan = await scanPack(repo, packId);
      if (scan.frames.some((f) => f.header.kind === KIND_DATA)) {
        truncatedPack = packId;
        await truncate(join(repo, 'packs', packId.slice(0, 2), packId), Math.floor(scan.size / 2));
      }
    }
    const verify = await runEngine(['verify', '--repo', repo]);
    expect(verify.code).toBe(4);
    expect(verify.stdout).toMatch(new RegExp(`PACK_DAMAGED: pack ${truncatedPack} is damaged at offset \\d+: frame of \\d+ bytes runs past the end of the pack`));
    // Every chunk the cut took away is reported against the backup, disk and offset that need it.
    const report = parseJson<{ problems: { code: string; backup?: string; disk?: string; offset?: number }[] }>(
      (await runEngine(['verify', '--repo', repo, '--json'])).stdout,
    );
    const lost = report.problems.filter((p) => p.code === 'CHUNK_DAMAGED');
    expect(lost.length).toBeGreaterThan(0);
    for (const p of lost) {
      expect(p).toMatchObject({ backup: good.id, disk: 'truncated.img' });
      expect(p.offset! % MiB).toBe(0);
    }
    const restore = await runEngine(['restore', '--repo', repo, good.id, '--to', join(dir, 'truncated.restored')]);
    expect(restore.code).toBe(4);
    expect(restore.stderr).toMatch(new RegExp(`backup ${good.id}, disk truncated.img, offset \\d+: .* in pack ${truncatedPack} .*(truncated|runs past|checksum)`));
  });

  test('a damaged backup record is listed as damaged and fails verify; the others stay usable', async () => {
    const repo = await freshRepo('repo-record');
    const image = await randomImage('record.img', 2 * MiB);
    const a = await backupOk(repo, image);
    const b = await backupOk(repo, image);
    await writeFile(join(repo, 'backups', b.id), '{"version": 1, "id": ');
    const list = await runEngine(['list', '--repo', repo, '--json']);
    const listed = parseJson<{ backups: { id: string }[]; damaged: { id: string; message: string }[] }>(list.stdout);
    expect(listed.backups.map((x) => x.id)).toEqual([a.id]);
    expect(listed.damaged).toEqual([{ id: b.id, message: `backup record ${b.id} is damaged: not valid JSON` }]);
    const verify = await runEngine(['verify', '--repo', repo]);
    expect(verify.code).toBe(4);
    expect(verify.stdout).toContain(`RECORD_DAMAGED: backup record ${b.id} is damaged: not valid JSON`);
    const target = join(dir, 'record.restored');
    expect((await runEngine(['restore', '--repo', repo, a.id, '--to', target])).code).toBe(0);
    expect(await filesIdentical(image, target)).toBe(true);
  });

  test('a record whose disk name would escape the restore directory is refused as damaged', async () => {
    const repo = await freshRepo('repo-escape');
    const image = await randomImage('escape.img', MiB);
    const made = await backupOk(repo, image);
    const path = join(repo, 'backups', made.id);
    const record = JSON.parse(await readFile(path, 'utf8')) as { disks: { name: string }[] };
    record.disks[0]!.name = '../../escaped';
    await writeFile(path, JSON.stringify(record));
    const restore = await runEngine(['restore', '--repo', repo, made.id, '--to', join(dir, 'escape-dir')]);
    expect(restore.code).toBe(4);
    expect(restore.stderr).toContain(`backup record ${made.id} is damaged: disk name "../../escaped" is not allowed`);
    await expect(stat(join(dir, 'escaped'))).rejects.toThrow();
  });

  test('a lost index is rebuilt from the packs; every backup still restores', async () => {
    const repo = await freshRepo('repo-lost-index');
    const image = await randomImage('lost-index.img', 10 * MiB + 3);
    const good = await backupOk(repo, image);
    await rm(join(repo, 'index'), { recursive: true });
    const target = join(dir, 'lost-index.restored');
    const restore = await runEngine(['restore', '--repo', repo, good.id, '--to', target]);
    expect(restore.code).toBe(0);
    expect(await filesIdentical(image, target)).toBe(true);
    const again = await runEngine(['backup', '--repo', repo, '--source', image, '--json']);
    expect(parseJson<BackupJson>(again.stdout).disks[0]!.blocksNew).toBe(0); // dedupe works against the rebuilt index
    expect((await runEngine(['verify', '--repo', repo, '--read-data'])).code).toBe(0);
  });
});

describe('locks', () => {
  test('a live lock refuses a second writer and names the holder', async () => {
    const repo = await freshRepo('repo-live-lock');
    const image = await randomImage('live-lock.img', MiB);
    const holder = spawn('sleep', ['30']);
    try {
      const since = new Date().toISOString();
      await writeFile(join(repo, 'lock'), JSON.stringify({ pid: holder.pid, hostname: hostname(), since, command: 'backup', identity: processIdentity(holder.pid!) }));
      const result = await runEngine(['backup', '--repo', repo, '--source', image]);
      expect(result.code).toBe(3);
      expect(result.stderr.trim()).toBe(`engine: repository ${repo} is locked by pid ${holder.pid} on host ${hostname()} since ${since} (backup); that process is running: wait for it to finish`);
      // Reading the catalogue needs no lock.
      expect((await runEngine(['list', '--repo', repo])).code).toBe(0);
    } finally {
      holder.kill();
      await exitOf(holder);
    }
  });

  test('a lock held on another host is never broken automatically', async () => {
    const repo = await freshRepo('repo-remote-lock');
    const image = await randomImage('remote-lock.img', MiB);
    await writeFile(join(repo, 'lock'), JSON.stringify({ pid: 1, hostname: 'other-host.example', since: '2026-01-01T00:00:00.000Z', command: 'backup' }));
    const result = await runEngine(['backup', '--repo', repo, '--source', image]);
    expect(result.code).toBe(3);
    expect(result.stderr).toContain('locked by pid 1 on host other-host.example since 2026-01-01T00:00:00.000Z');
  });

  test('a stale lock of a dead process on this host is broken, with a notice', async () => {
    const repo = await freshRepo('repo-stale-lock');
    const image = await randomImage('stale-lock.img', MiB);
    const dead = spawn(process.execPath, ['-e', '']);
    await exitOf(dead);
    await writeFile(join(repo, 'lock'), JSON.stringify({ pid: dead.pid, hostname: hostname(), since: '2026-01-01T00:00:00.000Z', command: 'backup' }));
    const result = await runEngine(['backup', '--repo', repo, '--source', image]);
    expect(result.code).toBe(0);
    expect(result.stderr).toContain(`engine: removed a stale lock of pid ${dead.pid} on ${hostname()} (since 2026-01-01T00:00:00.000Z)`);
    await expect(stat(join(repo, 'lock'))).rejects.toThrow(); // released after the backup
  });

  test('API: a repository initialised twice is refused', async () => {
    const repo = join(dir, 'repo-twice');
    await initRepository(repo);
    await expect(initRepository(repo)).rejects.toMatchObject({ code: 'ENGINE_REPOSITORY_EXISTS' });
  });
});
