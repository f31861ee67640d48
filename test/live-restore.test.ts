/**
 * `restore --live` (SPEC 16.4) on the tests' real Linux guest (test/guest/) under a real libvirtd (TCG): the guest
 * backed up with `backup --libvirt`, then live-restored into a new domain that runs on the backup at once while
 * QEMU streams the data into its new qcow2 image; the guest writes files during the stream, and the final disk
 * holds every file of the backup and the guest's writes. Then the faults: the engine killed with -9 during the
 * stream (the guest runs on), then the NBD server killed with no engine running (the guard the engine left,
 * engine/restore/live-guard.ts, stops the streams and exits; the guest reads EIO, never other data), `--resume` (the server started again; QEMU 7.2 does not reconnect to it, so the resume
 * says to shut the domain down, and then hydrates its image without it); the qcow2 form without libvirt against a
 * plain restore, its target's file system full (a clear error, nothing lost, resumed once there is room); and nothing
 * left behind: no server or guard process, socket, journal or domain.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { collectOutput, exitOf, initRepository, parseJson, runEngine, sh, spawnEngine, tempDir, Tmpfs, waitFor } from './helpers.js';
import { destroyDomain, ensureLibvirtd } from './libvirt.js';
import { tinyGuest } from './guest/tiny-guest.js';
import { agentGuestXml } from './guest/libvirt-guest.js';

interface LiveResult {
  backup: string;
  mode: string;
  domain: string | null;
  disks: { name: string; path: string; size: number }[];
  readyMs: number | null;
  hydrationMs: number;
  resumed: boolean;
  serverRestarted: boolean;
}
interface Journal {
  key: string;
  phase: string;
  server: { pid: number } | null;
  guard?: { pid: number } | null;
  disks: { path: string }[];
}

const SOURCE = `engine-live-src-${process.pid}`;
const LIVE = `engine-live-${process.pid}`;
const KILLED = `engine-live-killed-${process.pid}`;
let dir: { path: string; cleanup: () => Promise<void> };
let repo: string;
let runDir: string;
let images: string;
let backupId: string;
/** The backup restored the ordinary way, as a raw file: what every live restore is compared with. */
let plain: string;

const env = (): Record<string, string> => ({ ENGINE_RUN_DIR: runDir });

async function agent<T>(domain: string, command: string, args?: Record<string, unknown>): Promise<T> {
  const json = JSON.stringify(args ? { execute: command, arguments: args } : { execute: command });
  return (JSON.parse(await sh('virsh', ['-q', 'qemu-agent-command', domain, json, '--timeout', '30'])) as { return: T }).return;
}

/** A shell command in the guest (busybox sh, through guest-exec): its exit code and output (stdout and stderr). */
async function guestShell(domain: string, script: string): Promise<{ exitcode: number; stdout: string }> {
  const { pid } = await agent<{ pid: number }>(domain, 'guest-exec', { path: '/bin/sh', arg: ['-c', `${script} 2>&1`], 'capture-output': true });
  for (;;) {
    const status = await agent<{ exited: boolean; exitcode?: number; 'out-data'?: string }>(domain, 'guest-exec-status', { pid });
    if (status.exited) return { exitcode: status.exitcode ?? -1, stdout: Buffer.from(status['out-data'] ?? '', 'base64').toString() };
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

async function waitForAgent(domain: string): Promise<void> {
  await waitFor(`the guest agent of ${domain} to answer`, () => agent(domain, 'guest-ping').then(() => true, () => false), { everyMs: 500 });
}

/** The journals of live restores under way in the test's run folder. */
async function journals(): Promise<Journal[]> {
  const found: Journal[] = [];
  for (const name of await readdir(join(runDir, 'live')).catch(() => [] as string[])) {
    const text = await readFile(join(runDir, 'live', name, 'state.json'), 'utf8').catch(() => undefined);
    if (text !== undefined) found.push(JSON.parse(text) as Journal);
  }
  return found;
}

/** Processes whose command line names the test's run folder (the live restores' servers: their socket is in it). */
async function serversAlive(): Promise<number[]> {
  const pids: number[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const cmdline = await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '');
    if (cmdline.includes('serve-daemon') && cmdline.includes(runDir)) pids.push(Number(name));
  }
  return pids;
}

/** The live restores' guards (engine/restore/live-guard.ts) of this test's domains still running. */
async function guardsAlive(): Promise<number[]> {
  const pids: number[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const args = (await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '')).split('\0');
    if (args.includes('engine-live-guard') && (args.includes(LIVE) || args.includes(KILLED))) pids.push(Number(name));
  }
  return pids;
}

