/**
 * Changed-block tracking benchmark: `node dist/bench/cbt.js [--size 8G] [--dir DIR] [--out bench/results]
 * [--no-libvirt]`.
 *
 * 1. Offline qcow2 image (`backup --image`): full, then incrementals after 1% and after 10% of the disk was
 *    rewritten (random data, random 4 KiB–1 MiB writes through a writable qemu-nbd, which the image's
 *    bitmaps record): wall time and bytes read against the full.
 * 2. Running VM under libvirt (TCG domain), side by side with virtnbdbackup on the same VM: full, then an
 *    incremental after 1% of the disk was rewritten (guest writes through HMP qemu-io).
 * Targets (reported, never enforced): incremental at 1% ≤ 5% of the full's wall time; full from a libvirt
 * pull export ≥ 10× virtnbdbackup.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { formatBytes, generateImage, parseSize } from '../engine/index.js';
import { applyChangeSet, withQemuNbd } from './change-set.js';
import { reportMarkdown, verdict, writeReport } from './report.js';
import { arg, ENGINE, initRepository, logger, machineLine, MB, privateEngineCache, run } from './tools.js';
import { libvirtScenario } from './libvirt-scenario.js';

const log = logger('cbt-bench');

interface EngineBackup {
  seconds: number;
  bytesRead: number;
  mode: string;
  size: number;
}

async function engineBackup(args: string[]): Promise<EngineBackup> {
  const { stdout, seconds } = await run(ENGINE, ['backup', '--json', ...args]);
  const record = JSON.parse(stdout) as { disks: { bytesRead: number; mode: string; size: number }[] };
  return {
    seconds,
    bytesRead: record.disks.reduce((sum, d) => sum + d.bytesRead, 0),
    mode: record.disks.map((d) => d.mode).join('+'),
    size: record.disks.reduce((sum, d) => sum + d.size, 0),
  };
}

/** Rewrites `fraction` of the disk through a writable qemu-nbd, which the image's bitmaps record. */
async function rewrite(image: string, size: number, fraction: number, seed: string, workDir: string): Promise<number> {
  return withQemuNbd(image, 'qcow2', workDir, (uri) => applyChangeSet({ nbd: [uri] }, size, fraction, seed));
}

interface Row {
  scenario: string;
  tool: string;
  seconds: number;
  bytesRead: number | null;
  note: string;
}

function table(rows: Row[]): string {
  const lines = ['| scenario | tool | wall s | MB/s of disk | bytes read | note |', '| --- | --- | --- | --- | --- | --- |'];
  for (const r of rows) {
    lines.push(`| ${r.scenario} | ${r.tool} | ${r.seconds.toFixed(2)} | ${(diskSize / MB / r.seconds).toFixed(0)} | ${r.bytesRead === null ? '—' : formatBytes(r.bytesRead)} | ${r.note} |`);
  }
  return lines.join('\n');
}

let diskSize = 0;

