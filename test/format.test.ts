/**
 * Byte-level tests of every encoder/decoder pair in repo-format: frames, blob sealing, pack headers and
 * pack scanning, index entries, the config file and backup records. Golden bytes pin the on-disk format;
 * each rejection a decoder owes a damaged input is exercised on its own.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createHash, randomBytes } from 'node:crypto';
import { compressSync } from 'lz4-napi';
import { chmod, mkdtemp, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { checksum64, initChecksum } from '../dist/repo-format/checksum.js';
import {
  CONFIG_FORMAT_NAME,
  FLAG_LZ4,
  FLAG_ZSTD,
  FORMAT_VERSION,
  FRAME_HEADER_SIZE,
  FRAME_OVERHEAD,
  INDEX_ENTRY_SIZE,
  KIND_DATA,
  KIND_MAP_LEAF,
  KIND_MAP_NODE,
  MAP_PAGE_ENTRIES,
  MAX_FRAME_RAW_LENGTH,
  PACK_HEADER_SIZE,
} from '../dist/repo-format/constants.js';
import {
  decodeFrame,
  decodeFrameHeader,
  encodeFrame,
  encodeFrameHeader,
  frameLength,
  type FrameHeader,
} from '../dist/repo-format/frame.js';
import { openBlob, sealBlob, sealBlobToBuffer, sha256 } from '../dist/repo-format/blob-codec.js';
import { LZ4 } from '../dist/repo-format/compression.js';
import { decodePackHeader, encodePackHeader, packPath, PackWriter, readFrameBytes, scanPack } from '../dist/repo-format/pack-file.js';
import { blobKey, decodeLocation, encodeLocation, type BlobLocation } from '../dist/repo-format/index-entry.js';
import { decodeConfig, encodeConfig, newConfig, validateBlockSize, type RepositoryConfig } from '../dist/repo-format/config.js';
import { decodeBackupRecord, encodeBackupRecord, mapRootOf, type BackupRecord } from '../dist/repo-format/backup-record.js';
import { Repository } from '../dist/repo-format/repository.js';
import { CorruptFrameError, CorruptMetadataError, InvalidArgumentError } from '../dist/repo-format/errors.js';

const KiB = 1024;
const MiB = 1024 * KiB;

let scratch: string;

beforeAll(async () => {
  await initChecksum();
  scratch = await mkdtemp(join(tmpdir(), 'engine-format-test-'));
});

afterAll(async () => {
  if (scratch) await rm(scratch, { recursive: true, force: true });
});

/** Narrows a `T | string` decoder result, failing the test with the decoder's reason. */
function ok<T>(value: T | string): T {
  if (typeof value === 'string') throw new Error(`expected success, decoder said: ${value}`);
  return value;
}

/** The reason string of a decoder that should have refused its input. */
function reason<T>(value: T | string): string {
  if (typeof value !== 'string') throw new Error(`expected a rejection, decoder accepted ${JSON.stringify(value)}`);
  return value;
}

/**
 * Independent xxh64 (seed 0) in BigInt, written from the xxHash specification, so the golden frame
 * checks the trailer against the algorithm rather than against the code under test.
 */
function referenceXxh64(input: Uint8Array): bigint {
  const M = (1n << 64n) - 1n;
  const P1 = 0x9e3779b185ebca87n;
  const P2 = 0xc2b2ae3d27d4eb4fn;
  const P3 = 0x165667b19e3779f9n;
  const P4 = 0x85ebca77c2b2ae63n;
  const P5 = 0x27d4eb2f165667c5n;
  const buf = Buffer.from(input.buffer, input.byteOffset, input.byteLength);
  const rotl = (x: bigint, r: bigint): bigint => ((x << r) | (x >> (64n - r))) & M;
  const round = (acc: bigint, lane: bigint): bigint => (rotl((acc + lane * P2) & M, 31n) * P1) & M;
  const merge = (acc: bigint, v: bigint): bigint => (((acc ^ round(0n, v)) * P1) + P4) & M;
  let at = 0;
  let h: bigint;
  if (buf.length >= 32) {
    let v1 = (P1 + P2) & M;
    let v2 = P2;
    let v3 = 0n;
    let v4 = (0n - P1) & M;
    for (; at + 32 <= buf.length; at += 32) {
      v1 = round(v1, buf.readBigUInt64LE(at));
      v2 = round(v2, buf.readBigUInt64LE(at + 8));
      v3 = round(v3, buf.readBigUInt64LE(at + 16));
      v4 = round(v4, buf.readBigUInt64LE(at + 24));
    }
    h = (rotl(v1, 1n) + rotl(v2, 7n) + rotl(v3, 12n) + rotl(v4, 18n)) & M;
    h = merge(h, v1);
    h = merge(h, v2);
    h = merge(h, v3);
    h = merge(h, v4);
  } else {
    h = P5;
  }
  h = (h + BigInt(buf.length)) & M;
  for (; at + 8 <= buf.length; at += 8) {
    h ^= round(0n, buf.readBigUInt64LE(at));
    h = (rotl(h, 27n) * P1 + P4) & M;
  }
  if (at + 4 <= buf.length) {
    h ^= (BigInt(buf.readUInt32LE(at)) * P1) & M;
    h = (rotl(h, 23n) * P2 + P3) & M;
    at += 4;
  }
  for (; at < buf.length; at += 1) {
    h ^= (BigInt(buf[at]!) * P5) & M;
    h = (rotl(h, 11n) * P1) & M;
  }
  h ^= h >> 33n;
  h = (h * P2) & M;
  h ^= h >> 29n;
  h = (h * P3) & M;
  h ^= h >> 32n;
  return h;
}

/** A valid 48-byte header buffer with the given fields (no payload, no checksum). */
function headerBytes(fields: Partial<FrameHeader>): Buffer {
  const header: FrameHeader = { kind: KIND_DATA, flags: 0, rawLength: 16, storedLength: 16, id: Buffer.alloc(32, 0xab), ...fields };
  const target = Buffer.alloc(FRAME_HEADER_SIZE);
  encodeFrameHeader(header, target);
  return target;
}

function buildFrame(kind: number, flags: number, rawLength: number, id: Buffer, payload: Buffer): Buffer {
  const target = Buffer.alloc(frameLength(payload.length));
  const written = encodeFrame({ kind, flags, rawLength, id }, payload, target);
  expect(written).toBe(target.length);
  return target;
}

function compressible(length: number): Buffer {
  const text = Buffer.from('the quick brown fox jumps over the lazy dog\n');
  return Buffer.alloc(length, text);
}

/** The whole golden "abc" frame: header || "abc" || xxh64(header || "abc") little-endian. */
const GOLDEN_ABC_FRAME =
  '4546524d010000000300000003000000' +
  'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad' +
  '616263' +
  '234e5d8837106e67';

