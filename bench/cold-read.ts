/**
 * Two benches of a real image, cold. Without --restore: a full backup of it, against the device's read ceiling (`cat`) and borg, and against
 * another build of the engine when one is given: every round runs each tool once, in turn (every other round
 * in the reverse order), each after `sync; echo 3 > /proc/sys/vm/drop_caches` (root), so that a paired
 * comparison cancels most of a shared machine's load. Reports medians of wall and CPU seconds, peak RSS, and
 * the load average of each run; with --strace, one more backup of each build under `strace -c -f` gives its
 * read calls (their count, and the seconds spent in them).
 *
 *   npm run build && node dist/bench/cold-read.js [--image /var/tmp/engine-real-image/usr.img]
 *     [--rounds 5] [--baseline /path/to/other/checkout/bin/engine.js] [--strace] [--out DIR]
 *
 * With --restore: a restore of it to a new file, durable, from a repository read cold, against `cp
 * --sparse=always` + `sync FILE` of the image (the copy ceiling) and restic 0.14 (`restore` + `sync FILE`), and
 * against another build of the engine when one is given; every restored file is compared with the image (cmp)
 * after its run, untimed. The repositories are made once, before the rounds (untimed). Reports wall, user and
 * system CPU-seconds, CPU-seconds per GiB of the image, and the targets of issue 15 (engine >= 2x restic's
 * speed, within 1.5x of cp + sync's wall time); with --strace, the write and read calls of one more restore.
 *
 *   node dist/bench/cold-read.js --restore [--image ...] [--rounds 5] [--baseline /other/checkout/bin/engine] [--strace]
 *
 * The image: bench/real-image.sh (a 3 GiB ext4 filled from /usr). Nothing is written to bench/results unless
 * --out says so. The build given as --baseline is run as it is named: a bin/engine (the launcher users run) or
 * a bin/engine.js (run with this Node).
 */
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { formatBytes } from '../engine/index.js';
import { arg, available, coldTimed, dropCaches, ENGINE, loadAverage, logger, machineLine, MB, privateEngineCache, run, type Measured } from './tools.js';

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

/** How to start a build: bin/engine (the launcher, its malloc tunables included) as a command, bin/engine.js with this Node. */
function engineCommand(script: string, args: string[]): [string, string[]] {
  return script.endsWith('.js') ? [process.execPath, [script, ...args]] : [script, args];
}

