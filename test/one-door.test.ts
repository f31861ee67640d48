/**
 * One door to the repository's bytes (issue 14, item 1): engine/ reaches packs, records, config, keys and
 * markers only through the repository and its store (repo-format/store.ts), never by building a path into
 * the repository folder or opening its files.
 *
 * Two checks, each able to fail on its own:
 * - in the sources: engine/ imports none of the layout's path helpers or raw pack/record file functions,
 *   names none of the store's folders, never looks inside the repository's frame locators, and the block
 *   workers import no file system module (they get a frame's bytes, or a locator repo-format reads);
 * - in a run: every repository opened in this process keeps its objects in an in-memory store, so the
 *   repository folder holds only the host's files (lock, index, tmp/); init, two backups, restore, verify
 *   --read-data, forget, gc (deleting and rewriting packs), repair, protect and prune run against it and
 *   restore byte for byte. Any code that reads or writes an object as a file under the folder finds nothing
 *   there and fails.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { backup, forget, gc, initRepository, prune, repair, restore, setProtection, verify } from '../dist/engine/index.js';
import { useStoreOpener } from '../dist/repo-format/store.js';
import { MemoryStorage } from '../dist/repo-format/storage/memory.js';
import type { CallOptions, GetOptions, ListOptions, ObjectInfo, PutOptions, PutSource, Storage } from '../dist/repo-format/storage/storage.js';
import { filesIdentical, tempDir, writeRegion } from './helpers.js';

const ENGINE_DIR = fileURLToPath(new URL('../engine', import.meta.url));

async function sourcesUnder(dir: string): Promise<string[]> {
  const files: string[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) files.push(...(await sourcesUnder(path)));
    else if (entry.name.endsWith('.ts')) files.push(path);
  }
  return files;
}

/** Functions of repo-format that take a repository folder's path or a raw store: the repository's own business. */
const FORBIDDEN_IMPORTS = [
  'packPath',
  'readFrameBytes',
  'readPackBytes',
  'readPackSpan',
  'scanPack',
  'notOwnPack',
  'deletePack',
  'packSize',
  'publishFile',
  'writeFileDurably',
  'readBoundedFile',
  'scanPackFiles',
  'scanRecordFiles',
  'packKey',
  'recordKey',
  'openStore',
  'LocalStorage',
];
/** The store's folders: no LAYOUT.packs and the like in engine/ (the host's lock, tmp/, index/, readers/ and writers/ are the engine's to manage). */
const STORE_FOLDERS = ['packs', 'backups', 'config', 'keys', 'protected', 'quarantine'];

