/**
 * The oVirt flows against behaviours of the real oVirt engine that the simulator reproduces from oVirt's
 * sources (test/ovirt-sim/BEHAVIOUR.md): idle transfers cancelled, inactive disks refused, checkpoint
 * redefinition failing at the POST (event 10791), an incremental failing after it (phase failed), checkpoints
 * deleted from the middle of the chain of a running VM, transfers that end through finalizing_* phases, hybrid
 * backups and their snapshots, per-disk backup modes by cluster level, disk interfaces in the OVF, storage
 * domains by status and data centre, the Down appliance, SSO logout; then imageio over HTTPS with a CA and
 * the proxy_url fallback, uploads to block storage (initial_size), and engines before 4.4.7.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { filesIdentical, parseJson, runEngine, sh, tempDir, withoutProgress, waitFor } from './helpers.js';
import { qemuIo } from './qemu.js';
import { contractProblems } from './ovirt-contract/contract.js';
import { BACKUP_SNAPSHOT_DESCRIPTION, CLUSTER_ID, DATA_CENTER_ID, STORAGE_DOMAIN_ID, startOvirtSim, type OvirtSim, type SimVm } from '../dist/test/ovirt-sim/server.js';
import { SIM_ENV, type OvirtBackupJson, type OvirtDiskJson } from './ovirt-cli.js';

const MiB = 1024 * 1024;
const env = SIM_ENV;

type Run = { code: number; out?: OvirtBackupJson; error?: string; stderr: string };

type SimOptions = Omit<Parameters<typeof startOvirtSim>[0], 'dir'>;

/** A simulator, a repository, and the engine's CLI against them; `options` may be made in the test directory. */
function setup(name: string, options: SimOptions | ((dir: string) => Promise<SimOptions>) = {}): {
  ctx: { dir: string; sim: OvirtSim; repo: string };
  backup: (vm: string, extra?: string[], extraEnv?: Record<string, string>) => Promise<Run>;
  restore: (id: string, extra: string[], extraEnv?: Record<string, string>) => Promise<{ code: number; stdout: string; stderr: string }>;
  /** A backup in text mode (notices are on stderr only then); the id is parsed from its summary. */
  backupText: (vm: string, extra?: string[]) => Promise<{ code: number; id: string | undefined; stderr: string }>;
  raw: (image: string, tag: string) => Promise<string>;
} {
  const ctx = {} as { dir: string; sim: OvirtSim; repo: string; cleanup: () => Promise<void> };
  let simOptions: SimOptions = {};
  beforeAll(async () => {
    const made = await tempDir(`engine-ovirt-${name}-`);
    ctx.dir = made.path;
    ctx.cleanup = made.cleanup;
    simOptions = typeof options === 'function' ? await options(ctx.dir) : options;
    ctx.sim = await startOvirtSim({ dir: join(ctx.dir, 'sim'), lockMs: 100, ...simOptions });
    ctx.repo = join(ctx.dir, 'repo');
    // Format 1: the run journal is read from the repository's journal/ (format 3 keeps it in the host cache).
    await runEngine(['init', ctx.repo, '--format', '1']);
  });
  afterAll(async () => {
    // Every request the engine made here follows oVirt's API model.
    expect(contractProblems(ctx.sim.requests)).toEqual([]);
    await ctx.sim.stop();
    await ctx.cleanup();
  });
  const ovirtArgs = (): string[] => ['--ovirt', ctx.sim.url, ...(simOptions.tls ? ['--ca-file', join(ctx.dir, 'ca.pem')] : [])];
  return {
    ctx,
    backup: async (vm, extra = [], extraEnv = {}) => {
      const result = await runEngine(['backup', '--repo', ctx.repo, ...ovirtArgs(), '--vm', vm, '--json', ...extra], { env: { ...env, ...extraEnv } });
      if (result.code === 0) return { code: 0, out: parseJson<OvirtBackupJson>(result.stdout), stderr: result.stderr };
      return { code: result.code, error: parseJson<{ error: { message: string } }>(result.stdout).error.message, stderr: result.stderr };
    },
    backupText: async (vm, extra = []) => {
      const result = await runEngine(['backup', '--repo', ctx.repo, ...ovirtArgs(), '--vm', vm, ...extra], { env });
      return { code: result.code, id: /backup ([0-9a-f]{32})/.exec(result.stdout)?.[1], stderr: result.stderr };
    },
    restore: (id, extra, extraEnv = {}) => runEngine(['restore', '--repo', ctx.repo, id, ...ovirtArgs(), '--json', ...extra], { env: { ...env, ...extraEnv } }),
    raw: async (image, tag) => {
      const out = join(ctx.dir, `${tag}.raw`);
      await sh('qemu-img', ['convert', '-U', '-O', 'raw', image, out]);
      return out;
    },
  };
}