describe('reference xxh64', () => {
  test('matches the published test vectors and the engine checksum', () => {
    expect(referenceXxh64(Buffer.alloc(0))).toBe(0xef46db3751d8e999n);
    expect(referenceXxh64(Buffer.from('abc'))).toBe(0x44bc2cf5ad770999n);
    for (const length of [0, 1, 3, 4, 7, 8, 31, 32, 33, 63, 64, 100, 1000]) {
      const data = randomBytes(length);
      expect(checksum64(data)).toBe(referenceXxh64(data));
    }
  });
});

describe('frame', () => {
  const payload = Buffer.from('abc');
  const id = sha256(payload);

  test('golden bytes of a small uncompressed data frame', () => {
    const frame = buildFrame(KIND_DATA, 0, 3, id, payload);
    expect(frame.length).toBe(48 + 3 + 8);
    expect(frame.length).toBe(FRAME_OVERHEAD + 3);
    const expectedHeader = Buffer.concat([
      Buffer.from('EFRM', 'latin1'), // magic
      Buffer.from([0x01]), // kind: data
      Buffer.from([0x00]), // flags
      Buffer.from([0x00, 0x00]), // reserved
      Buffer.from([0x03, 0x00, 0x00, 0x00]), // raw length, u32 LE
      Buffer.from([0x03, 0x00, 0x00, 0x00]), // stored length, u32 LE
      Buffer.from('ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad', 'hex'), // SHA-256("abc")
    ]);
    expect(expectedHeader.length).toBe(48);
    expect(frame.subarray(0, 48).toString('hex')).toBe(expectedHeader.toString('hex'));
    expect(frame.subarray(48, 51).toString('latin1')).toBe('abc');
    const trailer = frame.readBigUInt64LE(51);
    expect(trailer).toBe(referenceXxh64(frame.subarray(0, 51)));
    // Pinned: a change of checksum algorithm, seed or byte order must show up here.
    expect(frame.toString('hex')).toBe(GOLDEN_ABC_FRAME);
    expect(ok(decodeFrame(Buffer.from(GOLDEN_ABC_FRAME, 'hex'))).payload.toString('latin1')).toBe('abc');
  });

  test('header of a compressed map-node frame puts kind and flags at bytes 4 and 5', () => {
    const header = headerBytes({ kind: KIND_MAP_NODE, flags: FLAG_LZ4, rawLength: 0x00f10203, storedLength: 0x00010203 });
    expect(header.subarray(0, 16).toString('hex')).toBe('4546524d' + '03' + '01' + '0000' + '0302f100' + '03020100');
    const decoded = ok(decodeFrameHeader(header));
    expect(decoded).toEqual({ kind: KIND_MAP_NODE, flags: FLAG_LZ4, rawLength: 0x00f10203, storedLength: 0x00010203, id: Buffer.alloc(32, 0xab) });
  });

  test('round trip for every kind, compressed and not, at an offset inside a larger buffer', () => {
    for (const kind of [KIND_DATA, KIND_MAP_LEAF, KIND_MAP_NODE]) {
      for (const flags of [0, FLAG_LZ4]) {
        const body = randomBytes(100);
        const rawLength = flags === FLAG_LZ4 ? 250 : body.length;
        const blobId = randomBytes(32);
        const target = Buffer.alloc(7 + frameLength(body.length) + 5, 0xee);
        const written = encodeFrame({ kind, flags, rawLength, id: blobId }, body, target, 7);
        expect(written).toBe(frameLength(body.length));
        // Bytes around the frame are untouched.
        expect(target.subarray(0, 7).every((b) => b === 0xee)).toBe(true);
        expect(target.subarray(7 + written).every((b) => b === 0xee)).toBe(true);
        const header = ok(decodeFrameHeader(target, 7));
        expect(header).toEqual({ kind, flags, rawLength, storedLength: body.length, id: blobId });
        const decoded = ok(decodeFrame(target.subarray(7, 7 + written)));
        expect(decoded.header).toEqual(header);
        expect(Buffer.compare(decoded.payload, body)).toBe(0);
      }
    }
  });

  test('the decoded id is a copy, not a view of the source', () => {
    const frame = buildFrame(KIND_DATA, 0, 3, id, payload);
    const decoded = ok(decodeFrame(frame));
    frame.fill(0, 16, 48);
    expect(decoded.header.id.equals(id)).toBe(true);
  });

  test('a header cut short is refused', () => {
    expect(reason(decodeFrameHeader(headerBytes({}).subarray(0, 47)))).toBe('frame header is cut short');
    expect(reason(decodeFrameHeader(headerBytes({}), 1))).toBe('frame header is cut short');
  });

  test('bad magic is refused', () => {
    const header = headerBytes({});
    header[0] = 0x46;
    expect(reason(decodeFrameHeader(header))).toBe('bad frame magic');
    const other = headerBytes({});
    other.write('EPAC', 0, 'latin1');
    expect(reason(decodeFrameHeader(other))).toBe('bad frame magic');
  });

  test('unknown kinds are refused', () => {
    for (const kind of [0, 4, 0x7f, 0xff]) {
      expect(reason(decodeFrameHeader(headerBytes({ kind })))).toBe(`unknown frame kind ${kind}`);
    }
  });

  test('unknown flag bits are refused, alone or next to the lz4 or zstd bit', () => {
    for (const flags of [0x02, 0x08, 0x80, 0x03, 0x06, 0x0c, 0xff]) {
      expect(reason(decodeFrameHeader(headerBytes({ flags, rawLength: 32, storedLength: 16 })))).toBe(`unknown frame flags 0x${flags.toString(16)}`);
    }
  });

  test('a frame may say lz4 or zstd, never both', () => {
    expect(ok(decodeFrameHeader(headerBytes({ flags: FLAG_ZSTD, rawLength: 32, storedLength: 16 }))).flags).toBe(FLAG_ZSTD);
    expect(reason(decodeFrameHeader(headerBytes({ flags: FLAG_LZ4 | FLAG_ZSTD, rawLength: 32, storedLength: 16 })))).toBe('frame flags name two compressions (lz4 and zstd)');
  });

  test('non-zero reserved bytes are refused (either byte)', () => {
    for (const at of [6, 7]) {
      const header = headerBytes({});
      header[at] = 1;
      expect(reason(decodeFrameHeader(header))).toBe('reserved header bytes are not zero');
    }
  });

  test('raw length 0 and raw length above MAX_FRAME_RAW_LENGTH are refused; the maximum itself is accepted', () => {
    expect(reason(decodeFrameHeader(headerBytes({ rawLength: 0, storedLength: 0 })))).toBe('impossible raw length 0');
    const tooBig = MAX_FRAME_RAW_LENGTH + 1;
    expect(reason(decodeFrameHeader(headerBytes({ rawLength: tooBig, storedLength: tooBig })))).toBe(`impossible raw length ${tooBig}`);
    expect(reason(decodeFrameHeader(headerBytes({ rawLength: 0xffffffff, storedLength: 16, flags: FLAG_LZ4 })))).toBe('impossible raw length 4294967295');
    const max = ok(decodeFrameHeader(headerBytes({ rawLength: MAX_FRAME_RAW_LENGTH, storedLength: MAX_FRAME_RAW_LENGTH })));
    expect(max.rawLength).toBe(16 * MiB);
  });

  test('stored length larger than raw length, or zero, is refused', () => {
    expect(reason(decodeFrameHeader(headerBytes({ flags: FLAG_LZ4, rawLength: 10, storedLength: 11 })))).toBe(
      'impossible stored length 11 for raw length 10',
    );
    expect(reason(decodeFrameHeader(headerBytes({ flags: FLAG_LZ4, rawLength: 10, storedLength: 0 })))).toBe(
      'impossible stored length 0 for raw length 10',
    );
  });

  test('an uncompressed frame whose stored and raw lengths differ is refused', () => {
    expect(reason(decodeFrameHeader(headerBytes({ flags: 0, rawLength: 10, storedLength: 5 })))).toBe(
      'uncompressed frame whose stored and raw lengths differ',
    );
    // The same lengths are fine when the frame says it is compressed.
    expect(ok(decodeFrameHeader(headerBytes({ flags: FLAG_LZ4, rawLength: 10, storedLength: 5 }))).storedLength).toBe(5);
  });

  test('a frame whose buffer is longer or shorter than its header says is refused', () => {
    const frame = buildFrame(KIND_DATA, 0, 3, id, payload);
    expect(reason(decodeFrame(Buffer.concat([frame, Buffer.alloc(1)])))).toBe('frame is 60 bytes, its header says 59');
    expect(reason(decodeFrame(frame.subarray(0, frame.length - 1)))).toBe('frame is 58 bytes, its header says 59');
    expect(reason(decodeFrame(frame.subarray(0, 40)))).toBe('frame header is cut short');
  });

  test('flipping one payload byte is a checksum mismatch', () => {
    const frame = buildFrame(KIND_DATA, 0, 3, id, payload);
    frame[49]! ^= 0x01;
    expect(reason(decodeFrame(frame))).toBe('checksum mismatch');
  });

  test('flipping one header byte (inside the id) is a checksum mismatch', () => {
    const frame = buildFrame(KIND_DATA, 0, 3, id, payload);
    frame[30]! ^= 0x80;
    expect(reason(decodeFrame(frame))).toBe('checksum mismatch');
  });

  test('flipping one trailer byte is a checksum mismatch', () => {
    const frame = buildFrame(KIND_DATA, 0, 3, id, payload);
    frame[frame.length - 1]! ^= 0x01;
    expect(reason(decodeFrame(frame))).toBe('checksum mismatch');
  });
});

