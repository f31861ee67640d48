/**
 * Changed-block tracking on offline qcow2 images (real qemu-img, qemu-io, qemu-nbd): full, incremental
 * and differential chains read exactly the dirty blocks, every point restores byte for byte, the engine
 * owns the bitmaps, and every broken chain falls back to a full read that is said out loud.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { access, copyFile, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { countingWorkers, parseJson, runEngine, sh, tempDir, type BackupJson, waitFor, withoutProgress } from './helpers.js';
import { qcow2, qemuImgCompare, qemuIo } from './qemu.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-cbt-'));
});
afterAll(async () => {
  await cleanup();
});

async function bitmaps(image: string): Promise<{ name: string; granularity: number; flags: string[] }[]> {
  const info = JSON.parse(await sh('qemu-img', ['info', '--output=json', image])) as { 'format-specific': { data: { bitmaps?: { name: string; granularity: number; flags: string[] }[] } } };
  return info['format-specific'].data.bitmaps ?? [];
}

async function backupImage(repo: string, image: string, mode: string[] = []): Promise<BackupJson & { disks: { mode: string; modeReason: string | null; parent: string | null; checkpoint: string | null }[] }> {
  const result = await runEngine(['backup', '--repo', repo, '--image', image, '--json', ...mode]);
  expect(withoutProgress(result.stderr)).toBe('');
  expect(result.code).toBe(0);
  return parseJson(result.stdout);
}

async function expectRestoreEquals(repo: string, id: string, frozen: string): Promise<void> {
  const target = join(dir, `restore-${id}.raw`);
  const result = await runEngine(['restore', '--repo', repo, id, '--to', target]);
  expect(result.code).toBe(0);
  expect(await qemuImgCompare(target, 'raw', frozen, 'qcow2')).toBe(true);
  await rm(target);
}

describe('a chain on an offline qcow2 image', () => {
  test('full → incremental → incremental → differential → incremental: exact reads, exact restores', async () => {
    const repo = join(dir, 'repo-chain');
    await runEngine(['init', repo]);
    const image = join(dir, 'vm.qcow2');
    await qcow2(image, '2G');
    await qemuIo(image, ['write -P 0xab 0 8M', 'write -P 0xcd 100M 3M']);
    const frozen: string[] = [];
    const freeze = async (): Promise<void> => {
      const copy = join(dir, `frozen-${frozen.length}.qcow2`);
      await copyFile(image, copy);
      frozen.push(copy);
    };

    const full = await backupImage(repo, image, ['--auto']);
    await freeze();
    expect(full.type).toBe('full');
    expect(full.disks[0]).toMatchObject({ mode: 'full', modeReason: 'no earlier backup of this disk with changed-block tracking', parent: null });
    expect(full.disks[0]!.bytesRead).toBe(11 * MiB); // base:allocation: 0–8 MiB and 100–103 MiB only
    expect((await bitmaps(image)).map((b) => b.name)).toEqual([full.disks[0]!.checkpoint]);

    await qemuIo(image, ['write -P 0x11 1M 64k', 'write -P 0x22 500M 2M', 'write -P 0x23 1536M 1']);
    const inc1 = await backupImage(repo, image, ['--incremental']);
    await freeze();
    expect(inc1.type).toBe('incremental');
    expect(inc1.disks[0]).toMatchObject({ mode: 'incremental', modeReason: null, parent: full.id });
    expect(inc1.disks[0]!.bytesRead).toBe(4 * MiB); // blocks 1, 500, 501, 1536
    expect(inc1.disks[0]!.blocksUnchanged).toBe(2048 - 4);
    const shown = parseJson<{ disks: { cbt: { audited: number; base: string } }[] }>(await readFile(join(repo, 'backups', inc1.id), 'utf8'));
    expect(shown.disks[0]!.cbt.base).toBe(full.disks[0]!.checkpoint);
    expect(shown.disks[0]!.cbt.audited).toBeGreaterThanOrEqual(8); // 16 random picks, less repeats and dirty ones

    await qemuIo(image, ['write -P 0x33 900M 1M', 'write -P 0x34 1M 4k']);
    const inc2 = await backupImage(repo, image, ['--incremental']);
    await freeze();
    expect(inc2.disks[0]).toMatchObject({ mode: 'incremental', parent: inc1.id });
    expect(inc2.disks[0]!.bytesRead).toBe(2 * MiB); // blocks 1 and 900

    await qemuIo(image, ['write -P 0x44 1900M 512k']);
    const diff = await backupImage(repo, image, ['--differential']);
    await freeze();
    expect(diff.type).toBe('differential');
    expect(diff.disks[0]).toMatchObject({ mode: 'differential', parent: full.id });
    // Everything since the full: blocks 1, 500, 501, 1536, 900, 1900.
    expect(diff.disks[0]!.bytesRead).toBe(6 * MiB);

    await qemuIo(image, ['write -P 0x55 2000M 1M']);
    const inc3 = await backupImage(repo, image, ['--auto']);
    await freeze();
    expect(inc3.disks[0]).toMatchObject({ mode: 'incremental', parent: diff.id });
    expect(inc3.disks[0]!.bytesRead).toBe(MiB);

    // The engine keeps exactly the chain's full bitmap and the newest one.
    expect((await bitmaps(image)).map((b) => b.name).sort()).toEqual([full.disks[0]!.checkpoint, inc3.disks[0]!.checkpoint].sort());
    // Every point restores on its own, byte for byte.
    for (const [i, backup] of [full, inc1, inc2, diff, inc3].entries()) await expectRestoreEquals(repo, backup.id, frozen[i]!);

    const list = await runEngine(['list', '--repo', repo]);
    expect(list.stdout).toMatch(/incremental\s+crash\s+[0-9a-f]{12}\s+engine-/);
    expect(list.stdout).toMatch(/differential\s+crash\s+[0-9a-f]{12}\s+engine-/);
  });
});

describe('the tools an incremental of an image runs', () => {
  /** A directory first on PATH whose qemu-img and qemu-nbd note their arguments in `log`, then run the real ones. */
  async function noting(log: string): Promise<string> {
    const bin = join(dir, 'noting-bin');
    await sh('mkdir', ['-p', bin]);
    for (const tool of ['qemu-img', 'qemu-nbd']) {
      const real = (await sh('sh', ['-c', `command -v ${tool}`])).trim();
      await writeFile(join(bin, tool), `#!/bin/sh\necho "${tool} $*" >> "${log}"\nexec "${real}" "$@"\n`, { mode: 0o755 });
    }
    return bin;
  }

  test('one qemu-img info, the bitmap added at the granularity qemu would give it (4 KiB clusters: 4096), qemu-nbd, the old bitmap removed: nothing else', async () => {
    const repo = join(dir, 'repo-tools');
    await runEngine(['init', repo]);
    const image = join(dir, 'tools.qcow2');
    await sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', image, '64M']);
    await qemuIo(image, ['write -P 0x71 0 3M']);
    const full = await backupImage(repo, image);
    await qemuIo(image, ['write -P 0x72 1M 4k']);
    const inc1 = await backupImage(repo, image, ['--incremental']);
    await qemuIo(image, ['write -P 0x73 2M 4k']);
    const log = join(dir, 'tools.log');
    const bin = await noting(log);
    const result = await runEngine(['backup', '--repo', repo, '--image', image, '--incremental', '--json'], { env: { PATH: `${bin}:${process.env.PATH ?? ''}` } });
    expect(result.code).toBe(0);
    const inc2 = parseJson<BackupJson & { disks: { mode: string; checkpoint: string; bytesRead: number }[] }>(result.stdout);
    expect(inc2.disks[0]).toMatchObject({ mode: 'incremental', bytesRead: MiB });
    const runs = (await readFile(log, 'utf8')).trim().split('\n').map((line) => line.replace(/ \/\S*\/nbd\.sock| \/\S*\/qemu-nbd\.pid/g, ' <tmp>'));
    expect(runs).toEqual([
      `qemu-img info --output=json ${image}`,
      `qemu-img bitmap --add --enable -g 4096 ${image} ${inc2.disks[0]!.checkpoint}`,
      `qemu-nbd -f qcow2 --socket <tmp> --persistent --shared 8 --fork --pid-file <tmp> -r -B ${inc1.disks[0]!.checkpoint} ${image}`,
      `qemu-img bitmap --remove ${image} ${inc1.disks[0]!.checkpoint}`,
    ]);
    // What the record says of the bitmap is what the image holds; the chain's full bitmap and the newest are kept.
    const record = parseJson<{ disks: { cbt: { granularity: number } }[] }>(await readFile(join(repo, 'backups', inc2.id), 'utf8'));
    expect(record.disks[0]!.cbt.granularity).toBe(4096);
    expect((await bitmaps(image)).map((b) => [b.name, b.granularity]).sort()).toEqual([[full.disks[0]!.checkpoint, 4096], [inc2.disks[0]!.checkpoint, 4096]].sort());
  });

  test('an incremental that touches few blocks of a large disk starts no block worker; one that touches more than 16 MiB does', async () => {
    const repo = join(dir, 'repo-workers');
    await runEngine(['init', repo]);
    const image = join(dir, 'workers.qcow2');
    await qcow2(image, '512M');
    await qemuIo(image, ['write -P 0x76 0 40M']);
    const full = await countingWorkers(['backup', '--repo', repo, '--image', image, '--json'], {}, dir);
    expect(parseJson<BackupJson>(full.stdout).disks[0]!.bytesRead).toBe(40 * MiB);
    expect(full.workers).toBeGreaterThan(0);
    // 3 blocks touched (one write across a block boundary): 3 MiB of work, on the main thread.
    await qemuIo(image, ['write -P 0x77 100M 64k', `write -P 0x78 ${300 * MiB - 4096} 8k`]);
    const small = await countingWorkers(['backup', '--repo', repo, '--image', image, '--incremental', '--json'], {}, dir);
    expect(parseJson<BackupJson & { disks: { mode: string }[] }>(small.stdout).disks[0]).toMatchObject({ mode: 'incremental', bytesRead: 3 * MiB, blocksNew: 3 });
    expect(small.workers).toBe(0);
    // 20 blocks: more than the main thread takes on.
    await qemuIo(image, ['write -P 0x79 200M 20M']);
    const large = await countingWorkers(['backup', '--repo', repo, '--image', image, '--incremental', '--json'], {}, dir);
    expect(parseJson<BackupJson & { disks: { mode: string }[] }>(large.stdout).disks[0]).toMatchObject({ mode: 'incremental', bytesRead: 20 * MiB });
    expect(large.workers).toBeGreaterThan(0);
  });

  test('clusters of 2 MiB: a bitmap of 64 KiB granularity, as qemu-img gives one unasked', async () => {
    const repo = join(dir, 'repo-big-clusters');
    await runEngine(['init', repo]);
    const image = join(dir, 'big-clusters.qcow2');
    await sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=2M', image, '64M']);
    await qemuIo(image, ['write -P 0x74 0 3M']);
    const full = await backupImage(repo, image);
    expect((await bitmaps(image)).map((b) => [b.name, b.granularity])).toEqual([[full.disks[0]!.checkpoint, 65536]]);
    await qemuIo(image, ['write -P 0x75 5M 4k']);
    const inc = await backupImage(repo, image, ['--incremental']);
    expect(inc.disks[0]).toMatchObject({ mode: 'incremental', bytesRead: MiB });
  });
});

