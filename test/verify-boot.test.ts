/**
 * `engine verify --boot` (SPEC.md 9.2, 14): a backup of the tests' real guest (test/guest/) boots in a
 * throw-away QEMU VM (TCG here, or KVM where it works) from the served backup; the result is a verification
 * record next to the backup, shown by list and show. Failures are recorded with their reason and the
 * console log kept: a damaged root file system, a guest whose agent never starts, a disk of zeros. A
 * missing QEMU is an error, not a result. A run killed with -9 takes its VM along (pdeathsig) and leaves
 * its folder, which the next run removes;
 * SIGTERM stops a run and everything it started. After every case the backup is unchanged and nothing
 * is left behind: no QEMU process, no run folder (sockets, console), no overlay.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { copyFile, readdir, readFile, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { collectOutput, exitOf, initRepository, parseJson, runEngine, sh, spawnEngine, tempDir, waitFor } from './helpers.js';
import { tinyGuest } from './guest/tiny-guest.js';

interface BootJson {
  key: string;
  backup: string;
  result: 'passed' | 'failed';
  reason: { code: string; message: string } | null;
  proofOfLifeMs: number | null;
  checks: { expect: string; agentPing: boolean | null; filesystems: { mountpoint: string; type: string; device: string }[] | null; console: { regex: string; line: string | null } | null };
  accelerator: string;
  machine: string;
  firmware: string;
  memoryBytes: number;
  qemuVersion: string;
  engineVersion: string;
  consoleLogPath: string | null;
  attachments: { name: string; mediaType: string; data: string }[];
}

interface ShowJson {
  id: string;
  boot: { result: string; reason: { code: string } | null; record: string; consoleLogPath: string | null } | null;
}

/** QEMU processes whose command line names `dir` (every socket and console of a run lies below it). */
async function qemuProcessesUnder(dir: string): Promise<number[]> {
  const found: number[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const cmdline = await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '');
    if (cmdline.includes('qemu-system') && cmdline.includes(dir)) found.push(Number(name));
  }
  return found;
}

