/**
 * S3 Object Lock (SPEC.md 20.5), through the CLI on the tests' own Ceph RADOS Gateway: `init --object-lock`
 * creates the bucket with Object Lock (or refuses a bucket without it), every object but the leases is
 * written locked; an attacker process with the engine's own credentials deletes every version it can,
 * overwrites every object and deletes every key — the store refuses the deletes of locked versions, and
 * every backup restores byte for byte (cmp) `--as-of` a time before the attack, which writes nothing; gc keeps
 * what is still locked and removes it for good only after its lock expired, extends the locks of what it
 * keeps when less than R/2 is left, and an expired lock that gc did not extend is a warning of verify and gc
 * (OBJECT_LOCK_EXPIRED). Every wait is bounded by the store's clock (the Date of its answers), never a sleep
 * that races.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { spawn } from 'node:child_process';
import { join, resolve } from 'node:path';
import { startRgwCluster, type RgwCluster } from './rgw.js';
import { createBucket, openRgwBackend, rawPut, v3Env } from './s3-helpers.js';
import { filesIdentical, parseJson, runEngine, tempDir, writeRegion, type BackupJson } from './helpers.js';
import { startFaultProxy } from './s3-fault-proxy.js';
import type { S3Storage } from '../dist/repo-format/storage/s3.js';

const MiB = 1024 * 1024;
let cluster: RgwCluster;
let scratch: { path: string; cleanup: () => Promise<void> };

const env = (): Record<string, string> => v3Env(cluster, scratch.path, 'cache');

beforeAll(async () => {
  scratch = await tempDir('engine-object-lock-');
  cluster = await startRgwCluster({ memstoreBytes: 512 * MiB });
});

afterAll(async () => {
  await cluster?.stop();
  await scratch?.cleanup();
});

async function withBackend<T>(url: string, use: (backend: S3Storage) => Promise<T>): Promise<T> {
  const backend = await openRgwBackend(cluster, url, { check: false });
  try {
    return await use(backend);
  } finally {
    await backend.close();
  }
}

/** The store's time by the Date header of an answer: whole seconds, the true time in [it, it + 1 s). */
async function storeSecond(bucket: string): Promise<number> {
  return withBackend(`s3://${bucket}`, async (backend) => (await backend.time()).storeMs - 500);
}

/** Returns once the store's Date header says `ms` or later: bounded by the store's clock, not a fixed sleep. */
async function untilStore(bucket: string, ms: number): Promise<void> {
  for (;;) {
    const now = await storeSecond(bucket);
    if (now >= ms) return;
    await new Promise((done) => setTimeout(done, Math.min(1000, ms - now)));
  }
}

async function image(name: string, megabytes: number): Promise<string> {
  const path = join(scratch.path, `${name}.img`);
  await writeRegion(path, 0, megabytes * MiB, 'random', name);
  return path;
}

async function backup(repo: string, source: string, name: string): Promise<string> {
  const r = await runEngine(['backup', '--repo', repo, '--source', source, '--name', name, '--json'], { env: env() });
  expect(r.code, r.stderr).toBe(0);
  return parseJson<BackupJson>(r.stdout).id;
}

async function restoresAs(repo: string, id: string, source: string, extra: string[] = []): Promise<void> {
  const target = join(scratch.path, `restored-${id}-${Math.random().toString(16).slice(2)}.img`);
  const r = await runEngine(['restore', '--repo', repo, id, '--to', target, ...extra], { env: env() });
  expect(r.code, r.stderr).toBe(0);
  expect(await filesIdentical(source, target)).toBe(true);
}

interface Version {
  key: string;
  versionId: string;
  latest: boolean;
  deleteMarker: boolean;
}

async function versionsOf(url: string): Promise<Version[]> {
  return withBackend(url, async (backend) => {
    const all: Version[] = [];
    for await (const v of backend.listVersions('')) all.push({ key: v.key, versionId: v.versionId, latest: v.latest, deleteMarker: v.deleteMarker });
    return all;
  });
}

interface GcLockJson {
  notices: string[];
  objectLock?: { extended: number; expired: { code: string; key: string; until: string | null }[]; purged: number; locked: { versions: number; until: string | null } };
}

async function gc(repo: string): Promise<{ report: GcLockJson; notices: string }> {
  const r = await runEngine(['gc', '--repo', repo, '--json'], { env: env() });
  expect(r.code, r.stderr).toBe(0);
  const report = parseJson<GcLockJson>(r.stdout);
  return { report, notices: report.notices.join('\n') };
}

