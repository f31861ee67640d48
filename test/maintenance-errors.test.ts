/**
 * Failures in gc, verify, repair's pack reads, the pack file and the map cursors surface with a stable code
 * of the layer that owns them (or as a reported outcome), never as a bare Error the CLI can only call
 * ENGINE_INTERNAL: a pack that cannot be opened or read (ENGINE_CORRUPT_PACK with its errno), a pack grown
 * past what its offsets address (ENGINE_INVALID_ARGUMENT), a pack verify finds unreadable or gone while it
 * runs (problems, not a crash: a real interleaving, verify stopped at a crash point), and a pack gc cannot
 * delete (kept, with the errno; a later gc deletes it). The map cursor's code is in pipeline-units.test.ts.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { mkdir, readdir, rm, stat, unlink, utimes } from 'node:fs/promises';
import { join } from 'node:path';
import { initChecksum } from '../dist/repo-format/checksum.js';
import { packPath, PackWriter, readFrameBytes, scanPack } from '../dist/repo-format/pack-file.js';
import { EngineError } from '../dist/repo-format/errors.js';
import { ID_SIZE, KIND_DATA, LAYOUT } from '../dist/repo-format/constants.js';
import { parseJson, resumedJson, runEngine, spawnEngine, sparseFile, stoppedItself, tempDir, writeRegion, withoutProgress, type BackupJson, repositoryConfig } from './helpers.js';

await initChecksum();
const run = promisify(execFile);
const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;
const immutable: string[] = [];

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-maint-errors-'));
});
afterAll(async () => {
  for (const path of immutable) await run('chattr', ['-i', path]).catch(() => undefined);
  await cleanup();
});

async function codeOf(work: Promise<unknown>): Promise<{ code: string; details: Readonly<Record<string, unknown>>; message: string }> {
  const error = await work.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(EngineError);
  const { code, details, message } = error as EngineError;
  return { code, details, message };
}

/** A repository with `n` backups of different 2 MiB images: a pack each (data and map). */
async function repoWithBackups(name: string, n: number, initArgs: string[] = []): Promise<{ repo: string; backups: BackupJson[] }> {
  const repo = join(dir, name);
  expect((await runEngine(['init', ...initArgs, repo])).code).toBe(0);
  const backups: BackupJson[] = [];
  for (let i = 0; i < n; i += 1) {
    const image = join(dir, `${name}-${i}.img`);
    await sparseFile(image, 2 * MiB);
    await writeRegion(image, 0, 2 * MiB, 'random', `${name}-${i}`);
    const result = await runEngine(['backup', '--repo', repo, '--source', image, '--name', `vm${i}`, '--json']);
    expect(withoutProgress(result.stderr)).toBe('');
    expect(result.code).toBe(0);
    backups.push(parseJson<BackupJson>(result.stdout));
  }
  return { repo, backups };
}

/** The pack ids, sorted as verify and gc walk them. */
async function packIds(repo: string): Promise<string[]> {
  const ids: string[] = [];
  for (const sub of (await readdir(join(repo, LAYOUT.packs))).sort()) ids.push(...(await readdir(join(repo, LAYOUT.packs, sub))).sort());
  return ids;
}

describe('the pack file', () => {
  test('a pack that cannot be opened or read: ENGINE_CORRUPT_PACK naming it, with the errno', async () => {
    const root = join(dir, 'raw');
    const gone = 'ab'.repeat(16);
    const notAFile = 'cd'.repeat(16);
    await mkdir(packPath(root, notAFile), { recursive: true }); // a directory where the pack should be
    expect(await codeOf(scanPack(root, gone))).toMatchObject({ code: 'ENGINE_CORRUPT_PACK', details: { packId: gone, errno: 'ENOENT' }, message: `pack ${gone} is damaged: cannot open pack (ENOENT)` });
    expect(await codeOf(scanPack(root, notAFile))).toMatchObject({ code: 'ENGINE_CORRUPT_PACK', details: { packId: notAFile, errno: 'EISDIR' }, message: `pack ${notAFile} is damaged: cannot read pack (EISDIR)` });
    expect(await codeOf(readFrameBytes(root, notAFile, 32, 100))).toMatchObject({ code: 'ENGINE_CORRUPT_PACK', details: { errno: 'EISDIR' } });
    expect(await codeOf(readFrameBytes(root, gone, 32, 100))).toMatchObject({ code: 'ENGINE_CORRUPT_PACK', details: { errno: 'ENOENT' } });
  });

  test('a frame that would grow a pack past what 32-bit offsets address: ENGINE_INVALID_ARGUMENT, nothing written', async () => {
    const root = join(dir, 'writer');
    await mkdir(join(root, LAYOUT.tmp), { recursive: true });
    const writer = new PackWriter(root);
    // Only its length is looked at before the refusal: no 4 GiB buffer is needed to reach it.
    const huge = { length: 2 ** 32 } as Uint8Array;
    const refused = await codeOf(writer.append(huge, { kind: KIND_DATA, flags: 0, rawLength: 1, id: Buffer.alloc(ID_SIZE) }));
    expect(refused.code).toBe('ENGINE_INVALID_ARGUMENT');
    expect(refused.message).toBe(`pack ${writer.packId} would grow to ${32 + 2 ** 32} bytes, past the largest a pack may be (4294967295): seal it first`);
    expect(writer.entries).toEqual([]);
    await writer.abort();
  });
});

