/**
 * The disk-attachment backup flow end to end, against the oVirt simulator on real qcow2 disks: the real
 * CLI as the backup appliance would run it, byte-identical restores, the OVF kept, and nothing left behind
 * (snapshots, attachments, devices, journal) after success, injected faults or a kill -9.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { filesIdentical, parseJson, runEngine, sh, tempDir, expectRestoreIdentical, withoutProgress, journalDir, waitFor } from './helpers.js';
import { qemuIo } from './qemu.js';
import { contractProblems } from './ovirt-contract/contract.js';
import { startOvirtSim, type OvirtSim, type SimVm } from '../dist/test/ovirt-sim/server.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;
let sim: OvirtSim;
let vm: SimVm;
let repo: string;
/** The first backup and what its disks held. */
let first: { id: string; expected: string[] };
// The simulator serves plain http: said explicitly, as a user must (--insecure-http, here through the environment).
const env = { ENGINE_OVIRT_USER: 'admin@internal', ENGINE_OVIRT_PASSWORD: 'secret', ENGINE_OVIRT_INSECURE_HTTP: '1' };

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-ovirt-flow-'));
  sim = await startOvirtSim({ dir: join(dir, 'sim'), lockMs: 200 });
  vm = await sim.addVm('vm1', [
    { alias: 'vm1_Disk1', size: '64M' },
    { alias: 'vm1_Disk2', size: '32M' },
  ]);
  await sim.addVm('appliance', []);
  const [d1, d2] = vm.disks.map((id) => sim.disks.get(id)!);
  await qemuIo(d1!.image, ['write -P 0xa1 0 4M', 'write -P 0xa2 40M 1M']);
  await qemuIo(d2!.image, ['write -P 0xb1 8M 2M']);
  repo = join(dir, 'repo');
  await runEngine(['init', repo]);
});
afterAll(async () => {
  // Every request the engine made here follows oVirt's API model.
  expect(contractProblems(sim.requests)).toEqual([]);
  await sim.stop();
  await cleanup();
});

function backupArgs(): string[] {
  return ['backup', '--repo', repo, '--ovirt', sim.url, '--vm', 'vm1', '--appliance', 'appliance', '--device-root', sim.deviceRoot, '--json'];
}

/** What the disks hold now, as raw files (the snapshot must capture exactly this). */
async function expectedRaw(tag: string): Promise<string[]> {
  const out: string[] = [];
  for (const id of vm.disks) {
    const raw = join(dir, `expected-${tag}-${id}.raw`);
    await sh('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', sim.disks.get(id)!.image, raw]);
    out.push(raw);
  }
  return out;
}

/** Every disk of backup `id` restores byte for byte to the image it was taken from. */
async function expectRestores(id: string, expected: string[]): Promise<void> {
  for (const [i, disk] of ['vm1_Disk1', 'vm1_Disk2'].entries()) await expectRestoreIdentical(repo, id, expected[i]!, { dir, disk });
}

async function expectNoLeftovers(): Promise<void> {
  // Wait for the simulator's asynchronous snapshot removal to finish.
  await waitFor('the snapshot is removed', () => vm.snapshots.size === 0, { everyMs: 50 });
  expect([...vm.snapshots.keys()]).toEqual([]);
  const appliance = [...sim.vms.values()].find((v) => v.name === 'appliance')!;
  expect([...appliance.attachments.keys()]).toEqual([]);
  expect(await readdir(sim.deviceRoot)).toEqual([]);
  expect(await readdir(await journalDir(repo)).catch(() => [])).toEqual([]);
}

