/**
 * `backup --ovirt … --quiesce[=required|try]` against the oVirt simulator (test/ovirt-sim/BEHAVIOUR.md,
 * "Quiesce"): the disk-attachment flow freezes the guest through the VM's freezefilesystems action around its
 * snapshot; the backup API asks require_consistency of a live backup and reads a failed freeze back from the
 * engine's events; a hybrid backup is frozen around like a snapshot. Each record says its consistency; a
 * required quiesce that cannot be had fails with ENGINE_QUIESCE_FAILED and leaves nothing (no snapshot, no
 * open backup or transfer, no journal, no watchdog) and no frozen guest; an engine killed while the guest is
 * frozen is outlived by its thaw watchdog.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';
import { parseJson, runEngine, tempDir, journalDir, waitFor } from './helpers.js';
import { qemuIo } from './qemu.js';
import { contractProblems } from './ovirt-contract/contract.js';
import { startOvirtSim, type OvirtSim, type SimVm } from '../dist/test/ovirt-sim/server.js';
import { SIM_ENV } from './ovirt-cli.js';

interface Consistency {
  level: string;
  method: string;
  freezeMs: number | null;
  reason: string | null;
}

let dir: string;
let cleanup: () => Promise<void>;
let sim: OvirtSim;
let repo: string;
const vms: Record<string, SimVm> = {};

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-ovirt-quiesce-'));
  sim = await startOvirtSim({ dir: join(dir, 'sim'), lockMs: 150 });
  sim.addCluster('c47', [4, 7]);
  for (const name of ['web', 'noagent', 'refuser', 'cold', 'late']) vms[name] = await sim.addVm(name, [{ alias: `${name}_os`, size: '16M' }]);
  vms.hyb = await sim.addVm('hyb', [{ alias: 'hyb_os', size: '16M' }], 'up', { cluster: 'c47' });
  vms.noagent!.agent = 'none';
  vms.refuser!.agent = 'refuses';
  vms.late!.agent = 'late';
  vms.cold!.status = 'down';
  for (const vm of Object.values(vms)) await qemuIo(sim.disks.get(vm.disks[0]!)!.image, ['write -P 0x5a 0 2M']);
  await sim.addVm('appliance', []);
  repo = join(dir, 'repo');
  await runEngine(['init', repo]);
});
afterAll(async () => {
  // Every request the engine made here follows oVirt's API model (freezefilesystems, require_consistency, events).
  expect(contractProblems(sim.requests)).toEqual([]);
  await sim.stop();
  await cleanup();
});

/** Runs a backup of `vm` (through the appliance with `appliance`); the record's consistency, or the error. */
async function backup(vm: string, extra: string[], appliance = false): Promise<{ code: number; consistency?: Consistency; error?: { code: string; message: string } }> {
  const args = ['backup', '--repo', repo, '--ovirt', sim.url, '--vm', vm, '--json', ...(appliance ? ['--appliance', 'appliance', '--device-root', sim.deviceRoot] : []), ...extra];
  const result = await runEngine(args, { env: SIM_ENV });
  if (result.code !== 0) return { code: result.code, error: parseJson<{ error: { code: string; message: string } }>(result.stdout).error };
  const { id } = parseJson<{ id: string }>(result.stdout);
  const record = JSON.parse(await readFile(join(repo, 'backups', id), 'utf8')) as { consistency?: Consistency };
  return { code: 0, consistency: record.consistency! };
}

/** Nothing of the run is left: no snapshot, attachment, open backup or transfer, journal; the guest not frozen. */
async function expectNothingLeft(vm: SimVm): Promise<void> {
  await waitFor('snapshots and backups to settle', () => vm.snapshots.size === 0 && [...sim.backups.values()].every((b) => b.phase === 'succeeded' || b.phase === 'failed'), { everyMs: 50 });
  expect([...vm.snapshots.keys()]).toEqual([]);
  expect([...sim.vms.values()].find((v) => v.name === 'appliance')!.attachments.size).toBe(0);
  expect([...sim.transfers.values()].filter((t) => t.phase === 'transferring' || t.phase === 'initializing' || t.phase === 'paused_system')).toEqual([]);
  expect(await readdir(await journalDir(repo)).catch(() => [])).toEqual([]);
  expect(vm.frozen).toBe(false);
  expect(await watchdogs()).toEqual([]);
}

