/**
 * zstd repositories end to end through the CLI (SPEC.md 3, 5, 13.1): `init --compression` on a folder
 * (formats 1, 2 and 3) and on S3 (the tests' own Ceph RGW), backup → restore byte for byte (cmp) → verify
 * --read-data, with the frames in the packs checked for what they hold; a repository whose lz4 frames are
 * followed by zstd ones (an lz4 version-3 repository whose config repair rebuilt) restores every backup; a
 * hostile zstd frame with a correct checksum is named by verify and restore, and nothing else is lost.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { constants as zlibConstants, zstdCompressSync, zstdDecompressSync } from 'node:zlib';
import { startRgwCluster, type RgwCluster } from './rgw.js';
import { createBucket, repositoryKeys, repositoryObject, v3Env } from './s3-helpers.js';
import { filesIdentical, parseJson, runEngine, tempDir, writeRegion, type BackupJson } from './helpers.js';
import { checksum64, initChecksum } from '../dist/repo-format/checksum.js';
import { FLAG_LZ4, FLAG_ZSTD, KIND_DATA } from '../dist/repo-format/constants.js';

const MiB = 1024 * 1024;
const BUCKET = 'engine-compression';
let cluster: RgwCluster;
let scratch: { path: string; cleanup: () => Promise<void> };
let image: string;
let changed: string;

const env = (cache = 'cache'): Record<string, string> => v3Env(cluster, scratch.path, cache);

beforeAll(async () => {
  await initChecksum();
  scratch = await tempDir();
  cluster = await startRgwCluster({ memstoreBytes: 512 * MiB });
  await createBucket(cluster, BUCKET);
  // Every kind of block: text (compresses), random (the probe stores it raw), zeros, repeated bytes; a short last block.
  image = join(scratch.path, 'mixed.img');
  await writeRegion(image, 0, 6 * MiB, 'text', 'text');
  await writeRegion(image, 6 * MiB, 4 * MiB, 'random', 'random');
  await writeRegion(image, 10 * MiB, 2 * MiB, 'zero', 'zero');
  await writeRegion(image, 12 * MiB, 3 * MiB + 4097, 'repeat', 'repeat');
  changed = join(scratch.path, 'changed.img');
  // No block in common with `image` (text blocks depend only on their offset): a repeated pattern of its own.
  await writeRegion(changed, 0, 5 * MiB, 'repeat', 'other pattern');
  await writeRegion(changed, 5 * MiB, 3 * MiB, 'random', 'other random');
}, 300_000);

afterAll(async () => {
  await cluster?.stop();
  await scratch?.cleanup();
});

interface FrameAt {
  pack: string;
  offset: number;
  flags: number;
  kind: number;
  storedLength: number;
}

/** Every frame of every pack, walked as SPEC.md 6 says (header 32 bytes, then frames of 56 + storedLength). */
async function framesOf(repo: string): Promise<FrameAt[]> {
  const packs: { key: string; bytes: Buffer }[] = [];
  if (repo.startsWith('s3://')) {
    for (const key of (await repositoryKeys(cluster, repo)).filter((k) => k.startsWith('packs/'))) packs.push({ key, bytes: await repositoryObject(cluster, repo, key) });
  } else {
    for (const dir of await readdir(join(repo, 'packs'))) {
      for (const name of await readdir(join(repo, 'packs', dir))) packs.push({ key: join(repo, 'packs', dir, name), bytes: await readFile(join(repo, 'packs', dir, name)) });
    }
  }
  const frames: FrameAt[] = [];
  for (const { key, bytes } of packs) {
    for (let at = 32; at + 56 <= bytes.length; ) {
      const storedLength = bytes.readUInt32LE(at + 12);
      frames.push({ pack: key, offset: at, flags: bytes.readUInt8(at + 5), kind: bytes.readUInt8(at + 4), storedLength });
      at += 56 + storedLength;
    }
  }
  return frames;
}

async function ok(args: string[], cache?: string): Promise<string> {
  const r = await runEngine(args, { env: env(cache) });
  expect(r.code, r.stderr).toBe(0);
  return r.stdout;
}

