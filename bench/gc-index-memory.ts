/**
 * gc's working index alone (repo-format/v3/gc-index.ts), by the number of index entries and the share of
 * them that is live: `node dist/bench/gc-index-memory.js [--entries 250000,1000000,2000000] [--segments 100]
 * [--live 1] [--rounds 1] [--builds ROOT,OTHER_ROOT] [--out DIR]`.
 *
 * v3-index-memory runs the whole `engine gc` on a repository whose extra entries are all garbage (random ids
 * no backup needs); this one measures the case it cannot build cheaply: a repository of N entries of which a
 * share (`--live`, 1 = all) is live. Each size is a folder of `--segments` segments of random ids; each run is
 * a process of its own (under /usr/bin/time, with bench/memory-sampler) that does to the index what gc does:
 * marks the live ids (in batches, settled as mark's ticks do), reads every segment, passes over the live
 * blobs three times (classify, plan, steps), then reads the segments again and passes twice more (the
 * commit under the exclusive lease). Builds (roots of compiled trees, default this one) alternate, reversed
 * every other round.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { initChecksum } from '../repo-format/checksum.js';
import { LocalStorage } from '../repo-format/storage/local.js';
import { encodeSegment, segmentKey, type SegmentEntry } from '../repo-format/v3/segment.js';
import { arg, logger, machineLine, timed, type Measured } from './tools.js';
import { loadAverage } from './s3-lab.js';

const log = logger('gc-index-memory');
const ID_BATCH = 4096;

/** In the child: gc's work on its index with the build under `root`; prints what it found. */
async function child(root: string): Promise<void> {
  const dist = join(root, 'dist');
  const gcIndex = (await import(join(dist, 'repo-format/v3/gc-index.js'))) as typeof import('../repo-format/v3/gc-index.js');
  const local = (await import(join(dist, 'repo-format/storage/local.js'))) as typeof import('../repo-format/storage/local.js');
  const checksum = (await import(join(dist, 'repo-format/checksum.js'))) as typeof import('../repo-format/checksum.js');
  await checksum.initChecksum();
  const storage = new local.LocalStorage(process.env.BENCH_REPO!);
  const index = await gcIndex.GcIndex.create(process.env.BENCH_INDEX!);
  try {
    const ids = await open(process.env.BENCH_LIVE!, 'r');
    const chunk = Buffer.alloc(32 * ID_BATCH);
    for (;;) {
      const { bytesRead } = await ids.read(chunk, 0, chunk.length, null);
      for (let at = 0; at + 32 <= bytesRead; at += 32) index.addLive(Buffer.from(chunk.subarray(at, at + 32)));
      await index.settle();
      if (bytesRead < chunk.length) break;
    }
    await ids.close();
    let live = 0;
    for (let pass = 0; pass < 2; pass++) {
      const { damaged } = await index.readSegments(storage, { liveOnly: true });
      if (damaged.length > 0) throw new Error(`damaged segments: ${damaged[0]!.why}`);
      for (let walk = 0; walk < (pass === 0 ? 3 : 2); walk++) {
        live = 0;
        for await (const blob of index.live()) if (blob.winner) live += 1;
      }
    }
    console.log(JSON.stringify({ live }));
  } finally {
    await index.close();
    await storage.close();
  }
}

interface Row {
  round: number;
  entries: number;
  build: string;
  measured: Measured;
  peaks: Record<string, number>;
  load: string;
}

