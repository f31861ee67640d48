/**
 * S3 ceiling: `node dist/bench/s3-ceiling.js [--objects 12] [--size 32M] [--parallel 1,4,8] [--sdk DIR]
 * [--out bench/results]`.
 *
 * Starts a private Ceph RADOS Gateway (test/rgw.ts: memstore, so the store's disk is not what is measured)
 * and measures, in one run, with N objects of 32 MiB (a pack's size) at each level of parallelism:
 * 1. RGW's own PUT and GET ceiling, through curl (a C client outside this code base, one process per
 *    request in flight, `--aws-sigv4`, UNSIGNED-PAYLOAD, no checksum; and PUT again with the Content-MD5
 *    computed beforehand): what the gateway can take here;
 * 2. the engine's S3 backend as the engine stacks it (retries, concurrency limit): PUT from a file with
 *    Content-MD5 (UNSIGNED-PAYLOAD on loopback, as over TLS), GET of whole objects
 *    with the ETag check, ranged GETs of 1 MiB (restore, verify and serve read frames so);
 * 3. with `--sdk DIR` (a folder where `npm install @aws-sdk/client-s3` was run), the AWS SDK v3 doing the
 *    same PUTs (with Content-MD5) and GETs, for the client choice (repo-format/storage/README.md).
 * Rates are MB/s (10^6 B) of object bytes over wall time; CPU is this process's user+sys over the phase
 * (curl's own CPU is not counted). RGW and the client share the machine's cores: read the client's figures
 * against the ceiling of the same run.
 */
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseSize } from '../engine/index.js';
import { openS3Stack } from '../repo-format/storage/s3.js';
import type { Storage } from '../repo-format/storage/storage.js';
import type { RgwCluster } from '../test/rgw.js';
import { reportMarkdown, writeReport } from './report.js';
import { startBenchCluster } from './s3-lab.js';
import { arg, logger, machineLine, MB } from './tools.js';

const log = logger('s3-ceiling');
const BUCKET = 'ceiling';

interface Phase {
  client: string;
  operation: string;
  parallel: number;
  bytes: number;
  seconds: number;
  mbPerSecond: number;
  cpuSeconds: number;
  rssMiB: number;
}

/** Runs `work(i)` for i in 0..count-1 with `parallel` in flight; returns wall seconds and this process's CPU seconds. */
async function measure(count: number, parallel: number, work: (i: number) => Promise<void>): Promise<{ seconds: number; cpuSeconds: number }> {
  const cpu = process.cpuUsage();
  const started = performance.now();
  let next = 0;
  await Promise.all(
    Array.from({ length: parallel }, async () => {
      while (next < count) await work(next++);
    }),
  );
  const used = process.cpuUsage(cpu);
  return { seconds: (performance.now() - started) / 1000, cpuSeconds: (used.user + used.system) / 1e6 };
}

function curl(args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile('curl', ['-sS', '--fail', '-o', '/dev/null', '-w', '%{http_code}', ...args], (error, stdout, stderr) => (error ? reject(new Error(`curl: ${stderr || error.message}`)) : resolve(stdout)));
  });
}

/** The subset of AWS SDK v3 this bench calls, typed here so the engine does not depend on it. */
interface SdkModule {
  S3Client: new (config: Record<string, unknown>) => { send(command: unknown): Promise<{ Body?: { transformToByteArray(): Promise<Uint8Array> } }>; destroy(): void };
  PutObjectCommand: new (input: Record<string, unknown>) => unknown;
  GetObjectCommand: new (input: Record<string, unknown>) => unknown;
}