describe('blob codec', () => {
  test('compressible data round trips with the lz4 flag and a smaller payload', () => {
    const raw = compressible(64 * KiB);
    const id = sha256(raw);
    const frame = sealBlobToBuffer(KIND_DATA, id, raw, undefined, LZ4);
    const header = ok(decodeFrameHeader(frame));
    expect(header.flags).toBe(FLAG_LZ4);
    expect(header.rawLength).toBe(raw.length);
    expect(header.storedLength).toBeLessThan(raw.length);
    expect(frame.length).toBe(FRAME_OVERHEAD + header.storedLength);
    // The lz4-napi block starts with the uncompressed length.
    expect(frame.readUInt32LE(FRAME_HEADER_SIZE)).toBe(raw.length);
    const opened = ok(openBlob(frame, id));
    expect(Buffer.compare(opened.plaintext, raw)).toBe(0);
    expect(opened.header).toEqual(header);
  });

  test('incompressible data is stored as plaintext without the lz4 flag', () => {
    const raw = randomBytes(64 * KiB);
    const id = sha256(raw);
    const frame = sealBlobToBuffer(KIND_DATA, id, raw, undefined, LZ4);
    const header = ok(decodeFrameHeader(frame));
    expect(header.flags).toBe(0);
    expect(header.storedLength).toBe(raw.length);
    expect(frame.length).toBe(FRAME_OVERHEAD + raw.length);
    expect(Buffer.compare(frame.subarray(FRAME_HEADER_SIZE, FRAME_HEADER_SIZE + raw.length), raw)).toBe(0);
    const opened = ok(openBlob(frame, id));
    expect(Buffer.compare(opened.plaintext, raw)).toBe(0);
  });

  test('lz4 is used only when it saves space', () => {
    // One byte compresses to more than one byte (size prefix + token): stored plain.
    for (const raw of [Buffer.from([0x42]), Buffer.from('abcd'), randomBytes(300)]) {
      const frame = sealBlobToBuffer(KIND_MAP_LEAF, sha256(raw), raw, undefined, LZ4);
      const header = ok(decodeFrameHeader(frame));
      expect(header.flags).toBe(0);
      expect(header.storedLength).toBe(raw.length);
      expect(Buffer.compare(ok(openBlob(frame)).plaintext, raw)).toBe(0);
    }
    // A zero-filled map page compresses to a tiny fraction.
    const page = Buffer.alloc(32 * KiB);
    const frame = sealBlobToBuffer(KIND_MAP_LEAF, sha256(page), page, undefined, LZ4);
    const header = ok(decodeFrameHeader(frame));
    expect(header.flags).toBe(FLAG_LZ4);
    expect(header.storedLength).toBeLessThan(page.length / 10);
    expect(header.kind).toBe(KIND_MAP_LEAF);
  });

  test('sealBlob writes at an offset and returns the frame length', () => {
    const a = compressible(4096);
    const b = randomBytes(1000);
    const target = Buffer.alloc(2 * FRAME_OVERHEAD + a.length + b.length);
    const lengthA = sealBlob(KIND_DATA, sha256(a), a, target, 0, undefined, LZ4);
    const lengthB = sealBlob(KIND_MAP_NODE, sha256(b), b, target, lengthA, undefined, LZ4);
    expect(lengthB).toBe(FRAME_OVERHEAD + b.length);
    expect(Buffer.compare(ok(openBlob(target.subarray(0, lengthA))).plaintext, a)).toBe(0);
    const openedB = ok(openBlob(target.subarray(lengthA, lengthA + lengthB), sha256(b)));
    expect(openedB.header.kind).toBe(KIND_MAP_NODE);
    expect(Buffer.compare(openedB.plaintext, b)).toBe(0);
  });

  test('a frame holding another blob than the expected id is refused', () => {
    const raw = compressible(8192);
    const frame = sealBlobToBuffer(KIND_DATA, sha256(raw), raw, undefined, LZ4);
    expect(reason(openBlob(frame, sha256(Buffer.from('something else'))))).toBe('frame holds a different blob than the index says');
  });

  test('a corrupted lz4 size prefix is refused before decompressing', () => {
    const raw = compressible(8192);
    const id = sha256(raw);
    const good = sealBlobToBuffer(KIND_DATA, id, raw, undefined, LZ4);
    const header = ok(decodeFrameHeader(good));
    for (const wrongSize of [raw.length - 1, raw.length + 1, 0xffffffff]) {
      const payload = Buffer.from(good.subarray(FRAME_HEADER_SIZE, FRAME_HEADER_SIZE + header.storedLength));
      payload.writeUInt32LE(wrongSize, 0);
      // Re-encode so the checksum is valid: only the prefix check can catch it.
      const frame = buildFrame(KIND_DATA, FLAG_LZ4, raw.length, id, payload);
      expect(reason(openBlob(frame, id))).toBe('lz4 size prefix disagrees with the frame header');
    }
    // A compressed payload shorter than the prefix itself.
    const tiny = buildFrame(KIND_DATA, FLAG_LZ4, 100, id, Buffer.from([0x64, 0x00, 0x00]));
    expect(reason(openBlob(tiny, id))).toBe('lz4 size prefix disagrees with the frame header');
  });

  test('an lz4 body that does not decompress is refused', () => {
    const raw = compressible(8192);
    const id = sha256(raw);
    const payload = Buffer.alloc(40, 0xff);
    payload.writeUInt32LE(raw.length, 0);
    const frame = buildFrame(KIND_DATA, FLAG_LZ4, raw.length, id, payload);
    expect(reason(openBlob(frame, id))).toMatch(/^(lz4 payload does not decompress|decompressed to \d+ bytes, expected 8192)/);
  });

  test('an lz4 body that decodes to fewer or more bytes than its size prefix is refused, even when the id matches what it decodes to', () => {
    // A well-formed lz4 block of 8192 bytes behind a prefix (and rawLength) of 8200: lz4 itself stops at
    // the end of its input without complaint, and the id is the SHA-256 of the 8192 bytes it yields, so
    // only the length check (SPEC section 5) stands between this frame and a short block.
    const short = compressible(8192);
    const block = compressSync(short);
    block.writeUInt32LE(8200, 0);
    const frame = buildFrame(KIND_DATA, FLAG_LZ4, 8200, sha256(short), block);
    expect(reason(openBlob(frame, sha256(short)))).toBe('decompressed to 8192 bytes, expected 8200');
    // The same block behind a prefix of 8000: it would write past the allocation the prefix sized; refused.
    const long = compressSync(short);
    long.writeUInt32LE(8000, 0);
    const longFrame = buildFrame(KIND_DATA, FLAG_LZ4, 8000, sha256(short), long);
    expect(reason(openBlob(longFrame, sha256(short)))).toMatch(/^(lz4 payload does not decompress|decompressed to 8192 bytes, expected 8000)/);
  });

  test('plaintext whose SHA-256 is not the id is refused (compressed and plain)', () => {
    for (const raw of [compressible(8192), randomBytes(8192)]) {
      const wrongId = sha256(Buffer.concat([raw, Buffer.from([0])]));
      const frame = sealBlobToBuffer(KIND_DATA, wrongId, raw, undefined, LZ4);
      expect(reason(openBlob(frame))).toBe('SHA-256 of the plaintext does not match the blob id');
      expect(reason(openBlob(frame, wrongId))).toBe('SHA-256 of the plaintext does not match the blob id');
    }
  });

  test('frame-level damage is reported by openBlob too', () => {
    const raw = randomBytes(512);
    const frame = sealBlobToBuffer(KIND_DATA, sha256(raw), raw, undefined, LZ4);
    frame[FRAME_HEADER_SIZE + 10]! ^= 0x01;
    expect(reason(openBlob(frame))).toBe('checksum mismatch');
  });
});