async function backUp(repo: string, source: string, extra: string[] = []): Promise<string> {
  return parseJson<BackupJson>(await ok(['backup', '--repo', repo, '--source', source, '--json', ...extra])).id;
}

async function restoresIdentical(repo: string, id: string, expected: string, extra: string[] = []): Promise<void> {
  const target = join(scratch.path, `restored-${id}.img`);
  await ok(['restore', '--repo', repo, id, '--to', target, ...extra]);
  expect(await filesIdentical(target, expected)).toBe(true);
  await rm(target);
}

const PASSWORD = { ENGINE_PASSWORD: 'correct horse battery' };

describe('zstd repositories: backup, restore, verify --read-data', () => {
  const cases: { name: string; where: 'folder' | 's3'; init: string[]; version: number; level: number | null; encrypted?: boolean }[] = [
    { name: 'format 3 on a folder, zstd:1', where: 'folder', init: ['--compression', 'zstd:1'], version: 3, level: 1 },
    { name: 'format 3 on S3, zstd:3', where: 's3', init: ['--compression', 'zstd:3'], version: 3, level: 3 },
    { name: 'format 1, zstd:19', where: 'folder', init: ['--format', '1', '--compression', 'zstd:19'], version: 1, level: 19 },
    { name: 'format 2 (encrypted), zstd', where: 'folder', init: ['--format', '2', '--encrypt', '--compression', 'zstd'], version: 2, level: 1, encrypted: true },
    { name: 'format 3, the default compression: lz4', where: 'folder', init: [], version: 3, level: null },
  ];
  for (const c of cases) {
    test(c.name, async () => {
      const repo = c.where === 's3' ? `s3://${BUCKET}/${c.version}-${c.level}` : join(scratch.path, `repo-${c.version}-${c.level}`);
      const extraEnv = c.encrypted ? PASSWORD : {};
      const run = async (args: string[]): Promise<string> => {
        const r = await runEngine(args, { env: { ...env(), ...extraEnv } });
        expect(r.code, r.stderr).toBe(0);
        return r.stdout;
      };
      const config = parseJson<{ version: number; compression: string; compressionLevel?: number }>(await run(['init', repo, '--json', ...c.init]));
      expect([config.version, config.compression, config.compressionLevel ?? null]).toEqual([c.version, c.level === null ? 'lz4-block' : 'zstd', c.level]);
      const id = parseJson<BackupJson>(await run(['backup', '--repo', repo, '--source', image, '--json'])).id;
      const frames = await framesOf(repo);
      const codecFlags = new Set(frames.map((f) => f.flags & (FLAG_LZ4 | FLAG_ZSTD)));
      // Text and repeated blocks and the map page compressed with the repository's codec; random blocks raw.
      expect([...codecFlags].sort()).toEqual([0, c.level === null ? FLAG_LZ4 : FLAG_ZSTD]);
      const target = join(scratch.path, `restored-${c.version}-${c.level}.img`);
      await run(['restore', '--repo', repo, id, '--to', target]);
      expect(await filesIdentical(target, image)).toBe(true);
      await rm(target);
      const verify = parseJson<{ ok: boolean; problems: unknown[] }>(await run(['verify', '--repo', repo, '--read-data', '--json']));
      expect(verify).toMatchObject({ ok: true, problems: [] });
    });
  }
});

describe('the golden zstd repository (test/fixtures/v3-be66992-zstd, read by fixtures.test.ts and the spec reader)', () => {
  test('holds zstd frames and plain ones, and names zstd level 3', async () => {
    const repo = join(import.meta.dirname, 'fixtures', 'v3-be66992-zstd', 'repo');
    const flags = (await framesOf(repo)).map((f) => f.flags);
    expect(new Set(flags)).toEqual(new Set([0, FLAG_ZSTD]));
    const config = JSON.parse(await readFile(join(repo, 'config'), 'utf8')) as { compression: string; compressionLevel: number };
    expect([config.compression, config.compressionLevel]).toEqual(['zstd', 3]);
  });
});

