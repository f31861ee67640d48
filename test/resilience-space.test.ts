/**
 * Repositories that cannot be written where they are read: a read-only bind mount (restore, verify, list,
 * show, serve and mount read it without the lock; what must write says ENGINE_READ_ONLY), a filesystem
 * filled to 100% (readers go on, backup says how to free space, prune and gc free it through the space
 * reserve), and the same without a reserve (readers from a private copy of the index). And allocations
 * bounded by what the repository holds: records that claim petabytes, a map deduplicated to three pages.
 */
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest';
import { execFile, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { NbdClient, Repository, KIND_DATA, KIND_MAP_LEAF, KIND_MAP_NODE } from '../dist/engine/index.js';
import { sealBlobToBuffer } from '../dist/repo-format/blob-codec.js';
import { LZ4 } from '../dist/repo-format/compression.js';
import { BodyTooLargeError, collectBody, HTTP_BODY_LIMIT } from '../dist/engine/host/http-body.js';
import { createServer, get } from 'node:http';
import type { AddressInfo } from 'node:net';
import { ENGINE_BIN, exitOf, filesIdentical, parseJson, runEngine, sh, sparseFile, spawnEngine, tempDir, Tmpfs, writeRegion, type BackupJson, withoutProgress, backUp } from './helpers.js';

const MiB = 1024 * 1024;
const PiB = 2 ** 50;
let dir: string;
let cleanup: () => Promise<void>;
let counter = 0;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-space-'));
});
afterAll(async () => {
  await cleanup();
});

async function image(name: string, megabytes: number, seed = name): Promise<string> {
  const path = join(dir, name);
  await sparseFile(path, megabytes * MiB);
  await writeRegion(path, 0, megabytes * MiB, 'random', seed);
  return path;
}

function backupOf(repo: string, source: string, name?: string): Promise<BackupJson> {
  return backUp(repo, ['--source', source, ...(name ? ['--name', name] : [])]);
}

