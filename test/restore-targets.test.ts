/**
 * Restore into a new qcow2 and into existing NBD exports (WRITE_ZEROES for zero blocks, FLUSH), and
 * rollback (--only-changed): by comparing the target's blocks, or from a dirty bitmap, counting exactly
 * the blocks written.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { chmod, open, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { ENGINE_BIN, filesIdentical, parseJson, runEngine, sh, sparseFile, tempDir, writeRegion, type BackupJson, withoutProgress, backUp, initRepository } from './helpers.js';
import { qcow2, qemuImgCompare, qemuIo, qemuNbd, type Export } from './qemu.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
let dir: string;
let cleanup: () => Promise<void>;
let repo: string;
let image: string;
let backupId: string;
const exportsToStop: Export[] = [];

interface RestoreJson {
  backup: string;
  disks: { name: string; path: string; blocksWritten: number; blocksCompared: number; blocksZero: number; bytesWritten: number; rollback: { bitmap: string; baseBackup: string; blocksDirty: number; blocksChangedSinceBase: number } | null }[];
}

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-restore-targets-'));
  repo = join(dir, 'repo');
  image = join(dir, 'disk.raw');
  await sparseFile(image, SIZE);
  await writeRegion(image, 0, 3 * MiB, 'random', 'r');
  await writeRegion(image, 20 * MiB, 2 * MiB + 4096, 'text');
  await writeRegion(image, 60 * MiB, MiB, 'random', 's');
  await initRepository(repo);
  backupId = (await backUp(repo, ['--source', image])).id;
});
afterAll(async () => {
  for (const e of exportsToStop) await e.stop();
  await cleanup();
});

/** nbdkit's eval plugin over a file: reads and writes only, so no NBD_FLAG_SEND_FLUSH. */
function noFlushPlugin(file: string): string[] {
  return [
    'eval',
    `get_size=echo ${SIZE}`,
    `pread=dd if=${file} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none`,
    `pwrite=dd of=${file} seek=$4 conv=notrunc oflag=seek_bytes status=none`,
  ];
}

async function restoreJson(args: string[]): Promise<RestoreJson> {
  const result = await runEngine(['restore', '--repo', repo, ...args, '--json']);
  expect(withoutProgress(result.stderr)).toBe('');
  expect(result.code).toBe(0);
  return parseJson<RestoreJson>(result.stdout);
}

interface MapEntry {
  start: number;
  length: number;
  zero: boolean;
  data: boolean;
}

async function qcow2Map(path: string): Promise<MapEntry[]> {
  return JSON.parse(await sh('qemu-img', ['map', '--output=json', '-f', 'qcow2', path])) as MapEntry[];
}

/** Bytes of `path` that qemu reports as data. */
async function dataBytes(path: string): Promise<number> {
  return (await qcow2Map(path)).filter((e) => e.data).reduce((sum, e) => sum + e.length, 0);
}

describe('restore --to-qcow2', () => {
  test('creates the image, writes only the data blocks, and qemu-img compare finds it identical', async () => {
    const out = join(dir, 'new.qcow2');
    const result = await restoreJson([backupId, '--to-qcow2', out]);
    expect(result.disks[0]!.blocksWritten).toBe(3 + 3 + 1);
    expect(await qemuImgCompare(image, 'raw', out, 'qcow2')).toBe(true);
    expect(await dataBytes(out)).toBe(7 * MiB);
    // qemu-nbd was stopped: the image is not locked any more.
    await qemuIo(out, ['read 0 4k']);
  });

  test('refuses an existing file and leaves it alone', async () => {
    const existing = join(dir, 'existing.qcow2');
    await qcow2(existing, '1M');
    const before = (await stat(existing)).mtimeMs;
    const result = await runEngine(['restore', '--repo', repo, backupId, '--to-qcow2', existing, '--json']);
    expect(result.code).toBe(1);
    expect(parseJson<{ error: { code: string } }>(result.stdout).error.code).toBe('ENGINE_TARGET_UNWRITABLE');
    expect((await stat(existing)).mtimeMs).toBe(before);
  });

  test('a restore that meets a damaged chunk removes the image it created', async () => {
    const damaged = join(dir, 'damaged-repo');
    await sh('cp', ['-a', repo, damaged]);
    for (const sub of await readdir(join(damaged, 'packs'))) {
      for (const name of await readdir(join(damaged, 'packs', sub))) {
        const path = join(damaged, 'packs', sub, name);
        if ((await stat(path)).size < MiB) continue;
        await chmod(path, 0o644);
        const handle = await open(path, 'r+');
        await handle.write(Buffer.from('garbage'), 0, 7, 32 + 48 + 10);
        await handle.close();
      }
    }
    const out = join(dir, 'failed.qcow2');
    const result = await runEngine(['restore', '--repo', damaged, backupId, '--to-qcow2', out, '--json']);
    expect(result.code).toBe(4);
    await expect(stat(out)).rejects.toThrow();
  });
});

