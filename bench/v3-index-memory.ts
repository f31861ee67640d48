/**
 * Peak memory of format 3 by the number of index entries and segments (issue 14: "peak RSS per process
 * unchanged whatever the number of objects"): `node dist/bench/v3-index-memory.js
 * [--shapes 100x100,100x2500,100x20000] [--commands catchup,gc,repair,lookup] [--s3] [--image 16M] [--rounds 1]
 * [--builds ROOT,OTHER_ROOT] [--variants 'NAME=JSON;OTHER=JSON'] [--limit 300] [--out DIR] [--keep]`.
 *
 * Each shape `SxE` is a format-3 repository (a local folder, or with `--s3` a prefix on a private Ceph RGW)
 * holding one backup of a random image and S more index segments of E entries each, written through the
 * public segment API: random blob ids, each placed at the place of a real frame of the backup (so repair
 * finds them good and gc finds them dead). Each command runs as its own process under /usr/bin/time (wall,
 * CPU, peak RSS) with bench/memory-sampler loaded (peaks of V8 heap, Buffers, and what is beyond V8):
 * - catchup: a fresh host cache catches up with the store (IndexCache.open; what a new host pays);
 * - gc: `engine gc` with a fresh host cache (its catch-up included), on a copy of the repository;
 * - repair: `engine repair` with a fresh host cache, on a copy (folder only: gc and repair change the store);
 * - lookup: a catch-up as above, then a process's first lookups once the cache is current (what a backup pays
 *   per block): 20000 new ids and 20000 indexed ones, 16 per call, on the cache opened anew (no table open
 *   yet), in µs per id of wall and of CPU (not a memory figure: it weighs the LevelDB options against speed).
 * Builds (`--builds`, roots of compiled trees, default this one) alternate, reversed every other round; so
 * do variants (`--variants`: a name and a JSON object of environment variables each, e.g.
 * `open74={"ENGINE_TEST_LEVEL_OPTIONS":"{\"maxOpenFiles\":74}"}`; BENCH_NODE_FLAGS adds Node flags through
 * NODE_OPTIONS, e.g. `semi8={"BENCH_NODE_FLAGS":"--max-semi-space-size=8"}`), to weigh a setting in the same minutes.
 * The verdict per command: PASS only if every round at every shape peaked at most `--limit` MiB (issue 14:
 * 300), with the peaks by shape side by side, so that a curve that grows shows even under the line.
 */
