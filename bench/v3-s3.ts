/**
 * Format 3 and S3, side by side in one run (issue 14, item 6): `node dist/bench/v3-s3.js [--size 1G]
 * [--concurrent-size 256M] [--rounds 2] [--objects 100,20000] [--rss-runs 1] [--rss-engines label=path,…]
 * [--dir /var/tmp] [--out bench/results]`.
 *
 * Starts a private Ceph RADOS Gateway (test/rgw.ts: one memstore OSD, so RGW's disk is not what is measured)
 * and, on the suite's seeded VM-like image (bench/suite.ts's template, `--size`):
 * 1. backup and restore with the engine's CLI into a local format-3 repository and into RGW, and with
 *    restic 0.14 (Debian's package, installed when missing) into the same RGW (`-r s3:http://…/bucket`);
 *    RGW's own PUT and GET ceiling (curl, 32 MiB objects, 4 in flight) measured in the same round; each round
 *    in fresh repositories, the order of the tools reversed every other round; restores checked with cmp;
 *    and a backup of new, incompressible data (`--random-size` of random bytes: every byte goes up as it
 *    was read), local and S3, for the "share of RGW's PUT ceiling for new data";
 * 2. 4 backups at once (4 processes, 4 different images of `--concurrent-size`) into one repository, local
 *    and S3, against one backup alone of one of those images into another fresh repository: the aggregate
 *    throughput's ratio;
 * 3. peak RSS of a backup and a restore on S3 with few and with many objects in the repository (`--objects`:
 *    that many index segments pre-created under its prefix, each a valid, empty segment that every process
 *    with a fresh host cache lists and reads), `--rss-runs` times, each run in fresh repositories, the object
 *    counts' order reversed every other run; with `--rss-engines`, for each of several engines (a `bin/engine`
 *    of another build, or a script that execs one with other settings), interleaved the same way: a paired
 *    A/B of peak RSS. The report puts the object counts side by side (growth = most objects − fewest, per run).
 *    `--rounds 0` runs this part alone.
 * Every timed run is its own process under /usr/bin/time (wall, CPU, peak RSS) after
 * `sync; echo 3 > /proc/sys/vm/drop_caches`. RGW shares the machine's two cores with the clients: read the
 * figures as ratios within a round.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { formatBytes, generateImage, parseSize } from '../engine/index.js';
import { openS3Stack } from '../repo-format/storage/s3.js';
import { initChecksum } from '../repo-format/checksum.js';
import { encodeSegment, segmentKey } from '../repo-format/v3/segment.js';
import type { RgwCluster } from '../test/rgw.js';
import { reportMarkdown, verdict, writeReport } from './report.js';
import { createBucket, dropCaches, inFlight, loadAverage, rgwCeiling, startBenchCluster, type Ceiling } from './s3-lab.js';
import { arg, ENGINE, ensure, logger, machineLine, MB, run, timed, type Measured } from './tools.js';

const log = logger('v3-s3');
const RESTIC_TOOL = 'restic 0.14 (S3)';
/** restic's restore timed without the fsyncs that make it durable (restic 0.14 does none). */
const RESTORE_NOT_DURABLE = 'restore to a raw file, not durable';
const BUCKET = 'bench';

interface Row {
  round: number;
  scenario: string;
  tool: string;
  seconds: number;
  /** Image bytes over wall time. */
  diskMBps: number;
  /** Bytes the run added to its repository (engine: its JSON's bytesStored), or null. */
  storedBytes: number | null;
  /** storedBytes over wall time: what went up to the store per second. */
  storedMBps: number | null;
  cpuSeconds: number;
  /** CPU seconds the store's daemons (radosgw, ceph-osd, ceph-mon) spent during the run (S3 rows), or null. */
  storeCpuSeconds: number | null;
  peakRssMiB: number;
  note: string;
  load: string;
}

interface EngineJson {
  id: string;
  disks?: { bytesStored: number }[];
}

/** CPU seconds (user + system) spent so far by this process's children that are the store's daemons. */
async function storeCpu(): Promise<number> {
  let ticks = 0;
  for (const entry of await readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const stat = await readFile(`/proc/${entry}/stat`, 'utf8').catch(() => '');
    const name = stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')'));
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (Number(fields[1]) === process.pid && ['radosgw', 'ceph-osd', 'ceph-mon'].includes(name)) ticks += Number(fields[11]) + Number(fields[12]);
  }
  return ticks / 100;
}

