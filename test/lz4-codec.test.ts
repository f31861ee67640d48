/**
 * The engine's lz4 codec, liblz4 through its own addon (native/lz4, repo-format/lz4-native.ts), against
 * lz4-napi, the codec every repository before it was written with (SPEC.md 5: the payload is the raw length
 * as u32 LE, then one lz4 block): each reads the other's payloads byte for byte, so old repositories and
 * golden fixtures read (test/fixtures.test.ts) and a repository written by either reads with the other
 * (ENGINE_LZ4=lz4-napi selects the fallback in a whole engine process). Hostile blocks (cut short, claiming
 * more than the frame's raw length, garbage) give a reason, and through the CLI ENGINE_CORRUPT_FRAME, never
 * a write past the caller's buffer.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createHash, randomBytes } from 'node:crypto';
import { open, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import fc from 'fast-check';
import { compressSync, uncompressSync } from 'lz4-napi';
import { initChecksum } from '../dist/repo-format/checksum.js';
import { FLAG_LZ4, FRAME_HEADER_SIZE, KIND_DATA } from '../dist/repo-format/constants.js';
import { encodeFrame, frameLength } from '../dist/repo-format/frame.js';
import { openBlob, sealBlobToBuffer, sha256 } from '../dist/repo-format/blob-codec.js';
import { compress, compressTransient, decompress, LZ4 } from '../dist/repo-format/compression.js';
import { LZ4_IMPLEMENTATION, nativeLz4, type NativeLz4 } from '../dist/repo-format/lz4-native.js';
import { scanPack } from '../dist/engine/index.js';
import { backUp, filesIdentical, initRepository, parseJson, runEngine, sparseFile, tempDir, writeRegion } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;

beforeAll(async () => {
  await initChecksum();
});

/** The addon, which scripts/setup.sh builds: a checkout where it is missing runs every lz4 call on the fallback. */
function native(): NativeLz4 {
  if (!nativeLz4) throw new Error('native/lz4 is not built: scripts/setup.sh builds it (apt liblz4-dev)');
  return nativeLz4;
}

function text(length: number, seed = 1): Buffer {
  const lines: string[] = [];
  let size = 0;
  for (let i = 0; size < length; i++) {
    const line = `${(i * seed) % 9973} /usr/lib/x86_64-linux-gnu/libfoo.so.${i % 7} the quick brown fox ${i * 31}\n`;
    lines.push(line);
    size += line.length;
  }
  return Buffer.from(lines.join('')).subarray(0, length);
}

/** Blobs of every shape the pipeline meets: text, random, mixed, runs, tiny, odd and multi-MiB lengths. */
function blobs(): Buffer[] {
  const mixed = randomBytes(MiB);
  text(256 * KiB).copy(mixed, 512 * KiB);
  return [text(MiB), text(MiB + 17, 3), text(4 * MiB, 5), randomBytes(64 * KiB), mixed, Buffer.alloc(MiB, 7), Buffer.from('a'), Buffer.from('abcabcabcabcabcabc'), text(13), text(4096), Buffer.alloc(0)];
}

/** The lz4 payload of a frame sealed by the engine's codec (compress: a buffer of the caller's own). */
/** Bytes that look random and are the same in every run: SHA-256 of the seed and a counter, end to end. */
function seededBytes(seed: string, length: number): Buffer {
  const out = Buffer.alloc(length);
  for (let at = 0, counter = 0; at < length; counter++) at += createHash('sha256').update(`${seed}:${counter}`).digest().copy(out, at);
  return out;
}

function enginePayload(raw: Buffer): Buffer {
  return compress(LZ4, raw);
}

function lz4Frame(rawLength: number, id: Buffer, payload: Buffer): Buffer {
  const frame = Buffer.alloc(frameLength(payload.length));
  encodeFrame({ kind: KIND_DATA, flags: FLAG_LZ4, rawLength, id }, payload, frame);
  return frame;
}

