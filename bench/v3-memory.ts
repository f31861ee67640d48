/**
 * Peak RSS of `engine gc` on format 3 by the size of the repository's index (issue 14: "peak RSS per process
 * unchanged whatever the number of objects"): `node dist/bench/v3-memory.js [--shapes 100x0,20000x0,100x20000]
 * [--image 64M] [--rounds 1] [--builds ROOT,OTHER_ROOT] [--out bench/results]`.
 *
 * Each shape `SxE` is a format-3 repository in a local folder holding one backup of a random image (its
 * chunks are the live set) and S more index segments of E entries each, made directly through the public
 * segment API (encodeSegment + the folder storage): random blob ids in packs that do not exist, so dead
 * entries gc drops (S segments to read and supersede, S×E entries to resolve). Each build (`--builds`: the
 * roots of compiled trees, e.g. one built from an older commit, default this one) runs gc (mark, copy,
 * commit) on its own copy of the repository with a fresh host cache, as its own process under
 * /usr/bin/time (wall, CPU, peak RSS); the builds' order is reversed every other round. The fresh cache's
 * catch-up (19.4) is part of what gc does and of what is measured.
 */
import { randomBytes } from 'node:crypto';
import { cp, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { initChecksum } from '../repo-format/checksum.js';
import { LocalStorage } from '../repo-format/storage/local.js';
import { encodeSegment, segmentKey, type SegmentEntry } from '../repo-format/v3/segment.js';
import { parseSize } from '../engine/index.js';
import { arg, logger, machineLine, run, timed, type Measured } from './tools.js';

const log = logger('v3-memory');

interface Shape {
  segments: number;
  entries: number;
}

interface Row {
  round: number;
  shape: Shape;
  build: string;
  measured: Measured;
  segmentsBefore: number;
  segmentsWritten: number;
  live: number;
  load: string;
}

function parseShapes(text: string): Shape[] {
  return text.split(',').filter(Boolean).map((shape) => {
    const [segments, entries] = shape.split('x').map(Number);
    if (!Number.isSafeInteger(segments) || !Number.isSafeInteger(entries)) throw new Error(`--shapes: ${shape} is not SEGMENTSxENTRIES`);
    return { segments: segments!, entries: entries! };
  });
}

/** S segments of E dead entries each (ids random, packs that do not exist), written 64 at a time. */
async function fill(repo: string, shape: Shape): Promise<void> {
  const storage = new LocalStorage(repo);
  const writer = randomBytes(16).toString('hex');
  let next = 0;
  const one = async (): Promise<void> => {
    while (next < shape.segments) {
      const seq = next++;
      const packId = randomBytes(16).toString('hex');
      const entries: SegmentEntry[] = [];
      for (let i = 0; i < shape.entries; i++) entries.push({ id: randomBytes(32), packId, offset: 32 + i * 4096, length: 4096, rawLength: 4096, kind: 1, flags: 0 });
      entries.sort((a, b) => Buffer.compare(a.id, b.id));
      const segment = { name: { writer, seq }, supersedes: [], entries };
      await storage.put(segmentKey(segment.name), encodeSegment(segment), { ifAbsent: true });
    }
  };
  await Promise.all(Array.from({ length: 64 }, one));
}

async function main(): Promise<void> {
  const shapes = parseShapes(arg('--shapes') ?? '100x0,20000x0,100x20000');
  const imageSize = parseSize(arg('--image') ?? '64M');
  const rounds = Number(arg('--rounds') ?? 1);
  const here = fileURLToPath(new URL('../..', import.meta.url));
  const builds = (arg('--builds') ?? here).split(',').map((b) => resolve(b));
  const out = resolve(arg('--out') ?? join(here, 'bench/results'));
  await initChecksum();
  const scratch = await mkdtemp(join(tmpdir(), 'bench-v3-memory-'));
  const rows: Row[] = [];
  const started = new Date().toISOString();
  try {
    const image = join(scratch, 'image.raw');
    await writeFile(image, randomBytes(imageSize));
    const engine = join(here, 'bin/engine.js');
    for (const shape of shapes) {
      const base = join(scratch, `base-${shape.segments}x${shape.entries}`);
      const env = { ENGINE_CACHE_DIR: join(scratch, 'setup-cache') };
      await run(process.execPath, [engine, 'init', '--format', '3', base], env);
      await run(process.execPath, [engine, 'backup', '--repo', base, '--source', image, '--name', 'live'], env);
      const filling = performance.now();
      await fill(base, shape);
      log(`${shape.segments} segments of ${shape.entries} entries filled in ${((performance.now() - filling) / 1000).toFixed(1)} s`);
      for (let round = 1; round <= rounds; round++) {
        const order = round % 2 === 1 ? builds : [...builds].reverse();
        for (const build of order) {
          const copy = join(scratch, 'run');
          const cache = join(scratch, 'run-cache');
          await rm(copy, { recursive: true, force: true });
          await rm(cache, { recursive: true, force: true });
          await mkdir(cache, { recursive: true });
          await cp(base, copy, { recursive: true });
          const measured = await timed(process.execPath, [join(build, 'bin/engine.js'), 'gc', '--repo', copy, '--json'], { ENGINE_CACHE_DIR: cache });
          const report = JSON.parse(measured.stdout) as { chunks: { live: number }; segments?: { before: number; written: number } };
          const load = (await run('cat', ['/proc/loadavg'])).stdout.split(' ').slice(0, 3).join(' ');
          rows.push({ round, shape, build, measured, segmentsBefore: report.segments?.before ?? 0, segmentsWritten: report.segments?.written ?? 0, live: report.chunks.live, load });
          log(`${shape.segments}x${shape.entries} ${build}: ${measured.seconds.toFixed(1)} s, ${measured.cpuSeconds.toFixed(1)} s CPU, ${measured.peakRssMiB.toFixed(0)} MiB`);
        }
      }
      await rm(base, { recursive: true, force: true });
    }
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
  const lines = [
    `# gc on format 3: peak RSS by the size of the index (${started})`,
    '',
    `Machine: ${machineLine()}. Repository: a local folder, one backup of ${imageSize} random bytes (its chunks are live), plus S index segments of E dead entries each written through the segment API (ids random, packs absent). gc (mark, copy, commit) with a fresh host cache (its catch-up included), its own process under /usr/bin/time; builds' order reversed every other round. The machine is shared: each row carries the load average when it ended.`,
    '',
    '| round | segments (S) | entries each (E) | index entries | build | live blobs | segments before / written | wall s | CPU s | peak RSS MiB | load (1/5/15 min) |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
    ...rows.map((r) => `| ${r.round} | ${r.shape.segments} | ${r.shape.entries} | ${r.shape.segments * r.shape.entries} | ${r.build} | ${r.live} | ${r.segmentsBefore} / ${r.segmentsWritten} | ${r.measured.seconds.toFixed(1)} | ${r.measured.cpuSeconds.toFixed(1)} | ${r.measured.peakRssMiB.toFixed(0)} | ${r.load} |`),
    '',
  ];
  await mkdir(out, { recursive: true });
  await writeFile(join(out, 'v3-memory-latest.md'), lines.join('\n'));
  await writeFile(join(out, 'v3-memory-latest.json'), JSON.stringify({ started, rows }, null, 2));
  process.stdout.write(lines.join('\n'));
}

await main();
