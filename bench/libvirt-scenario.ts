/**
 * A running VM under libvirt (TCG domain on a copy of a qcow2 image), backed up by virtnbdbackup and by the
 * engine's `--libvirt` chain: a full, then an incremental after the guest rewrote 1% of the disk (HMP
 * qemu-io writes of 64 KiB–1 MiB). Shared by `npm run bench` and `npm run bench:cbt`.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { formatBytes, SeededRandom } from '../engine/index.js';
import { available, coldTimed as timed, ENGINE, initRepository, run, type Measured } from './tools.js';

export interface LibvirtRow {
  scenario: 'full' | 'incremental, 1% rewritten';
  tool: string;
  measured: Measured;
  bytesRead: number | null;
  note: string;
}

export interface LibvirtOutcome {
  rows: LibvirtRow[];
  skipped: string[];
}

async function engineBackup(args: string[]): Promise<{ measured: Measured; bytesRead: number; mode: string }> {
  const measured = await timed(ENGINE, ['backup', '--json', ...args]);
  const record = JSON.parse(measured.stdout) as { disks: { bytesRead: number; mode: string }[] };
  return { measured, bytesRead: record.disks.reduce((sum, d) => sum + d.bytesRead, 0), mode: record.disks.map((d) => d.mode).join('+') };
}

export async function libvirtScenario(image: string, size: number, work: string, log: (message: string) => void, options: { virtnbdbackup: boolean }): Promise<LibvirtOutcome> {
  const rows: LibvirtRow[] = [];
  const skipped: string[] = [];
  if (!(await available('virsh')) || !(await run('virsh', ['version']).then(() => true, () => false))) {
    return { rows, skipped: ['libvirt scenarios: no running libvirtd (virsh version failed)'] };
  }
  const vmImage = join(work, 'libvirt-vm.qcow2');
  await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'qcow2', image, vmImage]);
  await run('chmod', ['755', work]);
  await run('chown', ['libvirt-qemu:kvm', vmImage]).catch(() => undefined);
  await run('sync', []);
  const domain = `engine-bench-${process.pid}`;
  const xml = `<domain type='qemu'><name>${domain}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os><devices><emulator>/usr/bin/qemu-system-x86_64</emulator><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${vmImage}'/><target dev='vda' bus='virtio'/></disk><video><model type='none'/></video><memballoon model='none'/></devices></domain>`;
  await writeFile(join(work, 'domain.xml'), xml);
  log('libvirt: defining and starting a TCG domain (libvirt probes QEMU here: ~40 s)');
  await run('virsh', ['define', join(work, 'domain.xml')]);
  try {
    await run('virsh', ['start', domain]);
    const repo = join(work, 'repo-libvirt');
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
    log('libvirt: engine full');
    const full = await engineBackup(['--repo', repo, '--libvirt', domain, '--full']);
    rows.push({ scenario: 'full', tool: 'engine --libvirt', measured: full.measured, bytesRead: full.bytesRead, note: full.mode });
    const written = await guestWrites();
    log('libvirt: engine incremental');
    const inc = await engineBackup(['--repo', repo, '--libvirt', domain, '--incremental']);
    rows.push({
      scenario: 'incremental, 1% rewritten',
      tool: 'engine --libvirt',
      measured: inc.measured,
      bytesRead: inc.bytesRead,
      note: `${inc.mode}; ${formatBytes(written)} written by the guest; ${((inc.measured.seconds / full.measured.seconds) * 100).toFixed(1)}% of the full's time`,
    });
  } finally {
    await run('virsh', ['destroy', domain]).catch(() => undefined);
    await run('virsh', ['undefine', domain, '--checkpoints-metadata']).catch(() => undefined);
  }
  return { rows, skipped };
}