async function restoresIdentical(repo: string, id: string, expected: string, env: Record<string, string> = {}): Promise<string> {
  const target = join(dir, `restored-${++counter}.raw`);
  const restored = await runEngine(['restore', '--repo', repo, id, '--to', target], { env });
  expect(restored.code).toBe(0);
  expect(await filesIdentical(target, expected)).toBe(true);
  await rm(target);
  return restored.stderr;
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/** Starts `engine serve --json` and waits for its JSON document. */
async function startServe(args: string[], env: Record<string, string> = {}): Promise<{ child: ChildProcess; ready: { readerToken: string | null; tableBytes: number; exports: { uri: string; size: number }[] }; stderr: () => string }> {
  const child = spawnEngine(['serve', ...args, '--json'], env);
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  while (!stdout.trim().endsWith('}') && child.exitCode === null) await new Promise((r) => setTimeout(r, 50));
  if (!stdout.trim().endsWith('}')) throw new Error(`serve did not start (${child.exitCode}): ${stdout} ${stderr}`);
  return { child, ready: parseJson(stdout), stderr: () => stderr };
}

interface ErrorJson {
  error: { code: string; message: string };
}

/** A read-only bind mount of `repo` under /tmp (a snapshot or a read-only export, as the engine meets it). */
async function readOnlyView(repo: string, name: string): Promise<string> {
  const ro = join('/tmp', `${name}-${process.pid}`);
  await mkdir(ro, { recursive: true });
  await sh('mount', ['--bind', repo, ro]);
  await sh('mount', ['-o', 'remount,ro,bind', ro]);
  return ro;
}

async function dropReadOnlyView(ro: string | undefined): Promise<void> {
  if (ro === undefined) return;
  await sh('umount', [ro]).catch(() => undefined);
  await rm(ro, { recursive: true, force: true });
}

describe('a read-only repository', () => {
  let repo: string;
  let ro: string;
  let source: string;
  let fsImage: string;
  let id: string;
  let fsId: string;

  beforeAll(async () => {
    repo = join(dir, 'ro-source');
    // Format 1: readers go without the lock and say so (format 3: the describe after this one).
    expect((await runEngine(['init', repo, '--format', '1'])).code).toBe(0);
    source = await image('ro.img', 5);
    id = (await backupOf(repo, source)).id;
    const content = join(dir, 'ro-content');
    await mkdir(join(content, 'etc'), { recursive: true });
    await writeFile(join(content, 'etc', 'motd'), 'from a read-only repository\n');
    fsImage = join(dir, 'ro-ext4.raw');
    await sh('mke2fs', ['-q', '-t', 'ext4', '-d', content, fsImage, '16M']);
    fsId = (await backupOf(repo, fsImage, 'fs')).id;
    // A snapshot taken while another host's backup held the lock: the lock is in the copy.
    await writeFile(join(repo, 'lock'), JSON.stringify({ pid: 4242, hostname: 'elsewhere.invalid', since: '2026-01-01T00:00:00.000Z', command: 'backup', token: '0123456789abcdef' }));
    ro = await readOnlyView(repo, 'engine-ro');
  });
  afterAll(async () => dropReadOnlyView(ro));

  test('restore, verify, list and show read it without the lock, and say so', async () => {
    const stderr = await restoresIdentical(ro, id, source);
    expect(stderr).toContain(`engine: repository ${ro} cannot be written (EROFS): restore reads it without taking the lock or registering, from a private copy of its index; it holds a lock of pid 4242 on elsewhere.invalid (backup, since 2026-01-01T00:00:00.000Z)`);
    const verify = await runEngine(['verify', '--repo', ro, '--read-data', '--json']);
    expect(withoutProgress(verify.stderr)).toBe('');
    expect(verify.code).toBe(0);
    expect(parseJson<{ ok: boolean; backups: number }>(verify.stdout)).toMatchObject({ ok: true, backups: 2 });
    expect((await runEngine(['list', '--repo', ro])).code).toBe(0);
    expect((await runEngine(['show', '--repo', ro, id])).code).toBe(0);
  });

  test('serve exports it without registering; mount mounts its filesystem', async () => {
    const socket = join(dir, 'ro.sock');
    const { child, ready } = await startServe(['--repo', ro, id, '--socket', socket]);
    try {
      expect(ready.readerToken).toBeNull();
      const copy = join(dir, 'ro-served.raw');
      await sh('nbdcopy', [ready.exports[0]!.uri, copy]);
      expect(await filesIdentical(copy, source)).toBe(true);
    } finally {
      child.kill('SIGTERM');
      expect((await exitOf(child)).code).toBe(0);
    }
    const runDir = join(dir, 'ro-run');
    const mountDir = join(dir, 'ro-mnt');
    const mounted = await runEngine(['mount', '--repo', ro, fsId, mountDir], { env: { ENGINE_RUN_DIR: runDir } });
    expect(mounted.code).toBe(0);
    try {
      // The background server's notice reaches the user of mount, naming the command they ran.
      expect(mounted.stderr).toContain(`engine: repository ${ro} cannot be written (EROFS): mount reads it without taking the lock or registering`);
      expect(await readdir(join(repo, 'readers'))).toEqual([]);
      expect(await readFile(join(mountDir, 'ro-ext4.raw', 'etc', 'motd'), 'utf8')).toBe('from a read-only repository\n');
    } finally {
      expect((await runEngine(['umount', mountDir], { env: { ENGINE_RUN_DIR: runDir } })).code).toBe(0);
    }
  });

  test('files this user may not write (another user, with read permission only): restore reads without the lock; gc says ENGINE_READ_ONLY', async () => {
    await sh('chmod', ['a+rx', dir]);
    await sh('chmod', ['-R', 'a+rX,go-w', repo]);
    const target = join('/tmp', `engine-nobody-${process.pid}.raw`);
    const asNobody = (args: string[]): Promise<{ code: number; stdout: string; stderr: string }> =>
      new Promise((resolve) => {
        execFile('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, ENGINE_BIN, ...args], { env: { ...process.env, HOME: '/tmp' } }, (error, stdout, stderr) => {
          resolve({ code: error ? (typeof error.code === 'number' ? error.code : 1) : 0, stdout, stderr });
        });
      });
    // The user nobody must reach the engine: a checkout under a private directory (mktemp -d, /root) cannot
    // run this test, and says so rather than failing on a missing module.
    const reach = await asNobody(['--version']);
    expect(reach.code, `user nobody (65534) cannot run ${ENGINE_BIN} with ${process.execPath}: run the suite from a checkout other users may read and traverse\n${reach.stderr}`).toBe(0);
    try {
      const restored = await asNobody(['restore', '--repo', repo, id, '--to', target]);
      expect(restored.stderr).toContain(`engine: repository ${repo} cannot be written (EACCES): restore reads it without taking the lock`);
      expect(restored.code).toBe(0);
      expect(await filesIdentical(target, source)).toBe(true);
      const gc = await asNobody(['gc', '--repo', repo, '--json']);
      expect(gc.code).toBe(1);
      expect(parseJson<ErrorJson>(gc.stdout).error.code).toBe('ENGINE_READ_ONLY');
      expect(parseJson<ErrorJson>(gc.stdout).error.message).toContain('(no write permission: EACCES), and gc must write to it');
    } finally {
      await rm(target, { force: true });
    }
  });

  test('what must write refuses with ENGINE_READ_ONLY, one line', async () => {
    const cases: string[][] = [
      ['backup', '--source', source],
      ['prune', '--keep-last', '1'],
      ['gc'],
      ['forget', id],
      ['protect', id],
      ['repair'],
    ];
    for (const args of cases) {
      const result = await runEngine([args[0]!, '--repo', ro, ...args.slice(1), '--json']);
      expect(result.code, args[0]).toBe(1);
      const error = parseJson<ErrorJson>(result.stdout).error;
      expect(error.code, args[0]).toBe('ENGINE_READ_ONLY');
      expect(error.message, args[0]).toBe(`repository ${ro} cannot be written (read-only filesystem: EROFS), and ${args[0]} must write to it; restore, verify, list, show, serve and mount work on a read-only repository`);
    }
    expect(await readdir(join(repo, 'backups'))).toHaveLength(2);
  });
});