describe('pack header', () => {
  const packId = '00112233445566778899aabbccddeeff';

  test('golden 32 bytes', () => {
    const header = encodePackHeader(packId);
    expect(header.length).toBe(PACK_HEADER_SIZE);
    expect(header.toString('hex')).toBe(
      '455041434b00010a' + // "EPACK" 00 01 0a
        '01000000' + // version 1, u32 LE
        '00000000' + // reserved
        '00112233445566778899aabbccddeeff', // pack id
    );
    expect(decodePackHeader(header, packId)).toBeUndefined();
  });

  test('round trip with random pack ids', () => {
    for (let i = 0; i < 20; i += 1) {
      const id = randomBytes(16).toString('hex');
      expect(decodePackHeader(encodePackHeader(id), id)).toBeUndefined();
    }
  });

  test('reserved bytes must be zero', () => {
    const bad = encodePackHeader(packId);
    bad[13] = 1;
    expect(decodePackHeader(bad, packId)).toBe('reserved pack header bytes are not zero');
  });

  test('rejections: cut short, bad magic, unsupported version, wrong pack id', () => {
    const good = encodePackHeader(packId);
    expect(decodePackHeader(good.subarray(0, 31), packId)).toBe('pack header is cut short');
    expect(decodePackHeader(Buffer.alloc(0), packId)).toBe('pack header is cut short');
    for (const at of [0, 4, 5, 7]) {
      const bad = Buffer.from(good);
      bad[at]! ^= 0x20;
      expect(decodePackHeader(bad, packId)).toBe('bad pack magic');
    }
    for (const version of [0, 2, 0x100]) {
      const bad = Buffer.from(good);
      bad.writeUInt32LE(version, 8);
      expect(decodePackHeader(bad, packId)).toBe(`unsupported pack version ${version}`);
    }
    const other = 'ffeeddccbbaa99887766554433221100';
    expect(decodePackHeader(good, other)).toBe(`header names pack ${packId}, file is named ${other}`);
    const flipped = Buffer.from(good);
    flipped[31]! ^= 0x01;
    expect(decodePackHeader(flipped, packId)).toBe(`header names pack 00112233445566778899aabbccddeefe, file is named ${packId}`);
  });
});