describe('liblz4 is the codec, and reads and writes what lz4-napi does', () => {
  test('the addon is built and is the codec of this process', () => {
    expect(LZ4_IMPLEMENTATION).toBe('liblz4');
    expect(native().compressBound(MiB)).toBe(MiB + Math.floor(MiB / 255) + 16);
  });

  test('payloads of liblz4 decode with lz4-napi, and lz4-napi\'s with the engine, to the same bytes', () => {
    for (const raw of blobs()) {
      const ours = enginePayload(raw);
      expect(ours.readUInt32LE(0)).toBe(raw.length);
      expect(uncompressSync(ours).equals(raw)).toBe(true);
      const theirs = compressSync(raw);
      const decoded = decompress(FLAG_LZ4, theirs, raw.length);
      if (typeof decoded === 'string') throw new Error(decoded);
      expect(decoded.equals(raw)).toBe(true);
      // Same layout, same compressor family: within a few bytes in 1000 of each other.
      expect(Math.abs(ours.length - theirs.length)).toBeLessThanOrEqual(16 + theirs.length / 100);
    }
  });

  test('frames sealed by the engine open, and frames of lz4-napi payloads open, with the same plaintext and id', () => {
    for (const raw of blobs().filter((b) => b.length > 0)) {
      const id = sha256(raw);
      const sealed = sealBlobToBuffer(KIND_DATA, id, raw, undefined, LZ4);
      const theirs = compressSync(raw);
      for (const frame of [sealed, ...(theirs.length < raw.length ? [lz4Frame(raw.length, id, theirs)] : [])]) {
        const opened = openBlob(frame, id);
        if (typeof opened === 'string') throw new Error(opened);
        expect(opened.plaintext.equals(raw)).toBe(true);
      }
      // A sealed lz4 frame's payload is exactly what compress gives; lz4-napi opens it.
      if (sealed.readUInt8(5) === FLAG_LZ4) {
        const payload = sealed.subarray(FRAME_HEADER_SIZE, sealed.length - 8);
        expect(payload.equals(enginePayload(raw))).toBe(true);
        expect(uncompressSync(payload).equals(raw)).toBe(true);
      }
    }
  });

  test('sealing compresses straight into the frame: compressed exactly when the payload is shorter than the block, the same bytes either way', () => {
    // Random bytes then a run of zeros: as the run grows by a byte the payload shrinks by about a byte, so the sweep
    // passes through payloads one byte shorter than the block, as long, and longer (the bound the frame gives liblz4).
    // Fixed bytes: with fresh random ones about 1 sweep in 200 steps from one byte longer to one byte shorter
    // and never meets "as long" (measured: 15 of 3,000), which this test must see.
    const random = seededBytes('lz4-sweep', 4 * KiB);
    const seen = new Set<number>();
    for (let zeros = 0; zeros <= 96; zeros++) {
      const raw = Buffer.concat([random.subarray(0, random.length - zeros), Buffer.alloc(zeros)]);
      const payload = enginePayload(raw);
      const sealed = sealBlobToBuffer(KIND_DATA, sha256(raw), raw, undefined, LZ4);
      seen.add(Math.sign(payload.length - raw.length));
      if (payload.length < raw.length) {
        expect(sealed.readUInt8(5)).toBe(FLAG_LZ4);
        expect(sealed.subarray(FRAME_HEADER_SIZE, sealed.length - 8).equals(payload)).toBe(true);
      } else {
        expect(sealed.readUInt8(5)).toBe(0);
        expect(sealed.subarray(FRAME_HEADER_SIZE, sealed.length - 8).equals(raw)).toBe(true);
      }
      const opened = openBlob(sealed, sha256(raw));
      if (typeof opened === 'string') throw new Error(opened);
      expect(opened.plaintext.equals(raw)).toBe(true);
    }
    expect([...seen].sort()).toEqual([-1, 0, 1]);
  });

  test('decompress decodes lz4 straight into the caller\'s buffer when it is large enough, else into one of its own', () => {
    const raw = text(MiB, 4);
    const payload = enginePayload(raw);
    const slot = Buffer.alloc(2 * MiB);
    const into = slot.subarray(4096);
    const decoded = decompress(FLAG_LZ4, payload, raw.length, into);
    if (typeof decoded === 'string') throw new Error(decoded);
    expect(decoded.buffer).toBe(slot.buffer);
    expect(decoded.byteOffset).toBe(into.byteOffset);
    expect(decoded.equals(raw)).toBe(true);
    const small = Buffer.alloc(raw.length - 1);
    const own = decompress(FLAG_LZ4, payload, raw.length, small);
    if (typeof own === 'string') throw new Error(own);
    expect(own.buffer).not.toBe(small.buffer);
    expect(own.equals(raw)).toBe(true);
  });

  test('compressTransient reuses one buffer; compress gives one of the caller\'s own', () => {
    const a = text(MiB, 2);
    const b = text(MiB, 9);
    const kept = compress(LZ4, a);
    const first = compressTransient(LZ4, a);
    const copy = Buffer.from(first);
    const second = compressTransient(LZ4, b);
    expect(second.buffer).toBe(first.buffer);
    expect(kept.equals(copy)).toBe(true);
    expect(kept.buffer).not.toBe(second.buffer);
    expect(uncompressSync(kept).equals(a)).toBe(true);
    expect(uncompressSync(second).equals(b)).toBe(true);
  });
});

