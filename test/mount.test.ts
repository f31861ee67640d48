/**
 * `engine mount` / `engine umount` with real filesystems: an ext4 image made by `mke2fs -d`, a GPT disk
 * with ext4 and xfs partitions; files read through the mounts; afterwards nothing left behind (no mount,
 * no loop device, no process, no reader registration). Partition tables made by sfdisk, read by the engine.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, open, readdir, readFile, realpath, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { readPartitionTable } from '../dist/engine/index.js';
import { filesIdentical, holdLoopDeviceLock, parseJson, runEngine, sh, sparseFile, tempDir, writeRegion, withoutProgress, backUp, waitFor } from './helpers.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;
let repo: string;
let runDir: string;
let content: string;
let releaseLoopLock: (() => Promise<void>) | undefined;

beforeAll(async () => {
  // The whole file attaches loop devices (engine mount, mount -o loop, losetup): under the tests' one lock.
  releaseLoopLock = await holdLoopDeviceLock();
  ({ path: dir, cleanup } = await tempDir('engine-mount-'));
  repo = join(dir, 'repo');
  runDir = join(dir, 'run');
  content = join(dir, 'content');
  await mkdir(join(content, 'etc'), { recursive: true });
  await writeFile(join(content, 'etc', 'tuesday.txt'), 'the file we want back\n');
  await writeRegion(join(content, 'big.bin'), 0, 3 * MiB + 17, 'random', 'big');
  // Version 1: these tests check the reader registration of versions 1 and 2 (readers/, SPEC.md 12.2);
  // mount on version 3 (a lease) is test/v3-readers.
  expect((await runEngine(['init', '--format', '1', repo])).code).toBe(0);
});
afterAll(async () => {
  await cleanup();
  await releaseLoopLock?.();
});

function env(): Record<string, string> {
  return { ENGINE_RUN_DIR: runDir };
}

async function backupOf(image: string, name: string): Promise<string> {
  return (await backUp(repo, ['--source', image, '--disk-name', name])).id;
}

interface MountJson {
  backup: string;
  dir: string;
  serverPid: number;
  readerToken: string;
  disks: { name: string; partitionTable: string; image: string }[];
  filesystems: { disk: string; partition: number | null; type: string | null; path: string | null; loop: string | null; reason: string | null }[];
}

/** Processes (not zombies) whose command line mentions `needle`. */
async function processesMentioning(needle: string): Promise<number[]> {
  const found: number[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid) continue;
    const cmdline = await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '');
    const stat = await readFile(`/proc/${name}/stat`, 'utf8').catch(() => '');
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    if (cmdline.includes(needle) && state !== 'Z' && state !== '') found.push(Number(name));
  }
  return found;
}

async function assertNothingLeft(mountDir: string): Promise<void> {
  const mounts = await readFile('/proc/mounts', 'utf8');
  expect(mounts.includes(mountDir)).toBe(false);
  expect(mounts.includes(runDir)).toBe(false);
  const loops = JSON.parse((await sh('losetup', ['--list', '--json'])) || '{"loopdevices":[]}') as { loopdevices: { 'back-file': string | null }[] };
  expect(loops.loopdevices.filter((l) => (l['back-file'] ?? '').includes(runDir))).toEqual([]);
  expect(await processesMentioning(runDir)).toEqual([]);
  expect((await readdir(join(repo, 'readers'))).filter((n) => n.endsWith('.json'))).toEqual([]);
  expect(await readdir(join(runDir, 'mounts')).catch(() => [])).toEqual([]);
}