interface AttackResult {
  refused: number;
  deleted: number;
  overwritten: number;
  hidden: number;
  codes: string[];
  shortened: number;
  shortenRefused: number;
}

/**
 * The attacker: another process with the engine's own credentials. It deletes every version it can (by
 * version id, the only delete that removes data; after trying to shorten each lock), overwrites every object it sees, then deletes every key
 * (a delete marker each). Prints what the store let it do.
 */
function attack(url: string): Promise<AttackResult> {
  const module = resolve('dist/repo-format/storage/s3.js');
  const script = `
    import { openS3Storage } from ${JSON.stringify(module)};
    const s = await openS3Storage({ url: process.env.ATTACK_URL, env: process.env, check: false });
    const out = { refused: 0, deleted: 0, overwritten: 0, hidden: 0, codes: [], shortened: 0, shortenRefused: 0 };
    const versions = [];
    for await (const v of s.listVersions('')) if (!v.deleteMarker) versions.push(v);
    for (const v of versions) {
      if (v.key.startsWith('leases/')) continue;
      try { await s.setRetention(v.key, 'COMPLIANCE', Date.now() + 1000, { versionId: v.versionId }); out.shortened++; }
      catch (e) { out.shortenRefused++; }
    }
    for (const v of versions) {
      try { await s.delete(v.key, { versionId: v.versionId }); out.deleted++; }
      catch (e) { out.refused++; if (!out.codes.includes(e.storage?.backendCode)) out.codes.push(e.storage?.backendCode); }
    }
    const keys = [];
    for await (const o of s.list('')) keys.push(o.key);
    for (const key of keys) { await s.put(key, Buffer.from('encrypted by the attacker ' + key)); out.overwritten++; }
    for (const key of keys) { await s.delete(key); out.hidden++; }
    await s.close();
    process.stdout.write(JSON.stringify(out));
  `;
  return new Promise((done, fail) => {
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], { env: { ...process.env, ...env(), ATTACK_URL: url }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    child.on('close', (code) => (code === 0 ? done(JSON.parse(stdout) as AttackResult) : fail(new Error(`attacker exited ${code}: ${stderr}`))));
  });
}