import { randomBytes } from 'node:crypto';
import { cp, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { initChecksum } from '../repo-format/checksum.js';
import { LocalStorage } from '../repo-format/storage/local.js';
import { openS3Stack } from '../repo-format/storage/s3.js';
import type { Storage } from '../repo-format/storage/storage.js';
import { decodeSegment, encodeSegment, parseSegmentKey, segmentKey, SEGMENT_MAX_ENTRIES, SEGMENT_PREFIX, type SegmentEntry } from '../repo-format/v3/segment.js';
import { parseSize } from '../engine/index.js';
import { loadAverage, startBenchCluster } from './s3-lab.js';
import { verdict } from './report.js';
import { arg, logger, machineLine, run, timed, type Measured } from './tools.js';

const log = logger('v3-index-memory');
const BUCKET = 'engine-bench-index-memory';

interface Shape {
  segments: number;
  entries: number;
}

interface Row {
  round: number;
  where: 'folder' | 's3';
  shape: Shape;
  command: string;
  build: string;
  variant: string;
  measured: Measured;
  peaks: Record<string, number>;
  load: string;
  /** What the child said (catchup, lookup: µs per id looked up, wall and CPU). */
  said: Record<string, number>;
}

function parseShapes(text: string): Shape[] {
  return text.split(',').filter(Boolean).map((shape) => {
    const [segments, entries] = shape.split('x').map(Number);
    if (!Number.isSafeInteger(segments) || !Number.isSafeInteger(entries) || entries! > SEGMENT_MAX_ENTRIES) throw new Error(`--shapes: ${shape} is not SEGMENTSxENTRIES`);
    return { segments: segments!, entries: entries! };
  });
}

/** `NAME=JSON;...`: environment variables per variant (a JSON object of strings); one unnamed by default. */
function parseVariants(text: string | undefined): { name: string; env: Record<string, string> }[] {
  if (!text) return [{ name: 'default', env: {} }];
  return text.split(';').filter(Boolean).map((part) => {
    const at = part.indexOf('=');
    if (at <= 0) throw new Error(`--variants: ${part} is not NAME=JSON`);
    return { name: part.slice(0, at), env: JSON.parse(part.slice(at + 1)) as Record<string, string> };
  });
}

/** One line per command, build and variant: its worst peak at each shape, and PASS only if all are under the limit. */
function verdictLines(rows: readonly Row[], limitMiB: number): string[] {
  const groups = new Map<string, Row[]>();
  for (const row of rows) {
    const key = JSON.stringify([row.command, row.build, row.variant]);
    groups.set(key, [...(groups.get(key) ?? []), row]);
  }
  return [...groups].map(([key, group]) => {
    const [command, build, variant] = JSON.parse(key) as string[];
    const byShape = new Map<number, number>();
    for (const r of group) byShape.set(r.shape.segments * r.shape.entries, Math.max(byShape.get(r.shape.segments * r.shape.entries) ?? 0, r.measured.peakRssMiB));
    const curve = [...byShape].sort((a, b) => a[0] - b[0]).map(([entries, mib]) => `${entries}: ${mib.toFixed(0)}`).join(', ');
    return `| ${command} | ${build} | ${variant} | ${curve} | ${verdict(group.map((r) => r.measured.peakRssMiB), (mib) => mib <= limitMiB)} |`;
  });
}

/** The lookup command's rows: µs per id (wall and CPU) of a fresh process's lookups, by variant. */
function lookupLines(rows: readonly Row[]): string[] {
  const lookups = rows.filter((r) => r.command === 'lookup');
  if (lookups.length === 0) return [];
  const us = (value: number | undefined): string => (value === undefined ? '?' : value.toFixed(1));
  return [
    `Lookups by a process that opens the caught-up cache anew: ${LOOKUPS} new (absent) ids, then ${LOOKUPS} indexed ones, ${LOOKUP_BATCH} per call (a backup's assembler batch). Wall time is the load's; CPU µs per id is the cost.`,
    '',
    '| round | index entries | build | variant | absent: µs/id | absent: CPU µs/id | indexed: µs/id | indexed: CPU µs/id | load (1/5/15) |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- |',
    ...lookups.map((r) => `| ${r.round} | ${r.shape.segments * r.shape.entries} | ${r.build} | ${r.variant} | ${us(r.said.absentUs)} | ${us(r.said.absentCpuUs)} | ${us(r.said.presentUs)} | ${us(r.said.presentCpuUs)} | ${r.load} |`),
    '',
  ];
}

/** Ids the lookup command asks for, of each kind. */
const LOOKUPS = 20000;

/** S segments of E entries (random ids at the place of a real frame), 32 at a time. */
async function fill(storage: Storage, shape: Shape): Promise<void> {
  let real: SegmentEntry | undefined;
  for await (const info of storage.list(SEGMENT_PREFIX)) {
    if (!parseSegmentKey(info.key)) continue;
    const segment = decodeSegment(await storage.get(info.key), info.key);
    if (typeof segment !== 'string' && segment.entries.length > 0) real = segment.entries[0];
    if (real) break;
  }
  if (!real) throw new Error('the backup left no index entry to copy the place of');
  const writer = randomBytes(16).toString('hex');
  let next = 0;
  const one = async (): Promise<void> => {
    while (next < shape.segments) {
      const seq = next++;
      const ids = randomBytes(32 * shape.entries);
      const entries: SegmentEntry[] = [];
      for (let i = 0; i < shape.entries; i++) entries.push({ ...real!, id: ids.subarray(i * 32, i * 32 + 32) });
      entries.sort((a, b) => Buffer.compare(a.id, b.id));
      const name = { writer, seq };
      await storage.put(segmentKey(name), encodeSegment({ name, supersedes: [], entries }), { ifAbsent: true });
    }
  };
  await Promise.all(Array.from({ length: 32 }, one));
}

/** In the child: one catch-up into a fresh cache with the build under `root`; prints what it ingested. */
async function child(root: string): Promise<void> {
  const dist = join(root, 'dist');
  const local = (await import(join(dist, 'repo-format/storage/local.js'))) as typeof import('../repo-format/storage/local.js');
  const s3 = (await import(join(dist, 'repo-format/storage/s3.js'))) as typeof import('../repo-format/storage/s3.js');
  const cacheModule = (await import(join(dist, 'repo-format/v3/index-cache.js'))) as typeof import('../repo-format/v3/index-cache.js');
  const checksum = (await import(join(dist, 'repo-format/checksum.js'))) as typeof import('../repo-format/checksum.js');
  await checksum.initChecksum();
  const repo = process.env.BENCH_REPO!;
  const storage = repo.startsWith('s3://')
    ? (await s3.openS3Stack({ url: repo, endpoint: process.env.AWS_ENDPOINT_URL_S3!, region: process.env.AWS_REGION!, env: process.env as Record<string, string> })).storage
    : new local.LocalStorage(repo);
  const config = JSON.parse((await storage.get('config')).toString('utf8')) as { id: string };
  const options = { cacheRoot: process.env.ENGINE_CACHE_DIR!, repositoryId: config.id, storage };
  const { cache, catchUp } = await cacheModule.IndexCache.open(options);
  let lookups: Record<string, number> = {};
  if (process.env.BENCH_LOOKUPS) {
    // What a backup pays per block once the cache is current: a process that opens it anew (no table open
    // yet) and asks for ids in batches, new ones (absent: a backup of new data) and indexed ones.
    const present: Buffer[] = [];
    let seen = 0;
    for await (const entry of cache.blobs()) if (seen++ % 97 === 0) present.push(entry.id);
    await cache.close();
    const { cache: reopened } = await cacheModule.IndexCache.open(options);
    const ask = async (ids: Buffer[]): Promise<{ usPerId: number; cpuUsPerId: number }> => {
      const cpu = process.cpuUsage();
      const started = performance.now();
      for (let at = 0; at < ids.length; at += LOOKUP_BATCH) await reopened.lookup(ids.slice(at, at + LOOKUP_BATCH));
      const used = process.cpuUsage(cpu);
      return { usPerId: ((performance.now() - started) * 1000) / ids.length, cpuUsPerId: (used.user + used.system) / ids.length };
    };
    const count = Number(process.env.BENCH_LOOKUPS);
    const absent = await ask(Array.from({ length: count }, () => randomBytes(32)));
    const indexed = await ask(Array.from({ length: count }, (_, i) => present[(i * 7919) % present.length]!));
    lookups = { absentUs: absent.usPerId, absentCpuUs: absent.cpuUsPerId, presentUs: indexed.usPerId, presentCpuUs: indexed.cpuUsPerId };
    await reopened.close();
  } else {
    await cache.close();
  }
  await storage.close();
  console.log(JSON.stringify({ ingested: catchUp.ingested, entries: catchUp.entries, ...lookups }));
}

/** The Node flags bin/engine runs the engine with (its young generation's size): the catch-up child runs with them too. */
const CHILD_NODE_FLAGS = ['--max-semi-space-size=8'];

/** Ids per lookup in the lookup command: a backup's assembler asks for a batch of blocks at a time. */
const LOOKUP_BATCH = 16;

async function main(): Promise<void> {
  const shapes = parseShapes(arg('--shapes') ?? '100x100,100x2500,100x20000');
  const commands = (arg('--commands') ?? 'catchup,gc,repair').split(',').filter(Boolean);
  const onS3 = process.argv.includes('--s3');
  const imageSize = parseSize(arg('--image') ?? '16M');
  const rounds = Number(arg('--rounds') ?? 1);
  const here = fileURLToPath(new URL('../..', import.meta.url));
  const builds = (arg('--builds') ?? here).split(',').map((b) => resolve(b));
  const variants = parseVariants(arg('--variants'));
  const limitMiB = Number(arg('--limit') ?? 300);
  // A variant named NAME@ROOT runs with that build only (and is named NAME); the others with every build.
  const runs = variants.flatMap(({ name, env }) => {
    const at = name.indexOf('@');
    return at > 0 ? [{ build: resolve(name.slice(at + 1)), name: name.slice(0, at), env }] : builds.map((build) => ({ build, name, env }));
  });
  const out = arg('--out') ? resolve(arg('--out')!) : undefined;
  await initChecksum();
  // --keep: the folder repositories stay (base-SxE under the scratch folder), to run a command on by hand.
  const keep = process.argv.includes('--keep');
  const scratch = await mkdtemp(join(tmpdir(), 'bench-v3-index-memory-'));
  const cluster = onS3 ? await startBenchCluster({ memstoreBytes: 3 * 1024 * 1024 * 1024 }, BUCKET, scratch, log) : undefined;
  const s3Env: Record<string, string> = cluster
    ? { AWS_ACCESS_KEY_ID: cluster.user.accessKeyId, AWS_SECRET_ACCESS_KEY: cluster.user.secretAccessKey, AWS_ENDPOINT_URL_S3: cluster.endpoint, AWS_REGION: cluster.region }
    : {};
  const rows: Row[] = [];
  const started = new Date().toISOString();
  const engine = join(here, 'bin/engine.js');
  try {
    const image = join(scratch, 'image.raw');
    await writeFile(image, randomBytes(imageSize));
    let prefix = 0;
    for (const shape of shapes) {
      const base = cluster ? `s3://${BUCKET}/shape-${(prefix += 1)}` : join(scratch, `base-${shape.segments}x${shape.entries}`);
      const setupEnv = { ...s3Env, ENGINE_CACHE_DIR: join(scratch, 'setup-cache') };
      await run(process.execPath, [engine, 'init', '--format', '3', base], setupEnv);
      await run(process.execPath, [engine, 'backup', '--repo', base, '--source', image, '--name', 'live'], setupEnv);
      const storage = cluster
        ? (await openS3Stack({ url: base, endpoint: cluster.endpoint, region: cluster.region, env: s3Env, connections: 32 })).storage
        : new LocalStorage(base);
      const filling = performance.now();
      await fill(storage, shape);
      await storage.close();
      log(`${shape.segments} segments of ${shape.entries} entries filled in ${((performance.now() - filling) / 1000).toFixed(1)} s`);
      for (let round = 1; round <= rounds; round++) {
        const order = round % 2 === 1 ? runs : [...runs].reverse();
        for (const command of commands) {
          if (cluster && command === 'repair') continue;
          for (const { build, name: variant, env: variantEnv } of order) {
            if (cluster && command === 'gc' && (round > 1 || build !== order.at(-1)!.build || variant !== order.at(-1)!.name)) continue; // gc changes the store: once, last
            const repo = cluster ? base : join(scratch, 'run');
            const cache = join(scratch, 'run-cache');
            const peaksFile = join(scratch, 'peaks.json');
            await rm(cache, { recursive: true, force: true });
            await mkdir(cache, { recursive: true });
            if (!cluster) {
              await rm(repo, { recursive: true, force: true });
              await cp(base, repo, { recursive: true });
            }
            const env = { ...s3Env, ...variantEnv, ...(command === 'lookup' ? { BENCH_LOOKUPS: String(LOOKUPS) } : {}), ENGINE_CACHE_DIR: cache, BENCH_REPO: repo, BENCH_MEMORY_OUT: peaksFile, NODE_OPTIONS: `--import ${join(build, 'dist/bench/memory-sampler.js')} ${variantEnv.BENCH_NODE_FLAGS ?? ''}`.trim() };
            // gc and repair run as users run them: through bin/engine, whose glibc malloc tunables shape native
            // memory (bin/engine.js alone would not see them). The catch-up child is the bench's own script.
            const [program, args] =
              command === 'catchup' || command === 'lookup' ? [process.execPath, [...CHILD_NODE_FLAGS, fileURLToPath(import.meta.url), '--child', build]]
              : [join(build, 'bin/engine'), [command, '--repo', repo, '--json']];
            const measured = await timed(program, args, env);
            const peaks = JSON.parse(await readFile(peaksFile, 'utf8').catch(() => '{}')) as Record<string, number>;
            const said = command === 'catchup' || command === 'lookup' ? (JSON.parse(measured.stdout.trim().split('\n').pop()!) as Record<string, number>) : {};
            const load = await loadAverage();
            rows.push({ round, where: cluster ? 's3' : 'folder', shape, command, build, variant, measured, peaks, load, said });
            log(`${shape.segments}x${shape.entries} ${command} ${build} ${variant}: ${measured.seconds.toFixed(1)} s, ${measured.cpuSeconds.toFixed(1)} CPU-s, ${measured.peakRssMiB.toFixed(0)} MiB (${JSON.stringify(peaks)}) ${JSON.stringify(said)}, load ${load}`);
          }
        }
      }
      if (!cluster && !keep) await rm(base, { recursive: true, force: true });
    }
  } finally {
    await cluster?.stop();
    if (!keep) await rm(scratch, { recursive: true, force: true });
    else log(`kept the folder repositories under ${scratch}`);
  }
  const lines = [
    `# format 3: peak memory by the number of index entries and segments (${started})`,
    '',
    `Machine: ${machineLine()}. Repository: ${cluster ? 'a prefix on a private Ceph RGW (one memstore OSD, same cores)' : 'a local folder'}, one backup of ${imageSize} random bytes plus S segments of E entries each (random ids at a real frame's place). Each command its own process under /usr/bin/time with a fresh host cache; the peaks of V8 heap, Buffers (external) and what rss holds beyond V8 sampled every 20 ms, of anonymous and file-backed (mmapped LevelDB tables) resident memory every 100 ms. The machine is shared: each row carries the load average when it ended.`,
    '',
    `Verdicts (issue 14: peak RSS per process <= ${limitMiB} MiB whatever the number of objects; PASS only if every round at every shape):`,
    '',
    '| command | build | variant | peak RSS MiB by index entries (worst round) | verdict |',
    '| --- | --- | --- | --- | --- |',
    ...verdictLines(rows.filter((r) => r.command !== 'lookup'), limitMiB),
    '',
    ...lookupLines(rows),
    '| round | where | segments (S) | entries each (E) | index entries | command | build | variant | wall s | CPU s | peak RSS MiB | anon MiB | file-backed MiB | heap used MiB | external MiB | beyond V8 MiB | load (1/5/15) |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
    ...rows.map((r) => `| ${r.round} | ${r.where} | ${r.shape.segments} | ${r.shape.entries} | ${r.shape.segments * r.shape.entries} | ${r.command} | ${r.build} | ${r.variant} | ${r.measured.seconds.toFixed(1)} | ${r.measured.cpuSeconds.toFixed(1)} | ${r.measured.peakRssMiB.toFixed(0)} | ${r.peaks.rssAnon ?? '?'} | ${r.peaks.rssFile ?? '?'} | ${r.peaks.heapUsed ?? '?'} | ${r.peaks.external ?? '?'} | ${r.peaks.nativeBeyondV8 ?? '?'} | ${r.load} |`),
    '',
  ];
  if (out) {
    await mkdir(out, { recursive: true });
    await writeFile(join(out, `v3-index-memory-${cluster ? 's3' : 'folder'}.md`), lines.join('\n'));
  }
  process.stdout.write(lines.join('\n'));
}

const childRoot = arg('--child');
await (childRoot ? child(childRoot) : main());
