/**
 * engine server with two S3 repositories on the tests' own Ceph RGW (test/rgw.ts), each with its own `s3`
 * block in the config (SPEC.md 23.4): two users, each owning one bucket, their keys in two credentials files
 * (one under a named profile), two endpoint spellings (127.0.0.1 and localhost). The server's environment
 * holds wrong keys and a dead endpoint: a job succeeds only with what its repository's block says. A third
 * repository names user A's keys for user B's bucket: its backup is denied. Config mistakes (an `s3` block
 * for a folder, keys written inline, no credentials file) stop the server before it listens.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { chmod, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { startRgwCluster, type RgwCluster, type RgwUser } from './rgw.js';
import { createBucket } from './s3-helpers.js';
import { filesIdentical, runEngine, tempDir, writeRegion } from './helpers.js';
import { call, jobEnd, startServer, writeConfig, type RunningServer } from './server-helpers.js';

const MiB = 1024 * 1024;
let cluster: RgwCluster;
let scratch: { path: string; cleanup: () => Promise<void> };
let userB: RgwUser;
let server: RunningServer;
let image: string;

/** What the server's environment says: keys RGW does not know and an endpoint where nothing listens. */
const WRONG_ENV = { AWS_ACCESS_KEY_ID: 'WRONGWRONGWRONG', AWS_SECRET_ACCESS_KEY: 'wrong', AWS_ENDPOINT_URL_S3: 'http://127.0.0.1:9', AWS_ENDPOINT_URL: 'http://127.0.0.1:9', AWS_REGION: 'nowhere-1' };

function userEnv(user: RgwUser): Record<string, string> {
  return {
    AWS_ACCESS_KEY_ID: user.accessKeyId,
    AWS_SECRET_ACCESS_KEY: user.secretAccessKey,
    AWS_SHARED_CREDENTIALS_FILE: join(scratch.path, 'none'),
    AWS_CONFIG_FILE: join(scratch.path, 'none'),
    AWS_ENDPOINT_URL_S3: cluster.endpoint,
    AWS_REGION: cluster.region,
    ENGINE_CACHE_DIR: join(scratch.path, 'cli-cache'),
  };
}

async function credentialsFile(name: string, profile: string, user: RgwUser): Promise<string> {
  const path = join(scratch.path, name);
  await writeFile(path, `# ${user.uid}\n[${profile}]\naws_access_key_id = ${user.accessKeyId}\naws_secret_access_key = ${user.secretAccessKey}\n`);
  await chmod(path, 0o600);
  return path;
}

beforeAll(async () => {
  scratch = await tempDir('engine-server-s3-');
  cluster = await startRgwCluster({ memstoreBytes: 256 * MiB });
  userB = await cluster.createUser('engine-b');
  await createBucket(cluster, 'bucket-a', cluster.user);
  await createBucket(cluster, 'bucket-b', userB);
  for (const [bucket, user] of [['bucket-a', cluster.user], ['bucket-b', userB]] as const) {
    const r = await runEngine(['init', `s3://${bucket}/repo`], { env: userEnv(user) });
    expect(r.code, r.stderr).toBe(0);
  }
  image = join(scratch.path, 'disk.img');
  await writeRegion(image, 0, 3 * MiB, 'random', 'disk');
  const credsA = await credentialsFile('a.aws', 'default', cluster.user);
  const credsB = await credentialsFile('b.aws', 'backup', userB);
  const port = new URL(cluster.endpoint).port;
  const config = await writeConfig(scratch.path, {
    stateDir: join(scratch.path, 'state'),
    repositories: {
      a: { location: 's3://bucket-a/repo', s3: { endpoint: cluster.endpoint, region: cluster.region, credentialsFile: credsA } },
      b: { location: 's3://bucket-b/repo', s3: { endpoint: `http://localhost:${port}`, region: cluster.region, pathStyle: true, credentialsFile: credsB, profile: 'backup' } },
      // User A's keys for user B's bucket.
      crossed: { location: 's3://bucket-b/other', s3: { endpoint: cluster.endpoint, credentialsFile: credsA } },
    },
  });
  server = await startServer(['--config', config, '--listen', '127.0.0.1:0'], { ...WRONG_ENV, ENGINE_CACHE_DIR: join(scratch.path, 'server-cache') });
}, 120_000);

