/**
 * Changed-block tracking on a running VM under a real libvirtd (TCG domain): checkpoints and pull-mode
 * backups. Guest writes go in through HMP qemu-io; the expected content of every disk is kept in a local
 * raw file with the same writes, and every backup point must restore to exactly that. The same domain is
 * backed up into format-3 repositories too, on a folder and on S3 (the tests' own Ceph RADOS Gateway).
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { copyFile, open, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseJson, runEngine, sh, sparseFile, tempDir, expectRestoreIdentical } from './helpers.js';
import { qcow2, qemuIo } from './qemu.js';
import { destroyDomain, ensureLibvirtd, guestWrite, startDomain } from './libvirt.js';
import { virshWord } from '../dist/engine/cbt/libvirt-domain.js';
import { startRgwCluster } from './rgw.js';
import { createBucket, rgwEnv } from './s3-helpers.js';

const MiB = 1024 * 1024;
/** The domain's VNC password (libvirt allows 8 characters), to be found nowhere in the repositories. */
const VNC_PASSWORD = 'xq7Zk2pW';
let dir: string;
let cleanup: () => Promise<void>;
const domains: string[] = [];

interface DiskJson {
  name: string;
  mode: string;
  modeReason: string | null;
  parent: string | null;
  checkpoint: string | null;
  bytesRead: number;
  size: number;
}
interface BackupOut {
  id: string;
  type: string;
  disks: DiskJson[];
}

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-libvirt-'));
  await sh('chmod', ['755', dir]); // qemu runs as libvirt-qemu and must reach the images
  await ensureLibvirtd();
});
afterAll(async () => {
  for (const d of domains) await destroyDomain(d);
  await cleanup();
});

/** A qcow2 disk and the raw file that mirrors what it must hold. */
async function disk(name: string, size: number, initial: [number, number, number][]): Promise<{ image: string; expected: string }> {
  const image = join(dir, `${name}.qcow2`);
  const expected = join(dir, `${name}.expected.raw`);
  await qcow2(image, String(size));
  await sparseFile(expected, size);
  await qemuIo(image, initial.map(([p, o, l]) => `write -P ${p} ${o} ${l}`));
  for (const [p, o, l] of initial) await mirror(expected, p, o, l);
  await sh('chown', ['libvirt-qemu:kvm', image]).catch(() => undefined);
  return { image, expected };
}

async function mirror(path: string, pattern: number, offset: number, length: number): Promise<void> {
  const handle = await open(path, 'r+');
  await handle.write(Buffer.alloc(length, pattern), 0, length, offset);
  await handle.close();
}

async function write(domain: string, device: string, expected: string, pattern: number, offset: number, length: number): Promise<void> {
  await guestWrite(domain, device, pattern, offset, length);
  await mirror(expected, pattern, offset, length);
}

async function backup(repo: string, domain: string, mode: string[] = [], env: Record<string, string> = {}): Promise<BackupOut> {
  const result = await runEngine(['backup', '--repo', repo, '--libvirt', domain, '--json', ...mode], { env });
  if (result.code !== 0) throw new Error(`backup failed (${result.code}): ${result.stdout} ${result.stderr}`);
  return parseJson<BackupOut>(result.stdout);
}

async function checkpoints(domain: string): Promise<string[]> {
  return (await sh('virsh', ['-q', 'checkpoint-list', domain, '--name'])).split('\n').map((l) => l.trim()).filter(Boolean).sort();
}

async function snapshot(expected: string, tag: string): Promise<string> {
  const copy = `${expected}.${tag}`;
  await copyFile(expected, copy);
  return copy;
}

test("virsh's batches: a word with spaces, quotes, ';', backslashes, tabs or non-ASCII letters comes through virsh's parser as it was", async () => {
  const words = ['vm one', "it's", 'a;b', 'x"y', 'back\\slash', '$HOME', 'tab\there', 'ünïcødé', '😀 emoji'];
  // virsh's echo prints its words joined by spaces (and, with -q, no newline).
  const echoed = await sh('virsh', ['-q', `echo ${words.map(virshWord).join(' ')}`]);
  expect(echoed.replace(/\n$/, '')).toBe(words.join(' '));
});

/*
 * One domain for the whole story: defining a domain costs libvirt ~40 s here (it re-probes QEMU's
 * capabilities under TCG), so the scenarios run one after another on the same VM and repository.
 */