/** The guard's log of the (one) live restore under way. */
async function guardLog(): Promise<string> {
  const [name] = await readdir(join(runDir, 'live'));
  return readFile(join(runDir, 'live', name!, 'guard.log'), 'utf8');
}

async function backingOf(image: string): Promise<string | undefined> {
  return (JSON.parse(await sh('qemu-img', ['info', '-U', '--output=json', image])) as { 'backing-filename'?: string })['backing-filename'];
}

async function shutOff(domain: string): Promise<void> {
  await agent(domain, 'guest-shutdown').catch(() => undefined); // the guest powers off before it answers
  await waitFor(`${domain} to power off`, async () => (await sh('virsh', ['domstate', domain])).trim() === 'shut off', { everyMs: 250 });
}

/** Every file of the root file system (partition 1, from 1 MiB) of a raw disk, dumped into `out` by debugfs. */
async function dumpFiles(raw: string, out: string): Promise<void> {
  const root = `${out}.root`;
  await sh('dd', [`if=${raw}`, `of=${root}`, 'bs=1M', 'skip=1', 'status=none']);
  await sh('mkdir', ['-p', out]);
  await sh('debugfs', ['-R', `rdump / ${out}`, root]);
}

beforeAll(async () => {
  dir = await tempDir('engine-live-');
  await sh('chmod', ['755', dir.path]); // QEMU runs as libvirt-qemu and must reach the images
  runDir = join(dir.path, 'run');
  images = join(dir.path, 'images');
  await sh('mkdir', ['-p', runDir, images]);
  const guest = await tinyGuest();
  await ensureLibvirtd();
  const image = join(dir.path, 'source.qcow2');
  await sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', guest.image, image]);
  await sh('chown', ['libvirt-qemu:kvm', image]).catch(() => undefined);
  const xml = join(dir.path, `${SOURCE}.xml`);
  await writeFile(xml, agentGuestXml({ name: SOURCE, image, agentPort: guest.agentPort }));
  await sh('virsh', ['define', xml]);
  await sh('virsh', ['start', SOURCE]);
  await waitForAgent(SOURCE);
  // And random bytes past the file system's end (116–124 MiB), read in the second test while they are not hydrated:
  // data that zeros are not.
  const seeded = await guestShell(SOURCE, 'echo in-the-backup > /data/before && dd if=/dev/urandom of=/dev/vda bs=1M seek=116 count=8 conv=fsync');
  expect(seeded.exitcode, seeded.stdout).toBe(0);
  repo = join(dir.path, 'repo');
  await initRepository(repo);
  const backup = await runEngine(['backup', '--repo', repo, '--libvirt', SOURCE, '--quiesce', '--json']);
  expect(backup.code, backup.stderr).toBe(0);
  backupId = parseJson<{ id: string }>(backup.stdout).id;
  await destroyDomain(SOURCE);
  plain = join(dir.path, 'plain.raw');
  const restored = await runEngine(['restore', '--repo', repo, backupId, '--to', plain]);
  expect(restored.code, restored.stderr).toBe(0);
}, 600_000);

afterAll(async () => {
  for (const domain of [SOURCE, LIVE, KILLED]) await destroyDomain(domain);
  for (const pid of [...(await guardsAlive()), ...(await serversAlive())]) process.kill(pid, 'SIGKILL');
  await dir?.cleanup();
}, 120_000);

