/**
 * File-level restore through the appliance VM (engine files, SPEC 16.3) on real guest disks
 * (test/guest/build-files-disks.sh): xfs on LVM and a vfat ESP on GPT, ext4 and NTFS on MBR, btrfs with a
 * subvolume on a whole disk. Backed up, then listed and extracted through the appliance under QEMU; what
 * comes out is compared with the files that went in (bytes, modes, owners, times, symlinks), and the guest's
 * hostile names and symlinks never lead out of the target directory or the volume.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { lstat, readdir, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { withFileRestore } from '../dist/engine/index.js';
import { backUp, exitOf, parseJson, runEngine, sh, spawnEngine, tempDir } from './helpers.js';
import { expectSameTree, filesDisks, qemuChildrenOf, tree } from './files-tree.js';

const VM_TIMEOUT = 400_000;

let dir: string;
let cleanup: () => Promise<void>;
let repo: string;
let guest: string;
let backupId: string;
let runDir: string;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-test-files-vm-'));
  guest = await filesDisks();
  runDir = join(dir, 'run');
  process.env.ENGINE_RUN_DIR = runDir;
  repo = join(dir, 'repo');
  expect((await runEngine(['init', repo])).code).toBe(0);
  backupId = (await backUp(repo, ['--source', join(guest, 'vda.img'), '--source', join(guest, 'vdb.img'), '--source', join(guest, 'vdc.img'), '--disk-name', 'vda', '--disk-name', 'vdb', '--disk-name', 'vdc'])).id;
}, VM_TIMEOUT);

afterAll(async () => {
  await cleanup();
});

/** The name a guest's file gets on the host: control characters as %XX (engine/file-restore/tar.ts). */
function hostName(name: string): string {
  return name.replace(/[\u0000-\u001f\u007f]/g, (c) => `%${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

describe('engine files: the appliance VM', () => {
  test('every volume is found and mounted: vfat ESP and xfs on LVM (GPT), ext4 and NTFS (MBR), btrfs (whole disk); listings name files as the guest does', async () => {
    await withFileRestore({ repo, backupId }, async (session) => {
      const volumes = Object.fromEntries(session.volumes.map((v) => [v.name, `${v.type} ${v.state}`]));
      expect(volumes).toEqual({
        'vda/p1': 'vfat mounted',
        'vda/p2': 'LVM2_member lvm',
        'vda/lvm/guestvg/root': 'xfs mounted',
        'vdb/p1': 'ext4 mounted',
        'vdb/p2': 'ntfs mounted',
        vdc: 'btrfs mounted',
      });
      expect((await session.list('')).map((e) => e.name)).toEqual(['vda', 'vdb', 'vdc']);
      expect((await session.list('vda')).map((e) => e.name)).toEqual(['lvm', 'p1', 'p2']);
      expect((await session.list('vda/lvm/guestvg')).map((e) => `${e.name} ${e.volume?.type}`)).toEqual(['root xfs']);
      for (const volume of ['vda/p1', 'vdb/p2']) {
        expect((await session.list(`${volume}/docs`)).map((e) => `${e.type} ${e.name} ${e.size}`)).toEqual([
          'directory deeper 0',
          'file name with spaces.txt 31',
          'file ünïcødé 日本.txt 46',
        ].map((line) => (line.startsWith('directory') ? expect.stringMatching(/^directory deeper \d+$/) : line)));
      }
      for (const volume of ['vda/lvm/guestvg/root', 'vdb/p1', 'vdc/@home']) {
        const entries = await session.list(`${volume}/docs/deeper`);
        expect(entries.map((e) => `${e.name} ${e.size} ${e.mode.toString(8)} ${e.mtime}`)).toEqual([
          'random.bin 3000017 4755 1709210096.123456789',
          'zeros.bin 5000 644 1709210096.123456789',
        ]);
        const top = await session.list(volume);
        expect(top.find((e) => e.name === 'escape')).toMatchObject({ type: 'symlink', target: '/tmp/engine-files-escaped' });
        expect(top.find((e) => e.name === 'bad\nname\u001b[31m')).toMatchObject({ type: 'file' });
        // A guest's symlink is resolved inside its volume: "up" (../../../../..) then etc is the guest's etc,
        // not the appliance's (which holds passwd).
        // On btrfs the volume is the top level, so "up" leads to it, and the subvolume is a folder there.
        const etc = volume === 'vdc/@home' ? 'vdc/@home/up/@home/etc' : `${volume}/up/etc`;
        expect((await session.list(etc)).map((e) => e.name)).toEqual(['hostname', 'shadow-ish']);
      }
      // btrfs: the top level is mounted, a subvolume is a directory of it.
      expect((await session.list('vdc')).map((e) => e.name)).toEqual(['@home']);
      await expect(session.list('vdb/p1/no/such/file')).rejects.toThrow(/No such file/);
    });
  }, VM_TIMEOUT);

  test('extract --to DIR gives the original bytes, modes, owners, times and symlinks of every filesystem; hostile names stay inside DIR', async () => {
    const out = join(dir, 'extracted');
    const result = await runEngine(['files', 'extract', '--repo', repo, backupId, 'vda/lvm/guestvg/root', 'vdb/p1', 'vdc', 'vda/p1/docs', 'vdb/p2/', '--to', out, '--json']);
    expect(result.stderr).toBe('');
    expect(result.code).toBe(0);
    const summary = parseJson<{ files: number; symlinks: number; skipped: unknown[] }>(result.stdout);
    expect(summary.skipped).toEqual([]);
    // unix trees: 8 files each (3 volumes), vfat docs: 4, NTFS: 5.
    expect({ files: summary.files, symlinks: summary.symlinks }).toEqual({ files: 3 * 8 + 4 + 5, symlinks: 3 * 2 });
    const unix = await tree(join(guest, 'src', 'unix'), hostName);
    // The whole btrfs volume: its subvolume @home came along (a subvolume is another st_dev: tar must cross it).
    expect(await readdir(join(out, 'vdc'))).toEqual(['@home']);
    for (const name of ['root', 'p1', 'vdc/@home']) {
      const got = await tree(join(out, name));
      // ext4's own lost+found came along with the volume's root.
      if (name === 'p1') got.delete('lost+found');
      expectSameTree(got, unix, true);
    }
    expectSameTree(await tree(join(out, 'docs')), await tree(join(guest, 'src', 'plain', 'docs')), false);
    // NTFS through ntfs-3g: bytes and names, and the times to the second.
    const ntfs = await tree(join(out, 'p2'));
    const plain = await tree(join(guest, 'src', 'plain'));
    expectSameTree(ntfs, plain, false);
    expect(ntfs.get('hostname')!.mtimeNs / 1_000_000_000n).toBe(plain.get('hostname')!.mtimeNs / 1_000_000_000n);
    // The hostile name became a plain file in DIR; the symlink out of the volume was made, never followed.
    expect((await stat(join(out, 'p1', 'bad%0aname%1b[31m'))).isFile()).toBe(true);
    await expect(lstat('/tmp/engine-files-escaped')).rejects.toThrow(/ENOENT/);
    // Nothing of the run is left: no VM, no run folder.
    expect(await readdir(join(runDir, 'vms'))).toEqual([]);
  }, VM_TIMEOUT);

  test('extract --tar FILE is a tar archive any tar reads, with the exact bytes and times; ls --json lists a directory', async () => {
    const archive = join(dir, 'out.tar');
    const result = await runEngine(['files', 'extract', '--repo', repo, backupId, 'vda/lvm/guestvg/root/docs', 'vdb/p1/etc/hostname', '--tar', archive]);
    expect(result.stderr).toBe('');
    expect(result.code).toBe(0);
    const listing = await sh('tar', ['-tvf', archive, '--full-time', '--numeric-owner']);
    expect(listing).toMatch(/^-rwsr-xr-x 0\/0 +3000017 2024-02-29 12:34:56\.123456789 docs\/deeper\/random\.bin$/m);
    expect(listing).toMatch(/^-rw-r--r-- 1234\/2345 +31 2024-02-29 12:34:56\.123456789 docs\/name with spaces\.txt$/m);
    expect(listing).toMatch(/^-rw-r--r-- 0\/0 +11 2023-01-02 03:04:05 +hostname$/m);
    const unpacked = join(dir, 'unpacked');
    await sh('mkdir', ['-p', unpacked]);
    await sh('tar', ['-xf', archive, '-C', unpacked]);
    const docs = await tree(join(guest, 'src', 'unix', 'docs'));
    expectSameTree(await tree(join(unpacked, 'docs')), docs, false);
    expect(await readFile(join(unpacked, 'hostname'))).toEqual(await readFile(join(guest, 'src', 'unix', 'etc', 'hostname')));

    const ls = await runEngine(['files', 'ls', '--repo', repo, backupId, 'vdb/p1/docs', '--json']);
    expect(ls.code).toBe(0);
    const json = parseJson<{ entries: { name: string; type: string; size: number; mode: number; mtime: string; uid: number }[] }>(ls.stdout);
    expect(json.entries.map((e) => [e.name, e.type, e.size, e.mode.toString(8), e.mtime, e.uid])).toEqual([
      ['deeper', 'directory', 1024, '755', '1709210096.123456789', 0],
      ['name with spaces.txt', 'file', 31, '644', '1709210096.123456789', 1234],
      ['ünïcødé 日本.txt', 'file', 46, '644', '1709210096.123456789', 0],
    ]);
  }, VM_TIMEOUT);

  test('SIGTERM while the appliance boots stops the run: exit 130, no VM, no server, no run folder left', async () => {
    const child = spawnEngine(['files', 'ls', '--repo', repo, backupId, 'vdb/p1'], { ENGINE_ACCEL: 'tcg' });
    let stderr = '';
    child.stderr!.on('data', (chunk: Buffer) => {
      stderr += chunk.toString('utf8');
    });
    // Wait until its VM runs (a qemu whose parent is the command), then stop the command.
    const qemuOf = (): Promise<number[]> => qemuChildrenOf(child.pid!);
    let vms: number[] = [];
    while (vms.length === 0 && child.exitCode === null) {
      await new Promise((resolve) => setTimeout(resolve, 100));
      vms = await qemuOf();
    }
    expect(vms.length).toBe(1);
    child.kill('SIGTERM');
    const { code } = await exitOf(child);
    expect({ code, stderr: stderr.trim() }).toEqual({ code: 130, stderr: expect.stringMatching(/interrupted/) });
    expect(await stat(`/proc/${vms[0]}`).then(() => 'running', () => 'gone')).toBe('gone');
    expect(await readdir(join(runDir, 'vms'))).toEqual([]);
    expect(await readdir(join(repo, 'readers')).catch(() => [])).toEqual([]);
    expect(await readdir(join(repo, 'leases')).catch(() => [])).toEqual([]);
  }, VM_TIMEOUT);

  test('kill -9 of the command: its VM dies with it (pdeathsig), and the next run removes the run folder it left', async () => {
    // TCG: with `auto` on a host whose KVM fails, the VM found could be the KVM attempt's, which ends by itself.
    const child = spawnEngine(['files', 'ls', '--repo', repo, backupId, 'vdb/p1'], { ENGINE_ACCEL: 'tcg' });
    let vm: number | undefined;
    while (vm === undefined && child.exitCode === null) {
      await new Promise((resolve) => setTimeout(resolve, 100));
      vm = (await qemuChildrenOf(child.pid!))[0];
    }
    expect(vm).toBeDefined();
    child.kill('SIGKILL');
    await exitOf(child);
    // Gone, or a zombie until its new parent reaps it: either way no longer running.
    const running = async (): Promise<boolean> => {
      const stat = await readFile(`/proc/${vm}/stat`, 'utf8').catch(() => '');
      return stat !== '' && !/^\d+ \(.*\) Z/.test(stat);
    };
    while (await running()) await new Promise((resolve) => setTimeout(resolve, 100));
    expect(await readdir(join(runDir, 'vms'))).toHaveLength(1);
    const next = await runEngine(['files', 'ls', '--repo', repo, backupId, 'vdb/p1/etc']);
    expect(next.code).toBe(0);
    expect(next.stdout).toMatch(/ hostname\n/);
    // Its VM was gone already: the next run says what it cleaned up, with no VM to stop.
    expect(next.stderr).toMatch(/cleaned up after run \d{8}T\d{6}-[0-9a-f]{8} \(files ls\), which was killed\n/);
    expect(await readdir(join(runDir, 'vms'))).toEqual([]);
    // The dead run's shared lease (format 3) or reader registration is gone too.
    expect(await readdir(join(repo, 'leases')).catch(() => [])).toEqual([]);
    expect(await readdir(join(repo, 'readers')).catch(() => [])).toEqual([]);
  }, VM_TIMEOUT);
});
