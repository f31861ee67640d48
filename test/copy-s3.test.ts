/**
 * `engine copy` with S3 on either side (SPEC.md 22), on the tests' own Ceph RGW (test/rgw.ts): a folder
 * repository copied into an encrypted S3 one (re-keyed), restored from S3 byte for byte (cmp) and copied
 * again for nothing; a kill -9 after the first segment reached the bucket, then a rerun that does not send
 * what it names; S3 copied back into a format-1 folder, whose maps are the source's root for root. The
 * bucket holds no lease afterwards, and nothing the copy wrote was deleted.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { startRgwCluster, type RgwCluster } from './rgw.js';
import { createBucket, repositoryKeys, v3Env } from './s3-helpers.js';
import { filesIdentical, parseJson, runEngine, tempDir, writeRegion, type BackupJson } from './helpers.js';
import { copyOk, copyRun, recordsOf } from './copy-support.js';
import { startFaultProxy } from './s3-fault-proxy.js';

const MiB = 1024 * 1024;
const BUCKET = 'engine-copy';
let cluster: RgwCluster;
let scratch: { path: string; cleanup: () => Promise<void> };
let source: string;
const images: string[] = [];
const ids: string[] = [];
const pass = 'passphrase-of-s3';

const env = (extra: Record<string, string> = {}): Record<string, string> => ({ ...v3Env(cluster, scratch.path, 'cache'), ...extra });

async function restoreEquals(repo: string, id: string, image: string, extra: Record<string, string> = {}): Promise<void> {
  const out = join(scratch.path, `restore-${id}.raw`);
  const r = await runEngine(['restore', '--repo', repo, id, '--to', out], { env: env(extra) });
  expect(r.code, r.stderr).toBe(0);
  expect(await filesIdentical(out, image)).toBe(true);
}

/** The target's backups as list --json gives them: id and the copy's source. */
async function listed(repo: string, extra: Record<string, string> = {}): Promise<{ id: string; copiedFrom?: { backup: string } }[]> {
  const r = await runEngine(['list', '--repo', repo, '--json'], { env: env(extra) });
  expect(r.code, r.stderr).toBe(0);
  return parseJson<{ backups: { id: string; copiedFrom?: { backup: string } }[] }>(r.stdout).backups;
}

beforeAll(async () => {
  scratch = await tempDir('engine-copy-s3-');
  cluster = await startRgwCluster({ memstoreBytes: 512 * MiB });
  await createBucket(cluster, BUCKET);
  source = join(scratch.path, 'source');
  const r0 = await runEngine(['init', source, '--block-size', '64K'], { env: env() });
  expect(r0.code, r0.stderr).toBe(0);
  for (const [i, seed] of ['one', 'two'].entries()) {
    const image = join(scratch.path, `disk-${i}.img`);
    await writeRegion(image, 0, 2 * MiB, 'random', 'shared');
    await writeRegion(image, 2 * MiB, 2 * MiB, 'random', seed);
    images.push(image);
    const r = await runEngine(['backup', '--repo', source, '--source', image, '--name', 'disk', '--json'], { env: env() });
    expect(r.code, r.stderr).toBe(0);
    ids.push(parseJson<BackupJson>(r.stdout).id);
  }
  await writeFile(join(scratch.path, 'pass'), pass);
});

afterAll(async () => {
  await cluster?.stop();
  await scratch?.cleanup();
});