describe('pack writer and scanner in a repository', () => {
  let root: string;
  let repo: Repository;

  beforeAll(async () => {
    root = join(scratch, 'repo');
    await Repository.init(root, { blockSize: MiB });
    repo = await Repository.open(root, { access: 'exclusive', command: 'format-test' });
  });

  afterAll(async () => {
    await repo?.close();
  });

  interface Written {
    raw: Buffer;
    id: Buffer;
    frame: Buffer;
    kind: number;
  }

  function makeBlobs(): Written[] {
    const blobs: Written[] = [];
    const raws = [compressible(MiB), randomBytes(64 * KiB), Buffer.from('x'), compressible(3000), randomBytes(MAP_PAGE_ENTRIES * 32)];
    raws.forEach((raw, i) => {
      const id = sha256(raw);
      const kind = i === 4 ? KIND_MAP_LEAF : KIND_DATA;
      blobs.push({ raw, id, frame: sealBlobToBuffer(kind, id, raw, undefined, LZ4), kind });
    });
    return blobs;
  }

  test('PackWriter appends frames after the header; scanPack finds every one at its offset', async () => {
    const blobs = makeBlobs();
    const writer = new PackWriter(root);
    expect(writer.byteSize).toBe(PACK_HEADER_SIZE);
    expect(writer.isEmpty).toBe(true);
    let expectedOffset = PACK_HEADER_SIZE;
    for (const blob of blobs) {
      const header = ok(decodeFrameHeader(blob.frame));
      await writer.append(blob.frame, { kind: header.kind, flags: header.flags, rawLength: header.rawLength, id: header.id });
      const entry = writer.entries.at(-1);
      expect(entry).toEqual({
        id: blob.id,
        packId: writer.packId,
        offset: expectedOffset,
        length: blob.frame.length,
        rawLength: blob.raw.length,
        kind: blob.kind,
        flags: header.flags,
      });
      expectedOffset += blob.frame.length;
    }
    expect(writer.byteSize).toBe(expectedOffset);
    const entries = await writer.seal();
    expect(entries).toHaveLength(blobs.length);

    const bytes = await readFile(packPath(root, writer.packId));
    expect(bytes.length).toBe(expectedOffset);
    expect(bytes.subarray(0, PACK_HEADER_SIZE).equals(encodePackHeader(writer.packId))).toBe(true);

    const scan = await scanPack(root, writer.packId);
    expect(scan.damage).toBeUndefined();
    expect(scan.size).toBe(expectedOffset);
    expect(scan.frames.map((f) => ({ offset: f.offset, length: f.length }))).toEqual(entries.map((e) => ({ offset: e.offset, length: e.length })));
    scan.frames.forEach((frame, i) => {
      expect(frame.header.id.equals(blobs[i]!.id)).toBe(true);
      expect(frame.header.kind).toBe(blobs[i]!.kind);
      expect(frame.header.rawLength).toBe(blobs[i]!.raw.length);
    });
    for (const [i, entry] of entries.entries()) {
      const frame = await readFrameBytes(root, entry.packId, entry.offset, entry.length);
      expect(Buffer.compare(ok(openBlob(frame, entry.id)).plaintext, blobs[i]!.raw)).toBe(0);
    }
  });

  test('BlobWriter through the repository: sealed pack is indexed and every blob reads back', async () => {
    const before = new Set(await repo.listPackIds());
    const blobs = makeBlobs().map((b) => ({ ...b, raw: Buffer.concat([b.raw, Buffer.from('/writer')]) }));
    const writer = repo.createBlobWriter();
    for (const blob of blobs) {
      blob.id = sha256(blob.raw);
      blob.frame = sealBlobToBuffer(blob.kind, blob.id, blob.raw, undefined, LZ4);
      expect(await writer.known([blob.id])).toEqual([false]);
      writer.claim(blob.id);
      await writer.add(blob.frame, { kind: blob.kind, flags: blob.frame.readUInt8(5), rawLength: blob.raw.length, id: blob.id });
      expect(await writer.known([blob.id])).toEqual([true]);
    }
    await writer.flush();
    const newPacks = (await repo.listPackIds()).filter((id) => !before.has(id));
    expect(newPacks).toHaveLength(1);
    const scan = await scanPack(root, newPacks[0]!);
    expect(scan.damage).toBeUndefined();
    expect(scan.frames.map((f) => f.header.id.toString('hex'))).toEqual(blobs.map((b) => b.id.toString('hex')));
    const locations = await repo.lookup(blobs.map((b) => b.id));
    locations.forEach((location, i) => {
      expect(location).toEqual({
        packId: newPacks[0],
        offset: scan.frames[i]!.offset,
        length: scan.frames[i]!.length,
        rawLength: blobs[i]!.raw.length,
        kind: blobs[i]!.kind,
        flags: blobs[i]!.frame.readUInt8(5),
      });
    });
    for (const blob of blobs) expect(Buffer.compare(await repo.readBlob(blob.id, 'test blob'), blob.raw)).toBe(0);
    expect(await repo.listTempFiles()).toEqual([]);
  });

  async function sealedPack(count: number): Promise<{ packId: string; offsets: number[]; size: number }> {
    const writer = new PackWriter(root);
    const offsets: number[] = [];
    for (let i = 0; i < count; i += 1) {
      const raw = randomBytes(1000 + i);
      const id = sha256(raw);
      await writer.append(sealBlobToBuffer(KIND_DATA, id, raw, undefined, LZ4), { kind: KIND_DATA, flags: 0, rawLength: raw.length, id });
      offsets.push(writer.entries.at(-1)!.offset);
    }
    await writer.seal();
    const path = packPath(root, writer.packId);
    await chmod(path, 0o644); // packs are sealed read-only; the test damages one on purpose
    return { packId: writer.packId, offsets, size: writer.byteSize };
  }

  test('a pack cut inside a frame payload is damage at that frame; earlier frames are still listed', async () => {
    const { packId, offsets } = await sealedPack(3);
    const cut = offsets[2]! + FRAME_HEADER_SIZE + 100;
    await truncate(packPath(root, packId), cut);
    const scan = await scanPack(root, packId);
    expect(scan.size).toBe(cut);
    expect(scan.frames.map((f) => f.offset)).toEqual(offsets.slice(0, 2));
    expect(scan.damage?.offset).toBe(offsets[2]);
    expect(scan.damage?.why).toBe(`frame of ${FRAME_OVERHEAD + 1002} bytes runs past the end of the pack (${cut} bytes): truncated`);
  });

  test('a pack cut inside a frame header is damage at that frame', async () => {
    const { packId, offsets } = await sealedPack(3);
    await truncate(packPath(root, packId), offsets[1]! + 20);
    const scan = await scanPack(root, packId);
    expect(scan.frames.map((f) => f.offset)).toEqual([offsets[0]]);
    expect(scan.damage).toEqual({ offset: offsets[1], why: 'frame header is cut short' });
  });

  test('a pack cut one byte short of its end loses only its last frame (the trailer is cut)', async () => {
    const { packId, offsets, size } = await sealedPack(2);
    await truncate(packPath(root, packId), size - 1);
    const scan = await scanPack(root, packId);
    expect(scan.frames.map((f) => f.offset)).toEqual([offsets[0]]);
    expect(scan.damage?.offset).toBe(offsets[1]);
  });

  test('readFrameBytes on a truncated pack names the pack and offset', async () => {
    const { packId, offsets, size } = await sealedPack(2);
    await truncate(packPath(root, packId), size - 1);
    const length = size - offsets[1]!;
    const error = await readFrameBytes(root, packId, offsets[1]!, length).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(error).toBeInstanceOf(CorruptFrameError);
    expect((error as CorruptFrameError).details).toMatchObject({ packId, offset: offsets[1] });
  });

  test('garbage between frames and a damaged pack header are reported', async () => {
    const { packId, offsets } = await sealedPack(2);
    const path = packPath(root, packId);
    const bytes = await readFile(path);
    bytes.write('XXXX', offsets[1]!, 'latin1');
    await writeFile(path, bytes);
    const scan = await scanPack(root, packId);
    expect(scan.frames).toHaveLength(1);
    expect(scan.damage).toEqual({ offset: offsets[1], why: 'bad frame magic' });

    bytes[0] = 0;
    await writeFile(path, bytes);
    const headerScan = await scanPack(root, packId);
    expect(headerScan.frames).toEqual([]);
    expect(headerScan.damage).toEqual({ offset: 0, why: 'bad pack magic' });

    await truncate(path, 10);
    expect((await scanPack(root, packId)).damage).toEqual({ offset: 0, why: 'pack header is cut short' });
  });

  test('an empty pack (header only) has no frames and no damage', async () => {
    const { packId, size } = await sealedPack(0);
    expect(size).toBe(PACK_HEADER_SIZE);
    const scan = await scanPack(root, packId);
    expect(scan).toEqual({ packId, size: PACK_HEADER_SIZE, frames: [] });
  });
});

