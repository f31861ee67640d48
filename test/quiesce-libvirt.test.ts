/**
 * `backup --libvirt DOMAIN --quiesce` on the tests' real Linux guest (test/guest/) under a real libvirtd (TCG): the
 * guest's file systems frozen by its QEMU guest agent while backup-begin takes its point in time and thawed after
 * (the agent's own fsfreeze status, looked at with the engine stopped at its points), the restored file system
 * clean without a journal replay and holding the guest's files, the record's consistency; then the faults: the
 * engine killed with -9 while the guest is frozen (the watchdog thaws it), a failing and a hanging hook, an agent
 * that never answers, a domain without an agent channel. One guest domain serves every case, in order; the guest
 * itself is proven first (it boots from its own disk, its agent answers, freezes and thaws) and last (it powers off
 * by its agent, its disk clean and holding what it wrote).
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { createConnection, type Socket } from 'node:net';
import { join } from 'node:path';
import { collectOutput, exitOf, initRepository, parseJson, runEngine, sh, spawnEngine, stoppedItself, tempDir, waitFor } from './helpers.js';
import { destroyDomain, ensureLibvirtd, startDomain } from './libvirt.js';
import { tinyGuest } from './guest/tiny-guest.js';
import { agentGuestXml } from './guest/libvirt-guest.js';
import { qcow2 } from './qemu.js';

interface Consistency {
  level: string;
  method: string;
  freezeMs: number | null;
  reason: string | null;
}
interface BackupOut {
  id: string;
  type: string;
  consistency: Consistency;
}

const DOMAIN = `engine-quiesce-${process.pid}`;
/** A domain with no guest agent channel at all (SeaBIOS only). */
const BARE = `engine-quiesce-bare-${process.pid}`;
/**
 * A virtio-serial port of the guest's own, besides its agent's: the host's way to wake a script in the guest while
 * the agent is stopped or gone (a test then waits for its own event, not for a guess of how long the engine takes).
 */
const RESUME_PORT = 'org.engine.test.resume';
/**
 * In the guest: waits until the host writes "x" on the resume port. The host stays connected to it (resumePort), so
 * the read blocks on one open of the port: a port opened and closed again and again would be an event for libvirt
 * each time, which waits for the domain's job (a backup's) and holds up the agent's own events behind it. (A read
 * while the host is not connected is empty at once: then it is tried again.)
 */
const AWAIT_RESUME = `until [ "$(head -c1 /dev/virtio-ports/${RESUME_PORT} 2>/dev/null)" = x ]; do sleep 0.2; done`;
let dir: { path: string; cleanup: () => Promise<void> };
let repo: string;
/** The host's end of the guest's resume port, connected for the whole file. */
let resumePort: Socket | undefined;

/** One guest agent command through libvirt, its `return`. */
async function agent<T>(domain: string, command: string, args?: Record<string, unknown>): Promise<T> {
  const json = JSON.stringify(args ? { execute: command, arguments: args } : { execute: command });
  return (JSON.parse(await sh('virsh', ['-q', 'qemu-agent-command', domain, json, '--timeout', '10'])) as { return: T }).return;
}

