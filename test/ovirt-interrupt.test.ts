/**
 * SIGINT sent to the real CLI in the middle of the oVirt flows and of `engine demo` (SPEC.md 14,
 * "Interruption"): the process exits 130 with one line saying what it left, releases the repository's lock
 * and registrations, replays its oVirt journal (the transfer cancelled and ended, the backup finalized, the
 * checkpoint it created deleted; an upload's disk removed, no VM created), and the next command works.
 * The signal lands at a known point: a read the simulator holds back (a disk whose data never comes), or a
 * point where the process stops itself (ENGINE_STOP_AT). No timings are asserted; a process that did not
 * stop would hang the test, not pass it.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { access, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { exitOf, filesIdentical, parseJson, runEngine, sh, spawnEngine, stoppedItself, tempDir, withoutProgress, withoutStopNotice, collectOutput, signalUntilExit, hostCacheOf, hostCacheLeftovers, journalDir } from './helpers.js';
import { qemuIo } from './qemu.js';
import { contractProblems } from './ovirt-contract/contract.js';
import { startOvirtSim, type OvirtSim, type SimVm } from '../dist/test/ovirt-sim/server.js';
import { SIM_ENV } from './ovirt-cli.js';

const MiB = 1024 * 1024;
const env = SIM_ENV;
let dir: string;
let cleanup: () => Promise<void>;
let sim: OvirtSim;
let vm: SimVm;
let repo: string;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-ovirt-interrupt-'));
  sim = await startOvirtSim({ dir: join(dir, 'sim'), lockMs: 100 });
  vm = await sim.addVm('busy', [{ alias: 'busy_os', size: '64M' }]);
  await qemuIo(image(), ['write -P 0x31 0 8M']);
  repo = join(dir, 'repo');
  expect((await runEngine(['init', repo])).code).toBe(0);
});
afterAll(async () => {
  expect(contractProblems(sim.requests)).toEqual([]);
  await sim.stop();
  await cleanup();
});

function image(): string {
  return sim.disks.get(vm.disks[0]!)!.image;
}

async function until(what: string, condition: () => boolean): Promise<void> {
  for (let i = 0; i < 1200; i += 1) {
    if (condition()) return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`never: ${what}`);
}

/**
 * Nothing of the engine's is left: in versions 1 and 2 no lock, registration or temporary file in the
 * repository; in version 3 (the default) no lease in the store and, in this host's cache folder of it,
 * nothing but the slots (a slot's temporary folder, `<slot>.tmp/`, goes with its process; SPEC.md 19.4);
 * and no journal, wherever the version keeps them.
 */
async function expectReleased(repository: string): Promise<void> {
  const hostCache = await hostCacheOf(repository);
  if (hostCache === undefined) {
    await expect(access(join(repository, 'lock'))).rejects.toThrow();
    expect(await readdir(join(repository, 'tmp'))).toEqual([]);
    expect(await readdir(join(repository, 'readers'))).toEqual([]);
    expect(await readdir(join(repository, 'writers')).catch(() => [])).toEqual([]);
  } else {
    // leases/ appears with the first lease: a repository no command has opened yet has none.
    expect(await readdir(join(repository, 'leases')).catch(() => [])).toEqual([]);
    // journal/ (an oVirt run's) is checked below, as for versions 1 and 2.
    expect((await hostCacheLeftovers(repository)).filter((name) => name !== 'journal')).toEqual([]);
  }
  expect(await readdir(await journalDir(repository)).catch(() => [])).toEqual([]);
}

/** Nothing oVirt-side is still open: every backup ended, every transfer finished, no disk locked. */
function expectOvirtSettled(): void {
  expect([...sim.backups.values()].map((b) => b.phase).filter((p) => p !== 'succeeded' && p !== 'failed')).toEqual([]);
  expect([...sim.transfers.values()].map((t) => t.phase).filter((p) => !p.startsWith('finished'))).toEqual([]);
  expect([...sim.disks.values()].filter((d) => d.status !== 'ok').map((d) => `${d.alias}: ${d.status}`)).toEqual([]);
}