const ROOT = fileURLToPath(new URL('..', import.meta.url));
/** Thaw watchdogs (engine/quiesce/thaw-watchdog.ts) of this tree still running: the engine ends its own once it thawed. */
const OVIRT_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

async function watchdogs(): Promise<string[]> {
  const found: string[] = [];
  for (const pid of (await readdir('/proc')).filter((p) => /^\d+$/.test(p))) {
    const cmdline = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    // The watchdog's label is the VM it guards: an oVirt VM's id here. quiesce-libvirt's watchdogs (a libvirt
    // domain's name) may run at the same time from this checkout, in another worker: they are not this file's.
    const args = cmdline.split('\0').filter((arg) => arg !== '');
    if (cmdline.includes(`${ROOT}dist/`) && args.at(-2) === 'engine-thaw-watchdog' && OVIRT_ID.test(args.at(-1) ?? '')) found.push(`${pid}: ${args.join(' ')}`);
  }
  return found;
}

const posts = (vm: SimVm, tail: string): { query: string }[] =>
  sim.requests.filter((r) => r.method === 'POST' && r.path.split('?')[0]!.endsWith(`/vms/${vm.id}${tail}`)).map((r) => ({ query: r.path.split('?')[1] ?? '' }));

describe('oVirt disk-attachment flow: freezefilesystems around the snapshot', () => {
  test('a guest with an agent: the snapshot is taken frozen, thawed after; the record says filesystem, with the freeze time', async () => {
    const vm = vms.web!;
    const result = await backup('web', ['--quiesce'], true);
    expect(result.error).toBeUndefined();
    expect(result.consistency).toMatchObject({ level: 'filesystem', method: "oVirt freezefilesystems (the guest agent's fsfreeze) around the snapshot", reason: null });
    expect(Number.isSafeInteger(result.consistency!.freezeMs) && result.consistency!.freezeMs! >= 150).toBe(true); // at least the snapshot's lock time
    expect(vm.snapshotsQuiesced).toEqual(['api']); // frozen by the engine before VDSM's snapshot job began
    expect(posts(vm, '/freezefilesystems')).toHaveLength(1);
    expect(posts(vm, '/thawfilesystems')).toHaveLength(1);
    expect(sim.events.filter((e) => e.code === 10767).map((e) => e.description)).toEqual(['Guest filesystems on VM web have been frozen successfully.']);
    await expectNothingLeft(vm);
  });

  test('no agent, --quiesce (required): ENGINE_QUIESCE_FAILED before any snapshot; nothing left', async () => {
    const vm = vms.noagent!;
    const result = await backup('noagent', ['--quiesce'], true);
    expect(result.code).toBe(1);
    expect(result.error!.code).toBe('ENGINE_QUIESCE_FAILED');
    expect(result.error!.message).toContain('Guest agent non responsive');
    expect(posts(vm, '/snapshots')).toEqual([]);
    expect(vm.snapshotsQuiesced).toEqual([]);
    await expectNothingLeft(vm);
  });

  test('a freeze that fails, --quiesce=try: crash-consistent, the reason recorded', async () => {
    const vm = vms.refuser!;
    const result = await backup('refuser', ['--quiesce=try', '--freeze-timeout', '1'], true);
    expect(result.error).toBeUndefined();
    expect(result.consistency).toEqual({ level: 'crash', method: 'oVirt freezefilesystems failed', freezeMs: null, reason: expect.stringContaining('Unable to freeze guest filesystems') });
    expect(vm.snapshotsQuiesced).toEqual(['no']);
    // Not a fault that says the freeze never reached the guest: its watchdog stays, until it thawed.
    await waitFor('the watchdog to exit', async () => (await watchdogs()).length === 0, { everyMs: 50 });
    await expectNothingLeft(vm);
  });

  test('a freeze whose call times out but lands later: thawed once at once, and the watchdog thaws until a thaw succeeds', async () => {
    const vm = vms.late!;
    const result = await backup('late', ['--quiesce=try', '--freeze-timeout', '3'], true);
    expect(result.error).toBeUndefined();
    expect(result.consistency).toMatchObject({ level: 'crash', method: 'oVirt freezefilesystems failed', reason: expect.stringContaining('Message timeout') });
    await waitFor('the late freeze to land', () => vm.lateFreezeLanded === true, { everyMs: 50 });
    await waitFor('the watchdog to exit', async () => (await watchdogs()).length === 0, { everyMs: 50 });
    expect(vm.frozen).toBe(false);
    // Thawed by the watchdog (or the run's own journal, when the run outlasted the late freeze), after it landed.
    expect(sim.events.filter((e) => e.code === 10768 && e.description.includes(' late ')).length).toBeGreaterThanOrEqual(2);
    const cleaned = await runEngine(['ovirt', 'cleanup', '--repo', repo, '--ovirt', sim.url], { env: SIM_ENV });
    expect(cleaned.code).toBe(0);
    await expectNothingLeft(vm);
  });

  test('without --quiesce: nothing is frozen by the engine, the record says crash, no quiesce asked', async () => {
    const vm = vms.web!;
    const freezes = posts(vm, '/freezefilesystems').length;
    const result = await backup('web', [], true);
    expect(result.consistency).toEqual({ level: 'crash', method: 'no quiesce asked', freezeMs: null, reason: null });
    expect(posts(vm, '/freezefilesystems')).toHaveLength(freezes);
    // oVirt's host froze the guest itself (VDSM's snapshot job), but nothing in the API says so: not claimed.
    expect(vm.snapshotsQuiesced.at(-1)).toBe('vdsm');
    await expectNothingLeft(vm);
  });
});