/** `run` timed, with the store's CPU seconds meanwhile. */
async function withStoreCpu(run: () => Promise<Measured>): Promise<Measured & { storeCpuSeconds: number }> {
  const before = await storeCpu();
  const measured = await run();
  return { ...measured, storeCpuSeconds: (await storeCpu()) - before };
}

async function identical(a: string, b: string): Promise<boolean> {
  return run('cmp', ['-s', a, b]).then(() => true, () => false);
}

class Lab {
  readonly rows: Row[] = [];
  readonly ceilings: (Ceiling & { round: number })[] = [];
  readonly notes: string[] = [];
  readonly engineEnv: Record<string, string>;
  readonly resticEnv: Record<string, string>;
  private repos = 0;

  constructor(
    readonly cluster: RgwCluster,
    readonly work: string,
  ) {
    const keys = { AWS_ACCESS_KEY_ID: cluster.user.accessKeyId, AWS_SECRET_ACCESS_KEY: cluster.user.secretAccessKey };
    this.engineEnv = { ...keys, AWS_ENDPOINT_URL_S3: cluster.endpoint, AWS_REGION: cluster.region };
    this.resticEnv = { ...keys, RESTIC_PASSWORD: 'bench', RESTIC_CACHE_DIR: join(work, 'restic-cache') };
  }

  /** A fresh host cache for each process: what a new host pays (the catch-up reads every segment). */
  cache(): string {
    return join(this.work, `cache-${(this.repos += 1)}`);
  }

  async add(round: number, scenario: string, tool: string, m: Measured & { storeCpuSeconds?: number }, bytes: number, storedBytes: number | null, note = ''): Promise<Row> {
    const row: Row = {
      round,
      scenario,
      tool,
      seconds: m.seconds,
      diskMBps: bytes / MB / m.seconds,
      storedBytes,
      storedMBps: storedBytes === null ? null : storedBytes / MB / m.seconds,
      cpuSeconds: m.cpuSeconds,
      storeCpuSeconds: m.storeCpuSeconds ?? null,
      peakRssMiB: m.peakRssMiB,
      note,
      load: await loadAverage(),
    };
    this.rows.push(row);
    log(`round ${round} ${scenario} / ${tool}: ${row.seconds.toFixed(2)} s, ${row.diskMBps.toFixed(0)} MB/s of disk${row.storedMBps === null ? '' : `, ${row.storedMBps.toFixed(0)} MB/s stored`}, CPU ${row.cpuSeconds.toFixed(1)} s, RSS ${row.peakRssMiB.toFixed(0)} MiB ${note}`);
    return row;
  }

  async engine(args: string[], cacheDir: string, extraEnv: Record<string, string> = {}, engine = ENGINE): Promise<{ measured: Measured; json: EngineJson }> {
    await dropCaches();
    const measured = await withStoreCpu(() => timed(engine, [...args, '--json'], { ...this.engineEnv, ENGINE_CACHE_DIR: cacheDir, ...extraEnv }));
    return { measured, json: JSON.parse(measured.stdout) as EngineJson };
  }

  async initEngine(repo: string): Promise<void> {
    await run(ENGINE, ['init', '--format', '3', repo], { ...this.engineEnv, ENGINE_CACHE_DIR: join(this.work, 'cache-init') });
  }

  /** Backup of `image` into `repo` (a fresh one), restore to a file, cmp. */
  async engineRoundTrip(round: number, tool: string, repo: string, image: string, size: number): Promise<void> {
    await this.initEngine(repo);
    const cacheDir = this.cache();
    const backup = await this.engine(['backup', '--repo', repo, '--source', image, '--name', 'vm'], cacheDir);
    const stored = (backup.json.disks ?? []).reduce((sum, d) => sum + d.bytesStored, 0);
    await this.add(round, 'full backup', tool, backup.measured, size, stored);
    await this.restoreAndCompare(round, tool, repo, backup.json.id, image, size, cacheDir);
  }

  /** Backup of new, incompressible data into a fresh repository: what goes up is what was read. */
  async newData(round: number, tool: string, repo: string, image: string, size: number): Promise<void> {
    await this.initEngine(repo);
    const backup = await this.engine(['backup', '--repo', repo, '--source', image, '--name', 'random'], this.cache());
    await this.add(round, 'full backup, new random data', tool, backup.measured, size, (backup.json.disks ?? []).reduce((sum, d) => sum + d.bytesStored, 0));
  }

