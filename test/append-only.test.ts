/**
 * Append-only credentials (SPEC.md 20.5), on the tests' own Ceph RADOS Gateway: a second user to whom a
 * bucket policy of the owner grants reading, listing and writing but denies s3:DeleteObject and
 * s3:DeleteObjectVersion, on a repository with Object Lock (every object the appender writes locked too). Backups with it exit 0 and restore byte for byte (cmp): the leases it cannot delete
 * are retired in place (`expires` 4B in the past) and counted for nothing by everyone, the next backup with
 * the same user included; prune with it fails cleanly, naming the refused delete; gc with the owner's
 * credentials removes the retired leases.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { startRgwCluster, type RgwCluster, type RgwUser } from './rgw.js';
import { openRgwBackend, openRgwStorage, rawClient, v3Env, withRgwStorage } from './s3-helpers.js';
import { filesIdentical, parseJson, runEngine, tempDir, writeRegion, type BackupJson } from './helpers.js';

const MiB = 1024 * 1024;
const BUCKET = 'engine-append';
const REPO = `s3://${BUCKET}/repo`;
let cluster: RgwCluster;
let appender: RgwUser;
let scratch: { path: string; cleanup: () => Promise<void> };

/** The policy the README gives: the owner's bucket, a user that may add but never delete. */
function appendOnlyPolicy(uid: string): string {
  const principal = { AWS: [`arn:aws:iam:::user/${uid}`] };
  return JSON.stringify({
    Version: '2012-10-17',
    Statement: [
      {
        Effect: 'Allow',
        Principal: principal,
        Action: ['s3:ListBucket', 's3:ListBucketVersions', 's3:ListBucketMultipartUploads', 's3:GetObject', 's3:GetObjectVersion', 's3:PutObject', 's3:PutObjectAcl', 's3:PutObjectRetention', 's3:GetObjectRetention', 's3:AbortMultipartUpload'],
        Resource: [`arn:aws:s3:::${BUCKET}`, `arn:aws:s3:::${BUCKET}/*`],
      },
      { Effect: 'Deny', Principal: principal, Action: ['s3:DeleteObject', 's3:DeleteObjectVersion'], Resource: [`arn:aws:s3:::${BUCKET}/*`] },
    ],
  });
}

const ownerEnv = (): Record<string, string> => v3Env(cluster, scratch.path, 'cache-owner');
const appenderEnv = (): Record<string, string> => ({
  ...v3Env(cluster, scratch.path, 'cache-appender'),
  AWS_ACCESS_KEY_ID: appender.accessKeyId,
  AWS_SECRET_ACCESS_KEY: appender.secretAccessKey,
  // RGW gives an object to its writer: the owner's gc and prune can read and delete it only with this ACL.
  ENGINE_S3_ACL: 'bucket-owner-full-control',
});

beforeAll(async () => {
  scratch = await tempDir('engine-append-only-');
  cluster = await startRgwCluster({ memstoreBytes: 512 * MiB });
  // A bucket with Object Lock: append-only credentials and WORM together, as an operator would run them.
  const owner = await openRgwBackend(cluster, `s3://${BUCKET}`, { check: false });
  await owner.createBucket({ objectLock: true }).finally(() => owner.close());
  appender = await cluster.createUser('appender');
  const body = Buffer.from(appendOnlyPolicy(appender.uid), 'utf8');
  const client = rawClient(cluster);
  try {
    await client.request({
      method: 'PUT',
      bucket: BUCKET,
      query: [['policy', '']],
      headers: { 'content-md5': createHash('md5').update(body).digest('base64'), 'content-type': 'application/json' },
      body: { bytes: body },
      payloadHash: createHash('sha256').update(body).digest('hex'),
      response: { kind: 'discard' },
      context: { location: BUCKET, operation: 'put bucket policy' },
    });
  } finally {
    client.close();
  }
});

afterAll(async () => {
  await cluster?.stop();
  await scratch?.cleanup();
});