/** A shell command in the guest (busybox sh, through guest-exec): its exit code and output. */
async function guestShell(script: string): Promise<{ exitcode: number; stdout: string }> {
  const { pid } = await agent<{ pid: number }>(DOMAIN, 'guest-exec', { path: '/bin/sh', arg: ['-c', script], 'capture-output': true });
  for (;;) {
    const status = await agent<{ exited: boolean; exitcode?: number; 'out-data'?: string }>(DOMAIN, 'guest-exec-status', { pid });
    if (status.exited) return { exitcode: status.exitcode ?? -1, stdout: Buffer.from(status['out-data'] ?? '', 'base64').toString() };
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** Connects to the guest's resume port (its Unix socket, which libvirt made and names in the live XML). */
async function connectResumePort(): Promise<Socket> {
  const path = new RegExp(`<source mode='bind' path='([^']*/${RESUME_PORT.replace(/\./g, '\\.')})'`).exec(await sh('virsh', ['dumpxml', DOMAIN]))![1]!;
  const socket = await new Promise<Socket>((resolve, reject) => {
    const connecting = createConnection(path, () => resolve(connecting));
    connecting.once('error', reject);
  });
  // QEMU ends the connection when the guest powers off (the last case): not this file's failure.
  socket.on('error', () => undefined);
  return socket;
}

/** Wakes the guest's script that waits on the resume port (AWAIT_RESUME). */
function resume(): void {
  resumePort!.write('x');
}

function freezeStatus(): Promise<string> {
  return agent<string>(DOMAIN, 'guest-fsfreeze-status');
}

async function checkpoints(domain: string): Promise<string[]> {
  return (await sh('virsh', ['-q', 'checkpoint-list', domain, '--name'])).split('\n').map((l) => l.trim()).filter(Boolean).sort();
}

/** The engine's thaw watchdogs for `domain` alive on this machine (their command line names the domain). */
async function watchdogs(domain: string): Promise<number[]> {
  const found: number[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const args = (await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '')).split('\0');
    if (args.includes('engine-thaw-watchdog') && args.includes(domain)) found.push(Number(name));
  }
  return found;
}

async function backup(args: string[], env: Record<string, string> = {}): Promise<{ code: number; out: BackupOut | undefined; error: { code: string; message: string } | undefined; stderr: string }> {
  const result = await runEngine(['backup', '--repo', repo, '--json', ...args], { env: { ...env, ...engineEnv() } });
  const parsed = result.stdout.trim() ? parseJson<BackupOut & { error?: { code: string; message: string } }>(result.stdout) : undefined;
  return { code: result.code, out: parsed?.error ? undefined : parsed, error: parsed?.error, stderr: result.stderr };
}

/**
 * The engine's libvirt job directories in the test's own folder: an engine killed with -9 leaves its own behind
 * (what a dead run left is not cleaned up by the next one), and the folder goes with the test. The thaw watchdog
 * retries from 100 ms on (ENGINE_TEST_THAW_RETRY_MS; 1 s, doubling up to 30 s, by default): a case that waits
 * for it to thaw a guest whose agent answers again waits for that, not for its back-off.
 */
function engineEnv(): Record<string, string> {
  return { TMPDIR: dir.path, ENGINE_TEST_THAW_RETRY_MS: '100' };
}

/** The backup restored to a raw file, its root partition (from 1 MiB, test/guest/build-tiny-guest.sh) apart. */
async function restoredRoot(id: string, tag: string): Promise<string> {
  const disk = join(dir.path, `${tag}.raw`);
  const restore = await runEngine(['restore', '--repo', repo, id, '--to', disk]);
  expect(restore.code, restore.stderr).toBe(0);
  const root = join(dir.path, `${tag}.root`);
  await sh('dd', [`if=${disk}`, `of=${root}`, 'bs=1M', 'skip=1', 'status=none']);
  return root;
}

async function features(root: string): Promise<string[]> {
  const header = await sh('dumpe2fs', ['-h', root]);
  return /^Filesystem features:\s+(.*)$/m.exec(header)![1]!.trim().split(/\s+/);
}

beforeAll(async () => {
  dir = await tempDir('engine-quiesce-');
  await sh('chmod', ['755', dir.path]); // qemu runs as libvirt-qemu and must reach the images
  const guest = await tinyGuest();
  await ensureLibvirtd();
  const image = join(dir.path, 'guest.qcow2');
  await sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', guest.image, image]);
  await sh('chown', ['libvirt-qemu:kvm', image]).catch(() => undefined);
  const xml = join(dir.path, `${DOMAIN}.xml`);
  await writeFile(xml, agentGuestXml({ name: DOMAIN, image, agentPort: guest.agentPort, consoleLog: join(dir.path, 'console.log'), ports: [RESUME_PORT] }));
  await sh('virsh', ['define', xml]);
  await sh('virsh', ['start', DOMAIN]);
  await waitFor('the guest agent to answer', () => agent(DOMAIN, 'guest-ping').then(() => true, () => false), { everyMs: 500 });
  resumePort = await connectResumePort();
  const bare = join(dir.path, 'bare.qcow2');
  await qcow2(bare, '16M');
  await sh('chown', ['libvirt-qemu:kvm', bare]).catch(() => undefined);
  await startDomain(BARE, [{ image: bare, target: 'vda' }], dir.path);
  repo = join(dir.path, 'repo');
  await initRepository(repo);
}, 600_000);

afterAll(async () => {
  resumePort?.destroy();
  await destroyDomain(DOMAIN);
  await destroyDomain(BARE);
  for (const pid of [...(await watchdogs(DOMAIN)), ...(await watchdogs(BARE))]) process.kill(pid, 'SIGKILL');
  await dir?.cleanup();
}, 120_000);

describe('backup --libvirt --quiesce on a real guest', () => {
  test('the guest boots from its own disk, answers through its agent, freezes and thaws its root file system', async () => {
    expect(await agent(DOMAIN, 'guest-ping')).toEqual({});
    const filesystems = await agent<{ mountpoint: string; type: string; name: string }[]>(DOMAIN, 'guest-get-fsinfo');
    expect(filesystems.map((f) => [f.mountpoint, f.type, f.name])).toEqual([['/', 'ext4', 'vda1']]);
    expect(await agent(DOMAIN, 'guest-fsfreeze-freeze')).toBe(1);
    expect(await freezeStatus()).toBe('frozen');
    expect(await agent(DOMAIN, 'guest-fsfreeze-thaw')).toBe(1);
    expect(await freezeStatus()).toBe('thawed');
  });

  test('the guest is frozen while backup-begin takes the checkpoint, thawed after; the restore is clean and holds its files', async () => {
    await guestShell('echo written-before-the-backup > /data/unsynced'); // no sync: the freeze flushes it
    const hooks = join(dir.path, 'hooks.log');
    const status = `virsh -q qemu-agent-command "$ENGINE_DOMAIN" '{"execute":"guest-fsfreeze-status"}'`;
    const before = await checkpoints(DOMAIN);
    const child = spawnEngine(
      [
        'backup', '--repo', repo, '--libvirt', DOMAIN, '--json', '--quiesce', '--freeze-timeout', '300',
        '--pre-freeze', 'echo pre > /data/pre-freeze-ran',
        '--post-thaw', 'echo post > /data/post-thaw-ran',
        '--pre-freeze-host', `echo "$ENGINE_HOOK $ENGINE_DOMAIN $(${status})" >> ${hooks}`,
        '--post-thaw-host', `echo "$ENGINE_HOOK $ENGINE_DOMAIN $(${status})" >> ${hooks}`,
      ],
      { ENGINE_STOP_AT: 'guest-frozen,guest-checkpoint-taken', ...engineEnv() },
    );
    const output = collectOutput(child);
    await stoppedItself(child);
    // Frozen, before backup-begin: no checkpoint yet.
    expect(await freezeStatus()).toBe('frozen');
    expect(await checkpoints(DOMAIN)).toEqual(before);
    expect(await watchdogs(DOMAIN)).toHaveLength(1);
    child.kill('SIGCONT');
    await waitFor('the engine to run on', async () => !(await readFile(`/proc/${child.pid}/stat`, 'utf8')).split(') ')[1]!.startsWith('T'));
    await stoppedItself(child);
    // backup-begin returned: its checkpoint exists, and the guest is still frozen.
    expect(await freezeStatus()).toBe('frozen');
    expect((await checkpoints(DOMAIN)).filter((c) => !before.includes(c))).toHaveLength(1);
    child.kill('SIGCONT');
    expect((await exitOf(child)).code, output.stderr()).toBe(0);
    expect(await freezeStatus()).toBe('thawed');
    expect(await watchdogs(DOMAIN)).toEqual([]);
    const result = parseJson<BackupOut>(output.stdout());
    expect(result.consistency).toEqual({ level: 'application', method: 'qemu-guest-agent fsfreeze with pre-freeze hooks', freezeMs: expect.any(Number), reason: null });
    expect(Number.isInteger(result.consistency.freezeMs)).toBe(true);
    // The host's hooks ran before the freeze and after the thaw, with the domain named; the guest's post-thaw hook ran.
    expect((await readFile(hooks, 'utf8')).split('\n').filter(Boolean)).toEqual([`pre-freeze ${DOMAIN} {"return":"thawed"}`, `post-thaw ${DOMAIN} {"return":"thawed"}`]);
    expect(await guestShell('cat /data/post-thaw-ran')).toEqual({ exitcode: 0, stdout: 'post\n' });

    // The restored root file system: frozen clean (no journal to replay), with the unsynced file and the pre-freeze hook's.
    const root = await restoredRoot(result.id, 'quiesced');
    expect(await features(root)).not.toContain('needs_recovery');
    await sh('e2fsck', ['-n', '-f', root]);
    expect(await sh('debugfs', ['-R', 'cat /data/unsynced', root])).toBe('written-before-the-backup\n');
    expect(await sh('debugfs', ['-R', 'cat /data/pre-freeze-ran', root])).toBe('pre\n');
    expect(await sh('debugfs', ['-R', 'ls /data', root])).not.toContain('post-thaw-ran');

    // list and show say it.
    const list = await runEngine(['list', '--repo', repo]);
    expect(list.stdout).toMatch(/CONSISTENCY/);
    expect(list.stdout.split('\n').find((l) => l.startsWith(result.id.slice(0, 12)))).toContain('application');
    const show = await runEngine(['show', '--repo', repo, result.id]);
    expect(show.stdout).toContain(`consistency: application (qemu-guest-agent fsfreeze with pre-freeze hooks, frozen ${result.consistency.freezeMs} ms)`);
  }, 600_000);

  test('without --quiesce the backup is crash-consistent and says so; its restore needs a journal replay', async () => {
    const { code, out, stderr } = await backup(['--libvirt', DOMAIN]);
    expect(code, stderr).toBe(0);
    expect(out!.consistency).toEqual({ level: 'crash', method: 'no quiesce asked', freezeMs: null, reason: null });
    // The same file system taken mounted and unfrozen: its journal is marked for recovery (what the freeze avoids).
    expect(await features(await restoredRoot(out!.id, 'crash'))).toContain('needs_recovery');
  }, 600_000);

  test('the engine killed with -9 while the guest is frozen: the watchdog thaws the guest at the freeze timeout', async () => {
    const before = await checkpoints(DOMAIN);
    // 8 s: the test sees the guest frozen after the engine died, before the watchdog's deadline.
    const { code } = await backup(['--libvirt', DOMAIN, '--quiesce', '--freeze-timeout', '8'], { ENGINE_CRASH_AT: 'guest-frozen' });
    expect(code).toBe(137);
    expect(await freezeStatus()).toBe('frozen');
    await waitFor('the watchdog to thaw the guest', async () => (await freezeStatus()) === 'thawed', { everyMs: 500 });
    await waitFor('the watchdog to exit', async () => (await watchdogs(DOMAIN)).length === 0, { everyMs: 200 });
    expect(await checkpoints(DOMAIN)).toEqual(before);
    // And the guest is usable: it writes again.
    expect(await guestShell('echo after-the-kill > /data/after && cat /data/after')).toEqual({ exitcode: 0, stdout: 'after-the-kill\n' });
  }, 600_000);

  test('an engine that stalls past the freeze timeout: the watchdog thaws, and the backup is not taken for quiesced', async () => {
    const before = await checkpoints(DOMAIN);
    for (const mode of ['required', 'try']) {
      const child = spawnEngine(['backup', '--repo', repo, '--libvirt', DOMAIN, '--json', `--quiesce=${mode}`, '--freeze-timeout', '3'], { ENGINE_STOP_AT: 'guest-frozen', ...engineEnv() });
      const output = collectOutput(child);
      await stoppedItself(child);
      await waitFor('the watchdog to thaw the guest', async () => (await freezeStatus()) === 'thawed', { everyMs: 500 });
      child.kill('SIGCONT');
      const { code } = await exitOf(child);
      const out = parseJson<BackupOut & { error?: { code: string; message: string } }>(output.stdout());
      const why = /backup-begin returned \d+ ms after the freeze, past the freeze timeout \(3000 ms\); the guest was no longer frozen when the engine thawed it: the guest may have been thawed before the checkpoint/;
      if (mode === 'required') {
        expect(code).toBe(1);
        expect(out.error).toMatchObject({ code: 'ENGINE_QUIESCE_FAILED', message: expect.stringMatching(why) });
        // The checkpoint backup-begin made is deleted with the failed backup.
        expect(await checkpoints(DOMAIN)).toEqual(before);
      } else {
        expect(code, output.stderr()).toBe(0);
        expect(out.consistency).toMatchObject({ level: 'crash', method: 'qemu-guest-agent fsfreeze tried', freezeMs: null, reason: expect.stringMatching(why) });
      }
      expect(await freezeStatus()).toBe('thawed');
      expect(await watchdogs(DOMAIN)).toEqual([]);
    }
  }, 600_000);

  test('a freeze that lands after the engine gave up on it: the watchdog thaws until the agent says thawed, then exits', async () => {
    // The freeze held back: the guest's writes throttled on the host (256 KiB/s) behind 16 MiB of dirty pages,
    // which FIFREEZE writes out first (~64 s); libvirt stops waiting for the agent after 2 s. The freeze so lands
    // after the engine's freeze failed, its thaw-once failed (the agent busy) and the backup went on: when the
    // test lifts the throttle.
    await sh('virsh', ['guest-agent-timeout', DOMAIN, '--timeout', '2']);
    await sh('virsh', ['blkdeviotune', DOMAIN, 'vda', '--live', '--total-bytes-sec', String(256 * 1024)]);
    try {
      expect(await guestShell('dd if=/dev/zero of=/data/dirty bs=1M count=16 >/dev/null 2>&1; echo done')).toEqual({ exitcode: 0, stdout: 'done\n' });
      const tried = await backup(['--libvirt', DOMAIN, '--quiesce=try', '--freeze-timeout', '1']);
      expect(tried.code, tried.stderr).toBe(0);
      expect(tried.out!.consistency).toMatchObject({ level: 'crash', method: 'qemu-guest-agent fsfreeze tried', freezeMs: null, reason: expect.stringMatching(/^the guest agent's freeze (failed|did not end)/) });
      expect(await watchdogs(DOMAIN)).toHaveLength(1);
      // The throttle lifted: the dirty pages go out, and the freeze lands now, after the backup.
      await sh('virsh', ['blkdeviotune', DOMAIN, 'vda', '--live', '--total-bytes-sec', '0']);
      await waitFor('the watchdog to exit', async () => (await watchdogs(DOMAIN)).length === 0, { everyMs: 200 });
      expect(await freezeStatus()).toBe('thawed');
      expect(await guestShell('rm /data/dirty && echo writable > /data/after-late && cat /data/after-late')).toEqual({ exitcode: 0, stdout: 'writable\n' });
    } finally {
      await sh('virsh', ['blkdeviotune', DOMAIN, 'vda', '--live', '--total-bytes-sec', '0']);
      await sh('virsh', ['guest-agent-timeout', DOMAIN, '--timeout', '-1']);
    }
  }, 600_000);

  test('a failing pre-freeze hook: required fails with its output and leaves no checkpoint; try backs up crash-consistent and says why', async () => {
    const before = await checkpoints(DOMAIN);
    const failing = ['--pre-freeze', 'echo database-not-ready; exit 3', '--post-thaw', 'echo post > /data/post-after-failure'];
    const required = await backup(['--libvirt', DOMAIN, '--quiesce=required', ...failing]);
    expect(required.code).toBe(1);
    expect(required.error!.code).toBe('ENGINE_QUIESCE_FAILED');
    expect(required.error!.message).toBe(`cannot quiesce domain ${DOMAIN}: the pre-freeze hook in the guest failed (exit status 3): database-not-ready`);
    expect(await checkpoints(DOMAIN)).toEqual(before);
    const tried = await backup(['--libvirt', DOMAIN, '--quiesce=try', ...failing]);
    expect(tried.code, tried.stderr).toBe(0);
    expect(tried.out!.consistency).toEqual({ level: 'crash', method: 'qemu-guest-agent fsfreeze tried', freezeMs: null, reason: 'the pre-freeze hook in the guest failed (exit status 3): database-not-ready' });
    // Never frozen: the post-thaw hook did not run.
    expect((await guestShell('ls /data')).stdout).not.toContain('post-after-failure');
    expect(await freezeStatus()).toBe('thawed');
    // A failing hook on the host likewise.
    const host = await backup(['--libvirt', DOMAIN, '--quiesce', '--pre-freeze-host', 'echo no-space-for-the-dump >&2; exit 4']);
    expect(host.error).toMatchObject({ code: 'ENGINE_QUIESCE_FAILED', message: `cannot quiesce domain ${DOMAIN}: the pre-freeze hook on this host failed (exit status 4): no-space-for-the-dump` });
  }, 600_000);

  test('a hanging pre-freeze hook is killed at the hook timeout; the guest is never frozen', async () => {
    const tried = await backup(['--libvirt', DOMAIN, '--quiesce=try', '--hook-timeout', '2', '--pre-freeze', 'sleep 987']);
    expect(tried.code, tried.stderr).toBe(0);
    expect(tried.out!.consistency).toMatchObject({ level: 'crash', freezeMs: null, reason: 'the pre-freeze hook in the guest did not end within 2 s (killed)' });
    expect(await freezeStatus()).toBe('thawed');
    await waitFor('the hook to be gone', async () => !(await guestShell('ps -o args')).stdout.includes('sleep 987'), { everyMs: 200 });
    const host = await backup(['--libvirt', DOMAIN, '--quiesce', '--hook-timeout', '1', '--pre-freeze-host', 'sleep 5']);
    expect(host.error).toMatchObject({ code: 'ENGINE_QUIESCE_FAILED', message: `cannot quiesce domain ${DOMAIN}: the pre-freeze hook on this host did not end within 1 s` });
  }, 600_000);

  test('an agent that never answers: required fails, try backs up crash-consistent; the guest is not left frozen', async () => {
    const before = await checkpoints(DOMAIN);
    // The agent stopped (its channel open, nothing answering) until the host says resume, by a process of its own that
    // outlives the command. Started without waiting for its end (the agent could not say it); a second's delay lets
    // guest-exec answer first.
    await agent(DOMAIN, 'guest-exec', { path: '/bin/sh', arg: ['-c', `(sleep 1; a=$(pidof qemu-ga); kill -STOP $a; ${AWAIT_RESUME}; kill -CONT $a) >/dev/null 2>&1 </dev/null &`] });
    await waitFor('the agent to stop answering', () => sh('virsh', ['-q', 'qemu-agent-command', DOMAIN, '{"execute":"guest-ping"}', '--timeout', '2']).then(() => false, () => true), { everyMs: 200 });
    const required = await backup(['--libvirt', DOMAIN, '--quiesce', '--freeze-timeout', '5']);
    expect(required.code).toBe(1);
    expect(required.error!.code).toBe('ENGINE_QUIESCE_FAILED');
    expect(required.error!.message).toMatch(/the guest agent's freeze failed: .*(not responding|not available)/);
    expect(await checkpoints(DOMAIN)).toEqual(before);
    const tried = await backup(['--libvirt', DOMAIN, '--quiesce=try', '--freeze-timeout', '5']);
    expect(tried.code, tried.stderr).toBe(0);
    expect(tried.out!.consistency).toMatchObject({ level: 'crash', method: 'qemu-guest-agent fsfreeze tried', freezeMs: null, reason: expect.stringMatching(/freeze failed: .*(not responding|not available)/) });
    // Once the agent answers again, the guest is thawed (the freeze never reached it), and no watchdog is left.
    resume();
    await waitFor('the agent to answer again', () => agent(DOMAIN, 'guest-ping').then(() => true, () => false), { everyMs: 200 });
    expect(await freezeStatus()).toBe('thawed');
    await waitFor('the watchdogs to exit', async () => (await watchdogs(DOMAIN)).length === 0, { everyMs: 200 });
  }, 600_000);

  test('a guest whose agent is gone (the channel there, qemu-ga not running): required fails, try backs up crash-consistent', async () => {
    // The agent ended; the guest starts it again only when the host says resume, after the case.
    const start = 'qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -d -t /run';
    await agent(DOMAIN, 'guest-exec', { path: '/bin/sh', arg: ['-c', `(sleep 1; kill $(pidof qemu-ga); ${AWAIT_RESUME}; ${start}) >/dev/null 2>&1 </dev/null &`] });
    // Gone as libvirt sees it: "not connected" once it handled the port's closing (an event that waits while a job
    // holds the domain). Before that, an agent that had been stopped may be "not available for now", and a freeze
    // sent then leaves a watchdog that no thaw can end while the agent is gone.
    await waitFor('the agent to be gone', () => sh('virsh', ['-q', 'qemu-agent-command', DOMAIN, '{"execute":"guest-ping"}', '--timeout', '2']).then(() => false, (error: Error) => /not connected/.test(error.message)), { everyMs: 200 });
    const before = await checkpoints(DOMAIN);
    const required = await backup(['--libvirt', DOMAIN, '--quiesce', '--freeze-timeout', '5']);
    expect(required.error).toMatchObject({ code: 'ENGINE_QUIESCE_FAILED', message: expect.stringMatching(/the guest agent's freeze failed: .*(not connected|not responding|not available)/) });
    expect(await checkpoints(DOMAIN)).toEqual(before);
    const tried = await backup(['--libvirt', DOMAIN, '--quiesce=try', '--freeze-timeout', '5']);
    expect(tried.code, tried.stderr).toBe(0);
    expect(tried.out!.consistency).toMatchObject({ level: 'crash', freezeMs: null, reason: expect.stringMatching(/freeze failed: .*(not connected|not responding|not available)/) });
    await waitFor('the watchdogs to exit', async () => (await watchdogs(DOMAIN)).length === 0, { everyMs: 200 });
    // The agent started again, for the last case.
    resume();
    await waitFor('the agent to answer again', () => agent(DOMAIN, 'guest-ping').then(() => true, () => false), { everyMs: 200 });
  }, 600_000);

  test('a domain without a guest agent channel: required says so, try backs up crash-consistent', async () => {
    const required = await backup(['--libvirt', BARE, '--quiesce']);
    expect(required.error).toMatchObject({ code: 'ENGINE_QUIESCE_FAILED', message: expect.stringMatching(/guest agent is not configured/i) });
    expect(await checkpoints(BARE)).toEqual([]);
    const tried = await backup(['--libvirt', BARE, '--quiesce=try']);
    expect(tried.code, tried.stderr).toBe(0);
    expect(tried.out!.consistency).toMatchObject({ level: 'crash', freezeMs: null, reason: expect.stringMatching(/guest agent is not configured/i) });
    await waitFor('the watchdog to exit', async () => (await watchdogs(BARE)).length === 0, { everyMs: 500 });
  }, 600_000);

  test('--quiesce and its options are refused where they do not apply', async () => {
    const image = await runEngine(['backup', '--repo', repo, '--source', join(dir.path, 'bare.qcow2'), '--quiesce']);
    expect(image.code).toBe(2);
    expect(image.stderr).toContain('--quiesce and its hooks and timeouts apply to --libvirt DOMAIN');
    const alone = await runEngine(['backup', '--repo', repo, '--libvirt', DOMAIN, '--pre-freeze', 'true']);
    expect(alone.code).toBe(2);
    expect(alone.stderr).toContain('--pre-freeze goes with --quiesce');
    const mode = await runEngine(['backup', '--repo', repo, '--libvirt', DOMAIN, '--quiesce=always']);
    expect(mode.code).toBe(2);
  });

  test('the guest powers off by its agent, and keeps what it wrote: its root file system clean, holding the file', async () => {
    expect(await guestShell('echo written-in-the-guest > /data/proof && sync && cat /data/proof')).toEqual({ exitcode: 0, stdout: 'written-in-the-guest\n' });
    await agent(DOMAIN, 'guest-shutdown').catch(() => undefined); // the agent may go before it answers
    // Powered off by the guest itself (QEMU ended, as libvirt says, by the guest's shutdown: not destroyed, not crashed).
    await waitFor('the guest to power off', async () => (await sh('virsh', ['domstate', DOMAIN, '--reason'])).startsWith('shut off'), { everyMs: 200 });
    expect((await sh('virsh', ['domstate', DOMAIN, '--reason'])).trim()).toBe('shut off (shutdown)');
    // The root file system, read by the host's own tools: clean, and holding the guest's file.
    const disk = join(dir.path, 'powered-off.raw');
    await sh('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', join(dir.path, 'guest.qcow2'), disk]);
    const root = join(dir.path, 'powered-off.root');
    await sh('dd', [`if=${disk}`, `of=${root}`, 'bs=1M', 'skip=1', 'status=none']);
    await sh('e2fsck', ['-n', '-f', root]);
    expect(await sh('debugfs', ['-R', 'cat /data/proof', root])).toBe('written-in-the-guest\n');
  }, 600_000);
});
