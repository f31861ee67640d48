/**
 * A running VM under libvirt (TCG domain on a copy of a qcow2 image), backed up by virtnbdbackup and by the
 * engine's `--libvirt` chain: a full, then an incremental after the guest rewrote 1% of the disk (HMP
 * qemu-io writes of 64 KiB–1 MiB); the export's own read ceiling (nbdcopy from a pull-mode backup export of
 * the same domain, right before the engine's full); then a restore of the engine's incremental to a new raw
 * file made durable (`sync FILE`), compared with the domain's disk once the domain is stopped, and `verify
 * --read-data` of that repository. Every timed step runs after `sync; echo 3 > /proc/sys/vm/drop_caches`.
 * Shared by `npm run bench` and `npm run bench:cbt`.
 *
 * With no libvirtd running, it starts virtlogd and libvirtd (pid files in the bench's work folder) and stops
 * them at the end, unless a test run registered in /tmp/engine-test-daemons/runs is alive then.
 */
import { mkdir, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { formatBytes, SeededRandom } from '../engine/index.js';
import { available, coldTimed as timed, ENGINE, initRepository, run, type Measured } from './tools.js';

export interface LibvirtRow {
  scenario: 'full' | 'incremental, 1% rewritten' | 'restore of the incremental to a raw file + sync' | 'verify, reading all data';
  tool: string;
  measured: Measured;
  bytesRead: number | null;
  storedBytes?: number | null;
  note: string;
}

export interface LibvirtOutcome {
  rows: LibvirtRow[];
  skipped: string[];
}

async function engineBackup(args: string[]): Promise<{ measured: Measured; bytesRead: number; bytesStored: number; mode: string; id: string }> {
  const measured = await timed(ENGINE, ['backup', '--json', ...args]);
  const record = JSON.parse(measured.stdout) as { id: string; disks: { bytesRead: number; bytesStored: number; mode: string }[] };
  return {
    measured,
    id: record.id,
    bytesRead: record.disks.reduce((sum, d) => sum + d.bytesRead, 0),
    bytesStored: record.disks.reduce((sum, d) => sum + d.bytesStored, 0),
    mode: record.disks.map((d) => d.mode).join('+'),
  };
}

const libvirtdAnswers = (): Promise<boolean> => run('virsh', ['-c', 'qemu:///system', 'version']).then(() => true, () => false);

/** Starts virtlogd and libvirtd when none answers; a function that stops what it started (or nothing), or why it cannot. */
export async function ensureLibvirtd(work: string, log: (message: string) => void): Promise<(() => Promise<void>) | string> {
  if (await libvirtdAnswers()) return async () => undefined;
  if (!(await available('libvirtd'))) return 'libvirt scenarios: libvirtd is not installed (apt-get install libvirt-daemon-system)';
  log('libvirt: starting virtlogd and libvirtd (none was running)');
  const started: string[] = [];
  const virtlogdSocket = await stat('/run/libvirt/virtlogd-sock').then((s) => s.isSocket(), () => false);
  if (!virtlogdSocket) {
    await run('virtlogd', ['-d', '-p', join(work, 'virtlogd.pid')]);
    started.push('virtlogd');
  }
  await run('libvirtd', ['-d', '-p', join(work, 'libvirtd.pid')]);
  started.unshift('libvirtd');
  for (let i = 0; i < 600 && !(await libvirtdAnswers()); i += 1) await new Promise((resolve) => setTimeout(resolve, 100));
  return async () => {
    // A test run alive now may be using the daemons: leave them to its teardown.
    const runs = await readdir('/tmp/engine-test-daemons/runs').catch(() => [] as string[]);
    for (const name of runs) {
      if (await readFile(`/proc/${Number(name)}/stat`, 'utf8').then(() => true, () => false)) {
        log(`libvirt: leaving the daemons running (test run ${name} is alive)`);
        return;
      }
    }
    for (const daemon of started) {
      const pid = Number((await readFile(join(work, `${daemon}.pid`), 'utf8').catch(() => '')).trim());
      if (!Number.isInteger(pid) || pid <= 1 || (await readFile(`/proc/${pid}/comm`, 'utf8').catch(() => '')).trim() !== daemon) continue;
      process.kill(pid, 'SIGTERM');
      for (let i = 0; i < 100 && (await readFile(`/proc/${pid}/comm`, 'utf8').then(() => true, () => false)); i += 1) {
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    }
  };
}

/**
 * The pull export's own read ceiling: `virsh backup-begin` of a pull-mode full backup (no checkpoint), nbdcopy
 * of its export to null:, `virsh domjobabort`; the three timed together, cold, and nbdcopy alone in the
 * same run (its own /usr/bin/time inside).
 */
async function pullCeiling(domain: string, runDir: string, work: string): Promise<{ whole: Measured; nbdcopy: Measured }> {
  const socket = join(runDir, 'ceiling.sock');
  const xml = join(work, 'ceiling-backup.xml');
  await writeFile(xml, `<domainbackup mode='pull'><server transport='unix' socket='${socket}'/><disks><disk name='vda' backup='yes' type='file'><scratch file='${join(runDir, 'ceiling-scratch.qcow2')}'/></disk></disks></domainbackup>`);
  const inner = join(work, 'ceiling-nbdcopy.time');
  const whole = await timed('bash', ['-c', `virsh -q backup-begin ${domain} '${xml}' >/dev/null && /usr/bin/time -f '%e %U %S %M' -o '${inner}' nbdcopy 'nbd+unix:///vda?socket=${socket}' null:; rc=$?; virsh -q domjobabort ${domain} >/dev/null; exit $rc`]);
  // The job ends asynchronously: the engine's own backup-begin must not meet this one.
  for (let i = 0; i < 200 && !/Job type:\s+None/.test((await run('virsh', ['domjobinfo', domain])).stdout); i += 1) {
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  const [e, u, s, m] = (await readFile(inner, 'utf8')).trim().split('\n').pop()!.split(/\s+/).map(Number);
  return { whole, nbdcopy: { seconds: e!, cpuSeconds: u! + s!, userSeconds: u!, systemSeconds: s!, peakRssMiB: m! / 1024, stdout: '', load: whole.load } };
}

export async function libvirtScenario(image: string, size: number, work: string, log: (message: string) => void, options: { virtnbdbackup: boolean }): Promise<LibvirtOutcome & { ceiling?: { whole: Measured; nbdcopy: Measured } }> {
  const rows: LibvirtRow[] = [];
  const skipped: string[] = [];
  if (!(await available('virsh'))) return { rows, skipped: ['libvirt scenarios: virsh is not installed (apt-get install libvirt-clients)'] };
  const stopDaemons = await ensureLibvirtd(work, log);
  if (typeof stopDaemons === 'string') return { rows, skipped: [stopDaemons] };
  let ceiling: { whole: Measured; nbdcopy: Measured } | undefined;
  const vmImage = join(work, 'libvirt-vm.qcow2');
  await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'qcow2', image, vmImage]);
  await run('chmod', ['755', work]);
  await run('chown', ['libvirt-qemu:kvm', vmImage]).catch(() => undefined);
  await run('sync', []);
  const domain = `engine-bench-${process.pid}`;
  const xml = `<domain type='qemu'><name>${domain}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os><devices><emulator>/usr/bin/qemu-system-x86_64</emulator><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${vmImage}'/><target dev='vda' bus='virtio'/></disk><video><model type='none'/></video><memballoon model='none'/></devices></domain>`;
  await writeFile(join(work, 'domain.xml'), xml);
  log('libvirt: defining and starting a TCG domain (libvirt probes QEMU here: ~40 s)');
  const repo = join(work, 'repo-libvirt');
  let latest: string | undefined;
  try {
    await run('virsh', ['define', join(work, 'domain.xml')]);
    try {
      await run('virsh', ['start', domain]);
      // The caller's private cache (ENGINE_CACHE_DIR) and default format, which its report names.
      await initRepository(repo);
      const runDir = join(work, 'virtnbdbackup-run');
      await mkdir(runDir);
      await run('chown', ['libvirt-qemu:kvm', runDir]).catch(() => undefined);
      await run('chmod', ['770', runDir]);
      const random = new SeededRandom('bench-libvirt');
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
      if (!options.virtnbdbackup) skipped.push('virtnbdbackup: not requested (--peers)');
      else if (!(await available('virtnbdbackup'))) skipped.push('virtnbdbackup: not installed (apt-get install virtnbdbackup)');
      else {
        log('libvirt: virtnbdbackup full');
        const out = join(work, 'virtnbdbackup-out');
        rows.push({ scenario: 'full', tool: 'virtnbdbackup 1.9', measured: await timed('virtnbdbackup', ['-d', domain, '-l', 'full', '-o', out, '-S', runDir, '-n']), bytesRead: null, note: 'one worker per disk, sparse stream' });
        const written = await guestWrites();
        log('libvirt: virtnbdbackup incremental');
        rows.push({ scenario: 'incremental, 1% rewritten', tool: 'virtnbdbackup 1.9', measured: await timed('virtnbdbackup', ['-d', domain, '-l', 'inc', '-o', out, '-S', runDir, '-n']), bytesRead: null, note: `${formatBytes(written)} written by the guest` });
        for (const name of (await run('virsh', ['-q', 'checkpoint-list', domain, '--name'])).stdout.split('\n').map((l) => l.trim()).filter(Boolean).reverse()) {
          await run('virsh', ['checkpoint-delete', domain, name]);
        }
      }
      log('libvirt: the pull export\'s read ceiling (nbdcopy → null:)');
      ceiling = await pullCeiling(domain, runDir, work);
      log('libvirt: engine full');
      const full = await engineBackup(['--repo', repo, '--libvirt', domain, '--full']);
      rows.push({ scenario: 'full', tool: 'engine --libvirt', measured: full.measured, bytesRead: full.bytesRead, storedBytes: full.bytesStored, note: full.mode });
      const written = await guestWrites();
      log('libvirt: engine incremental');
      const inc = await engineBackup(['--repo', repo, '--libvirt', domain, '--incremental']);
      latest = inc.id;
      rows.push({
        scenario: 'incremental, 1% rewritten',
        tool: 'engine --libvirt',
        measured: inc.measured,
        bytesRead: inc.bytesRead,
        storedBytes: inc.bytesStored,
        note: `${inc.mode}; ${formatBytes(written)} written by the guest; ${((inc.measured.seconds / full.measured.seconds) * 100).toFixed(1)}% of the full's time`,
      });
    } finally {
      await run('virsh', ['destroy', domain]).catch(() => undefined);
      await run('virsh', ['undefine', domain, '--checkpoints-metadata']).catch(() => undefined);
    }
    if (latest) {
      // The domain is stopped: its disk holds what the incremental saw (no write came after it).
      log('libvirt: engine restore of the incremental, verify --read-data');
      const out = join(work, 'libvirt-restored.raw');
      const restored = await timed('bash', ['-c', '"$0" restore --repo "$1" "$2" --to "$3" --json && sync "$3"', ENGINE, repo, latest, out]);
      const same = await run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'qcow2', out, vmImage]).then(() => true, () => false);
      await run('rm', ['-f', out]);
      rows.push({ scenario: 'restore of the incremental to a raw file + sync', tool: 'engine', measured: restored, bytesRead: null, note: same ? 'qemu-img compare with the stopped domain\'s disk: identical' : 'qemu-img compare: DIFFERENT' });
      rows.push({ scenario: 'verify, reading all data', tool: 'engine verify --read-data', measured: await timed(ENGINE, ['verify', '--repo', repo, '--read-data']), bytesRead: null, note: 'the full and the incremental' });
    }
  } finally {
    await stopDaemons();
  }
  return { rows, skipped, ceiling };
}