async function settle(): Promise<void> {
  await until('oVirt settles', () => [...sim.backups.values()].every((b) => b.phase === 'succeeded' || b.phase === 'failed') && [...sim.transfers.values()].every((t) => t.phase.startsWith('finished')));
}

describe('backup --ovirt (the incremental backup API)', () => {
  test('SIGINT while a disk read is under way: exit 130, one line, lock released, transfer ended, backup finalized, its checkpoint deleted; the next backup is exact', async () => {
    const full = await runEngine(['backup', '--repo', repo, '--ovirt', sim.url, '--vm', 'busy', '--json'], { env });
    expect(full.code).toBe(0);
    const fullId = parseJson<{ id: string }>(full.stdout).id;
    const checkpointsBefore = vm.checkpoints.map((c) => c.id);
    await qemuIo(image(), ['write -P 0x32 20M 2M']);
    // The disk's data never comes: the engine waits on a read when the signal lands.
    sim.faults.slowReads(vm.disks[0]!, 3_600_000);
    const transfersBefore = sim.transfers.size;
    const child = spawnEngine(['backup', '--repo', repo, '--ovirt', sim.url, '--vm', 'busy', '--incremental'], env);
    const out = collectOutput(child);
    await until('a read of the disk is under way', () => [...sim.transfers.values()].slice(transfersBefore).some((t) => t.phase === 'transferring' && (sim.imageio.tickets.get(t.ticket)?.ongoing ?? 0) > 0));
    // The checkpoint this backup created exists in oVirt now; the interrupted backup must not leave it.
    expect(vm.checkpoints.length).toBe(checkpointsBefore.length + 1);
    child.kill('SIGINT');
    const exit = await exitOf(child);
    sim.faults.slowReads(vm.disks[0]!, 0);
    expect(exit.code).toBe(130);
    expect(withoutStopNotice(withoutProgress(out.stderr()))).toBe('engine: backup was interrupted (SIGINT); nothing of it was committed\n');
    await expectReleased(repo);
    expect(await readdir(join(repo, 'backups'))).toEqual([fullId]);
    await settle();
    expectOvirtSettled();
    expect(vm.checkpoints.map((c) => c.id)).toEqual(checkpointsBefore);
    // The next backup is incremental from the full, exactly the 2 MiB written, and restores byte for byte.
    const next = await runEngine(['backup', '--repo', repo, '--ovirt', sim.url, '--vm', 'busy', '--incremental', '--json'], { env });
    expect(next.code).toBe(0);
    const nextOut = parseJson<{ id: string; disks: { mode: string; parent: string | null; bytesRead: number }[] }>(next.stdout);
    expect(nextOut.disks.map((d) => [d.mode, d.parent, d.bytesRead])).toEqual([['incremental', fullId, 2 * MiB]]);
    const expected = join(dir, 'busy-expected.raw');
    await sh('qemu-img', ['convert', '-U', '-O', 'raw', image(), expected]);
    const restored = join(dir, 'busy-restored.raw');
    expect((await runEngine(['restore', '--repo', repo, nextOut.id, '--to', restored])).code).toBe(0);
    expect(await filesIdentical(restored, expected)).toBe(true);
  });
  test('a full backup too: SIGINT while the pipeline waits on a read, exit 130, one line, nothing left in the repository or in oVirt', async () => {
    const backupsBefore = await readdir(join(repo, 'backups'));
    const checkpointsBefore = vm.checkpoints.map((c) => c.id);
    sim.faults.slowReads(vm.disks[0]!, 3_600_000);
    const transfersBefore = sim.transfers.size;
    const child = spawnEngine(['backup', '--repo', repo, '--ovirt', sim.url, '--vm', 'busy', '--full'], env);
    const out = collectOutput(child);
    await until('a read of the disk is under way', () => [...sim.transfers.values()].slice(transfersBefore).some((t) => t.phase === 'transferring' && (sim.imageio.tickets.get(t.ticket)?.ongoing ?? 0) > 0));
    child.kill('SIGINT');
    const exit = await exitOf(child);
    sim.faults.slowReads(vm.disks[0]!, 0);
    expect(exit.code).toBe(130);
    expect(withoutStopNotice(withoutProgress(out.stderr()))).toBe('engine: backup was interrupted (SIGINT); nothing of it was committed\n');
    await expectReleased(repo);
    expect(await readdir(join(repo, 'backups'))).toEqual(backupsBefore);
    await settle();
    expectOvirtSettled();
    expect(vm.checkpoints.map((c) => c.id)).toEqual(checkpointsBefore);
  });
});