  async restoreAndCompare(round: number, tool: string, repo: string, id: string, image: string, size: number, cacheDir: string): Promise<void> {
    const out = join(this.work, 'restored.raw');
    const restored = await this.engine(['restore', '--repo', repo, id, '--to', out], cacheDir);
    const same = await identical(out, image);
    if (!same) this.notes.push(`round ${round}: ${tool}'s restore differed from the image: a bug, its figures do not count.`);
    await this.add(round, 'restore to a raw file', tool, restored.measured, size, null, same ? 'cmp: identical' : 'cmp: DIFFERENT');
    await rm(out, { force: true });
  }

  async resticRoundTrip(round: number, image: string, size: number): Promise<void> {
    const bucket = `restic-${round}`;
    await createBucket(this.cluster, bucket);
    const env = { ...this.resticEnv, RESTIC_REPOSITORY: `s3:${this.cluster.endpoint}/${bucket}` };
    await run('restic', ['init'], env);
    await dropCaches();
    const backup = await withStoreCpu(() => timed('restic', ['backup', '--quiet', image], env));
    const stats = JSON.parse((await run('restic', ['stats', '--mode', 'raw-data', '--json'], env)).stdout) as { total_size?: number };
    await this.add(round, 'full backup', 'restic 0.14 (S3)', backup, size, stats.total_size ?? null);
    // restic 0.14 never fsyncs what it restores (internal/restorer/fileswriter.go: WriteAt, then Close); the
    // engine's restore ends with the file and its directory durable. Timed both ways: until durable (restic,
    // then `sync FILE DIR`, the same fsyncs, inside the timed run), and restic alone.
    const into = join(this.work, 'restic-out');
    const restoredFile = join(into, image);
    const durable = async (): Promise<void> => {
      await dropCaches();
      const restored = await withStoreCpu(() => timed('sh', ['-c', 'restic restore latest --target "$1" && sync "$2" "$(dirname "$2")"', 'sh', into, restoredFile], env));
      const same = await identical(restoredFile, image);
      if (!same) this.notes.push(`round ${round}: restic's restore differed from the image.`);
      await this.add(round, 'restore to a raw file', RESTIC_TOOL, restored, size, null, `${same ? 'cmp: identical' : 'cmp: DIFFERENT'}; until durable: + sync FILE DIR`);
      await rm(into, { recursive: true, force: true });
    };
    const notDurable = async (): Promise<void> => {
      await dropCaches();
      const restored = await withStoreCpu(() => timed('restic', ['restore', 'latest', '--target', into], env));
      const same = await identical(restoredFile, image);
      await this.add(round, RESTORE_NOT_DURABLE, RESTIC_TOOL, restored, size, null, `${same ? 'cmp: identical' : 'cmp: DIFFERENT'}; no fsync`);
      await rm(into, { recursive: true, force: true });
    };
    if (round % 2 === 0) {
      await durable();
      await notDurable();
    } else {
      await notDurable();
      await durable();
    }
  }

  /** One backup alone against four at once (4 processes, 4 images) into one fresh repository each. */
  async concurrency(round: number, where: string, repoOf: (name: string) => string, images: string[], size: number, aloneFirst: boolean): Promise<void> {
    const alone = async (): Promise<void> => {
      const repo = repoOf(`alone-${round}`);
      await this.initEngine(repo);
      const b = await this.engine(['backup', '--repo', repo, '--source', images[0]!, '--name', 'vm-0'], this.cache());
      await this.add(round, `1 backup alone (${where})`, 'engine', b.measured, size, (b.json.disks ?? []).reduce((s, d) => s + d.bytesStored, 0));
    };
    const four = async (): Promise<void> => {
      const repo = repoOf(`four-${round}`);
      await this.initEngine(repo);
      await dropCaches();
      const started = performance.now();
      const runs = await Promise.all(
        images.map((image, i) => timed(ENGINE, ['backup', '--repo', repo, '--source', image, '--name', `vm-${i}`, '--json'], { ...this.engineEnv, ENGINE_CACHE_DIR: this.cache() })),
      );
      const seconds = (performance.now() - started) / 1000;
      const stored = runs.reduce((sum, m) => sum + ((JSON.parse(m.stdout) as EngineJson).disks ?? []).reduce((s, d) => s + d.bytesStored, 0), 0);
      const aggregate: Measured = { seconds, cpuSeconds: runs.reduce((s, m) => s + m.cpuSeconds, 0), peakRssMiB: Math.max(...runs.map((m) => m.peakRssMiB)), stdout: '' };
      await this.add(round, `4 backups at once (${where})`, 'engine', aggregate, size * images.length, stored, `each process: ${runs.map((m) => `${m.seconds.toFixed(1)} s / ${m.peakRssMiB.toFixed(0)} MiB`).join(', ')}`);
    };
    if (aloneFirst) {
      await alone();
      await four();
    } else {
      await four();
      await alone();
    }
  }