describe('index entry', () => {
  const base: BlobLocation = { packId: '0123456789abcdeffedcba9876543210', offset: 32, length: 1000, rawLength: 4096, kind: KIND_DATA, flags: FLAG_LZ4 };

  test('golden 30 bytes', () => {
    const value = encodeLocation(base);
    expect(value.length).toBe(INDEX_ENTRY_SIZE);
    expect(value.toString('hex')).toBe('0123456789abcdeffedcba9876543210' + '20000000' + 'e8030000' + '00100000' + '01' + '01');
  });

  test('round trip, including offsets and lengths near 2^32-1', () => {
    const cases: BlobLocation[] = [
      base,
      { ...base, offset: 0xffffffff, length: 0xffffffff, rawLength: 0xffffffff },
      { ...base, offset: 0xfffffffe, length: 56, rawLength: 16 * MiB, kind: KIND_MAP_NODE, flags: 0 },
      { ...base, offset: 0x80000000, kind: KIND_MAP_LEAF },
      { packId: 'ffffffffffffffffffffffffffffffff', offset: 0, length: 0, rawLength: 0, kind: 0, flags: 0 },
    ];
    for (const location of cases) expect(decodeLocation(encodeLocation(location))).toEqual(location);
  });

  test('decodes from a Uint8Array view into a larger buffer', () => {
    const location = { ...base, offset: 0xfffffff0 };
    const big = Buffer.alloc(100, 0x55);
    encodeLocation(location).copy(big, 37);
    const view = new Uint8Array(big.buffer, big.byteOffset + 37, INDEX_ENTRY_SIZE);
    expect(decodeLocation(view)).toEqual(location);
  });

  test('an offset that does not fit in u32 is refused by the encoder, not wrapped', () => {
    expect(() => encodeLocation({ ...base, offset: 2 ** 32 })).toThrow(RangeError);
  });

  test('a value of the wrong length decodes to undefined', () => {
    const value = encodeLocation(base);
    for (const length of [0, 1, 29, 31, 64]) {
      const bytes = length <= value.length ? value.subarray(0, length) : Buffer.concat([value, Buffer.alloc(length - value.length)]);
      expect(decodeLocation(bytes)).toBeUndefined();
    }
  });

  test('blob key is 0x01 followed by the 32-byte id', () => {
    const id = randomBytes(32);
    const key = blobKey(id);
    expect(key.length).toBe(33);
    expect(key[0]).toBe(0x01);
    expect(key.subarray(1).equals(id)).toBe(true);
  });
});

