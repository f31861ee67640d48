/**
 * oVirt's 4.4+ incremental backup API end to end against the simulator (real qcow2 disks, real qemu dirty
 * bitmaps as checkpoints, imageio served from qemu-nbd): full then incrementals with known writes read
 * exactly the dirty blocks and restore byte for byte; refused checkpoints fall back to full reads, said;
 * paused transfers and an engine restart end in clear errors with nothing left open.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { filesIdentical, parseJson, runEngine, sh, tempDir, expectRestoreIdentical, withoutProgress, journalDir } from './helpers.js';
import { qemuIo } from './qemu.js';
import { contractProblems } from './ovirt-contract/contract.js';
import { startOvirtSim, type OvirtSim, type SimVm } from '../dist/test/ovirt-sim/server.js';
import { SIM_ENV, type OvirtBackupJson } from './ovirt-cli.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;
let sim: OvirtSim;
let vm: SimVm;
let repo: string;
const env = SIM_ENV;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-ovirt-api-'));
  sim = await startOvirtSim({ dir: join(dir, 'sim'), lockMs: 150 });
  vm = await sim.addVm('db1', [
    { alias: 'db1_os', size: '64M' },
    { alias: 'db1_data', size: '32M' },
  ]);
  await qemuIo(image(0), ['write -P 0x11 0 6M']);
  await qemuIo(image(1), ['write -P 0x21 4M 2M']);
  await sim.addVm('appliance', []);
  repo = join(dir, 'repo');
  await runEngine(['init', repo]);
});
afterAll(async () => {
  // Every request the engine made here follows oVirt's API model.
  expect(contractProblems(sim.requests)).toEqual([]);
  await sim.stop();
  await cleanup();
});

function image(i: number): string {
  return sim.disks.get(vm.disks[i]!)!.image;
}

/** Runs the backup; `error` is the JSON error's message when it fails. */
async function backup(extra: string[] = [], extraEnv: Record<string, string> = {}): Promise<{ code: number; out?: OvirtBackupJson; error?: string }> {
  const result = await runEngine(['backup', '--repo', repo, '--ovirt', sim.url, '--vm', 'db1', '--json', ...extra], { env: { ...env, ...extraEnv } });
  if (result.code === 0) return { code: 0, out: parseJson<OvirtBackupJson>(result.stdout) };
  return { code: result.code, error: parseJson<{ error: { message: string } }>(result.stdout).error.message };
}

async function expected(tag: string): Promise<string[]> {
  const out: string[] = [];
  for (const [i] of vm.disks.entries()) {
    const raw = join(dir, `expected-${tag}-${i}.raw`);
    await sh('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', image(i), raw]);
    out.push(raw);
  }
  return out;
}

/** Every disk of backup `id` restores byte for byte to the image it was taken from. */
async function expectRestores(id: string, expected: string[]): Promise<void> {
  for (const [i, disk] of ['db1_os', 'db1_data'].entries()) await expectRestoreIdentical(repo, id, expected[i]!, { dir, disk });
}