describe('oVirt backup API: require_consistency, read back', () => {
  test('a live backup with an agent: require_consistency=true, ready means frozen; the record says filesystem', async () => {
    const vm = vms.web!;
    const result = await backup('web', ['--quiesce=required']);
    expect(result.error).toBeUndefined();
    expect(result.consistency).toEqual({ level: 'filesystem', method: 'oVirt live backup with require_consistency (VDSM froze the guest through its agent around backupBegin)', freezeMs: null, reason: null });
    expect(posts(vm, '/backups').map((p) => p.query)).toEqual(['require_consistency=true']);
    expect([...sim.backups.values()].filter((b) => b.vmId === vm.id).map((b) => [b.kind, b.quiesced])).toEqual([['live', true]]);
    await expectNothingLeft(vm);
  });

  test('no agent, required: the backup fails at the host (event 10802), ENGINE_QUIESCE_FAILED with its reason, nothing left', async () => {
    const vm = vms.noagent!;
    const result = await backup('noagent', ['--quiesce']);
    expect(result.code).toBe(1);
    expect(result.error!.code).toBe('ENGINE_QUIESCE_FAILED');
    expect(result.error!.message).toContain('QEMU guest agent is not connected');
    expect(posts(vm, '/backups').map((p) => p.query)).toEqual(['require_consistency=true']);
    expect([...sim.backups.values()].filter((b) => b.vmId === vm.id).map((b) => b.phase)).toEqual(['failed']);
    expect(vm.checkpoints).toEqual([]); // StartVmBackupCommand.endWithFailure removed the checkpoint
    await expectNothingLeft(vm);
  });

  test('no agent, try: started again without require_consistency, crash with the event\'s reason', async () => {
    const vm = vms.noagent!;
    const result = await backup('noagent', ['--quiesce=try']);
    expect(result.error).toBeUndefined();
    expect(result.consistency).toMatchObject({ level: 'crash', method: 'oVirt live backup without require_consistency after the freeze failed', freezeMs: null });
    expect(result.consistency!.reason).toContain('QEMU guest agent is not connected');
    expect(posts(vm, '/backups').map((p) => p.query).slice(-2)).toEqual(['require_consistency=true', '']);
    await expectNothingLeft(vm);
  });

  test('a hybrid backup (cluster 4.7): frozen around its snapshot until ready; the record says filesystem', async () => {
    const vm = vms.hyb!;
    const result = await backup('hyb', ['--quiesce']);
    expect(result.error).toBeUndefined();
    expect(result.consistency).toMatchObject({ level: 'filesystem', reason: null });
    expect(result.consistency!.method).toContain('freezefilesystems');
    expect([...sim.backups.values()].filter((b) => b.vmId === vm.id).map((b) => [b.kind, b.quiesced])).toEqual([['hybrid', true]]);
    expect(vm.snapshotsQuiesced).toEqual(['api']); // its snapshot was taken with the guest frozen by the engine
    expect(posts(vm, '/backups').map((p) => p.query)).toEqual(['']);
    await expectNothingLeft(vm);
  });

  test('a VM that is down: required fails before any backup starts; try records why', async () => {
    const vm = vms.cold!;
    const required = await backup('cold', ['--quiesce']);
    expect(required.error?.code).toBe('ENGINE_QUIESCE_FAILED');
    expect(required.error!.message).toContain('the VM is down');
    expect(posts(vm, '/backups')).toEqual([]);
    const tried = await backup('cold', ['--quiesce=try']);
    expect(tried.consistency).toEqual({ level: 'crash', method: 'no running guest to freeze', freezeMs: null, reason: 'the VM is down, not up: oVirt freezes only a running guest' });
    await expectNothingLeft(vm);
  });

});