describe('restore --to an NBD export', () => {
  test('into an existing export full of other data: identical afterwards, zero blocks as WRITE_ZEROES', async () => {
    const target = join(dir, 'existing-export.qcow2');
    await qcow2(target, `${SIZE}`);
    await qemuIo(target, [`write -P 0x11 0 ${SIZE}`]);
    const served = await qemuNbd(target, dir, { readOnly: false, exportName: 'vm disk' });
    exportsToStop.push(served);
    const result = await restoreJson([backupId, '--to', served.uri]);
    expect(result.disks[0]!.blocksWritten).toBe(64);
    expect(result.disks[0]!.blocksZero).toBe(64 - 7);
    await served.stop();
    expect(await qemuImgCompare(image, 'raw', target, 'qcow2')).toBe(true);
    // Written as zeros through WRITE_ZEROES, the zero blocks are zero clusters, not 57 MiB of data.
    expect(await dataBytes(target)).toBe(7 * MiB);
  });

  test('an export that does not advertise FLUSH (nbdkit eval without a flush script) is restored without sending one', async () => {
    const file = join(dir, 'no-flush.img');
    await writeRegion(file, 0, SIZE, 'repeat', 'other');
    const info = await sh('nbdkit', ['-U', '-', ...noFlushPlugin(file), '--run', 'nbdinfo "$uri"']);
    expect(info).toMatch(/can_flush: false/);
    const run = `${process.execPath} ${ENGINE_BIN} restore --repo ${repo} ${backupId} --to "$uri" --json`;
    const out = await sh('nbdkit', ['-U', '-', ...noFlushPlugin(file), '--run', run]);
    expect(parseJson<RestoreJson>(out).disks[0]!.blocksWritten).toBe(64);
    expect(await filesIdentical(file, image)).toBe(true);
  });

  test('an export smaller than the disk, or read-only, is refused', async () => {
    const small = join(dir, 'small.qcow2');
    await qcow2(small, '32M');
    const served = await qemuNbd(small, dir, { readOnly: false });
    exportsToStop.push(served);
    const tooSmall = await runEngine(['restore', '--repo', repo, backupId, '--to', served.uri, '--json']);
    expect(tooSmall.code).toBe(1);
    expect(parseJson<{ error: { code: string } }>(tooSmall.stdout).error.code).toBe('ENGINE_TARGET_TOO_SMALL');
    await served.stop();
    const big = join(dir, 'big.qcow2');
    await qcow2(big, '128M');
    const readOnly = await qemuNbd(big, dir, { readOnly: true });
    exportsToStop.push(readOnly);
    const refused = await runEngine(['restore', '--repo', repo, backupId, '--to', readOnly.uri, '--json']);
    expect(parseJson<{ error: { code: string } }>(refused.stdout).error.code).toBe('ENGINE_TARGET_UNWRITABLE');
    await readOnly.stop();
  });
});