async function leases(): Promise<{ key: string; expires: number }[]> {
  return withRgwStorage(cluster, REPO, async (storage) => {
    const found: { key: string; expires: number }[] = [];
    for await (const object of storage.list('leases/')) found.push({ key: object.key, expires: Date.parse((JSON.parse((await storage.get(object.key)).toString('utf8')) as { expires: string }).expires) });
    return found;
  });
}

describe('append-only credentials (RGW bucket policy denying s3:DeleteObject*)', () => {
  test('backups with a user that cannot delete exit 0 and restore byte for byte; prune with it fails cleanly; gc with the owner removes what it left', async () => {
    const init = await runEngine(['init', '--object-lock', '1h', REPO], { env: ownerEnv() });
    expect(init.code, init.stderr).toBe(0);
    // The policy is in force: the appender may write but not delete.
    const asAppender = await openRgwStorage(cluster, REPO, { credentials: { accessKeyId: appender.accessKeyId, secretAccessKey: appender.secretAccessKey }, cannedAcl: 'bucket-owner-full-control' });
    try {
      await asAppender.put('probe', Buffer.from('x'));
      await expect(asAppender.delete('probe')).rejects.toMatchObject({ reason: 'denied', storage: { backendCode: 'AccessDenied' } });
    } finally {
      await asAppender.close();
    }

    const sources = [join(scratch.path, 'a.img'), join(scratch.path, 'b.img')];
    await writeRegion(sources[0]!, 0, 4 * MiB, 'random', 'append-a');
    await writeRegion(sources[1]!, 0, 4 * MiB, 'random', 'append-a');
    await writeRegion(sources[1]!, MiB, MiB, 'random', 'append-b');
    const ids: string[] = [];
    const before = (await leases()).length;
    expect(before).toBe(0);
    for (const [i, source] of sources.entries()) {
      const started = Date.now();
      const r = await runEngine(['backup', '--repo', REPO, '--source', source, '--name', 'vm', '--json'], { env: appenderEnv() });
      expect(r.code, r.stderr).toBe(0);
      ids.push(parseJson<BackupJson>(r.stdout).id);
      // Its lease could not be deleted: it is there, retired (expired for every observer at once); the second
      // backup met the first one's and went on.
      const left = await leases();
      expect(left).toHaveLength(i + 1 + before);
      for (const lease of left) expect(lease.expires).toBeLessThan(started);
    }
    for (const [i, id] of ids.entries()) {
      const target = join(scratch.path, `restored-${i}.img`);
      const r = await runEngine(['restore', '--repo', REPO, id, '--to', target], { env: appenderEnv() });
      expect(r.code, r.stderr).toBe(0);
      expect(await filesIdentical(sources[i]!, target)).toBe(true);
    }

    const verified = await runEngine(['verify', '--repo', REPO, '--json'], { env: appenderEnv() });
    expect(verified.code, verified.stderr).toBe(0);
    expect(parseJson<{ ok: boolean; backups: number; warnings: { code: string }[] }>(verified.stdout)).toMatchObject({ ok: true, backups: 2, warnings: [] });

    const prune = await runEngine(['prune', '--repo', REPO, '--keep-last', '1'], { env: appenderEnv() });
    expect(prune.code, prune.stderr).toBe(1);
    expect(prune.stderr).toMatch(/delete backups\/[0-9a-f]+: HTTP 403 AccessDenied; these credentials may not delete here \(append-only credentials, or an object still under Object Lock\): run prune and gc with credentials that may delete/);
    const listed = await runEngine(['list', '--repo', REPO, '--json'], { env: ownerEnv() });
    expect(parseJson<{ backups: unknown[] }>(listed.stdout).backups).toHaveLength(2);

    await withRgwStorage(cluster, REPO, async (storage) => storage.delete('probe'));
    const gc = await runEngine(['gc', '--repo', REPO], { env: ownerEnv() });
    expect(gc.code, gc.stderr).toBe(0);
    expect(await leases()).toEqual([]);
    const pruned = await runEngine(['prune', '--repo', REPO, '--keep-last', '1'], { env: ownerEnv() });
    expect(pruned.code, pruned.stderr).toBe(0);
  });
});