describe('an oVirt older than 4.4.4 (its VDSM ignores require_consistency)', () => {
  test('a live backup is not claimed frozen: required fails before it starts, try records crash with the reason', async () => {
    const { path: oldDir, cleanup: oldCleanup } = await tempDir('engine-ovirt-quiesce-old-');
    const old = await startOvirtSim({ dir: join(oldDir, 'sim'), lockMs: 150, version: '4.4.3' });
    try {
      const vm = await old.addVm('old', [{ alias: 'old_os', size: '16M' }]);
      vm.agent = 'none'; // a freeze that fails, and that this VDSM would not report
      const oldRepo = join(oldDir, 'repo');
      await runEngine(['init', oldRepo]);
      const args = ['backup', '--repo', oldRepo, '--ovirt', old.url, '--vm', 'old', '--json'];
      const required = await runEngine([...args, '--quiesce'], { env: SIM_ENV });
      expect(required.code).toBe(1);
      expect(parseJson<{ error: { code: string; message: string } }>(required.stdout).error).toMatchObject({ code: 'ENGINE_QUIESCE_FAILED', message: expect.stringContaining('oVirt 4.4.3 is older than 4.4.4') });
      expect([...old.backups.values()]).toEqual([]);
      const tried = await runEngine([...args, '--quiesce=try'], { env: SIM_ENV });
      expect(tried.code, tried.stderr).toBe(0);
      const record = JSON.parse(await readFile(join(oldRepo, 'backups', parseJson<{ id: string }>(tried.stdout).id), 'utf8')) as { consistency: Consistency };
      expect(record.consistency).toEqual({ level: 'crash', method: 'oVirt live backup, its freeze not proven', freezeMs: null, reason: expect.stringContaining('oVirt 4.4.3 is older than 4.4.4') });
      expect(contractProblems(old.requests)).toEqual([]);
    } finally {
      await old.stop();
      await oldCleanup();
    }
  });
});