async function main(): Promise<void> {
  const sizes = (arg('--entries') ?? '250000,1000000,2000000').split(',').map(Number);
  const segments = Number(arg('--segments') ?? 100);
  const liveShare = Number(arg('--live') ?? 1);
  const rounds = Number(arg('--rounds') ?? 1);
  const here = fileURLToPath(new URL('../..', import.meta.url));
  const builds = (arg('--builds') ?? here).split(',').map((b) => resolve(b));
  const out = arg('--out') ? resolve(arg('--out')!) : undefined;
  await initChecksum();
  const scratch = await mkdtemp(join(tmpdir(), 'bench-gc-index-memory-'));
  const rows: Row[] = [];
  const started = new Date().toISOString();
  const entry = { packId: 'ab'.repeat(16), offset: 4096, length: 1000, rawLength: 4000, kind: 1, flags: 0 };
  try {
    for (const entries of sizes) {
      const repo = join(scratch, `repo-${entries}`);
      const liveFile = join(scratch, `live-${entries}`);
      await mkdir(repo, { recursive: true });
      const storage = new LocalStorage(repo);
      const writer = randomBytes(16).toString('hex');
      const liveIds = await open(liveFile, 'w');
      const each = Math.ceil(entries / segments);
      for (let seq = 0; seq * each < entries; seq++) {
        const count = Math.min(each, entries - seq * each);
        const ids = randomBytes(32 * count);
        const list: SegmentEntry[] = [];
        for (let i = 0; i < count; i++) list.push({ ...entry, id: ids.subarray(i * 32, i * 32 + 32) });
        list.sort((a, b) => Buffer.compare(a.id, b.id));
        const name = { writer, seq };
        await storage.put(segmentKey(name), encodeSegment({ name, supersedes: [], entries: list }), { ifAbsent: true });
        const live = list.filter((_, i) => i < count * liveShare).map((e) => e.id);
        await liveIds.write(Buffer.concat(live));
      }
      await liveIds.close();
      await storage.close();
      for (let round = 1; round <= rounds; round++) {
        for (const build of round % 2 === 1 ? builds : [...builds].reverse()) {
          const peaksFile = join(scratch, 'peaks.json');
          const env = { BENCH_REPO: repo, BENCH_LIVE: liveFile, BENCH_INDEX: join(scratch, 'index'), BENCH_MEMORY_OUT: peaksFile, NODE_OPTIONS: `--import ${join(build, 'dist/bench/memory-sampler.js')}` };
          const measured = await timed(process.execPath, [fileURLToPath(import.meta.url), '--child', build], env);
          const peaks = JSON.parse(await readFile(peaksFile, 'utf8').catch(() => '{}')) as Record<string, number>;
          const load = await loadAverage();
          rows.push({ round, entries, build, measured, peaks, load });
          log(`${entries} entries: ${build}: ${measured.seconds.toFixed(1)} s, ${measured.cpuSeconds.toFixed(1)} CPU-s, ${measured.peakRssMiB.toFixed(0)} MiB (${JSON.stringify(peaks)}), load ${load}`);
        }
      }
      await rm(repo, { recursive: true, force: true });
    }
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
  const lines = [
    `# gc's working index alone: peak memory and CPU by index entries, ${liveShare * 100}% live (${started})`,
    '',
    `Machine: ${machineLine()}. ${segments} segments of random ids in a local folder; each run its own process under /usr/bin/time: mark, read the segments, 3 passes over the live blobs, read again, 2 passes (gc's work on its index). The machine is shared: each row carries the load average when it ended.`,
    '',
    '| round | index entries | build | wall s | CPU s | peak RSS MiB | anon MiB | file-backed MiB | heap used MiB | beyond V8 MiB | load (1/5/15) |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
    ...rows.map((r) => `| ${r.round} | ${r.entries} | ${r.build} | ${r.measured.seconds.toFixed(1)} | ${r.measured.cpuSeconds.toFixed(1)} | ${r.measured.peakRssMiB.toFixed(0)} | ${r.peaks.rssAnon ?? '?'} | ${r.peaks.rssFile ?? '?'} | ${r.peaks.heapUsed ?? '?'} | ${r.peaks.nativeBeyondV8 ?? '?'} | ${r.load} |`),
    '',
  ];
  if (out) {
    await mkdir(out, { recursive: true });
    await writeFile(join(out, 'gc-index-memory.md'), lines.join('\n'));
  }
  process.stdout.write(lines.join('\n'));
}

const childRoot = arg('--child');
await (childRoot ? child(childRoot) : main());