describe('verify while packs change under it', () => {
  test('a pack that becomes unreadable and one that goes: PACK_DAMAGED with the errno and PACK_MISSING, the chunks named; never ENGINE_INTERNAL', async () => {
    const { repo, backups } = await repoWithBackups('verify-race', 3);
    const ids = await packIds(repo);
    // Two data packs verify has not reached when it stops after scanning the first pack.
    const dataPacks: string[] = [];
    for (const id of ids.slice(1)) if ((await scanPack(repo, id)).frames.some((f) => f.header.kind === KIND_DATA)) dataPacks.push(id);
    const [unreadable, gone] = dataPacks;
    expect(gone).toBeDefined();
    const child = spawnEngine(['verify', '--repo', repo, '--json'], { ENGINE_STOP_AT: 'verify-pack-scanned' });
    await stoppedItself(child);
    await unlink(packPath(repo, unreadable!));
    await mkdir(packPath(repo, unreadable!)); // EISDIR when read
    await unlink(packPath(repo, gone!));
    const { code, json } = await resumedJson<{ ok: boolean; packs: number; problems: { code: string; message: string; pack?: string; backup?: string }[] }>(child);
    expect(code).toBe(4);
    expect(json.ok).toBe(false);
    expect(json.packs).toBe(ids.length - 1); // all but the one gone, the unreadable one included
    expect(json.problems.filter((p) => p.code === 'PACK_DAMAGED')).toEqual([{ code: 'PACK_DAMAGED', message: `pack ${unreadable} is damaged: cannot read pack (EISDIR)`, pack: unreadable }]);
    expect(json.problems.filter((p) => p.code === 'PACK_MISSING').map((p) => p.pack)).toEqual([gone]);
    // The chunks of the two backups whose data pack is unreadable or gone are named damaged; the third backup is whole.
    const damagedBackups = new Set(json.problems.filter((p) => p.code === 'CHUNK_DAMAGED').map((p) => p.backup));
    expect(damagedBackups.size).toBe(2);
    expect(backups.filter((b) => !damagedBackups.has(b.id))).toHaveLength(1);
    expect(json.problems.filter((p) => !['PACK_DAMAGED', 'PACK_MISSING', 'CHUNK_DAMAGED'].includes(p.code))).toEqual([]);
    await rm(packPath(repo, unreadable!), { recursive: true });
  });
});

describe('gc and a pack it cannot delete', () => {
  // Version 3 (the default) and version 1: each version's gc keeps what the store will not delete.
  test.each(['3', '1'])('version %s: an immutable dead pack is kept with the errno, the rest is done; a later gc deletes it', async (format) => {
    const { repo, backups } = await repoWithBackups(`gc-immutable-v${format}`, 2, ['--format', format]);
    const forgotten = await runEngine(['forget', '--repo', repo, backups[0]!.id]);
    expect(forgotten.code).toBe(0);
    const dry = parseJson<{ packs: { deleted: string[] } }>((await runEngine(['gc', '--repo', repo, '--dry-run', '--json'])).stdout);
    expect(dry.packs.deleted).toHaveLength(2); // its data pack and its map pack
    const [dead, other] = dry.packs.deleted as [string, string];
    await run('chattr', ['+i', packPath(repo, dead)]); // even root cannot unlink it now
    immutable.push(packPath(repo, dead));

    const otherSize = (await stat(packPath(repo, other))).size;
    const result = await runEngine(['gc', '--repo', repo, '--json']);
    expect(result.stderr).toBe('');
    expect(result.code).toBe(0);
    const report = parseJson<{ packs: { deleted: string[]; kept: { pack: string; why: string }[] }; bytes: { deleted: number } }>(result.stdout);
    expect(report.packs.deleted).toEqual([other]);
    expect(report.packs.kept).toEqual([{ pack: dead, why: 'not deleted: it cannot be deleted (EPERM); a later gc deletes it' }]);
    expect(report.bytes.deleted).toBe(otherSize); // the other pack's bytes only
    // The index no longer names it: garbage for verify, not a problem.
    const verified = parseJson<{ ok: boolean; garbage: { unindexedPacks: string[] } }>((await runEngine(['verify', '--repo', repo, '--json'])).stdout);
    expect(verified).toMatchObject({ ok: true, garbage: { unindexedPacks: [dead] } });

    await run('chattr', ['-i', packPath(repo, dead)]);
    if ((await repositoryConfig(repo)).version === 3) {
      // Version 3 (the default) deletes a pack no segment names only once it is older than T + 2B by the store's
      // clock, a folder's being the file's mtime (SPEC.md 19.8): aged here instead of waiting minutes.
      const hourAgo = new Date(Date.now() - 3_600_000);
      await utimes(packPath(repo, dead), hourAgo, hourAgo);
    }
    const later = parseJson<{ packs: { deleted: string[]; kept: unknown[] } }>((await runEngine(['gc', '--repo', repo, '--json'])).stdout);
    expect(later.packs).toMatchObject({ deleted: [dead], kept: [] });
  });
});