async function main(): Promise<void> {
  const size = parseSize(arg('--size') ?? '8G');
  diskSize = size;
  const outDir = arg('--out') ?? 'bench/results';
  const work = await mkdtemp(join(arg('--dir') ?? tmpdir(), 'cbt-bench-'));
  await run('chmod', ['755', work]);
  const cache = await privateEngineCache();
  const rows: Row[] = [];
  const targets: string[] = [];
  const skipped: string[] = [];
  try {
    log(`generating a ${formatBytes(size)} VM-like image`);
    const raw = join(work, 'disk.raw');
    await generateImage(raw, size, 'cbt-bench');
    const image = join(work, 'disk.qcow2');
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, image]);
    await rm(raw);
    // A freshly written image would be flushed by the first qemu-img bitmap call; measure a settled one.
    await run('sync', []);

    // 1. Offline image.
    const repo = join(work, 'repo-image');
    // engine init's default format, as users get it; the report says which.
    const format = await initRepository(repo);
    log('offline image: full backup');
    const full = await engineBackup(['--repo', repo, '--image', image, '--full']);
    rows.push({ scenario: 'offline qcow2: full', tool: 'engine --image', seconds: full.seconds, bytesRead: full.bytesRead, note: full.mode });
    for (const fraction of [0.01, 0.1]) {
      const written = await rewrite(image, size, fraction, `cbt-${fraction}`, work);
      await run('sync', []);
      log(`offline image: incremental after rewriting ${formatBytes(written)}`);
      const inc = await engineBackup(['--repo', repo, '--image', image, '--incremental']);
      const pct = `${fraction * 100}%`;
      rows.push({ scenario: `offline qcow2: incremental, ${pct} rewritten`, tool: 'engine --image', seconds: inc.seconds, bytesRead: inc.bytesRead, note: `${inc.mode}; ${formatBytes(written)} written; ${((inc.seconds / full.seconds) * 100).toFixed(1)}% of the full's time` });
      if (fraction === 0.01) {
        const ratio = inc.seconds / full.seconds;
        targets.push(`incremental at 1% ≤ 5% of the full's wall time: ${(ratio * 100).toFixed(1)}% → ${verdict([ratio], (r) => r <= 0.05)}`);
      }
    }

    // 2. libvirt, side by side with virtnbdbackup.
    if (process.argv.includes('--no-libvirt')) skipped.push('libvirt scenarios: --no-libvirt');
    else {
      const outcome = await libvirtScenario(image, size, work, log, { virtnbdbackup: true });
      skipped.push(...outcome.skipped);
      if (outcome.ceiling) rows.push({ scenario: 'running VM (libvirt pull): full', tool: 'read ceiling: nbdcopy of the pull export → null:', seconds: outcome.ceiling.nbdcopy.seconds, bytesRead: null, note: 'same domain, same run' });
      for (const r of outcome.rows) rows.push({ scenario: `running VM (libvirt pull): ${r.scenario}`, tool: r.tool, seconds: r.measured.seconds, bytesRead: r.bytesRead, note: r.note });
      const engineFull = outcome.rows.find((r) => r.scenario === 'full' && r.tool.startsWith('engine'));
      const peerFull = outcome.rows.find((r) => r.scenario === 'full' && r.tool.startsWith('virtnbdbackup'));
      if (engineFull && peerFull) {
        const ratio = peerFull.measured.seconds / engineFull.measured.seconds;
        targets.push(`full from a libvirt pull export ≥ 10× virtnbdbackup: ${ratio.toFixed(1)}× → ${verdict([ratio], (r) => r >= 10)}`);
      }
      if (engineFull && outcome.ceiling) {
        const share = outcome.ceiling.nbdcopy.seconds / engineFull.measured.seconds;
        targets.push(`full from a libvirt pull export ≥ 90% of nbdcopy from the same export: ${(share * 100).toFixed(0)}% → ${verdict([share], (r) => r >= 0.9)}`);
      }
    }

    const machine = machineLine();
    const markdown = reportMarkdown(
      'Changed-block tracking benchmark',
      [
        `Machine: ${machine}. Disk: ${formatBytes(size)} VM-like image (generateImage seed "cbt-bench") as qcow2. MB = 10^6 B; MB/s = disk size / wall time.`,
        'Engine times are whole CLI runs (process start, chain checks, bitmap or checkpoint bookkeeping, commit).',
        `The engine's repositories: format ${format} folders (what \`engine init\` creates by default), the host index cache of the run's own (ENGINE_CACHE_DIR), the CLI run as users run it (bin/engine).`,
      ],
      table(rows),
      targets,
      skipped,
    );
    await writeReport(outDir, 'cbt', markdown, { machine, size, repositoryFormat: format, rows, targets, skipped });
  } finally {
    await rm(work, { recursive: true, force: true });
    await cache.remove();
  }
}

await main();