describe('hostile lz4 payloads: a reason, never a write past the output', () => {
  const raw = text(64 * KiB, 7);
  const id = sha256(raw);
  const good = enginePayload(raw);

  function reasonFor(payload: Buffer, rawLength = raw.length): string {
    const opened = openBlob(lz4Frame(rawLength, id, payload), id);
    return typeof opened === 'string' ? opened : 'opened';
  }

  test('cut short at every length', () => {
    for (let cut = 4; cut < good.length; cut += cut < 64 ? 1 : 97) {
      expect(reasonFor(good.subarray(0, cut))).toMatch(/^(lz4 payload does not decompress|decompressed to \d+ bytes, expected 65536)/);
    }
  });

  test('a block that decodes to more than the frame says (a bomb), its prefix and the frame header agreeing', () => {
    // 64 MiB of zeros in some 260 KB, in a frame (and prefix) of 1 MiB.
    const bomb = enginePayload(Buffer.alloc(64 * MiB));
    expect(bomb.length).toBeLessThan(MiB);
    bomb.writeUInt32LE(MiB, 0);
    expect(reasonFor(bomb, MiB)).toBe(`lz4 payload does not decompress (liblz4: a malformed block, or one of more than the frame's ${MiB} bytes)`);
    // The same block one byte short of its length: still refused.
    const longer = enginePayload(text(raw.length + 1, 7));
    longer.writeUInt32LE(raw.length, 0);
    expect(reasonFor(longer)).toMatch(/^lz4 payload does not decompress/);
  });

  test('a block that decodes to less than the frame says', () => {
    const shorter = enginePayload(raw.subarray(0, raw.length - 1));
    shorter.writeUInt32LE(raw.length, 0);
    expect(reasonFor(shorter)).toBe(`decompressed to ${raw.length - 1} bytes, expected ${raw.length}`);
  });

  test('garbage, and a match that reaches back before the output\'s start', () => {
    for (let seed = 0; seed < 200; seed++) {
      const garbage = Buffer.concat([Buffer.alloc(4), randomBytes(1 + (seed % 50) * 37)]);
      garbage.writeUInt32LE(raw.length, 0);
      expect(reasonFor(garbage)).not.toBe('opened');
    }
    // One literal 'x', then a match at offset 2 (one byte before the output's start), 4 bytes long.
    const backward = Buffer.from([0, 0, 0, 0, 0x10, 0x78, 0x02, 0x00, 0x00]);
    backward.writeUInt32LE(raw.length, 0);
    expect(reasonFor(backward)).toMatch(/^lz4 payload does not decompress/);
  });

  test('the addon never writes past its target, whatever the block (property)', () => {
    const lz4 = native();
    const guard = 64;
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 0, maxLength: 600 }), fc.integer({ min: 0, max: 2048 }), fc.boolean(), (bytes, size, fromReal) => {
        // Half the cases start from a real block, corrupted: they get further into the decoder than noise does.
        const source = fromReal ? Buffer.from(good.subarray(4, 4 + Math.max(1, bytes.length))) : Buffer.from(bytes);
        if (fromReal) for (let i = 0; i < bytes.length; i += 5) source[i % source.length] ^= bytes[i]!;
        const output = Buffer.alloc(size + guard, 0xa5);
        const written = lz4.decompress(source, output.subarray(0, size));
        expect(written).toBeLessThanOrEqual(size);
        expect(written).toBeGreaterThanOrEqual(-1);
        expect(output.subarray(size).every((b) => b === 0xa5)).toBe(true);
      }),
      { numRuns: 3000, seed: 15 },
    );
  });

  test('compress into a target too small for the block: 0, and nothing written past it', () => {
    const lz4 = native();
    const target = Buffer.alloc(1000 + 64, 0xa5);
    expect(lz4.compress(randomBytes(4 * KiB), target.subarray(0, 1000))).toBe(0);
    expect(target.subarray(1000).every((b) => b === 0xa5)).toBe(true);
  });

  test('arguments other than byte arrays are refused', () => {
    const lz4 = native();
    const bad = [undefined, 'text', 12, {}, [1, 2, 3], new Uint16Array(4), new ArrayBuffer(8)] as unknown as Uint8Array[];
    for (const value of bad) {
      expect(() => lz4.compress(value, Buffer.alloc(16))).toThrow(TypeError);
      expect(() => lz4.decompress(Buffer.alloc(16), value)).toThrow(TypeError);
    }
    for (const length of [-1, 1.5, Number.NaN, 2 ** 31]) expect(() => lz4.compressBound(length)).toThrow(RangeError);
  });
});

