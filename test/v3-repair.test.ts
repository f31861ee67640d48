/**
 * repair on format version 3 (SPEC.md 19.12), through the CLI, on a folder and on S3 (the tests' own Ceph
 * RADOS Gateway), with real damage done behind the engine's back: every segment deleted (and the host's
 * cache with them), a segment cut short, a byte of a pack's frame flipped. repair rebuilds the segments from
 * the packs under the exclusive lease, quarantines the damaged frame and names the backup that still
 * references it (exit 4); every backup restores byte for byte (cmp) afterwards, the damaged one once a new
 * backup of its source stored a good copy, and verify --read-data is clean.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { rm, truncate, writeFile, chmod } from 'node:fs/promises';
import { join } from 'node:path';
import { restoresIdentical, verifiesClean } from './library-calls.js';
import { startRgwCluster, type RgwCluster } from './rgw.js';
import { createBucket, repositoryKeys, repositoryObject, v3Env, withRgwStorage } from './s3-helpers.js';
import { parseJson, runEngine, tempDir, writeRegion, type BackupJson } from './helpers.js';
import { scanPack } from '../dist/repo-format/pack-file.js';

const MiB = 1024 * 1024;
const BUCKET = 'engine-v3-repair';
let cluster: RgwCluster;
let scratch: { path: string; cleanup: () => Promise<void> };

interface RepairJson {
  previousIndex: string;
  index: { packs: number; blobs: number };
  quarantined: { pack: string; offset: number; blob: string | null }[];
  damaged: { code: string; backup: string }[];
  ok: boolean;
}

const env = (kind: string): Record<string, string> => v3Env(cluster, scratch.path, `cache-${kind}`);

beforeAll(async () => {
  scratch = await tempDir('engine-v3-repair-');
  cluster = await startRgwCluster({ memstoreBytes: 512 * MiB });
  await createBucket(cluster, BUCKET);
});

afterAll(async () => {
  await cluster?.stop();
  await scratch?.cleanup();
});

for (const kind of ['folder', 's3'] as const) {
  describe(`repair on version 3, ${kind === 'folder' ? 'a folder' : 'S3 (RGW)'}`, () => {
    const e = (): Record<string, string> => env(kind);
    let repo: string;
    const backups = new Map<string, string>();

    /** The store's objects as the engine never touches them: read, replaced, deleted behind its back. */
    const store = {
      async keys(prefix: string): Promise<string[]> {
        return (await repositoryKeys(cluster, repo)).filter((k) => k.startsWith(prefix));
      },
      async get(key: string): Promise<Buffer> {
        return repositoryObject(cluster, repo, key);
      },
      async replace(key: string, bytes: Buffer): Promise<void> {
        if (kind === 'folder') {
          await chmod(join(repo, key), 0o600);
          await writeFile(join(repo, key), bytes);
          return;
        }
        await withRgwStorage(cluster, repo, (storage) => storage.put(key, bytes));
      },
      async delete(key: string): Promise<void> {
        if (kind === 'folder') return rm(join(repo, key), { force: true });
        await withRgwStorage(cluster, repo, (storage) => storage.delete(key));
      },
    };

    async function repair(): Promise<{ code: number; report: RepairJson; stderr: string }> {
      const r = await runEngine(['repair', '--repo', repo, '--json'], { env: e() });
      return { code: r.code, report: parseJson<RepairJson>(r.stdout), stderr: r.stderr };
    }

    async function restores(id: string, source: string): Promise<boolean> {
      const target = join(scratch.path, `${kind}-restore-${id}-${Math.random().toString(16).slice(2)}.raw`);
      // A call of the library in this process (test/library-calls.ts): repair is what is tested, this reads its result.
      const same = await restoresIdentical(repo, id, source, target, e());
      await rm(target, { force: true });
      return same;
    }

    /**
     * One new backup of each source a damaged backup was taken of: it stores a good copy of the damaged chunk.
     * Once per source, not per damaged backup: a second backup of the same source stores nothing (deduplicated)
     * and only adds a backup to restore after every later fault.
     */
    async function healFrom(report: RepairJson): Promise<void> {
      const sources = new Set(report.damaged.map((d) => backups.get(d.backup)!));
      expect(sources.size).toBeGreaterThan(0);
      for (const source of sources) {
        const r = await runEngine(['backup', '--repo', repo, '--source', source, '--json'], { env: e() });
        expect(r.code, r.stderr).toBe(0);
        backups.set(parseJson<BackupJson>(r.stdout).id, source);
      }
    }

    async function everythingRestores(): Promise<void> {
      for (const [id, source] of backups) expect(await restores(id, source), `backup ${id}`).toBe(true);
      expect((await verifiesClean(repo, e())).ok).toBe(true);
    }

    test('every segment deleted behind the engine, and the host cache with them: restore fails; repair rebuilds the segments from the packs; everything restores', async () => {
      repo = kind === 'folder' ? join(scratch.path, 'repo') : `s3://${BUCKET}/repo`;
      expect((await runEngine(['init', '--format', '3', repo], { env: e() })).code).toBe(0);
      for (const name of ['one', 'two']) {
        const source = join(scratch.path, `${kind}-${name}.img`);
        await writeRegion(source, 0, 3 * MiB, 'random', `${kind}-shared`);
        await writeRegion(source, 3 * MiB, 3 * MiB, 'random', `${kind}-${name}`);
        const r = await runEngine(['backup', '--repo', repo, '--source', source, '--json'], { env: e() });
        expect(r.code, r.stderr).toBe(0);
        backups.set(parseJson<BackupJson>(r.stdout).id, source);
      }
      const segments = await store.keys('index/');
      expect(segments).toHaveLength(2);
      for (const key of segments) await store.delete(key);
      await rm(join(scratch.path, `cache-${kind}`), { recursive: true, force: true });
      const [first, source] = [...backups.entries()][0]!;
      expect(await restores(first, source)).toBe(false);

      const repaired = await repair();
      expect(repaired.code, repaired.stderr).toBe(0);
      expect(repaired.report).toMatchObject({ previousIndex: 'missing', ok: true, quarantined: [] });
      expect(repaired.report.index.blobs).toBe(9 + 2); // 9 distinct chunks, one map page per backup
      const rebuilt = await store.keys('index/');
      expect(rebuilt).toHaveLength(1);
      expect(await store.keys('leases/')).toEqual([]);
      await everythingRestores();
    });

    test('a segment cut short behind the engine: repair replaces it (the old index was unreadable), everything restores', async () => {
      const [key] = await store.keys('index/');
      await store.replace(key!, (await store.get(key!)).subarray(0, 100));
      const repaired = await repair();
      expect(repaired.code, repaired.stderr).toBe(0);
      expect(repaired.report.previousIndex).toBe('unreadable');
      const now = await store.keys('index/');
      expect(now).toHaveLength(1);
      expect(now).not.toContain(key);
      await everythingRestores();
    });

    test('a byte of a chunk flipped in a pack: repair quarantines the frame and names the backups that need it (exit 4); a new backup of the source heals them', async () => {
      const packs = await store.keys('packs/');
      const sizes = await Promise.all(packs.map(async (key) => (await store.get(key)).length));
      const pack = packs[sizes.indexOf(Math.max(...sizes))]!;
      const bytes = await store.get(pack);
      bytes[32 + 48 + 1000] ^= 0x40; // the first frame's payload
      await store.replace(pack, bytes);
      if (kind === 'folder') await truncate(join(repo, pack), bytes.length); // unchanged size: only the byte differs

      const repaired = await repair();
      expect(repaired.code, repaired.stderr).toBe(4);
      expect(repaired.report.quarantined).toHaveLength(1);
      expect(repaired.report.quarantined[0]!.pack).toBe(pack.split('/')[2]);
      expect(repaired.report.damaged.map((d) => d.code)).toContain('CHUNK_DAMAGED');
      expect(await store.keys('quarantine/')).toHaveLength(1);
      // A new backup of each damaged backup's source stores a good copy of the chunk: the old ones heal.
      await healFrom(repaired.report);
      await everythingRestores();
    });

    // On S3 only: each point lies between two store operations (the quarantine written, the index swapped), so what
    // repair leaves is the protocol's and the same on a folder; the folder's own writes are cut short elsewhere
    // (crash-v3.test.ts's random kills).
    test.each(kind === 's3' ? ['repair-quarantined', 'repair-index-swapped'] : [])('kill -9 in repair at %s with a damaged chunk: every command opens the repository, repair run again finishes, a new backup heals', async (point) => {
      const packs = await store.keys('packs/');
      const sizes = await Promise.all(packs.map(async (key) => (await store.get(key)).length));
      const pack = packs[sizes.indexOf(Math.max(...sizes))]!;
      const packId = pack.split('/')[2]!;
      const frames = (kind === 'folder' ? await scanPack(repo, packId, false) : await withRgwStorage(cluster, repo, (storage) => scanPack(storage, packId, false))).frames;
      const frame = frames[point === 'repair-quarantined' ? 1 : 2]!;
      const bytes = await store.get(pack);
      bytes[frame.offset + 48 + 100] ^= 0x40;
      await store.replace(pack, bytes);

      const crashed = await runEngine(['repair', '--repo', repo], { env: { ...e(), ENGINE_CRASH_AT: point } });
      expect(crashed.code, crashed.stderr).toBe(137);
      const list = await runEngine(['list', '--repo', repo, '--json'], { env: e() });
      expect(list.code, list.stderr).toBe(0);
      expect(parseJson<{ backups: { id: string }[] }>(list.stdout).backups.map((b) => b.id).sort()).toEqual([...backups.keys()].sort());
      const again = await repair();
      expect(again.code, again.stderr).toBe(4);
      expect(again.report.damaged.map((d) => d.code)).toContain('CHUNK_DAMAGED');
      expect(await store.keys('index/')).toHaveLength(1);
      expect(await store.keys('leases/')).toEqual([]);
      await healFrom(again.report);
      await everythingRestores();
    });

    test('the config deleted, then damaged, behind the engine: every command refuses it; repair rebuilds it (block size from the records, the damaged one kept beside it) and everything restores', async () => {
      await store.delete('config');
      const refused = await runEngine(['list', '--repo', repo], { env: e() });
      expect(refused.code).toBe(5);
      const rebuilt = await runEngine(['repair', '--repo', repo, '--json'], { env: e() });
      expect(rebuilt.code, rebuilt.stderr).toBe(0);
      const report = parseJson<RepairJson & { configRebuilt: { version: number; blockSize: number; keptAs: string | null; sources: { blockSize: string } } | null }>(rebuilt.stdout);
      expect(report.configRebuilt).toMatchObject({ version: 3, blockSize: MiB, keptAs: null, sources: { blockSize: 'records' } });
      await everythingRestores();

      await store.replace('config', Buffer.from('{"not": "a config"'));
      expect((await runEngine(['list', '--repo', repo], { env: e() })).code).toBe(5);
      const again = await runEngine(['repair', '--repo', repo, '--json'], { env: e() });
      expect(again.code, again.stderr).toBe(0);
      const keptAs = parseJson<{ configRebuilt: { keptAs: string } }>(again.stdout).configRebuilt.keptAs;
      expect(keptAs).toMatch(/^config\.damaged-\d+$/);
      expect((await store.get(keptAs)).toString()).toBe('{"not": "a config"');
      await everythingRestores();
    });
  });
}
