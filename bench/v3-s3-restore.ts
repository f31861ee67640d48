/**
 * Restore of an image from an S3 repository on the tests' own Ceph RADOS Gateway, as whole processes: wall
 * time, CPU seconds (user + system) and peak RSS of `engine restore`, measured by /usr/bin/time, and each
 * restore compared with cmp. Written to choose how the block workers get S3 frames (the figures of both
 * ways are in repo-format/frame-locator.ts).
 *
 *   node dist/bench/v3-s3-restore.js [--size 1G] [--runs 3]
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseSize } from '../engine/index.js';
import { S3Client } from '../repo-format/storage/s3-client.js';
import { EMPTY_SHA256 } from '../repo-format/storage/sigv4.js';
import { startRgwCluster } from '../test/rgw.js';
import { arg } from './tools.js';

const ENGINE = fileURLToPath(new URL('../../bin/engine', import.meta.url));
const BUCKET = 'engine-bench-restore';

function run(command: string, args: string[], env: Record<string, string>): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(command, args, { env: { ...process.env, ...env }, maxBuffer: 64 * 1024 * 1024 }, (error, stdout, stderr) => (error ? reject(new Error(`${command} ${args.join(' ')}: ${stderr || error.message}`)) : resolve(`${stdout}${stderr}`)));
  });
}

async function randomImage(path: string, size: number): Promise<void> {
  const file = await open(path, 'w');
  try {
    for (let at = 0; at < size; at += 16 * 1024 * 1024) await file.write(randomBytes(Math.min(16 * 1024 * 1024, size - at)), 0, undefined, at);
  } finally {
    await file.close();
  }
}

const size = parseSize(arg('--size') ?? '1G');
const runs = Number(arg('--runs') ?? '3');
const dir = await mkdtemp(join(tmpdir(), 'engine-bench-restore-'));
const cluster = await startRgwCluster({ memstoreBytes: size * 2 + 512 * 1024 * 1024 });
try {
  const client = new S3Client({ endpoint: new URL(cluster.endpoint), pathStyle: true, region: cluster.region, credentials: { accessKeyId: cluster.user.accessKeyId, secretAccessKey: cluster.user.secretAccessKey }, connections: 1, idleTimeoutMs: 30_000, location: BUCKET });
  await client.request({ method: 'PUT', bucket: BUCKET, payloadHash: EMPTY_SHA256, response: { kind: 'discard' }, context: { location: BUCKET, operation: 'create bucket' } });
  client.close();
  const env = {
    AWS_ACCESS_KEY_ID: cluster.user.accessKeyId,
    AWS_SECRET_ACCESS_KEY: cluster.user.secretAccessKey,
    AWS_SHARED_CREDENTIALS_FILE: join(dir, 'none'),
    AWS_CONFIG_FILE: join(dir, 'none'),
    AWS_ENDPOINT_URL_S3: cluster.endpoint,
    AWS_REGION: cluster.region,
    ENGINE_CACHE_DIR: join(dir, 'cache'),
  };
  const image = join(dir, 'image.raw');
  await randomImage(image, size);
  const repo = `s3://${BUCKET}/repo`;
  await run(ENGINE, ['init', repo], env);
  const id = (JSON.parse(await run(ENGINE, ['backup', '--repo', repo, '--source', image, '--json'], env)) as { id: string }).id;
  process.stdout.write(`| run | wall s | CPU s | peak RSS MiB |\n|---|---|---|---|\n`);
  for (let i = 0; i < runs; i += 1) {
    const target = join(dir, 'restored.raw');
    const out = await run('/usr/bin/time', ['-f', 'TIME %e %U %S %M', ENGINE, 'restore', '--repo', repo, id, '--to', target], env);
    const [wall, user, system, rssKiB] = /TIME (\S+) (\S+) (\S+) (\S+)/.exec(out)!.slice(1).map(Number) as [number, number, number, number];
    await run('cmp', [image, target], {});
    process.stdout.write(`| ${i + 1} | ${wall.toFixed(1)} | ${(user + system).toFixed(1)} | ${Math.round(rssKiB / 1024)} |\n`);
    await rm(target);
  }
} finally {
  await cluster.stop();
  await rm(dir, { recursive: true, force: true });
}
