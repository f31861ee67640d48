/**
 * Format version 3 from the command line (SPEC.md 19, 20): `init --format 3` on a folder and `init
 * s3://bucket/prefix` on the tests' own Ceph RADOS Gateway (test/rgw.ts), with credentials from the AWS
 * environment only; and every command that does not work on version 3 yet refusing it in one line with
 * ENGINE_FORMAT_UNSUPPORTED (exit 5), never misbehaving. s3:// is taken where a repository is expected and
 * still refused for every other path argument.
 */
import { afterAll, beforeAll, expect, test } from 'vitest';
import { mkdir, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { startRgwCluster, type RgwCluster } from './rgw.js';
import { createBucket, withRgwStorage } from './s3-helpers.js';
import { parseJson, runEngine, tempDir } from './helpers.js';

const BUCKET = 'engine-v3';
let cluster: RgwCluster;
let scratch: { path: string; cleanup: () => Promise<void> };

/** The cluster's user as a user gives it: the standard variables, nothing from this machine's ~/.aws. */
function awsEnv(): Record<string, string> {
  return {
    AWS_ACCESS_KEY_ID: cluster.user.accessKeyId,
    AWS_SECRET_ACCESS_KEY: cluster.user.secretAccessKey,
    AWS_SHARED_CREDENTIALS_FILE: join(scratch.path, 'no-credentials'),
    AWS_CONFIG_FILE: join(scratch.path, 'no-config'),
    ENGINE_CACHE_DIR: join(scratch.path, 'cache'),
  };
}

const s3Flags = (): string[] => ['--endpoint', cluster.endpoint, '--region', cluster.region];

interface ConfigJson {
  version: number;
  id: string;
  blockSize: number;
  leases?: { timeMs: number; skewBoundMs: number };
  encryption?: { keyFile: string };
}

beforeAll(async () => {
  scratch = await tempDir();
  cluster = await startRgwCluster({ memstoreBytes: 512 * 1024 * 1024 });
  await createBucket(cluster, BUCKET);
});

afterAll(async () => {
  await cluster?.stop();
  await scratch?.cleanup();
});

test('init --format 3 makes a folder repository of version 3 with its lease timing, and nothing but its config', async () => {
  const repo = join(scratch.path, 'v3-folder');
  const r = await runEngine(['init', '--format', '3', '--json', repo]);
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
  const config = parseJson<ConfigJson>(r.stdout);
  expect(config.version).toBe(3);
  expect(config.leases).toEqual({ timeMs: 300000, skewBoundMs: 60000 });
  expect(config.encryption).toBeUndefined();
  expect(await readdir(repo)).toEqual(['config']);
  expect(JSON.parse(await readFile(join(repo, 'config'), 'utf8'))).toEqual(config);
  expect((await stat(repo)).mode & 0o777).toBe(0o700);
  expect((await stat(join(repo, 'config'))).mode & 0o777).toBe(0o400);
  const again = await runEngine(['init', '--format', '3', repo]);
  expect(again.code).toBe(1);
  expect(again.stderr).toMatch(/ENGINE_REPOSITORY_EXISTS|already holds a repository/);
});

test('init --format 3 --encrypt writes the key file, then the config naming it', async () => {
  const repo = join(scratch.path, 'v3-encrypted');
  const r = await runEngine(['init', '--format', '3', '--encrypt', '--json', repo], { env: { ENGINE_PASSWORD: 'correct horse battery' } });
  expect(r.code).toBe(0);
  const config = parseJson<ConfigJson>(r.stdout);
  expect(config.version).toBe(3);
  expect(config.encryption?.keyFile).toMatch(/^keys\/[0-9a-f]{16}\.json$/);
  expect((await readdir(repo)).sort()).toEqual(['config', 'keys']);
  expect((await stat(join(repo, config.encryption!.keyFile))).size).toBeGreaterThan(0);
});

test('init refuses format versions that contradict the rest: 4, 1 encrypted, 2 plain, S3 below 3', async () => {
  const cases: [string[], RegExp][] = [
    [['init', '--format', '4', join(scratch.path, 'f4')], /--format 4: give a whole number from 1 to 3/],
    [['init', '--format', '1', '--encrypt', join(scratch.path, 'f1')], /format version 1 is plain/],
    [['init', '--format', '2', join(scratch.path, 'f2')], /format version 2 is encrypted/],
    [['init', '--format', '2', '--encrypt', `s3://${BUCKET}/f2`, ...s3Flags()], /an S3 repository is always format version 3/],
  ];
  for (const [args, message] of cases) {
    const r = await runEngine(args, { env: { ...awsEnv(), ENGINE_PASSWORD: 'correct horse battery' } });
    expect(r.code, args.join(' ')).toBe(2);
    expect(r.stderr).toMatch(message);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
  }
  for (const name of ['f4', 'f1', 'f2']) await expect(stat(join(scratch.path, name))).rejects.toThrow(/ENOENT/);
});

test('init s3://bucket/prefix on RGW: version 3, the config in the bucket under the prefix; a second init and a prefix holding other objects are refused', async () => {
  const url = `s3://${BUCKET}/night/one`;
  const r = await runEngine(['init', '--json', url, ...s3Flags()], { env: awsEnv() });
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
  const config = parseJson<ConfigJson>(r.stdout);
  expect(config.version).toBe(3);
  expect(config.leases).toEqual({ timeMs: 300000, skewBoundMs: 60000 });
  await withRgwStorage(cluster, url, async (storage) => {
    const keys: string[] = [];
    for await (const info of storage.list('')) keys.push(info.key);
    expect(keys).toEqual(['config']);
    expect(JSON.parse((await storage.get('config')).toString('utf8'))).toEqual(config);
  });
  const again = await runEngine(['init', url, ...s3Flags()], { env: awsEnv() });
  expect(again.code).toBe(1);
  expect(again.stderr).toMatch(/already holds a repository or other objects \(config\)/);
  // A prefix above the repository is not empty either: a repository never goes over another's objects.
  const above = await runEngine(['init', `s3://${BUCKET}/night`, ...s3Flags()], { env: awsEnv() });
  expect(above.code).toBe(1);
  expect(above.stderr).toMatch(/ENGINE_REPOSITORY_EXISTS|already holds/);
});

test('init s3:// without credentials, with wrong ones, into a missing bucket: one line each, the stable code, nothing created', async () => {
  const noCreds = await runEngine(['init', `s3://${BUCKET}/nocreds`, ...s3Flags()], {
    env: { ...awsEnv(), AWS_ACCESS_KEY_ID: '', AWS_SECRET_ACCESS_KEY: '' },
  });
  expect(noCreds.code).toBe(1);
  expect(noCreds.stderr).toMatch(/credentials/i);
  const wrong = await runEngine(['init', `s3://${BUCKET}/wrong`, ...s3Flags()], { env: { ...awsEnv(), AWS_SECRET_ACCESS_KEY: 'not-the-secret' } });
  expect(wrong.code).toBe(1);
  expect(wrong.stderr).toMatch(/ENGINE_STORAGE_AUTH|SignatureDoesNotMatch|credentials/);
  const missing = await runEngine(['init', 's3://no-such-bucket-here/x', ...s3Flags()], { env: awsEnv() });
  expect(missing.code).toBe(1);
  expect(missing.stderr).toMatch(/ENGINE_STORAGE_NO_BUCKET|bucket/);
  for (const r of [noCreds, wrong, missing]) expect(r.stderr.trim().split('\n')).toHaveLength(1);
  await withRgwStorage(cluster, `s3://${BUCKET}`, async (storage) => {
    const keys: string[] = [];
    for await (const info of storage.list('')) keys.push(info.key);
    expect(keys.filter((k) => /^(nocreds|wrong)\//.test(k))).toEqual([]);
  });
});

test('s3:// is refused as a URL for path arguments that are not a repository', async () => {
  const repo = join(scratch.path, 'v3-folder');
  const r = await runEngine(['restore', '--repo', repo, 'abc', '--to', `s3://${BUCKET}/x`]);
  expect(r.code).toBe(2);
  expect(r.stderr).toMatch(/looks like a URL \(s3:\)/);
  const ca = await runEngine(['init', `s3://${BUCKET}/ca`, '--ca-file', 's3://x/y', ...s3Flags()], { env: awsEnv() });
  expect(ca.code).toBe(2);
  expect(ca.stderr).toMatch(/--ca-file s3:\/\/x\/y: looks like a URL/);
});

test('unlock on version 3: an expired lease is removed, a live shared one kept (not locked), a live exclusive one locks (exit 3) until --force', async () => {
  const repo = join(scratch.path, 'v3-unlock');
  expect((await runEngine(['init', '--format', '3', repo])).code).toBe(0);
  await mkdir(join(repo, 'leases'), { mode: 0o700 });
  const lease = (id: string, kind: string, expiresInMs: number): string =>
    JSON.stringify({ version: 1, id, kind, host: 'f'.repeat(32), hostname: 'other-appliance', boot: '', pid: 4242, start: '', command: 'backup', since: new Date(Date.now() - 3_600_000).toISOString(), expires: new Date(Date.now() + expiresInMs).toISOString() });
  const expired = 'a'.repeat(32);
  const shared = 'b'.repeat(32);
  const exclusive = 'c'.repeat(32);
  await writeFile(join(repo, 'leases', `${expired}.json`), lease(expired, 'shared', -3_600_000));
  await writeFile(join(repo, 'leases', `${shared}.json`), lease(shared, 'shared', 200_000));
  const first = await runEngine(['unlock', '--repo', repo, '--json'], { env: awsEnv() });
  expect(first.code, first.stderr).toBe(0);
  const report = parseJson<{ locked: boolean; registrations: { file: string; removed: boolean; state: string }[] }>(first.stdout);
  expect(report.locked).toBe(false);
  expect(report.registrations.map((r) => [r.file, r.removed, r.state])).toEqual([
    [`leases/${expired}.json`, true, 'dead'],
    [`leases/${shared}.json`, false, 'other-host'],
  ]);
  await writeFile(join(repo, 'leases', `${exclusive}.json`), lease(exclusive, 'exclusive', 200_000));
  const held = await runEngine(['unlock', '--repo', repo], { env: awsEnv() });
  expect(held.code).toBe(3);
  expect(held.stdout).toContain(`kept leases/${exclusive}.json`);
  const forced = await runEngine(['unlock', '--repo', repo, '--force'], { env: awsEnv() });
  expect(forced.code, forced.stderr).toBe(0);
  expect(forced.stdout).toMatch(/WARNING: removed leases\/c+\.json/);
  expect(await readdir(join(repo, 'leases'))).toEqual([]);
});

test('a version-3 config needs a safe lease timing (1000 ≤ B, 4B < T), and only version 3 may name one', async () => {
  const { decodeConfig, encodeConfig, newConfig } = await import('../dist/repo-format/config.js');
  const v3 = newConfig('0'.repeat(32), 1024 * 1024, new Date(0), undefined, true);
  const edited = (change: (c: Record<string, unknown>) => void): Buffer => {
    const c = JSON.parse(encodeConfig(v3).toString('utf8')) as Record<string, unknown>;
    change(c);
    return Buffer.from(JSON.stringify(c));
  };
  expect(decodeConfig(encodeConfig(v3))).toMatchObject({ version: 3, leases: { timeMs: 300000, skewBoundMs: 60000 } });
  expect(decodeConfig(edited((c) => (c.leases = { timeMs: 300000, skewBoundMs: 999 })))).toMatch(/lease timing is unsafe/);
  expect(decodeConfig(edited((c) => (c.leases = { timeMs: 240000, skewBoundMs: 60000 })))).toMatch(/lease timing is unsafe/);
  expect(decodeConfig(edited((c) => (c.leases = { timeMs: '300000', skewBoundMs: 60000 })))).toBe('config has no valid lease timing');
  expect(decodeConfig(edited((c) => delete c.leases))).toBe('config of version 3 names no lease timing');
  expect(decodeConfig(edited((c) => (c.version = 1)))).toBe('config of version 1 names leases');
});
