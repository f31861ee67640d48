/** A real libvirtd with TCG domains for the tests (no KVM, no systemd here: the daemons are started by hand). */
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { sh } from './helpers.js';

/**
 * Where the daemons the tests start keep their pid files: one place for the whole run, so that the global
 * teardown (test/global-setup.ts) stops exactly what the tests started, and nothing the machine ran before.
 */
export const STARTED_DAEMONS_DIR = join(tmpdir(), 'engine-test-daemons');
const DAEMONS = ['libvirtd', 'virtlogd'] as const;

export function libvirtdRunning(): Promise<boolean> {
  return sh('virsh', ['-c', 'qemu:///system', 'version']).then(() => true, () => false);
}

export async function ensureLibvirtd(): Promise<void> {
  if (await libvirtdRunning()) return;
  await mkdir(STARTED_DAEMONS_DIR, { recursive: true });
  await sh('virtlogd', ['-d', '-p', join(STARTED_DAEMONS_DIR, 'virtlogd.pid')]).catch(() => undefined);
  await sh('libvirtd', ['-d', '-p', join(STARTED_DAEMONS_DIR, 'libvirtd.pid')]);
  for (let i = 0; i < 100; i += 1) {
    if (await sh('virsh', ['-c', 'qemu:///system', 'version']).then(() => true, () => false)) return;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error('libvirtd did not come up');
}

/** Stops the daemons ensureLibvirtd started (their pid files say which), waiting until they are gone. */
export async function stopStartedDaemons(): Promise<void> {
  for (const daemon of DAEMONS) {
    const pidFile = join(STARTED_DAEMONS_DIR, `${daemon}.pid`);
    const pid = Number((await readFile(pidFile, 'utf8').catch(() => '')).trim());
    if (Number.isInteger(pid) && pid > 1 && (await readFile(`/proc/${pid}/comm`, 'utf8').catch(() => '')).trim() === daemon) {
      process.kill(pid, 'SIGTERM');
      for (let i = 0; i < 100 && (await readFile(`/proc/${pid}/comm`, 'utf8').then(() => true, () => false)); i += 1) {
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    }
    await rm(pidFile, { force: true });
  }
}

/** Defines and starts a TCG domain that sits in SeaBIOS: enough for block jobs, checkpoints, backups. */
export async function startDomain(name: string, disks: { image: string; target: string }[], dir: string): Promise<void> {
  const diskXml = disks
    .map((d) => `<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${d.image}'/><target dev='${d.target}' bus='virtio'/></disk>`)
    .join('');
  const xml = `<domain type='qemu'><name>${name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>${diskXml}<video><model type='none'/></video><memballoon model='none'/></devices></domain>`;
  const path = join(dir, `${name}.xml`);
  await writeFile(path, xml);
  await sh('virsh', ['define', path]);
  await sh('virsh', ['start', name]);
}

export async function destroyDomain(name: string): Promise<void> {
  await sh('virsh', ['destroy', name]).catch(() => undefined);
  for (const checkpoint of (await sh('virsh', ['-q', 'checkpoint-list', name, '--name']).catch(() => '')).split('\n').filter(Boolean)) {
    await sh('virsh', ['checkpoint-delete', name, checkpoint.trim(), '--metadata']).catch(() => undefined);
  }
  await sh('virsh', ['undefine', name, '--checkpoints-metadata']).catch(() => undefined);
}

/** A guest write, from the host, into the running disk (the VM has no OS). */
export async function guestWrite(domain: string, device: string, pattern: number, offset: number, length: number): Promise<void> {
  const out = await sh('virsh', ['qemu-monitor-command', domain, '--hmp', `qemu-io -d /machine/peripheral/${device}/virtio-backend "write -P ${pattern} ${offset} ${length}"`]);
  if (/error|failed/i.test(out)) throw new Error(`guest write failed: ${out}`);
}
