/**
 * The engine side by side with its peers, on the same generated VM-like image, in the same run:
 * `node dist/bench/peers.js [--size 1G] [--dir DIR] [--out bench/results] [--peers restic,borg]`.
 *
 * Full backup and restore of a raw image by the engine, restic 0.14 and borg 1.2 (fixed 4 MiB chunker,
 * no encryption: the configuration its docs recommend for disk images), next to the machine's ceilings
 * (read: `cat`, `nbdcopy` from a qemu-nbd export; write: `cp`). Each tool runs as its own process under
 * /usr/bin/time for wall time, CPU time and peak RSS. A peer that cannot be installed or run is skipped with
 * the reason. Output: a markdown table, JSON and an SVG bar chart (engine against each peer, with ratios).
 * Targets (reported, never enforced): full backup ≥ 5× restic, ≥ 2× borg.
 */
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { cpus, tmpdir, totalmem } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { formatBytes, generateImage, parseSize } from '../engine/index.js';
import { reportMarkdown, writeReport } from './report.js';
import { arg, duBytes, logger, sh, timed, type Measured } from './process.js';

const ENGINE = fileURLToPath(new URL('../../bin/engine.js', import.meta.url));
const MB = 1e6;

const log = logger('peers');

async function available(command: string): Promise<boolean> {
  return sh('which', [command]).then(() => true, () => false);
}

/** Installs a Debian package when missing (root only); false with a reason otherwise. */
async function ensure(command: string, pkg: string): Promise<string | true> {
  if (await available(command)) return true;
  if (process.getuid?.() !== 0) return `${command} is not installed and this is not root (apt-get install ${pkg})`;
  try {
    await sh('apt-get', ['install', '-y', '-qq', '--no-install-recommends', pkg], { DEBIAN_FRONTEND: 'noninteractive' });
  } catch (error) {
    return `apt-get install ${pkg} failed: ${(error as Error).message}`;
  }
  return (await available(command)) ? true : `${pkg} installed no ${command}`;
}

interface Row {
  scenario: 'full backup' | 'restore';
  tool: string;
  seconds: number;
  mbPerS: number;
  cpuSeconds: number;
  peakRssMiB: number;
  storedBytes?: number;
}

/**
 * Bars per scenario (engine, each peer, the ceilings), each labelled with MB/s and the engine's speed
 * relative to it. `cat` is left out: page-cache reads at 15 GB/s would flatten every other bar.
 */
function svgChart(rows: Row[], title: string): string {
  const shown = [...rows].filter((r) => !r.tool.includes(': cat')).sort((a, b) => a.scenario.localeCompare(b.scenario));
  const width = 820;
  const barHeight = 22;
  const left = 250;
  const max = Math.max(...shown.map((r) => r.mbPerS));
  const bars = shown.map((r, i) => {
    const engine = rows.find((x) => x.scenario === r.scenario && x.tool === 'engine');
    const ratio = engine && r !== engine ? ` (engine ${(r.seconds / engine.seconds).toFixed(2)}×)` : '';
    const w = Math.max(1, ((width - left - 190) * r.mbPerS) / max);
    const y = 40 + i * (barHeight + 8);
    const color = r.tool === 'engine' ? '#2b6cb0' : r.tool.includes('ceiling') ? '#a0aec0' : '#dd6b20';
    return `<text x="${left - 8}" y="${y + 15}" text-anchor="end" font-size="12">${r.scenario}: ${r.tool}</text><rect x="${left}" y="${y}" width="${w.toFixed(1)}" height="${barHeight}" fill="${color}"/><text x="${(left + w + 6).toFixed(1)}" y="${y + 15}" font-size="12">${r.mbPerS.toFixed(0)} MB/s${ratio}</text>`;
  });
  const height = 60 + shown.length * (barHeight + 8);
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif"><text x="10" y="22" font-size="14" font-weight="bold">${title}</text>${bars.join('')}</svg>\n`;
}

