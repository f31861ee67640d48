/**
 * The index cache's catch-up from S3 (issue 14, item 6; SPEC.md 19.4): `node dist/bench/v3-catchup.js
 * [--segments 2000] [--entries 40] [--rounds 2] [--builds dist,OTHER_DIST]`.
 *
 * Starts a private Ceph RADOS Gateway (test/rgw.ts), stores `--segments` valid index segments of `--entries`
 * entries each under a prefix, then times a catch-up into a fresh host cache (IndexCache.open through the
 * engine's S3 stack: retries, concurrency limit) as its own process under /usr/bin/time (wall, CPU, peak
 * RSS), once per build in `--builds` (a folder holding a compiled tree, e.g. one built from an older commit
 * to compare), the order reversed every other round. RGW shares the machine's cores with the client.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { openS3Stack } from '../repo-format/storage/s3.js';
import { initChecksum } from '../repo-format/checksum.js';
import { encodeSegment, segmentKey, type SegmentEntry } from '../repo-format/v3/segment.js';
import { startBenchCluster, inFlight } from './s3-lab.js';
import { arg, logger, timed } from './tools.js';

const BUCKET = 'engine-bench-catchup';
const log = logger('v3-catchup');

interface ChildEnv {
  BENCH_ENDPOINT: string;
  BENCH_URL: string;
  BENCH_REGION: string;
  AWS_ACCESS_KEY_ID: string;
  AWS_SECRET_ACCESS_KEY: string;
}

/** In the child: one catch-up into a fresh cache with the build under `dist`; prints what it ingested. */
async function child(dist: string): Promise<void> {
  const env = process.env as unknown as ChildEnv;
  const s3 = (await import(join(dist, 'repo-format/storage/s3.js'))) as typeof import('../repo-format/storage/s3.js');
  const cacheModule = (await import(join(dist, 'repo-format/v3/index-cache.js'))) as typeof import('../repo-format/v3/index-cache.js');
  const checksum = (await import(join(dist, 'repo-format/checksum.js'))) as typeof import('../repo-format/checksum.js');
  await checksum.initChecksum();
  const { storage } = await s3.openS3Stack({ url: env.BENCH_URL, endpoint: env.BENCH_ENDPOINT, region: env.BENCH_REGION, env: process.env as Record<string, string> });
  const root = await mkdtemp(join(tmpdir(), 'bench-catchup-'));
  try {
    const started = performance.now();
    const { cache, catchUp } = await cacheModule.IndexCache.open({ cacheRoot: root, repositoryId: 'ab'.repeat(16), storage });
    const seconds = (performance.now() - started) / 1000;
    const counts = await cache.counts();
    await cache.close();
    console.log(JSON.stringify({ seconds, ingested: catchUp.ingested, entries: catchUp.entries, blobs: counts.blobs }));
  } finally {
    await rm(root, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const segments = Number(arg('--segments') ?? 2000);
  const entries = Number(arg('--entries') ?? 40);
  const rounds = Number(arg('--rounds') ?? 2);
  const builds = (arg('--builds') ?? fileURLToPath(new URL('..', import.meta.url))).split(',').map((b) => resolve(b));
  await initChecksum();
  const scratch = await mkdtemp(join(tmpdir(), 'bench-catchup-rgw-'));
  const cluster = await startBenchCluster({ memstoreBytes: 1024 * 1024 * 1024 }, BUCKET, scratch, log);
  try {
    const url = `s3://${BUCKET}/repo`;
    const credentials = { accessKeyId: cluster.user.accessKeyId, secretAccessKey: cluster.user.secretAccessKey };
    const { storage } = await openS3Stack({ url, endpoint: cluster.endpoint, region: cluster.region, credentials, env: {} });
    const writer = randomBytes(16).toString('hex');
    const putSeconds = await inFlight(segments, 16, async (seq) => {
      const pack = randomBytes(16).toString('hex');
      const list: SegmentEntry[] = Array.from({ length: entries }, (_, k) => ({ id: randomBytes(32), packId: pack, offset: 32 + k * 1000, length: 900, rawLength: 65536, kind: 1, flags: 0 }));
      list.sort((a, b) => Buffer.compare(a.id, b.id));
      const name = { writer, seq };
      await storage.put(segmentKey(name), encodeSegment({ name, supersedes: [], entries: list }), { ifAbsent: true });
    });
    log(`${segments} segments of ${entries} entries stored in ${putSeconds.toFixed(1)} s`);
    const env: ChildEnv = { BENCH_ENDPOINT: cluster.endpoint, BENCH_URL: url, BENCH_REGION: cluster.region, AWS_ACCESS_KEY_ID: credentials.accessKeyId, AWS_SECRET_ACCESS_KEY: credentials.secretAccessKey };
    const node = process.execPath;
    const self = fileURLToPath(import.meta.url);
    for (let round = 0; round < rounds; round++) {
      const order = round % 2 === 0 ? builds : [...builds].reverse();
      for (const build of order) {
        const measured = await timed(node, [self, '--child', build], env as unknown as Record<string, string>);
        log(`round ${round + 1} ${build}: wall ${measured.seconds.toFixed(2)} s, CPU ${measured.cpuSeconds.toFixed(2)} s, peak RSS ${measured.peakRssMiB.toFixed(0)} MiB; ${measured.stdout.trim()}`);
      }
    }
  } finally {
    await cluster.stop();
    await rm(scratch, { recursive: true, force: true });
  }
}

const childDist = arg('--child');
await (childDist ? child(childDist) : main());
