/**
 * `engine copy` between folder repositories (SPEC.md 22) through the CLI: an incremental chain of a qcow2
 * image (two levels of map pages at 64 KiB blocks) copied whole; each copy means what its source means
 * (same fields, parents mapped to the target's ids, map roots equal where ids are), restores byte for byte
 * as the source does (cmp), and a second copy sends nothing. Selection by --latest, --name and ids (parents
 * come along); re-keying plain → encrypted, encrypted (key A) → encrypted (key B), encrypted → plain, and into
 * formats 1 and 2; a block-size mismatch refused before the target is touched.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { qcow2, qemuIo } from './qemu.js';
import { filesIdentical, parseJson, runEngine, tempDir, writeRegion, type BackupJson } from './helpers.js';
import { copyOk, copyRun, expectSameMeaning, recordsOf } from './copy-support.js';

const MiB = 1024 * 1024;
let scratch: { path: string; cleanup: () => Promise<void> };
let source: string;
/** The chain's backups, oldest first, and the raw backup of another name. */
const chain: string[] = [];
let other: string;
let image: string;
const passA = 'passphrase-of-a';
const passB = 'passphrase-of-b';

async function init(repo: string, args: string[] = []): Promise<void> {
  const r = await runEngine(['init', repo, '--block-size', '64K', ...args]);
  expect(r.code, r.stderr).toBe(0);
}

async function restoreOf(repo: string, id: string, env: Record<string, string> = {}): Promise<string> {
  const target = join(scratch.path, `restore-${id}-${Math.random().toString(16).slice(2)}.raw`);
  const r = await runEngine(['restore', '--repo', repo, id, '--to', target], { env });
  expect(r.code, r.stderr).toBe(0);
  return target;
}

/** Every copied backup restores as its source does, byte for byte. */
async function expectRestoresEqual(target: string, pairs: { source: string; target: string }[], env: Record<string, string> = {}, sourceEnv: Record<string, string> = {}): Promise<void> {
  for (const pair of pairs) {
    const a = await restoreOf(source, pair.source, sourceEnv);
    const b = await restoreOf(target, pair.target, env);
    expect(await filesIdentical(a, b)).toBe(true);
  }
}

beforeAll(async () => {
  scratch = await tempDir('engine-copy-');
  source = join(scratch.path, 'source');
  await init(source);
  image = join(scratch.path, 'vm.qcow2');
  await qcow2(image, '80M'); // 1280 blocks of 64 KiB: a map of depth 1
  await qemuIo(image, ['write -P 0xab 0 2M', 'write -P 0xcd 70M 1M']);
  const backupImage = async (mode: string[]): Promise<string> => {
    const r = await runEngine(['backup', '--repo', source, '--image', image, '--name', 'vm', ...mode, '--json']);
    expect(r.code, r.stderr).toBe(0);
    return parseJson<BackupJson>(r.stdout).id;
  };
  chain.push(await backupImage([]));
  await qemuIo(image, ['write -P 0x11 1M 64k', 'write -P 0x22 40M 1M']);
  chain.push(await backupImage(['--incremental']));
  await qemuIo(image, ['write -P 0x33 79M 64k']);
  chain.push(await backupImage(['--incremental']));
  const raw = join(scratch.path, 'other.img');
  await writeRegion(raw, 0, 3 * MiB, 'random', 'other');
  const r = await runEngine(['backup', '--repo', source, '--source', raw, '--name', 'other', '--json']);
  expect(r.code, r.stderr).toBe(0);
  other = parseJson<BackupJson>(r.stdout).id;
  await writeFile(join(scratch.path, 'a.pass'), passA);
  await writeFile(join(scratch.path, 'b.pass'), passB);
});

afterAll(async () => {
  await scratch?.cleanup();
});

