/**
 * A pack lost from the repository (deleted, on a disk that lost it) or cut short: no backup after that
 * may deduplicate against what the index still says it held, nor may an incremental reuse its parent's
 * map entries that point into it. The chunks are stored again, the new backup restores byte for byte, the
 * older backups that reference the same content heal, and verify names the backups that lost data.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { copyFile, open, readdir, rm, stat, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { exitOf, expectRestoreIdentical, parseJson, runEngine, sparseFile, spawnEngine, tempDir, writeRegion, type BackupJson, waitFor } from './helpers.js';
import { qcow2, qemuImgCompare, qemuIo } from './qemu.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-pack-loss-'));
});
afterAll(async () => {
  await cleanup();
});

/** The frame kinds (SPEC.md, section 5): a pack of one backup holds either chunks or map pages. */
const KIND_DATA = 1;
const KIND_MAP_LEAF = 2;

/**
 * Every pack of the repository with its size, largest first, and the kind of its first frame (byte 4 of the
 * frame at offset 32): which pack holds the map is read from the pack, not guessed from sizes, since
 * compressed chunks of a patterned disk can be smaller than the map page.
 */
async function packs(repo: string): Promise<{ path: string; id: string; size: number; kind: number }[]> {
  const found: { path: string; id: string; size: number; kind: number }[] = [];
  for (const sub of await readdir(join(repo, 'packs'))) {
    for (const id of await readdir(join(repo, 'packs', sub))) {
      const path = join(repo, 'packs', sub, id);
      const file = await open(path, 'r');
      const kind = Buffer.alloc(1);
      await file.read(kind, 0, 1, 32 + 4).finally(() => file.close());
      found.push({ path, id, size: (await stat(path)).size, kind: kind[0]! });
    }
  }
  return found.sort((a, b) => b.size - a.size);
}

async function backup(repo: string, args: string[]): Promise<{ json: BackupJson; stderr: string }> {
  const text = await runEngine(['backup', '--repo', repo, ...args]);
  expect(text.code, text.stderr).toBe(0);
  const list = parseJson<{ backups: BackupJson[] }>((await runEngine(['list', '--repo', repo, '--json'])).stdout);
  return { json: list.backups.at(-1)!, stderr: text.stderr };
}

interface VerifyJson {
  ok: boolean;
  problems: { code: string; message: string; pack?: string; affected?: { backup: string; disk: string; chunks: number; mapPages: number; firstOffset: number | null; lastOffset: number | null }[] }[];
}

describe('a pack lost from the repository', () => {
  let repo: string;
  let image: string;
  let first: BackupJson;
  let lost: { path: string; id: string };

  beforeAll(async () => {
    repo = join(dir, 'repo');
    image = join(dir, 'disk.raw');
    await sparseFile(image, 12 * MiB);
    await writeRegion(image, 0, 8 * MiB, 'random', 'lost');
    expect((await runEngine(['init', repo])).code).toBe(0);
    first = (await backup(repo, ['--source', image])).json;
    lost = (await packs(repo))[0]!;
    await rm(lost.path);
  });

  test('verify names the pack and every backup and disk that lost data with it', async () => {
    const result = await runEngine(['verify', '--repo', repo, '--json']);
    expect(result.code).toBe(4);
    const report = parseJson<VerifyJson>(result.stdout);
    const missing = report.problems.filter((p) => p.code === 'PACK_MISSING');
    expect(missing).toHaveLength(1);
    expect(missing[0]).toMatchObject({ pack: lost.id, affected: [{ backup: first.id, disk: 'disk.raw', chunks: 8, mapPages: 0, firstOffset: 0, lastOffset: 7 * MiB }] });
    expect(missing[0]!.message).toContain(`pack ${lost.id} is missing (8 index entries name it); backup that lost data with it: ${first.id} (disk disk.raw: 8 chunks at disk offsets 0 to ${7 * MiB})`);
    expect(report.problems.filter((p) => p.code === 'CHUNK_DAMAGED')).toHaveLength(8);
  });

  test('serve counts the chunks of the lost pack as missing from the start (and says so)', async () => {
    const socket = join(dir, 'lost.sock');
    const server = spawnEngine(['serve', '--repo', repo, first.id, '--socket', socket, '--json']);
    let stdout = '';
    let stderr = '';
    server.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    server.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    await waitFor('serve is ready', () => stdout.trimEnd().endsWith('}'), { child: server, output: () => stderr, everyMs: 50 });
    server.kill('SIGTERM');
    expect((await exitOf(server)).code).toBe(0);
    expect(parseJson<{ exports: { name: string; missingChunks: number }[] }>(stdout).exports).toEqual([expect.objectContaining({ name: 'disk.raw', missingChunks: 8 })]);
    expect(stderr).toContain('disk disk.raw: 8 chunks are missing (not in the index, or their pack is gone); reading them answers EIO');
  });

  test('the next backup does not deduplicate against it: it stores the chunks again, says so, and heals the older backup', async () => {
    const { json, stderr } = await backup(repo, ['--source', image]);
    expect(json.disks[0]).toMatchObject({ blocksNew: 8, blocksDeduplicated: 0 });
    expect(stderr).toContain(`engine: pack ${lost.id} (missing): this backup did not trust the index entries naming it, and stored again what it found there`);
    await expectRestoreIdentical(repo, json.id, image, { dir });
    // Content addressing: the older backup's map resolves to the new copies.
    await expectRestoreIdentical(repo, first.id, image, { dir });
    expect((await runEngine(['verify', '--repo', repo, '--read-data'])).code).toBe(0);
  });

  test('a pack cut short counts as lost for the frames past its end', async () => {
    const other = join(dir, 'other.raw');
    await sparseFile(other, 4 * MiB);
    await writeRegion(other, 0, 4 * MiB, 'random', 'cut');
    const before = (await backup(repo, ['--source', other, '--name', 'cut'])).json;
    const pack = (await packs(repo)).find((p) => p.size > 3 * MiB && p.size < 5 * MiB)!;
    await truncate(pack.path, Math.floor(pack.size / 2));
    const { json } = await backup(repo, ['--source', other, '--name', 'cut']);
    // The frames in the half that is left are still good; those past the cut are stored again.
    expect(json.disks[0]!.blocksNew).toBeGreaterThan(0);
    expect(json.disks[0]!.blocksNew + json.disks[0]!.blocksDeduplicated).toBe(4);
    await expectRestoreIdentical(repo, json.id, other, { dir });
    await expectRestoreIdentical(repo, before.id, other, { dir });
  });
});