describe('restore --ovirt', () => {
  test('SIGINT after the first block uploaded: exit 130, one line, the upload cancelled and its disk removed, no VM created; the same restore then works', async () => {
    const last = parseJson<{ backups: { id: string }[] }>((await runEngine(['list', '--repo', repo, '--json'])).stdout).backups.at(-1)!.id;
    const disksBefore = new Set(sim.disks.keys());
    const vmsBefore = new Set(sim.vms.keys());
    const args = ['restore', '--repo', repo, last, '--ovirt', sim.url, '--new-vm', 'busy-restored', '--via', 'transfer'];
    const child = spawnEngine(args, { ...env, ENGINE_STOP_AT: 'restore-block-written' });
    const out = collectOutput(child);
    await stoppedItself(child);
    child.kill('SIGINT');
    child.kill('SIGCONT');
    const exit = await exitOf(child);
    expect(exit.code).toBe(130);
    const lines = withoutStopNotice(withoutProgress(out.stderr())).split('\n').filter(Boolean);
    expect(lines).toHaveLength(1);
    expect(lines[0]).toBe('engine: restore was interrupted (SIGINT); what it created in oVirt was removed');
    await expectReleased(repo);
    await settle();
    expectOvirtSettled();
    // oVirt removes the disk of a cancelled upload; the engine created no VM.
    expect([...sim.disks.keys()].filter((id) => !disksBefore.has(id))).toEqual([]);
    expect([...sim.vms.keys()].filter((id) => !vmsBefore.has(id))).toEqual([]);
    const again = await runEngine([...args, '--json'], { env });
    expect(again.code).toBe(0);
    const created = [...sim.vms.values()].find((v) => v.name === 'busy-restored')!;
    const restored = join(dir, 'busy-uploaded.raw');
    await sh('qemu-img', ['convert', '-U', '-O', 'raw', sim.disks.get(created.disks[0]!)!.image, restored]);
    expect(await filesIdentical(restored, join(dir, 'busy-expected.raw'))).toBe(true);
  });
});