describe('config', () => {
  const id = '0123456789abcdef0123456789abcdef';
  const created = new Date('2024-05-06T07:08:09.010Z');

  function edited(edit: (c: Record<string, unknown>) => void): Buffer {
    const c = JSON.parse(encodeConfig(newConfig(id, MiB, created)).toString('utf8')) as Record<string, unknown>;
    edit(c);
    return Buffer.from(JSON.stringify(c));
  }

  test('round trip and exact content', () => {
    const config = newConfig(id, MiB, created);
    const bytes = encodeConfig(config);
    expect(bytes.toString('utf8').endsWith('}\n')).toBe(true);
    expect(JSON.parse(bytes.toString('utf8'))).toEqual({
      format: CONFIG_FORMAT_NAME,
      version: FORMAT_VERSION,
      id,
      created: '2024-05-06T07:08:09.010Z',
      blockSize: MiB,
      hash: 'sha256',
      checksum: 'xxh64',
      compression: 'lz4-block',
      mapPageEntries: 1024,
    });
    const decoded: RepositoryConfig = ok(decodeConfig(bytes));
    expect(decoded).toEqual(config);
  });

  test('something that is not JSON, or not an object, is refused', () => {
    expect(decodeConfig(Buffer.from('format = "vm-backup-engine repository"'))).toBe('config is not JSON');
    expect(decodeConfig(Buffer.alloc(0))).toBe('config is not JSON');
    expect(decodeConfig(Buffer.from([0xff, 0xfe, 0x00]))).toBe('config is not JSON');
    expect(decodeConfig(Buffer.from('null'))).toBe('config is not an object');
    expect(decodeConfig(Buffer.from('42'))).toBe('config is not an object');
  });

  test('a wrong or missing format name is refused', () => {
    expect(decodeConfig(edited((c) => (c.format = 'some other tool')))).toBe('config does not name this repository format');
    expect(decodeConfig(edited((c) => delete c.format))).toBe('config does not name this repository format');
    expect(decodeConfig(Buffer.from('[]'))).toBe('config does not name this repository format');
  });

  test('an invalid version is refused', () => {
    for (const version of [0, -1, 1.5, '1', null]) {
      expect(decodeConfig(edited((c) => (c.version = version)))).toBe('config has no valid version');
    }
  });

  test('a version newer than FORMAT_VERSION returns an object whose version is larger', () => {
    const decoded = ok(decodeConfig(edited((c) => {
      c.version = FORMAT_VERSION + 1;
      c.blockSize = 'whatever a future version stores';
      c.newField = true;
    })));
    expect(decoded.version).toBe(FORMAT_VERSION + 1);
    expect(decoded.version).toBeGreaterThan(FORMAT_VERSION);
  });

  test('objectLock (SPEC.md 20.5): version 3 only, a known mode, a retention from 1 s to 100 years', () => {
    const v3 = (change: (c: Record<string, unknown>) => void): Buffer => {
      const c = JSON.parse(encodeConfig(newConfig('0123456789abcdef0123456789abcdef', MiB, new Date(0), undefined, true)).toString('utf8')) as Record<string, unknown>;
      change(c);
      return Buffer.from(JSON.stringify(c));
    };
    const locked = ok(decodeConfig(v3((c) => (c.objectLock = { mode: 'compliance', retentionMs: 30 * 86_400_000 }))));
    expect(locked.objectLock).toEqual({ mode: 'compliance', retentionMs: 30 * 86_400_000 });
    expect(ok(decodeConfig(v3((c) => (c.objectLock = { mode: 'governance', retentionMs: 1000 })))).objectLock?.mode).toBe('governance');
    expect(decodeConfig(v3((c) => (c.objectLock = { mode: 'legal-hold', retentionMs: 1000 })))).toBe('config names an object lock mode this engine does not know');
    for (const retentionMs of [999, 1.5, '1000', 100 * 365 * 24 * 3600 * 1000 + 1]) {
      expect(decodeConfig(v3((c) => (c.objectLock = { mode: 'compliance', retentionMs })))).toBe('config has no valid object lock retention');
    }
    expect(decodeConfig(edited((c) => (c.objectLock = { mode: 'compliance', retentionMs: 1000 })))).toBe(`config of version ${FORMAT_VERSION} names an object lock`);
  });

  test('other field rejections', () => {
    expect(decodeConfig(edited((c) => (c.id = 'ABCDEF0123456789abcdef0123456789')))).toBe('config has no valid repository id');
    expect(decodeConfig(edited((c) => (c.id = 'abc')))).toBe('config has no valid repository id');
    expect(decodeConfig(edited((c) => (c.blockSize = '1M')))).toBe('config has no block size');
    expect(decodeConfig(edited((c) => (c.hash = 'blake3')))).toBe('config names a hash, checksum or compression this engine does not know');
    expect(decodeConfig(edited((c) => (c.compression = 'brotli')))).toBe('config names a hash, checksum or compression this engine does not know');
    expect(decodeConfig(edited((c) => (c.compression = 'zstd')))).toBe('config names zstd without a valid level (1-19)');
    for (const level of [0, 20, 2.5, '3']) {
      expect(decodeConfig(edited((c) => Object.assign(c, { compression: 'zstd', compressionLevel: level })))).toBe('config names zstd without a valid level (1-19)');
    }
    expect(decodeConfig(edited((c) => (c.compressionLevel = 3)))).toBe('config gives a compression level to lz4');
    const zstd = decodeConfig(edited((c) => Object.assign(c, { compression: 'zstd', compressionLevel: 19 })));
    expect(typeof zstd === 'string' ? zstd : [zstd.compression, zstd.compressionLevel]).toEqual(['zstd', 19]);
    expect(decodeConfig(edited((c) => (c.mapPageEntries = 2048)))).toBe('config names an unsupported map page size');
  });

  test('invalid block sizes: 0, 3 MiB, 32 KiB, 32 MiB and others', () => {
    for (const blockSize of [0, 3 * MiB, 32 * KiB, 32 * MiB, -64 * KiB, 64 * KiB + 1, 1.5 * MiB, Number.NaN, Number.POSITIVE_INFINITY]) {
      expect(() => validateBlockSize(blockSize)).toThrow(InvalidArgumentError);
      expect(() => newConfig(id, blockSize, created)).toThrow(InvalidArgumentError);
      if (Number.isFinite(blockSize)) {
        expect(decodeConfig(edited((c) => (c.blockSize = blockSize)))).toBe(`config block size ${blockSize} is invalid`);
      }
    }
  });

  test('valid block sizes: every power of two from 64 KiB to 16 MiB', () => {
    const valid: number[] = [];
    for (let size = 64 * KiB; size <= 16 * MiB; size *= 2) valid.push(size);
    expect(valid).toEqual([64 * KiB, 128 * KiB, 256 * KiB, 512 * KiB, MiB, 2 * MiB, 4 * MiB, 8 * MiB, 16 * MiB]);
    for (const blockSize of valid) {
      expect(() => validateBlockSize(blockSize)).not.toThrow();
      const config = newConfig(id, blockSize, created);
      expect(ok(decodeConfig(encodeConfig(config))).blockSize).toBe(blockSize);
    }
  });
});