describe('an incremental whose parent references a lost pack', () => {
  let repo: string;
  let image: string;

  beforeAll(async () => {
    repo = join(dir, 'repo-cbt');
    image = join(dir, 'vm.qcow2');
    await qcow2(image, '32M');
    await qemuIo(image, ['write -P 0x61 0 6M', 'write -P 0x62 20M 2M']);
    expect((await runEngine(['init', repo])).code).toBe(0);
  });

  test('re-reads the blocks whose chunks were lost instead of taking the parent entries, and restores byte for byte', async () => {
    const full = (await backup(repo, ['--image', image])).json;
    expect(full.type).toBe('full');
    const frozenFull = join(dir, 'frozen-full.qcow2');
    await copyFile(image, frozenFull);
    const dataPacks = (await packs(repo)).filter((p) => p.kind === KIND_DATA);
    expect(dataPacks.length).toBe(1);
    await rm(dataPacks[0]!.path); // the data pack of the full: every chunk of the parent
    await qemuIo(image, ['write -P 0x63 1M 1M']);
    const { json } = await backup(repo, ['--image', image]);
    expect(json.disks[0]!.mode).toBe('incremental');
    // 1 dirty block, plus the 7 other non-zero blocks whose chunks were in the lost pack: read again.
    expect(json.disks[0]!.bytesRead).toBe(8 * MiB);
    expect(json.disks[0]!.blocksUnchanged).toBe(32 - 8);
    const frozen = join(dir, 'frozen-vm.qcow2');
    await copyFile(image, frozen);
    const restored = join(dir, 'incremental.raw');
    expect((await runEngine(['restore', '--repo', repo, json.id, '--to', restored])).code).toBe(0);
    expect(await qemuImgCompare(restored, 'raw', frozen, 'qcow2')).toBe(true);
    // The chunks read again are the full's too (content addressing): the full is whole again.
    expect((await runEngine(['verify', '--repo', repo, '--read-data'])).code).toBe(0);
    const fullRestored = join(dir, 'full.raw');
    expect((await runEngine(['restore', '--repo', repo, full.id, '--to', fullRestored])).code).toBe(0);
    expect(await qemuImgCompare(fullRestored, 'raw', frozenFull, 'qcow2')).toBe(true);
  });

  test("a parent whose map cannot be read any more makes the disk a full read, said", async () => {
    const fresh = join(dir, 'repo-cbt-map');
    expect((await runEngine(['init', fresh])).code).toBe(0);
    const vm = join(dir, 'vm2.qcow2');
    await qcow2(vm, '16M');
    await qemuIo(vm, ['write -P 0x71 0 3M']);
    const full = (await backup(fresh, ['--image', vm])).json;
    const mapPacks = (await packs(fresh)).filter((p) => p.kind === KIND_MAP_LEAF);
    expect(mapPacks.length).toBe(1);
    await rm(mapPacks[0]!.path); // the map pack of the full (its one leaf page)
    await qemuIo(vm, ['write -P 0x72 0 1M']);
    const { json, stderr } = await backup(fresh, ['--image', vm]);
    expect(json.disks[0]!.mode).toBe('full');
    expect(json.disks[0]!.modeReason).toMatch(new RegExp(`^the map of parent backup ${full.id} cannot be read \\(`));
    expect(stderr).toContain('full read: the map of parent backup');
    const frozen = join(dir, 'frozen-vm2.qcow2');
    await copyFile(vm, frozen);
    const restored = join(dir, 'vm2.raw');
    expect((await runEngine(['restore', '--repo', fresh, json.id, '--to', restored])).code).toBe(0);
    expect(await qemuImgCompare(restored, 'raw', frozen, 'qcow2')).toBe(true);
  });
});