describe('engine mount', () => {
  test('an ext4 disk made by mke2fs -d: the file reads back through the mount; umount leaves nothing behind', async () => {
    const image = join(dir, 'ext4.raw');
    await sh('mke2fs', ['-q', '-t', 'ext4', '-d', content, image, '64M']);
    const id = await backupOf(image, 'root');
    const mountDir = join(dir, 'mnt-ext4');
    const mounted = await runEngine(['mount', '--repo', repo, id.slice(0, 10), mountDir, '--json'], { env: env() });
    expect(withoutProgress(mounted.stderr)).toBe('');
    expect(mounted.code).toBe(0);
    const result = parseJson<MountJson>(mounted.stdout);
    expect(result.backup).toBe(id);
    expect(result.disks.map((d) => [d.name, d.partitionTable])).toEqual([['root', 'none']]);
    expect(result.filesystems.map((f) => [f.disk, f.partition, f.type, f.path])).toEqual([['root', null, 'ext4', join(mountDir, 'root')]]);
    expect(await readFile(join(mountDir, 'root', 'etc', 'tuesday.txt'), 'utf8')).toBe('the file we want back\n');
    expect(await filesIdentical(join(mountDir, 'root', 'big.bin'), join(content, 'big.bin'))).toBe(true);
    // Read-only: the guest's filesystem cannot be changed through the mount.
    await expect(writeFile(join(mountDir, 'root', 'new.txt'), 'x')).rejects.toThrow(/EROFS|read-only/);
    expect(await readdir(join(repo, 'readers'))).toEqual([`${result.readerToken}.json`]);
    // The guest's uids and gids mean other users on this host: only the owner may enter the mount point,
    // and the server's socket, state and log are private too (SPEC.md, 2.1).
    expect((await stat(mountDir)).mode & 0o777).toBe(0o700);
    const stateDir = join(runDir, 'mounts', createHash('sha256').update(await realpath(mountDir)).digest('hex').slice(0, 16));
    for (const [name, mode] of [['state.json', 0o600], ['serve.log', 0o600], ['nbd.sock', 0o600], ['.', 0o700]] as const) {
      expect([name, (await stat(join(stateDir, name))).mode & 0o777]).toEqual([name, mode]);
    }
    // Mounting again on the same directory is refused.
    const twice = await runEngine(['mount', '--repo', repo, id, mountDir, '--json'], { env: env() });
    expect(twice.code).toBe(2);

    const unmounted = await runEngine(['umount', mountDir, '--json'], { env: env() });
    expect(unmounted.code).toBe(0);
    expect(parseJson<{ unmounted: number; loopDevicesDetached: number; fuseStopped: number; serverStopped: boolean }>(unmounted.stdout)).toEqual({
      dir: mountDir,
      unmounted: 1,
      loopDevicesDetached: 1,
      fuseStopped: 1,
      serverStopped: true,
    });
    expect(await readdir(mountDir)).toEqual([]);
    await assertNothingLeft(mountDir);
    // Nothing to undo any more.
    expect((await runEngine(['umount', mountDir, '--json'], { env: env() })).code).toBe(2);
  });

  test('a GPT disk with ext4 and xfs partitions and one without a filesystem: p1 and p2 mounted, p3 reported', async () => {
    const image = join(dir, 'gpt.raw');
    await sparseFile(image, 600 * MiB);
    await sh('sh', ['-c', `printf 'label: gpt\\n,64M,L\\n,400M,L\\n,,L\\n' | sfdisk -q ${image}`]);
    const table = JSON.parse(await sh('sfdisk', ['-J', image])) as { partitiontable: { partitions: { start: number; size: number }[] } };
    const [p1, p2] = table.partitiontable.partitions;
    await sh('mke2fs', ['-q', '-t', 'ext4', '-d', content, '-E', `offset=${p1!.start * 512}`, image, `${(p1!.size * 512) / 1024}k`]);
    // xfs has no -d: make it in a file, add a file through a loop mount, copy it into partition 2.
    const xfs = join(dir, 'xfs.img');
    await sparseFile(xfs, p2!.size * 512);
    await sh('mkfs.xfs', ['-q', xfs]);
    const xfsMount = join(dir, 'xfs-setup');
    await mkdir(xfsMount);
    await sh('mount', ['-o', 'loop', xfs, xfsMount]);
    await writeFile(join(xfsMount, 'hello.txt'), 'from xfs\n');
    await sh('umount', [xfsMount]);
    await sh('dd', [`if=${xfs}`, `of=${image}`, 'bs=1M', `seek=${(p2!.start * 512) / MiB}`, 'conv=notrunc,sparse', 'status=none']);
    const id = await backupOf(image, 'vda');

    const mountDir = join(dir, 'mnt-gpt');
    const mounted = await runEngine(['mount', '--repo', repo, id, mountDir, '--json'], { env: env() });
    expect(mounted.code).toBe(0);
    const result = parseJson<MountJson>(mounted.stdout);
    expect(result.disks[0]!.partitionTable).toBe('gpt');
    expect(result.filesystems.map((f) => [f.partition, f.type, f.path])).toEqual([
      [1, 'ext4', join(mountDir, 'vda', 'p1')],
      [2, 'xfs', join(mountDir, 'vda', 'p2')],
      [3, null, null],
    ]);
    expect(result.filesystems[2]!.reason).toBe('no ext2/3/4 or xfs filesystem found');
    expect(await readFile(join(mountDir, 'vda', 'p1', 'etc', 'tuesday.txt'), 'utf8')).toBe('the file we want back\n');
    expect(await readFile(join(mountDir, 'vda', 'p2', 'hello.txt'), 'utf8')).toBe('from xfs\n');
    // The disk itself is a file too.
    const disk = await open(result.disks[0]!.image, 'r');
    const header = Buffer.alloc(8);
    await disk.read(header, 0, 8, 512);
    await disk.close();
    expect(header.toString('latin1')).toBe('EFI PART');

    expect((await runEngine(['umount', mountDir], { env: env() })).code).toBe(0);
    await assertNothingLeft(mountDir);
  });

  test('two backups of one xfs disk, and of one ext4 disk, mounted at once (same filesystem UUIDs)', async () => {
    const xfs = join(dir, 'twins-xfs.raw');
    await sparseFile(xfs, 300 * MiB);
    await sh('mkfs.xfs', ['-q', xfs]);
    const setup = join(dir, 'twins-setup');
    await mkdir(setup);
    const put = async (text: string): Promise<void> => {
      await sh('mount', ['-o', 'loop', xfs, setup]);
      await writeFile(join(setup, 'day.txt'), text);
      await sh('umount', [setup]);
    };
    await put('monday\n');
    const monday = await backupOf(xfs, 'data');
    await put('tuesday\n');
    const tuesday = await backupOf(xfs, 'data');
    const ext4 = join(dir, 'twins-ext4.raw');
    await sh('mke2fs', ['-q', '-t', 'ext4', '-d', content, ext4, '32M']);
    const ext4First = await backupOf(ext4, 'root');
    const ext4Second = await backupOf(ext4, 'root');

    const mounts: string[] = [];
    try {
      for (const [id, name] of [[monday, 'monday'], [tuesday, 'tuesday'], [ext4First, 'ext4-a'], [ext4Second, 'ext4-b']] as const) {
        const mountDir = join(dir, `mnt-twins-${name}`);
        const mounted = await runEngine(['mount', '--repo', repo, id, mountDir, '--json'], { env: env() });
        expect(mounted.stderr, name).toBe('');
        expect(mounted.code, name).toBe(0);
        mounts.push(mountDir);
        const [fs] = parseJson<MountJson>(mounted.stdout).filesystems;
        expect(fs!.path, name).not.toBeNull();
      }
      expect(await readFile(join(mounts[0]!, 'data', 'day.txt'), 'utf8')).toBe('monday\n');
      expect(await readFile(join(mounts[1]!, 'data', 'day.txt'), 'utf8')).toBe('tuesday\n');
      for (const m of mounts.slice(2)) expect(await readFile(join(m, 'root', 'etc', 'tuesday.txt'), 'utf8')).toBe('the file we want back\n');
    } finally {
      for (const m of mounts) expect((await runEngine(['umount', m], { env: env() })).code).toBe(0);
    }
    for (const m of mounts) await assertNothingLeft(m);
  });

  test('a non-empty directory is refused and nothing is started', async () => {
    const busy = join(dir, 'busy');
    await mkdir(busy);
    await writeFile(join(busy, 'keep.txt'), 'mine');
    const ids = (await readdir(join(repo, 'backups'))).sort();
    const refused = await runEngine(['mount', '--repo', repo, ids[0]!, busy, '--json'], { env: env() });
    expect(refused.code).toBe(2);
    expect(await readdir(busy)).toEqual(['keep.txt']);
    await assertNothingLeft(busy);
  });
});

