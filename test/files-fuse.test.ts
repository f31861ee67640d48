/**
 * `engine mount --vm` (SPEC 16.3): a backup of real guest disks (test/guest/build-files-disks.sh: xfs on LVM
 * and vfat on GPT, ext4 and NTFS on MBR, btrfs on a whole disk) browsed through the FUSE view that the
 * engine's own FUSE server (engine/file-restore/fuse.ts) answers from the appliance VM. What the host's tools
 * read there (ls, cat, cmp, find, readlink) is compared with the files that went into the guest; writes are
 * refused; `engine umount` leaves no process, mount or folder, after a kill -9 of the mount's process too.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { chmod, lstat, mkdir, readdir, readFile, readlink, rename, unlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { backUp, parseJson, runEngine, sh, tempDir } from './helpers.js';
import { expectSameTree, filesDisks, qemuChildrenOf, tree } from './files-tree.js';

const VM_TIMEOUT = 400_000;

let dir: string;
let cleanup: () => Promise<void>;
let repo: string;
let guest: string;
let backupId: string;
let runDir: string;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-test-files-fuse-'));
  guest = await filesDisks();
  runDir = join(dir, 'run');
  process.env.ENGINE_RUN_DIR = runDir;
  repo = join(dir, 'repo');
  expect((await runEngine(['init', repo])).code).toBe(0);
  backupId = (await backUp(repo, ['--source', join(guest, 'vda.img'), '--source', join(guest, 'vdb.img'), '--source', join(guest, 'vdc.img'), '--disk-name', 'vda', '--disk-name', 'vdb', '--disk-name', 'vdc'])).id;
}, VM_TIMEOUT);

afterAll(async () => {
  // A failed test may leave its mount: take it down before the folder goes.
  for (const name of ['view', 'killed']) await runEngine(['umount', join(dir, name)]).catch(() => undefined);
  await cleanup();
});

interface Mounted {
  serverPid: number;
  volumes: { name: string; type: string; state: string }[];
}

/** Mounts at `at`; also says which state folder (<run dir>/mounts/<name>) is this mount's. */
async function mountVm(at: string): Promise<Mounted & { stateFolder: string }> {
  const before = await readdir(join(runDir, 'mounts')).catch(() => [] as string[]);
  const result = await runEngine(['mount', '--vm', '--repo', repo, backupId, at, '--json']);
  expect(result.stderr).toBe('');
  expect(result.code).toBe(0);
  const added = (await readdir(join(runDir, 'mounts'))).filter((name) => !before.includes(name));
  expect(added.length).toBe(1);
  return { ...parseJson<Mounted>(result.stdout), stateFolder: added[0]! };
}

/** Running, not a zombie waiting for its parent. */
async function running(pid: number): Promise<boolean> {
  const text = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  return text !== '' && !/^\d+ \(.*\) Z/.test(text);
}

/** The QEMU process of a mount: the one child of its process (setpriv execs QEMU, so the mount's process is its parent). */
async function vmOf(serverPid: number): Promise<number> {
  const vms = await qemuChildrenOf(serverPid);
  expect(vms).toHaveLength(1);
  return vms[0]!;
}

async function fuseMounts(): Promise<string[]> {
  return (await readFile('/proc/mounts', 'utf8')).split('\n').filter((line) => line.split(' ')[2] === 'fuse.engine' && line.split(' ')[1]!.startsWith(dir));
}

/** After umount: no mount, no process of it (server, VM), no state or VM run folder, no lease or reader registration. */
async function expectNothingLeft(pid: number, vm: number): Promise<void> {
  expect(await fuseMounts()).toEqual([]);
  expect(await running(pid)).toBe(false);
  expect(await running(vm)).toBe(false);
  expect(await readdir(join(runDir, 'mounts'))).toEqual([]);
  expect(await readdir(join(runDir, 'vms')).catch(() => [])).toEqual([]);
  expect(await readdir(join(repo, 'leases')).catch(() => [])).toEqual([]);
  expect(await readdir(join(repo, 'readers')).catch(() => [])).toEqual([]);
}