function engineTool(name: string, script: string, image: string): Tool {
  return {
    name,
    backup: async (work, round) => {
      const repo = join(work, `repo-${name.replace(/\W+/g, '-')}-${round}`);
      await run(...engineCommand(script, ['init', repo]));
      try {
        return await coldTimed(...engineCommand(script, ['backup', '--repo', repo, '--source', image, '--full', '--json']));
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
  await run(...engineCommand(script, ['init', repo]));
  try {
    await dropCaches();
    const [command, args] = engineCommand(script, ['backup', '--repo', repo, '--source', image, '--full', '--json']);
    await run('strace', ['-c', '-f', '-e', 'trace=pread64,preadv,preadv2,read', '-o', summary, command, ...args]);
    const { stdout } = await run('cat', [summary]);
    const rows = stdout.split('\n').filter((line) => /\b(pread64|preadv2?|read)$/.test(line.trim()));
    return `${name}: ${rows.map((line) => line.trim().split(/\s+/)).map((f) => `${f[f.length - 1]} ${f[3]} calls, ${f[1]} s in them`).join('; ')}`;
  } finally {
    await rm(repo, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  if (process.getuid?.() !== 0) throw new Error('cold runs drop the page cache: run as root');
  if (process.argv.includes('--restore')) return restoreBench();
  const image = arg('--image') ?? '/var/tmp/engine-real-image/usr.img';
  const rounds = Number(arg('--rounds') ?? 5);
  const baseline = arg('--baseline');
  const out = arg('--out');
  const { stdout: allocated } = await run('du', ['-B1', image]);
  const { stdout: apparent } = await run('stat', ['-c', '%s', image]);
  const size = Number(apparent.trim());
  const work = await mkdtemp(join(tmpdir(), 'bench-cold-read-'));
  // Every backup makes a new repository: without a cache of its own the bench left one host cache per run in /var/cache/engine.
  const cache = await privateEngineCache();
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
    await cache.remove();
    await rm(work, { recursive: true, force: true });
  }
}

/** A tool that restores the image to `out` (a new file), durably; timed, cold. */
interface RestoreTool {
  name: string;
  restore(out: string): Promise<Measured>;
}

/** One restore under `strace -c -f`: its write, read and flush calls. */
async function restoreCalls(name: string, command: [string, string[]], out: string, work: string): Promise<string> {
  const summary = join(work, `strace-restore-${name.replace(/\W+/g, '-')}.txt`);
  await rm(out, { force: true });
  await dropCaches();
  await run('strace', ['-c', '-f', '-e', 'trace=pwrite64,pwritev,pwritev2,write,pread64,preadv,openat,fdatasync,fsync', '-o', summary, command[0], ...command[1]]);
  await rm(out, { force: true });
  const { stdout } = await run('cat', [summary]);
  const rows = stdout.split('\n').map((line) => line.trim().split(/\s+/)).filter((f) => f.length >= 5 && /^[a-z0-9_]+$/.test(f[f.length - 1]!) && /^\d/.test(f[0]!) && f[f.length - 1] !== 'total');
  return `${name}: ${rows.map((f) => `${f[f.length - 1]} ${f[3]}`).join(', ')}`;
}

async function restoreBench(): Promise<void> {
  const image = arg('--image') ?? '/var/tmp/engine-real-image/usr.img';
  const rounds = Number(arg('--rounds') ?? 5);
  const baseline = arg('--baseline');
  const out = arg('--out');
  const size = Number((await run('stat', ['-c', '%s', image])).stdout.trim());
  const allocated = Number((await run('du', ['-B1', image])).stdout.split(/\s+/)[0]);
  const work = await mkdtemp(join(tmpdir(), 'bench-cold-restore-'));
  const cache = await privateEngineCache();
  const target = join(work, 'restored.img');
  try {
    log('preparing: an engine repository and a restic repository of the image (untimed)');
    const repo = join(work, 'engine-repo');
    await run(...engineCommand(ENGINE, ['init', repo]));
    const backup = JSON.parse((await run(...engineCommand(ENGINE, ['backup', '--repo', repo, '--source', image, '--full', '--json']))).stdout) as { id: string; disks: { bytesStored: number }[] };
    const engineRestore = (script: string): [string, string[]] => engineCommand(script, ['restore', '--repo', repo, backup.id, '--to', target, '--json']);
    const tools: RestoreTool[] = [
      { name: 'copy ceiling: cp + sync', restore: (to) => coldTimed('bash', ['-c', `cp --sparse=always '${image}' '${to}' && sync '${to}'`]) },
      { name: 'engine (this build)', restore: () => coldTimed(...engineRestore(ENGINE)) },
    ];
    if (baseline) tools.push({ name: 'engine (baseline)', restore: () => coldTimed(...engineRestore(baseline)) });
    const restic = await available('restic');
    if (restic) {
      const env = { RESTIC_REPOSITORY: join(work, 'restic-repo'), RESTIC_PASSWORD: 'bench', RESTIC_CACHE_DIR: join(work, 'restic-cache') };
      await run('restic', ['init'], env);
      await run('restic', ['backup', image], env);
      const restored = join(work, 'restic-out');
      tools.push({
        name: 'restic 0.14 (restore + sync)',
        restore: async (to) => {
          const measured = await coldTimed('bash', ['-c', `restic restore latest --target '${restored}' && sync '${restored}${image}'`], env);
          await run('mv', [`${restored}${image}`, to]);
          await rm(restored, { recursive: true, force: true });
          return measured;
        },
      });
    }
    const samples: Sample[] = [];
    for (let round = 1; round <= rounds; round += 1) {
      for (const tool of round % 2 === 1 ? tools : [...tools].reverse()) {
        await rm(target, { force: true });
        const load = await loadAverage();
        const measured = await tool.restore(target);
        // Untimed: every restored file must be the image, byte for byte.
        await run('cmp', [image, target]).catch((error: unknown) => {
          throw new Error(`${tool.name} restored a file that differs from the image: ${(error as Error).message}`);
        });
        log(`round ${round} ${tool.name}: ${measured.seconds.toFixed(2)} s wall, ${measured.userSeconds?.toFixed(2)} user + ${measured.systemSeconds?.toFixed(2)} sys CPU-s, load ${load}; cmp identical`);
        samples.push({ tool: tool.name, round, measured, load });
      }
    }
    await rm(target, { force: true });
    const calls = process.argv.includes('--strace')
      ? [await restoreCalls('engine (this build)', engineRestore(ENGINE), target, work), ...(baseline ? [await restoreCalls('engine (baseline)', engineRestore(baseline), target, work)] : [])]
      : [];
    const gib = size / 2 ** 30;
    const medianOf = (tool: string, pick: (m: Measured) => number): number => median(samples.filter((s) => s.tool === tool).map((s) => pick(s.measured)));
    const rows = tools.map((tool) => {
      const mine = samples.filter((s) => s.tool === tool.name);
      const wall = medianOf(tool.name, (m) => m.seconds);
      const user = medianOf(tool.name, (m) => m.userSeconds ?? 0);
      const sys = medianOf(tool.name, (m) => m.systemSeconds ?? 0);
      const cpu = medianOf(tool.name, (m) => m.cpuSeconds);
      return `| ${tool.name} | ${wall.toFixed(2)} | ${(size / MB / wall).toFixed(0)} | ${user.toFixed(2)} | ${sys.toFixed(2)} | ${(cpu / gib).toFixed(2)} | ${medianOf(tool.name, (m) => m.peakRssMiB).toFixed(0)} | ${mine.map((s) => s.measured.seconds.toFixed(1)).join(' / ')} | ${mine.map((s) => s.load.split(' ')[0]).join(' / ')} |`;
    });
    const engineWall = medianOf('engine (this build)', (m) => m.seconds);
    const copyWall = medianOf('copy ceiling: cp + sync', (m) => m.seconds);
    const verdicts = [
      `- within 1.5x of cp + sync: engine ${engineWall.toFixed(2)} s = ${(engineWall / copyWall).toFixed(2)}x cp + sync's ${copyWall.toFixed(2)} s: ${engineWall <= 1.5 * copyWall ? 'met' : 'missed'}`,
      ...(restic ? [(() => {
        const resticWall = medianOf('restic 0.14 (restore + sync)', (m) => m.seconds);
        return `- >= 2x restic: restic ${resticWall.toFixed(2)} s = ${(resticWall / engineWall).toFixed(2)}x the engine's: ${resticWall >= 2 * engineWall ? 'met' : 'missed'}`;
      })()] : []),
    ];
    const report = [
      '# Restore of a real image to a new file, durable, cold',
      '',
      `Machine: ${machineLine()}. Image: ${image}, ${formatBytes(size)} (${formatBytes(allocated)} allocated; engine repository ${formatBytes(backup.disks.reduce((sum, d) => sum + d.bytesStored, 0))} stored). ${rounds} rounds, every tool once a round in turn (every other round reversed), each run after \`sync; echo 3 > /proc/sys/vm/drop_caches\` (root); every restored file cmp-identical to the image. Medians; MB/s = image size / wall; CPU-s per GiB of the image (user + sys).`,
      '',
      '| tool | wall s | MB/s | user CPU-s | sys CPU-s | CPU-s per GiB | peak RSS MiB | wall s, each round | load (1 min) before each run |',
      '| --- | --- | --- | --- | --- | --- | --- | --- | --- |',
      ...rows,
      '',
      'Targets (issue 15, one machine shared with other work: read the loads):',
      ...verdicts,
      ...(calls.length > 0 ? ['', 'Calls of one more cold restore each (strace -c -f: name and count):', '', ...calls.map((c) => `- ${c}`)] : []),
      '',
    ].join('\n');
    process.stdout.write(report);
    if (out) {
      await mkdir(out, { recursive: true });
      await writeFile(join(out, 'cold-restore.md'), report);
    }
  } finally {
    await cache.remove();
    await rm(work, { recursive: true, force: true });
  }
}

await main();