describe('a read-only format-3 repository (SPEC 19.9, "Without a lease")', () => {
  let repo: string;
  let ro: string;
  let source: string;
  let id: string;
  const env = (): Record<string, string> => ({ ENGINE_CACHE_DIR: join(dir, 'v3-ro-cache') });

  beforeAll(async () => {
    repo = join(dir, 'v3-ro-source');
    expect((await runEngine(['init', repo, '--format', '3'], { env: env() })).code).toBe(0);
    source = await image('v3-ro.img', 5);
    const backup = await runEngine(['backup', '--repo', repo, '--source', source, '--json'], { env: env() });
    expect(backup.code, backup.stderr).toBe(0);
    id = parseJson<BackupJson>(backup.stdout).id;
    ro = await readOnlyView(repo, 'engine-v3-ro');
  });
  afterAll(async () => dropReadOnlyView(ro));

  test('restore and verify --read-data read it without a lease, say so in one notice, and write nothing', async () => {
    const notice = (command: string): string =>
      `engine: repository ${ro} cannot be written (EROFS): ${command} reads it without a lease, so a gc run meanwhile through a path that can write could delete what it reads (every frame is checked: it would then fail, never return wrong data)\n`;
    const stderr = await restoresIdentical(ro, id, source, env());
    expect(withoutProgress(stderr)).toBe(notice('restore'));
    const verify = await runEngine(['verify', '--repo', ro, '--read-data'], { env: env() });
    expect(withoutProgress(verify.stderr)).toBe(notice('verify'));
    expect(verify.code).toBe(0);
    expect(verify.stdout).toContain('checked 1 backup');
    expect(verify.stdout).toContain('no problems found');
    expect(await readdir(join(repo, 'leases'))).toEqual([]);
    // A writer does not go on without its lease: backup fails and commits nothing.
    const backup = await runEngine(['backup', '--repo', ro, '--source', source], { env: env() });
    expect(backup.code).not.toBe(0);
    expect(await readdir(join(repo, 'backups'))).toEqual([id]);
  });
});