describe('rollback: restore --only-changed', () => {
  test('compares every block of a file and writes exactly the ones that differ', async () => {
    const target = join(dir, 'rollback.raw');
    await restoreJson([backupId, '--to', target]);
    // Three blocks differ: new bytes in a data block, data in a zero block, zeros over a data block.
    await writeRegion(target, MiB + 100, 5000, 'random', 'x');
    await writeRegion(target, 40 * MiB, 4096, 'text');
    await writeRegion(target, 60 * MiB, MiB, 'zero');
    const result = await restoreJson([backupId, '--to', target, '--only-changed']);
    expect(result.disks[0]!.blocksCompared).toBe(64);
    expect(result.disks[0]!.blocksWritten).toBe(3);
    expect(await filesIdentical(target, image)).toBe(true);
    const again = await restoreJson([backupId, '--to', target, '--only-changed']);
    expect(again.disks[0]!.blocksWritten).toBe(0);
  });

  test('over NBD, comparing the export\'s blocks', async () => {
    const target = join(dir, 'rollback-export.qcow2');
    await restoreJson([backupId, '--to-qcow2', target]);
    await qemuIo(target, ['write -P 0x42 8M 4k', 'write -P 0x43 63M 1M']);
    const served = await qemuNbd(target, dir, { readOnly: false });
    exportsToStop.push(served);
    const result = await restoreJson([backupId, '--to', served.uri, '--only-changed']);
    await served.stop();
    expect(result.disks[0]!.blocksCompared).toBe(64);
    expect(result.disks[0]!.blocksWritten).toBe(2);
    expect(await qemuImgCompare(image, 'raw', target, 'qcow2')).toBe(true);
  });

  test('--since-bitmap writes the dirty blocks plus the blocks that changed between the backups, and nothing else', async () => {
    const vm = join(dir, 'vm.qcow2');
    await qcow2(vm, '32M');
    await qemuIo(vm, ['write -P 0x01 0 32M']);
    const first = parseJson<BackupJson>((await runEngine(['backup', '--repo', repo, '--image', vm, '--json'])).stdout);
    await qemuIo(vm, ['write -P 0x02 2M 4k', 'write -P 0x03 20M 64k']); // blocks 2 and 20
    const secondRun = await runEngine(['backup', '--repo', repo, '--image', vm, '--json']);
    expect(secondRun.code).toBe(0);
    const second = parseJson<BackupJson>(secondRun.stdout);
    expect(second.disks[0]!.mode).toBe('incremental');
    const bitmap = second.disks[0]!.checkpoint!;
    const asSecond = join(dir, 'second.raw');
    const asFirst = join(dir, 'first.raw');
    await restoreJson([second.id, '--to', asSecond]);
    await restoreJson([first.id, '--to', asFirst]);

    // The guest writes on after the second backup: blocks 7 and 8 (one write across the boundary).
    await qemuIo(vm, [`write -P 0x04 ${8 * MiB - 512} 1024`]);
    let served = await qemuNbd(vm, dir, { readOnly: false, bitmap });
    exportsToStop.push(served);
    const toSecond = await restoreJson([second.id, '--to', served.uri, '--only-changed', '--since-bitmap', bitmap]);
    await served.stop();
    expect(toSecond.disks[0]!.rollback).toEqual({ bitmap, baseBackup: second.id, blocksDirty: 2, blocksChangedSinceBase: 0 });
    expect(toSecond.disks[0]!.blocksWritten).toBe(2);
    expect(toSecond.disks[0]!.blocksCompared).toBe(0);
    expect(await qemuImgCompare(asSecond, 'raw', vm, 'qcow2')).toBe(true);

    // Back to the first backup with the second's bitmap: blocks dirty since (7 and 8, rewritten by the
    // rollback above, and 30 now) plus blocks 2 and 20, which differ between the two backups.
    await qemuIo(vm, ['write -P 0x05 30M 4k']);
    served = await qemuNbd(vm, dir, { readOnly: false, bitmap });
    exportsToStop.push(served);
    const toFirst = await restoreJson([first.id, '--to', served.uri, '--only-changed', '--since-bitmap', bitmap]);
    await served.stop();
    expect(toFirst.disks[0]!.rollback).toEqual({ bitmap, baseBackup: second.id, blocksDirty: 3, blocksChangedSinceBase: 2 });
    expect(toFirst.disks[0]!.blocksWritten).toBe(5);
    expect(await qemuImgCompare(asFirst, 'raw', vm, 'qcow2')).toBe(true);
  });

  test('refusals: --since-bitmap without --only-changed, --only-changed on a missing file, a bitmap no backup started', async () => {
    const usage = await runEngine(['restore', '--repo', repo, backupId, '--to', join(dir, 'x.raw'), '--since-bitmap', 'b', '--json']);
    expect(usage.code).toBe(2);
    const missing = await runEngine(['restore', '--repo', repo, backupId, '--to', join(dir, 'absent.raw'), '--only-changed', '--json']);
    expect(missing.code).toBe(2);
    await expect(stat(join(dir, 'absent.raw'))).rejects.toThrow();
    const target = join(dir, 'stranger.qcow2');
    await qcow2(target, `${SIZE}`);
    await sh('qemu-img', ['bitmap', '--add', target, 'stranger']);
    const served = await qemuNbd(target, dir, { readOnly: false, bitmap: 'stranger' });
    exportsToStop.push(served);
    const stranger = await runEngine(['restore', '--repo', repo, backupId, '--to', served.uri, '--only-changed', '--since-bitmap', 'stranger', '--json']);
    await served.stop();
    expect(stranger.code).toBe(2);
    expect(parseJson<{ error: { message: string } }>(stranger.stdout).error.message).toMatch(/no backup in this repository has checkpoint stranger/);
  });
});