describe('a chain the engine cannot trust is read in full, and says so', () => {
  async function chainStart(name: string): Promise<{ repo: string; image: string; full: BackupJson & { disks: { checkpoint: string | null }[] } }> {
    const repo = join(dir, `repo-${name}`);
    await runEngine(['init', repo]);
    const image = join(dir, `${name}.qcow2`);
    await qcow2(image, '256M');
    await qemuIo(image, ['write -P 0x61 0 4M', 'write -P 0x62 64M 2M']);
    const full = await backupImage(repo, image);
    await qemuIo(image, ['write -P 0x63 10M 1M']);
    return { repo, image, full };
  }

  async function expectFullFallback(repo: string, image: string, reason: RegExp): Promise<void> {
    const result = await runEngine(['backup', '--repo', repo, '--image', image, '--incremental']);
    expect(result.code).toBe(0);
    expect(result.stderr).toMatch(reason); // said on stderr ...
    const listed = parseJson<{ backups: { id: string; disks: { mode: string; modeReason: string; bytesRead: number }[] }[] }>(
      (await runEngine(['list', '--repo', repo, '--json'])).stdout,
    );
    const last = listed.backups.at(-1)!;
    expect(last.disks[0]!.mode).toBe('full'); // ... and recorded
    expect(last.disks[0]!.modeReason).toMatch(reason);
    expect(last.disks[0]!.bytesRead).toBe(7 * MiB); // the whole allocated disk was read
    const frozen = join(dir, `frozen-${Date.now()}.qcow2`);
    await copyFile(image, frozen);
    await expectRestoreEquals(repo, last.id, frozen);
  }

  test('the bitmap was removed', async () => {
    const { repo, image, full } = await chainStart('removed');
    await sh('qemu-img', ['bitmap', '--remove', image, full.disks[0]!.checkpoint!]);
    await expectFullFallback(repo, image, /bitmap engine-[0-9a-f]+-[0-9a-f]+ is missing from the image/);
  });

  test('the bitmap is inconsistent (qemu-nbd killed while writing)', async () => {
    const { repo, image, full } = await chainStart('inconsistent');
    const socket = join(dir, 'kill.sock');
    await sh('qemu-nbd', ['-f', 'qcow2', '--socket', socket, '--persistent', '--fork', '--pid-file', join(dir, 'kill.pid'), image]);
    const pid = Number((await readFile(join(dir, 'kill.pid'), 'utf8')).trim());
    process.kill(pid, 'SIGKILL');
    // Gone (and its image lock with it) before the backup opens the image: its exit, not a 200-ms guess.
    await waitFor('the killed qemu-nbd is gone', () => access(`/proc/${pid}`).then(() => false, () => true), { everyMs: 10 });
    expect((await bitmaps(image)).find((b) => b.name === full.disks[0]!.checkpoint)!.flags).toContain('in-use');
    await expectFullFallback(repo, image, /bitmap engine-[0-9a-f]+-[0-9a-f]+ is inconsistent/);
  });

  test('the bitmap was disabled', async () => {
    const { repo, image, full } = await chainStart('disabled');
    await sh('qemu-img', ['bitmap', '--disable', image, full.disks[0]!.checkpoint!]);
    await expectFullFallback(repo, image, /is disabled: it stopped recording writes/);
  });

  test('the granularity changed', async () => {
    const { repo, image, full } = await chainStart('granularity');
    const name = full.disks[0]!.checkpoint!;
    await sh('qemu-img', ['bitmap', '--remove', image, name]);
    await sh('qemu-img', ['bitmap', '--add', '--enable', '-g', '131072', image, name]);
    await expectFullFallback(repo, image, /changed granularity from 65536 to 131072/);
  });

  test('a bitmap that missed writes is caught by the CBT audit', async () => {
    const repo = join(dir, 'repo-audit');
    await runEngine(['init', repo]);
    const image = join(dir, 'audit.qcow2');
    await qcow2(image, '32M');
    await qemuIo(image, ['write -P 0x71 0 32M']); // every block allocated and non-zero
    const full = await backupImage(repo, image);
    // Every block changes, but the bitmap is cleared: it now claims the whole disk is clean.
    await qemuIo(image, ['write -P 0x72 0 32M']);
    await sh('qemu-img', ['bitmap', '--clear', image, full.disks[0]!.checkpoint!]);
    const result = await runEngine(['backup', '--repo', repo, '--image', image, '--incremental', '--json']);
    const backup = parseJson<{ id: string; disks: { mode: string; modeReason: string; bytesRead: number }[] }>(result.stdout);
    expect(backup.disks[0]!.mode).toBe('full');
    expect(backup.disks[0]!.modeReason).toMatch(new RegExp(`^CBT audit: the block at offset \\d+ differs from parent backup ${full.id} although bitmap ${full.disks[0]!.checkpoint} calls it clean$`));
    expect(backup.disks[0]!.bytesRead).toBe(32 * MiB);
    const frozen = join(dir, 'audit-frozen.qcow2');
    await copyFile(image, frozen);
    await expectRestoreEquals(repo, backup.id, frozen);
  });

  test('the disk grew', async () => {
    const { repo, image } = await chainStart('resized');
    await sh('qemu-img', ['resize', '-q', image, '512M']);
    const result = await runEngine(['backup', '--repo', repo, '--image', image, '--incremental', '--json']);
    const backup = parseJson<{ disks: { mode: string; modeReason: string; size: number }[] }>(result.stdout);
    expect(backup.disks[0]).toMatchObject({ mode: 'full', modeReason: `the disk size changed from ${256 * MiB} to ${512 * MiB} bytes`, size: 512 * MiB });
  });

  test('the parent backup is gone from the repository', async () => {
    const { repo, image, full } = await chainStart('parent-gone');
    await backupImage(repo, image, ['--incremental']);
    // A differential takes its unchanged blocks from the chain's full, which is deleted here.
    await rm(join(repo, 'backups', full.id));
    await qemuIo(image, ['write -P 0x65 30M 1M']);
    const result = await runEngine(['backup', '--repo', repo, '--image', image, '--differential', '--json']);
    const backup = parseJson<{ disks: { mode: string; modeReason: string; bytesRead: number }[] }>(result.stdout);
    expect(backup.disks[0]).toMatchObject({ mode: 'full', modeReason: `parent backup ${full.id} of this disk is no longer in the repository`, bytesRead: 8 * MiB });
  });

  test('a raw source asked for an incremental is read in full, with the reason', async () => {
    const repo = join(dir, 'repo-raw');
    await runEngine(['init', repo]);
    const raw = join(dir, 'plain.raw');
    await writeFile(raw, Buffer.alloc(3 * MiB, 1));
    const result = await runEngine(['backup', '--repo', repo, '--source', raw, '--incremental', '--json']);
    expect(parseJson<{ disks: { mode: string; modeReason: string }[] }>(result.stdout).disks[0]).toMatchObject({
      mode: 'full',
      modeReason: 'this source has no changed-block tracking (a qcow2 image has, backed up as an image disk)',
    });
  });

  test('a backup killed before its record leaves the chain intact; the next incremental is exact', async () => {
    const { repo, image, full } = await chainStart('killed');
    const crashed = await runEngine(['backup', '--repo', repo, '--image', image, '--incremental'], { env: { ENGINE_CRASH_AT: 'before-record' } });
    expect(crashed.code).toBe(137);
    // The crashed run's bitmap is left behind (no chance to remove it); the chain's is untouched.
    expect((await bitmaps(image)).length).toBe(2);
    await qemuIo(image, ['write -P 0x64 20M 1M']);
    const next = await backupImage(repo, image, ['--incremental']);
    expect(next.disks[0]).toMatchObject({ mode: 'incremental', parent: full.id });
    expect(next.disks[0]!.bytesRead).toBe(2 * MiB); // 10M (before the crash) and 20M
    expect((await bitmaps(image)).map((b) => b.name).sort()).toEqual([full.disks[0]!.checkpoint, next.disks[0]!.checkpoint].sort());
    const frozen = join(dir, 'killed-frozen.qcow2');
    await copyFile(image, frozen);
    await expectRestoreEquals(repo, next.id, frozen);
  });

  test('an image in use by another process is refused before anything is written', async () => {
    const { repo, image } = await chainStart('in-use');
    const socket = join(dir, 'busy.sock');
    const holder = await (async () => {
      await sh('qemu-nbd', ['-f', 'qcow2', '--socket', socket, '--persistent', '--fork', '--pid-file', join(dir, 'busy.pid'), image]);
      return Number((await readFile(join(dir, 'busy.pid'), 'utf8')).trim());
    })();
    try {
      const result = await runEngine(['backup', '--repo', repo, '--image', image]);
      expect(result.code).toBe(1);
      expect(result.stderr).toMatch(/qemu-img .* failed: .*(lock|Failed to get)/);
    } finally {
      process.kill(holder, 'SIGTERM');
      await waitFor('the holder is gone', () => access(`/proc/${holder}`).then(() => false, () => true), { everyMs: 10 });
    }
  });
});