describe('copy between folders', () => {
  test('--all: the chain stays a chain (parents mapped), every record means what its source does, restores equal; a rerun copies nothing', async () => {
    const target = join(scratch.path, 'all');
    await init(target);
    const report = await copyOk(source, target, ['--all']);
    expect(report.backups.map((b) => [b.source, b.status])).toEqual([...chain, other].map((id) => [id, 'copied']));
    expect(report.backupsCopied).toBe(4);
    expect(report.chunksSent).toBeGreaterThan(0);
    const src = await recordsOf(source);
    const dst = await recordsOf(target);
    const idMap = new Map(report.backups.map((b) => [b.source, b.target]));
    expect(dst.records.size).toBe(4);
    for (const [from, to] of idMap) expectSameMeaning(src.records.get(from)!, dst.records.get(to)!, src.id, idMap, true);
    // The incrementals point at the target's copies of their parents.
    expect(dst.records.get(idMap.get(chain[2]!)!)!.parent).toBe(idMap.get(chain[1]!));
    await expectRestoresEqual(target, report.backups);
    // Only chunks the source stores were sent, each once: the source's own count of new chunks.
    const again = await copyRun(source, target, ['--all']);
    expect(again.code, again.stderr).toBe(0);
    const second = parseJson<typeof report>(again.stdout);
    expect(second).toMatchObject({ backupsCopied: 0, backupsSkipped: 4, chunksSent: 0, bytesSent: 0, bytesRead: 0 });
    const text = await runEngine(['copy', '--from', source, '--to', target, '--all']);
    expect(text.code, text.stderr).toBe(0);
    expect(text.stdout).toContain('nothing to copy: the target holds all 4 selected backup(s)');
    const verify = await runEngine(['verify', '--repo', target, '--read-data']);
    expect(verify.code, verify.stdout + verify.stderr).toBe(0);
  });

  test('--latest 1 of the chain brings its parents; --name other only that one; an id prefix its backup and its parents', async () => {
    const latest = join(scratch.path, 'latest');
    await init(latest);
    const r1 = await copyOk(source, latest, ['--name', 'vm', '--latest', '1']);
    expect(r1.backups.map((b) => b.source)).toEqual(chain);
    const byName = join(scratch.path, 'by-name');
    await init(byName);
    const r2 = await copyOk(source, byName, ['--name', 'other']);
    expect(r2.backups.map((b) => b.source)).toEqual([other]);
    const r3 = await copyOk(source, byName, [chain[1]!.slice(0, 8)]);
    expect(r3.backups.map((b) => [b.source, b.status])).toEqual([[chain[0], 'copied'], [chain[1], 'copied']]);
    // --latest 1 across names: the newest backup (other, a full), alone; already there.
    const r4 = await copyOk(source, byName, ['--latest', '1']);
    expect(r4).toMatchObject({ backupsCopied: 0, backupsSkipped: 1 });
    // The rest of the chain follows later and finds its parents copied.
    const r5 = await copyOk(source, byName, ['--all']);
    expect(r5.backups.filter((b) => b.status === 'copied').map((b) => b.source)).toEqual([chain[2]]);
    const dst = await recordsOf(byName);
    expect(dst.records.get(r5.backups.find((b) => b.source === chain[2])!.target)!.parent).toBe(r3.backups[1]!.target);
  });

  test('plain → encrypted → encrypted under another key → plain format 1, and encrypted → format 2: re-keyed ids, same meaning, equal restores', async () => {
    const encA = join(scratch.path, 'enc-a');
    const encB = join(scratch.path, 'enc-b');
    const plain1 = join(scratch.path, 'plain-v1');
    const enc2 = join(scratch.path, 'enc-v2');
    await init(encA, ['--encrypt', '--password-file', join(scratch.path, 'a.pass')]);
    await init(encB, ['--encrypt', '--password-file', join(scratch.path, 'b.pass')]);
    await init(plain1, ['--format', '1']);
    await init(enc2, ['--format', '2', '--encrypt', '--password-file', join(scratch.path, 'b.pass')]);
    const toA = await copyOk(source, encA, ['--all', '--to-password-file', join(scratch.path, 'a.pass')]);
    const aToB = await copyOk(encA, encB, ['--all', '--from-password-file', join(scratch.path, 'a.pass'), '--to-password-file', join(scratch.path, 'b.pass')]);
    const bToPlain = await copyOk(encB, plain1, ['--all', '--from-password-file', join(scratch.path, 'b.pass')]);
    const aToV2 = await copyOk(encA, enc2, ['--all'], { ENGINE_PASSWORD: passA, ENGINE_TO_PASSWORD: passB });
    for (const r of [toA, aToB, bToPlain, aToV2]) expect(r.backupsCopied).toBe(4);
    const src = await recordsOf(source);
    const a = await recordsOf(encA, passA);
    const b = await recordsOf(encB, passB);
    const p = await recordsOf(plain1);
    const idsToA = new Map(toA.backups.map((x) => [x.source, x.target]));
    for (const [from, to] of idsToA) expectSameMeaning(src.records.get(from)!, a.records.get(to)!, src.id, idsToA, false);
    const idsAToB = new Map(aToB.backups.map((x) => [x.source, x.target]));
    // A copy of a copy carries the original's identity.
    for (const [from, to] of idsAToB) expectSameMeaning(a.records.get(from)!, b.records.get(to)!, a.id, idsAToB, false);
    expect([...b.records.values()].map((r) => r.copiedFrom!.repository)).toEqual([src.id, src.id, src.id, src.id]);
    // Back to plain: the ids are SHA-256 again, so the maps are the source's, root for root.
    const idsToPlain = new Map(bToPlain.backups.map((x) => [x.source, x.target]));
    for (const [from, to] of idsToPlain) {
      const original = src.records.get(b.records.get(from)!.copiedFrom!.backup)!;
      expect(p.records.get(to)!.disks.map((d) => d.map.root)).toEqual(original.disks.map((d) => d.map.root));
    }
    // The chain's newest backup restores from each copy as from the source (the others share its path: map pages and chunks).
    for (const [id, copyId] of [...idsToA].filter(([id]) => id === chain[2])) {
      const inB = idsAToB.get(copyId)!;
      const inPlain = idsToPlain.get(inB)!;
      const expected = await restoreOf(source, id);
      expect(await filesIdentical(expected, await restoreOf(encA, copyId, { ENGINE_PASSWORD: passA }))).toBe(true);
      expect(await filesIdentical(expected, await restoreOf(encB, inB, { ENGINE_PASSWORD: passB }))).toBe(true);
      expect(await filesIdentical(expected, await restoreOf(plain1, inPlain))).toBe(true);
    }
    // Copying the plain copy back into the source finds every original: nothing is copied.
    const back = await copyOk(plain1, source, ['--all']);
    expect(back).toMatchObject({ backupsCopied: 0, backupsSkipped: 4 });
    for (const [repo, pass] of [[encB, passB], [enc2, passB], [plain1, undefined]] as const) {
      const verify = await runEngine(['verify', '--repo', repo, '--read-data'], { env: pass === undefined ? {} : { ENGINE_PASSWORD: pass } });
      expect(verify.code, verify.stdout + verify.stderr).toBe(0);
    }
  });

  test('a target of another block size is refused in one line (ENGINE_BLOCK_SIZE_MISMATCH, exit 2), nothing written', async () => {
    const target = join(scratch.path, 'one-mib');
    const r0 = await runEngine(['init', target]);
    expect(r0.code, r0.stderr).toBe(0);
    const before = await readdir(target, { recursive: true });
    const r = await copyRun(source, target, ['--all']);
    expect(r.code).toBe(2);
    expect(parseJson<{ error: { code: string; message: string } }>(r.stdout).error).toMatchObject({ code: 'ENGINE_BLOCK_SIZE_MISMATCH', message: expect.stringContaining('block size 65536') });
    expect((await readdir(target, { recursive: true })).sort()).toEqual(before.sort());
    const text = await runEngine(['copy', '--from', source, '--to', target, '--all']);
    expect(text.stderr.trim().split('\n')).toHaveLength(1);
    const same = await copyRun(source, source, ['--all']);
    expect([same.code, parseJson<{ error: { code: string } }>(same.stdout).error.code]).toEqual([2, 'ENGINE_INVALID_ARGUMENT']);
  });

  test('usage: one way of choosing; a missing --to; --limit-upload 0; a passphrase for a plain target', async () => {
    const target = join(scratch.path, 'usage');
    for (const args of [[], ['--all', '--name', 'vm'], ['--all', chain[0]!]]) {
      const r = await copyRun(source, target, args);
      expect(r.code).toBe(2);
    }
    const r = await runEngine(['copy', '--from', source, '--all']);
    expect([r.code, r.stderr]).toEqual([2, expect.stringContaining('--to')]);
    const slow = await copyRun(source, target, ['--all', '--limit-upload', '0']);
    expect([slow.code, parseJson<{ error: { message: string } }>(slow.stdout).error.message]).toEqual([2, expect.stringContaining('--limit-upload 0')]);
    // A target passphrase for a plain target: refused before anything is written (the caller expected encryption).
    const plain = join(scratch.path, 'plain-target');
    await init(plain);
    const refused = await copyRun(source, plain, ['--all', '--to-password-file', join(scratch.path, 'a.pass')]);
    expect([refused.code, parseJson<{ error: { code: string } }>(refused.stdout).error.code]).toEqual([6, 'ENGINE_NOT_ENCRYPTED']);
    expect((await recordsOf(plain)).records.size).toBe(0);
  });
});
