/**
 * S3 storages on the tests' own RGW (test/rgw.ts): buckets made with our signed client, storages opened the
 * way the engine opens them but with the cluster's user passed in (nothing read from the test machine's
 * environment or ~/.aws), and raw requests for what the engine never does (objects with foreign names, an
 * object cut behind the engine's back).
 */
import { createHash } from 'node:crypto';
import { chmod, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { S3Client } from '../dist/repo-format/storage/s3-client.js';
import { openS3Stack, openS3Storage, type S3Storage, type S3StorageOptions } from '../dist/repo-format/storage/s3.js';
import type { RetryPolicy } from '../dist/repo-format/storage/retry.js';
import type { Storage } from '../dist/repo-format/storage/storage.js';
import { EMPTY_SHA256 } from '../dist/repo-format/storage/sigv4.js';
import type { RgwCluster, RgwUser } from './rgw.js';

export function rawClient(cluster: RgwCluster, user: RgwUser = cluster.user, endpoint = cluster.endpoint): S3Client {
  return new S3Client({
    endpoint: new URL(endpoint),
    pathStyle: true,
    region: cluster.region,
    credentials: { accessKeyId: user.accessKeyId, secretAccessKey: user.secretAccessKey },
    connections: 4,
    idleTimeoutMs: 30_000,
    location: `raw:${endpoint}`,
  });
}

export async function createBucket(cluster: RgwCluster, bucket: string, user: RgwUser = cluster.user): Promise<void> {
  const client = rawClient(cluster, user);
  try {
    await client.request({ method: 'PUT', bucket, payloadHash: EMPTY_SHA256, response: { kind: 'discard' }, context: { location: bucket, operation: 'create bucket' } });
  } finally {
    client.close();
  }
}

/** PUT of any key (the engine's key rule unchecked), under the bucket. */
export async function rawPut(cluster: RgwCluster, bucket: string, objectKey: string, bytes: Uint8Array): Promise<void> {
  const client = rawClient(cluster);
  try {
    await client.request({
      method: 'PUT',
      bucket,
      objectKey,
      body: { bytes },
      payloadHash: createHash('sha256').update(bytes).digest('hex'),
      response: { kind: 'discard' },
      context: { location: bucket, operation: 'raw put', key: objectKey },
    });
  } finally {
    client.close();
  }
}

function rgwOptions(cluster: RgwCluster, url: string, options: Partial<S3StorageOptions>): S3StorageOptions {
  return {
    url,
    endpoint: cluster.endpoint,
    region: cluster.region,
    credentials: { accessKeyId: cluster.user.accessKeyId, secretAccessKey: cluster.user.secretAccessKey },
    env: {},
    ...options,
  };
}

/** The S3 backend alone: every call one attempt. */
export function openRgwBackend(cluster: RgwCluster, url: string, options: Partial<S3StorageOptions> = {}): Promise<S3Storage> {
  return openS3Storage(rgwOptions(cluster, url, options));
}

/** The S3 backend as the engine stacks it (retries, concurrency limit); `retry` as given. */
export async function openRgwStorage(cluster: RgwCluster, url: string, options: Partial<S3StorageOptions> & { retry?: RetryPolicy } = {}): Promise<Storage> {
  return (await openS3Stack(rgwOptions(cluster, url, options))).storage;
}

/** Runs `use` on the store of an S3 URL (as the engine stacks it), closed afterwards whatever happens. */
export async function withRgwStorage<T>(cluster: RgwCluster, url: string, use: (storage: Storage) => Promise<T>): Promise<T> {
  const storage = await openRgwStorage(cluster, url);
  try {
    return await use(storage);
  } finally {
    await storage.close();
  }
}

/** One object of a repository, read behind the engine's back: a folder's file, or the object under an S3 URL's prefix. */
export async function repositoryObject(cluster: RgwCluster, where: string, key: string): Promise<Buffer> {
  if (!where.startsWith('s3://')) return readFile(join(where, key));
  return withRgwStorage(cluster, where, (storage) => storage.get(key));
}

/**
 * The environment a user gives the CLI for the cluster: the standard AWS variables with its user, endpoint
 * and region, and nothing from this machine's ~/.aws (files under `scratch` that do not exist).
 */
export function rgwEnv(cluster: RgwCluster, scratch: string): Record<string, string> {
  return {
    AWS_ACCESS_KEY_ID: cluster.user.accessKeyId,
    AWS_SECRET_ACCESS_KEY: cluster.user.secretAccessKey,
    AWS_SHARED_CREDENTIALS_FILE: join(scratch, 'no-credentials'),
    AWS_CONFIG_FILE: join(scratch, 'no-config'),
    AWS_ENDPOINT_URL_S3: cluster.endpoint,
    AWS_REGION: cluster.region,
  };
}

/**
 * rgwEnv and the host cache of a version-3 command (ENGINE_CACHE_DIR, the folder `cache` under `scratch`):
 * two caches are two simulated hosts (their own host id and index cache, SPEC 19.4). A folder repository
 * ignores the AWS variables.
 */
export function v3Env(cluster: RgwCluster, scratch: string, cache: string): Record<string, string> {
  return { ...rgwEnv(cluster, scratch), ENGINE_CACHE_DIR: join(scratch, cache) };
}

/**
 * Every key of a repository as the store names it: a folder's files (paths relative to it, sorted; a folder
 * or subfolder that is not there holds none), or the objects under an S3 URL's prefix (in the store's order).
 */
export async function repositoryKeys(cluster: RgwCluster, where: string): Promise<string[]> {
  if (!where.startsWith('s3://')) return folderKeys(where);
  return withRgwStorage(cluster, where, async (storage) => {
    const keys: string[] = [];
    for await (const info of storage.list('')) keys.push(info.key);
    return keys;
  });
}

/** A folder's files, paths relative to it, sorted; a folder or subfolder that is not there holds none. */
export async function folderKeys(where: string): Promise<string[]> {
  const keys: string[] = [];
  const walk = async (dir: string, prefix: string): Promise<void> => {
    for (const entry of await readdir(dir, { withFileTypes: true }).catch(() => [])) {
      if (entry.isDirectory()) await walk(join(dir, entry.name), `${prefix}${entry.name}/`);
      else keys.push(`${prefix}${entry.name}`);
    }
  };
  await walk(where, '');
  return keys.sort();
}

/**
 * Sets a repository's lease timing behind the engine's back (config's `leases`, SPEC 19.1: any T > 4B with
 * B >= 1 s), in a folder (its config kept read-only) or on S3: tests shorten it to wait out a lease.
 */
export async function setLeaseTiming(cluster: RgwCluster, repo: string, timeMs: number, skewBoundMs: number): Promise<void> {
  const store = repo.startsWith('s3://') ? await openRgwStorage(cluster, repo) : undefined;
  try {
    const config = store ? await store.get('config') : await readFile(join(repo, 'config'));
    const edited = Buffer.from(JSON.stringify({ ...JSON.parse(config.toString('utf8')), leases: { timeMs, skewBoundMs } }));
    if (store) await store.put('config', edited);
    else {
      await chmod(join(repo, 'config'), 0o600);
      await writeFile(join(repo, 'config'), edited);
      await chmod(join(repo, 'config'), 0o400);
    }
  } finally {
    await store?.close();
  }
}

/** The objects under `prefix` of a repository with their store times in ms (S3's in whole seconds; a folder's file mtimes). */
async function storeTimes(cluster: RgwCluster, repo: string, prefix: string): Promise<{ key: string; modified: number }[]> {
  if (!repo.startsWith('s3://')) {
    const keys = (await folderKeys(repo)).filter((key) => key.startsWith(prefix));
    return Promise.all(keys.map(async (key) => ({ key, modified: (await stat(join(repo, key))).mtimeMs })));
  }
  return withRgwStorage(cluster, repo, async (storage) => {
    const objects: { key: string; modified: number }[] = [];
    for await (const info of storage.list(prefix)) {
      if (info.modified === undefined) throw new Error(`the store gave no time for ${info.key}`);
      objects.push({ key: info.key, modified: info.modified });
    }
    return objects;
  });
}

const sleepUntil = async (wallMs: number): Promise<void> => {
  const wait = wallMs - Date.now();
  if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
};

/**
 * Waits until every pack now in the repository is older than `ageMs` by the store's clock (the folder's and the
 * tests' RGW's are this machine's), and no longer: gc deletes a pack no segment names once it is older than
 * T + 2B (SPEC 19.8). S3 states times in whole seconds, cut down, both the pack's and gc's own reading of the
 * store's time: one second more.
 */
export async function untilPacksOlderThan(cluster: RgwCluster, repo: string, ageMs: number): Promise<void> {
  const newest = Math.max(0, ...(await storeTimes(cluster, repo, 'packs/')).map((pack) => pack.modified));
  await sleepUntil(newest + ageMs + (repo.startsWith('s3://') ? 1000 : 0) + 100);
}

/**
 * Waits until every lease now in the repository is expired to any observer on this machine (its `expires`
 * plus 2B, SPEC 19.5), and no longer: a lease's holder must be stopped (SIGSTOP), or it would refresh it.
 */
export async function untilLeasesExpired(cluster: RgwCluster, repo: string, skewBoundMs: number): Promise<void> {
  const leases = await storeTimes(cluster, repo, 'leases/');
  if (leases.length === 0) throw new Error(`no lease in ${repo} to wait for`);
  const expires = await Promise.all(leases.map(async ({ key }) => Date.parse((JSON.parse((await repositoryObject(cluster, repo, key)).toString('utf8')) as { expires: string }).expires)));
  await sleepUntil(Math.max(...expires) + 2 * skewBoundMs + 100);
}
