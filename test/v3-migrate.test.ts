/**
 * `engine migrate REPO` (SPEC.md 19.11) through the CLI: a version-1 repository with a qcow2 incremental chain
 * and an encrypted version-2 one, each with several backups, become version 3 in place; then every backup
 * restores byte for byte, verify --read-data is clean, and a new backup deduplicates against the migrated
 * data. kill -9 at each step leaves the row of 19.11's crash table (checked row by row), and migrate run again
 * finishes.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { copyFile, readdir, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { qcow2, qemuImgCompare, qemuIo } from './qemu.js';
import { filesIdentical, parseJson, runEngine, tempDir, writeRegion, type BackupJson } from './helpers.js';

const MiB = 1024 * 1024;
let scratch: { path: string; cleanup: () => Promise<void> };
const PASSWORD = 'correct horse battery staple';

beforeAll(async () => {
  scratch = await tempDir('engine-v3-migrate-');
});
afterAll(async () => {
  await scratch?.cleanup();
});

interface MigrateJson {
  repo: string;
  from: number;
  version: number;
  segments: number;
  blobs: number;
  resumed: boolean;
  removed: string[];
}

/** The encrypted repository's tests set ENGINE_PASSWORD through this; the plain ones must not give one. */
let password: Record<string, string> = {};

function env(extra: Record<string, string> = {}): Record<string, string> {
  return { ENGINE_CACHE_DIR: join(scratch.path, 'cache'), ...password, ...extra };
}

/** A backup to restore: the file (raw) or image (qcow2) it must equal. */
type Expected = { path: string; format: 'raw' | 'qcow2' };

async function restoresIdentical(repo: string, backups: Map<string, Expected>): Promise<void> {
  for (const [id, expected] of backups) {
    const target = join(scratch.path, `restore-${id}-${Math.random().toString(16).slice(2)}.raw`);
    const r = await runEngine(['restore', '--repo', repo, id, '--to', target], { env: env() });
    expect(r.code, r.stderr).toBe(0);
    if (expected.format === 'raw') expect(await filesIdentical(target, expected.path), id).toBe(true);
    else expect(await qemuImgCompare(target, 'raw', expected.path, 'qcow2'), id).toBe(true);
  }
}

async function verifiesClean(repo: string, backups: number): Promise<void> {
  const r = await runEngine(['verify', '--repo', repo, '--read-data', '--json'], { env: env() });
  expect(r.code, `${r.stdout}\n${r.stderr}`).toBe(0);
  expect(parseJson<{ ok: boolean; backups: number }>(r.stdout)).toMatchObject({ ok: true, backups });
}

async function configVersion(repo: string): Promise<number> {
  return (JSON.parse(await readFile(join(repo, 'config'), 'utf8')) as { version: number }).version;
}

async function migrate(repo: string, extra: Record<string, string> = {}): Promise<{ code: number; json: MigrateJson | undefined; stderr: string }> {
  const r = await runEngine(['migrate', repo, '--json'], { env: env(extra) });
  // With --json a failure is a JSON error on stdout: both are what the user reads.
  return { code: r.code, json: r.code === 0 ? parseJson<MigrateJson>(r.stdout) : undefined, stderr: `${r.stderr}${r.code === 0 ? '' : r.stdout}` };
}

/** The top of a version-3 folder: nothing of version 1/2 is left. */
const V3_TOP = new Set(['config', 'packs', 'backups', 'index', 'leases', 'keys', 'protected', 'quarantine']);

async function expectVersion3Layout(repo: string): Promise<void> {
  expect(await configVersion(repo)).toBe(3);
  const top = await readdir(repo);
  expect(top.filter((name) => !V3_TOP.has(name))).toEqual([]);
  const index = await readdir(join(repo, 'index'));
  expect(index.length).toBeGreaterThanOrEqual(1);
  for (const name of index) expect(name).toMatch(/^[0-9a-f]{32}-[0-9a-f]{8}$/);
}

/** A version-1 repository: a qcow2 chain (full, incremental, incremental) and a raw file twice. */
async function version1Repository(name: string): Promise<{ repo: string; backups: Map<string, Expected>; raw: string }> {
  const repo = join(scratch.path, name);
  expect((await runEngine(['init', '--format', '1', repo])).code).toBe(0);
  const backups = new Map<string, Expected>();
  const image = join(scratch.path, `${name}.qcow2`);
  await qcow2(image, '256M');
  await qemuIo(image, ['write -P 0xab 0 6M', 'write -P 0xcd 100M 3M']);
  const chain: string[] = [];
  for (const [step, writes] of [[0, []], [1, ['write -P 0x11 2M 1M', 'write -P 0x22 200M 1M']], [2, ['write -P 0x33 100M 2M']]] as const) {
    if (writes.length > 0) await qemuIo(image, [...writes]);
    const r = await runEngine(['backup', '--repo', repo, '--image', image, '--json', ...(step === 0 ? ['--auto'] : ['--incremental'])], { env: env() });
    expect(r.code, r.stderr).toBe(0);
    const json = parseJson<BackupJson>(r.stdout);
    expect(json.type).toBe(step === 0 ? 'full' : 'incremental');
    const frozen = join(scratch.path, `${name}-frozen-${step}.qcow2`);
    await copyFile(image, frozen);
    backups.set(json.id, { path: frozen, format: 'qcow2' });
    chain.push(json.id);
  }
  const raw = join(scratch.path, `${name}.raw`);
  await writeRegion(raw, 0, 5 * MiB, 'random', name);
  const r = await runEngine(['backup', '--repo', repo, '--source', raw, '--json'], { env: env() });
  expect(r.code, r.stderr).toBe(0);
  backups.set(parseJson<BackupJson>(r.stdout).id, { path: raw, format: 'raw' });
  return { repo, backups, raw };
}