describe('a repository of lz4 frames, then zstd ones', () => {
  test('an lz4 version-3 repository whose lost config repair rebuilds writes zstd from then on; every backup restores and verifies', async () => {
    const repo = join(scratch.path, 'repo-mixed');
    await ok(['init', repo, '--compression', 'lz4']);
    const first = await backUp(repo, image);
    expect(new Set((await framesOf(repo)).map((f) => f.flags))).toEqual(new Set([0, FLAG_LZ4]));
    await rm(join(repo, 'config'));
    await ok(['repair', '--repo', repo]);
    const config = JSON.parse(await readFile(join(repo, 'config'), 'utf8')) as { compression: string; compressionLevel: number };
    expect([config.compression, config.compressionLevel]).toEqual(['zstd', 1]);
    const second = await backUp(repo, changed);
    expect(new Set((await framesOf(repo)).map((f) => f.flags))).toEqual(new Set([0, FLAG_LZ4, FLAG_ZSTD]));
    await restoresIdentical(repo, first, image);
    await restoresIdentical(repo, second, changed);
    const verify = parseJson<{ ok: boolean }>(await ok(['verify', '--repo', repo, '--read-data', '--json']));
    expect(verify.ok).toBe(true);
  });

  test('a version-1 lz4 repository whose config is lost is rebuilt as lz4: older engines keep reading it', async () => {
    const repo = join(scratch.path, 'repo-v1-lz4');
    await ok(['init', repo, '--format', '1']);
    const id = await backUp(repo, image);
    await rm(join(repo, 'config'));
    await ok(['repair', '--repo', repo]);
    const config = JSON.parse(await readFile(join(repo, 'config'), 'utf8')) as { compression: string; compressionLevel?: number };
    expect([config.compression, config.compressionLevel]).toEqual(['lz4-block', undefined]);
    await restoresIdentical(repo, id, image);
  });

  test('a version-1 zstd repository whose config is lost is rebuilt as zstd, from its frames', async () => {
    const repo = join(scratch.path, 'repo-v1-zstd');
    await ok(['init', repo, '--format', '1', '--compression', 'zstd:5']);
    const id = await backUp(repo, image);
    await rm(join(repo, 'config'));
    await ok(['repair', '--repo', repo]);
    const config = JSON.parse(await readFile(join(repo, 'config'), 'utf8')) as { compression: string; compressionLevel?: number };
    // The level is a writer's setting, nowhere in the frames: the default's.
    expect([config.compression, config.compressionLevel]).toEqual(['zstd', 1]);
    await restoresIdentical(repo, id, image);
  });
});

/**
 * `length` bytes that libzstd decodes to `plaintext`: one zstd frame of it (level 19, smaller than the level-1
 * frame it replaces) followed by, as `after` says, a second frame (empty, no content size, a 2^27-byte window)
 * or a skippable frame, sized to fill `length` exactly, so that the pack's layout does not change.
 */
function frameAndMore(plaintext: Buffer, length: number, after: 'second frame' | 'skippable frame'): { payload: Buffer; trailing: number } {
  const level19 = (checksum: number): Buffer => zstdCompressSync(plaintext, { params: { [zlibConstants.ZSTD_c_compressionLevel]: 19, [zlibConstants.ZSTD_c_checksumFlag]: checksum } });
  if (after === 'skippable frame') {
    const first = level19(0);
    const skippable = Buffer.alloc(length - first.length);
    expect(skippable.length).toBeGreaterThanOrEqual(8);
    skippable.writeUInt32LE(0x184d2a50, 0);
    skippable.writeUInt32LE(skippable.length - 8, 4);
    return { payload: Buffer.concat([first, skippable]), trailing: skippable.length };
  }
  // Second frame: header (magic, descriptor, window) 6 bytes, empty non-last raw blocks of 3 bytes, an empty
  // last one, and a content checksum (4 bytes, xxh64 of nothing) when the remainder needs it; the first frame's
  // own checksum (4 more bytes) makes up the rest.
  let fill = length - level19(0).length - 9;
  const checksums = [0, 2, 1][fill % 3]!;
  fill -= 4 * checksums;
  expect(fill).toBeGreaterThanOrEqual(0);
  const first = level19(checksums === 2 ? 1 : 0);
  const second = [0x28, 0xb5, 0x2f, 0xfd, checksums >= 1 ? 0x04 : 0x00, 0x88];
  for (let i = 0; i < fill / 3; i++) second.push(0x00, 0x00, 0x00);
  second.push(0x01, 0x00, 0x00);
  if (checksums >= 1) second.push(0x99, 0xe9, 0xd8, 0x51);
  const payload = Buffer.concat([first, Buffer.from(second)]);
  expect(payload.length).toBe(length);
  return { payload, trailing: second.length };
}

