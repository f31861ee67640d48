/**
 * What interrupted writers abandon where no listing shows it, and format-3 gc removes (SPEC.md 19.8, 2.5):
 * on a folder, the local store's temporary files (`.<name>.<12 hex>.tmp` beside their targets) whose mtime
 * is older than T + 2B; on S3 (the tests' RGW), incomplete multipart uploads under the repository's prefix
 * initiated before that. Exactly those: a fresh temporary file, a recent upload, files not of the pattern
 * and uploads outside the prefix stay; a dry run removes nothing.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createHash } from 'node:crypto';
import { mkdir, symlink, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseUploadId, parseUploadsPage } from '../dist/repo-format/storage/s3-xml.js';
import { EMPTY_SHA256 } from '../dist/repo-format/storage/sigv4.js';
import { startRgwCluster, type RgwCluster } from './rgw.js';
import { createBucket, folderKeys, openRgwBackend, rawClient, setLeaseTiming, v3Env } from './s3-helpers.js';
import { parseJson, runEngine, tempDir } from './helpers.js';

const MiB = 1024 * 1024;
const BUCKET = 'engine-v3-sweep';
let cluster: RgwCluster;
let scratch: { path: string; cleanup: () => Promise<void> };

beforeAll(async () => {
  scratch = await tempDir('engine-v3-sweep-');
  cluster = await startRgwCluster({ memstoreBytes: 256 * MiB });
  await createBucket(cluster, BUCKET);
});

afterAll(async () => {
  await cluster?.stop();
  await scratch?.cleanup();
});

const env = (): Record<string, string> => v3Env(cluster, scratch.path, 'cache');

async function gc(repo: string, args: string[] = []): Promise<{ abandoned?: number; dryRun: boolean }> {
  const r = await runEngine(['gc', '--repo', repo, '--json', ...args], { env: env() });
  expect(r.code, r.stderr).toBe(0);
  return parseJson<{ abandoned?: number; dryRun: boolean }>(r.stdout);
}

async function init(repo: string): Promise<void> {
  const r = await runEngine(['init', '--format', '3', repo], { env: env() });
  expect(r.code, r.stderr).toBe(0);
}

/** Multipart uploads started and listed behind the engine's back (an upload's parts: one of 4 KiB). */
function multipart(client: ReturnType<typeof rawClient>): { start: (objectKey: string) => Promise<string>; uploads: () => Promise<string[]> } {
  const context = { location: BUCKET, operation: 'raw multipart' };
  const start = async (objectKey: string): Promise<string> => {
    const answer = await client.request({ method: 'POST', bucket: BUCKET, objectKey, query: [['uploads', '']], payloadHash: EMPTY_SHA256, response: { kind: 'text', maxSize: MiB }, context });
    const uploadId = parseUploadId(answer.body.toString('utf8'));
    const part = Buffer.alloc(4096, 7);
    await client.request({
      method: 'PUT',
      bucket: BUCKET,
      objectKey,
      query: [['partNumber', '1'], ['uploadId', uploadId]],
      body: { bytes: part },
      payloadHash: createHash('sha256').update(part).digest('hex'),
      response: { kind: 'discard' },
      context,
    });
    return uploadId;
  };
  /** Every upload of the bucket as "key uploadId", sorted. */
  const uploads = async (): Promise<string[]> => {
    const answer = await client.request({ method: 'GET', bucket: BUCKET, query: [['uploads', '']], payloadHash: EMPTY_SHA256, response: { kind: 'text', maxSize: MiB }, context });
    const page = parseUploadsPage(answer.body.toString('utf8'));
    expect(page.truncated).toBe(false);
    return page.uploads.map((upload) => `${upload.key} ${upload.uploadId}`).sort();
  };
  return { start, uploads };
}

/** Aborts every upload of the bucket: the tests' own leftovers, whatever happened. */
async function abortAll(client: ReturnType<typeof rawClient>): Promise<void> {
  for (const line of await multipart(client).uploads().catch(() => [])) {
    const [objectKey, uploadId] = line.split(' ');
    await client.request({ method: 'DELETE', bucket: BUCKET, objectKey, query: [['uploadId', uploadId!]], payloadHash: EMPTY_SHA256, response: { kind: 'discard' }, context: { location: BUCKET, operation: 'raw abort' } }).catch(() => undefined);
  }
}