async function expectNothingOpen(): Promise<void> {
  for (let i = 0; i < 100; i += 1) {
    const open = [...sim.backups.values()].some((b) => b.phase !== 'succeeded' && b.phase !== 'failed');
    if (!open) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  expect([...sim.backups.values()].filter((b) => b.phase !== 'succeeded' && b.phase !== 'failed').map((b) => b.phase)).toEqual([]);
  expect([...sim.transfers.values()].filter((t) => t.phase === 'transferring' || t.phase === 'initializing' || t.phase === 'paused_system')).toEqual([]);
  expect(await readdir(await journalDir(repo)).catch(() => [])).toEqual([]);
}

describe('oVirt incremental backup API', () => {
  const points: { id: string; expected: string[] }[] = [];

  test('full, then three incrementals with known writes: exactly the dirty blocks, every point restores', async () => {
    // The simulator sets to_checkpoint_id only once the backup is ready, as oVirt does (StartVmBackupCommand):
    // the chain stays incremental only if the engine reads it then.
    const full = await backup(['--auto']);
    expect(full.error).toBeUndefined();
    expect(full.out!.type).toBe('full');
    expect(full.out!.disks.map((d) => [d.name, d.mode, d.bytesRead])).toEqual([
      ['db1_os', 'full', 6 * MiB],
      ['db1_data', 'full', 2 * MiB],
    ]);
    const checkpoint = full.out!.disks[0]!.checkpoint;
    expect(checkpoint).toMatch(/^[0-9a-f-]{36}$/);
    expect(vm.checkpoints.map((c) => c.id)).toEqual([checkpoint]);
    points.push({ id: full.out!.id, expected: await expected('0') });
    await expectNothingOpen();

    const writes: [number, string[], number[]][] = [
      [0, ['write -P 0x12 1M 64k', 'write -P 0x13 50M 2M'], [3 * MiB, 0]],
      [1, ['write -P 0x22 31M 512k'], [0, MiB]],
      [0, ['write -P 0x15 10M 1M', 'write -P 0x16 63M 1M'], [2 * MiB, 0]],
    ];
    let parent = full.out!;
    for (const [n, [disk, commands, read]] of writes.entries()) {
      await qemuIo(image(disk), commands);
      const inc = await backup(n === 0 ? ['--incremental'] : []);
      expect(inc.error).toBeUndefined();
      expect(inc.out!.type).toBe('incremental');
      expect(inc.out!.disks.map((d) => [d.mode, d.parent, d.bytesRead])).toEqual([
        ['incremental', parent.id, read[0]],
        ['incremental', parent.id, read[1]],
      ]);
      // The checkpoint recorded is the one oVirt created, and it differs from the parent's.
      const created = [...sim.backups.values()].at(-1)!;
      expect(inc.out!.disks.map((d) => d.checkpoint)).toEqual([created.to, created.to]);
      expect(created.to).not.toBe(parent.disks[0]!.checkpoint);
      // Retention: oVirt keeps the chain's full checkpoint (differentials) and the newest; the others are deleted.
      expect(vm.checkpoints.map((c) => c.id)).toEqual([checkpoint, created.to]);
      points.push({ id: inc.out!.id, expected: await expected(String(n + 1)) });
      parent = inc.out!;
    }
    await expectNothingOpen();
    for (const point of points) await expectRestores(point.id, point.expected);
  });

  test('a checkpoint oVirt no longer has means a full read, said', async () => {
    vm.checkpoints = [];
    const result = await backup(['--incremental']);
    expect(result.out!.type).toBe('full');
    expect(result.out!.disks[0]!.modeReason).toMatch(/^checkpoint [0-9a-f-]+ no longer exists in oVirt$/);
    await expectNothingOpen();
  });

  test('an invalid checkpoint means a full read, said', async () => {
    for (const c of vm.checkpoints) c.state = 'invalid';
    const result = await backup(['--incremental']);
    expect(result.out!.disks.map((d) => d.mode)).toEqual(['full', 'full']);
    expect(result.out!.disks[0]!.modeReason).toMatch(/is invalid in oVirt$/);
  });

  test('a transfer the system stops as it starts is a clear error; nothing stays open', async () => {
    sim.faults.stopNextTransfer();
    const result = await backup();
    expect(result.code).toBe(1);
    expect(result.error).toMatch(/the transfer went to phase (cancelled_system|finalizing_failure|finished_failure) instead of transferring/);
    await expectNothingOpen();
  });

  test('the engine restarting in the middle of a backup: a clear error, then the next incremental is exact', async () => {
    const before = parseJson<{ backups: { id: string }[] }>((await runEngine(['list', '--repo', repo, '--json'])).stdout).backups.at(-1)!.id;
    await qemuIo(image(0), ['write -P 0x14 60M 1M']);
    sim.faults.restartEngineAfter(/\/imagetransfers$/, 1); // after the first transfer has started
    const failed = await backup();
    expect(failed.code).toBe(1);
    await expectNothingOpen();
    const next = await backup(['--incremental']);
    expect(next.code).toBe(0);
    expect(next.out!.disks.map((d) => [d.mode, d.parent, d.bytesRead])).toEqual([
      ['incremental', before, MiB],
      ['incremental', before, 0],
    ]);
    await expectRestores(next.out!.id, await expected('4'));
  });

  test('the last incremental restores to a new VM: byte-identical disks and the same OVF', async () => {
    const point = points.at(-1)!;
    const result = await runEngine(['restore', '--repo', repo, point.id, '--ovirt', sim.url, '--new-vm', 'db1-restored', '--appliance', 'appliance', '--device-root', sim.deviceRoot, '--json'], { env });
    expect(result.code).toBe(0);
    const out = parseJson<{ vm: { id: string }; disks: { id: string; name: string }[] }>(result.stdout);
    const created = sim.vms.get(out.vm.id)!;
    const record = JSON.parse(await (await import('node:fs/promises')).readFile(join(repo, 'backups', point.id), 'utf8')) as { attachments: { name: string; data: string }[] };
    expect(created.importedOvf).toBe(record.attachments.find((a) => a.name === 'ovf')!.data);
    for (const [i, disk] of out.disks.entries()) {
      const raw = join(dir, `restored-api-${i}.raw`);
      await sh('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', sim.disks.get(disk.id)!.image, raw]);
      expect(await filesIdentical(raw, point.expected[i]!)).toBe(true);
    }
    expect(await readdir(sim.deviceRoot)).toEqual([]);
  });

  test('restore through imageio upload transfers (--via transfer), without the appliance', async () => {
    const point = points.at(-1)!;
    const result = await runEngine(['restore', '--repo', repo, point.id, '--ovirt', sim.url, '--new-vm', 'db1-uploaded', '--via', 'transfer', '--json'], { env });
    expect(withoutProgress(result.stderr)).toBe('');
    expect(result.code).toBe(0);
    const out = parseJson<{ vm: { id: string }; disks: { id: string }[] }>(result.stdout);
    for (const [i, disk] of out.disks.entries()) {
      const raw = join(dir, `uploaded-${i}.raw`);
      await sh('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', sim.disks.get(disk.id)!.image, raw]);
      expect(await filesIdentical(raw, point.expected[i]!)).toBe(true);
    }
    const uploads = [...sim.transfers.values()].filter((t) => t.direction === 'upload');
    expect(uploads.map((t) => t.phase)).toEqual(['finished_success', 'finished_success']);
    expect([...sim.vms.get(out.vm.id)!.attachments.keys()].sort()).toEqual(out.disks.map((d) => d.id).sort());
    await expectNothingOpen();
  });

  test('a disk added since the last backup is read in full beside incremental ones (oVirt mixes them from cluster level 4.5)', async () => {
    const before = parseJson<{ backups: { id: string }[] }>((await runEngine(['list', '--repo', repo, '--json'])).stdout).backups.at(-1)!.id;
    const added = await sim.addDisk(vm, 'db1_logs', '16M');
    await qemuIo(added.image, ['write -P 0x31 0 1M']);
    await qemuIo(image(1), ['write -P 0x23 2M 64k']);
    const result = await backup(['--incremental']);
    expect(result.error).toBeUndefined();
    expect(result.out!.disks.map((d) => [d.name, d.mode, d.parent, d.bytesRead])).toEqual([
      ['db1_os', 'incremental', before, 0],
      ['db1_data', 'incremental', before, MiB],
      ['db1_logs', 'full', null, MiB],
    ]);
    expect(result.out!.disks[2]!.modeReason).toBe('no earlier backup of this disk with changed-block tracking (a disk added since the last backup)');
    await expectNothingOpen();
  });
});