describe('a hostile zstd frame (checksum recomputed): named, and nothing else lost', () => {
  // Each rewrites the payload of one zstd data frame in place, at the same length.
  const hostile: [string, (payload: Buffer, rawLength: number) => string][] = [
    [
      'a payload that asks for a 128 MiB window',
      (payload, rawLength) => {
        // RFC 8878 frame header: not single-segment, a 2^27-byte window, a 4-byte content size equal to rawLength.
        Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x80, 0x88]).copy(payload, 0);
        payload.writeUInt32LE(rawLength, 6);
        return `zstd frame asks for a ${2 ** 27}-byte window, more than its ${rawLength} bytes need`;
      },
    ],
    ...(['second frame', 'skippable frame'] as const).map((after): [string, (payload: Buffer, rawLength: number) => string] => [
      `the frame's exact plaintext followed by a ${after}`,
      (payload, rawLength) => {
        const plaintext = zstdDecompressSync(payload);
        expect(plaintext.length).toBe(rawLength);
        const { payload: rewritten, trailing } = frameAndMore(plaintext, payload.length, after);
        // What it names is the bytes after the first frame; libzstd alone would decode the whole to the plaintext.
        expect(zstdDecompressSync(rewritten).equals(plaintext)).toBe(true);
        rewritten.copy(payload, 0);
        return `zstd payload holds ${trailing} bytes after its frame`;
      },
    ]),
  ];

  test.each(hostile)('%s: verify and restore name the frame; the other backup restores', async (name, rewrite) => {
    const repo = join(scratch.path, `repo-hostile-${hostile.findIndex(([n]) => n === name)}`);
    await ok(['init', repo, '--format', '1', '--compression', 'zstd']);
    const hurt = await backUp(repo, image);
    // The largest zstd data frame of that backup: a block of `image`, which `changed` does not hold.
    const frames = (await framesOf(repo)).filter((f) => f.kind === KIND_DATA && f.flags === FLAG_ZSTD).sort((a, b) => b.storedLength - a.storedLength);
    expect(frames.length).toBeGreaterThan(0);
    const target = frames[0]!;
    const bytes = await readFile(target.pack);
    const payload = bytes.subarray(target.offset + 48, target.offset + 48 + target.storedLength);
    const rawLength = bytes.readUInt32LE(target.offset + 8);
    const why = rewrite(payload, rawLength);
    const end = target.offset + 48 + target.storedLength;
    bytes.writeBigUInt64LE(checksum64(bytes.subarray(target.offset, end)), end);
    await writeFile(target.pack, bytes);
    const spared = await backUp(repo, changed);

    const verify = await runEngine(['verify', '--repo', repo, '--read-data', '--json'], { env: env() });
    expect(verify.code).toBe(4);
    const problems = parseJson<{ problems: { code: string; message: string; backup?: string; packOffset?: number }[] }>(verify.stdout).problems;
    expect(problems.filter((p) => p.code === 'FRAME_DAMAGED')).toEqual([expect.objectContaining({ packOffset: target.offset, message: expect.stringContaining(why) })]);
    expect(new Set(problems.filter((p) => p.code === 'CHUNK_DAMAGED').map((p) => p.backup))).toEqual(new Set([hurt]));
    const restore = await runEngine(['restore', '--repo', repo, hurt, '--to', join(scratch.path, 'hostile.img')], { env: env() });
    expect(restore.code).toBe(4);
    expect(restore.stderr).toContain(why);
    await restoresIdentical(repo, spared, changed);
  });
});
