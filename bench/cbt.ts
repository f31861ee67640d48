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
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { cpus, tmpdir, totalmem } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { formatBytes, generateImage, NbdClient, parseSize, SeededRandom } from '../engine/index.js';
import { reportMarkdown, writeReport } from './report.js';

const ENGINE = fileURLToPath(new URL('../../bin/engine.js', import.meta.url));
const MB = 1e6;

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

function log(message: string): void {
  process.stderr.write(`[cbt-bench ${new Date().toISOString().slice(11, 19)}] ${message}\n`);
}

function run(command: string, args: string[], options: { env?: Record<string, string> } = {}): Promise<{ stdout: string; seconds: number }> {
  const started = performance.now();
  return new Promise((resolve, reject) => {
    execFile(command, args, { maxBuffer: 64 * 1024 * 1024, env: { ...process.env, ...options.env } }, (error, stdout, stderr) => {
      if (error) reject(new Error(`${command} ${args.join(' ')}: ${stderr || error.message}`));
      else resolve({ stdout, seconds: (performance.now() - started) / 1000 });
    });
  });
}

async function available(command: string): Promise<boolean> {
  return run('which', [command]).then(() => true, () => false);
}

interface EngineBackup {
  seconds: number;
  bytesRead: number;
  mode: string;
  size: number;
}

async function engineBackup(args: string[]): Promise<EngineBackup> {
  const { stdout, seconds } = await run(process.execPath, [ENGINE, 'backup', '--json', ...args]);
  const record = JSON.parse(stdout) as { disks: { bytesRead: number; mode: string; size: number }[] };
  return {
    seconds,
    bytesRead: record.disks.reduce((sum, d) => sum + d.bytesRead, 0),
    mode: record.disks.map((d) => d.mode).join('+'),
    size: record.disks.reduce((sum, d) => sum + d.size, 0),
  };
}