describe('engine migrate', () => {
  test('a version-1 repository with a qcow2 incremental chain: migrated, every backup restores byte for byte, verify clean, a new backup dedupes', async () => {
    const { repo, backups, raw } = await version1Repository('v1');
    const migrated = await migrate(repo);
    expect(migrated.code, migrated.stderr).toBe(0);
    expect(migrated.json).toMatchObject({ from: 1, version: 3, resumed: false });
    expect(migrated.json!.segments).toBe(1);
    expect(migrated.json!.blobs).toBeGreaterThan(10);
    expect(migrated.json!.removed).toEqual(expect.arrayContaining(['index.v2', 'tmp', 'reserve', 'lock']));
    await expectVersion3Layout(repo);
    const list = await runEngine(['list', '--repo', repo, '--json'], { env: env() });
    expect(list.code, list.stderr).toBe(0);
    expect(parseJson<{ backups: { id: string }[] }>(list.stdout).backups.map((b) => b.id).sort()).toEqual([...backups.keys()].sort());
    await restoresIdentical(repo, backups);
    await verifiesClean(repo, backups.size);
    const again = await runEngine(['backup', '--repo', repo, '--source', raw, '--json'], { env: env() });
    expect(again.code, again.stderr).toBe(0);
    const json = parseJson<BackupJson>(again.stdout);
    expect(json.disks[0]!.blocksNew).toBe(0);
    expect(json.disks[0]!.blocksDeduplicated).toBe(5);
    // Run again, migrate has nothing to do.
    const twice = await migrate(repo);
    expect(twice.code, twice.stderr).toBe(0);
    expect(twice.json).toMatchObject({ from: 3, removed: [] });
  });

  test('an encrypted version-2 repository: migrated with its passphrase (segments sealed), restores, verify clean, dedupe; a wrong passphrase changes nothing', async () => {
    const repo = join(scratch.path, 'v2');
    password = { ENGINE_PASSWORD: PASSWORD };
    expect((await runEngine(['init', '--format', '2', '--encrypt', repo], { env: env() })).code).toBe(0);
    const backups = new Map<string, Expected>();
    const files: string[] = [];
    for (let i = 0; i < 3; i++) {
      const file = join(scratch.path, `v2-${i}.raw`);
      await writeRegion(file, 0, 3 * MiB, 'random', 'v2-shared');
      await writeRegion(file, 3 * MiB, 2 * MiB, 'random', `v2-${i}`);
      const r = await runEngine(['backup', '--repo', repo, '--source', file, '--json'], { env: env() });
      expect(r.code, r.stderr).toBe(0);
      backups.set(parseJson<BackupJson>(r.stdout).id, { path: file, format: 'raw' });
      files.push(file);
    }
    expect(await configVersion(repo)).toBe(2);
    const wrong = await migrate(repo, { ENGINE_PASSWORD: 'not the passphrase at all' });
    expect(wrong.code).toBe(6);
    expect(await configVersion(repo)).toBe(2);
    expect(await readdir(join(repo, 'tmp'))).toEqual([]);

    const migrated = await migrate(repo);
    expect(migrated.code, migrated.stderr).toBe(0);
    expect(migrated.json).toMatchObject({ from: 2, version: 3 });
    await expectVersion3Layout(repo);
    const config = JSON.parse(await readFile(join(repo, 'config'), 'utf8')) as { encryption?: { keyFile: string }; hash: string };
    expect(config.encryption?.keyFile).toMatch(/^keys\//);
    for (const name of await readdir(join(repo, 'index'))) expect((await readFile(join(repo, 'index', name))).subarray(0, 4).toString('latin1')).toBe('EENC');
    await restoresIdentical(repo, backups);
    await verifiesClean(repo, backups.size);
    const again = await runEngine(['backup', '--repo', repo, '--source', files[1]!, '--json'], { env: env() });
    expect(again.code, again.stderr).toBe(0);
    expect(parseJson<BackupJson>(again.stdout).disks[0]!.blocksNew).toBe(0);
    password = {};
  });

  test('refuses while a reader is registered and while an oVirt journal exists, changing nothing', async () => {
    const repo = join(scratch.path, 'busy');
    expect((await runEngine(['init', '--format', '1', repo])).code).toBe(0);
    const { registerReader } = await import('../dist/repo-format/readers.js');
    const reader = await registerReader(repo, 'serve', []);
    const busy = await migrate(repo);
    expect(busy.code).toBe(3);
    expect(busy.stderr).toMatch(/in use by serve/);
    await reader.release();
    const { writeFile, mkdir } = await import('node:fs/promises');
    await mkdir(join(repo, 'journal'), { mode: 0o700 });
    await writeFile(join(repo, 'journal', '0123456789abcdef.json'), '{}');
    const journal = await migrate(repo);
    expect(journal.code).toBe(3);
    expect(journal.stderr).toMatch(/engine ovirt cleanup/);
    expect(await configVersion(repo)).toBe(1);
  });

  describe('kill -9 at each step leaves the row of the crash table; migrate run again finishes', () => {
    const rows: [string, (repo: string, backups: Map<string, Expected>) => Promise<void>][] = [
      [
        'migrate-segment-written', // in 1: a version-1 repository with files under tmp/
        async (repo, backups) => {
          expect(await configVersion(repo)).toBe(1);
          expect(await readdir(join(repo, 'tmp', 'migrate-index'))).toHaveLength(1);
          await restoresIdentical(repo, backups);
        },
      ],
      [
        'migrate-index-aside', // between the renames: no index/, a version-1 repository whose index is rebuilt from the packs
        async (repo, backups) => {
          expect(await configVersion(repo)).toBe(1);
          await expect(stat(join(repo, 'index'))).rejects.toThrow(/ENOENT/);
          await restoresIdentical(repo, backups);
          expect((await stat(join(repo, 'index', 'CURRENT'))).isFile()).toBe(true);
        },
      ],
      [
        'migrate-index-swapped', // after 2, before 3: mid-migration, refused by every command but migrate
        async (repo) => {
          expect(await configVersion(repo)).toBe(1);
          for (const args of [['list', '--repo', repo], ['verify', '--repo', repo], ['backup', '--repo', repo, '--source', join(scratch.path, 'crash-seed.raw')]]) {
            const r = await runEngine(args, { env: env() });
            expect(r.code, args[0]).toBe(5);
            expect(r.stderr).toMatch(/engine migrate/);
            expect(r.stderr.trim().split('\n')).toHaveLength(1);
          }
        },
      ],
      [
        'migrate-config-written', // after 3: a version-3 repository with leftovers, which version 3 ignores
        async (repo, backups) => {
          expect(await configVersion(repo)).toBe(3);
          expect(await readdir(repo)).toEqual(expect.arrayContaining(['index.v2', 'lock', 'tmp']));
          await restoresIdentical(repo, backups);
        },
      ],
      [
        'migrate-leftover-removed', // after 3, some leftovers removed
        async (repo, backups) => {
          expect(await configVersion(repo)).toBe(3);
          expect(await readdir(repo)).toContain('lock');
          await restoresIdentical(repo, backups);
        },
      ],
    ];

    test.each(rows)('kill -9 at %s', async (point, checkRow) => {
      const repo = join(scratch.path, `crash-${point}`);
      expect((await runEngine(['init', '--format', '1', repo])).code).toBe(0);
      const backups = new Map<string, Expected>();
      for (let i = 0; i < 2; i++) {
        const file = join(scratch.path, `crash-${point}-${i}.raw`);
        await writeRegion(file, 0, 3 * MiB, 'random', `crash-${point}-${i}`);
        if (i === 0) await copyFile(file, join(scratch.path, 'crash-seed.raw'));
        const r = await runEngine(['backup', '--repo', repo, '--source', file, '--json'], { env: env() });
        expect(r.code, r.stderr).toBe(0);
        backups.set(parseJson<BackupJson>(r.stdout).id, { path: file, format: 'raw' });
      }
      const crashed = await migrate(repo, { ENGINE_CRASH_AT: point });
      expect(crashed.code, crashed.stderr).toBe(137);
      await checkRow(repo, backups);
      const finished = await migrate(repo);
      expect(finished.code, finished.stderr).toBe(0);
      if (point === 'migrate-index-swapped') expect(finished.json!.resumed).toBe(true);
      await expectVersion3Layout(repo);
      await restoresIdentical(repo, backups);
      await verifiesClean(repo, backups.size);
      const seed = [...backups.values()][0]!.path;
      const again = await runEngine(['backup', '--repo', repo, '--source', seed, '--json'], { env: env() });
      expect(again.code, again.stderr).toBe(0);
      expect(parseJson<BackupJson>(again.stdout).disks[0]!.blocksNew).toBe(0);
    });
  });
});