async function main(): Promise<void> {
  const objects = Number(arg('--objects') ?? 12);
  const size = parseSize(arg('--size') ?? '32M');
  const levels = (arg('--parallel') ?? '1,4,8').split(',').map(Number);
  const sdkDir = arg('--sdk');
  const outDir = arg('--out') ?? 'bench/results';
  const clients = sdkDir ? 3 : 2;
  const scratch = await mkdtemp(join(tmpdir(), 's3-ceiling-'));
  let cluster: RgwCluster | undefined;
  const phases: Phase[] = [];
  try {
    const memstore = Math.ceil(((objects * size * levels.length * clients) * 1.3) / 2 ** 30) * 2 ** 30;
    cluster = await startBenchCluster({ memstoreBytes: memstore }, BUCKET, scratch, log);
    const files = await Promise.all(
      Array.from({ length: objects }, async (_, i) => {
        const file = join(scratch, `object-${i}`);
        await writeFile(file, randomBytes(size));
        return file;
      }),
    );
    const md5s = await Promise.all(files.map(async (file) => createHash('md5').update(await readFile(file)).digest('base64')));
    const curlConfig = join(scratch, 'curl.cfg');
    // The key goes to curl in a private config file, never on its command line.
    await writeFile(curlConfig, `user = "${cluster.user.accessKeyId}:${cluster.user.secretAccessKey}"\naws-sigv4 = "aws:amz:${cluster.region}:s3"\nheader = "x-amz-content-sha256: UNSIGNED-PAYLOAD"\n`, { mode: 0o600 });
    const record = (client: string, operation: string, parallel: number, bytes: number, timing: { seconds: number; cpuSeconds: number }): void => {
      const phase = { client, operation, parallel, bytes, seconds: timing.seconds, mbPerSecond: bytes / MB / timing.seconds, cpuSeconds: timing.cpuSeconds, rssMiB: process.memoryUsage().rss / 2 ** 20 };
      phases.push(phase);
      log(`${client} ${operation} x${parallel}: ${phase.mbPerSecond.toFixed(0)} MB/s, CPU ${phase.cpuSeconds.toFixed(1)} s, RSS ${phase.rssMiB.toFixed(0)} MiB`);
    };
    const total = objects * size;

    for (const parallel of levels) {
      const url = (i: number): string => `${cluster!.endpoint}/${BUCKET}/curl-${parallel}/${i}`;
      record('curl (RGW ceiling)', 'PUT', parallel, total, await measure(objects, parallel, async (i) => void (await curl(['-K', curlConfig, '-T', files[i]!, url(i)]))));
      record('curl (RGW ceiling)', 'GET', parallel, total, await measure(objects, parallel, async (i) => void (await curl(['-K', curlConfig, url(i)]))));
      // The same PUTs with the Content-MD5 the engine sends (computed before the clock starts): what the
      // store's own check of it costs, apart from the client's hashing.
      record('curl (RGW ceiling)', 'PUT with Content-MD5', parallel, total, await measure(objects, parallel, async (i) => void (await curl(['-K', curlConfig, '-H', `Content-MD5: ${md5s[i]}`, '-T', files[i]!, url(i)]))));

      const { storage } = await openS3Stack({
        url: `s3://${BUCKET}/engine-${parallel}`,
        endpoint: cluster.endpoint,
        region: cluster.region,
        credentials: { accessKeyId: cluster.user.accessKeyId, secretAccessKey: cluster.user.secretAccessKey },
        env: {},
        connections: parallel,
      });
      try {
        await engineRuns(storage, parallel, objects, size, files, total, record);
      } finally {
        await storage.close();
      }

      if (sdkDir) await sdkRuns(sdkDir, cluster, parallel, objects, files, total, record);
    }
  } finally {
    await cluster?.stop();
    await rm(scratch, { recursive: true, force: true });
  }

  const rows = phases.map((p) => `| ${p.client} | ${p.operation} | ${p.parallel} | ${p.mbPerSecond.toFixed(0)} | ${p.cpuSeconds.toFixed(1)} | ${p.rssMiB.toFixed(0)} |`);
  const best = (client: string, operation: string): number => Math.max(0, ...phases.filter((p) => p.client === client && p.operation === operation).map((p) => p.mbPerSecond));
  const ceilingPut = best('curl (RGW ceiling)', 'PUT');
  const ceilingGet = best('curl (RGW ceiling)', 'GET');
  const enginePut = best('engine S3 backend', 'PUT (file, Content-MD5)');
  const engineGet = best('engine S3 backend', 'GET (whole, ETag check)');
  const engineRanges = best('engine S3 backend', 'GET (1 MiB ranges)');
  const body = [
    '| client | operation | in flight | MB/s | CPU s (this process) | RSS MiB |',
    '|---|---|---|---|---|---|',
    ...rows,
    '',
    `Best of each: RGW ceiling PUT ${ceilingPut.toFixed(0)} MB/s, GET ${ceilingGet.toFixed(0)} MB/s; the engine's backend PUT ${enginePut.toFixed(0)} MB/s (${((enginePut / ceilingPut) * 100).toFixed(0)}% of the ceiling), GET of whole objects ${engineGet.toFixed(0)} MB/s (${((engineGet / ceilingGet) * 100).toFixed(0)}%), of 1 MiB ranges (restore, verify, serve) ${engineRanges.toFixed(0)} MB/s (${((engineRanges / ceilingGet) * 100).toFixed(0)}%).`,
  ].join('\n');
  const markdown = reportMarkdown(
    'S3 ceiling: RGW against the engine\'s S3 backend',
    [`${machineLine()}; Ceph ${await cephVersion()}, one memstore OSD; ${objects} objects of ${size / 2 ** 20} MiB per phase.`, 'RGW and the clients share the cores: compare within this run.'],
    body,
    [`the engine's S3 backend >= 80% of RGW's PUT ceiling (issue 14, for backups): ${((enginePut / ceilingPut) * 100).toFixed(0)}%`],
    sdkDir ? [] : ['AWS SDK v3 (give --sdk DIR with @aws-sdk/client-s3 installed in DIR)'],
  );
  await writeReport(outDir, 's3-ceiling', markdown, { objects, size, levels, phases });
}