describe('copy to and from S3', () => {
  const encrypted = `s3://${BUCKET}/encrypted`;
  const plainS3 = `s3://${BUCKET}/plain`;

  test('folder → encrypted S3: restores equal from the bucket; a rerun sends nothing; no lease left', async () => {
    const r0 = await runEngine(['init', encrypted, '--block-size', '64K', '--encrypt', '--password-file', join(scratch.path, 'pass')], { env: env() });
    expect(r0.code, r0.stderr).toBe(0);
    const report = await copyOk(source, encrypted, ['--all', '--to-password-file', join(scratch.path, 'pass')], env());
    expect(report.backupsCopied).toBe(2);
    for (const [i, b] of report.backups.entries()) await restoreEquals(encrypted, b.target, images[i]!, { ENGINE_PASSWORD: pass });
    const again = await copyOk(source, encrypted, ['--all'], env({ ENGINE_TO_PASSWORD: pass }));
    expect(again).toMatchObject({ backupsCopied: 0, backupsSkipped: 2, chunksSent: 0, bytesSent: 0 });
    expect((await repositoryKeys(cluster, encrypted)).filter((k) => k.startsWith('leases/'))).toEqual([]);
  });

  test('kill -9 once the first segment is in the bucket: the rerun sends only what the segment does not name, and completes', async () => {
    const r0 = await runEngine(['init', plainS3, '--block-size', '64K'], { env: env() });
    expect(r0.code, r0.stderr).toBe(0);
    const crashed = await copyRun(source, plainS3, ['--all'], env({ ENGINE_CRASH_AT: 'segment-written' }));
    expect(crashed.code).toBe(137);
    const keys = await repositoryKeys(cluster, plainS3);
    expect(keys.filter((k) => k.startsWith('backups/'))).toEqual([]);
    const rerun = await copyOk(source, plainS3, ['--all'], env());
    expect(rerun.backupsCopied).toBe(2);
    // The first backup's 64 chunks are named by the crashed run's segment: none is sent again.
    expect(rerun.chunksSkipped).toBeGreaterThanOrEqual(64);
    // Nothing was deleted: every key the crashed run left is still there.
    const after = await repositoryKeys(cluster, plainS3);
    expect(keys.filter((k) => !k.startsWith('leases/') && !after.includes(k))).toEqual([]);
    const copies = new Map((await listed(plainS3)).map((b) => [b.copiedFrom!.backup, b.id]));
    for (const [i, id] of ids.entries()) await restoreEquals(plainS3, copies.get(id)!, images[i]!);
    const verify = await runEngine(['verify', '--repo', plainS3, '--read-data'], { env: env() });
    expect(verify.code, verify.stdout + verify.stderr).toBe(0);
  });

  test('encrypted S3 → format-1 folder: plain ids again, the maps root for root the source\'s; restores equal', async () => {
    const folder = join(scratch.path, 'back-v1');
    const r0 = await runEngine(['init', folder, '--block-size', '64K', '--format', '1'], { env: env() });
    expect(r0.code, r0.stderr).toBe(0);
    // Through a proxy that counts the GETs of packs: frames adjacent in a pack are read in spans of up to
    // 4 MiB, one ranged GET each, not one GET per chunk (the disk's 4 MiB are 64 chunks of 64 KiB).
    const proxy = await startFaultProxy(cluster.endpoint);
    proxy.addRule({ method: 'GET', path: /\/packs\//, action: { kind: 'delay', ms: 0 } });
    const report = await copyOk(encrypted, folder, ['--latest', '1'], env({ ENGINE_PASSWORD: pass, AWS_ENDPOINT_URL_S3: proxy.endpoint })).finally(() => proxy.close());
    expect(report.chunksSent).toBe(64);
    const packGets = proxy.injected['delay'] ?? 0;
    // Map pages are read one GET each (a few); the 64 chunks' frames in one or two spans (measured: 3 GETs in
    // all, against 65 with a GET per chunk).
    expect(packGets).toBeGreaterThan(0);
    expect(packGets).toBeLessThanOrEqual(8);
    // The newest is a full backup of a raw file: no parents to bring.
    expect(report.backups.map((b) => [b.status, b.name])).toEqual([['copied', 'disk']]);
    const copy = (await recordsOf(folder)).records.get(report.backups[0]!.target)!;
    const original = (await recordsOf(source)).records.get(ids[1]!)!;
    expect(copy.copiedFrom!.backup).toBe(ids[1]);
    expect(copy.disks.map((d) => d.map.root)).toEqual(original.disks.map((d) => d.map.root));
    await restoreEquals(folder, copy.id, images[1]!);
  });
});
