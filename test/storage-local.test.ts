/**
 * The local-folder backend (repo-format/storage/local.ts): the Storage contract (test/storage-contract.ts),
 * and what only a folder has: today's layout file for file, the repository's modes (0400 files, 0700
 * folders) whatever the umask, temporary files that no listing yields and that a failed write removes, a
 * full disk reported as ENGINE_NO_SPACE, a missing root as no-bucket, and adopt (a finished pack moved in).
 */
import { afterAll, beforeAll, expect, test } from 'vitest';
import { randomBytes } from 'node:crypto';
import { mkdir, readdir, readFile, stat, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { LocalStorage } from '../dist/repo-format/storage/local.js';
import { StorageError } from '../dist/repo-format/storage/storage-error.js';
import { storageContract } from './storage-contract.js';
import { tempDir, Tmpfs } from './helpers.js';

storageContract('local folder', async () => {
  const dir = await tempDir('storage-local-');
  return { storage: new LocalStorage(dir.path), cleanup: dir.cleanup };
});

storageContract('local folder with a separate temporary folder', async () => {
  const dir = await tempDir('storage-local-tmp-');
  await mkdir(join(dir.path, 'store'));
  await mkdir(join(dir.path, 'scratch'));
  return { storage: new LocalStorage(join(dir.path, 'store'), { tempDir: join(dir.path, 'scratch') }), cleanup: dir.cleanup };
});

let dir: { path: string; cleanup: () => Promise<void> };
beforeAll(async () => {
  dir = await tempDir('storage-local-only-');
});
afterAll(async () => {
  await dir.cleanup();
});

test("keys are today's layout: packs/ab/<id> is the file <root>/packs/ab/<id>, 0400, in folders 0700, whatever the umask", async () => {
  const root = join(dir.path, 'layout');
  await mkdir(root);
  const storage = new LocalStorage(root);
  const old = process.umask(0o277);
  try {
    await storage.put('packs/ab/ab12', Buffer.from('pack bytes'));
    await storage.put('backups/0011', Buffer.from('record'), { ifAbsent: true });
  } finally {
    process.umask(old);
  }
  expect(await readFile(join(root, 'packs', 'ab', 'ab12'), 'utf8')).toBe('pack bytes');
  expect(await readFile(join(root, 'backups', '0011'), 'utf8')).toBe('record');
  for (const file of ['packs/ab/ab12', 'backups/0011']) expect((await stat(join(root, file))).mode & 0o777).toBe(0o400);
  for (const folder of ['packs', 'packs/ab', 'backups']) expect((await stat(join(root, folder))).mode & 0o777).toBe(0o700);
  // Nothing else was left beside them: the temporary files are gone.
  expect((await readdir(join(root, 'packs', 'ab'))).sort()).toEqual(['ab12']);
  expect(storage.pathOf('packs/ab/ab12')).toBe(join(root, 'packs', 'ab', 'ab12'));
});

test('what a folder holds besides objects is not listed: temporary files, links, names outside the key rule; an existing file is read as it is', async () => {
  const root = join(dir.path, 'strays');
  await mkdir(join(root, 'backups'), { recursive: true });
  await writeFile(join(root, 'backups', '.0011.abc.tmp'), 'half written');
  await writeFile(join(root, 'backups', 'README me'), 'x');
  await writeFile(join(root, 'backups', 'ffee'), 'an old record');
  await symlink('/etc/passwd', join(root, 'backups', 'link'));
  const storage = new LocalStorage(root);
  const listed: string[] = [];
  for await (const item of storage.list('')) listed.push(item.key);
  expect(listed).toEqual(['backups/ffee']);
  expect((await storage.get('backups/ffee')).toString()).toBe('an old record');
  // A link is not an object to stat either.
  await expect(storage.stat('backups/link')).rejects.toMatchObject({ reason: 'not-found' });
});

test('a missing root is no-bucket (not an empty store); a folder where an object is asked is not-found', async () => {
  const storage = new LocalStorage(join(dir.path, 'does-not-exist'));
  await expect(storage.get('config')).rejects.toMatchObject({ code: 'ENGINE_STORAGE_NO_BUCKET', reason: 'no-bucket' });
  await expect(storage.put('config', Buffer.from('x'))).rejects.toMatchObject({ reason: 'no-bucket' });
  const listing = async (): Promise<void> => {
    for await (const _ of storage.list('')) void _;
  };
  await expect(listing()).rejects.toMatchObject({ reason: 'no-bucket' });
  const root = join(dir.path, 'folders');
  await mkdir(join(root, 'packs', 'ab'), { recursive: true });
  await expect(new LocalStorage(root).get('packs/ab')).rejects.toMatchObject({ reason: 'not-found' });
});

test('adopt moves a finished file into place (0400, durable); ifAbsent refuses a taken key and removes the file', async () => {
  const root = join(dir.path, 'adopt');
  await mkdir(join(root, 'tmp'), { recursive: true });
  const storage = new LocalStorage(root, { tempDir: join(root, 'tmp') });
  const bytes = randomBytes(1 << 20);
  const built = join(root, 'tmp', 'pack-1');
  await writeFile(built, bytes, { mode: 0o400 });
  await storage.adopt('packs/12/1234', built);
  expect((await storage.get('packs/12/1234')).equals(bytes)).toBe(true);
  expect(await readdir(join(root, 'tmp'))).toEqual([]);
  await writeFile(join(root, 'tmp', 'pack-2'), 'other', { mode: 0o400 });
  const error = await storage.adopt('packs/12/1234', join(root, 'tmp', 'pack-2'), { ifAbsent: true }).catch((e: unknown) => e);
  expect(error).toBeInstanceOf(StorageError);
  expect((error as StorageError).reason).toBe('exists');
  expect(await readdir(join(root, 'tmp'))).toEqual([]);
  expect((await storage.get('packs/12/1234')).equals(bytes)).toBe(true);
});

test('adopt of a file on another file system (a format-3 pack built in the host cache, the repository on another disk): copied in, durable, 0400; the file removed; ifAbsent still refuses', async () => {
  const mount = await Tmpfs.mount(join(dir.path, 'other-fs'), 8);
  try {
    const root = join(mount.path, 'repo');
    await mkdir(root);
    const storage = new LocalStorage(root);
    const cache = join(dir.path, 'adopt-cache');
    await mkdir(cache);
    const bytes = randomBytes(1 << 20);
    await writeFile(join(cache, 'pack-1'), bytes, { mode: 0o400 });
    await storage.adopt('packs/34/3456', join(cache, 'pack-1'));
    expect((await storage.get('packs/34/3456')).equals(bytes)).toBe(true);
    expect((await stat(join(root, 'packs', '34', '3456'))).mode & 0o777).toBe(0o400);
    expect(await readdir(cache)).toEqual([]);
    expect(await readdir(join(root, 'packs', '34'))).toEqual(['3456']);
    await writeFile(join(cache, 'pack-2'), 'other', { mode: 0o400 });
    await expect(storage.adopt('packs/34/3456', join(cache, 'pack-2'), { ifAbsent: true })).rejects.toMatchObject({ reason: 'exists' });
    expect(await readdir(join(root, 'packs', '34'))).toEqual(['3456']);
    expect((await storage.get('packs/34/3456')).equals(bytes)).toBe(true);
  } finally {
    await mount.unmount();
  }
});

test('a full disk: put fails with ENGINE_NO_SPACE and leaves no temporary file; the object is absent, the store still works', async () => {
  const mount = await Tmpfs.mount(join(dir.path, 'full'), 4);
  try {
    await mkdir(join(mount.path, 'repo', 'tmp'), { recursive: true });
    const storage = new LocalStorage(join(mount.path, 'repo'), { tempDir: join(mount.path, 'repo', 'tmp') });
    await storage.put('backups/aa', Buffer.from('small'));
    await mount.fill(64 * 1024);
    await expect(storage.put('packs/00/0099', randomBytes(1 << 20))).rejects.toMatchObject({ code: 'ENGINE_NO_SPACE' });
    expect(await readdir(join(mount.path, 'repo', 'tmp'))).toEqual([]);
    await expect(storage.stat('packs/00/0099')).rejects.toMatchObject({ reason: 'not-found' });
    await mount.unfill();
    await storage.put('packs/00/0099', Buffer.from('fits now'));
    expect((await storage.get('packs/00/0099')).toString()).toBe('fits now');
  } finally {
    await mount.unmount();
  }
});

test('an object cut behind the engine\'s back: a ranged read past its new end is out-of-range', async () => {
  const root = join(dir.path, 'cut');
  await mkdir(root);
  const storage = new LocalStorage(root);
  await storage.put('packs/cc/cc01', randomBytes(10_000));
  await writeFile(join(root, 'packs', 'cc', 'cc01'), randomBytes(5_000), { flag: 'w' }).catch(async () => {
    // 0400: the owner cannot open it for writing without root; the test runs as root, where it can.
    throw new Error('cannot cut the object');
  });
  await expect(storage.get('packs/cc/cc01', { range: { offset: 4_000, length: 2_000 } })).rejects.toMatchObject({ reason: 'out-of-range' });
  expect((await storage.get('packs/cc/cc01', { range: { offset: 4_000, length: 1_000 } })).length).toBe(1_000);
});