async function main(): Promise<void> {
  const size = parseSize(arg('--size') ?? '1G');
  const outDir = arg('--out') ?? 'bench/results';
  const wanted = new Set((arg('--peers') ?? 'restic,borg').split(','));
  const work = await mkdtemp(join(arg('--dir') ?? tmpdir(), 'peers-bench-'));
  const rows: Row[] = [];
  const skipped: string[] = [];
  const targets: string[] = [];
  const add = (scenario: Row['scenario'], tool: string, m: Measured, storedBytes?: number): Row => {
    const row: Row = { scenario, tool, seconds: m.seconds, mbPerS: size / MB / m.seconds, cpuSeconds: m.cpuSeconds, peakRssMiB: m.peakRssMiB, ...(storedBytes !== undefined ? { storedBytes } : {}) };
    rows.push(row);
    return row;
  };
  try {
    const image = join(work, 'disk.img');
    log(`generating a ${formatBytes(size)} VM-like image`);
    await generateImage(image, size, 'peers-bench');
    await sh('sync', []);
    await sh('cat', [image]).catch(() => undefined); // warm the page cache: every tool starts equal

    log('read ceiling: cat');
    add('full backup', 'read ceiling: cat', await timed('cat', [image]));
    if (await available('nbdcopy')) {
      log('read ceiling: nbdcopy from qemu-nbd');
      const socket = join(work, 'nbd.sock');
      await sh('qemu-nbd', ['-r', '-f', 'raw', '--socket', socket, '--persistent', '--fork', '--pid-file', join(work, 'nbd.pid'), image]);
      add('full backup', 'read ceiling: nbdcopy → null:', await timed('nbdcopy', [`nbd+unix:///?socket=${socket}`, 'null:']));
      await sh('bash', ['-c', `kill $(cat ${join(work, 'nbd.pid')})`]).catch(() => undefined);
    } else skipped.push('nbdcopy: not installed (libnbd-bin)');

    // The engine.
    const repo = join(work, 'engine-repo');
    await sh(process.execPath, [ENGINE, 'init', repo]);
    log('engine: full backup');
    const engineFull = add('full backup', 'engine', await timed(process.execPath, [ENGINE, 'backup', '--repo', repo, '--source', image, '--name', 'bench']), 0);
    engineFull.storedBytes = await duBytes(join(repo, 'packs'));
    const id = JSON.parse(await sh(process.execPath, [ENGINE, 'list', '--repo', repo, '--json'])).backups[0].id as string;

    // restic.
    let resticFull: Row | undefined;
    if (wanted.has('restic')) {
      const ok = await ensure('restic', 'restic');
      if (ok !== true) skipped.push(`restic: ${ok}`);
      else {
        const env = { RESTIC_REPOSITORY: join(work, 'restic-repo'), RESTIC_PASSWORD: 'bench' };
        await sh('restic', ['init'], env);
        log('restic: full backup');
        resticFull = add('full backup', 'restic 0.14', await timed('restic', ['backup', '--quiet', image], env), 0);
        resticFull.storedBytes = await duBytes(join(work, 'restic-repo'));
        log('restic: restore');
        add('restore', 'restic 0.14', await timed('restic', ['restore', 'latest', '--target', join(work, 'restic-out')], env));
        await rm(join(work, 'restic-out'), { recursive: true, force: true });
        await rm(join(work, 'restic-repo'), { recursive: true, force: true });
      }
    }
    // borg.
    let borgFull: Row | undefined;
    if (wanted.has('borg')) {
      const ok = await ensure('borg', 'borgbackup');
      if (ok !== true) skipped.push(`borg: ${ok}`);
      else {
        const env = { BORG_REPO: join(work, 'borg-repo'), BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK: 'yes', BORG_RELOCATED_REPO_ACCESS_IS_OK: 'yes' };
        await sh('borg', ['init', '-e', 'none'], env);
        log('borg: full backup');
        borgFull = add('full backup', 'borg 1.2 (fixed 4 MiB)', await timed('borg', ['create', '--chunker-params', 'fixed,4194304', '--compression', 'lz4', '--sparse', '::a', image], env), 0);
        borgFull.storedBytes = await duBytes(join(work, 'borg-repo'));
        log('borg: restore');
        const out = join(work, 'borg-out');
        await mkdir(out);
        add('restore', 'borg 1.2 (fixed 4 MiB)', await timed('bash', ['-c', `cd '${out}' && borg extract --sparse ::a`], env));
        await rm(out, { recursive: true, force: true });
        await rm(join(work, 'borg-repo'), { recursive: true, force: true });
      }
    }

    log('engine: restore');
    add('restore', 'engine', await timed(process.execPath, [ENGINE, 'restore', '--repo', repo, id, '--to', join(work, 'engine-out.img')]));
    await rm(join(work, 'engine-out.img'), { force: true });
    log('write ceiling: cp');
    add('restore', 'write ceiling: cp + sync', await timed('bash', ['-c', `cp --sparse=always '${image}' '${join(work, 'copy.img')}' && sync '${join(work, 'copy.img')}'`]));
    await rm(join(work, 'copy.img'), { force: true });

    if (resticFull) targets.push(`full backup ≥ 5× restic: ${(resticFull.seconds / engineFull.seconds).toFixed(1)}× → ${resticFull.seconds / engineFull.seconds >= 5 ? 'PASS' : 'MISS'}`);
    if (borgFull) targets.push(`full backup ≥ 2× borg: ${(borgFull.seconds / engineFull.seconds).toFixed(1)}× → ${borgFull.seconds / engineFull.seconds >= 2 ? 'PASS' : 'MISS'}`);

    const machine = `${cpus()[0]?.model ?? 'unknown CPU'}, ${cpus().length} cores, ${formatBytes(totalmem())} RAM, Node ${process.version}`;
    const engineRow = (scenario: Row['scenario']): Row | undefined => rows.find((r) => r.scenario === scenario && r.tool === 'engine');
    const table = [
      '| scenario | tool | wall s | MB/s of image | engine ÷ this (speed) | CPU s | peak RSS MiB | stored |',
      '| --- | --- | --- | --- | --- | --- | --- | --- |',
      ...rows.map((r) => {
        const engine = engineRow(r.scenario);
        const ratio = engine ? (r.seconds / engine.seconds).toFixed(2) : '';
        return `| ${r.scenario} | ${r.tool} | ${r.seconds.toFixed(2)} | ${r.mbPerS.toFixed(0)} | ${ratio} | ${r.cpuSeconds.toFixed(1)} | ${r.peakRssMiB.toFixed(0)} | ${r.storedBytes !== undefined ? formatBytes(r.storedBytes) : ''} |`;
      }),
    ].join('\n');
    const markdown = reportMarkdown(
      'Peers benchmark',
      [
        `Machine: ${machine}. Image: ${formatBytes(size)} VM-like raw image (generateImage seed "peers-bench"), warm in the page cache. MB = 10^6 B.`,
        '"engine ÷ this": how many times longer this tool took than the engine (above 1: the engine is faster).',
      ],
      table,
      targets,
      skipped,
    );
    await writeReport(outDir, 'peers', markdown, { machine, size, rows, targets, skipped }, {
      svg: svgChart(rows, `Full backup and restore of a ${formatBytes(size)} VM-like image (MB/s, higher is better)`),
    });
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

await main();
