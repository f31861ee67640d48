/**
 * A full backup of a real image read cold, against the device's read ceiling (`cat`) and borg, and against
 * another build of the engine when one is given: every round runs each tool once, in turn (every other round
 * in the reverse order), each after `sync; echo 3 > /proc/sys/vm/drop_caches` (root), so that a paired
 * comparison cancels most of a shared machine's load. Reports medians of wall and CPU seconds, peak RSS, and
 * the load average of each run; with --strace, one more backup of each build under `strace -c -f` gives its
 * read calls (their count, and the seconds spent in them).
 *
 *   npm run build && node dist/bench/cold-read.js [--image /var/tmp/engine-real-image/usr.img]
 *     [--rounds 5] [--baseline /path/to/other/checkout/bin/engine.js] [--strace] [--out DIR]
 *
 * The image: bench/real-image.sh (a 3 GiB ext4 filled from /usr). Nothing is written to bench/results unless
 * --out says so.
 */
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { formatBytes } from '../engine/index.js';
import { arg, available, coldTimed, dropCaches, ENGINE, loadAverage, logger, machineLine, MB, run, type Measured } from './tools.js';

const log = logger('cold-read');

interface Sample {
  tool: string;
  round: number;
  measured: Measured;
  load: string;
}

interface Tool {
  name: string;
  /** Prepares a fresh repository (untimed), then runs one timed backup, cold. */
  backup(work: string, round: number): Promise<Measured>;
}

function engineTool(name: string, script: string, image: string): Tool {
  return {
    name,
    backup: async (work, round) => {
      const repo = join(work, `repo-${name.replace(/\W+/g, '-')}-${round}`);
      await run(process.execPath, [script, 'init', repo]);
      try {
        return await coldTimed(process.execPath, [script, 'backup', '--repo', repo, '--source', image, '--full', '--json']);
      } finally {
        await rm(repo, { recursive: true, force: true });
      }
    },
  };
}

function borgTool(image: string): Tool {
  return {
    name: 'borg (fixed 4 MiB, lz4)',
    backup: async (work, round) => {
      const repo = join(work, `borg-${round}`);
      const env = { BORG_REPO: repo, BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK: 'yes', BORG_BASE_DIR: join(work, 'borg-base') };
      await run('borg', ['init', '--encryption', 'none'], env);
      try {
        return await coldTimed('borg', ['create', '--chunker-params', 'fixed,4194304', '--compression', 'lz4', '--sparse', '::full', image], env);
      } finally {
        await rm(repo, { recursive: true, force: true });
      }
    },
  };
}

const median = (values: number[]): number => {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
};

/** One backup under `strace -c -f`: the calls that read the source, their count and mean size. */
async function readCalls(name: string, script: string, image: string, work: string): Promise<string> {
  const repo = join(work, `strace-${name.replace(/\W+/g, '-')}`);
  const summary = join(work, `strace-${name.replace(/\W+/g, '-')}.txt`);
  await run(process.execPath, [script, 'init', repo]);
  try {
    await dropCaches();
    await run('strace', ['-c', '-f', '-e', 'trace=pread64,preadv,preadv2,read', '-o', summary, process.execPath, script, 'backup', '--repo', repo, '--source', image, '--full', '--json']);
    const { stdout } = await run('cat', [summary]);
    const rows = stdout.split('\n').filter((line) => /\b(pread64|preadv2?|read)$/.test(line.trim()));
    return `${name}: ${rows.map((line) => line.trim().split(/\s+/)).map((f) => `${f[f.length - 1]} ${f[3]} calls, ${f[1]} s in them`).join('; ')}`;
  } finally {
    await rm(repo, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('cold runs drop the page cache: run as root');
  const image = arg('--image') ?? '/var/tmp/engine-real-image/usr.img';
  const rounds = Number(arg('--rounds') ?? 5);
  const baseline = arg('--baseline');
  const out = arg('--out');
  const { stdout: allocated } = await run('du', ['-B1', image]);
  const { stdout: apparent } = await run('stat', ['-c', '%s', image]);
  const size = Number(apparent.trim());
  const work = await mkdtemp(join(tmpdir(), 'bench-cold-read-'));
  const tools: Tool[] = [
    { name: 'read ceiling: cat', backup: async () => coldTimed('bash', ['-c', `cat '${image}' > /dev/null`]) },
    engineTool('engine (this build)', ENGINE, image),
  ];
  if (baseline) tools.push(engineTool('engine (baseline)', baseline, image));
  if (await available('borg')) tools.push(borgTool(image));
  const samples: Sample[] = [];
  try {
    for (let round = 1; round <= rounds; round += 1) {
      // Every other round in the reverse order: a tool never always runs right after the same other one.
      for (const tool of round % 2 === 1 ? tools : [...tools].reverse()) {
        const load = await loadAverage();
        const measured = await tool.backup(work, round);
        log(`round ${round} ${tool.name}: ${measured.seconds.toFixed(2)} s wall, ${measured.cpuSeconds.toFixed(2)} CPU-s, load ${load}`);
        samples.push({ tool: tool.name, round, measured, load });
      }
    }
    const calls = process.argv.includes('--strace')
      ? [await readCalls('engine (this build)', ENGINE, image, work), ...(baseline ? [await readCalls('engine (baseline)', baseline, image, work)] : [])]
      : [];
    const rows = tools.map((tool) => {
      const mine = samples.filter((s) => s.tool === tool.name);
      const wall = median(mine.map((s) => s.measured.seconds));
      const cpu = median(mine.map((s) => s.measured.cpuSeconds));
      const rss = median(mine.map((s) => s.measured.peakRssMiB));
      return `| ${tool.name} | ${wall.toFixed(2)} | ${(size / MB / wall).toFixed(0)} | ${cpu.toFixed(2)} | ${(cpu / (size / 2 ** 30)).toFixed(2)} | ${rss.toFixed(0)} | ${mine.map((s) => s.measured.seconds.toFixed(1)).join(' / ')} | ${mine.map((s) => s.load.split(' ')[0]).join(' / ')} |`;
    });
    const report = [
      '# Full backup of a real image, cold',
      '',
      `Machine: ${machineLine()}. Image: ${image}, ${formatBytes(size)} (${formatBytes(Number(allocated.split(/\s+/)[0]))} allocated). ${rounds} rounds, every tool once a round in turn, each run after \`sync; echo 3 > /proc/sys/vm/drop_caches\` (root). Medians; MB/s = image size / wall.`,
      '',
      '| tool | wall s | MB/s | CPU-s | CPU-s per GiB | peak RSS MiB | wall s, each round | load (1 min) before each run |',
      '| --- | --- | --- | --- | --- | --- | --- | --- |',
      ...rows,
      ...(calls.length > 0 ? ['', 'Read calls of one more cold backup each (strace -c -f):', '', ...calls.map((c) => `- ${c}`)] : []),
      '',
    ].join('\n');
    process.stdout.write(report);
    if (out) {
      await mkdir(out, { recursive: true });
      await writeFile(join(out, 'cold-read.md'), report);
    }
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

await main();