describe('a full filesystem', () => {
  let fs: Tmpfs;
  let repo: string;
  let first: string;
  let second: string;
  let keptId: string;

  beforeAll(async () => {
    fs = await Tmpfs.mount(join('/tmp', `engine-full-${process.pid}`), 96);
    repo = join(fs.path, 'repo');
    // Format 1: the space reserve and the private copy of the LevelDB index (format 3: crash-full-disk).
    expect((await runEngine(['init', repo, '--format', '1'])).code).toBe(0);
    first = await image('full-1.img', 16, 'full-1');
    second = await image('full-2.img', 16, 'full-2');
    await backupOf(repo, first, 'vm');
    keptId = (await backupOf(repo, second, 'vm')).id;
  });
  afterAll(async () => {
    await fs?.unmount();
  });

  test('filled to 100%: backup says how to free space; restore and verify work; prune and gc free it; the reserve is set aside again', async () => {
    expect((await stat(join(repo, 'reserve'))).size).toBe(8 * MiB);
    await fs.fill(0);
    expect(await fs.freeBytes()).toBe(0);
    const small = await image('full-3.img', 1, 'full-3');
    const refused = await runEngine(['backup', '--repo', repo, '--source', small, '--json']);
    expect(refused.code).toBe(1);
    const error = parseJson<ErrorJson>(refused.stdout).error;
    expect(error.code).toBe('ENGINE_NO_SPACE');
    expect(error.message).toContain('backup cannot add data to a full repository: `engine prune` and `engine gc` free space (they can run on a full disk)');

    const stderr = await restoresIdentical(repo, keptId, second);
    expect(stderr).toContain(`engine: the filesystem holding ${repo} is full: restore uses the space set aside for this (reserve), and sets it aside again when it ends`);
    expect((await runEngine(['verify', '--repo', repo])).code).toBe(0);

    const prune = await runEngine(['prune', '--repo', repo, '--keep-last', '1', '--json']);
    expect(prune.code).toBe(0);
    expect(parseJson<{ removed: number }>(prune.stdout).removed).toBe(1);
    const gc = await runEngine(['gc', '--repo', repo, '--json']);
    expect(gc.code).toBe(0);
    const report = parseJson<{ packs: { deleted: string[] }; bytes: { reclaimed: number } }>(gc.stdout);
    expect(report.packs.deleted.length).toBe(2);
    expect(report.bytes.reclaimed).toBeGreaterThan(16 * MiB);
    expect((await stat(join(repo, 'reserve'))).size).toBe(8 * MiB);
    expect(await fs.freeBytes()).toBeGreaterThan(8 * MiB);
    expect(await exists(join(repo, 'lock'))).toBe(false);
    expect(await readdir(join(repo, 'tmp'))).toEqual([]);

    // Room again: the next backup goes in, and everything restores.
    const again = await backupOf(repo, small);
    await fs.unfill();
    await restoresIdentical(repo, again.id, small);
    await restoresIdentical(repo, keptId, second);
  });

  test('full and without a reserve (an older repository): readers go on from a private copy of the index; gc says what to do', async () => {
    await rm(join(repo, 'reserve'));
    await fs.fill(0);
    const scratch = join(dir, 'tmpdir');
    await mkdir(scratch, { recursive: true });
    const env = { TMPDIR: scratch };
    const stderr = await restoresIdentical(repo, keptId, second, env);
    expect(stderr).toContain(`engine: the filesystem holding ${repo} is full (ENOSPC) and no space is set aside to take the lock with: restore reads it without taking the lock or registering, from a private copy of its index`);
    const verify = await runEngine(['verify', '--repo', repo, '--json'], { env });
    expect(verify.code).toBe(0);
    expect(await readdir(scratch)).toEqual([]); // the private copies are gone
    expect(await exists(join(repo, 'lock'))).toBe(false);
    const gc = await runEngine(['gc', '--repo', repo, '--json']);
    expect(gc.code).toBe(1);
    const error = parseJson<ErrorJson>(gc.stdout).error;
    expect(error.code).toBe('ENGINE_NO_SPACE');
    expect(error.message).toContain('no space is set aside to take the lock with (reserve is used up or missing): free some space on that filesystem, then run `engine gc`');
    await fs.unfill();
    // The first lock holder with ample room sets a reserve aside for an older repository.
    expect((await runEngine(['verify', '--repo', repo])).code).toBe(0);
    expect((await stat(join(repo, 'reserve'))).size).toBe(8 * MiB);
  });
});

