/**
 * What the S3 benches share: a bucket on the private RGW, RGW's own PUT/GET ceiling through curl (a C client
 * outside this code base), the page cache dropped before a timed run, the machine's load.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { S3Client as EngineS3Client } from '../repo-format/storage/s3-client.js';
import { EMPTY_SHA256 } from '../repo-format/storage/sigv4.js';
import { startRgwCluster, type RgwCluster, type RgwOptions } from '../test/rgw.js';
import { MB, run } from './tools.js';

/**
 * A private RGW for a bench, with `bucket` created; Ctrl-C (or SIGTERM) stops it and removes `scratch`
 * before the bench exits.
 */
export async function startBenchCluster(options: RgwOptions & { memstoreBytes: number }, bucket: string, scratch: string, log: (message: string) => void): Promise<RgwCluster> {
  const cluster = await startRgwCluster(options);
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.once(signal, () => {
      log(`${signal}: stopping the cluster`);
      void cluster.stop().finally(() => rm(scratch, { recursive: true, force: true }).finally(() => process.exit(130)));
    });
  }
  log(`RGW up in ${cluster.timings.startMs} ms at ${cluster.endpoint} (memstore ${options.memstoreBytes / 2 ** 30} GiB)`);
  await createBucket(cluster, bucket);
  return cluster;
}

export async function createBucket(cluster: RgwCluster, bucket: string): Promise<void> {
  const client = new EngineS3Client({
    endpoint: new URL(cluster.endpoint),
    pathStyle: true,
    region: cluster.region,
    credentials: { accessKeyId: cluster.user.accessKeyId, secretAccessKey: cluster.user.secretAccessKey },
    connections: 1,
    idleTimeoutMs: 30_000,
    location: bucket,
  });
  try {
    await client.request({ method: 'PUT', bucket, payloadHash: EMPTY_SHA256, response: { kind: 'discard' }, context: { location: bucket, operation: 'create bucket' } });
  } finally {
    client.close();
  }
}

/** Runs `work(i)` for i in 0..count-1 with `parallel` in flight; wall seconds. */
export async function inFlight(count: number, parallel: number, work: (i: number) => Promise<void>): Promise<number> {
  const started = performance.now();
  let next = 0;
  await Promise.all(
    Array.from({ length: parallel }, async () => {
      while (next < count) await work(next++);
    }),
  );
  return (performance.now() - started) / 1000;
}

function curl(args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile('curl', ['-sS', '--fail', '-o', '/dev/null', '-w', '%{http_code}', ...args], (error, stdout, stderr) => (error ? reject(new Error(`curl: ${stderr || error.message}`)) : resolve(stdout)));
  });
}

export interface Ceiling {
  parallel: number;
  putMBps: number;
  getMBps: number;
}

/**
 * RGW's PUT and GET ceiling with `objects` objects of `size` bytes at `parallel` curl processes in flight
 * (SigV4, UNSIGNED-PAYLOAD, no checksum: the least a client can make the gateway do). The files are read
 * once before the clock starts: it is the gateway's ceiling, not the disk's.
 */
export async function rgwCeiling(cluster: RgwCluster, bucket: string, scratch: string, objects: number, size: number, parallel: number, tag: string): Promise<Ceiling> {
  const files = await Promise.all(
    Array.from({ length: objects }, async (_, i) => {
      const file = join(scratch, `ceiling-${tag}-${i}`);
      await writeFile(file, randomBytes(size));
      return file;
    }),
  );
  for (const file of files) await readFile(file);
  const config = join(scratch, `curl-${tag}.cfg`);
  // The key goes to curl in a private config file, never on its command line.
  await writeFile(config, `user = "${cluster.user.accessKeyId}:${cluster.user.secretAccessKey}"\naws-sigv4 = "aws:amz:${cluster.region}:s3"\nheader = "x-amz-content-sha256: UNSIGNED-PAYLOAD"\n`, { mode: 0o600 });
  const url = (i: number): string => `${cluster.endpoint}/${bucket}/ceiling-${tag}/${i}`;
  const put = await inFlight(objects, parallel, async (i) => void (await curl(['-K', config, '-T', files[i]!, url(i)])));
  const get = await inFlight(objects, parallel, async (i) => void (await curl(['-K', config, url(i)])));
  await run('rm', ['-f', config, ...files]);
  return { parallel, putMBps: (objects * size) / MB / put, getMBps: (objects * size) / MB / get };
}

export { dropCaches, loadAverage } from './tools.js';