  /** `count` valid, empty index segments under the repository's prefix: objects every fresh host lists and reads. */
  async fill(prefix: string, count: number): Promise<number> {
    const { storage } = await openS3Stack({
      url: `s3://${BUCKET}/${prefix}`,
      endpoint: this.cluster.endpoint,
      region: this.cluster.region,
      credentials: { accessKeyId: this.cluster.user.accessKeyId, secretAccessKey: this.cluster.user.secretAccessKey },
      env: {},
      connections: 32,
    });
    try {
      await initChecksum();
      const writer = randomBytes(16).toString('hex');
      return await inFlight(count, 32, async (seq) => {
        const segment = { name: { writer, seq }, supersedes: [], entries: [] };
        await storage.put(segmentKey(segment.name), encodeSegment(segment), { ifAbsent: true });
      });
    } finally {
      await storage.close();
    }
  }
}

/**
 * With $BENCH_RSS_TRACE_DIR, the peak-RSS runs load bench/memory-sampler into the engine: NAME.peaks.json
 * (peaks of V8 heap, Buffers, anonymous and file-backed RSS) and NAME.trace (a line a second) in that folder,
 * to see what grows with the object count and in which phase; $BENCH_RSS_NODE_FLAGS are added to the runs'
 * NODE_OPTIONS (`--expose-gc` for the sampler's BENCH_MEMORY_GC).
 */
function memoryTraceEnv(name: string): Record<string, string> {
  const dir = process.env.BENCH_RSS_TRACE_DIR;
  if (!dir) return {};
  const sampler = join(import.meta.dirname, 'memory-sampler.js');
  return { NODE_OPTIONS: `--import ${sampler} ${process.env.BENCH_RSS_NODE_FLAGS ?? ''}`.trim(), BENCH_MEMORY_OUT: join(dir, `${name}.peaks.json`), BENCH_MEMORY_TRACE: join(dir, `${name}.trace`) };
}

/** One peak-RSS run: a backup and a restore of one engine on a repository holding `objects` index segments. */
interface RssRun {
  engine: string;
  run: number;
  objects: number;
  fillSeconds: number;
  backup: Measured;
  restore: Measured;
  identical: boolean;
  load: string;
}

/** `--rss-engines label=path,…`: the engines the peak-RSS runs compare; by default this tree's bin/engine. */
function rssEngines(): { label: string; path: string }[] {
  const specs = (arg('--rss-engines') ?? '').split(',').filter(Boolean);
  if (specs.length === 0) return [{ label: 'engine', path: ENGINE }];
  return specs.map((spec) => {
    const at = spec.indexOf('=');
    return at < 0 ? { label: spec, path: spec } : { label: spec.slice(0, at), path: spec.slice(at + 1) };
  });
}

