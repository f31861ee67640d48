/**
 * What every CLI call pays before and after its real work: per-call CPU seconds (user + sys, the process and its
 * children: qemu-nbd, qemu-img) and wall seconds of small jobs, against another build of the engine when one is
 * given. Each round runs every step once with this build and once with the baseline, in turn (every other round in
 * the reverse order), so that a shared machine's load falls on both alike; medians and the median of the paired
 * ratios. The steps, on a 64 MiB sparse raw disk holding 8 MiB of data (random, text, zeros):
 *   --version             the floor: the runtime and the CLI's modules, no repository
 *   backup                a full backup of the disk into a repository that has its blocks (read 8 MiB, nothing new)
 *   restore               of that backup to a new file
 *   verify                verify --read-data of the repository
 *   image incremental     backup --image of the same disk as an unchanged qcow2, after its full: the CBT path's
 *                         fixed costs (qemu-img bitmap steps, qemu-nbd, the chain check; no data read)
 * Warm by default (the page cache holds the runtime and the disk): these are the costs of the process, not of its
 * reads; --cold drops the page cache before every timed step (root), as a nightly call meets it.
 *
 *   npm run build && node dist/bench/fixed-costs.js [--rounds 10] [--baseline /other/checkout/bin/engine] [--cold]
 *
 * Nothing is written to bench/results unless --out DIR says so.
 */
import { copyFile, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { arg, coldTimed, ENGINE, loadAverage, logger, machineLine, privateEngineCache, run, timed, type Measured } from './tools.js';

const log = logger('fixed-costs');
const MiB = 1024 * 1024;

interface Build {
  name: string;
  engine: string;
  /** This build's own repository and qcow2 (CBT bitmaps are per image): set up untimed. */
  repo: string;
  qcow2: string;
  backupId: string;
}

interface Step {
  name: string;
  args: (build: Build, round: number, work: string) => string[];
}

const STEPS: Step[] = [
  { name: '--version', args: () => ['--version'] },
  { name: 'backup (8 MiB read, nothing new)', args: (b, _r, work) => ['backup', '--repo', b.repo, '--source', join(work, 'disk.raw'), '--name', 'disk', '--full', '--json'] },
  { name: 'restore to a new file', args: (b, r, work) => ['restore', '--repo', b.repo, b.backupId, '--to', join(work, `restored-${b.name}-${r}.raw`)] },
  { name: 'verify --read-data', args: (b) => ['verify', '--repo', b.repo, '--read-data'] },
  { name: 'backup --image, unchanged qcow2', args: (b) => ['backup', '--repo', b.repo, '--image', b.qcow2, '--incremental', '--json'] },
];

const median = (values: number[]): number => {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
};

async function setUp(name: string, engine: string, work: string): Promise<Build> {
  const repo = join(work, `repo-${name}`);
  const qcow2 = join(work, `disk-${name}.qcow2`);
  await run(engine, ['init', repo]);
  const full = JSON.parse((await run(engine, ['backup', '--repo', repo, '--source', join(work, 'disk.raw'), '--name', 'disk', '--json'])).stdout) as { id: string };
  await copyFile(join(work, 'disk.qcow2'), qcow2);
  await run(engine, ['backup', '--repo', repo, '--image', qcow2, '--full', '--json']);
  return { name, engine, repo, qcow2, backupId: full.id };
}

async function main(): Promise<void> {
  const rounds = Number(arg('--rounds') ?? 10);
  const baseline = arg('--baseline');
  const cold = process.argv.includes('--cold');
  const out = arg('--out');
  const cache = await privateEngineCache();
  const work = await mkdtemp(join(tmpdir(), 'engine-fixed-costs-'));
  try {
    // The disk: 8 MiB of data in a 64 MiB sparse file; the same disk as a qcow2 for the CBT path.
    const disk = join(work, 'disk.raw');
    await run('truncate', ['-s', `${64 * MiB}`, disk]);
    await run('sh', ['-c', `head -c ${4 * MiB} /dev/urandom | dd of=${disk} conv=notrunc status=none && (find /usr/share/doc -type f -name '*.gz' -prune -o -type f -print | head -2000 | xargs cat 2>/dev/null | head -c ${4 * MiB}) | dd of=${disk} bs=1M seek=16 conv=notrunc status=none`]);
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', disk, join(work, 'disk.qcow2')]);
    const builds = [await setUp('this', ENGINE, work)];
    if (baseline) builds.push(await setUp('baseline', baseline, work));

    const samples = new Map<string, Measured[]>();
    const loads: string[] = [];
    for (let round = 1; round <= rounds; round += 1) {
      loads.push(await loadAverage());
      for (const step of STEPS) {
        const order = round % 2 === 0 ? [...builds].reverse() : builds;
        for (const build of order) {
          const args = step.args(build, round, work);
          const measured = cold ? await coldTimed(build.engine, args) : await timed(build.engine, args);
          const key = `${step.name}|${build.name}`;
          samples.set(key, [...(samples.get(key) ?? []), measured]);
        }
      }
      await run('sh', ['-c', `rm -f ${work}/restored-*.raw`]);
      log(`round ${round}/${rounds} (load ${loads.at(-1)})`);
    }

    const lines = [
      `# Fixed costs per CLI call (${cold ? 'cold: page cache dropped before each step' : 'warm page cache'})`,
      '',
      `Machine: ${machineLine()}. ${rounds} rounds${baseline ? `, this build and the baseline (${baseline}) in turn, order reversed every other round` : ''}. Load averages at the rounds' starts: ${loads.join('; ')}.`,
      '',
      baseline ? '| step | CPU-s this | CPU-s baseline | CPU ratio (median of pairs) | wall s this | wall s baseline | wall ratio |' : '| step | CPU-s | wall s | peak RSS MiB |',
      baseline ? '|---|---|---|---|---|---|---|' : '|---|---|---|---|',
    ];
    for (const step of STEPS) {
      const mine = samples.get(`${step.name}|this`)!;
      if (!baseline) {
        lines.push(`| ${step.name} | ${median(mine.map((m) => m.cpuSeconds)).toFixed(3)} | ${median(mine.map((m) => m.seconds)).toFixed(3)} | ${median(mine.map((m) => m.peakRssMiB)).toFixed(0)} |`);
        continue;
      }
      const theirs = samples.get(`${step.name}|baseline`)!;
      const ratio = (pick: (m: Measured) => number): string => median(mine.map((m, i) => pick(m) / pick(theirs[i]!))).toFixed(3);
      lines.push(
        `| ${step.name} | ${median(mine.map((m) => m.cpuSeconds)).toFixed(3)} | ${median(theirs.map((m) => m.cpuSeconds)).toFixed(3)} | ${ratio((m) => m.cpuSeconds)} | ${median(mine.map((m) => m.seconds)).toFixed(3)} | ${median(theirs.map((m) => m.seconds)).toFixed(3)} | ${ratio((m) => m.seconds)} |`,
      );
    }
    const report = `${lines.join('\n')}\n`;
    process.stdout.write(report);
    if (out) {
      await mkdir(out, { recursive: true });
      await writeFile(join(out, `fixed-costs-${new Date().toISOString().slice(0, 16).replace(/:/g, '')}.md`), report);
    }
  } finally {
    await rm(work, { recursive: true, force: true });
    await cache.remove();
  }
}

await main();