describe('allocations bounded by what the repository holds', () => {
  let repo: string;
  let source: string;
  let id: string;

  beforeAll(async () => {
    repo = join(dir, 'bounds');
    // Format 1: one case writes chunks and map pages through the one-writer API (Repository.open, exclusive).
    expect((await runEngine(['init', repo, '--format', '1'])).code).toBe(0);
    source = await image('bounds.img', 3);
    id = (await backupOf(repo, source)).id;
  });

  const crafted: string[] = [];
  afterEach(async () => {
    for (const id of crafted.splice(0)) await rm(join(repo, 'backups', id), { force: true });
  });

  async function editRecord(edit: (disk: { size: number; map: { root: string; depth: number; blocks: number } }) => void): Promise<string> {
    const record = parseJson<{ id: string; disks: { size: number; map: { root: string; depth: number; blocks: number } }[] }>(await readFile(join(repo, 'backups', id), 'utf8'));
    const copy = randomBytes(16).toString('hex');
    record.id = copy;
    edit(record.disks[0]!);
    await writeFile(join(repo, 'backups', copy), JSON.stringify(record));
    crafted.push(copy);
    return copy;
  }

  test('the issue\'s 2 KB edit (2^50 bytes, map depth 2, the old root): serve, mount and verify name the damaged map', async () => {
    const crafted = await editRecord((disk) => {
      disk.size = PiB;
      disk.map.blocks = 2 ** 30;
      disk.map.depth = 2;
    });
    const served = await runEngine(['serve', '--repo', repo, crafted, '--socket', join(dir, 'crafted.sock'), '--json']);
    expect(served.code).toBe(4);
    expect(parseJson<ErrorJson>(served.stdout).error).toMatchObject({ code: 'ENGINE_CORRUPT_METADATA' });
    expect(parseJson<ErrorJson>(served.stdout).error.message).toMatch(/^map page [0-9a-f]{64} is damaged: holds 3 children, expected 1024$/);
    const mounted = await runEngine(['mount', '--repo', repo, crafted, join(dir, 'crafted-mnt')], { env: { ENGINE_RUN_DIR: join(dir, 'crafted-run') } });
    expect(mounted.code).toBe(4);
    const verify = await runEngine(['verify', '--repo', repo, '--json']);
    expect(verify.code).toBe(4);
    const problems = parseJson<{ problems: { code: string; backup: string }[] }>(verify.stdout).problems;
    expect(problems.map((p) => [p.code, p.backup])).toEqual([['MAP_DAMAGED', crafted]]);
    await rm(join(repo, 'backups', crafted));
  });

  test('a record past 1 PiB, or a map depth that does not fit its blocks, is damaged: verify, list and serve say so', async () => {
    const huge = await editRecord((disk) => {
      disk.size = PiB + MiB;
      disk.map.blocks = 2 ** 30 + 1;
      disk.map.depth = 3;
    });
    const deep = await editRecord((disk) => {
      disk.map.depth = 2;
    });
    const list = parseJson<{ damaged: { id: string; message: string }[] }>((await runEngine(['list', '--repo', repo, '--json'])).stdout).damaged;
    expect(list.find((d) => d.id === huge)!.message).toBe(`backup record ${huge} is damaged: disk bounds.img has ${PiB + MiB} bytes, more than the ${PiB} (1 PiB) a disk may have`);
    expect(list.find((d) => d.id === deep)!.message).toBe(`backup record ${deep} is damaged: disk bounds.img: a map of 3 blocks has depth 0, not 2`);
    const served = await runEngine(['serve', '--repo', repo, huge, '--socket', join(dir, 'huge.sock'), '--json']);
    expect(served.code).toBe(4);
    const verify = parseJson<{ problems: { code: string; backup: string; message: string }[] }>((await runEngine(['verify', '--repo', repo, '--json'])).stdout).problems;
    expect(verify.map((p) => [p.code, p.backup]).sort()).toEqual([['RECORD_DAMAGED', deep], ['RECORD_DAMAGED', huge]].sort());
    await rm(join(repo, 'backups', huge));
    await rm(join(repo, 'backups', deep));
  });

  test('verify reports, per backup, chain references a record cannot have: itself as parent, a parent that started later', async () => {
    const self = await editRecord(() => undefined);
    const selfRecord = parseJson<Record<string, unknown> & { disks: Record<string, unknown>[] }>(await readFile(join(repo, 'backups', self), 'utf8'));
    Object.assign(selfRecord, { type: 'incremental', parent: self });
    Object.assign(selfRecord.disks[0]!, { mode: 'incremental', parent: self });
    await writeFile(join(repo, 'backups', self), JSON.stringify(selfRecord));
    const later = await editRecord(() => undefined);
    const laterRecord = parseJson<Record<string, unknown> & { disks: Record<string, unknown>[] }>(await readFile(join(repo, 'backups', later), 'utf8'));
    Object.assign(laterRecord, { type: 'incremental', parent: self, startTime: '2000-01-01T00:00:00.000Z' });
    Object.assign(laterRecord.disks[0]!, { mode: 'incremental', parent: self });
    await writeFile(join(repo, 'backups', later), JSON.stringify(laterRecord));
    const verify = await runEngine(['verify', '--repo', repo, '--json']);
    expect(verify.code).toBe(4);
    const problems = parseJson<{ problems: { code: string; backup: string; disk?: string; message: string }[] }>(verify.stdout).problems;
    expect(problems.map((p) => [p.code, p.backup, p.disk, p.message]).sort()).toEqual(
      [
        ['RECORD_INCONSISTENT', self, 'bounds.img', `backup ${self}, disk bounds.img: its parent is the backup itself`],
        ['RECORD_INCONSISTENT', later, 'bounds.img', `backup ${later}, disk bounds.img: its parent ${self} started after it (${selfRecord.startTime as string} > 2000-01-01T00:00:00.000Z)`],
      ].sort(),
    );
  });

  test('a record file larger than a record can be is damaged and never read whole', async () => {
    const record = await readFile(join(repo, 'backups', id), 'utf8');
    const big = randomBytes(16).toString('hex');
    await writeFile(join(repo, 'backups', big), record.replace(id, big).replace(/\n$/, '') + ' '.repeat(17 * MiB));
    const list = parseJson<{ damaged: { id: string; message: string }[] }>((await runEngine(['list', '--repo', repo, '--json'])).stdout).damaged;
    expect(list.filter((d) => d.id === big)).toEqual([{ id: big, message: `backup record ${big} is damaged: ${17 * MiB + record.length - 1} bytes, more than the ${16 * MiB} a record may hold` }]);
    await rm(join(repo, 'backups', big));
  });

  test('a thin 1 PiB disk (an all-zero map) serves with no table at all; restoring it into a file the filesystem cannot hold is EFBIG, said as such', async () => {
    const thin = await editRecord((disk) => {
      disk.size = PiB;
      disk.map.blocks = 2 ** 30;
      disk.map.depth = 2;
      disk.map.root = '0'.repeat(64);
    });
    const { child, ready } = await startServe(['--repo', repo, thin, '--socket', join(dir, 'thin.sock')]);
    try {
      expect(ready.tableBytes).toBe(0);
      expect(ready.exports[0]!.size).toBe(PiB);
      const client = await NbdClient.connect(ready.exports[0]!.uri);
      try {
        const tail = Buffer.alloc(MiB, 1);
        await client.read(tail, PiB - MiB);
        expect(tail.equals(Buffer.alloc(MiB))).toBe(true);
      } finally {
        await client.close();
      }
    } finally {
      child.kill('SIGTERM');
      await exitOf(child);
    }
    const verify = await runEngine(['verify', '--repo', repo]);
    expect(verify.code).toBe(0);
    // tmpfs and ext4 hold files of at most 8 EiB and 16 TiB; a file size limit stands in for a small one.
    const target = join(dir, 'thin.raw');
    const restored = await sh('bash', ['-c', `ulimit -f 1024; ${process.execPath} ${ENGINE_BIN} restore --repo ${repo} ${thin} --to ${target} --json; echo "exit $?"`]);
    expect(restored).toContain('"code": "ENGINE_FILE_TOO_LARGE"');
    expect(restored).toContain(`${target} would be larger than its filesystem allows for one file (or than this process's file size limit, ulimit -f): EFBIG`);
    expect(restored.trim().endsWith('exit 1')).toBe(true);
    expect(await exists(target)).toBe(false);
    await rm(join(repo, 'backups', thin));
  });

  test('a consistent 1 PiB map made of one leaf, one node and one root page, all of one chunk: serve holds the three pages, not 2^30 blocks', async () => {
    const opened = await Repository.open(repo, { access: 'exclusive', command: 'test' });
    const chunk = randomBytes(MiB);
    let root: Buffer;
    try {
      const writer = opened.createBlobWriter();
      const chunkId = opened.blobId(chunk);
      const frame = sealBlobToBuffer(KIND_DATA, chunkId, chunk, opened.keys, LZ4);
      await writer.add(frame, { kind: KIND_DATA, flags: frame.readUInt8(5), rawLength: chunk.length, id: chunkId });
      const store = opened.pageStore(writer);
      const leaf = await store(KIND_MAP_LEAF, Buffer.concat(Array.from({ length: 1024 }, () => chunkId)));
      const node = await store(KIND_MAP_NODE, Buffer.concat(Array.from({ length: 1024 }, () => leaf)));
      root = await store(KIND_MAP_NODE, Buffer.concat(Array.from({ length: 1024 }, () => node)));
      await writer.flush();
    } finally {
      await opened.close();
    }
    const dense = await editRecord((disk) => {
      disk.size = PiB;
      disk.map.blocks = 2 ** 30;
      disk.map.depth = 2;
      disk.map.root = root.toString('hex');
    });
    const { child, ready } = await startServe(['--repo', repo, dense, '--socket', join(dir, 'dense.sock')]);
    try {
      // One leaf (1024 × 44 bytes) and two nodes (1024 child references each), whatever the 2^30 blocks.
      expect(ready.tableBytes).toBe(1024 * 44 + 2 * 1024 * 8);
      const client = await NbdClient.connect(ready.exports[0]!.uri);
      try {
        for (const offset of [0, 2 ** 40 + 7 * MiB, PiB - MiB]) {
          const got = Buffer.alloc(MiB);
          await client.read(got, offset);
          expect(got.equals(chunk), String(offset)).toBe(true);
        }
      } finally {
        await client.close();
      }
    } finally {
      child.kill('SIGTERM');
      expect((await exitOf(child)).code).toBe(0);
    }
    const shown = await runEngine(['show', '--repo', repo, dense, '--json']);
    expect(shown.code).toBe(0);
    await rm(join(repo, 'backups', dense));
  });
});

