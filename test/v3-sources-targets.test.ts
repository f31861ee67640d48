/**
 * Sources and targets on format version 3, on a folder (plain) and on S3 (the tests' own Ceph RADOS Gateway,
 * encrypted): a qcow2 image with changed-block tracking (qcow2 dirty bitmaps), full then incremental,
 * restored into a new qcow2 image (--to-qcow2) and into a qemu-nbd export, each compared with qemu-img
 * compare; oVirt's incremental backup API through the simulator (test/ovirt-sim/), full then incremental,
 * every disk of each point restored byte for byte (cmp), and the run's journal in this host's cache directory
 * (SPEC.md 19.1), never in the store. libvirt on format 3 is in cbt-libvirt.test.ts, beside its domain.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { copyFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { startRgwCluster, type RgwCluster } from './rgw.js';
import { createBucket, v3Env } from './s3-helpers.js';
import { qcow2, qemuImgCompare, qemuIo, qemuNbd } from './qemu.js';
import { expectRestoreIdentical, parseJson, runEngine, sh, tempDir, type BackupJson } from './helpers.js';
import { SIM_ENV, type OvirtBackupJson } from './ovirt-cli.js';
import { contractProblems } from './ovirt-contract/contract.js';
import { startOvirtSim, type OvirtSim, type SimVm } from '../dist/test/ovirt-sim/server.js';

const MiB = 1024 * 1024;
const BUCKET = 'engine-v3-sources';
let cluster: RgwCluster;
let scratch: { path: string; cleanup: () => Promise<void> };
let sim: OvirtSim;

function env(kind: 'folder' | 's3'): Record<string, string> {
  return {
    ...v3Env(cluster, scratch.path, `cache-${kind}`),
    // The S3 repository is encrypted; the folder's is plain (a backup given a passphrase would refuse it).
    ...(kind === 's3' ? { ENGINE_PASSWORD: 'correct horse battery staple' } : {}),
  };
}

beforeAll(async () => {
  scratch = await tempDir('engine-v3-sources-');
  [cluster, sim] = await Promise.all([startRgwCluster({ memstoreBytes: 512 * MiB }), startOvirtSim({ dir: join(scratch.path, 'sim'), lockMs: 150 })]);
  await createBucket(cluster, BUCKET);
});

afterAll(async () => {
  if (sim) expect(contractProblems(sim.requests)).toEqual([]);
  await sim?.stop();
  await cluster?.stop();
  await scratch?.cleanup();
});

type ImageBackup = BackupJson & { type: string; disks: { mode: string; parent: string | null; bytesRead: number }[] };

for (const kind of ['folder', 's3'] as const) {
  describe(`version 3 on ${kind === 'folder' ? 'a folder (plain)' : 'S3 (RGW), encrypted'}`, () => {
    let repo: string;
    let repositoryId: string;

    beforeAll(async () => {
      repo = kind === 'folder' ? join(scratch.path, 'repo') : `s3://${BUCKET}/repo`;
      const init = await runEngine(['init', '--format', '3', ...(kind === 's3' ? ['--encrypt'] : []), '--json', repo], { env: env(kind) });
      expect(init.code, init.stderr).toBe(0);
      repositoryId = parseJson<{ id: string }>(init.stdout).id;
    });

    test('qcow2 with CBT, full then incremental (dirty bitmaps); restored --to-qcow2 and into a qemu-nbd export, compared with qemu-img compare', async () => {
      const image = join(scratch.path, `vm-${kind}.qcow2`);
      await qcow2(image, '256M');
      await qemuIo(image, ['write -P 0xab 0 6M', 'write -P 0xcd 100M 3M']);
      const backup = async (mode: string): Promise<ImageBackup> => {
        const r = await runEngine(['backup', '--repo', repo, '--image', image, mode, '--json'], { env: env(kind) });
        expect(r.code, r.stderr).toBe(0);
        return parseJson<ImageBackup>(r.stdout);
      };
      const full = await backup('--auto');
      expect([full.type, full.disks[0]!.mode, full.disks[0]!.bytesRead]).toEqual(['full', 'full', 9 * MiB]);
      const frozenFull = join(scratch.path, `frozen-full-${kind}.qcow2`);
      await copyFile(image, frozenFull);
      await qemuIo(image, ['write -P 0x11 1M 64k', 'write -P 0x22 200M 2M']);
      const inc = await backup('--incremental');
      // Exactly the dirty blocks: 1, 200 and 201.
      expect([inc.type, inc.disks[0]!.mode, inc.disks[0]!.parent, inc.disks[0]!.bytesRead]).toEqual(['incremental', 'incremental', full.id, 3 * MiB]);

      const asQcow2 = join(scratch.path, `restored-${kind}.qcow2`);
      const toQcow2 = await runEngine(['restore', '--repo', repo, full.id, '--to-qcow2', asQcow2], { env: env(kind) });
      expect(toQcow2.code, toQcow2.stderr).toBe(0);
      expect(await qemuImgCompare(asQcow2, 'qcow2', frozenFull, 'qcow2')).toBe(true);

      const exported = join(scratch.path, `export-${kind}.qcow2`);
      await qcow2(exported, '256M');
      const served = await qemuNbd(exported, scratch.path, { readOnly: false });
      try {
        const toNbd = await runEngine(['restore', '--repo', repo, inc.id, '--to', served.uri], { env: env(kind) });
        expect(toNbd.code, toNbd.stderr).toBe(0);
      } finally {
        await served.stop();
      }
      expect(await qemuImgCompare(exported, 'qcow2', image, 'qcow2')).toBe(true);
    });

    test('oVirt incremental backup API through the simulator, full then incremental: every disk of each point restores byte for byte; the journal is this host’s', async () => {
      const name = `vm-${kind}`;
      const vm: SimVm = await sim.addVm(name, [
        { alias: `${name}_os`, size: '48M' },
        { alias: `${name}_data`, size: '16M' },
      ]);
      const imageOf = (i: number): string => sim.disks.get(vm.disks[i]!)!.image;
      await qemuIo(imageOf(0), ['write -P 0x31 0 5M']);
      await qemuIo(imageOf(1), ['write -P 0x41 4M 2M']);
      const expected = async (tag: string): Promise<string[]> => {
        const out: string[] = [];
        for (const i of [0, 1]) {
          const raw = join(scratch.path, `expected-${kind}-${tag}-${i}.raw`);
          await sh('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', imageOf(i), raw]);
          out.push(raw);
        }
        return out;
      };
      const backup = async (mode: string): Promise<OvirtBackupJson> => {
        const r = await runEngine(['backup', '--repo', repo, '--ovirt', sim.url, '--vm', name, mode, '--json'], { env: { ...env(kind), ...SIM_ENV } });
        expect(r.code, `${r.stdout} ${r.stderr}`).toBe(0);
        return parseJson<OvirtBackupJson>(r.stdout);
      };
      const full = await backup('--auto');
      expect(full.disks.map((d) => [d.mode, d.bytesRead])).toEqual([
        ['full', 5 * MiB],
        ['full', 2 * MiB],
      ]);
      const atFull = await expected('full');
      await qemuIo(imageOf(0), ['write -P 0x32 30M 1M']);
      const inc = await backup('--incremental');
      expect(inc.disks.map((d) => [d.mode, d.parent, d.bytesRead])).toEqual([
        ['incremental', full.id, MiB],
        ['incremental', full.id, 0],
      ]);
      const atInc = await expected('inc');
      for (const [id, files] of [[full.id, atFull], [inc.id, atInc]] as const) {
        for (const [i, disk] of [`${name}_os`, `${name}_data`].entries()) await expectRestoreIdentical(repo, id, files[i]!, { dir: scratch.path, disk, env: env(kind) });
      }
      // The journal of the runs was in this host's cache directory of the repository, and is empty now.
      expect(await readdir(join(scratch.path, `cache-${kind}`, repositoryId, 'journal'))).toEqual([]);
      if (kind === 'folder') {
        expect((await readdir(repo)).sort()).toEqual(['backups', 'config', 'index', 'leases', 'packs']);
        expect(await readdir(join(repo, 'leases'))).toEqual([]);
      }
    });
  });
}