describe('oVirt disk-attachment backup', () => {
  test('snapshot, OVF, attach by serial, back up, detach, remove: restores byte for byte, nothing left', async () => {
    const expected = await expectedRaw('1');
    const result = await runEngine(backupArgs(), { env });
    expect(withoutProgress(result.stderr)).toBe('');
    expect(result.code).toBe(0);
    const backup = parseJson<{ id: string; name: string; disks: { name: string; size: number; bytesRead: number; source: { path: string } }[]; attachments: { name: string }[] }>(result.stdout);
    expect(backup.name).toBe('vm1');
    expect(backup.disks.map((d) => [d.name, d.size])).toEqual([
      ['vm1_Disk1', 64 * MiB],
      ['vm1_Disk2', 32 * MiB],
    ]);
    expect(backup.disks[0]!.source.path).toBe(join(sim.deviceRoot, `virtio-${vm.disks[0]!.slice(0, 20)}`));
    expect(backup.attachments.map((a) => a.name)).toEqual(['ovf', 'ovirt-vm']);
    const record = JSON.parse(await (await import('node:fs/promises')).readFile(join(repo, 'backups', backup.id), 'utf8')) as { attachments: { name: string; data: string }[] };
    expect(record.attachments[0]!.data).toContain(`<Section ovf:id="${vm.id}" ovf:required="false" xsi:type="ovf:OperatingSystemSection_Type">`);
    // The snapshot went through the documented request shapes.
    const snapshotPost = sim.requests.find((r) => r.method === 'POST' && r.path.endsWith('/snapshots'));
    expect(snapshotPost?.status).toBe(202);
    await expectNoLeftovers();
    await expectRestores(backup.id, expected);
    first = { id: backup.id, expected };
  });

  test('a snapshot that fails to be created is a clear error, and leaves nothing', async () => {
    sim.faults.failNextSnapshot();
    const result = await runEngine(backupArgs().filter((a) => a !== '--json'), { env });
    expect(result.code).toBe(1);
    expect(result.stderr).toContain('snapshot creation failed');
    await expectNoLeftovers();
  });

  test('409 on detach is retried; an expired token mid-run is renewed', async () => {
    await qemuIo(sim.disks.get(vm.disks[0]!)!.image, ['write -P 0xa3 20M 1M']);
    const expected = await expectedRaw('3');
    sim.faults.conflict('DELETE', /\/diskattachments\//, 2);
    sim.faults.expireTokensAfter(6);
    const result = await runEngine(backupArgs(), { env });
    expect(result.code).toBe(0);
    expect(sim.requests.filter((r) => r.method === 'DELETE' && r.path.includes('/diskattachments/') && r.status === 409)).toHaveLength(2);
    expect(sim.requests.some((r) => r.status === 401)).toBe(true);
    await expectNoLeftovers();
    await expectRestores(parseJson<{ id: string }>(result.stdout).id, expected);
  });

  test('kill -9 mid-backup leaves a journal; `engine ovirt cleanup` removes every leftover', async () => {
    const crashed = await runEngine(backupArgs(), { env: { ...env, ENGINE_CRASH_AT: 'before-record' } });
    expect(crashed.code).toBe(137);
    expect(vm.snapshots.size).toBe(1);
    expect((await readdir(sim.deviceRoot)).length).toBe(2);
    expect((await readdir(await journalDir(repo))).length).toBe(1);
    const cleaned = await runEngine(['ovirt', 'cleanup', '--repo', repo, '--ovirt', sim.url, '--json'], { env });
    expect(cleaned.code).toBe(0);
    expect(parseJson<{ removed: number }>(cleaned.stdout).removed).toBe(3); // two attachments, one snapshot
    await expectNoLeftovers();
  });

  test('after another kill -9, the next run cleans up by itself and succeeds', async () => {
    const crashed = await runEngine(backupArgs(), { env: { ...env, ENGINE_CRASH_AT: 'before-record' } });
    expect(crashed.code).toBe(137);
    const expected = await expectedRaw('5');
    const next = await runEngine(backupArgs().filter((a) => a !== '--json'), { env });
    expect(next.code).toBe(0);
    expect(next.stderr).toContain('removed leftover snapshot');
    await expectNoLeftovers();
    const id = /backup ([0-9a-f]{32})/.exec(next.stdout)![1]!;
    await expectRestores(id, expected);
  });

  test('credentials never come from the command line; missing ones are a usage error', async () => {
    const result = await runEngine(backupArgs(), { env: { ...env, ENGINE_OVIRT_USER: '', ENGINE_OVIRT_PASSWORD: '' } });
    expect(result.code).toBe(2);
    expect(parseJson<{ error: { message: string } }>(result.stdout).error.message).toContain('give --ovirt-credentials FILE or set ENGINE_OVIRT_USER and ENGINE_OVIRT_PASSWORD');
  });

  test('restore to a new VM: new disks written through the appliance, the VM created from the same OVF', async () => {
    const result = await runEngine(['restore', '--repo', repo, first.id, '--ovirt', sim.url, '--new-vm', 'vm1-restored', '--appliance', 'appliance', '--device-root', sim.deviceRoot, '--json'], { env });
    expect(withoutProgress(result.stderr)).toBe('');
    expect(result.code).toBe(0);
    const out = parseJson<{ vm: { id: string; name: string }; disks: { name: string; id: string }[] }>(result.stdout);
    const created = sim.vms.get(out.vm.id)!;
    expect(created.name).toBe('vm1-restored');
    const record = JSON.parse(await (await import('node:fs/promises')).readFile(join(repo, 'backups', first.id), 'utf8')) as { attachments: { name: string; data: string }[] };
    expect(created.importedOvf).toBe(record.attachments[0]!.data); // the same OVF
    expect([...created.attachments.keys()].sort()).toEqual(out.disks.map((d) => d.id).sort()); // attached explicitly: new ids
    for (const [i, disk] of out.disks.entries()) {
      expect(vm.disks).not.toContain(disk.id);
      const raw = join(dir, `restored-vm-${i}.raw`);
      await sh('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', sim.disks.get(disk.id)!.image, raw]);
      expect(await filesIdentical(raw, first.expected[i]!)).toBe(true);
    }
    await expectNoLeftovers();
  });

  test('restore one disk into a new disk of an existing VM', async () => {
    const target = await sim.addVm('target', [], 'down');
    const result = await runEngine(['restore', '--repo', repo, first.id, '--disk', 'vm1_Disk2', '--ovirt', sim.url, '--to-vm', 'target', '--appliance', 'appliance', '--device-root', sim.deviceRoot, '--json'], { env });
    expect(result.code).toBe(0);
    const out = parseJson<{ disks: { id: string }[] }>(result.stdout);
    expect([...target.attachments.keys()]).toEqual([out.disks[0]!.id]);
    const raw = join(dir, 'restored-one.raw');
    await sh('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', sim.disks.get(out.disks[0]!.id)!.image, raw]);
    expect(await filesIdentical(raw, first.expected[1]!)).toBe(true);
    await expectNoLeftovers();
  });

  test('a restore that fails removes the disks it created', async () => {
    const disksBefore = [...sim.disks.keys()].sort();
    sim.faults.conflict('POST', /^\/vms$/, 1);
    const result = await runEngine(['restore', '--repo', repo, first.id, '--ovirt', sim.url, '--new-vm', 'vm1-bad', '--appliance', 'appliance', '--device-root', sim.deviceRoot], { env: { ...env, ENGINE_OVIRT_CONFLICT_RETRIES: '0' } });
    expect(result.code).toBe(1);
    expect(result.stderr).toContain('HTTP 409');
    expect([...sim.disks.keys()].sort()).toEqual(disksBefore);
    expect([...sim.vms.values()].some((v) => v.name === 'vm1-bad')).toBe(false);
    await expectNoLeftovers();
  });

  test('a cluster that does not exist is a usage error before anything is created', async () => {
    const disksBefore = [...sim.disks.keys()].sort();
    const result = await runEngine(['restore', '--repo', repo, first.id, '--ovirt', sim.url, '--new-vm', 'vm1-bad', '--cluster', 'Nope', '--appliance', 'appliance', '--device-root', sim.deviceRoot], { env });
    expect(result.code).toBe(2);
    expect(result.stderr).toContain('oVirt has no cluster named "Nope"');
    expect([...sim.disks.keys()].sort()).toEqual(disksBefore);
  });

  test('disaster recovery with the original disk ids: the OVF import attaches the disks itself', async () => {
    // The original VM and its disks are gone.
    for (const id of vm.disks) sim.disks.delete(id);
    sim.vms.delete(vm.id);
    const result = await runEngine(['restore', '--repo', repo, first.id, '--ovirt', sim.url, '--new-vm', 'vm1', '--keep-disk-ids', '--appliance', 'appliance', '--device-root', sim.deviceRoot, '--json'], { env });
    expect(result.code).toBe(0);
    const out = parseJson<{ vm: { id: string }; disks: { id: string }[] }>(result.stdout);
    expect(out.disks.map((d) => d.id)).toEqual(vm.disks);
    const created = sim.vms.get(out.vm.id)!;
    expect(created.disks).toEqual(vm.disks); // attached by the import, from the OVF
    const explicitAttach = sim.requests.filter((r) => r.method === 'POST' && r.path.includes(`/vms/${out.vm.id}/diskattachments`));
    expect(explicitAttach).toEqual([]);
    for (const [i, id] of vm.disks.entries()) {
      const raw = join(dir, `dr-${i}.raw`);
      await sh('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', sim.disks.get(id)!.image, raw]);
      expect(await filesIdentical(raw, first.expected[i]!)).toBe(true);
    }
  });
});