async function main(): Promise<void> {
  const size = parseSize(arg('--size') ?? '1G');
  const concurrentSize = parseSize(arg('--concurrent-size') ?? '256M');
  const randomSize = parseSize(arg('--random-size') ?? '512M');
  const rounds = Number(arg('--rounds') ?? 2);
  const objectCounts = (arg('--objects') ?? '100,20000').split(',').filter(Boolean).map(Number);
  const rssRuns = Number(arg('--rss-runs') ?? 1);
  const engines = rssEngines();
  const outDir = arg('--out') ?? 'bench/results';
  const work = await mkdtemp(join(arg('--dir') ?? '/var/tmp', 'engine-bench-v3-s3-'));
  const loadAtStart = await loadAverage();
  let cluster: RgwCluster | undefined;
  const skipped: string[] = [];
  const rss: RssRun[] = [];
  let lab: Lab | undefined;
  try {
    // Everything a round stores stays in memstore (RAM): engine + restic per round, the concurrency runs, the ceiling.
    const memstore = Math.ceil((size * 1.2 * rounds + randomSize * 1.1 * rounds + concurrentSize * 10 * rounds + concurrentSize * 2 * objectCounts.length * rssRuns * engines.length + 512 * 2 ** 20 * rounds) / 2 ** 30 + 1) * 2 ** 30;
    // tcp_nodelay: without it every small GET (segments, leases, records) waits ~50 ms for Nagle on the gateway (test/rgw.ts).
    cluster = await startBenchCluster({ memstoreBytes: memstore, tcpNoDelay: true }, BUCKET, work, log);
    lab = new Lab(cluster, work);
    const resticReady = await ensure('restic', 'restic');
    if (resticReady !== true) skipped.push(`restic: ${resticReady}`);

    log(rounds > 0 ? `generating the suite's ${formatBytes(size)} template image and 4 images of ${formatBytes(concurrentSize)}` : `generating an image of ${formatBytes(concurrentSize)}`);
    const image = join(work, 'vm.raw');
    // The rounds' images; the peak-RSS runs need only images[0].
    if (rounds > 0) await generateImage(image, size, 'bench-template');
    const images: string[] = [];
    for (let i = 0; i < (rounds > 0 ? 4 : 1); i++) {
      images.push(join(work, `vm-${i}.raw`));
      await generateImage(images[i]!, concurrentSize, `bench-concurrent-${i}`);
    }
    const random = join(work, 'random.raw');
    if (rounds > 0) await generateImage(random, randomSize, 'bench-random', { zero: 0, text: 0, binary: 0, random: 1, duplicate: 0 });
    const localRoot = join(work, 'local');
    await mkdir(localRoot);

    for (let round = 0; round < rounds; round++) {
      log(`round ${round + 1} of ${rounds}`);
      const steps: (() => Promise<void>)[] = [
        () => lab!.engineRoundTrip(round, 'engine (local folder, format 3)', join(localRoot, `repo-${round}`), image, size),
        () => lab!.engineRoundTrip(round, 'engine (S3 on RGW)', `s3://${BUCKET}/repo-${round}`, image, size),
        ...(resticReady === true ? [() => lab!.resticRoundTrip(round, image, size)] : []),
      ];
      if (round % 2 === 1) steps.reverse();
      for (const step of steps) await step();
      const fresh: (() => Promise<void>)[] = [
        () => lab!.newData(round, 'engine (S3 on RGW)', `s3://${BUCKET}/random-${round}`, random, randomSize),
        () => lab!.newData(round, 'engine (local folder, format 3)', join(localRoot, `random-${round}`), random, randomSize),
      ];
      if (round % 2 === 1) fresh.reverse();
      for (const step of fresh) await step();
      log('RGW ceiling (curl, 8 objects of 32 MiB, 4 in flight)');
      await dropCaches();
      lab.ceilings.push({ round, ...(await rgwCeiling(cluster, BUCKET, work, 8, 32 * 2 ** 20, 4, `r${round}`)) });
      await lab.concurrency(round, 'S3', (name) => `s3://${BUCKET}/${name}`, images, concurrentSize, round % 2 === 0);
      await lab.concurrency(round, 'local folder', (name) => join(localRoot, name), images, concurrentSize, round % 2 === 0);
    }

    for (let run = 0; run < rssRuns; run++) {
      const order = run % 2 === 0 ? engines : [...engines].reverse();
      for (const [e, engine] of order.entries()) {
        const counts = (run + e) % 2 === 0 ? objectCounts : [...objectCounts].reverse();
        for (const count of counts) {
          const prefix = `rss-${count}-${engine.label}-${run}`;
          const repo = `s3://${BUCKET}/${prefix}`;
          await lab.initEngine(repo);
          log(`peak RSS, run ${run + 1} of ${rssRuns}, ${engine.label}: ${count} index segments under ${repo}`);
          const fillSeconds = await lab.fill(prefix, count);
          const name = `${engine.label}-${run}-${count}`;
          const backup = await lab.engine(['backup', '--repo', repo, '--source', images[0]!, '--name', 'rss'], lab.cache(), memoryTraceEnv(`backup-${name}`), engine.path);
          const out = join(work, 'rss-out.raw');
          const restoreRun = await lab.engine(['restore', '--repo', repo, backup.json.id, '--to', out], lab.cache(), memoryTraceEnv(`restore-${name}`), engine.path);
          rss.push({ engine: engine.label, run, objects: count, fillSeconds, backup: backup.measured, restore: restoreRun.measured, identical: await identical(out, images[0]!), load: await loadAverage() });
          log(`${engine.label}, ${count} objects: backup ${backup.measured.seconds.toFixed(1)} s (CPU ${backup.measured.cpuSeconds.toFixed(1)} s) ${backup.measured.peakRssMiB.toFixed(0)} MiB, restore ${restoreRun.measured.seconds.toFixed(1)} s (CPU ${restoreRun.measured.cpuSeconds.toFixed(1)} s) ${restoreRun.measured.peakRssMiB.toFixed(0)} MiB`);
          await rm(out, { force: true });
        }
      }
    }
  } finally {
    await cluster?.stop();
    await rm(work, { recursive: true, force: true });
  }
  await report(lab!, rss, { size, concurrentSize, randomSize, rounds, objectCounts, loadAtStart, loadAtEnd: await loadAverage(), skipped, outDir });
}