describe('through the CLI: repositories written with either codec read with the other', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  beforeAll(async () => {
    ({ path: dir, cleanup } = await tempDir('engine-lz4-'));
  });
  afterAll(async () => {
    await cleanup();
  });

  const FALLBACK = { ENGINE_LZ4: 'lz4-napi' };

  async function disk(name: string): Promise<string> {
    const path = join(dir, name);
    await sparseFile(path, 24 * MiB);
    await writeRegion(path, 0, 8 * MiB, 'text', name);
    await writeRegion(path, 8 * MiB, 4 * MiB, 'random', name);
    await writeRegion(path, 16 * MiB, 5 * MiB + 333, 'repeat', name);
    return path;
  }

  test.each([
    ['liblz4 writes, lz4-napi reads', {}, FALLBACK],
    ['lz4-napi writes, liblz4 reads', FALLBACK, {}],
  ] as const)('%s: restore and verify --read-data', async (name, writer, reader) => {
    const repo = join(dir, `repo-${Object.keys(writer).length}`);
    await initRepository(repo, ['--compression', 'lz4']);
    const image = await disk(`disk-${Object.keys(writer).length}.img`);
    const backup = await backUp(repo, ['--source', image], { env: writer });
    expect(backup.disks[0]!.bytesStored).toBeLessThan(16 * MiB);
    const verify = await runEngine(['verify', '--repo', repo, '--read-data', '--json'], { env: reader });
    expect(verify.code, verify.stderr).toBe(0);
    const into = join(dir, `${name.split(' ')[0]}.restored`);
    const restore = await runEngine(['restore', '--repo', repo, backup.id, '--to', into], { env: reader });
    expect(restore.code, restore.stderr).toBe(0);
    expect(await filesIdentical(image, into)).toBe(true);
  });

  test('a data frame whose lz4 block is garbage (checksum made right) is ENGINE_CORRUPT_FRAME on restore and FRAME_DAMAGED on verify', async () => {
    const repo = join(dir, 'repo-garbage');
    await initRepository(repo, ['--compression', 'lz4']);
    const image = await disk('garbage.img');
    const backup = await backUp(repo, ['--source', image]);
    let damaged = false;
    for (const sub of (await readdir(join(repo, 'packs'))).sort()) {
      for (const pack of (await readdir(join(repo, 'packs', sub))).sort()) {
        const frame = (await scanPack(repo, pack)).frames.find((f) => f.header.kind === KIND_DATA && f.header.flags === FLAG_LZ4);
        if (!frame || damaged) continue;
        // Same lengths, prefix kept, block replaced by noise, checksum recomputed: only the decoder can object.
        const payload = randomBytes(frame.header.storedLength);
        payload.writeUInt32LE(frame.header.rawLength, 0);
        const rewritten = lz4Frame(frame.header.rawLength, frame.header.id, payload);
        const handle = await open(join(repo, 'packs', sub, pack), 'r+');
        await handle.write(rewritten, 0, rewritten.length, frame.offset);
        await handle.close();
        damaged = true;
      }
    }
    expect(damaged).toBe(true);
    const restore = await runEngine(['restore', '--repo', repo, backup.id, '--to', join(dir, 'garbage.restored'), '--json']);
    expect(restore.code).toBe(4);
    const error = parseJson<{ error: { code: string; message: string } }>(restore.stdout).error;
    expect(error.code).toBe('ENGINE_CORRUPT_FRAME');
    expect(error.message).toMatch(/lz4 payload does not decompress|decompressed to \d+ bytes/);
    const verify = await runEngine(['verify', '--repo', repo, '--read-data', '--json']);
    expect(verify.code).toBe(4);
    const problems = parseJson<{ problems: { code: string; message: string }[] }>(verify.stdout).problems;
    expect(problems.filter((p) => p.code === 'FRAME_DAMAGED')).toHaveLength(1);
  });
});