/** Rewrites `fraction` of the disk with random data in 4 KiB–1 MiB writes, through a writable qemu-nbd. */
async function rewrite(image: string, fraction: number, seed: string, workDir: string): Promise<number> {
  const socket = join(workDir, `w-${seed}.sock`);
  const pidFile = join(workDir, `w-${seed}.pid`);
  await run('qemu-nbd', ['-f', 'qcow2', '--socket', socket, '--persistent', '--fork', '--pid-file', pidFile, image]);
  const pid = Number((await readFile(pidFile, 'utf8')).trim());
  const random = new SeededRandom(seed);
  let written = 0;
  try {
    const client = await NbdClient.connect(`nbd+unix:///?socket=${socket}`);
    const size = client.size;
    const budget = Math.floor(size * fraction);
    while (written < budget) {
      const length = Math.min(budget - written, 4096 * (1 + random.below(256)));
      const offset = random.below(Math.floor((size - length) / 4096)) * 4096;
      await client.write(random.bytes(length), offset);
      written += length;
    }
    await client.flush();
    await client.close();
  } finally {
    process.kill(pid, 'SIGTERM');
    for (let i = 0; i < 500; i += 1) {
      try {
        process.kill(pid, 0);
        await new Promise((resolve) => setTimeout(resolve, 10));
      } catch {
        break;
      }
    }
  }
  return written;
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
    await run(process.execPath, [ENGINE, 'init', repo]);
    log('offline image: full backup');
    const full = await engineBackup(['--repo', repo, '--image', image, '--full']);
    rows.push({ scenario: 'offline qcow2: full', tool: 'engine --image', seconds: full.seconds, bytesRead: full.bytesRead, note: full.mode });
    for (const fraction of [0.01, 0.1]) {
      const written = await rewrite(image, fraction, `cbt-${fraction}`, work);
      await run('sync', []);
      log(`offline image: incremental after rewriting ${formatBytes(written)}`);
      const inc = await engineBackup(['--repo', repo, '--image', image, '--incremental']);
      const pct = `${fraction * 100}%`;
      rows.push({ scenario: `offline qcow2: incremental, ${pct} rewritten`, tool: 'engine --image', seconds: inc.seconds, bytesRead: inc.bytesRead, note: `${inc.mode}; ${formatBytes(written)} written; ${((inc.seconds / full.seconds) * 100).toFixed(1)}% of the full's time` });
      if (fraction === 0.01) {
        const ratio = inc.seconds / full.seconds;
        targets.push(`incremental at 1% ≤ 5% of the full's wall time: ${(ratio * 100).toFixed(1)}% → ${ratio <= 0.05 ? 'PASS' : 'MISS'}`);
      }
    }

    // 2. libvirt, side by side with virtnbdbackup.
    if (process.argv.includes('--no-libvirt')) skipped.push('libvirt scenarios: --no-libvirt');
    else if (!(await available('virsh')) || !(await run('virsh', ['version']).then(() => true, () => false))) skipped.push('libvirt scenarios: no running libvirtd (virsh version failed)');
    else {
      const vmImage = join(work, 'vm.qcow2');
      await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'qcow2', image, vmImage]);
      await run('chown', ['libvirt-qemu:kvm', vmImage]).catch(() => undefined);
      await run('sync', []);
      const domain = `cbt-bench-${process.pid}`;
      const xml = `<domain type='qemu'><name>${domain}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os><devices><emulator>/usr/bin/qemu-system-x86_64</emulator><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${vmImage}'/><target dev='vda' bus='virtio'/></disk><video><model type='none'/></video><memballoon model='none'/></devices></domain>`;
      await writeFile(join(work, 'domain.xml'), xml);
      log('libvirt: defining and starting a TCG domain (libvirt probes QEMU here: ~40 s)');
      await run('virsh', ['define', join(work, 'domain.xml')]);
      try {
        await run('virsh', ['start', domain]);
        const vrepo = join(work, 'repo-libvirt');
        await run(process.execPath, [ENGINE, 'init', vrepo]);
        const hasVnb = await available('virtnbdbackup');
        const runDir = join(work, 'run');
        await mkdir(runDir);
        await run('chown', ['libvirt-qemu:kvm', runDir]).catch(() => undefined);
        await run('chmod', ['770', runDir]);
        const random = new SeededRandom('cbt-libvirt');
        /** 1% of the disk rewritten by the guest (HMP qemu-io writes of 64 KiB–1 MiB). */
        const guestWrites = async (): Promise<number> => {
          let written = 0;
          while (written < size * 0.01) {
            const length = 65536 * (1 + random.below(16));
            const offset = random.below(Math.floor((size - length) / 65536)) * 65536;
            await run('virsh', ['qemu-monitor-command', domain, '--hmp', `qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P ${1 + random.below(250)} ${offset} ${length}"`]);
            written += length;
          }
          return written;
        };
        // virtnbdbackup refuses to run next to checkpoints it did not create: its chain runs first, and its
        // checkpoints are deleted before the engine's chain starts.
        let vfull: { seconds: number } | undefined;
        if (hasVnb) {
          log('libvirt: virtnbdbackup full');
          vfull = await run('virtnbdbackup', ['-d', domain, '-l', 'full', '-o', join(work, 'vnb'), '-S', runDir, '-n']);
          rows.push({ scenario: 'running VM (libvirt pull): full', tool: 'virtnbdbackup -l full', seconds: vfull.seconds, bytesRead: null, note: 'one worker per disk, sparse stream' });
          const written = await guestWrites();
          log('libvirt: virtnbdbackup incremental');
          const vinc = await run('virtnbdbackup', ['-d', domain, '-l', 'inc', '-o', join(work, 'vnb'), '-S', runDir, '-n']);
          rows.push({ scenario: 'running VM (libvirt pull): incremental, 1% rewritten', tool: 'virtnbdbackup -l inc', seconds: vinc.seconds, bytesRead: null, note: `${formatBytes(written)} written` });
          for (const name of (await run('virsh', ['-q', 'checkpoint-list', domain, '--name'])).stdout.split('\n').map((l) => l.trim()).filter(Boolean).reverse()) {
            await run('virsh', ['checkpoint-delete', domain, name]);
          }
        } else skipped.push('virtnbdbackup: not installed (apt-get install virtnbdbackup)');
        log('libvirt: engine full');
        const efull = await engineBackup(['--repo', vrepo, '--libvirt', domain, '--full']);
        rows.push({ scenario: 'running VM (libvirt pull): full', tool: 'engine --libvirt', seconds: efull.seconds, bytesRead: efull.bytesRead, note: efull.mode });
        if (vfull) {
          const ratio = vfull.seconds / efull.seconds;
          targets.push(`full from a libvirt pull export ≥ 10× virtnbdbackup: ${ratio.toFixed(1)}× → ${ratio >= 10 ? 'PASS' : 'MISS'}`);
        }
        const written = await guestWrites();
        log('libvirt: engine incremental');
        const einc = await engineBackup(['--repo', vrepo, '--libvirt', domain, '--incremental']);
        rows.push({ scenario: 'running VM (libvirt pull): incremental, 1% rewritten', tool: 'engine --libvirt', seconds: einc.seconds, bytesRead: einc.bytesRead, note: `${einc.mode}; ${formatBytes(written)} written; ${((einc.seconds / efull.seconds) * 100).toFixed(1)}% of the full's time` });
      } finally {
        await run('virsh', ['destroy', domain]).catch(() => undefined);
        await run('virsh', ['undefine', domain, '--checkpoints-metadata']).catch(() => undefined);
      }
    }

    const machine = `${cpus()[0]?.model ?? 'unknown CPU'}, ${cpus().length} cores, ${formatBytes(totalmem())} RAM, Node ${process.version}`;
    const markdown = reportMarkdown(
      'Changed-block tracking benchmark',
      [
        `Machine: ${machine}. Disk: ${formatBytes(size)} VM-like image (generateImage seed "cbt-bench") as qcow2. MB = 10^6 B; MB/s = disk size / wall time.`,
        'Engine times are whole CLI runs (process start, chain checks, bitmap or checkpoint bookkeeping, commit).',
      ],
      table(rows),
      targets,
      skipped,
    );
    await writeReport(outDir, 'cbt', markdown, { machine, size, rows, targets, skipped });
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

await main();