type Record3 = (client: string, operation: string, parallel: number, bytes: number, timing: { seconds: number; cpuSeconds: number }) => void;

async function engineRuns(storage: Storage, parallel: number, objects: number, size: number, files: string[], total: number, record: Record3): Promise<void> {
  record('engine S3 backend', 'PUT (file, Content-MD5)', parallel, total, await measure(objects, parallel, (i) => storage.put(`packs/${i}`, { file: files[i]! })));
  record('engine S3 backend', 'GET (whole, ETag check)', parallel, total, await measure(objects, parallel, async (i) => void (await storage.get(`packs/${i}`))));
  const piece = 1024 * 1024;
  const perObject = Math.floor(size / piece);
  record('engine S3 backend', 'GET (1 MiB ranges)', parallel * 4, objects * perObject * piece, await measure(objects * perObject, parallel * 4, async (n) => {
    const i = n % objects;
    const offset = Math.floor(n / objects) * piece;
    await storage.get(`packs/${i}`, { range: { offset, length: piece } });
  }));
}

async function sdkRuns(sdkDir: string, cluster: RgwCluster, parallel: number, objects: number, files: string[], total: number, record: Record3): Promise<void> {
  const sdk = (await import(pathToFileURL(join(sdkDir, 'node_modules', '@aws-sdk', 'client-s3', 'dist-cjs', 'index.js')).href)) as unknown as SdkModule & { default?: SdkModule };
  const { S3Client, PutObjectCommand, GetObjectCommand } = sdk.default ?? sdk;
  const client = new S3Client({
    endpoint: cluster.endpoint,
    region: cluster.region,
    forcePathStyle: true,
    credentials: { accessKeyId: cluster.user.accessKeyId, secretAccessKey: cluster.user.secretAccessKey },
    // Content-MD5 as the engine sends it, so that both clients do the same work (the SDK's default CRC32 is off).
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
    maxAttempts: 3,
  });
  try {
    record('AWS SDK v3', 'PUT (buffer, MD5)', parallel, total, await measure(objects, parallel, async (i) => {
      const body = await readFile(files[i]!);
      await client.send(new PutObjectCommand({ Bucket: BUCKET, Key: `sdk-${parallel}/${i}`, Body: body, ContentMD5: createHash('md5').update(body).digest('base64') }));
    }));
    record('AWS SDK v3', 'GET (whole)', parallel, total, await measure(objects, parallel, async (i) => {
      const answer = await client.send(new GetObjectCommand({ Bucket: BUCKET, Key: `sdk-${parallel}/${i}` }));
      await answer.Body!.transformToByteArray();
    }));
  } finally {
    client.destroy();
  }
}

function cephVersion(): Promise<string> {
  return new Promise((resolve) => execFile('ceph-osd', ['--version'], (error, stdout) => resolve(error ? 'unknown' : (/(\d+\.\d+\.\d+)/.exec(stdout)?.[1] ?? 'unknown'))));
}

await main();