/** Every breach of the one door in one engine/ source file, as "file:line: what". */
export function doorBreaches(file: string, text: string): string[] {
  const found: string[] = [];
  const say = (index: number, what: string): void => {
    found.push(`${relative(ENGINE_DIR, file)}:${text.slice(0, index).split('\n').length}: ${what}`);
  };
  for (const match of text.matchAll(/import\s+(?:type\s+)?\{([^}]*)\}\s+from\s+'([^']+)'/g)) {
    if (!match[2]!.includes('repo-format/')) continue;
    const names = match[1]!.split(',').map((name) => name.trim().replace(/^type\s+/, '').split(/\s+as\s+/)[0]!);
    for (const name of names) if (FORBIDDEN_IMPORTS.includes(name)) say(match.index, `imports ${name} from ${match[2]}`);
  }
  for (const match of text.matchAll(new RegExp(`LAYOUT\\.(${STORE_FOLDERS.join('|')})\\b`, 'g'))) say(match.index, `names the store's folder ${match[0]}`);
  for (const match of text.matchAll(/(['"`])(packs|backups|quarantine|protected)\/[^'"`]*\1?/g)) say(match.index, `builds a store path ${match[0]}`);
  for (const match of text.matchAll(/\$\{(PACKS|RECORDS|QUARANTINE|PROTECTED)_PREFIX\}/g)) say(match.index, `builds a store path from ${match[1]}_PREFIX`);
  for (const match of text.matchAll(/join\([^)]*['"](packs|backups|quarantine|protected|keys|config)['"]/g)) say(match.index, `joins the store's folder ${match[1]}`);
  for (const match of text.matchAll(/\blocator\??\.(file|offset|kind)\b/g)) say(match.index, `looks inside a frame locator (${match[0]}): it is the repository's`);
  if (file.endsWith(join('pipeline', 'block-worker.ts'))) {
    for (const match of text.matchAll(/from\s+'(node:)?fs(\/promises)?'/g)) say(match.index, 'a block worker imports the file system: workers get bytes, never paths');
  }
  return found;
}

describe('in the sources', () => {
  test('engine/ builds no path into a repository and opens none of its files; the workers have no file system', async () => {
    const files = await sourcesUnder(ENGINE_DIR);
    expect(files.length).toBeGreaterThan(100);
    const breaches: string[] = [];
    for (const file of files) breaches.push(...doorBreaches(file, await readFile(file, 'utf8')));
    expect(breaches).toEqual([]);
  });

  test('the check finds what it looks for (the breaches engine/ had before the door)', () => {
    const before = [
      "import { packPath } from '../../repo-format/pack-file.js';",
      "const opened = await this.pool.open({ slot, packPath: packPath(this.repo.root, location.packId) });",
      "import { deletePack, notOwnPack, packPath, type PackWriter } from '../../repo-format/pack-file.js';",
      "await writeFileDurably(join(repo.root, LAYOUT.backups, id), copy.bytes, { tempDir: join(repo.root, LAYOUT.tmp) });",
      "const path = `packs/${packId.slice(0, 2)}/${packId}`;",
      "import { scanPackFiles, scanRecordFiles } from '../../repo-format/layout-scan.js';",
      "await repo.store.delete(`${PACKS_PREFIX}${pack.packId.slice(0, 2)}/${pack.packId}`);",
    ].join('\n');
    const breaches = doorBreaches(join(ENGINE_DIR, 'x.ts'), before);
    expect(breaches.map((b) => b.replace(/^x\.ts:\d+: /, ''))).toEqual([
      'imports packPath from ../../repo-format/pack-file.js',
      'imports deletePack from ../../repo-format/pack-file.js',
      'imports notOwnPack from ../../repo-format/pack-file.js',
      'imports packPath from ../../repo-format/pack-file.js',
      'imports scanPackFiles from ../../repo-format/layout-scan.js',
      'imports scanRecordFiles from ../../repo-format/layout-scan.js',
      "names the store's folder LAYOUT.backups",
      'builds a store path `packs/${packId.slice(0, 2)}/${packId}`',
      'builds a store path from PACKS_PREFIX',
    ]);
    const worker = doorBreaches(join(ENGINE_DIR, 'pipeline', 'block-worker.ts'), "import { openSync, readSync, closeSync } from 'node:fs';\nconst fd = openSync(task.locator.file, 'r');");
    expect(worker).toHaveLength(2);
  });
});

/** Every key touched, by operation: what reached the store. */
class RecordingStorage implements Storage {
  readonly touched = new Map<string, Set<string>>();
  constructor(readonly inner: Storage) {}
  get properties(): Storage['properties'] {
    return this.inner.properties;
  }
  private note(operation: string, key: string): void {
    let keys = this.touched.get(operation);
    if (!keys) this.touched.set(operation, (keys = new Set()));
    keys.add(key);
  }
  put(key: string, source: PutSource, options?: PutOptions): Promise<void> {
    this.note('put', key);
    return this.inner.put(key, source, options);
  }
  get(key: string, options?: GetOptions): Promise<Buffer> {
    this.note(options?.range ? 'get-range' : 'get', key);
    return this.inner.get(key, options);
  }
  stat(key: string, options?: CallOptions): Promise<ObjectInfo> {
    this.note('stat', key);
    return this.inner.stat(key, options);
  }
  list(prefix: string, options?: ListOptions): AsyncIterable<ObjectInfo> {
    this.note('list', prefix);
    return this.inner.list(prefix, options);
  }
  delete(key: string, options?: CallOptions): Promise<void> {
    this.note('delete', key);
    return this.inner.delete(key, options);
  }
  async close(): Promise<void> {}
}

async function filesUnder(dir: string): Promise<string[]> {
  const files: string[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true }).catch(() => [])) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) files.push(...(await filesUnder(path)));
    else files.push(path);
  }
  return files;
}

describe('in a run, with the objects in a store that is not the folder', () => {
  const MiB = 1024 * 1024;
  let dir: { path: string; cleanup: () => Promise<void> };
  const stores = new Map<string, RecordingStorage>();

  beforeAll(async () => {
    dir = await tempDir('one-door-');
    useStoreOpener((root) => {
      let store = stores.get(root);
      if (!store) stores.set(root, (store = new RecordingStorage(new MemoryStorage(root))));
      return store;
    });
  });
  afterAll(async () => {
    useStoreOpener(undefined);
    await dir.cleanup();
  });

  for (const encrypted of [false, true]) {
    test(`${encrypted ? 'encrypted' : 'plain'}: init, backups, restore, verify --read-data, forget, gc, repair, protect, prune: every object through the store`, async () => {
      const repo = join(dir.path, encrypted ? 'repo-encrypted' : 'repo-plain');
      const passphrase = encrypted ? 'correct horse battery' : undefined;
      // Version 1 or 2: their objects reach the folder through the store opener (repo-format/store.ts); version 3
      // opens its store by location (a folder or S3), the door by construction, and its runs are test/v3-*.
      await initRepository(repo, { blockSize: 256 * 1024, passphrase, format: encrypted ? 2 : 1 });
      const image = join(dir.path, `${encrypted ? 'e' : 'p'}-disk.img`);
      await writeFile(image, Buffer.alloc(0));
      await writeRegion(image, 0, 6 * MiB, 'random', 'first');
      await writeRegion(image, 6 * MiB, 2 * MiB, 'repeat');
      await writeRegion(image, 12 * MiB, 4 * MiB, 'random', 'tail');
      const first = await backup({ repo, passphrase, from: { kind: 'disks', disks: [{ kind: 'raw', path: image, name: 'disk' }] }, name: 'vm', workers: 2 });
      // The second backup replaces most of the first's data: forgetting the first leaves dead and sparse packs.
      await writeRegion(image, 0, 5 * MiB, 'random', 'second');
      const copy = join(dir.path, `${encrypted ? 'e' : 'p'}-expected.img`);
      await writeFile(copy, await readFile(image));
      const second = await backup({ repo, passphrase, from: { kind: 'disks', disks: [{ kind: 'raw', path: image, name: 'disk' }] }, name: 'vm', chain: { mode: 'full' }, workers: 2 });

      const store = stores.get(repo)!;
      const keys: string[] = [];
      for await (const { key } of store.list('')) keys.push(key);
      expect(keys).toContain('config');
      expect(keys).toContain(`backups/${first.record.id}`);
      expect(keys).toContain(`backups/${second.record.id}`);
      expect(keys.filter((key) => key.startsWith('packs/')).length).toBeGreaterThan(0);
      if (encrypted) expect(keys.filter((key) => key.startsWith('keys/'))).toHaveLength(1);
      // The folder holds the host's files only: nothing of the store's layout.
      const local = (await filesUnder(repo)).map((file) => relative(repo, file));
      expect(local.filter((file) => /^(config|packs|backups|keys|protected|quarantine)(\/|$)/.test(file))).toEqual([]);

      const restored = join(dir.path, `${encrypted ? 'e' : 'p'}-restored.img`);
      await restore({ repo, passphrase, backupId: second.record.id, target: { kind: 'path', path: restored }, workers: 2 });
      expect(await filesIdentical(restored, copy)).toBe(true);
      expect(store.touched.get('get-range')?.size ?? 0).toBeGreaterThan(0);

      const checked = await verify({ repo, passphrase, readData: true, workers: 2 });
      expect(checked.ok).toBe(true);
      expect(checked.problems).toEqual([]);

      await setProtection(repo, second.record.id, true, { passphrase });
      expect((await store.stat(`protected/${second.record.id}`)).size).toBe(0);
      await forget({ repo, passphrase, backupId: first.record.id });
      await expect(store.stat(`backups/${first.record.id}`)).rejects.toMatchObject({ reason: 'not-found' });
      const collected = await gc({ repo, passphrase, rewriteBelow: 0.9 });
      expect(collected.packs.deleted.length + collected.packs.rewritten.length).toBeGreaterThan(0);
      for (const packId of collected.packs.deleted) await expect(store.stat(`packs/${packId.slice(0, 2)}/${packId}`)).rejects.toMatchObject({ reason: 'not-found' });
      expect(store.touched.get('delete')?.size ?? 0).toBeGreaterThan(0);

      const repaired = await repair({ repo, passphrase, workers: 2 });
      expect(repaired.damaged).toEqual([]);
      expect(repaired.ok).toBe(true);
      expect(repaired.index.packs).toBeGreaterThan(0);
      // prune keeps the newest and the protected one, and removes the record between them through the store.
      const third = await backup({ repo, passphrase, from: { kind: 'disks', disks: [{ kind: 'raw', path: image, name: 'disk' }] }, name: 'vm', chain: { mode: 'full' }, workers: 2 });
      await backup({ repo, passphrase, from: { kind: 'disks', disks: [{ kind: 'raw', path: image, name: 'disk' }] }, name: 'vm', chain: { mode: 'full' }, workers: 2 });
      const pruned = await prune({ repo, passphrase, policy: { last: 1 } });
      expect(pruned.removed).toBe(1);
      expect(pruned.backups.filter((b) => !b.keep).map((b) => b.id)).toEqual([third.record.id]);
      await expect(store.stat(`backups/${third.record.id}`)).rejects.toMatchObject({ reason: 'not-found' });
      await restore({ repo, passphrase, backupId: second.record.id, target: { kind: 'path', path: `${restored}.2` }, workers: 2 });
      expect(await filesIdentical(`${restored}.2`, copy)).toBe(true);
      const after = await verify({ repo, passphrase, readData: true, workers: 2 });
      expect(after.problems).toEqual([]);
      expect(after.ok).toBe(true);
      // Still nothing of the store in the folder after gc and repair.
      const later = (await filesUnder(repo)).map((file) => relative(repo, file));
      expect(later.filter((file) => /^(config|packs|backups|keys|protected|quarantine)(\/|$)/.test(file))).toEqual([]);
    }, 240_000);
  }
});
