/**
 * Golden repositories: every format version, as written by the engine at the commit in the folder's name
 * (test/fixtures/make-fixture.sh made them; see test/fixtures/README.md), stays readable by this engine.
 * Each is copied first (reading takes the lock and registers readers), then verified chunk by chunk, every
 * recorded disk restored and compared by sha256 with what was backed up, and a new backup made into it
 * (deduplicated against the old chunks) restores too.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readdirSync, readFileSync } from 'node:fs';
import { cp, readdir, rm, rmdir } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { restore as engineRestore } from '../dist/engine/index.js';
import { inEnvironment, passphraseOf, verifiesClean } from './library-calls.js';
import { parseJson, runEngine, sha256File, sparseFile, tempDir, writeRegion, type BackupJson } from './helpers.js';

interface Expected {
  encrypted: boolean;
  passphrase?: string;
  mapDepth?: number;
  /** Records made by engine copy (make-copy-fixture.sh): the first restore is the chain's full, the second its incremental. */
  copies?: boolean;
  restores: { id: string; disk: string; sha256: string }[];
}

const FIXTURES = fileURLToPath(new URL('./fixtures/', import.meta.url));
const fixtures = readdirSync(FIXTURES, { withFileTypes: true })
  .filter((entry) => entry.isDirectory())
  .map((entry) => entry.name)
  .sort();

async function removeEmptyDirectories(path: string): Promise<boolean> {
  let empty = true;
  for (const entry of await readdir(path, { withFileTypes: true })) {
    if (entry.isDirectory() && (await removeEmptyDirectories(join(path, entry.name)))) await rmdir(join(path, entry.name));
    else empty = false;
  }
  return empty;
}

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-fixtures-'));
});
afterAll(async () => {
  await cleanup();
});

test('there is a golden repository of every format version', () => {
  const versions = new Set(fixtures.map((name) => name.split('-')[0]));
  expect([...versions].sort()).toEqual(['v1', 'v2', 'v3']);
});

test('every format version has a golden repository whose maps have an interior level (depth >= 1)', () => {
  // make-deep-map-fixture.sh records the depth; test/spec-reader.test.ts checks it against the records.
  const deep = fixtures.filter((name) => ((JSON.parse(readFileSync(join(FIXTURES, name, 'expected.json'), 'utf8')) as Expected).mapDepth ?? 0) >= 1);
  expect([...new Set(deep.map((name) => name.split('-')[0]))].sort()).toEqual(['v1', 'v2', 'v3']);
});

describe.each(fixtures)('%s', (fixture) => {
  const expected = JSON.parse(readFileSync(join(FIXTURES, fixture, 'expected.json'), 'utf8')) as Expected;
  const env: Record<string, string> = expected.passphrase === undefined ? {} : { ENGINE_PASSWORD: expected.passphrase };
  let repo: string;

  beforeAll(async () => {
    repo = join(dir, fixture);
    // Format 3: this host's index cache starts empty and catches up from the fixture's segments (SPEC.md 19.4).
    env.ENGINE_CACHE_DIR = join(dir, `${fixture}-cache`);
    await cp(join(FIXTURES, fixture, 'repo'), repo, { recursive: true });
    // git keeps no empty directory: the repository as a clone holds it has no empty packs/xx, tmp/, readers/ or leases/.
    await removeEmptyDirectories(repo);
  });

  // verify and the restores are calls of the library in this process (test/library-calls.ts): what they check is
  // that this engine reads the old repository (the chunks, the bytes restored), not the CLI; list's JSON is the CLI's.
  test('verify --read-data finds every chunk intact', async () => {
    await verifiesClean(repo, env);
  });

  test('lists every backup it holds', async () => {
    const result = await runEngine(['list', '--repo', repo, '--json'], { env });
    expect(result.code, result.stderr).toBe(0);
    const ids = parseJson<{ backups: { id: string }[] }>(result.stdout).backups.map((backup) => backup.id);
    expect(new Set(ids)).toEqual(new Set(expected.restores.map((restore) => restore.id)));
    const backups = parseJson<{ backups: { id: string; parent: string | null; consistency: unknown; copiedFrom: unknown }[] }>(result.stdout).backups;
    if (expected.copies) {
      // Records made by engine copy (SPEC.md 9, 22): each names its original; the chain points at the copies.
      for (const backup of backups) expect(backup.copiedFrom).toEqual({ repository: expect.stringMatching(/^[0-9a-f]{32}$/), backup: expect.stringMatching(/^[0-9a-f]{32}$/) });
      expect(backups.find((b) => b.id === expected.restores[1]!.id)!.parent).toBe(expected.restores[0]!.id);
      return;
    }
    // Records of engines before the consistency field: shown as crash, not recorded (SPEC.md 9).
    for (const backup of backups) {
      expect(backup.consistency).toEqual({ level: 'crash', method: 'not recorded', freezeMs: null, reason: null });
      expect(backup.copiedFrom).toBeNull();
    }
  });

  test.each(expected.restores.map((restore) => [restore.id.slice(0, 8), restore.disk, restore] as const))(
    'backup %s disk %s restores to the bytes backed up',
    async (_id, _disk, restore) => {
      const target = join(dir, `${fixture}-${restore.id}-${restore.disk}.img`);
      await inEnvironment(env, () => engineRestore({ repo, passphrase: passphraseOf(env), backupId: restore.id, disk: restore.disk, target: { kind: 'path', path: target } }));
      expect(await sha256File(target)).toBe(restore.sha256);
      await rm(target);
    },
  );

  test('takes a new backup that deduplicates against its old chunks and restores', async () => {
    const image = join(dir, `${fixture}-new.img`);
    await sparseFile(image, 1024 * 1024);
    await writeRegion(image, 0, 256 * 1024, 'random', fixture);
    const first = await runEngine(['backup', '--repo', repo, '--source', image, '--json'], { env });
    expect(first.code, first.stdout + first.stderr).toBe(0);
    const second = parseJson<BackupJson>((await runEngine(['backup', '--repo', repo, '--source', image, '--json'], { env })).stdout);
    expect(second.disks[0]?.blocksNew).toBe(0);
    expect((second as BackupJson & { consistency: unknown }).consistency).toEqual({ level: 'crash', method: 'no quiesce asked', freezeMs: null, reason: null });
    const target = join(dir, `${fixture}-new-restored.img`);
    expect((await runEngine(['restore', '--repo', repo, second.id, '--to', target], { env })).code).toBe(0);
    expect(await sha256File(target)).toBe(await sha256File(image));
  });
});
