/**
 * The default chain of an `--image` disk follows the image itself (the checkpoint bitmaps this
 * repository put in it), not its file name: two VMs whose qcow2 files share a base name back up
 * incrementally side by side, chains recorded before this rule continue, and a first backup says why it
 * reads everything once.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { copyFile, mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseJson, runEngine, tempDir, type BackupJson, withoutProgress } from './helpers.js';
import { qcow2, qemuImgCompare, qemuIo } from './qemu.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-image-identity-'));
});
afterAll(async () => {
  await cleanup();
});

async function backupImage(repo: string, image: string): Promise<{ json: BackupJson; stdout: string; stderr: string }> {
  const text = await runEngine(['backup', '--repo', repo, '--image', image]);
  expect(text.code, text.stderr).toBe(0);
  const list = parseJson<{ backups: BackupJson[] }>((await runEngine(['list', '--repo', repo, '--json'])).stdout);
  return { json: list.backups.at(-1)!, stdout: text.stdout, stderr: text.stderr };
}

async function expectRestores(repo: string, id: string, image: string): Promise<void> {
  const frozen = join(dir, `frozen-${id}.qcow2`);
  await copyFile(image, frozen);
  const restored = join(dir, `restored-${id}.raw`);
  expect((await runEngine(['restore', '--repo', repo, id, '--to', restored])).code).toBe(0);
  expect(await qemuImgCompare(restored, 'raw', frozen, 'qcow2')).toBe(true);
}

describe('two VMs whose images share a base name', () => {
  test('each keeps its own chain: every backup after the first of each is incremental, and restores byte for byte', async () => {
    const repo = join(dir, 'repo');
    expect((await runEngine(['init', repo])).code).toBe(0);
    const a = join(dir, 'vm-a', 'disk.qcow2');
    const b = join(dir, 'vm-b', 'disk.qcow2');
    for (const [image, pattern] of [[a, '0x41'], [b, '0x42']] as const) {
      await mkdir(join(image, '..'), { recursive: true });
      await qcow2(image, '16M');
      await qemuIo(image, [`write -P ${pattern} 0 4M`]);
    }
    const firstA = await backupImage(repo, a);
    const firstB = await backupImage(repo, b);
    expect(firstA.json.disks[0]!.mode).toBe('full');
    expect(firstB.json.disks[0]!.mode).toBe('full');
    for (let round = 0; round < 2; round += 1) {
      for (const [image, pattern] of [[a, '0x51'], [b, '0x52']] as const) {
        await qemuIo(image, [`write -P ${pattern} ${8 + round}M 1M`]);
        const next = await backupImage(repo, image);
        expect(next.json.disks[0], `${image}, round ${round}`).toMatchObject({ mode: 'incremental', bytesRead: MiB, blocksUnchanged: 15 });
        expect(next.json.name).toBe('disk.qcow2');
        await expectRestores(repo, next.json.id, image);
      }
    }
  });
});

describe('chains recorded before the rule', () => {
  test('a record without the image path recorded continues its chain (the bitmaps it names are the key)', async () => {
    const repo = join(dir, 'repo-old');
    expect((await runEngine(['init', repo])).code).toBe(0);
    const image = join(dir, 'old.qcow2');
    await qcow2(image, '16M');
    await qemuIo(image, ['write -P 0x61 0 2M']);
    const full = await backupImage(repo, image);
    // What an older engine wrote: the source as given, no realPath. (Records are immutable; this one is
    // rewritten here to stand for one made before.)
    const recordPath = join(repo, 'backups', full.json.id);
    const record = JSON.parse(await readFile(recordPath, 'utf8')) as { disks: { source: Record<string, unknown> }[] };
    delete record.disks[0]!.source.realPath;
    await writeFile(recordPath, `${JSON.stringify(record, null, 2)}\n`);
    await qemuIo(image, ['write -P 0x62 4M 1M']);
    const next = await backupImage(repo, image);
    expect(next.json.disks[0]).toMatchObject({ mode: 'incremental', parent: full.json.id, bytesRead: MiB });
    await expectRestores(repo, next.json.id, image);
  });
});

describe("a first backup's full-read reason", () => {
  test('is said once: in the result, not also as a notice', async () => {
    const repo = join(dir, 'repo-first');
    expect((await runEngine(['init', repo])).code).toBe(0);
    const image = join(dir, 'first.qcow2');
    await qcow2(image, '8M');
    await qemuIo(image, ['write -P 0x33 0 1M']);
    const first = await backupImage(repo, image);
    expect(withoutProgress(first.stderr)).toBe('');
    expect(first.stdout.split('no earlier backup of this disk with changed-block tracking')).toHaveLength(2);
  });
});