describe('answers from the wire bounded by what they can hold', () => {
  test('an HTTP answer (oVirt, imageio) larger than its limit is refused as it arrives, declared or not', async () => {
    const server = createServer((req, res) => {
      if (req.url === '/declared') {
        res.writeHead(200, { 'Content-Length': String(HTTP_BODY_LIMIT + 1) });
        res.write('x');
        return; // never sends the rest: the client must not wait for it
      }
      res.writeHead(200); // chunked, no length: 1 MiB more than the limit, streamed
      const piece = Buffer.alloc(MiB, 0x61);
      let sent = 0;
      const more = (): void => {
        while (sent <= HTTP_BODY_LIMIT && res.write(piece)) sent += MiB;
        if (sent <= HTTP_BODY_LIMIT) res.once('drain', more);
        else res.end();
      };
      res.on('error', () => undefined);
      more();
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as AddressInfo).port;
    const fetchBody = (path: string): Promise<Buffer> =>
      new Promise((resolve, reject) => {
        get({ host: '127.0.0.1', port, path }, (res) => collectBody(res, HTTP_BODY_LIMIT, resolve, reject)).on('error', reject);
      });
    try {
      await expect(fetchBody('/declared')).rejects.toThrow(`the answer is larger than the ${HTTP_BODY_LIMIT} bytes such an answer can hold`);
      await expect(fetchBody('/streamed')).rejects.toBeInstanceOf(BodyTooLargeError);
    } finally {
      server.closeAllConnections();
      server.close();
    }
  });
});

describe('messages', () => {
  test('mount onto a file says so, in one line, and starts nothing', async () => {
    const repo = join(dir, 'mount-file');
    expect((await runEngine(['init', repo])).code).toBe(0);
    const source = await image('mount-file.img', 1);
    const { id } = await backupOf(repo, source);
    const file = join(dir, 'a-file');
    await writeFile(file, 'mine');
    const result = await runEngine(['mount', '--repo', repo, id, file], { env: { ENGINE_RUN_DIR: join(dir, 'mount-file-run') } });
    expect(result.code).toBe(2);
    expect(result.stderr).toBe(`engine: mount point ${file} is not a directory: give an empty (or new) directory\n`);
    expect(await readFile(file, 'utf8')).toBe('mine');
    expect(await exists(join(dir, 'mount-file-run'))).toBe(false);
  });
});