afterAll(async () => {
  await server?.stop();
  await cluster?.stop();
  await scratch?.cleanup();
});

type Job = Record<string, unknown> & { id: string; state: string; result: Record<string, unknown> | null; error: { code: string; message: string } | null };

async function run(body: Record<string, unknown>): Promise<Job> {
  const answer = await call(server, 'POST', '/api/v1/jobs', body);
  expect(answer.status, answer.text).toBe(202);
  return (await jobEnd(server, (answer.json as Job).id)) as Job;
}

describe('engine server: per-repository S3 settings', () => {
  test('a backup into each of two buckets with its own keys and endpoint; restored from the second byte for byte; the crossed keys are denied', async () => {
    const ids: Record<string, string> = {};
    for (const repository of ['a', 'b']) {
      const job = await run({ kind: 'backup', repository, name: `vm-${repository}`, disks: [{ kind: 'raw', path: image }] });
      expect(job.error).toBeNull();
      expect(job.result).toMatchObject({ name: `vm-${repository}`, type: 'full', disks: [{ size: 3 * MiB, bytesRead: 3 * MiB }] });
      ids[repository] = String(job.result!.id);
      const listed = (await call(server, 'GET', `/api/v1/repositories/${repository}/backups`)).json as { backups: { id: string }[] };
      expect(listed.backups.map((b) => b.id)).toEqual([ids[repository]]);
    }
    const target = join(scratch.path, 'restored.img');
    const restored = await run({ kind: 'restore', repository: 'b', backup: ids.b, target: { kind: 'file', path: target } });
    expect(restored.error).toBeNull();
    expect(await filesIdentical(target, image)).toBe(true);
    // Each bucket as its owner sees it with the CLI: one backup each, the one the server made.
    for (const [repository, user] of [['a', cluster.user], ['b', userB]] as const) {
      const r = await runEngine(['list', '--repo', `s3://bucket-${repository}/repo`, '--json'], { env: userEnv(user) });
      expect(r.code, r.stderr).toBe(0);
      expect((JSON.parse(r.stdout) as { backups: { id: string }[] }).backups.map((b) => b.id)).toEqual([ids[repository]]);
    }
    const crossed = await run({ kind: 'backup', repository: 'crossed', name: 'vm-x', disks: [{ kind: 'raw', path: image }] });
    expect(crossed.state).toBe('failed');
    expect(crossed.error!.code).toBe('ENGINE_STORAGE_DENIED');
  });

  test('config mistakes stop the server before it listens: an s3 block for a folder, keys inline, no credentials file, one that is not there, one location twice', async () => {
    const bad = (repo: Record<string, unknown>): Record<string, unknown> => ({ bad: repo });
    const cases: [Record<string, unknown>, RegExp][] = [
      [bad({ location: join(scratch.path, 'folder'), s3: { credentialsFile: 'x' } }), /only an s3:\/\/ location has S3 settings/],
      [bad({ location: 's3://bucket-a/repo', s3: { credentialsFile: 'x', secretAccessKey: 'inline' } }), /unknown field "secretAccessKey"/],
      [bad({ location: 's3://bucket-a/repo', s3: { endpoint: cluster.endpoint } }), /credentialsFile is required/],
      [bad({ location: 's3://bucket-a/repo', s3: { credentialsFile: join(scratch.path, 'missing.aws') } }), /no S3 credentials/],
      [{ one: { location: 's3://bucket-a/repo', s3: { credentialsFile: 'x' } }, two: { location: 's3://bucket-a/repo/' } }, /repositories one and two are both at s3:\/\/bucket-a\/repo/],
    ];
    for (const [repositories, message] of cases) {
      const config = await writeConfig(scratch.path, { stateDir: join(scratch.path, 'state-bad'), repositories });
      const r = await runEngine(['server', '--config', config, '--listen', '127.0.0.1:0']);
      expect(r.code).not.toBe(0);
      expect(r.stderr).toMatch(message);
      expect(r.stdout).toBe('');
    }
  });
});