interface ReportOptions {
  size: number;
  randomSize: number;
  concurrentSize: number;
  rounds: number;
  objectCounts: number[];
  loadAtStart: string;
  loadAtEnd: string;
  skipped: string[];
  outDir: string;
}

async function report(lab: Lab, rss: RssRun[], options: ReportOptions): Promise<void> {
  const { rows, ceilings } = lab;
  const of = (round: number, scenario: string, tool: string): Row | undefined => rows.find((r) => r.round === round && r.scenario === scenario && r.tool === tool);
  const roundsRun = [...new Set(rows.map((r) => r.round))];
  const perRound = (value: (round: number) => number | undefined): number[] => roundsRun.map(value).filter((v): v is number => v !== undefined && Number.isFinite(v));
  const S3 = 'engine (S3 on RGW)';
  const RESTIC = 'restic 0.14 (S3)';
  const ceilingOf = (round: number): Ceiling | undefined => ceilings.find((c) => c.round === round);
  const LOCAL = 'engine (local folder, format 3)';
  const putShareOf = (scenario: string): number[] => perRound((round) => { const r = of(round, scenario, S3); const c = ceilingOf(round); return r && c && r.storedMBps !== null ? r.storedMBps / c.putMBps : undefined; });
  const putShare = putShareOf('full backup, new random data');
  const putShareImage = putShareOf('full backup');
  const s3VsLocal = (scenario: string): number[] => perRound((round) => { const s = of(round, scenario, S3); const l = of(round, scenario, LOCAL); return s && l ? l.seconds / s.seconds : undefined; });
  const backupVsRestic = perRound((round) => { const e = of(round, 'full backup', S3); const p = of(round, 'full backup', RESTIC); return e && p ? p.seconds / e.seconds : undefined; });
  const restoreVsRestic = perRound((round) => { const e = of(round, 'restore to a raw file', S3); const p = of(round, 'restore to a raw file', RESTIC); return e && p ? p.seconds / e.seconds : undefined; });
  const restoreVsResticNotDurable = perRound((round) => { const e = of(round, 'restore to a raw file', S3); const p = of(round, RESTORE_NOT_DURABLE, RESTIC); return e && p ? p.seconds / e.seconds : undefined; });
  const concurrent = (where: string): number[] => perRound((round) => { const one = of(round, `1 backup alone (${where})`, 'engine'); const four = of(round, `4 backups at once (${where})`, 'engine'); return one && four ? four.diskMBps / one.diskMBps : undefined; });
  const worstRss = Math.max(0, ...rss.flatMap((r) => [r.backup.peakRssMiB, r.restore.peakRssMiB]), ...rows.filter((r) => r.tool.startsWith('engine')).map((r) => r.peakRssMiB));
  // The object counts side by side, a line per engine and run: the growth is the most objects' peak less the fewest's.
  const fewest = Math.min(...options.objectCounts);
  const most = Math.max(...options.objectCounts);
  const pairs = [...new Set(rss.map((r) => `${r.engine}\u0000${r.run}`))].map((key) => {
    const [engine, run] = key.split('\u0000') as [string, string];
    const byCount = new Map(rss.filter((r) => r.engine === engine && r.run === Number(run)).map((r) => [r.objects, r]));
    const low = byCount.get(fewest);
    const high = byCount.get(most);
    const growth = (peak: (r: RssRun) => number): number => (low && high && most > fewest ? peak(high) - peak(low) : NaN);
    return { engine, run: Number(run), byCount, backupGrowth: growth((r) => r.backup.peakRssMiB), restoreGrowth: growth((r) => r.restore.peakRssMiB) };
  });
  const growths = pairs.flatMap((p) => [p.backupGrowth, p.restoreGrowth]).filter(Number.isFinite);
  const rssGrowth = growths.length > 0 ? Math.max(...growths) : NaN;
  const counts = [...options.objectCounts].sort((a, b) => a - b);
  const side = (p: (typeof pairs)[number], value: (r: RssRun) => number, digits: number): string => counts.map((c) => { const r = p.byCount.get(c); return r ? value(r).toFixed(digits) : '—'; }).join(' / ');
  const signed = (n: number): string => (Number.isFinite(n) ? `${n >= 0 ? '+' : ''}${n.toFixed(0)}` : '—');
  const pct = (values: number[]): string => values.map((v) => `${(v * 100).toFixed(0)}%`).join(', ');
  const times = (values: number[]): string => values.map((v) => `${v.toFixed(2)}×`).join(', ');

  const fmt = (n: number | null, digits = 0): string => (n === null ? '—' : n.toFixed(digits));
  const table = [
    '| round | scenario | tool | wall s | MB/s of disk | MB/s stored | stored | CPU s | RGW CPU s | peak RSS MiB | load (1/5/15 min) | note |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
    ...rows.map((r) => `| ${r.round + 1} | ${r.scenario} | ${r.tool} | ${r.seconds.toFixed(2)} | ${r.diskMBps.toFixed(0)} | ${fmt(r.storedMBps)} | ${r.storedBytes === null ? '—' : formatBytes(r.storedBytes)} | ${r.cpuSeconds.toFixed(1)} | ${r.tool.includes('local folder') ? '—' : fmt(r.storeCpuSeconds, 1)} | ${r.peakRssMiB.toFixed(0)} | ${r.load} | ${r.note} |`),
    '',
    '### RGW ceiling (curl, 8 objects of 32 MiB, 4 in flight, files read before the clock)',
    '',
    '| round | PUT MB/s | GET MB/s |',
    '| --- | --- | --- |',
    ...ceilings.map((c) => `| ${c.round + 1} | ${c.putMBps.toFixed(0)} | ${c.getMBps.toFixed(0)} |`),
    '',
    '### Peak RSS by the number of objects in the repository (S3; backup and restore of a fresh image, fresh host cache)',
    '',
    `Side by side, ${counts.join(' / ')} index segments; growth = ${most} − ${fewest}. Each run in fresh repositories, the counts' order (and the engines') reversed every other run.`,
    '',
    `| engine | run | backup peak RSS MiB | growth | restore peak RSS MiB | growth | backup CPU s | restore CPU s | load at the end |`,
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- |',
    ...pairs.map((p) => `| ${p.engine} | ${p.run + 1} | ${side(p, (r) => r.backup.peakRssMiB, 0)} | ${signed(p.backupGrowth)} | ${side(p, (r) => r.restore.peakRssMiB, 0)} | ${signed(p.restoreGrowth)} | ${side(p, (r) => r.backup.cpuSeconds, 1)} | ${side(p, (r) => r.restore.cpuSeconds, 1)} | ${[...p.byCount.values()].at(-1)?.load ?? ''} |`),
    '',
    '| engine | run | index segments in the repository | backup wall s | backup CPU s | backup peak RSS MiB | restore wall s | restore CPU s | restore peak RSS MiB | restore identical | load |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
    ...rss.map((r) => `| ${r.engine} | ${r.run + 1} | ${r.objects} | ${r.backup.seconds.toFixed(1)} | ${r.backup.cpuSeconds.toFixed(1)} | ${r.backup.peakRssMiB.toFixed(0)} | ${r.restore.seconds.toFixed(1)} | ${r.restore.cpuSeconds.toFixed(1)} | ${r.restore.peakRssMiB.toFixed(0)} | ${r.identical ? 'yes (cmp)' : 'NO'} | ${r.load} |`),
  ].join('\n');
  const targets = [
    `S3 backup ≥ 80% of RGW's PUT ceiling for new data (new random data: bytes stored per second over curl's PUT rate, per round): ${pct(putShare)} → ${verdict(putShare, (v) => v >= 0.8)}; the suite's image (compressible, a third zeros: its upload rate is set by the pipeline, not the store): ${pct(putShareImage)}`,
    `(context) S3 against the local folder, the local folder's time over S3's (1 = S3 costs no time): backup of the image ${times(s3VsLocal('full backup'))}, of new random data ${times(s3VsLocal('full backup, new random data'))}, restore ${times(s3VsLocal('restore to a raw file'))}`,
    `S3 backup ≥ 3× restic's S3 backup (restic's time over the engine's, per round): ${times(backupVsRestic)} → ${verdict(backupVsRestic, (v) => v >= 3)}`,
    `S3 restore ≥ 2× restic's (both timed until the restored file is durable; restic's time over the engine's, per round): ${times(restoreVsRestic)} → ${verdict(restoreVsRestic, (v) => v >= 2)}; against restic without its fsync (not durable): ${times(restoreVsResticNotDurable)} → ${verdict(restoreVsResticNotDurable, (v) => v >= 2)}`,
    `4 concurrent backups ≥ 90% of one alone's throughput, S3 (aggregate MB/s of disk over one alone's, per round): ${pct(concurrent('S3'))} → ${verdict(concurrent('S3'), (v) => v >= 0.9)}`,
    `the same into a local folder: ${pct(concurrent('local folder'))} → ${verdict(concurrent('local folder'), (v) => v >= 0.9)}`,
    `peak RSS ≤ 300 MiB whatever the object count: worst ${worstRss.toFixed(0)} MiB → ${verdict([worstRss], (worst) => worst <= 300)}`,
    `peak RSS flat from ${fewest} to ${most} index segments (growth ≤ 5 MiB, backup and restore, per engine and run): ${pairs.map((p) => `${p.engine} run ${p.run + 1}: backup ${signed(p.backupGrowth)}, restore ${signed(p.restoreGrowth)} MiB`).join('; ') || 'not measured'} → ${Number.isFinite(rssGrowth) ? verdict(growths, (g) => g <= 5) : 'not measured'}`,
  ];
  const markdown = reportMarkdown(
    'Format 3 and S3: the engine on a local folder and on RGW, restic on RGW, RGW\'s ceiling',
    [
      `Machine: ${machineLine()}; load average (1/5/15 min) ${options.loadAtStart} at the start, ${options.loadAtEnd} at the end (the machine is shared: other work ran meanwhile, each row carries the load when it ended).`,
      `Image: the suite's ${formatBytes(options.size)} seeded VM-like template (bench/suite.ts); new data: ${formatBytes(options.randomSize)} of random bytes; concurrency: 4 images of ${formatBytes(options.concurrentSize)} (different seeds). ${options.rounds} rounds, each into fresh repositories, the tools' order reversed every other round. MB = 10^6 B.`,
      'Every timed run is its own process under /usr/bin/time after `sync; echo 3 > /proc/sys/vm/drop_caches` (cold page cache: the image is read from disk). RGW runs on the same two cores (one memstore OSD: objects in RAM).',
      'Restores are timed until the restored file is durable: the engine fsyncs the file and its directory before it exits; restic 0.14 does no fsync (internal/restorer/fileswriter.go: WriteAt, then Close), so its timed run is `restic restore` followed by `sync FILE DIR` (the same two fsyncs). restic alone, not durable, is its own row ("restore to a raw file, not durable") and the second figure of the restore target.',
      '"MB/s stored": the bytes the backup added to its repository (compressed new data) over wall time, the rate it uploaded at, compared with curl\'s PUT rate; restic\'s from `restic stats --mode raw-data`.',
      '"RGW CPU s": CPU seconds of the store\'s daemons (radosgw, ceph-osd, ceph-mon) during the run, on the same two cores as the client: with "CPU s", what the run cost the machine in all.',
      ...lab.notes,
    ],
    table,
    targets,
    options.skipped,
  );
  await writeReport(options.outDir, 'v3-s3', markdown, { machine: machineLine(), ...options, rows, ceilings, rss, targets });
}

await main();