describe('backup record', () => {
  const recordId = 'aaaaaaaaaaaaaaaabbbbbbbbbbbbbbbb';
  const root = createHash('sha256').update('root').digest('hex');

  function validRecord(): BackupRecord {
    return {
      version: 1,
      id: recordId,
      name: 'vm1',
      type: 'incremental',
      parent: 'ccccccccccccccccdddddddddddddddd',
      startTime: '2024-01-01T00:00:00.000Z',
      endTime: '2024-01-01T00:01:00.000Z',
      hostname: 'host-a',
      engineVersion: '0.1.0',
      blockSize: MiB,
      disks: [
        {
          name: 'sda',
          size: 10 * MiB + 1,
          source: { kind: 'file', path: '/images/sda.raw' },
          mode: 'full',
          modeReason: null,
          parent: null,
          cbt: null,
          map: { root, depth: 0, blocks: 11 },
          stats: { bytesRead: 10 * MiB + 1, bytesNew: 3 * MiB, bytesStored: 1234567, blocksTotal: 11, blocksZero: 2, blocksNew: 3, blocksDeduplicated: 6, blocksUnchanged: 0, durationMs: 1500 },
        },
        {
          name: 'sdb',
          size: 0,
          source: { kind: 'nbd', path: 'nbd+unix:///sdb' },
          mode: 'incremental',
          modeReason: null,
          parent: 'ab'.repeat(16),
          cbt: { checkpoint: 'engine-2', base: 'engine-1', chainFull: 'ab'.repeat(16), chainCheckpoint: 'engine-1', granularity: 65536, audited: 16 },
          map: { root: '0'.repeat(64), depth: 0, blocks: 0 },
          stats: { bytesRead: 0, bytesNew: 0, bytesStored: 0, blocksTotal: 0, blocksZero: 0, blocksNew: 0, blocksDeduplicated: 0, blocksUnchanged: 0, durationMs: 0 },
        },
      ],
      attachments: [{ name: 'ovf', mediaType: 'application/ovf+xml', data: '<ovf:Envelope/>' }],
    };
  }

  function decodeEdited(edit: (r: Record<string, unknown>) => void): CorruptMetadataError | BackupRecord {
    const r = JSON.parse(encodeBackupRecord(validRecord()).toString('utf8')) as Record<string, unknown>;
    edit(r);
    try {
      return decodeBackupRecord(Buffer.from(JSON.stringify(r)), 'backup record test');
    } catch (error) {
      if (error instanceof CorruptMetadataError) return error;
      throw error;
    }
  }

  function rejection(edit: (r: Record<string, unknown>) => void): string {
    const result = decodeEdited(edit);
    if (!(result instanceof CorruptMetadataError)) throw new Error('record was accepted');
    expect(result.code).toBe('ENGINE_CORRUPT_METADATA');
    expect(result.details.what).toBe('backup record test');
    return String(result.details.why);
  }

  function firstDisk(r: Record<string, unknown>): Record<string, unknown> {
    return (r.disks as Record<string, unknown>[])[0]!;
  }

  test('round trip', () => {
    const record = validRecord();
    const bytes = encodeBackupRecord(record);
    expect(bytes.toString('utf8').endsWith('}\n')).toBe(true);
    expect(decodeBackupRecord(bytes, 'x')).toEqual(record);
    const full: BackupRecord = { ...record, type: 'full', parent: null };
    expect(decodeBackupRecord(encodeBackupRecord(full), 'x')).toEqual(full);
    const root0 = mapRootOf(record.disks[0]!);
    expect(root0).toEqual({ root: Buffer.from(root, 'hex'), depth: 0, blocks: 11 });
  });

  test('consistency: optional (older records have none), and checked when present', () => {
    const record = validRecord();
    expect(decodeBackupRecord(encodeBackupRecord(record), 'x').consistency).toBeUndefined();
    const quiesced: BackupRecord = { ...record, consistency: { level: 'filesystem', method: 'qemu-guest-agent fsfreeze', freezeMs: 312, reason: null } };
    expect(decodeBackupRecord(encodeBackupRecord(quiesced), 'x')).toEqual(quiesced);
    const fellBack: BackupRecord = { ...record, consistency: { level: 'crash', method: 'qemu-guest-agent fsfreeze tried', freezeMs: null, reason: 'no agent' } };
    expect(decodeBackupRecord(encodeBackupRecord(fellBack), 'x')).toEqual(fellBack);
    expect(rejection((r) => (r.consistency = { level: 'perfect', method: 'm', freezeMs: null, reason: null }))).toBe('unknown consistency level perfect');
    expect(rejection((r) => (r.consistency = { level: 'crash', freezeMs: null, reason: null }))).toBe('consistency has no method');
    expect(rejection((r) => (r.consistency = { level: 'crash', method: 'm', freezeMs: -1, reason: null }))).toBe('consistency freezeMs is neither null nor a count');
    expect(rejection((r) => (r.consistency = { level: 'crash', method: 'm', freezeMs: null, reason: 3 }))).toBe('consistency reason is neither null nor text');
    expect(rejection((r) => (r.consistency = null))).toBe('consistency is not an object');
  });

  test('bad JSON', () => {
    expect(() => decodeBackupRecord(Buffer.from('{"version": 1,'), 'rec')).toThrow(CorruptMetadataError);
    expect(() => decodeBackupRecord(Buffer.from('{"version": 1,'), 'rec')).toThrow('rec is damaged: not valid JSON');
    expect(() => decodeBackupRecord(Buffer.from('"text"'), 'rec')).toThrow('rec is damaged: not an object');
  });

  test('wrong version', () => {
    expect(rejection((r) => (r.version = 2))).toBe('unknown record version 2');
    expect(rejection((r) => (r.version = '1'))).toBe('unknown record version 1');
    expect(rejection((r) => delete r.version)).toBe('unknown record version undefined');
  });

  test('bad id', () => {
    expect(rejection((r) => (r.id = 'AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBB'))).toBe('no valid id');
    expect(rejection((r) => (r.id = recordId.slice(1)))).toBe('no valid id');
    expect(rejection((r) => (r.id = `${recordId}0`))).toBe('no valid id');
    expect(rejection((r) => (r.id = 42))).toBe('no valid id');
  });

  test('bad type', () => {
    expect(rejection((r) => (r.type = 'snapshot'))).toBe('unknown type snapshot');
    expect(rejection((r) => (r.type = 'Full'))).toBe('unknown type Full');
  });

  test('other top-level rejections', () => {
    expect(rejection((r) => (r.name = 7))).toBe('no name');
    expect(rejection((r) => (r.parent = 5))).toBe('parent is neither null nor an id');
    expect(rejection((r) => delete r.hostname)).toBe('no hostname');
    expect(rejection((r) => (r.blockSize = 0))).toBe('no block size');
    expect(rejection((r) => (r.disks = {}))).toBe('no disk list');
  });

  test('map blocks that do not cover the disk size', () => {
    expect(rejection((r) => ((firstDisk(r).map as Record<string, unknown>).blocks = 10))).toBe('disk sda: 10 map blocks do not cover 10485761 bytes');
    expect(rejection((r) => ((firstDisk(r).map as Record<string, unknown>).blocks = 12))).toBe('disk sda: 12 map blocks do not cover 10485761 bytes');
    expect(rejection((r) => (firstDisk(r).size = 11 * MiB + 1))).toBe(`disk sda: 11 map blocks do not cover ${11 * MiB + 1} bytes`);
  });

  test('negative or non-integer statistics', () => {
    expect(rejection((r) => ((firstDisk(r) as unknown as Record<string, unknown>).mode = 'weekly'))).toBe('disk sda has no valid mode');
    expect(rejection((r) => (firstDisk(r).parent = 'ab'.repeat(16)))).toBe('disk sda: a full read with a parent');
    expect(rejection((r) => ((firstDisk(r) as unknown as Record<string, unknown>).cbt = { checkpoint: 1 }))).toBe('disk sda has invalid changed-block tracking state');
    expect(rejection((r) => ((firstDisk(r).stats as Record<string, unknown>).bytesNew = -1))).toBe('disk sda statistic bytesNew is not a count');
    expect(rejection((r) => ((firstDisk(r).stats as Record<string, unknown>).durationMs = 1.5))).toBe('disk sda statistic durationMs is not a count');
    expect(rejection((r) => delete (firstDisk(r).stats as Record<string, unknown>).blocksZero)).toBe('disk sda statistic blocksZero is not a count');
    expect(rejection((r) => delete firstDisk(r).stats)).toBe('disk sda has no statistics');
  });

  test('other disk rejections', () => {
    expect(rejection((r) => (r.disks = [null]))).toBe('a disk entry is not an object');
    expect(rejection((r) => (firstDisk(r).name = ''))).toBe('disk name "" is not allowed: it is empty');
    expect(rejection((r) => (firstDisk(r).name = 'a/b'))).toBe('disk name "a/b" is not allowed: it must not be "." or "..", nor contain "/" or "\\"');
    expect(rejection((r) => (firstDisk(r).name = 'a\nb'))).toBe('disk name "a\\x0ab" is not allowed: it contains a C0 control character');
    expect(rejection((r) => (firstDisk(r).name = 'é'.repeat(383)))).toMatch(/^disk name ".*…\(766 bytes\)" is not allowed: it has more than 765 bytes$/);
    expect(rejection((r) => (firstDisk(r).name = '..'))).toContain('disk name ".." is not allowed');
    expect(rejection((r) => (firstDisk(r).size = -1))).toBe('disk sda has no valid size');
    expect(rejection((r) => delete firstDisk(r).source)).toBe('disk sda has no source');
    expect(rejection((r) => ((firstDisk(r).map as Record<string, unknown>).root = root.toUpperCase()))).toBe('disk sda has no valid map root');
    expect(rejection((r) => ((firstDisk(r).map as Record<string, unknown>).root = root.slice(2)))).toBe('disk sda has no valid map root');
    expect(rejection((r) => ((firstDisk(r).map as Record<string, unknown>).depth = -1))).toBe('disk sda has no valid map shape');
  });
});