describe('engine mount --vm: a FUSE view of the appliance', () => {
  test('the names of engine files ls; ls -la, cat, cmp, find and readlink give the guest\'s files; writes are refused; umount leaves nothing', async () => {
    const view = join(dir, 'view');
    const mounted = await mountVm(view);
    expect(Object.fromEntries(mounted.volumes.map((v) => [v.name, `${v.type} ${v.state}`]))).toEqual({
      'vda/p1': 'vfat mounted',
      'vda/p2': 'LVM2_member lvm',
      'vda/lvm/guestvg/root': 'xfs mounted',
      'vdb/p1': 'ext4 mounted',
      'vdb/p2': 'ntfs mounted',
      vdc: 'btrfs mounted',
    });
    const vm = await vmOf(mounted.serverPid);
    expect(await fuseMounts()).toEqual([expect.stringMatching(/ fuse\.engine ro,nosuid,nodev,noexec,/)]);

    expect((await readdir(view)).sort()).toEqual(['vda', 'vdb', 'vdc']);
    expect((await readdir(join(view, 'vda'))).sort()).toEqual(['lvm', 'p1', 'p2']);
    expect(await readdir(join(view, 'vda', 'lvm', 'guestvg'))).toEqual(['root']);
    expect(await readdir(join(view, 'vda', 'p2'))).toEqual([]);
    const listing = await sh('ls', ['-la', '--time-style=full-iso', join(view, 'vdb', 'p1', 'docs', 'deeper')]);
    expect(listing).toMatch(/^-rwsr-xr-x 1 root root +3000017 2024-02-29 12:34:56\.123456789 \+0000 random\.bin$/m);
    expect(listing).toMatch(/^-rw-r--r-- 1 root root +5000 2024-02-29 12:34:56\.123456789 \+0000 zeros\.bin$/m);

    // Every unix volume, whole: names, bytes (random.bin is 3000017 bytes: several READs of the kernel and
    // of the appliance), modes, owners, times to the nanosecond's microsecond, symlink targets (readlink).
    const unix = await tree(join(guest, 'src', 'unix'));
    for (const volume of ['vda/lvm/guestvg/root', 'vdb/p1', 'vdc/@home']) {
      const got = await tree(join(view, volume));
      got.delete('lost+found');
      expectSameTree(got, unix, true);
    }
    // vfat and NTFS: names and bytes.
    expectSameTree(await tree(join(view, 'vdb', 'p2')), await tree(join(guest, 'src', 'plain')), false);
    expectSameTree(await tree(join(view, 'vda', 'p1', 'docs')), await tree(join(guest, 'src', 'plain', 'docs')), false);

    // The host's tools.
    const random = join('docs', 'deeper', 'random.bin');
    await sh('cmp', [join(view, 'vda', 'lvm', 'guestvg', 'root', random), join(guest, 'src', 'unix', random)]);
    expect(await sh('cat', [join(view, 'vdb', 'p1', 'etc', 'hostname')])).toBe(await readFile(join(guest, 'src', 'unix', 'etc', 'hostname'), 'utf8'));
    // Reads at offsets that no block boundary matches, of a file larger than a block (1 MiB) and a READ.
    const original = await readFile(join(guest, 'src', 'unix', random));
    for (const size of [1, 4095, 65537, 1048577]) {
      const piece = Buffer.from(await sh('bash', ['-c', `dd if=${join(view, 'vdc', '@home', random)} bs=${size} skip=1 status=none | base64 -w0`]), 'base64');
      expect({ size, same: piece.equals(original.subarray(size)) }).toEqual({ size, same: true });
    }
    expect(await readlink(join(view, 'vdb', 'p1', 'escape'))).toBe('/tmp/engine-files-escaped');
    expect(await readlink(join(view, 'vdb', 'p1', 'up'))).toBe('../../../../..');
    const find = async (root: string): Promise<string[]> => (await sh('find', [root, '-mindepth', '1', '-printf', '%y %m %s %P\\n'])).split('\n').filter((line) => line !== '' && !line.includes('lost+found')).sort();
    expect(await find(join(view, 'vdb', 'p1'))).toEqual((await find(join(guest, 'src', 'unix'))).map((line) => (line.startsWith('d ') ? expect.stringMatching(new RegExp(`^${line.split(' ').slice(0, 2).join(' ')} \\d+ ${line.split(' ').slice(3).join(' ')}$`)) : line)));

    // Writes of every kind: the kernel refuses them on the read-only mount.
    const file = join(view, 'vdb', 'p1', 'etc', 'hostname');
    await expect(writeFile(file, 'changed')).rejects.toThrow(/EROFS/);
    await expect(writeFile(join(view, 'vdb', 'p1', 'new-file'), 'x')).rejects.toThrow(/EROFS/);
    await expect(mkdir(join(view, 'vdc', 'new-dir'))).rejects.toThrow(/EROFS/);
    await expect(unlink(file)).rejects.toThrow(/EROFS/);
    await expect(rename(file, `${file}.moved`)).rejects.toThrow(/EROFS/);
    await expect(chmod(file, 0o777)).rejects.toThrow(/EROFS/);
    expect(await readFile(file, 'utf8')).toBe(await readFile(join(guest, 'src', 'unix', 'etc', 'hostname'), 'utf8'));
    // The guest's absolute symlink is a symlink here too; the host follows it where it points (nothing there).
    await expect(lstat('/tmp/engine-files-escaped')).rejects.toThrow(/ENOENT/);

    // Its process stays within the memory a process of the engine may use (after all of the above).
    const status = await readFile(`/proc/${mounted.serverPid}/status`, 'utf8');
    expect(Number(/VmHWM:\s+(\d+) kB/.exec(status)![1]) * 1024).toBeLessThanOrEqual(300 * 1024 * 1024);

    const umount = await runEngine(['umount', view, '--json']);
    expect(umount.code).toBe(0);
    expect(parseJson(umount.stdout)).toMatchObject({ unmounted: 1, serverStopped: true });
    await expectNothingLeft(mounted.serverPid, vm);
    // The mount point stays, empty, as it was given.
    expect(await readdir(view)).toEqual([]);
  }, VM_TIMEOUT);

  test('kill -9 of the mount\'s process: its VM dies with it, and engine umount removes the dead mount and everything else', async () => {
    const view = join(dir, 'killed');
    const mounted = await mountVm(view);
    const vm = await vmOf(mounted.serverPid);
    expect(await readFile(join(view, 'vdb', 'p1', 'etc', 'hostname'), 'utf8')).toBe('guest-host\n');
    process.kill(mounted.serverPid, 'SIGKILL');
    while ((await running(mounted.serverPid)) || (await running(vm))) await new Promise((resolve) => setTimeout(resolve, 100));
    // The dead mount is still there, and says so (for what the kernel has not cached: vdc was never listed).
    // (ENOTCONN for a request made after the connection ended, ECONNABORTED for one the end cut short.)
    await expect(readdir(join(view, 'vdc'))).rejects.toThrow(/ENOTCONN|ECONNABORTED/);
    expect((await fuseMounts()).length).toBe(1);
    const umount = await runEngine(['umount', view, '--json']);
    expect(umount.code).toBe(0);
    expect(parseJson(umount.stdout)).toMatchObject({ unmounted: 1, serverStopped: false });
    await expectNothingLeft(mounted.serverPid, vm);
    expect(await readdir(view)).toEqual([]);
  }, VM_TIMEOUT);
});