describe('the guest never stays frozen', () => {
  test('the engine killed with -9 while the guest is frozen: its watchdog thaws the guest after the freeze timeout', async () => {
    const vm = vms.web!;
    const args = ['backup', '--repo', repo, '--ovirt', sim.url, '--vm', 'web', '--appliance', 'appliance', '--device-root', sim.deviceRoot, '--quiesce'];
    const killed = await runEngine(args, { env: { ...SIM_ENV, ENGINE_CRASH_AT: 'guest-frozen', ENGINE_OVIRT_FREEZE_TIMEOUT: '2' } });
    expect(killed.code).toBe(137);
    expect(vm.frozen).toBe(true);
    expect(await watchdogs()).toHaveLength(1);
    await waitFor('the watchdog to thaw the guest', () => !vm.frozen, { everyMs: 50 });
    await waitFor('the watchdog to exit', async () => (await watchdogs()).length === 0, { everyMs: 50 });
    expect(sim.events.at(-1)).toMatchObject({ code: 10768, description: 'Guest filesystems on VM web have been thawed successfully.' });
    // The run's journal names the freeze (and the snapshot it was asking for): cleanup thaws again (a thawed
    // guest is fine) and forgets it.
    const cleaned = await runEngine(['ovirt', 'cleanup', '--repo', repo, '--ovirt', sim.url, '--json'], { env: SIM_ENV });
    expect(cleaned.code).toBe(0);
    expect(parseJson<{ messages: string[] }>(cleaned.stdout).messages).toContain(`thawed leftover freeze ${vm.id} of an interrupted run`);
    await expectNothingLeft(vm);
  });

  test('a thaw that keeps failing (agent not answering, engine gone): the watchdog keeps trying past 5 tries, until a thaw succeeds', async () => {
    const vm = vms.web!;
    const args = ['backup', '--repo', repo, '--ovirt', sim.url, '--vm', 'web', '--appliance', 'appliance', '--device-root', sim.deviceRoot, '--quiesce'];
    // The watchdog's retries from 50 ms on (ENGINE_TEST_THAW_RETRY_MS; 1 s by default), doubling up to 1.5 s.
    const killed = await runEngine(args, { env: { ...SIM_ENV, ENGINE_CRASH_AT: 'guest-frozen', ENGINE_OVIRT_FREEZE_TIMEOUT: '2', ENGINE_TEST_THAW_RETRY_MS: '50' } });
    expect(killed.code).toBe(137);
    vm.agent = 'stuck';
    const thaws = (): number => posts(vm, '/thawfilesystems').length;
    const before = thaws();
    // 5 failed tries (50, 100, 200, 400 ms apart): a watchdog with a fixed count of 5 would have given up; this one waits 800 ms.
    await waitFor('5 failed thaws', () => thaws() >= before + 5, { everyMs: 100 });
    await new Promise((resolve) => setTimeout(resolve, 1000));
    expect(vm.frozen).toBe(true);
    expect(await watchdogs()).toHaveLength(1);
    vm.agent = 'running';
    await waitFor('the watchdog to thaw the guest', () => !vm.frozen, { everyMs: 50 });
    await waitFor('the watchdog to exit', async () => (await watchdogs()).length === 0, { everyMs: 50 });
    const cleaned = await runEngine(['ovirt', 'cleanup', '--repo', repo, '--ovirt', sim.url], { env: SIM_ENV });
    expect(cleaned.code).toBe(0);
    await expectNothingLeft(vm);
  }, 120_000);

  test('a snapshot slower than the freeze timeout is not counted as quiesced: required fails and leaves nothing, try says why', async () => {
    const vm = vms.web!;
    const slow = { ...SIM_ENV, ENGINE_OVIRT_FREEZE_TIMEOUT: '0.2' }; // the simulator's snapshot takes ~0.3 s
    const args = ['backup', '--repo', repo, '--ovirt', sim.url, '--vm', 'web', '--appliance', 'appliance', '--device-root', sim.deviceRoot, '--json'];
    const required = await runEngine([...args, '--quiesce'], { env: slow });
    expect(required.code).toBe(1);
    expect(parseJson<{ error: { code: string; message: string } }>(required.stdout).error).toMatchObject({ code: 'ENGINE_QUIESCE_FAILED', message: expect.stringContaining('longer than the freeze timeout') });
    await expectNothingLeft(vm);
    const tried = await runEngine([...args, '--quiesce=try'], { env: slow });
    expect(tried.code).toBe(0);
    const record = JSON.parse(await readFile(join(repo, 'backups', parseJson<{ id: string }>(tried.stdout).id), 'utf8')) as { consistency: Consistency };
    expect(record.consistency).toMatchObject({ level: 'crash', method: 'oVirt freezefilesystems outlasted its timeout', freezeMs: null });
    await waitFor('the watchdog to exit', async () => (await watchdogs()).length === 0, { everyMs: 50 });
    await expectNothingLeft(vm);
  });

  test('a guest left frozen by a killed run (its journal) is thawed by `engine ovirt cleanup`', async () => {
    const vm = vms.web!;
    vm.frozen = true;
    const journals = await journalDir(repo);
    await mkdir(journals, { recursive: true });
    await writeFile(join(journals, '00112233445566aa.json'), JSON.stringify({ id: '00112233445566aa', created: new Date().toISOString(), context: { flow: 'ovirt-disk-attachment', vm: vm.id }, entries: [{ kind: 'freeze', vm: vm.id }] }));
    const result = await runEngine(['ovirt', 'cleanup', '--repo', repo, '--ovirt', sim.url], { env: SIM_ENV });
    expect(result.code).toBe(0);
    expect(vm.frozen).toBe(false);
    await expectNothingLeft(vm);
  });
});