function diskImage(sim: OvirtSim, vm: SimVm, i: number): string {
  return sim.disks.get(vm.disks[i]!)!.image;
}

async function settled(sim: OvirtSim): Promise<void> {
  for (let i = 0; i < 200; i += 1) {
    const busy = [...sim.backups.values()].some((b) => b.phase !== 'succeeded' && b.phase !== 'failed') || [...sim.transfers.values()].some((t) => !t.phase.startsWith('finished'));
    if (!busy) return;
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('oVirt engine behaviours, from its sources', () => {
  const { ctx, backup, backupText, restore, raw } = setup('fidelity', { inactivityTimeoutMs: 3000 });

  test('two disks, the first slower than the inactivity timeout: each transfer opens when its disk is read', async () => {
    const { sim } = ctx;
    const vm = await sim.addVm('pair', [
      { alias: 'pair_a', size: '16M' },
      { alias: 'pair_b', size: '16M' },
    ]);
    await qemuIo(diskImage(sim, vm, 0), ['write -P 0x41 0 4M']);
    await qemuIo(diskImage(sim, vm, 1), ['write -P 0x42 0 4M']);
    // Every GET of the first disk takes 6 s; oVirt stops a transfer idle for 3 s (here, as the engine asks).
    sim.faults.slowReads(vm.disks[0]!, 6000);
    const result = await backup('pair', [], { ENGINE_OVIRT_INACTIVITY_TIMEOUT: '3' });
    expect(result.error).toBeUndefined();
    expect(result.out!.disks.map((d) => [d.name, d.bytesRead])).toEqual([
      ['pair_a', 4 * MiB],
      ['pair_b', 4 * MiB],
    ]);
    const transfers = [...sim.transfers.values()].filter((t) => vm.disks.includes(t.diskId));
    expect(transfers.map((t) => [t.inactivityTimeout, t.timeoutPolicy, t.phase])).toEqual([
      [3, 'cancel', 'finished_success'],
      [3, 'cancel', 'finished_success'],
    ]);
    expect(sim.events.filter((e) => e.code === 1076)).toEqual([]);
  });

  test('an inactive disk is left out, said; the active ones are backed up', async () => {
    const { sim } = ctx;
    const vm = await sim.addVm('half', [
      { alias: 'half_os', size: '16M' },
      { alias: 'half_spare', size: '16M', active: false },
    ]);
    await qemuIo(diskImage(sim, vm, 0), ['write -P 0x51 0 1M']);
    const result = await backupText('half');
    expect(result.code).toBe(0);
    expect(await diskNames(ctx.repo, result.id!)).toEqual(['half_os']);
    expect(result.stderr).toContain(`disk half_spare (${vm.disks[1]}) is not active on VM half: oVirt backs up active disks only, it is left out`);
  });

  test('every SSO token the engine obtained is revoked (sso-logout) when it is done', async () => {
    const { sim } = ctx;
    const issued = sim.requests.filter((r) => r.path === '/ovirt-engine/sso/oauth/token' && r.status === 200).length;
    expect(issued).toBeGreaterThan(0);
    expect(sim.loggedOut).toHaveLength(issued);
    const logout = sim.requests.find((r) => r.path === '/ovirt-engine/services/sso-logout')!;
    expect(new URLSearchParams(logout.body).get('scope')).toBe('ovirt-app-api');
  });

  test('a failed checkpoint redefinition (event 10791) fails the POST; the engine backs up in full, said', async () => {
    const { sim } = ctx;
    const vm = await sim.addVm('live', [{ alias: 'live_os', size: '16M' }]);
    await qemuIo(diskImage(sim, vm, 0), ['write -P 0x61 0 2M']);
    expect((await backup('live')).out!.type).toBe('full');
    await qemuIo(diskImage(sim, vm, 0), ['write -P 0x62 8M 1M']);
    sim.faults.failNextCheckpointRedefinition();
    const result = await backup('live', ['--incremental']);
    expect(result.error).toBeUndefined();
    expect(result.out!.disks.map((d) => [d.mode, d.bytesRead])).toEqual([['full', 3 * MiB]]);
    expect(result.out!.disks[0]!.modeReason).toMatch(/^oVirt refused the incremental backup: oVirt POST .*\/backups: HTTP 500/);
    expect(sim.events.some((e) => e.code === 10791)).toBe(true);
    // The next one is incremental again, from the new chain.
    await qemuIo(diskImage(sim, vm, 0), ['write -P 0x63 12M 1M']);
    const next = await backup('live', ['--incremental']);
    expect(next.out!.disks.map((d) => [d.mode, d.parent, d.bytesRead])).toEqual([['incremental', result.out!.id, MiB]]);
  });

  test('a checkpoint of another product is never deleted; only the checkpoints this repository recorded', async () => {
    const { sim } = ctx;
    const vm = [...sim.vms.values()].find((v) => v.name === 'live')!;
    const foreign = { id: '0f0f0f0f-0000-4000-8000-00000000f0f0', parentId: vm.checkpoints.at(-1)?.id, state: 'created' as const, creationDate: new Date(), disks: [...vm.disks] };
    vm.checkpoints.push(foreign);
    await qemuIo(diskImage(sim, vm, 0), ['write -P 0x64 4M 1M']);
    const result = await backup('live');
    expect(result.out!.disks[0]!.mode).toBe('incremental');
    expect(vm.checkpoints.map((c) => c.id)).toContain(foreign.id);
    expect(vm.checkpoints.map((c) => c.id).at(-1)).toBe(result.out!.disks[0]!.checkpoint);
  });

  test('an incremental oVirt accepts and then fails (phase failed: the host finds its checkpoint bitmap gone) is redone in full, said; the chain goes on', async () => {
    const { sim } = ctx;
    const vm = await sim.addVm('lost', [{ alias: 'lost_os', size: '16M' }]);
    await qemuIo(diskImage(sim, vm, 0), ['write -P 0x91 0 2M']);
    const full = await backup('lost');
    expect(full.out!.type).toBe('full');
    const c0 = full.out!.disks[0]!.checkpoint!;
    await sim.faults.loseCheckpointBitmap(vm, c0);
    await qemuIo(diskImage(sim, vm, 0), ['write -P 0x92 8M 1M']);
    const eventsBefore = sim.events.length;
    const backupsBefore = sim.backups.size;
    const text = await backupText('lost', ['--incremental']);
    expect(text.code).toBe(0);
    // oVirt answered the POST (201), then failed the backup as it started: not event 10791, which comes with a failed POST.
    const [failed] = [...sim.backups.values()].slice(backupsBefore);
    expect(failed!.phase).toBe('failed');
    expect(failed!.from).toBe(c0);
    expect(sim.events.slice(eventsBefore).map((e) => e.code)).toContain(10792);
    expect(sim.events.slice(eventsBefore).map((e) => e.code)).not.toContain(10791);
    const out = (await runEngine(['show', '--repo', ctx.repo, text.id!, '--json'])).stdout;
    const disk = parseJson<{ disks: OvirtDiskJson[] }>(out).disks[0]!;
    expect([disk.mode, disk.bytesRead]).toEqual(['full', 3 * MiB]);
    expect(disk.modeReason).toBe(`oVirt failed the incremental backup from checkpoint ${c0} before it was ready (phase failed; oVirt's events say why): a full backup instead`);
    // The failed backup's checkpoint row is gone (endWithFailure); c0 cannot be deleted on the running VM (its bitmap is lost): said, kept.
    expect(vm.checkpoints.map((c) => c.id)).toEqual([c0, disk.checkpoint]);
    expect(withoutProgress(text.stderr)).toContain(`could not delete old checkpoint ${c0}: `);
    expect(sim.events.slice(eventsBefore).map((e) => e.code)).toContain(10798);
    // The next incremental reads from the new full's checkpoint: exactly what changed.
    await qemuIo(diskImage(sim, vm, 0), ['write -P 0x93 12M 1M']);
    const next = await backup('lost', ['--incremental']);
    expect(next.out!.disks.map((d) => [d.mode, d.parent, d.bytesRead])).toEqual([['incremental', text.id, MiB]]);
    const expected = await raw(diskImage(sim, vm, 0), 'lost-2');
    const restored = join(ctx.dir, 'lost-restored.raw');
    expect((await runEngine(['restore', '--repo', ctx.repo, next.out!.id, '--to', restored])).code).toBe(0);
    expect(await filesIdentical(restored, expected)).toBe(true);
  });

  test('on a running VM a checkpoint in the middle of the chain is deleted (oVirt and libvirt allow it): its bitmap leaves the image, its child is re-parented; one oVirt cannot delete does not keep the others', async () => {
    const { sim } = ctx;
    const vm = [...sim.vms.values()].find((v) => v.name === 'lost')!;
    expect(vm.status).toBe('up');
    const [c0, c1, c2] = vm.checkpoints.map((c) => c.id);
    await qemuIo(diskImage(sim, vm, 0), ['write -P 0x94 4M 1M']);
    const eventsBefore = sim.events.length;
    const text = await backupText('lost', ['--incremental']);
    expect(text.code).toBe(0);
    const c3 = vm.checkpoints.at(-1)!.id;
    // Kept: c1 (the chain's full) and c3 (the newest). c2, between them, is deleted although c0 (oldest, bitmap lost) could not be.
    expect(vm.checkpoints.map((c) => c.id)).toEqual([c0, c1, c3]);
    expect(vm.checkpoints.find((c) => c.id === c3)!.parentId).toBe(c1);
    expect(sim.events.slice(eventsBefore).map((e) => e.code).filter((code) => code === 10797 || code === 10798)).toEqual([10798, 10797]);
    expect(withoutProgress(text.stderr)).toContain(`could not delete old checkpoint ${c0}: `);
    const info = JSON.parse(await sh('qemu-img', ['info', '-U', '--output=json', diskImage(sim, vm, 0)])) as { 'format-specific': { data: { bitmaps?: { name: string }[] } } };
    expect(info['format-specific'].data.bitmaps!.map((b) => b.name).sort()).toEqual([`sim-${c1}`, `sim-${c3}`].sort());
    expect(c2).toBeDefined();
  });

  test('a transfer oVirt stops ends through finalizing_* in finished_*; the backup is finalized after it, without a 409', async () => {
    const { sim } = ctx;
    sim.faults.stopNextTransfer();
    const before = sim.requests.length;
    const result = await backup('half');
    expect(result.code).toBe(1);
    expect(result.error).toMatch(/the transfer went to phase (cancelled_system|finalizing_failure|finished_failure) instead of transferring/);
    await settled(sim);
    const stopped = [...sim.transfers.values()].at(-1)!;
    expect(stopped.phase.startsWith('finished')).toBe(true);
    expect(sim.requests.slice(before).filter((r) => r.path.endsWith('/finalize') && r.status === 409)).toEqual([]);
    expect([...sim.backups.values()].at(-1)!.phase).toMatch(/^(succeeded|failed)$/);
  });

  test('kill -9 in the middle of a disk: cleanup cancels its transfer, waits until it has ended, finalizes the backup, deletes the orphan checkpoint', async () => {
    const { sim } = ctx;
    const vm = await sim.addVm('crash', [
      { alias: 'crash_a', size: '64M' },
      { alias: 'crash_b', size: '16M' },
    ]);
    // 40 MiB that do not compress: a pack (32 MiB) is written while the first disk is read.
    const random = join(ctx.dir, 'random.raw');
    await sh('bash', ['-c', `head -c 40M /dev/urandom > ${random} && truncate -s 64M ${random}`]);
    await sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', random, diskImage(sim, vm, 0)]);
    const crashed = await runEngine(['backup', '--repo', ctx.repo, '--ovirt', sim.url, '--vm', 'crash'], { env: { ...env, ENGINE_CRASH_AT: 'pack-written' } });
    expect(crashed.code).toBe(137);
    const journals = await readdir(join(ctx.repo, 'journal'));
    expect(journals).toHaveLength(1);
    const journal = JSON.parse(await readFile(join(ctx.repo, 'journal', journals[0]!), 'utf8')) as { entries: { kind: string }[] };
    expect(journal.entries.map((e) => e.kind).sort()).toEqual(['backup', 'checkpoint', 'transfer']);
    expect(vm.checkpoints).toHaveLength(1);
    const before = sim.requests.length;
    const cleaned = await runEngine(['ovirt', 'cleanup', '--repo', ctx.repo, '--ovirt', sim.url, '--json'], { env });
    expect(cleaned.code).toBe(0);
    expect(parseJson<{ removed: number }>(cleaned.stdout).removed).toBe(3);
    const after = sim.requests.slice(before);
    // The transfer had ended (finished_*) before the backup was finalized: oVirt never had to refuse it.
    expect(after.filter((r) => r.status === 409)).toEqual([]);
    expect([...sim.transfers.values()].filter((t) => t.diskId === vm.disks[0]).map((t) => t.phase)).toEqual(['finished_failure']);
    expect([...sim.backups.values()].at(-1)!.phase).toMatch(/^(succeeded|failed)$/);
    expect(vm.checkpoints).toEqual([]);
    expect(await readdir(join(ctx.repo, 'journal'))).toEqual([]);
  });

  test('below cluster level 4.5 oVirt cannot mix full and incremental disks: every disk is read in full, said', async () => {
    const { sim } = ctx;
    sim.addCluster('Old', [4, 4]);
    const vm = await sim.addVm('old', [{ alias: 'old_os', size: '16M' }], 'down', { cluster: 'Old' });
    await qemuIo(diskImage(sim, vm, 0), ['write -P 0x71 0 1M']);
    expect((await backup('old')).code).toBe(0);
    const added = await sim.addDisk(vm, 'old_new', '16M');
    await qemuIo(added.image, ['write -P 0x72 0 1M']);
    const result = await backup('old', ['--incremental']);
    expect(result.error).toBeUndefined();
    expect(result.out!.disks.map((d) => [d.name, d.mode])).toEqual([
      ['old_os', 'full'],
      ['old_new', 'full'],
    ]);
    expect(result.out!.disks[0]!.modeReason).toBe('oVirt below cluster level 4.5 (cluster Old is 4.4) cannot mix full and incremental disks in one backup, and another disk of the VM needs a full backup');
  });

  test('hybrid backups (cluster 4.7): a chain over snapshot-based backups, and the snapshot oVirt failed to remove is removed', async () => {
    const { sim } = ctx;
    sim.addCluster('Hybrid', [4, 7]);
    const vm = await sim.addVm('hyb', [{ alias: 'hyb_os', size: '32M' }], 'up', { cluster: 'Hybrid' });
    await qemuIo(diskImage(sim, vm, 0), ['write -P 0x81 0 3M']);
    const full = await backup('hyb');
    expect(full.error).toBeUndefined();
    expect([...sim.backups.values()].at(-1)!.kind).toBe('hybrid');
    await qemuIo(diskImage(sim, vm, 0), ['write -P 0x82 20M 1M']);
    const expected = await raw(diskImage(sim, vm, 0), 'hyb-1');
    sim.faults.failNextBackupSnapshotRemoval();
    const text = await backupText('hyb', ['--incremental']);
    expect(text.code).toBe(0);
    const inc = { out: await showJson(ctx.repo, text.id!) };
    expect(inc.out.disks.map((d) => [d.mode, d.parent, d.bytesRead])).toEqual([['incremental', full.out!.id, MiB]]);
    expect(sim.events.some((e) => e.code === 10813)).toBe(true);
    expect(text.stderr).toContain(`("${BACKUP_SNAPSHOT_DESCRIPTION}") that oVirt left after the backup (event 10813)`);
    await waitFor('the snapshot is removed', () => vm.snapshots.size === 0, { everyMs: 50 });
    expect([...vm.snapshots.values()].map((s) => s.description)).toEqual([]);
    const restored = join(ctx.dir, 'hyb.raw');
    expect((await runEngine(['restore', '--repo', ctx.repo, inc.out!.id, '--to', restored])).code).toBe(0);
    expect(await filesIdentical(restored, expected)).toBe(true);
  });

  test('a leftover "Auto-generated for Backup VM" snapshot is removed before the next backup of the VM', async () => {
    const { sim } = ctx;
    const vm = [...sim.vms.values()].find((v) => v.name === 'hyb')!;
    // A leftover of a crashed run: a snapshot oVirt's hybrid backup made, no backup using it.
    const token = await getToken(sim);
    const made = await fetch(`${sim.url}/ovirt-engine/api/vms/${vm.id}/snapshots`, { method: 'POST', headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/xml' }, body: `<snapshot><description>${BACKUP_SNAPSHOT_DESCRIPTION}</description></snapshot>` });
    expect(made.status).toBe(202);
    await waitFor('the snapshot is unlocked', () => ![...vm.snapshots.values()].some((s) => s.status === 'locked'), { everyMs: 50 });
    const result = await backupText('hyb');
    expect(result.code).toBe(0);
    expect(result.stderr).toContain(`("${BACKUP_SNAPSHOT_DESCRIPTION}") left by an earlier backup (event 10813)`);
    await waitFor('the snapshot is removed', () => vm.snapshots.size === 0, { everyMs: 50 });
    expect(vm.snapshots.size).toBe(0);
  });

  test('restored disks are attached with the interface and boot flag the OVF gives them', async () => {
    const { sim } = ctx;
    const vm = await sim.addVm('scsi', [
      { alias: 'scsi_os', size: '16M', interface: 'virtio_scsi', bootable: true },
      { alias: 'scsi_data', size: '16M', interface: 'sata', bootable: false },
    ]);
    await qemuIo(diskImage(sim, vm, 0), ['write -P 0x91 0 1M']);
    const result = await backup('scsi');
    expect(result.error).toBeUndefined();
    const restored = await restore(result.out!.id, ['--new-vm', 'scsi-restored', '--via', 'transfer']);
    expect(withoutProgress(restored.stderr)).toBe('');
    expect(restored.code).toBe(0);
    const out = parseJson<{ vm: { id: string }; disks: { id: string }[] }>(restored.stdout);
    const attachments = [...sim.vms.get(out.vm.id)!.attachments.values()];
    expect(attachments.map((a) => [a.diskId, a.interface, a.bootable])).toEqual([
      [out.disks[0]!.id, 'virtio_scsi', true],
      [out.disks[1]!.id, 'sata', false],
    ]);
    // The original VM still exists: the import took new ids (regenerate_ids).
    expect(out.vm.id).not.toBe(vm.id);
  });

  test('an OVF import keeping the ids of a VM that exists is refused (409), as oVirt does', async () => {
    const { sim } = ctx;
    const vm = [...sim.vms.values()].find((v) => v.name === 'scsi')!;
    const token = await getToken(sim);
    const record = JSON.parse(await readFile(join(ctx.repo, 'backups', (await lastBackupOf(ctx.repo, 'scsi')).id), 'utf8')) as { attachments: { name: string; data: string }[] };
    const body = `<vm><name>scsi-copy</name><cluster id="${CLUSTER_ID}"/><initialization><configuration><type>ovf</type><data>${escapeXml(record.attachments.find((a) => a.name === 'ovf')!.data)}</data></configuration></initialization></vm>`;
    const answer = await fetch(`${sim.url}/ovirt-engine/api/vms`, { method: 'POST', headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/xml' }, body });
    expect(answer.status).toBe(409);
    expect(await answer.text()).toContain(`VM ID already exists in the system. Please remove the VM (${vm.name}) from the system first`);
  });

  test('an upload the system pauses as it starts is cancelled at once; oVirt removes its disk, nothing is left', async () => {
    const { sim } = ctx;
    const disksBefore = [...sim.disks.keys()].sort();
    sim.faults.stopNextTransfer();
    const started = Date.now();
    const result = await restore((await lastBackupOf(ctx.repo, 'scsi')).id, ['--new-vm', 'scsi-paused', '--via', 'transfer']);
    expect(result.code).toBe(1);
    expect(parseJson<{ error: { message: string } }>(result.stdout).error.message).toMatch(/the transfer went to phase paused_system instead of transferring \(cancelled\)/);
    expect(Date.now() - started).toBeLessThan(60_000);
    await settled(sim);
    const paused = [...sim.transfers.values()].at(-1)!;
    expect(paused.phase).toBe('finished_failure');
    expect(sim.requests.some((r) => r.method === 'POST' && r.path === `/ovirt-engine/api/imagetransfers/${paused.id}/cancel`)).toBe(true);
    expect([...sim.disks.keys()].sort()).toEqual(disksBefore);
    expect([...sim.vms.values()].some((v) => v.name === 'scsi-paused')).toBe(false);
  }, 90_000);

  test('the appliance must be running: a Down appliance is a clear error at once, not a wait for a device', async () => {
    const { sim } = ctx;
    await sim.addVm('sleeper', [], 'down');
    const started = Date.now();
    const result = await backup('scsi', ['--appliance', 'sleeper', '--device-root', sim.deviceRoot]);
    expect(result.code).toBe(2);
    expect(result.error).toBe('the appliance VM "sleeper" is down, not up: disks can only be hot-plugged into a running appliance');
    expect(Date.now() - started).toBeLessThan(30_000);
  }, 40_000);

  test('new disks go to an active data domain of the cluster\'s data centre, the one with the most room', async () => {
    const { sim } = ctx;
    const home = sim.storageDomains.get(STORAGE_DOMAIN_ID)!;
    home.status = 'maintenance';
    const elsewhere = sim.addDataCenter('Elsewhere');
    sim.addStorageDomain({ name: 'far', storage: 'nfs', dataCenter: elsewhere, available: 1024 * 1024 * MiB });
    sim.addStorageDomain({ name: 'unattached', storage: 'nfs', dataCenter: undefined, available: 1024 * 1024 * MiB });
    const small = sim.addStorageDomain({ name: 'small', storage: 'nfs', dataCenter: DATA_CENTER_ID, available: 64 * MiB });
    const near = sim.addStorageDomain({ name: 'near', storage: 'nfs', dataCenter: DATA_CENTER_ID, available: 128 * MiB });
    try {
      const result = await restore((await lastBackupOf(ctx.repo, 'scsi')).id, ['--new-vm', 'scsi-near', '--via', 'transfer']);
      expect(withoutProgress(result.stderr)).toBe('');
      expect(result.code).toBe(0);
      const out = parseJson<{ disks: { id: string }[] }>(result.stdout);
      expect(out.disks.map((d) => sim.disks.get(d.id)!.storageDomain)).toEqual([near, near]);
      const named = await restore((await lastBackupOf(ctx.repo, 'scsi')).id, ['--new-vm', 'scsi-far', '--via', 'transfer', '--storage-domain', 'far']);
      expect(named.code).toBe(2);
      expect(parseJson<{ error: { message: string } }>(named.stdout).error.message).toBe('oVirt has no data storage domain "far" in the data centre of cluster Default');
      expect(small).toBeDefined();
    } finally {
      home.status = 'active';
    }
  });
});

/**
 * A CA (ca.pem, given to the engine with --ca-file) and a certificate for 127.0.0.1 signed by it: what an
 * oVirt engine and its hosts present (their certificates are signed by the engine's CA).
 */
async function certificateSignedByCa(dir: string): Promise<{ key: string; cert: string }> {
  const path = (name: string): string => join(dir, name);
  await sh('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', path('ca.key'), '-out', path('ca.pem'), '-days', '1', '-subj', '/CN=engine-test-ca', '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
  await sh('openssl', ['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', path('key.pem'), '-out', path('req.csr'), '-subj', '/CN=127.0.0.1']);
  await writeFile(path('san.ext'), 'subjectAltName=IP:127.0.0.1\n');
  await sh('openssl', ['x509', '-req', '-in', path('req.csr'), '-CA', path('ca.pem'), '-CAkey', path('ca.key'), '-CAcreateserial', '-out', path('cert.pem'), '-days', '1', '-extfile', path('san.ext')]);
  return { key: await readFile(path('key.pem'), 'utf8'), cert: await readFile(path('cert.pem'), 'utf8') };
}

async function getToken(sim: OvirtSim): Promise<string> {
  const answer = await fetch(`${sim.url}/ovirt-engine/sso/oauth/token`, { method: 'POST', headers: { 'Content-Type': 'application/x-www-form-urlencoded', Accept: 'application/json' }, body: 'grant_type=password&scope=ovirt-app-api&username=admin%40internal&password=secret' });
  return ((await answer.json()) as { access_token: string }).access_token;
}

function escapeXml(value: string): string {
  return value.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

async function showJson(repo: string, id: string): Promise<{ id: string; disks: { name: string; mode: string; parent: string | null; bytesRead: number }[] }> {
  return parseJson((await runEngine(['show', '--repo', repo, id, '--json'])).stdout);
}

async function diskNames(repo: string, id: string): Promise<string[]> {
  return (await showJson(repo, id)).disks.map((d) => d.name);
}

async function lastBackupOf(repo: string, name: string): Promise<{ id: string }> {
  const list = parseJson<{ backups: { id: string; name: string }[] }>((await runEngine(['list', '--repo', repo, '--json'])).stdout).backups;
  return list.filter((b) => b.name === name).at(-1)!;
}

describe('engines before 4.4.7 delete a transfer as soon as it ends', () => {
  const { ctx, backup, restore, raw } = setup('old-engine', { version: '4.4.6' });

  test('an upload whose transfer is gone after finalize is judged by its disk: ok is success', async () => {
    const { sim } = ctx;
    const vm = await sim.addVm('legacy', [{ alias: 'legacy_os', size: '16M' }]);
    await qemuIo(diskImage(sim, vm, 0), ['write -P 0xa1 0 3M']);
    const expected = await raw(diskImage(sim, vm, 0), 'legacy');
    const result = await backup('legacy');
    expect(result.error).toBeUndefined();
    const restored = await restore(result.out!.id, ['--new-vm', 'legacy-restored', '--via', 'transfer']);
    expect(withoutProgress(restored.stderr)).toBe('');
    expect(restored.code).toBe(0);
    const out = parseJson<{ disks: { id: string }[] }>(restored.stdout);
    expect(await filesIdentical(await raw(sim.disks.get(out.disks[0]!.id)!.image, 'legacy-restored'), expected)).toBe(true);
    await settled(sim);
    expect(sim.transfers.size).toBe(0); // every transfer was deleted once it ended
  });
});

describe('imageio over HTTPS with the engine CA, the proxy fallback, and block storage', () => {
  const { ctx, backup, backupText, restore, raw } = setup('tls', async (dir) => ({ tls: await certificateSignedByCa(dir), blockChunkBytes: MiB }));

  test('backup and upload restore through imageio over HTTPS, trusted through --ca-file; without it, one clear error', async () => {
    const { sim } = ctx;
    const vm = await sim.addVm('secure', [{ alias: 'secure_os', size: '16M' }]);
    await qemuIo(diskImage(sim, vm, 0), ['write -P 0xb1 0 5M']);
    const expected = await raw(diskImage(sim, vm, 0), 'secure');
    expect(sim.imageioUrl).toMatch(/^https:/);
    const result = await backup('secure');
    expect(result.error).toBeUndefined();
    expect(result.out!.disks[0]!.bytesRead).toBe(5 * MiB);
    const restored = await restore(result.out!.id, ['--new-vm', 'secure-restored', '--via', 'transfer']);
    expect(restored.code).toBe(0);
    const out = parseJson<{ disks: { id: string }[] }>(restored.stdout);
    expect(await filesIdentical(await raw(sim.disks.get(out.disks[0]!.id)!.image, 'secure-restored'), expected)).toBe(true);
    const untrusted = await runEngine(['backup', '--repo', ctx.repo, '--ovirt', sim.url, '--vm', 'secure', '--json'], { env });
    expect(untrusted.code).not.toBe(0);
    expect(parseJson<{ error: { message: string } }>(untrusted.stdout).error.message).toMatch(/cannot connect: .*(self[- ]signed certificate|unable to (get local issuer|verify the first) certificate).*--ca-file/);
  });

  test('when the host\'s imageio cannot be reached, the engine\'s proxy (proxy_url) serves the transfer', async () => {
    const { sim } = ctx;
    const vm = [...sim.vms.values()].find((v) => v.name === 'secure')!;
    await qemuIo(diskImage(sim, vm, 0), ['write -P 0xb2 8M 1M']);
    const expected = await raw(diskImage(sim, vm, 0), 'secure-2');
    await sim.imageio.stopDaemon();
    const text = await backupText('secure');
    expect(text.code).toBe(0);
    const result = { out: await showJson(ctx.repo, text.id!) };
    expect(result.out.disks.map((d) => [d.mode, d.bytesRead])).toEqual([['incremental', MiB]]);
    expect(text.stderr).toContain("disk secure_os: the host's imageio (transfer_url) cannot be reached, reading through the engine's proxy (proxy_url)");
    const restored = await restore(result.out.id, ['--new-vm', 'secure-proxy', '--via', 'transfer']);
    expect(restored.code).toBe(0);
    const out = parseJson<{ disks: { id: string }[] }>(restored.stdout);
    expect(await filesIdentical(await raw(sim.disks.get(out.disks[0]!.id)!.image, 'secure-proxy'), expected)).toBe(true);
  });

  test('an upload to block storage sizes its volume with initial_size (qemu-img measure), or it could not hold the data', async () => {
    const { sim } = ctx;
    sim.addStorageDomain({ name: 'san', storage: 'iscsi', dataCenter: DATA_CENTER_ID });
    const id = (await lastBackupOf(ctx.repo, 'secure')).id;
    const expected = await raw(diskImage(sim, [...sim.vms.values()].find((v) => v.name === 'secure')!, 0), 'secure-3');
    const restored = await restore(id, ['--new-vm', 'secure-san', '--via', 'transfer', '--storage-domain', 'san']);
    expect(withoutProgress(restored.stderr)).toBe('');
    expect(restored.code).toBe(0);
    const out = parseJson<{ disks: { id: string }[] }>(restored.stdout);
    const disk = sim.disks.get(out.disks[0]!.id)!;
    // Without initial_size the volume would be one 1 MiB extension chunk; the restore point holds 6 MiB.
    expect(disk.lvSize).toBeGreaterThan(6 * MiB);
    expect(await filesIdentical(await raw(sim.imageSpec(disk), 'secure-san'), expected)).toBe(true);
  });
});