describe('engine umount after the background server died', () => {
  test('says the server was not running (not "stopped"), removes its registration, and leaves nothing behind', async () => {
    const image = join(dir, 'ext4-killed.raw');
    await sh('mke2fs', ['-q', '-t', 'ext4', '-d', content, image, '32M']);
    const id = await backupOf(image, 'killed');
    const mountDir = join(dir, 'mnt-killed');
    const mounted = await runEngine(['mount', '--repo', repo, id, mountDir, '--json'], { env: env() });
    expect(mounted.code).toBe(0);
    const { serverPid, readerToken } = parseJson<MountJson>(mounted.stdout);
    process.kill(serverPid, 'SIGKILL');
    await waitFor('the killed server is gone', async () => !(await processesMentioning('serve-daemon')).includes(serverPid));
    expect(await readdir(join(repo, 'readers'))).toEqual([`${readerToken}.json`]);
    const unmounted = await runEngine(['umount', mountDir], { env: env() });
    expect(unmounted.code).toBe(0);
    expect(unmounted.stdout).toBe(`unmounted ${mountDir}: 1 filesystem, 1 loop device, 1 disk file, server was not running\n`);
    await assertNothingLeft(mountDir);
  });
});

describe('engine umount of a stale state', () => {
  test('pids, a loop device and a mount now belonging to others (kill -9, a reboot, reuse) are left alone; the state goes', async () => {
    const mountDir = join(dir, 'stale');
    await mkdir(join(mountDir, 'os'), { recursive: true });
    const real = await realpath(mountDir);
    const stateDir = join(runDir, 'mounts', createHash('sha256').update(real).digest('hex').slice(0, 16));
    await mkdir(join(stateDir, 'fuse-0'), { recursive: true });
    // Other processes now run under the pids the state recorded; another loop device and mount took the names.
    const others = [spawn('sleep', ['300'], { stdio: 'ignore' }), spawn('sleep', ['300'], { stdio: 'ignore' })];
    const backing = join(dir, 'someone-elses.img');
    await sparseFile(backing, 4 * MiB);
    const loop = (await sh('losetup', ['--find', '--show', backing])).trim();
    await sh('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'someone-elses', join(mountDir, 'os')]);
    try {
      const state = {
        version: 1,
        dir: real,
        repo,
        created: new Date().toISOString(),
        server: { pid: others[0]!.pid, identity: 'an-earlier-boot:12345', readerToken: 'gone' },
        fuse: [{ pid: others[1]!.pid, identity: 'an-earlier-boot:12346', mountpoint: join(stateDir, 'fuse-0') }],
        loops: [loop],
        mounts: [join(real, 'os')],
        dirs: [],
      };
      await writeFile(join(stateDir, 'state.json'), JSON.stringify(state));
      const result = await runEngine(['umount', mountDir, '--json'], { env: env() });
      expect(result.code).toBe(0);
      for (const other of others) {
        expect(other.exitCode).toBe(null);
        expect(other.signalCode).toBe(null);
        expect(() => process.kill(other.pid!, 0)).not.toThrow();
      }
      expect((await sh('losetup', ['--list', '--noheadings', '--output', 'BACK-FILE', loop])).trim()).toBe(backing);
      expect((await readFile('/proc/mounts', 'utf8')).includes(`someone-elses ${join(real, 'os')} tmpfs`)).toBe(true);
      expect(await readdir(join(runDir, 'mounts'))).toEqual([]);
    } finally {
      for (const other of others) other.kill('SIGKILL');
      await sh('umount', [join(mountDir, 'os')]).catch(() => undefined);
      await sh('losetup', ['--detach', loop]).catch(() => undefined);
    }
  });
});

describe('partition tables (read by the engine, written by sfdisk)', () => {
  async function tableOf(script: string, size: number): Promise<{ engine: { number: number; offset: number; length: number }[]; sfdisk: { node: string; start: number; size: number }[] }> {
    const image = join(dir, `pt-${Math.random().toString(16).slice(2)}.raw`);
    await sparseFile(image, size);
    await sh('sh', ['-c', `printf '${script}' | sfdisk -q ${image}`]);
    const handle = await open(image, 'r');
    try {
      const table = await readPartitionTable(async (offset: number, length: number) => {
        const out = Buffer.alloc(length);
        await handle.read(out, 0, length, offset);
        return out;
      }, size);
      const sfdisk = (JSON.parse(await sh('sfdisk', ['-J', image])) as { partitiontable: { partitions: { node: string; start: number; size: number }[] } }).partitiontable.partitions;
      return { engine: table.partitions.map((p) => ({ number: p.number, offset: p.offset, length: p.length })), sfdisk };
    } finally {
      await handle.close();
    }
  }

  test('MBR with an extended partition: primaries 1-2 and logicals 5-6 where sfdisk put them', async () => {
    const { engine, sfdisk } = await tableOf('label: dos\\n,20M,L\\n,20M,L\\n,,E\\n,10M,L\\n,,L\\n', 100 * MiB);
    const expected = sfdisk
      .filter((p) => !/3$/.test(p.node))
      .map((p) => ({ number: Number(/(\d+)$/.exec(p.node)![1]), offset: p.start * 512, length: p.size * 512 }));
    expect(engine).toEqual(expected);
    expect(engine.map((p) => p.number)).toEqual([1, 2, 5, 6]);
  });

  test('GPT past 2^32 bytes: offsets exact on a 6 GiB disk', async () => {
    const { engine, sfdisk } = await tableOf('label: gpt\\n,4200M,L\\n,,L\\n', 6 * 1024 * MiB);
    expect(engine).toEqual(sfdisk.map((p, i) => ({ number: i + 1, offset: p.start * 512, length: p.size * 512 })));
    expect(engine[1]!.offset).toBeGreaterThan(2 ** 32);
  });

  test('no table: a filesystem on the whole disk, or random bytes', async () => {
    const image = join(dir, 'random.raw');
    await writeRegion(image, 0, MiB, 'random', 'pt');
    const handle = await open(image, 'r');
    const table = await readPartitionTable(async (offset: number, length: number) => {
      const out = Buffer.alloc(length);
      await handle.read(out, 0, length, offset);
      return out;
    }, MiB);
    await handle.close();
    expect(table.scheme).toBe('none');
  });
});