describe('a running libvirt domain', () => {
  const domain = `engine-test-${process.pid}`;
  let repo: string;
  let vda: { image: string; expected: string };
  let vdb: { image: string; expected: string };
  let full: BackupOut;
  let latest: BackupOut;

  beforeAll(async () => {
    domains.push(domain);
    vda = await disk(`${domain}-vda`, 256 * MiB, [[0xab, 0, 4 * MiB]]);
    vdb = await disk(`${domain}-vdb`, 64 * MiB, [[0x5b, 10 * MiB, 2 * MiB]]);
    // A VNC display with a password (on a Unix socket libvirt makes: no port), which the record must not keep.
    await startDomain(domain, [{ image: vda.image, target: 'vda' }, { image: vdb.image, target: 'vdb' }], dir, `<graphics type='vnc' passwd='${VNC_PASSWORD}'><listen type='socket'/></graphics>`);
    repo = join(dir, 'repo');
    await runEngine(['init', repo]);
  }, 300_000);

  test('full → incremental → differential → incremental over two disks: exact reads, exact restores, checkpoints kept tidy', async () => {
    full = await backup(repo, domain);
    const snap0 = [await snapshot(vda.expected, '0'), await snapshot(vdb.expected, '0')];
    expect(full.type).toBe('full');
    expect(full.disks.map((d) => [d.name, d.mode, d.bytesRead])).toEqual([
      ['vda', 'full', 4 * MiB],
      ['vdb', 'full', 2 * MiB],
    ]);
    expect(await checkpoints(domain)).toEqual([full.disks[0]!.checkpoint]);

    await write(domain, 'virtio-disk0', vda.expected, 0xcd, 1 * MiB, MiB);
    await write(domain, 'virtio-disk0', vda.expected, 0xce, 100 * MiB + 4096, 4096);
    await write(domain, 'virtio-disk1', vdb.expected, 0xcf, 63 * MiB, 64 * 1024);
    const inc = await backup(repo, domain, ['--incremental']);
    const snap1 = [await snapshot(vda.expected, '1'), await snapshot(vdb.expected, '1')];
    expect(inc.type).toBe('incremental');
    expect(inc.disks.map((d) => [d.name, d.mode, d.parent, d.bytesRead])).toEqual([
      ['vda', 'incremental', full.id, 2 * MiB],
      ['vdb', 'incremental', full.id, MiB],
    ]);

    await write(domain, 'virtio-disk0', vda.expected, 0xd0, 200 * MiB, 2 * MiB);
    const diff = await backup(repo, domain, ['--differential']);
    const snap2 = [await snapshot(vda.expected, '2'), await snapshot(vdb.expected, '2')];
    expect(diff.type).toBe('differential');
    // Everything since the full: vda blocks 1, 100, 200, 201; vdb block 63.
    expect(diff.disks.map((d) => [d.mode, d.parent, d.bytesRead])).toEqual([
      ['differential', full.id, 4 * MiB],
      ['differential', full.id, MiB],
    ]);

    await write(domain, 'virtio-disk1', vdb.expected, 0xd1, 0, 512);
    latest = await backup(repo, domain);
    const snap3 = [await snapshot(vda.expected, '3'), await snapshot(vdb.expected, '3')];
    expect(latest.disks.map((d) => [d.mode, d.parent, d.bytesRead])).toEqual([
      ['incremental', diff.id, 0],
      ['incremental', diff.id, MiB],
    ]);
    // Only the chain's full checkpoint and the newest remain.
    expect(await checkpoints(domain)).toEqual([full.disks[0]!.checkpoint, latest.disks[0]!.checkpoint].sort());

    for (const [backupRecord, snaps] of [[full, snap0], [inc, snap1], [diff, snap2], [latest, snap3]] as const) {
      await expectRestoreIdentical(repo, backupRecord.id, snaps[0]!, { dir, disk: 'vda' });
      await expectRestoreIdentical(repo, backupRecord.id, snaps[1]!, { dir, disk: 'vdb' });
    }
  });

  test("each record keeps the domain's definition (libvirt-domain): the domain's machine type, its VNC password nowhere in the repository", async () => {
    const machineOf = (xml: string): string | undefined => /<type\b[^>]*\bmachine=['"]([^'"]+)['"]/.exec(xml)?.[1];
    const running = machineOf(await sh('virsh', ['dumpxml', domain]));
    // Defined as `pc`: libvirt keeps the versioned type it expanded that to.
    expect(running).toMatch(/^pc-i440fx-/);
    // libvirt holds the password (asked for it); the engine never asks, and strips what it would be given.
    expect(await sh('virsh', ['dumpxml', domain, '--inactive', '--security-info'])).toContain(`passwd='${VNC_PASSWORD}'`);
    for (const point of [full, latest]) {
      const record = JSON.parse(await readFile(join(repo, 'backups', point.id), 'utf8')) as { attachments: { name: string; mediaType: string; data: string }[] };
      expect(record.attachments.map((a) => [a.name, a.mediaType])).toEqual([['libvirt-domain', 'application/xml']]);
      const kept = record.attachments[0]!.data;
      expect(kept).toMatch(/^<domain type='qemu'>/);
      expect(machineOf(kept)).toBe(running);
      expect(kept).toContain(`<name>${domain}</name>`);
      expect(kept).toContain("<graphics type='vnc'");
      expect(kept).not.toContain('passwd');
    }
    // Not in a record, nor anywhere else in the repository (index, packs, config).
    const files = (await readdir(repo, { recursive: true, withFileTypes: true })).filter((entry) => entry.isFile());
    expect(files.length).toBeGreaterThan(5);
    for (const file of files) expect((await readFile(join(file.parentPath, file.name))).includes(VNC_PASSWORD)).toBe(false);
  });

  test('an incremental runs virsh four times (one each: the look at the domain and its definition, backup-begin, the abort, the deletion), and domjobinfo only while the job ends', async () => {
    const bin = join(dir, 'noting-bin');
    const log = join(dir, 'virsh.log');
    await sh('mkdir', ['-p', bin]);
    const real = (await sh('sh', ['-c', 'command -v virsh'])).trim();
    await writeFile(join(bin, 'virsh'), `#!/bin/sh\necho "$*" >> "${log}"\nexec "${real}" "$@"\n`, { mode: 0o755 });
    // Into block 100, which holds data already: the later tests' full reads stay as they count them.
    await write(domain, 'virtio-disk0', vda.expected, 0x2a, 100 * MiB + 8192, 4096);
    const next = await backup(repo, domain, ['--incremental'], { PATH: `${bin}:${process.env.PATH ?? ''}` });
    expect(next.disks.map((d) => [d.mode, d.parent, d.bytesRead])).toEqual([
      ['incremental', latest.id, MiB],
      ['incremental', latest.id, 0],
    ]);
    const runs = (await readFile(log, 'utf8'))
      .trim()
      .split('\n')
      .map((line) => line.replace(/@@engine-[0-9a-f]{12}@@/g, '@@').replace(/\/\S*\/engine-libvirt-[^/\s]+/g, '<job>'));
    const D = domain;
    expect(runs.filter((line) => line !== `-q domjobinfo ${D}`)).toEqual([
      `-q domstate ${D} ; echo @@ ; domblklist ${D} --details ; echo @@ ; domblkinfo ${D} --all ; echo @@ ; checkpoint-list ${D} --name ; echo @@ ; dumpxml ${D} --inactive`,
      `-q backup-begin ${D} <job>/backup.xml <job>/checkpoint.xml`,
      `-q domjobabort ${D} ; echo @@ ; domjobinfo ${D}`,
      `-q checkpoint-delete ${D} ${latest.disks[0]!.checkpoint}`,
    ]);
    expect(await checkpoints(domain)).toEqual([full.disks[0]!.checkpoint, next.disks[0]!.checkpoint].sort());
    expect(await sh('virsh', ['domjobinfo', domain])).toMatch(/Job type:\s+None/);
    await expectRestoreIdentical(repo, next.id, await snapshot(vda.expected, 'tools'), { dir, disk: 'vda' });
    latest = next;
  });

  test('a failed backup deletes the checkpoint it created and ends the job; the next incremental misses nothing', async () => {
    const before = await checkpoints(domain);
    await write(domain, 'virtio-disk0', vda.expected, 0x22, 50 * MiB, MiB);
    const failed = await runEngine(['backup', '--repo', repo, '--libvirt', domain, '--incremental'], { env: { ENGINE_FAIL_AT: 'before-record' } });
    expect(failed.code).toBe(1);
    expect(failed.stderr).toContain('injected failure at before-record');
    expect(await checkpoints(domain)).toEqual(before);
    expect(await sh('virsh', ['domjobinfo', domain])).toMatch(/Job type:\s+None/);
    await write(domain, 'virtio-disk0', vda.expected, 0x33, 80 * MiB, MiB);
    const next = await backup(repo, domain, ['--incremental']);
    expect(next.disks.map((d) => [d.mode, d.parent, d.bytesRead])).toEqual([
      ['incremental', latest.id, 2 * MiB],
      ['incremental', latest.id, 0],
    ]);
    await expectRestoreIdentical(repo, next.id, await snapshot(vda.expected, 'b'), { dir, disk: 'vda' });
    latest = next;
  });

  test('a checkpoint deleted behind the engine’s back means a full read, said', async () => {
    await sh('virsh', ['checkpoint-delete', domain, latest.disks[0]!.checkpoint!]);
    const after = await backup(repo, domain, ['--incremental']);
    expect(after.type).toBe('full');
    expect(after.disks[0]).toMatchObject({ mode: 'full', modeReason: `checkpoint ${latest.disks[0]!.checkpoint} no longer exists in libvirt`, bytesRead: 9 * MiB }); // blocks 0–3, 50, 80, 100, 200, 201
    await expectRestoreIdentical(repo, after.id, await snapshot(vda.expected, 'c'), { dir, disk: 'vda' });
    latest = after;
  });

  test('a disk added since the last backup is read in full; the others stay incremental', async () => {
    const vdc = await disk(`${domain}-vdc`, 32 * MiB, [[0x55, 3 * MiB, MiB]]);
    // TCG's i440fx bus here refuses hot-plug: add the disk to the configuration and restart the VM.
    await sh('virsh', ['attach-disk', domain, vdc.image, 'vdc', '--driver', 'qemu', '--subdriver', 'qcow2', '--targetbus', 'virtio', '--config']);
    await sh('virsh', ['destroy', domain]);
    await sh('virsh', ['start', domain]);
    await write(domain, 'virtio-disk0', vda.expected, 0x66, 10 * MiB, MiB);
    const withNewDisk = await backup(repo, domain, ['--incremental']);
    expect(withNewDisk.type).toBe('incremental');
    expect(withNewDisk.disks.map((d) => [d.name, d.mode, d.bytesRead])).toEqual([
      ['vda', 'incremental', MiB],
      ['vdb', 'incremental', 0],
      ['vdc', 'full', MiB],
    ]);
    expect(withNewDisk.disks[2]!.modeReason).toBe('no earlier backup of this disk with changed-block tracking (a disk added since the last backup)');
    await expectRestoreIdentical(repo, withNewDisk.id, await snapshot(vda.expected, 'd'), { dir, disk: 'vda' });
    await expectRestoreIdentical(repo, withNewDisk.id, await snapshot(vdc.expected, 'd'), { dir, disk: 'vdc' });
  });

  test('format 3, on a folder and on an encrypted S3 repository (RGW): full then incremental of the three disks, each point restores byte for byte', async () => {
    const cluster = await startRgwCluster({ memstoreBytes: 512 * MiB });
    try {
      await createBucket(cluster, 'engine-libvirt-v3');
      const s3Env = { ...rgwEnv(cluster, dir), ENGINE_PASSWORD: 'correct horse battery staple' };
      const vdc = { expected: join(dir, `${domain}-vdc.expected.raw`) };
      for (const [where, env] of [
        [join(dir, 'repo-v3'), { ENGINE_CACHE_DIR: join(dir, 'cache-v3') }],
        ['s3://engine-libvirt-v3/repo', { ...s3Env, ENGINE_CACHE_DIR: join(dir, 'cache-v3-s3') }],
      ] as const) {
        const init = await runEngine(['init', '--format', '3', ...(where.startsWith('s3://') ? ['--encrypt'] : []), where], { env });
        expect(init.code, init.stderr).toBe(0);
        const v3full = await backup(where, domain, [], env);
        expect(v3full.disks.map((d) => [d.name, d.mode])).toEqual([
          ['vda', 'full'],
          ['vdb', 'full'],
          ['vdc', 'full'],
        ]);
        const atFull = await snapshot(vda.expected, `v3-full-${v3full.id}`);
        await write(domain, 'virtio-disk0', vda.expected, 0x77, 30 * MiB, MiB);
        const v3inc = await backup(where, domain, ['--incremental'], env);
        expect(v3inc.disks.map((d) => [d.name, d.mode, d.parent, d.bytesRead])).toEqual([
          ['vda', 'incremental', v3full.id, MiB],
          ['vdb', 'incremental', v3full.id, 0],
          ['vdc', 'incremental', v3full.id, 0],
        ]);
        await expectRestoreIdentical(where, v3full.id, atFull, { dir, disk: 'vda', env });
        for (const [name, expected] of [['vda', vda.expected], ['vdb', vdb.expected], ['vdc', vdc.expected]] as const) {
          await expectRestoreIdentical(where, v3inc.id, await snapshot(expected, `v3-inc-${v3inc.id}`), { dir, disk: name, env });
        }
      }
    } finally {
      await cluster.stop();
    }
  });

  test('a domain that is not running is refused clearly', async () => {
    await sh('virsh', ['destroy', domain]);
    const result = await runEngine(['backup', '--repo', repo, '--libvirt', domain]);
    expect(result.code).toBe(2);
    expect(result.stderr).toContain(`domain ${domain} is shut off: a libvirt backup needs a running VM`);
  });
});