describe('restore --live', () => {
  test('into a new domain: it runs on the backup at once, the guest writes during the stream, the final disk is the backup and the writes', async () => {
    // 1 KiB/s: QEMU's stream copies its first chunk, then waits (it paces what it copied), while the guest writes.
    const child = spawnEngine(['restore', '--repo', repo, backupId, '--live', '--libvirt', LIVE, '--to', images, '--bandwidth', '1K', '--json'], env());
    const output = collectOutput(child);
    await waitFor('the stream to start', async () => (await journals()).some((j) => j.phase === 'streaming'), { child, output: output.stderr });
    await waitForAgent(LIVE);
    // The guest's writes, while the image still reads from the backup: files, and raw bytes past the file system's end.
    const writes = await guestShell(
      LIVE,
      'dd if=/dev/urandom of=/data/during bs=64k count=32 && cp /boot/vmlinuz /data/kernel-copy && echo appended >> /data/before && ' +
        'dd if=/dev/urandom of=/dev/vda bs=64k seek=2040 count=8 conv=fsync && sync && md5sum /data/during /data/kernel-copy /data/before && dd if=/dev/vda bs=64k skip=2040 count=8 | md5sum',
    );
    expect(writes.exitcode, writes.stdout).toBe(0);
    const image = join(images, `${LIVE}-vda.qcow2`);
    expect(await backingOf(image)).toMatch(/^nbd\+unix:\/\/\/vda\?socket=/); // still hydrating when the writes landed
    // SIGINT: the engine stops within a second; the guest, the stream and the server go on.
    const [journal] = await journals();
    child.kill('SIGINT');
    const { code } = await exitOf(child);
    expect(code, output.stderr()).toBe(130);
    expect(parseJson<{ error: { code: string; message: string } }>(output.stdout()).error).toMatchObject({ code: 'ENGINE_INTERRUPTED', message: expect.stringContaining(`engine restore --live --resume --libvirt ${LIVE}`) });
    expect((await sh('virsh', ['domstate', LIVE])).trim()).toBe('running');
    expect(await serversAlive()).toEqual([journal!.server!.pid]);
    expect(await guardsAlive()).toEqual([journal!.guard!.pid]);
    // The resume lifts the pace (none given) and waits for the stream's end.
    const resumed = await runEngine(['restore', '--live', '--resume', '--libvirt', LIVE, '--json'], { env: env() });
    expect(resumed.code, resumed.stderr).toBe(0);
    const result = parseJson<LiveResult>(resumed.stdout);
    expect(result).toMatchObject({ backup: backupId, mode: 'libvirt', domain: LIVE, disks: [{ name: 'vda', path: image, size: 128 * 1024 * 1024 }], resumed: true, serverRestarted: false });
    expect(await backingOf(image)).toBeUndefined();
    expect(await serversAlive()).toEqual([]);
    expect(await guardsAlive()).toEqual([]);
    expect(await journals()).toEqual([]);
    // The guest reads back what it wrote, from its own image now (page cache dropped).
    const sums = writes.stdout.split('\n').filter((l) => /^[0-9a-f]{32}/.test(l));
    expect(sums).toHaveLength(4);
    const reread = await guestShell(LIVE, 'sync && echo 3 > /proc/sys/vm/drop_caches && md5sum /data/during /data/kernel-copy /data/before && dd if=/dev/vda bs=64k skip=2040 count=8 | md5sum');
    expect(reread.stdout.split('\n').filter((l) => /^[0-9a-f]{32}/.test(l))).toEqual(sums);
    await shutOff(LIVE);

    // The final disk: every file of the backup unchanged but /data/before (appended to), the new files, the raw bytes.
    const final = join(dir.path, 'final.raw');
    await sh('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, final]);
    await dumpFiles(plain, join(dir.path, 'files-backup'));
    await dumpFiles(final, join(dir.path, 'files-final'));
    // diff exits 1 when the trees differ, which they must.
    const diff = await sh('sh', ['-c', `diff -rq ${join(dir.path, 'files-backup')} ${join(dir.path, 'files-final')}; true`]);
    const differences = diff.split('\n').filter((l) => /^(Only in|Files)/.test(l)).map((l) => l.replaceAll(dir.path, '')).sort();
    expect(differences).toEqual(['Files /files-backup/data/before and /files-final/data/before differ', 'Only in /files-final/data: during', 'Only in /files-final/data: kernel-copy'].sort());
    expect(await readFile(join(dir.path, 'files-final/data/before'), 'utf8')).toBe('in-the-backup\nappended\n');
    expect(await readFile(join(dir.path, 'files-final/data/kernel-copy'))).toEqual(await readFile(join(dir.path, 'files-backup/boot/vmlinuz')));
    // Outside the file system: the MBR and boot code as backed up, the guest's raw write where it went.
    await sh('cmp', ['-n', String(1024 * 1024), plain, final]);
    const raw = await sh('sh', ['-c', `dd if=${final} bs=64k skip=2040 count=8 status=none | md5sum`]);
    expect(raw.split(' ')[0]).toBe(sums[3]!.split(' ')[0]);
    await destroyDomain(LIVE);
  }, 600_000);

  test('the engine killed with -9 during the stream: the guest runs on; the server killed: the guest reads EIO; --resume finishes', async () => {
    // 1 KiB/s: the stream stays near the disk's start (see above) while the faults come.
    const child = spawnEngine(['restore', '--repo', repo, backupId, '--live', '--libvirt', KILLED, '--to', images, '--bandwidth', '1K', '--json'], env());
    const output = collectOutput(child);
    await waitFor('the stream to start', async () => (await journals()).some((j) => j.phase === 'streaming'), { child, output: output.stderr });
    child.kill('SIGKILL');
    await exitOf(child);
    await waitForAgent(KILLED);
    expect((await sh('virsh', ['domstate', KILLED])).trim()).toBe('running');
    const [journal] = await journals();
    expect(await serversAlive()).toEqual([journal!.server!.pid]);
    // The end of the disk (past the file system) is not hydrated: reads of it go to the server. Each region is read
    // once, the guest's page cache dropped and O_DIRECT: what the guest gets comes through QEMU, never a cache.
    const read = (mib: number): string => `sync && echo 3 > /proc/sys/vm/drop_caches && dd if=/dev/vda bs=1M skip=${mib} count=4 iflag=direct | md5sum`;
    const expected = async (mib: number): Promise<string> => (await sh('sh', ['-c', `dd if=${plain} bs=1M skip=${mib} count=4 status=none | md5sum`])).split(' ')[0]!;
    const first = await guestShell(KILLED, read(116));
    expect(first.stdout.split(' ')[0]).toBe(await expected(116));

    // The server killed with no engine running: the guard the killed engine left aborts the streams (QEMU 7.2's
    // copy-on-read filter of a stream would give the guest zeros), then exits; the guest reads EIO, never other data.
    expect(await guardsAlive()).toEqual([journal!.guard!.pid]);
    const killedAt = new Date();
    process.kill(journal!.server!.pid, 'SIGKILL');
    await waitFor('the guard to stop the streams and exit', async () => (await guardsAlive()).length === 0, { everyMs: 50 });
    const log = await guardLog();
    expect(log).toContain(`server ${journal!.server!.pid} gone: aborting the streams of vda`);
    expect(log).toMatch(/streams stopped \d+ ms after the server was seen gone .*: vda aborted\n$/);
    // What the guard says of its timing, for the record (not asserted: timings are no test's business).
    console.info(`server killed at ${killedAt.toISOString()}; the guard's log:\n${log}`);
    expect(await sh('virsh', ['-q', 'blockjob', KILLED, 'vda', '--raw'])).not.toMatch(/cur=/);
    expect(await serversAlive()).toEqual([]);
    const failed = await guestShell(KILLED, 'sync && echo 3 > /proc/sys/vm/drop_caches && dd if=/dev/vda of=/dev/null bs=1M skip=120 count=4 iflag=direct');
    expect(failed.exitcode).not.toBe(0);
    expect(failed.stdout).toContain('Input/output error');
    expect((await sh('virsh', ['domstate', KILLED])).trim()).toBe('running');

    // QEMU 7.2 does not reconnect to a server started again (libvirt gives a backing file no reconnect delay): a
    // resume with the domain running restarts the server, and QEMU's stream fails; it says to shut the domain down.
    const refused = await runEngine(['restore', '--live', '--resume', '--libvirt', KILLED], { env: env() });
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain('shut the domain down');
    // Shut down (the guest's writes are in the image): the resume hydrates the image without it.
    await sh('virsh', ['destroy', KILLED]);
    const resumed = await runEngine(['restore', '--live', '--resume', '--libvirt', KILLED, '--json'], { env: env() });
    expect(resumed.code, resumed.stderr).toBe(0);
    expect(parseJson<LiveResult>(resumed.stdout)).toMatchObject({ backup: backupId, domain: KILLED, resumed: true, readyMs: null });
    const image = join(images, `${KILLED}-vda.qcow2`);
    expect(await backingOf(image)).toBeUndefined();
    // The bytes the guest could not read are the backup's in the image now.
    const final = join(dir.path, 'killed.raw');
    await sh('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, final]);
    expect(await expected(120)).not.toBe('b5cfa9d6c8febd618f91ac2843d50a1c'); // 4 MiB of zeros: the backup has data there
    expect((await sh('sh', ['-c', `dd if=${final} bs=1M skip=120 count=4 status=none | md5sum`])).split(' ')[0]).toBe(await expected(120));
    expect(await serversAlive()).toEqual([]);
    expect(await guardsAlive()).toEqual([]);
    expect(await journals()).toEqual([]);
    await destroyDomain(KILLED);
    expect(await sh('virsh', ['list', '--all', '--name'])).not.toContain('engine-live-');
  }, 600_000);

  test('the qcow2 form without libvirt equals a plain restore; a full target fails clearly, loses nothing, and resumes', async () => {
    const target = join(dir.path, 'live.qcow2');
    const live = await runEngine(['restore', '--repo', repo, backupId, '--live', '--to', target, '--json'], { env: env() });
    expect(live.code, live.stderr).toBe(0);
    expect(parseJson<LiveResult>(live.stdout)).toMatchObject({ mode: 'qcow2', domain: null, disks: [{ name: 'vda', path: target }], resumed: false });
    expect(await backingOf(target)).toBeUndefined();
    await sh('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', target, plain]);

    // 8 MiB free for ~31 MiB of data (the guest's ~23 and the 8 MiB of random bytes of beforeAll): qemu-img rebase fails on ENOSPC.
    const small = await Tmpfs.mount(join(dir.path, 'small'), 48);
    try {
      await small.fill(8 * 1024 * 1024);
      const full = join(small.path, 'full.qcow2');
      const failed = await runEngine(['restore', '--repo', repo, backupId, '--live', '--to', full, '--json'], { env: env() });
      expect(failed.code).not.toBe(0);
      const error = parseJson<{ error: { code: string; message: string } }>(failed.stdout).error;
      expect(error.code).toBe('ENGINE_TARGET_UNWRITABLE');
      expect(error.message).toContain('ENOSPC');
      expect(error.message).toContain(`engine restore --live --resume --to ${full}`);
      // Nothing lost: the image keeps its backing link; the journal waits; the server is stopped (nothing reads it).
      expect(await backingOf(full)).toMatch(/^nbd\+unix:/);
      expect((await journals()).map((j) => j.key).filter((k) => k.startsWith('qcow2:'))).toEqual([`qcow2:${full}`]);
      expect(await serversAlive()).toEqual([]);
      await small.unfill();
      const resumed = await runEngine(['restore', '--live', '--resume', '--to', full, '--json'], { env: env() });
      expect(resumed.code, resumed.stderr).toBe(0);
      expect(parseJson<LiveResult>(resumed.stdout)).toMatchObject({ resumed: true, serverRestarted: true });
      await sh('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', full, plain]);
    } finally {
      await small.unmount();
    }
    expect(await serversAlive()).toEqual([]);
    expect(await journals()).toEqual([]);
    expect(await readdir(join(runDir, 'live'))).toEqual([]);
  }, 600_000);
});
