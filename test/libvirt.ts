/** A real libvirtd with TCG domains for the tests (no KVM, no systemd here: the daemons are started by hand). */
import { chmod, chown, mkdir, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { sh } from './helpers.js';

/**
 * Where the daemons the tests start keep their pid files: one place for the whole run, so that the global
 * teardown (test/global-setup.ts) stops exactly what the tests started, and nothing the machine ran before.
 */
export const STARTED_DAEMONS_DIR = join(tmpdir(), 'engine-test-daemons');
const DAEMONS = ['libvirtd', 'virtlogd'] as const;
const VIRTLOGD_SOCKET = '/run/libvirt/virtlogd-sock';

export function libvirtdRunning(): Promise<boolean> {
  return sh('virsh', ['-c', 'qemu:///system', 'version']).then(() => true, () => false);
}

/** /dev/kvm's owner, group and mode before a run changed them (kvmForLibvirt), for the last run to put back. */
const KVM_DEVICE = '/dev/kvm';
const KVM_WAS = join(STARTED_DAEMONS_DIR, 'dev-kvm-was.json');

/**
 * /dev/kvm made the kvm group's (root:kvm 0660, as Debian's udev rule makes it; this machine has no udev and left it
 * root:root 0600). libvirtd asks whether its QEMU user (libvirt-qemu, of group kvm) can open it: capabilities
 * probed with KVM found while that user cannot open it are "KVM was enabled when probing ..., but it is not
 * available now" (its debug log), and libvirtd then probes QEMU again at every look at its capabilities — 13 probes of ~4 s for one
 * `virsh define` here, seconds to a minute for each define, start and backup of the libvirt tests. The domains
 * stay TCG (type 'qemu'). What it was is kept, and the last run puts it back (stopStartedDaemons).
 */
async function kvmForLibvirt(): Promise<void> {
  const device = await stat(KVM_DEVICE).catch(() => undefined);
  if (!device?.isCharacterDevice()) return;
  const kvmGid = Number(/^kvm:[^:]*:(\d+):/m.exec(await readFile('/etc/group', 'utf8').catch(() => ''))?.[1]);
  if (!Number.isInteger(kvmGid) || (device.gid === kvmGid && (device.mode & 0o060) === 0o060)) return;
  // Only the first change is kept: a later run finds the device already changed and returns above.
  await writeFile(KVM_WAS, JSON.stringify({ uid: device.uid, gid: device.gid, mode: device.mode & 0o7777 }), { flag: 'wx' }).catch(() => undefined);
  await chown(KVM_DEVICE, device.uid, kvmGid);
  await chmod(KVM_DEVICE, (device.mode & 0o7777) | 0o060);
}

export async function ensureLibvirtd(): Promise<void> {
  await mkdir(STARTED_DAEMONS_DIR, { recursive: true });
  await kvmForLibvirt();
  // virtlogd on its own: domains do not start without it, and a libvirtd may be running without it.
  if (!(await stat(VIRTLOGD_SOCKET).then((s) => s.isSocket(), () => false))) {
    await sh('virtlogd', ['-d', '-p', join(STARTED_DAEMONS_DIR, 'virtlogd.pid')]).catch(() => undefined);
  }
  if (await libvirtdRunning()) return;
  // Test files run at once (cbt-libvirt, quiesce-libvirt) may both find no daemon and both start one: the second
  // start fails on the pid file the first holds ("Unable to obtain pidfile"), and the daemon that won serves both.
  await sh('libvirtd', ['-d', '-p', join(STARTED_DAEMONS_DIR, 'libvirtd.pid')]).catch((error: Error) => {
    if (!/Unable to obtain pidfile/u.test(error.message)) throw error;
  });
  // 60 s: a daemon starting on a machine under load 20-50 (CI) takes far longer than on a quiet one.
  for (let i = 0; i < 600; i += 1) {
    if (await sh('virsh', ['-c', 'qemu:///system', 'version']).then(() => true, () => false)) return;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error('libvirtd did not come up');
}

/**
 * Test runs alive on this machine (a file per run, named by its pid): several runs may share the daemons
 * (two worktrees tested at once), and the daemons are stopped by the last run to end, never under another.
 */
const RUNS_DIR = join(STARTED_DAEMONS_DIR, 'runs');

async function processAlive(pid: number): Promise<boolean> {
  return readFile(`/proc/${pid}/stat`, 'utf8').then((stat) => !/^\d+ \(.*\) Z /s.test(stat), () => false);
}

/** Registers this test run; the teardown's `leaveRun` says whether it was the last one alive. */
export async function enterRun(): Promise<void> {
  await mkdir(RUNS_DIR, { recursive: true });
  await writeFile(join(RUNS_DIR, String(process.pid)), '');
}

/** Unregisters this test run; true when no other run is alive (stale entries of dead runs are removed). */
export async function leaveRun(): Promise<boolean> {
  await rm(join(RUNS_DIR, String(process.pid)), { force: true });
  let others = 0;
  for (const name of await readdir(RUNS_DIR).catch(() => [] as string[])) {
    const pid = Number(name);
    if (Number.isInteger(pid) && pid > 1 && (await processAlive(pid))) others += 1;
    else await rm(join(RUNS_DIR, name), { force: true });
  }
  return others === 0;
}

/** Stops the daemons ensureLibvirtd started (their pid files say which), waiting until they are gone; /dev/kvm as it was. */
export async function stopStartedDaemons(): Promise<void> {
  const kvmWas = await readFile(KVM_WAS, 'utf8').then((text) => JSON.parse(text) as { uid: number; gid: number; mode: number }, () => undefined);
  if (kvmWas) {
    await chown(KVM_DEVICE, kvmWas.uid, kvmWas.gid).catch(() => undefined);
    await chmod(KVM_DEVICE, kvmWas.mode).catch(() => undefined);
    await rm(KVM_WAS, { force: true });
  }
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

/**
 * Defines and starts a TCG domain that sits in SeaBIOS: enough for block jobs, checkpoints, backups. `devices`: more
 * of them, as XML (cbt-libvirt's VNC display with a password).
 */
export async function startDomain(name: string, disks: { image: string; target: string }[], dir: string, devices = ''): Promise<void> {
  const diskXml = disks
    .map((d) => `<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${d.image}'/><target dev='${d.target}' bus='virtio'/></disk>`)
    .join('');
  const xml = `<domain type='qemu'><name>${name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>${diskXml}${devices}<video><model type='none'/></video><memballoon model='none'/></devices></domain>`;
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