describe('S3 Object Lock (RGW)', () => {
  test('init --object-lock creates the bucket with Object Lock; a bucket without it is refused, nothing written', async () => {
    const plain = 'engine-lock-plain';
    await createBucket(cluster, plain);
    const refused = await runEngine(['init', '--object-lock', '1d', `s3://${plain}/repo`], { env: env() });
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toMatch(/Object Lock and versioning enabled.*Object Lock not enabled and versioning never enabled/);
    expect(await versionsOf(`s3://${plain}`)).toEqual([]);
    const folder = await runEngine(['init', '--object-lock', '1d', join(scratch.path, 'folder-repo')], { env: env() });
    expect([folder.code, folder.stderr]).toEqual([2, expect.stringContaining('--object-lock is S3 Object Lock')]);

    const made = await runEngine(['init', '--object-lock', '2d', '--object-lock-mode', 'governance', '--json', 's3://engine-lock-new/repo'], { env: env() });
    expect(made.code, made.stderr).toBe(0);
    expect(parseJson<{ objectLock: unknown }>(made.stdout).objectLock).toEqual({ mode: 'governance', retentionMs: 2 * 86_400_000 });
    await withBackend('s3://engine-lock-new/repo', async (backend) => {
      expect(await backend.bucketProtection()).toEqual({ objectLock: true, versioning: 'Enabled' });
      const retention = await backend.retention('config');
      expect(retention?.mode).toBe('GOVERNANCE');
      const now = (await backend.time()).storeMs;
      expect(Math.abs(retention!.until - (now + 2 * 86_400_000))).toBeLessThan(120_000);
    });
  });

  test('an attacker with the engine\'s credentials cannot delete a locked version; every backup restores byte for byte --as-of a time before the attack, which writes nothing', async () => {
    const bucket = 'engine-lock-attack';
    const repo = `s3://${bucket}/repo`;
    const init = await runEngine(['init', '--object-lock', '1h', repo], { env: env() });
    expect(init.code, init.stderr).toBe(0);
    const first = await image('attack-first', 6);
    const second = join(scratch.path, 'attack-second.img');
    await writeRegion(second, 0, 6 * MiB, 'random', 'attack-first'); // the same data, then changed: dedup
    await writeRegion(second, 2 * MiB, 1 * MiB, 'random', 'attack-changed');
    const ids = [await backup(repo, first, 'vm'), await backup(repo, second, 'vm')];
    // Every object but the leases carries the lock, COMPLIANCE by default.
    await withBackend(repo, async (backend) => {
      const keys: string[] = [];
      for await (const object of backend.list('')) keys.push(object.key);
      expect(keys.some((k) => k.startsWith('packs/')) && keys.some((k) => k.startsWith('index/')) && keys.some((k) => k.startsWith('backups/'))).toBe(true);
      expect(keys.filter((k) => k.startsWith('leases/'))).toEqual([]);
      for (const key of keys) expect((await backend.retention(key))?.mode, key).toBe('COMPLIANCE');
    });
    // T: after every write above (the store's second after them, plus one), and the attack strictly after T.
    const asOf = (await storeSecond(bucket)) + 1000;
    await untilStore(bucket, asOf + 1000);
    const before = (await versionsOf(repo)).filter((v) => !v.deleteMarker);
    // Leases are written unlocked (each command's, rewritten and released): their versions can go, nothing else.
    const locked = before.filter((v) => !v.key.startsWith('leases/'));
    const current = before.filter((v) => v.latest);
    const attacked = await attack(repo);
    expect([attacked.shortened, attacked.shortenRefused]).toEqual([0, locked.length]);
    expect(attacked.refused).toBe(locked.length);
    expect(attacked.deleted).toBe(before.length - locked.length);
    expect(attacked.codes).toEqual(['AccessDenied']);
    expect(attacked.overwritten).toBe(current.length);
    expect(attacked.hidden).toBe(current.length);
    // The present is gone: no repository here any more.
    const now = await runEngine(['list', '--repo', repo], { env: env() });
    expect(now.code).not.toBe(0);

    const when = new Date(asOf).toISOString();
    const versionsBefore = await versionsOf(repo);
    const listed = await runEngine(['list', '--repo', repo, '--as-of', when, '--json'], { env: env() });
    expect(listed.code, listed.stderr).toBe(0);
    expect(parseJson<{ backups: { id: string }[] }>(listed.stdout).backups.map((b) => b.id).sort()).toEqual([...ids].sort());
    const shown = await runEngine(['show', '--repo', repo, ids[1]!, '--as-of', when, '--json'], { env: env() });
    expect(shown.code, shown.stderr).toBe(0);
    await restoresAs(repo, ids[0]!, first, ['--as-of', when]);
    await restoresAs(repo, ids[1]!, second, ['--as-of', when]);
    const verified = await runEngine(['verify', '--repo', repo, '--read-data', '--as-of', when, '--json'], { env: env() });
    expect(verified.code, verified.stderr).toBe(0);
    expect(parseJson<{ ok: boolean; backups: number }>(verified.stdout)).toMatchObject({ ok: true, backups: 2 });
    // Read-only: not one version or delete marker more (no lease, nothing else).
    expect(await versionsOf(repo)).toEqual(versionsBefore);
    // A time before the repository existed shows none.
    const early = await runEngine(['list', '--repo', repo, '--as-of', '2020-01-01T00:00:00Z'], { env: env() });
    expect([early.code, early.stderr]).toEqual([5, expect.stringContaining('it has no config file')]);
    // --as-of is for the commands that only read.
    const backupAsOf = await runEngine(['backup', '--repo', repo, '--source', first, '--as-of', when], { env: env() });
    expect(backupAsOf.code).toBe(2);
  });

  test('gc keeps locked versions and removes them only after expiry, extends the locks of what it keeps, and warns of a lock that ran out (OBJECT_LOCK_EXPIRED)', async () => {
    const bucket = 'engine-lock-gc';
    const repo = `s3://${bucket}/repo`;
    const R = 15_000;
    const init = await runEngine(['init', '--object-lock', '15s', repo], { env: env() });
    expect(init.code, init.stderr).toBe(0);
    const a = await image('gc-a', 3);
    const b = await image('gc-b', 3);
    const idA = await backup(repo, a, 'vm');
    const packsAfterA = (await versionsOf(repo)).filter((v) => v.key.startsWith('packs/')).map((v) => v.key);
    const idB = await backup(repo, b, 'vm');
    const packB = (await versionsOf(repo)).find((v) => v.key.startsWith('packs/') && !packsAfterA.includes(v.key))!.key;
    // prune hides A's record (a delete marker) and says until when its locked version stays.
    const pruned = await runEngine(['prune', '--repo', repo, '--keep-last', '1', '--json'], { env: env() });
    expect(pruned.code, pruned.stderr).toBe(0);
    const prunedLock = parseJson<{ locked: { id: string; until: string }[] }>(pruned.stdout).locked;
    expect(prunedLock.map((l) => l.id)).toEqual([idA]);
    expect(Date.parse(prunedLock[0]!.until)).toBeGreaterThan(await storeSecond(bucket));

    // 1. A's record and packs were deleted in the engine's view (delete markers) while their versions are locked: kept.
    const aKeys = [`backups/${idA}`, ...packsAfterA];
    const lockedUntil = await withBackend(repo, async (backend) => {
      const untils: number[] = [];
      for (const v of (await versionsOf(repo)).filter((x) => aKeys.includes(x.key) && !x.deleteMarker)) untils.push((await backend.retention(v.key, { versionId: v.versionId }))!.until);
      return Math.max(...untils);
    });
    // Another program's object under the prefix, with a name that is no storage key: never touched.
    await rawPut(cluster, bucket, 'repo/_notes of the operator', Buffer.from('not the engine\'s'));
    const first = await gc(repo);
    // The case means something only if A's locks outlasted this gc (R = 15 s against a few seconds of work).
    expect(lockedUntil, 'A\'s locks ended before gc did: the machine is too slow for R = 15 s').toBeGreaterThan((await storeSecond(bucket)) + 1000);
    const afterFirst = await versionsOf(repo);
    for (const key of aKeys) {
      expect(afterFirst.filter((v) => v.key === key && !v.deleteMarker), key).toHaveLength(1);
      expect(afterFirst.find((v) => v.key === key && v.latest)?.deleteMarker, key).toBe(true);
    }
    expect(first.report.objectLock!.locked.versions).toBeGreaterThanOrEqual(aKeys.length);
    expect(first.notices).toMatch(/kept: \d+ deleted or replaced object version\(s\) locked until /);

    // 2. Less than R/2 left on B's pack: gc extends it to its start + R (GetObjectRetention says so).
    const untilB = await withBackend(repo, async (backend) => (await backend.retention(packB))!.until);
    await untilStore(bucket, untilB - R / 2 + 1000);
    const gcStart = await storeSecond(bucket);
    const second = await gc(repo);
    expect(second.report.objectLock!.extended).toBeGreaterThanOrEqual(1);
    const extendedB = await withBackend(repo, async (backend) => (await backend.retention(packB))!.until);
    expect(extendedB).toBeGreaterThanOrEqual(gcStart + R - 1000);
    expect(extendedB).toBeGreaterThan(untilB);

    // 3. Past every lock, no gc between: verify warns of B's expired lock; gc removes A's versions for good,
    // warns of B's pack and locks it again.
    await untilStore(bucket, Math.max(lockedUntil, extendedB) + 1000);
    const verified = await runEngine(['verify', '--repo', repo, '--json'], { env: env() });
    expect(verified.code, verified.stderr).toBe(0);
    const warnings = parseJson<{ warnings: { code: string; path?: string }[] }>(verified.stdout).warnings;
    expect(warnings.filter((w) => w.code === 'OBJECT_LOCK_EXPIRED').map((w) => w.path)).toContain(packB);
    // Credentials that may not read the locks (s3:GetObjectRetention denied): verify checks everything else and
    // says the locks went unchecked, exit 0. RGW 16.2 does not check that action in a bucket policy (an explicit
    // Deny is ignored too, tried), so a proxy in front of it answers retention reads as AWS would: 403 AccessDenied.
    const proxy = await startFaultProxy(cluster.endpoint);
    try {
      proxy.addRule({ method: 'GET', path: /[?&]retention(=|&|$)/, action: { kind: 'slowdown', status: 403, code: 'AccessDenied' } });
      const unchecked = await runEngine(['verify', '--repo', repo, '--json'], { env: { ...env(), AWS_ENDPOINT_URL_S3: proxy.endpoint } });
      expect(unchecked.code, unchecked.stderr).toBe(0);
      const report = parseJson<{ ok: boolean; warnings: { code: string; message: string }[] }>(unchecked.stdout);
      expect(report.ok).toBe(true);
      expect(report.warnings.map((w) => w.code)).toEqual(['OBJECT_LOCK_UNCHECKED']);
      expect(report.warnings[0]!.message).toMatch(/could not be read with these credentials .*AccessDenied.*s3:GetObjectRetention/);
      expect(proxy.injected['slowdown']).toBeGreaterThanOrEqual(1);
    } finally {
      await proxy.close();
    }
    const third = await gc(repo);
    expect(third.report.objectLock!.expired.map((e) => [e.code, e.key])).toContainEqual(['OBJECT_LOCK_EXPIRED', packB]);
    expect(third.notices).toContain(`warning OBJECT_LOCK_EXPIRED: ${packB}`);
    expect(third.report.objectLock!.purged).toBeGreaterThanOrEqual(aKeys.length);
    const afterThird = await versionsOf(repo);
    for (const key of aKeys) expect(afterThird.filter((v) => v.key === key), key).toEqual([]);
    const relocked = await withBackend(repo, async (backend) => (await backend.retention(packB))!.until);
    expect(relocked).toBeGreaterThan(await storeSecond(bucket));
    const text = await runEngine(['gc', '--repo', repo], { env: env() });
    expect(text.code, text.stderr).toBe(0);
    expect(text.stdout).toMatch(/^object lock: \d+ locks? extended, 0 objects found unlocked \(OBJECT_LOCK_EXPIRED, locked again\), \d+ hidden versions? or delete markers? removed for good/m);
    const clean = await runEngine(['verify', '--repo', repo, '--json'], { env: env() });
    expect(parseJson<{ warnings: { code: string }[] }>(clean.stdout).warnings.filter((w) => w.code === 'OBJECT_LOCK_EXPIRED')).toEqual([]);
    await restoresAs(repo, idB, b);
    expect((await versionsOf(repo)).filter((v) => v.key === '_notes of the operator')).toHaveLength(1);
  });

  test('repair of a lost config restores it whole from its earlier version, lock included; with no usable version, the lock is read back from the objects\' retention', async () => {
    interface RepairJson { ok: boolean; configRebuilt: { id: string; sources: { id: string; objectLock?: string }; objectLock: { mode: string; retentionMs: number } | null } | null }
    const repair = async (repo: string): Promise<RepairJson> => {
      const r = await runEngine(['repair', '--repo', repo, '--json'], { env: env() });
      expect(r.code, r.stderr).toBe(0);
      return parseJson<RepairJson>(r.stdout);
    };
    const lockedRecords = async (repo: string): Promise<Map<string, string | undefined>> => withBackend(repo, async (backend) => {
      const modes = new Map<string, string | undefined>();
      for await (const object of backend.list('backups/')) modes.set(object.key, (await backend.retention(object.key))?.mode);
      return modes;
    });

    // 1. The config deleted (a delete marker over its locked version): repair brings the same config back.
    const repo = 's3://engine-lock-repair/repo';
    const init = await runEngine(['init', '--object-lock', '1h', '--object-lock-mode', 'governance', '--json', repo], { env: env() });
    expect(init.code, init.stderr).toBe(0);
    const id = parseJson<{ id: string }>(init.stdout).id;
    const disk = await image('repair-lock', 2);
    await backup(repo, disk, 'vm');
    await withBackend(repo, (backend) => backend.delete('config'));
    expect((await runEngine(['list', '--repo', repo], { env: env() })).code).toBe(5);
    const rebuilt = await repair(repo);
    expect(rebuilt.configRebuilt).toMatchObject({ id, sources: { id: 'config version', objectLock: 'config version' }, objectLock: { mode: 'governance', retentionMs: 3_600_000 } });
    // Later writes are locked as before: the next backup's record carries GOVERNANCE.
    const second = await backup(repo, disk, 'vm');
    expect((await lockedRecords(repo)).get(`backups/${second}`)).toBe('GOVERNANCE');
    const text = await runEngine(['repair', '--repo', repo], { env: env() });
    expect(text.code, text.stderr).toBe(0);

    // 2. R = 2 s: once every lock ended, the config's versions can be removed for good; repair then reads R and
    // the mode back from the objects' retention (write + R), so later backups are still written locked.
    const short = 's3://engine-lock-repair-short/repo';
    expect((await runEngine(['init', '--object-lock', '2s', short], { env: env() })).code).toBe(0);
    await backup(short, disk, 'vm');
    const lastUntil = await withBackend(short, async (backend) => {
      let until = 0;
      for await (const object of backend.list('')) until = Math.max(until, (await backend.retention(object.key))?.until ?? 0);
      return until;
    });
    await untilStore('engine-lock-repair-short', lastUntil + 1000);
    await withBackend(short, async (backend) => {
      for await (const v of backend.listVersions('config')) if (v.key === 'config') await backend.delete('config', { versionId: v.versionId });
    });
    const inferred = await repair(short);
    expect(inferred.configRebuilt).toMatchObject({ sources: { id: 'new', objectLock: 'retention' }, objectLock: { mode: 'compliance', retentionMs: 2000 } });
    const after = await backup(short, disk, 'vm');
    expect((await lockedRecords(short)).get(`backups/${after}`)).toBe('COMPLIANCE');
    await restoresAs(short, after, disk);
  });
});