describe('verify --boot', () => {
  let dir: { path: string; cleanup: () => Promise<void> };
  let repo: string;
  let runDir: string;
  let logDir: string;
  let env: Record<string, string>;
  const ids: Record<'good' | 'damaged' | 'silent' | 'zeros', string> = { good: '', damaged: '', silent: '', zeros: '' };
  const roots: Record<string, string> = {};

  /** The backup record's file (format 3, plain: its JSON, map roots included), byte for byte. */
  const recordOf = (id: string): Promise<string> => readFile(join(repo, 'backups', id), 'utf8');

  const show = async (id: string): Promise<ShowJson> => {
    const shown = await runEngine(['show', '--repo', repo, id, '--json'], { env });
    expect(shown.code, shown.stderr).toBe(0);
    return parseJson<ShowJson>(shown.stdout);
  };

  const boot = async (args: string[], extraEnv: Record<string, string> = {}): Promise<{ code: number; json: BootJson | undefined; stderr: string }> => {
    const run = await runEngine(['verify', '--repo', repo, '--json', ...args], { env: { ...env, ...extraEnv } });
    return { code: run.code, json: run.stdout.trim() === '' ? undefined : parseJson<BootJson>(run.stdout), stderr: run.stderr };
  };

  /** The backup as it was (its record, map roots included; every chunk re-read), and nothing of a run left. */
  const expectUnchangedAndClean = async (): Promise<void> => {
    for (const [id, record] of Object.entries(roots)) expect(await recordOf(id)).toBe(record);
    const verified = await runEngine(['verify', '--repo', repo, '--read-data', '--json'], { env });
    expect(verified.code, verified.stdout).toBe(0);
    expect(parseJson<{ ok: boolean }>(verified.stdout).ok).toBe(true);
    expect(await qemuProcessesUnder(runDir)).toEqual([]);
    expect(await readdir(join(runDir, 'vms')).catch(() => [])).toEqual([]);
  };

  beforeAll(async () => {
    dir = await tempDir('engine-verify-boot-');
    repo = join(dir.path, 'repo');
    runDir = join(dir.path, 'run');
    logDir = join(dir.path, 'cache', 'boot-logs');
    env = { ENGINE_RUN_DIR: runDir, ENGINE_CACHE_DIR: join(dir.path, 'cache') };
    const guest = await tinyGuest();
    await initRepository(repo);
    const backUp = async (which: keyof typeof ids, image: string): Promise<void> => {
      const run = await runEngine(['backup', '--repo', repo, '--source', image, '--name', which, '--json'], { env });
      expect(run.code, run.stderr).toBe(0);
      ids[which] = parseJson<{ id: string }>(run.stdout).id;
      roots[ids[which]] = await recordOf(ids[which]);
    };
    const good = join(dir.path, 'good.img');
    await copyFile(guest.image, good);
    await backUp('good', good);

    // The root file system damaged on purpose: its journal's superblock zeroed and recovery asked for, so the
    // guest's kernel refuses to mount it ("error loading journal"); the boot loader still finds the kernel.
    const damaged = join(dir.path, 'damaged.img');
    const root = join(dir.path, 'root.img');
    await sh('dd', [`if=${guest.image}`, `of=${root}`, 'bs=1M', 'skip=1', 'status=none']);
    const journalBlock = Number((await sh('debugfs', ['-R', 'bmap <8> 0', root])).trim());
    const blockSize = Number(/Block size:\s+(\d+)/.exec(await sh('dumpe2fs', ['-h', root]))![1]);
    await sh('debugfs', ['-w', '-R', 'feature needs_recovery', root]);
    await sh('dd', ['if=/dev/zero', `of=${root}`, `bs=${blockSize}`, `seek=${journalBlock}`, 'count=1', 'conv=notrunc', 'status=none']);
    await copyFile(guest.image, damaged);
    await sh('dd', [`if=${root}`, `of=${damaged}`, 'bs=1M', 'seek=1', 'conv=notrunc', 'status=none']);
    await backUp('damaged', damaged);

    // A guest that boots but never starts its agent: /sbin/init replaced (debugfs) by one that does not.
    const silent = join(dir.path, 'silent.img');
    await sh('dd', [`if=${guest.image}`, `of=${root}`, 'bs=1M', 'skip=1', 'status=none']);
    const init = join(dir.path, 'init');
    await writeFile(init, '#!/bin/sh\nmount -t proc proc /proc\necho "SILENT-GUEST: no agent"\nwhile :; do sleep 3600; done\n', { mode: 0o755 });
    await sh('debugfs', ['-w', '-R', 'rm /sbin/init', root]);
    await sh('debugfs', ['-w', '-R', `write ${init} /sbin/init`, root]);
    await sh('debugfs', ['-w', '-R', 'sif /sbin/init mode 0100755', root]);
    await copyFile(guest.image, silent);
    await sh('dd', [`if=${root}`, `of=${silent}`, 'bs=1M', 'seek=1', 'conv=notrunc', 'status=none']);
    await rm(root);
    await backUp('silent', silent);

    const zeros = join(dir.path, 'zeros.img');
    await writeFile(zeros, '');
    await truncate(zeros, 16 * 1024 * 1024);
    await backUp('zeros', zeros);
  }, 600_000);

  afterAll(async () => {
    for (const pid of await qemuProcessesUnder(dir.path)) process.kill(pid, 'SIGKILL');
    await dir.cleanup();
  });

  it('passes on a good backup: the agent answers and lists the mounted root; recorded, and shown by list and show', async () => {
    const { code, json, stderr } = await boot(['--boot', ids.good, '--timeout', '300']);
    expect(code, stderr).toBe(0);
    expect(json).toMatchObject({ backup: ids.good, result: 'passed', reason: null, machine: 'q35', firmware: 'bios', memoryBytes: 1024 ** 3, consoleLogPath: null, attachments: [] });
    expect(json!.checks).toEqual({ expect: 'agent', agentPing: true, filesystems: [{ mountpoint: '/', type: 'ext4', device: 'vda1' }], console: null });
    expect(['kvm', 'tcg']).toContain(json!.accelerator);
    expect(json!.proofOfLifeMs).toBeGreaterThan(0);
    expect(json!.qemuVersion).toMatch(/^\d+\.\d+/);
    expect(json!.key).toMatch(new RegExp(`^verifications/${ids.good}/\\d{8}T\\d{6}Z-[0-9a-f]{8}$`));
    // The record is an object of the repository (format 3 here: a key of the store, a file of the folder).
    expect((await stat(join(repo, json!.key))).isFile()).toBe(true);
    const shown = await show(ids.good);
    expect(shown.boot).toMatchObject({ result: 'passed', reason: null, record: json!.key });
    const listed = parseJson<{ backups: { id: string; boot: { result: string } | null }[] }>((await runEngine(['list', '--repo', repo, '--json'], { env })).stdout);
    expect(listed.backups.map((b) => [b.id, b.boot?.result ?? null])).toEqual([
      [ids.good, 'passed'],
      [ids.damaged, null],
      [ids.silent, null],
      [ids.zeros, null],
    ]);
    const table = (await runEngine(['list', '--repo', repo], { env })).stdout;
    expect(table.split('\n')[0]).toMatch(/ BOOT$/);
    expect(table.split('\n')[1]).toMatch(/ passed \d+\.\d s$/);
    await expectUnchangedAndClean();
  }, 600_000);

  it('passes with --expect-console when a console line matches, and --latest --name picks the newest of that name', async () => {
    const { code, json, stderr } = await boot(['--boot', '--latest', '--name', 'good', '--expect-console', 'TINY-GUEST-READY', '--memory', '256M']);
    expect(code, stderr).toBe(0);
    expect(json).toMatchObject({ backup: ids.good, result: 'passed', memoryBytes: 256 * 1024 * 1024 });
    expect(json!.checks).toEqual({ expect: 'console', agentPing: null, filesystems: null, console: { regex: 'TINY-GUEST-READY', line: 'TINY-GUEST-READY' } });
    await expectUnchangedAndClean();
  }, 600_000);

  it('fails on a damaged root file system, with the reason, and keeps the console log', async () => {
    const { code, json } = await boot(['--boot', ids.damaged, '--timeout', '300']);
    expect(code).toBe(4);
    expect(json!.result).toBe('failed');
    expect(json!.reason!.code).toBe('BOOT_VM_STOPPED');
    expect(json!.reason!.message).toContain('TINY-GUEST-NO-ROOT: cannot mount /dev/vda1');
    expect(json!.proofOfLifeMs).toBeNull();
    expect(json!.consoleLogPath).toMatch(new RegExp(`^${logDir}/${ids.damaged}-\\d{8}T\\d{6}Z-console\\.log$`));
    const kept = await readFile(json!.consoleLogPath!, 'utf8');
    expect(kept).toContain('EXT4-fs (vda1): error loading journal');
    expect(json!.attachments).toHaveLength(1);
    expect(json!.attachments[0]).toMatchObject({ name: 'console', mediaType: 'text/plain' });
    expect(json!.attachments[0]!.data).toContain('TINY-GUEST-NO-ROOT');
    expect((await show(ids.damaged)).boot).toMatchObject({ result: 'failed', reason: { code: 'BOOT_VM_STOPPED' }, consoleLogPath: json!.consoleLogPath });
    await expectUnchangedAndClean();
  }, 600_000);

  it('fails with a timeout when the guest agent never answers', async () => {
    // 30 s: the silent guest's init has printed its line by then (~5 s from the start under TCG at load 9, over
    // 15 s at load 20).
    const { code, json } = await boot(['--boot', ids.silent, '--timeout', '30']);
    expect(code).toBe(4);
    expect(json!.reason).toEqual({ code: 'BOOT_TIMEOUT', message: 'the guest agent did not answer within 30 s' });
    expect(json!.checks).toMatchObject({ expect: 'agent', agentPing: false, filesystems: null });
    expect(json!.attachments[0]!.data).toContain('SILENT-GUEST: no agent');
    await expectUnchangedAndClean();
  }, 600_000);

  it('fails on a disk of zeros: no bootable disk', async () => {
    const { code, json } = await boot(['--boot', ids.zeros, '--timeout', '300']);
    expect(code).toBe(4);
    expect(json!.reason!.code).toBe('BOOT_NO_BOOTABLE_DISK');
    expect(json!.reason!.message).toContain('No bootable device');
    await expectUnchangedAndClean();
  }, 600_000);

  it('says clearly when QEMU is missing, and records nothing', async () => {
    const before = await show(ids.zeros);
    const cases: [Record<string, string>, RegExp][] = [
      [{ ENGINE_QEMU: '/nonexistent/qemu-system-x86_64' }, /ENGINE_QEMU=\/nonexistent\/qemu-system-x86_64 names no executable file/],
      [{ PATH: '/nonexistent' }, /qemu-system-x86_64 is not installed \(it is not on PATH; Debian: apt-get install qemu-system-x86\)/],
    ];
    for (const [extra, says] of cases) {
      const run = await runEngine(['verify', '--repo', repo, '--boot', ids.zeros], { env: { ...env, ...extra } });
      expect(run.code).toBe(1);
      expect(run.stderr).toMatch(says);
    }
    expect((await show(ids.zeros)).boot).toEqual(before.boot);
    await expectUnchangedAndClean();
  }, 120_000);

  it('kill -9 takes the VM along and leaves the folder, which the next run removes; SIGTERM stops a run and all it started', async () => {
    // --accel tcg: with `auto` on a host whose KVM fails, the first VM journaled would be the KVM attempt's, which the run stops itself.
    const child = spawnEngine(['verify', '--repo', repo, '--boot', ids.silent, '--timeout', '600', '--accel', 'tcg'], env);
    const output = collectOutput(child);
    let vmPid = 0;
    // Killed once the guest runs (a QEMU killed while it still opens its disks exits by itself: its NBD server is gone).
    await waitFor(
      'the run to journal its VM, and the guest to run',
      async () => {
        for (const run of await readdir(join(runDir, 'vms')).catch(() => [])) {
          const state = JSON.parse(await readFile(join(runDir, 'vms', run, 'state.json'), 'utf8').catch(() => '{}')) as { vm?: { pid: number } | null };
          const console = await readFile(join(runDir, 'vms', run, 'console.log'), 'utf8').catch(() => '');
          if (state.vm && console.includes('SILENT-GUEST: no agent')) vmPid = state.vm.pid;
        }
        return vmPid !== 0;
      },
      { child, output: output.stderr, everyMs: 100 },
    );
    child.kill('SIGKILL');
    await exitOf(child);
    // The kernel kills the VM with its engine (pdeathsig): gone, or a zombie until its new parent reaps it.
    const vmRunning = async (): Promise<boolean> => {
      const stat = await readFile(`/proc/${vmPid}/stat`, 'utf8').catch(() => '');
      return stat !== '' && !/^\d+ \(.*\) Z/.test(stat);
    };
    await waitFor('the VM to die with its engine', async () => !(await vmRunning()), { everyMs: 100 });
    expect(await qemuProcessesUnder(runDir)).toEqual([]);
    expect(await readdir(join(runDir, 'vms'))).toHaveLength(1); // the folder (and the lease or registration) left

    const next = await runEngine(['verify', '--repo', repo, '--boot', ids.zeros], { env });
    expect(next.code).toBe(4);
    expect(next.stderr).toMatch(/cleaned up after run \d{8}T\d{6}-[0-9a-f]{8} \(verify --boot\), which was killed\n/);
    await expectUnchangedAndClean();

    const stopped = spawnEngine(['verify', '--repo', repo, '--boot', ids.silent, '--timeout', '600', '--accel', 'tcg'], env);
    const stoppedOutput = collectOutput(stopped);
    await waitFor('the VM to start', async () => (await qemuProcessesUnder(runDir)).length === 1, { child: stopped, output: stoppedOutput.stderr, everyMs: 100 });
    stopped.kill('SIGTERM');
    expect(await exitOf(stopped)).toEqual({ code: 130, signal: null });
    expect(stoppedOutput.stderr()).toMatch(/verify --boot was interrupted \(SIGTERM\); the VM was stopped and its writes discarded; nothing was recorded/);
    await expectUnchangedAndClean();
  }, 600_000);

  it('verify checks the records; prune removes a backup with its records', async () => {
    const listed = await runEngine(['verify', '--repo', repo, '--json'], { env });
    const report = parseJson<{ ok: boolean; verifications: number; warnings: unknown[] }>(listed.stdout);
    expect(report).toMatchObject({ ok: true, verifications: 6, warnings: [] });
    const zerosRecords = await readdir(join(repo, 'verifications', ids.zeros));
    expect(zerosRecords).toHaveLength(2); // the disk of zeros, and the run after the kill -9
    // One byte of a record changed: verify names it.
    const victim = join(repo, 'verifications', ids.zeros, zerosRecords[0]!);
    const bytes = await readFile(victim);
    await rm(victim, { force: true });
    await writeFile(victim, Buffer.concat([bytes.subarray(0, 10), Buffer.from('X'), bytes.subarray(11)]));
    const damaged = parseJson<{ ok: boolean; problems: { code: string; backup: string; path: string }[] }>((await runEngine(['verify', '--repo', repo, '--json'], { env })).stdout);
    expect(damaged.ok).toBe(false);
    expect(damaged.problems.map((p) => [p.code, p.backup, p.path])).toEqual([['VERIFICATION_DAMAGED', ids.zeros, `verifications/${ids.zeros}/${zerosRecords[0]!}`]]);
    // forget removes the backup, and its verification records (damaged or not) with it.
    const forgot = await runEngine(['forget', '--repo', repo, ids.zeros], { env });
    expect(forgot.code, forgot.stderr).toBe(0);
    expect(await readdir(join(repo, 'verifications', ids.zeros)).catch(() => [])).toEqual([]);
    delete roots[ids.zeros];
    // prune: a newer backup of the good guest's name; keeping the last one removes the first, with its two records.
    const again = await runEngine(['backup', '--repo', repo, '--source', join(dir.path, 'good.img'), '--name', 'good', '--json'], { env });
    expect(again.code, again.stderr).toBe(0);
    expect(await readdir(join(repo, 'verifications', ids.good))).toHaveLength(2);
    const pruned = await runEngine(['prune', '--repo', repo, '--keep-last', '1', '--json'], { env });
    expect(pruned.code, pruned.stderr).toBe(0);
    expect(await readdir(join(repo, 'verifications', ids.good)).catch(() => [])).toEqual([]);
    delete roots[ids.good];
    const after = parseJson<{ ok: boolean; verifications: number; warnings: unknown[] }>((await runEngine(['verify', '--repo', repo, '--json'], { env })).stdout);
    expect(after).toMatchObject({ ok: true, verifications: 2, warnings: [] });
  }, 300_000);
});
