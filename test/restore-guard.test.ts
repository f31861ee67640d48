/**
 * Where a restore (and every other command that writes what a user names) may not write: inside a
 * repository, whatever path leads there (symlink, hard link, bind mount); over a backup's own source
 * unless forced; a block device in use (a mounted ext4 on a real loop device) at all, or one holding a
 * filesystem without --force, rollback included; same-named files of a directory restore without --force.
 * Every refusal leaves the target byte for byte as it was.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { link, mkdir, readdir, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { holdLoopDeviceLock, filesIdentical, parseJson, prefixIdentical, runEngine, sh, sha256File, sparseFile, tempDir, writeRegion, type BackupJson, withoutProgress, backUp, initRepository, repositoryConfig } from './helpers.js';
import { qcow2, qemuIo } from './qemu.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
let dir: string;
let cleanup: () => Promise<void>;
let repo: string;
let image: string;
let backupId: string;

interface ErrorJson {
  error: { code: string; message: string };
}

async function restoreError(args: string[]): Promise<ErrorJson['error'] & { exit: number }> {
  const result = await runEngine(['restore', '--repo', repo, backupId, ...args, '--json']);
  expect(withoutProgress(result.stderr)).toBe('');
  return { ...parseJson<ErrorJson>(result.stdout).error, exit: result.code };
}

async function onePack(): Promise<string> {
  for (const sub of await readdir(join(repo, 'packs'))) {
    const names = await readdir(join(repo, 'packs', sub));
    if (names.length > 0) return join(repo, 'packs', sub, names[0]!);
  }
  throw new Error('no pack');
}

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-restore-guard-'));
  repo = join(dir, 'repo');
  image = join(dir, 'disk.raw');
  await sparseFile(image, SIZE);
  await writeRegion(image, 0, 6 * MiB, 'random', 'guard');
  await writeRegion(image, 10 * MiB, 2 * MiB, 'text');
  await initRepository(repo);
  backupId = (await backUp(repo, ['--source', image])).id;
});
afterAll(async () => {
  await cleanup();
});

describe('never inside a repository', () => {
  test('a pack, through its own path, a symlink, a hard link or a bind mount of packs/, stays as it was', async () => {
    const pack = await onePack();
    const before = await sha256File(pack);
    const symlinked = join(dir, 'looks-harmless.raw');
    await symlink(pack, symlinked);
    const hardLinked = join(dir, 'hard-link.raw');
    await link(pack, hardLinked);
    const bind = join(dir, 'bind');
    await mkdir(bind);
    await sh('mount', ['--bind', join(repo, 'packs'), bind]);
    try {
      const throughBind = join(bind, pack.split('/').slice(-2).join('/'));
      for (const target of [pack, symlinked, hardLinked, throughBind, join(bind, 'new.raw'), join(repo, 'tmp', 'new.raw'), repo]) {
        const error = await restoreError(['--to', target]);
        expect(error.code, target).toBe('ENGINE_TARGET_PROTECTED');
        expect(error.exit).toBe(1);
        expect(error.message).toMatch(/the engine never writes there/);
      }
      expect((await restoreError(['--to-qcow2', join(repo, 'x.qcow2')])).code).toBe('ENGINE_TARGET_PROTECTED');
    } finally {
      await sh('umount', [bind]);
    }
    expect(await sha256File(pack)).toBe(before);
    await expect(stat(join(repo, 'tmp', 'new.raw'))).rejects.toThrow();
    await expect(stat(join(repo, 'x.qcow2'))).rejects.toThrow();
    await rm(hardLinked);
    expect((await runEngine(['verify', '--repo', repo, '--read-data'])).code).toBe(0);
  });

  test('inside another repository too, and for a mount point, a serve socket and the demo directory', async () => {
    const other = join(dir, 'other-repo');
    expect((await runEngine(['init', other])).code).toBe(0);
    expect((await restoreError(['--to', join(other, 'backups', 'x')])).message).toContain(`inside the engine repository ${other}`);
    const mounted = await runEngine(['mount', '--repo', repo, backupId, join(repo, 'backups', 'mnt'), '--json']);
    expect(parseJson<ErrorJson>(mounted.stdout).error.code).toBe('ENGINE_TARGET_PROTECTED');
    const served = await runEngine(['serve', '--repo', repo, backupId, '--socket', join(repo, 'nbd.sock'), '--json']);
    expect(parseJson<ErrorJson>(served.stdout).error.code).toBe('ENGINE_TARGET_PROTECTED');
    const demo = await runEngine(['demo', '--dir', join(other, 'demo'), '--size', '1M']);
    expect(demo.code).toBe(1);
    expect(demo.stderr).toContain('is inside the engine repository');
    expect(await readdir(join(repo, 'backups'))).toEqual([backupId]);
    await expect(stat(join(other, 'demo'))).rejects.toThrow();
    await expect(stat(join(repo, 'nbd.sock'))).rejects.toThrow();
  });
  test('init never makes a new repository inside one: under packs/ or backups/, through a symlink, or in an empty packs/ directory', async () => {
    let emptyPackDir: string | undefined;
    for (const sub of await readdir(join(repo, 'packs'))) {
      if ((await readdir(join(repo, 'packs', sub))).length === 0) emptyPackDir = join(repo, 'packs', sub);
    }
    if (emptyPackDir === undefined) {
      // Version 3 (the default) makes a packs/ folder with its first pack, not all 256 at init: an empty one is
      // what a gc that deleted a folder's last pack leaves (a folder store keeps its folders), made so here.
      expect((await repositoryConfig(repo)).version).toBe(3);
      const free = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, '0')).find((sub) => !existsSync(join(repo, 'packs', sub)))!;
      emptyPackDir = join(repo, 'packs', free);
      await mkdir(emptyPackDir, { mode: 0o700 });
    }
    const viaLink = join(dir, 'innocent-dir');
    await symlink(join(repo, 'backups'), viaLink);
    try {
      for (const target of [join(repo, 'packs', 'ab', 'x'), join(repo, 'backups', 'nested'), join(viaLink, 'nested'), emptyPackDir]) {
        const result = await runEngine(['init', target, '--json']);
        expect(result.code, target).toBe(1);
        const error = parseJson<ErrorJson>(result.stdout).error;
        expect(error.code, target).toBe('ENGINE_TARGET_PROTECTED');
        expect(error.message).toContain(`is inside the engine repository ${repo}; the engine never writes there`);
      }
    } finally {
      await rm(viaLink);
    }
    await expect(stat(join(repo, 'packs', 'ab', 'x'))).rejects.toThrow();
    await expect(stat(join(repo, 'backups', 'nested'))).rejects.toThrow();
    expect(await readdir(emptyPackDir)).toEqual([]);
    expect((await stat(emptyPackDir)).mode & 0o777).toBe(0o700);
    expect(await readdir(join(repo, 'backups'))).toEqual([backupId]);
    // The repository itself: init's own refusal, which says it already holds a repository.
    const again = await runEngine(['init', repo, '--json']);
    expect(parseJson<ErrorJson>(again.stdout).error.code).toBe('ENGINE_REPOSITORY_EXISTS');
    expect((await runEngine(['verify', '--repo', repo])).code).toBe(0);
  });
});

describe("never over a backup's own source unless forced", () => {
  test('a plain restore onto the source is refused; rollback onto it and --force are allowed', async () => {
    const before = await sha256File(image);
    const viaLink = join(dir, 'source-link.raw');
    await symlink(image, viaLink);
    for (const target of [image, viaLink]) {
      const error = await restoreError(['--to', target]);
      expect(error.code).toBe('ENGINE_TARGET_PROTECTED');
      expect(error.message).toContain(`is the source that disk disk.raw of backup ${backupId} was read from`);
    }
    expect(await sha256File(image)).toBe(before);
    // Rollback is what --only-changed is for: nothing differs, nothing is written.
    const rolled = await runEngine(['restore', '--repo', repo, backupId, '--to', image, '--only-changed', '--json']);
    expect(rolled.code).toBe(0);
    expect(parseJson<{ disks: { blocksWritten: number; blocksCompared: number }[] }>(rolled.stdout).disks[0]).toMatchObject({ blocksWritten: 0, blocksCompared: SIZE / MiB });
    const forced = await runEngine(['restore', '--repo', repo, backupId, '--to', image, '--force']);
    expect(forced.code).toBe(0);
    expect(await sha256File(image)).toBe(before);
  });

  test('a qcow2 image a backup read is never overwritten with raw bytes, not even by rollback, unless forced', async () => {
    const qcow = join(dir, 'vm.qcow2');
    await qcow2(qcow, '8M');
    await qemuIo(qcow, ['write -P 0x5a 0 2M']);
    const backup = await runEngine(['backup', '--repo', repo, '--image', qcow, '--json']);
    expect(backup.code).toBe(0);
    const id = parseJson<BackupJson>(backup.stdout).id;
    const before = await sha256File(qcow);
    for (const extra of [[], ['--only-changed']]) {
      const result = await runEngine(['restore', '--repo', repo, id, '--to', qcow, ...extra, '--json']);
      expect(parseJson<ErrorJson>(result.stdout).error.message).toContain('raw bytes would destroy it');
    }
    expect(await sha256File(qcow)).toBe(before);
  });
});

describe('block devices: exclusive, and never one that holds a filesystem without --force', () => {
  let device: string;
  let backing: string;
  let mountpoint: string;

  let releaseLoopLock: () => Promise<void>;

  beforeAll(async () => {
    // Loop devices are the host's: held under the lock the tests' disk builders take (test/guest/
    // build-files-disks.sh), or a device one of them had just released is found "in use by the system".
    releaseLoopLock = await holdLoopDeviceLock();
    backing = join(dir, 'loop-backing.img');
    await sparseFile(backing, 32 * MiB);
    device = (await sh('losetup', ['-f', '--show', backing])).trim();
    await sh('mkfs.ext4', ['-q', '-F', device]);
    mountpoint = join(dir, 'mnt');
    await mkdir(mountpoint);
    await sh('mount', [device, mountpoint]);
    await writeFile(join(mountpoint, 'precious'), 'data someone needs\n');
  });
  afterAll(async () => {
    await sh('umount', [mountpoint]).catch(() => undefined);
    await sh('losetup', ['-d', device]).catch(() => undefined);
    await releaseLoopLock();
  });

  test('a mounted device is refused, rollback included, --force or not; so is the file behind the loop device', async () => {
    for (const extra of [[], ['--only-changed'], ['--force']]) {
      const error = await restoreError(['--to', device, ...extra]);
      expect(error.code).toBe('ENGINE_TARGET_IN_USE');
      expect(error.message).toContain(`is mounted at ${mountpoint}`);
    }
    const file = await restoreError(['--to', backing]);
    expect(file.code).toBe('ENGINE_TARGET_IN_USE');
    expect(file.message).toContain(`${device} uses it as its backing file`);
    // The filesystem is whole: mounted again read-only, the file is there.
    await sh('umount', [mountpoint]);
    await sh('mount', ['-o', 'ro', device, mountpoint]);
    expect(await readFile(join(mountpoint, 'precious'), 'utf8')).toBe('data someone needs\n');
    await sh('umount', [mountpoint]);
  });

  test('rolling a device back to a backup of itself needs no --force: the restore point holds the same filesystem', async () => {
    const backup = await runEngine(['backup', '--repo', repo, '--source', device, '--name', 'loop', '--json']);
    expect(backup.code, backup.stderr).toBe(0);
    const id = parseJson<BackupJson>(backup.stdout).id;
    await sh('mount', [device, mountpoint]);
    await writeFile(join(mountpoint, 'precious'), 'overwritten by mistake\n');
    await sh('umount', [mountpoint]);
    const rolled = await runEngine(['restore', '--repo', repo, id, '--to', device, '--only-changed', '--json']);
    expect(withoutProgress(rolled.stderr)).toBe('');
    expect(rolled.code).toBe(0);
    expect(parseJson<{ disks: { blocksWritten: number }[] }>(rolled.stdout).disks[0]!.blocksWritten).toBeGreaterThan(0);
    await sh('mount', ['-o', 'ro', device, mountpoint]);
    expect(await readFile(join(mountpoint, 'precious'), 'utf8')).toBe('data someone needs\n');
    await sh('umount', [mountpoint]);
  });

  test('a device holding another filesystem needs --force (rollback too); with it, it receives the disk', async () => {
    await sh('mkfs.ext4', ['-q', '-F', device]); // another filesystem: another UUID
    const before = await sha256File(device);
    for (const extra of [[], ['--only-changed']]) {
      const error = await restoreError(['--to', device, ...extra]);
      expect(error.code).toBe('ENGINE_TARGET_HOLDS_DATA');
      expect(error.message).toMatch(/holds an ext4 filesystem \(UUID [0-9a-f-]+\); give --force to overwrite it/);
    }
    expect(await sha256File(device)).toBe(before);
    const forced = await runEngine(['restore', '--repo', repo, backupId, '--to', device, '--force']);
    expect(withoutProgress(forced.stderr)).toBe('');
    expect(forced.code).toBe(0);
    expect(await prefixIdentical(device, image, SIZE)).toBe(true);
  });
});

describe('a device held as swap', () => {
  test('is refused, and the message says so', async () => {
    const backing = join(dir, 'swap-backing.img');
    await sparseFile(backing, 32 * MiB);
    const device = (await sh('losetup', ['-f', '--show', backing])).trim();
    try {
      await sh('mkswap', ['-q', device]);
      await sh('swapon', [device]);
      try {
        const error = await restoreError(['--to', device, '--force']);
        expect(error.code).toBe('ENGINE_TARGET_IN_USE');
        expect(error.message).toContain('is in use as swap');
      } finally {
        await sh('swapoff', [device]);
      }
    } finally {
      await sh('losetup', ['-d', device]);
    }
  });
});

describe('restoring every disk into a directory', () => {
  let multi: string;
  let second: string;

  beforeAll(async () => {
    second = join(dir, 'data.raw');
    await sparseFile(second, 4 * MiB);
    await writeRegion(second, 0, MiB, 'random', 'second');
    const backup = await runEngine(['backup', '--repo', repo, '--source', image, '--source', second, '--json']);
    expect(backup.code).toBe(0);
    multi = parseJson<BackupJson>(backup.stdout).id;
  });

  test('refuses to overwrite a same-named file without --force, and overwrites it with --force', async () => {
    const into = join(dir, 'into');
    await mkdir(into);
    // Somebody else's file, as large as the disk (an existing file must be: it is overwritten, never truncated).
    await writeRegion(join(into, 'data.raw'), 0, 4 * MiB, 'text');
    const theirs = await sha256File(join(into, 'data.raw'));
    const refused = await runEngine(['restore', '--repo', repo, multi, '--to', into, '--json']);
    expect(parseJson<ErrorJson>(refused.stdout).error).toMatchObject({ code: 'ENGINE_TARGET_HOLDS_DATA' });
    expect(parseJson<ErrorJson>(refused.stdout).error.message).toContain(`${join(into, 'data.raw')}: it holds a file of the same name as disk data.raw`);
    expect(await readdir(into)).toEqual(['data.raw']);
    expect(await sha256File(join(into, 'data.raw'))).toBe(theirs);
    const forced = await runEngine(['restore', '--repo', repo, multi, '--to', into, '--force', '--json']);
    expect(forced.code).toBe(0);
    expect(parseJson<{ createdDirectory: string | null }>(forced.stdout).createdDirectory).toBe(null);
    expect(await filesIdentical(join(into, 'data.raw'), second)).toBe(true);
    expect(await filesIdentical(join(into, 'disk.raw'), image)).toBe(true);
  });

  test('--to a new path says it created a directory (text and JSON), and which files are new', async () => {
    const fresh = join(dir, 'fresh', 'restored');
    const text = await runEngine(['restore', '--repo', repo, multi, '--to', fresh]);
    expect(text.code).toBe(0);
    expect(text.stdout).toContain(`created directory ${fresh} for the 2 disks of backup ${multi}`);
    const again = join(dir, 'fresh2');
    const json = parseJson<{ createdDirectory: string; disks: { name: string; path: string; created: boolean }[] }>((await runEngine(['restore', '--repo', repo, multi, '--to', again, '--json'])).stdout);
    expect(json.createdDirectory).toBe(again);
    expect(json.disks.map((d) => [d.name, d.path, d.created])).toEqual([
      ['disk.raw', join(again, 'disk.raw'), true],
      ['data.raw', join(again, 'data.raw'), true],
    ]);
    expect(await filesIdentical(join(again, 'data.raw'), second)).toBe(true);
  });
});