describe('the disk-attachment flow (--appliance)', () => {
  /** SIGINT while stopped at `point`, resumed until it exits (a point may be reached again before the signal is seen). */
  async function interruptAt(point: string, args: string[]): Promise<{ code: number | null; stderr: string }> {
    const child = spawnEngine(args, { ...env, ENGINE_STOP_AT: point });
    const out = collectOutput(child);
    await stoppedItself(child);
    return { code: (await signalUntilExit(child)).code, stderr: withoutStopNotice(withoutProgress(out.stderr())) };
  }

  async function expectNothingAttached(): Promise<void> {
    await settle();
    const appliance = [...sim.vms.values()].find((v) => v.name === 'appliance')!;
    expect([...appliance.attachments.keys()]).toEqual([]);
    expect(await readdir(sim.deviceRoot)).toEqual([]);
  }

  test('backup: SIGINT while a pack is written, exit 130, one line; the snapshot removed, its disks detached; restore: SIGINT after the first block, its disk removed, no VM', async () => {
    const app = await sim.addVm('appliance', []);
    const big = await sim.addVm('big', [{ alias: 'big_os', size: '64M' }]);
    // 40 MiB that do not compress: a pack (32 MiB) is written while the disk is read through the appliance.
    const random = join(dir, 'big-random.raw');
    await sh('bash', ['-c', `head -c 40M /dev/urandom > ${random} && truncate -s 64M ${random}`]);
    await sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', random, sim.disks.get(big.disks[0]!)!.image]);
    const backupsBefore = await readdir(join(repo, 'backups'));
    const args = ['backup', '--repo', repo, '--ovirt', sim.url, '--vm', 'big', '--appliance', 'appliance', '--device-root', sim.deviceRoot];
    const interrupted = await interruptAt('pack-written', args);
    expect(interrupted.code).toBe(130);
    expect(interrupted.stderr).toBe('engine: backup was interrupted (SIGINT); nothing of it was committed\n');
    await expectReleased(repo);
    expect(await readdir(join(repo, 'backups'))).toEqual(backupsBefore);
    await expectNothingAttached();
    await until('the backup snapshot is removed', () => big.snapshots.size === 0);
    // The next backup works and restores byte for byte.
    const done = await runEngine([...args, '--json'], { env });
    expect(done.code).toBe(0);
    const id = parseJson<{ id: string }>(done.stdout).id;
    const restoredFile = join(dir, 'big-restored.raw');
    expect((await runEngine(['restore', '--repo', repo, id, '--to', restoredFile])).code).toBe(0);
    expect(await filesIdentical(restoredFile, random)).toBe(true);

    const disksBefore = new Set(sim.disks.keys());
    const vmsBefore = new Set(sim.vms.keys());
    const restore = await interruptAt('restore-block-written', ['restore', '--repo', repo, id, '--ovirt', sim.url, '--new-vm', 'big-restored', '--appliance', 'appliance', '--device-root', sim.deviceRoot]);
    expect(restore.code).toBe(130);
    expect(restore.stderr).toBe('engine: restore was interrupted (SIGINT); what it created in oVirt was removed\n');
    await expectReleased(repo);
    await expectNothingAttached();
    expect([...sim.disks.keys()].filter((d) => !disksBefore.has(d))).toEqual([]);
    expect([...sim.vms.keys()].filter((v) => !vmsBefore.has(v))).toEqual([]);
    expect(app.status).toBe('up');
  });
});

describe('engine demo', () => {
  test('SIGINT in its restore step: exit 130, one line, its temporary directory removed', async () => {
    const child = spawnEngine(['demo', '--size', '8M'], { ENGINE_STOP_AT: 'restore-block-written' });
    const out = collectOutput(child);
    await stoppedItself(child);
    const working = /working in (\S+?),? /.exec(out.stdout() + out.stderr())?.[1];
    expect(working).toBeDefined();
    await stat(working!);
    child.kill('SIGINT');
    child.kill('SIGCONT');
    const exit = await exitOf(child);
    expect(exit.code).toBe(130);
    expect(withoutStopNotice(withoutProgress(out.stderr()))).toBe('engine: demo was interrupted (SIGINT); its temporary directory was removed\n');
    await expect(stat(working!)).rejects.toThrow();
  });

  test('SIGINT while its first backup writes a pack (--dir): exit 130, one line, the repository unlocked and intact, usable at once', async () => {
    const kept = join(dir, 'demo-kept');
    const child = spawnEngine(['demo', '--dir', kept, '--size', '48M'], { ENGINE_STOP_AT: 'pack-written' });
    const out = collectOutput(child);
    await stoppedItself(child);
    expect((await signalUntilExit(child)).code).toBe(130);
    expect(withoutStopNotice(withoutProgress(out.stderr()))).toBe(`engine: demo was interrupted (SIGINT); what it made so far stays in ${kept}\n`);
    const demoRepo = join(kept, 'repo');
    await expectReleased(demoRepo);
    // A backup that got past its last pack may have committed before the signal was seen: whatever is there verifies.
    // The demo's repository is of version 3 (the default): backups/ appears with its first record.
    expect((await readdir(join(demoRepo, 'backups')).catch(() => [])).length).toBeLessThanOrEqual(1);
    expect((await runEngine(['verify', '--repo', demoRepo, '--read-data'])).code).toBe(0);
    const again = await runEngine(['backup', '--repo', demoRepo, '--source', join(kept, 'vm-disk.img'), '--json']);
    expect(again.code).toBe(0);
    const restored = join(dir, 'demo-restored.img');
    expect((await runEngine(['restore', '--repo', demoRepo, parseJson<{ id: string }>(again.stdout).id, '--to', restored])).code).toBe(0);
    expect(await filesIdentical(restored, join(kept, 'vm-disk.img'))).toBe(true);
  });
});