describe('gc on version 3 removes what interrupted writers abandoned', () => {
  test('a folder: exactly the temporary files of the store pattern older than T + 2B', async () => {
    const repo = join(scratch.path, 'folder');
    await init(repo);
    const day = new Date(Date.now() - 24 * 3600 * 1000);
    const plant = async (relative: string, old: boolean): Promise<void> => {
      await mkdir(join(repo, relative, '..'), { recursive: true, mode: 0o700 });
      await writeFile(join(repo, relative), 'abandoned');
      if (old) await utimes(join(repo, relative), day, day);
    };
    // Of the pattern: one old per kind of place (a pack's folder, leases/, the root), one fresh.
    const old = ['packs/ab/.ab01cd.0123456789ab.tmp', 'leases/.0f0f.json.a1b2c3d4e5f6.tmp', '.config.00000000ffff.tmp'];
    for (const path of old) await plant(path, true);
    await plant('leases/.fresh.json.abcdefabcdef.tmp', false);
    // Not of the pattern, all old: never touched.
    const others = [
      'README.txt',
      '.hidden',
      'packs/ab/.ab01cd.tmp',
      'packs/ab/.ab01cd.0123456789AB.tmp',
      'packs/ab/.ab01cd.0123456789a.tmp',
      'packs/ab/.ab01cd.0123456789ab.tmp.keep',
      'packs/ab/ab01cd.0123456789ab.tmp',
      'index/..x.0123456789ab.tmp',
      // In a folder named by the pattern: the folder is not a file of the store's.
      'packs/.dir.0123456789ab.tmp/README',
    ];
    for (const path of others) await plant(path, true);
    await utimes(join(repo, 'packs/.dir.0123456789ab.tmp'), day, day);
    // A link named by the pattern: not a file of the store's.
    await symlink(join(repo, 'README.txt'), join(repo, 'packs/ab/.link.0123456789ab.tmp'));
    // gc's own segments come and go: the rest of the folder is compared.
    const files = async (): Promise<string[]> => (await folderKeys(repo)).filter((path) => !/^index\/[0-9a-f]{32}-\d+$/.test(path));
    const before = await files();
    for (const path of old) expect(before).toContain(path);

    const dry = await gc(repo, ['--dry-run']);
    expect(dry.dryRun).toBe(true);
    expect(dry.abandoned).toBeUndefined();
    expect(await files()).toEqual(before);

    const report = await gc(repo);
    expect(report.abandoned).toBe(old.length);
    const after = await files();
    expect(after).toEqual(before.filter((path) => !old.includes(path)));
    for (const path of [...others, 'leases/.fresh.json.abcdefabcdef.tmp', 'packs/ab/.link.0123456789ab.tmp']) expect(after).toContain(path);

    // Nothing left of the kind: the next gc removes none.
    expect((await gc(repo)).abandoned).toBe(0);
  });

  test('S3: the incomplete multipart uploads under the prefix initiated before T + 2B, no others', async () => {
    const repo = `s3://${BUCKET}/sweep`;
    await init(repo);
    // T + 2B = 18 s (the least T is 4B + 1 ms, B at least 1 s): an initiation time cannot be set back, so the test waits it out.
    await setLeaseTiming(cluster, repo, 16_000, 1_000);
    const client = rawClient(cluster);
    const { start, uploads } = multipart(client);
    try {
      const oldPack = await start('sweep/packs/ab/ab01cd');
      const oldLease = await start('sweep/leases/0f0f.json');
      // Another repository's (its prefix starts the same) and a foreign name under this prefix: never touched.
      const neighbour = await start('sweep-other/packs/ab/ab01cd');
      const foreign = await start('sweep/.not-a-key');
      await new Promise((resolve) => setTimeout(resolve, 19_000));
      const recent = await start('sweep/packs/cd/cd02ef');
      expect(await uploads()).toEqual(
        [`sweep/packs/ab/ab01cd ${oldPack}`, `sweep/leases/0f0f.json ${oldLease}`, `sweep-other/packs/ab/ab01cd ${neighbour}`, `sweep/.not-a-key ${foreign}`, `sweep/packs/cd/cd02ef ${recent}`].sort(),
      );

      const dry = await gc(repo, ['--dry-run']);
      expect(dry.abandoned).toBeUndefined();
      expect(await uploads()).toHaveLength(5);

      expect((await gc(repo)).abandoned).toBe(2);
      expect(await uploads()).toEqual([`sweep-other/packs/ab/ab01cd ${neighbour}`, `sweep/.not-a-key ${foreign}`, `sweep/packs/cd/cd02ef ${recent}`].sort());
    } finally {
      await abortAll(client);
      client.close();
    }
  }, 180_000);

  test('S3: the uploads are listed page by page (two a page), two uploads of one key included', async () => {
    const client = rawClient(cluster);
    const { start, uploads } = multipart(client);
    const backend = await openRgwBackend(cluster, `s3://${BUCKET}/pages`, { listPage: 2 });
    try {
      const keys = ['pages/index/a-0', 'pages/index/a-0', 'pages/index/b-0', 'pages/packs/00/0a', 'pages/packs/ff/fa'];
      for (const key of keys) await start(key);
      const outside = await start('pagesx/packs/00/0a');
      // Everything begun before the cut (a minute ahead) goes: five, over three pages.
      expect(await backend.sweepAbandoned(Date.now() + 60_000)).toBe(keys.length);
      expect(await uploads()).toEqual([`pagesx/packs/00/0a ${outside}`]);
      expect(await backend.sweepAbandoned(Date.now() + 60_000)).toBe(0);
    } finally {
      await backend.close();
      await abortAll(client);
      client.close();
    }
  });
});
