/**
 * The repository's compressions (SPEC.md 3, 5): each codec's frames round-trip; the probe stores
 * incompressible blocks raw; hostile zstd payloads (more than the frame's raw length, cut short, garbage, a
 * header that asks for a large window or a dictionary) are refused with a reason before anything large is
 * allocated; `init --compression` parses what the CLI reference says.
 */
import { beforeAll, describe, expect, test } from 'vitest';
import { randomBytes } from 'node:crypto';
import { constants as zlibConstants, zstdCompressSync } from 'node:zlib';
import { initChecksum } from '../dist/repo-format/checksum.js';
import { FLAG_ENCRYPTED, FLAG_LZ4, FLAG_ZSTD, FRAME_HEADER_SIZE, KIND_DATA, KIND_MAP_LEAF } from '../dist/repo-format/constants.js';
import { encodeFrame, frameLength } from '../dist/repo-format/frame.js';
import { blobId, maxFrameLength, openBlob, openBlobWith, sealBlobToBuffer, sealBlobWith, sha256 } from '../dist/repo-format/blob-codec.js';
import { compress, compressionName, decompress, DEFAULT_COMPRESSION, LZ4, parseCompression, worthCompressing, worthCompressingZstd, ZstdStreams, type Compression } from '../dist/repo-format/compression.js';
import { newRepositoryKeys } from '../dist/repo-format/crypto.js';
import { InvalidArgumentError } from '../dist/repo-format/errors.js';
import { LZ4_IMPLEMENTATION } from '../dist/repo-format/lz4-native.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CODECS: Compression[] = [LZ4, { codec: 'zstd', level: 1 }, { codec: 'zstd', level: 3 }, { codec: 'zstd', level: 19 }];

beforeAll(async () => {
  await initChecksum();
});

function text(length: number): Buffer {
  return Buffer.alloc(length, 'line 0001: the quick brown fox jumps over the lazy dog\n');
}

function zstdFrame(raw: Buffer, params: Record<number, number> = {}): Buffer {
  return zstdCompressSync(raw, { params: { [zlibConstants.ZSTD_c_compressionLevel]: 3, ...params } });
}

/** A whole frame (checksum right) whose payload is `payload` as flags say, for `rawLength` bytes of plaintext `id`. */
function frameOf(flags: number, rawLength: number, id: Buffer, payload: Buffer): Buffer {
  const target = Buffer.alloc(frameLength(payload.length));
  encodeFrame({ kind: KIND_DATA, flags, rawLength, id }, payload, target);
  return target;
}

describe('codecs round-trip', () => {
  test.each(CODECS.map((c) => [compressionName(c), c] as const))('%s: text, random, short and page-sized blobs', (_name, codec) => {
    const flag = codec.codec === 'lz4' ? FLAG_LZ4 : FLAG_ZSTD;
    const blobs: [Buffer, number][] = [
      [text(MiB), flag],
      [text(MiB + 17), flag],
      [text(32 * KiB), flag],
      [Buffer.from('abc'), 0],
      [randomBytes(MiB), 0],
      [randomBytes(64 * KiB), 0],
    ];
    for (const [raw, expectedFlags] of blobs) {
      const id = sha256(raw);
      const frame = sealBlobToBuffer(KIND_DATA, id, raw, undefined, codec);
      expect(frame.readUInt8(5)).toBe(expectedFlags);
      const opened = openBlob(frame, id);
      if (typeof opened === 'string') throw new Error(opened);
      expect(opened.plaintext.equals(raw)).toBe(true);
    }
  });

  test('encrypted frames carry the codec flag beside the encryption flag, and open', () => {
    const keys = newRepositoryKeys();
    for (const codec of CODECS) {
      const raw = text(MiB);
      const id = blobId(raw, keys);
      const frame = sealBlobToBuffer(KIND_MAP_LEAF, id, raw, keys, codec);
      expect(frame.readUInt8(5)).toBe((codec.codec === 'lz4' ? FLAG_LZ4 : FLAG_ZSTD) | FLAG_ENCRYPTED);
      const opened = openBlob(frame, id, keys);
      if (typeof opened === 'string') throw new Error(opened);
      expect(opened.plaintext.equals(raw)).toBe(true);
    }
  });

  test('a reader opens lz4, zstd and raw frames whatever compression its repository writes', () => {
    const raw = text(256 * KiB);
    const id = sha256(raw);
    for (const frame of [sealBlobToBuffer(KIND_DATA, id, raw, undefined, LZ4), sealBlobToBuffer(KIND_DATA, id, raw, undefined, DEFAULT_COMPRESSION), frameOf(0, raw.length, id, raw)]) {
      const opened = openBlob(frame, id);
      expect(typeof opened === 'string' ? opened : opened.plaintext.equals(raw)).toBe(true);
    }
  });
});

describe('the probe: blocks that do not compress are stored raw, without compressing them whole', () => {
  test('random blocks are skipped by every codec; a block with a compressible quarter is compressed', () => {
    for (const codec of CODECS) {
      // liblz4 is not probed (it gives up on random data by itself, faster than a probe pays): the block is still stored raw.
      const probed = !(codec.codec === 'lz4' && LZ4_IMPLEMENTATION === 'liblz4');
      const random = randomBytes(MiB);
      expect(worthCompressing(codec, random)).toBe(!probed);
      expect(sealBlobToBuffer(KIND_DATA, sha256(random), random, undefined, codec).readUInt8(5)).toBe(0);
      expect(worthCompressing(codec, text(MiB))).toBe(true);
      const mixed = randomBytes(MiB);
      text(256 * KiB).copy(mixed, 3 * 256 * KiB);
      expect(worthCompressing(codec, mixed)).toBe(true);
      const frame = sealBlobToBuffer(KIND_DATA, sha256(mixed), mixed, undefined, codec);
      expect(frame.readUInt8(5)).not.toBe(0);
      expect(frame.length).toBeLessThan(mixed.length);
    }
  });

  test('a blob under 512 KiB is compressed without a probe: it pays off whenever the codec does', () => {
    const halfRandom = Buffer.concat([randomBytes(32 * KiB), Buffer.alloc(32 * KiB, 7)]);
    expect(worthCompressing(DEFAULT_COMPRESSION, halfRandom)).toBe(true);
    expect(sealBlobToBuffer(KIND_DATA, sha256(halfRandom), halfRandom, undefined, DEFAULT_COMPRESSION).readUInt8(5)).toBe(FLAG_ZSTD);
  });
});

describe('hostile zstd payloads: a reason, never a large allocation', () => {
  const raw = text(MiB);
  const id = sha256(raw);

  function reasonFor(payload: Buffer, rawLength = raw.length, frameId = id): string {
    const opened = openBlob(frameOf(FLAG_ZSTD, rawLength, frameId, payload));
    return typeof opened === 'string' ? opened : 'opened';
  }

  test('a payload of more than the frame header says (a bomb)', () => {
    // 16 MiB of zeros in a few hundred bytes, in a frame that says 4 KiB.
    const bomb = zstdFrame(Buffer.alloc(16 * MiB));
    expect(bomb.length).toBeLessThan(4 * KiB);
    expect(reasonFor(bomb, 4 * KiB, sha256(Buffer.alloc(4 * KiB)))).toBe(`zstd frame states ${16 * MiB} bytes of content, the frame header ${4 * KiB}`);
  });

  test('a bomb whose zstd header lies about its size stops at the frame\'s raw length', () => {
    // A frame that decodes 2000 bytes, its content size edited down to 1000 (2-byte field: value - 256).
    const honest = zstdFrame(text(2000));
    const descriptor = honest.readUInt8(4);
    expect(descriptor >> 6).toBe(1);
    const lying = Buffer.from(honest);
    const at = 4 + 1 + ((descriptor & 0x20) === 0 ? 1 : 0);
    lying.writeUInt16LE(1000 - 256, at);
    const why = decompress(FLAG_ZSTD, lying, 1000);
    expect(why).toMatch(/^zstd payload (decompresses to more than the frame's 1000 bytes|does not decompress \(.+\))$/);
  });

  test('cut short, garbage, empty of a frame', () => {
    const good = zstdFrame(raw);
    expect(reasonFor(good.subarray(0, good.length - 5))).toBe('zstd frame is cut short');
    expect(reasonFor(good.subarray(0, 5))).toBe('zstd payload does not start with a zstd frame');
    expect(reasonFor(randomBytes(500))).toBe('zstd payload does not start with a zstd frame');
    const scrambled = Buffer.from(good);
    for (let i = 20; i < scrambled.length; i += 7) scrambled[i] ^= 0x5a;
    expect(reasonFor(scrambled)).toMatch(/^(zstd frame (is cut short|has a block of the reserved type|has a \d+-byte block, more than its \d+-byte limit)|zstd payload holds \d+ bytes after its frame|zstd payload does not decompress \(.+\)|decompressed to \d+ bytes, expected \d+|SHA-256 of the plaintext does not match the blob id)$/);
  });

  test('a zstd payload shorter than its frame header says', () => {
    const short = zstdFrame(text(1000));
    expect(reasonFor(short, 2000, sha256(text(2000)))).toBe('zstd frame states 1000 bytes of content, the frame header 2000');
  });

  test('a header that asks for a large window, names a dictionary, sets the reserved bit, or states no size', () => {
    // Not single-segment (0x80: 4-byte content size), window descriptor 0x88 = 2^27 bytes.
    const big = Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x80, 0x88, 0x00, 0x00, 0x10, 0x00, 0, 0, 0]);
    expect(reasonFor(big)).toBe(`zstd frame asks for a ${2 ** 27}-byte window, more than its ${MiB} bytes need`);
    const dictionary = Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0xa1, 0x01, 0x00, 0x00, 0x10, 0x00, 0, 0, 0]);
    expect(reasonFor(dictionary)).toBe('zstd frame names a dictionary');
    const reserved = Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0xa8, 0x00, 0x00, 0x10, 0x00, 0, 0, 0]);
    expect(reasonFor(reserved)).toBe('zstd frame header has its reserved bit set');
    const unsized = zstdFrame(raw, { [zlibConstants.ZSTD_c_contentSizeFlag]: 0 });
    expect(reasonFor(unsized)).toBe('zstd frame does not state its content size');
  });

  test('one frame and nothing after it: a second frame or a skippable frame that libzstd would decode too', () => {
    const good = zstdFrame(raw);
    expect(reasonFor(good)).toBe('opened');
    // An empty second frame, not single-segment, no content size, a 2^27-byte window: one last raw block of 0 bytes.
    const second = Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x88, 0x01, 0x00, 0x00]);
    expect(reasonFor(Buffer.concat([good, second]))).toBe(`zstd payload holds ${second.length} bytes after its frame`);
    // A skippable frame (RFC 8878, 3.1.2): magic 0x184D2A50, a 4-byte length, that many bytes.
    const skippable = Buffer.alloc(8 + 20);
    skippable.writeUInt32LE(0x184d2a50, 0);
    skippable.writeUInt32LE(20, 4);
    expect(reasonFor(Buffer.concat([good, skippable]))).toBe(`zstd payload holds ${skippable.length} bytes after its frame`);
    // A frame with a content checksum ends after it: still exactly one frame, it opens.
    expect(reasonFor(zstdFrame(raw, { [zlibConstants.ZSTD_c_checksumFlag]: 1 }))).toBe('opened');
  });

  test('a block larger than 128 KiB, or than the window, or of the reserved type', () => {
    // Single-segment (window = content size = 16), 1-byte content size; one last raw block. Bare payloads
    // (decompress): a frame's storedLength may not exceed its rawLength, and these are longer than 16 bytes.
    const small = Buffer.from('sixteen bytes..!');
    const header = [0x28, 0xb5, 0x2f, 0xfd, 0x20, 16];
    const block = (size: number, type: number, last: boolean): number[] => {
      const value = size * 8 + type * 2 + (last ? 1 : 0);
      return [value % 256, Math.floor(value / 256) % 256, Math.floor(value / 65536)];
    };
    const ok = Buffer.concat([Buffer.from([...header, ...block(16, 0, true)]), small]);
    expect(decompress(FLAG_ZSTD, ok, 16)).toEqual(small);
    const overWindow = Buffer.concat([Buffer.from([...header, ...block(17, 0, true)]), small, Buffer.from('x')]);
    expect(decompress(FLAG_ZSTD, overWindow, 16)).toBe('zstd frame has a 17-byte block, more than its 16-byte limit');
    const reserved = Buffer.concat([Buffer.from([...header, ...block(16, 3, true)]), small]);
    expect(decompress(FLAG_ZSTD, reserved, 16)).toBe('zstd frame has a block of the reserved type');
    // 1 MiB of content, window 1 MiB: an RLE block may say at most 128 KiB.
    const bigRle = Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x80, 0x50, 0x00, 0x00, 0x10, 0x00, ...block(128 * KiB + 1, 1, true), 0x41]);
    expect(reasonFor(bigRle)).toBe(`zstd frame has a ${128 * KiB + 1}-byte block, more than its ${128 * KiB}-byte limit`);
  });

  test('the checks come before the id: a payload that decodes to the right bytes under a bad header is still refused', () => {
    const unsized = zstdFrame(raw, { [zlibConstants.ZSTD_c_contentSizeFlag]: 0 });
    const frame = frameOf(FLAG_ZSTD, raw.length, id, unsized);
    expect(frame.readUInt8(5)).toBe(FLAG_ZSTD);
    expect(openBlob(frame, id)).toBe('zstd frame does not state its content size');
    expect(FRAME_HEADER_SIZE).toBe(48);
  });
});

describe('init --compression', () => {
  test('lz4, zstd, zstd:LEVEL', () => {
    expect(parseCompression('lz4')).toEqual({ codec: 'lz4' });
    expect(parseCompression('zstd')).toEqual({ codec: 'zstd', level: 1 });
    expect(parseCompression('zstd:1')).toEqual({ codec: 'zstd', level: 1 });
    expect(parseCompression('zstd:19')).toEqual({ codec: 'zstd', level: 19 });
    expect(compressionName(parseCompression('zstd:7'))).toBe('zstd:7');
  });

  test('anything else is a usage error that says what is allowed', () => {
    for (const bad of ['zstd:0', 'zstd:20', 'zstd:-1', 'gzip', 'LZ4', 'zstd:', 'zstd:3:1', '']) {
      expect(() => parseCompression(bad)).toThrow(InvalidArgumentError);
    }
    expect(() => parseCompression('zstd:22')).toThrow('zstd level 22 is not allowed: 1 to 19');
    expect(() => parseCompression('gzip')).toThrow("compression 'gzip' is not known: lz4, zstd or zstd:LEVEL (1-19)");
  });

  test('the compressed buffer of each codec is what the frame stores', () => {
    const raw = text(MiB);
    for (const codec of CODECS) {
      const frame = sealBlobToBuffer(KIND_DATA, sha256(raw), raw, undefined, codec);
      expect(frame.subarray(FRAME_HEADER_SIZE, frame.length - 8).equals(compress(codec, raw))).toBe(true);
    }
  });
});

describe("a thread's kept zstd contexts (ZstdStreams, the block workers' path)", () => {
  async function sealWith(streams: ZstdStreams, raw: Buffer, codec: Compression, keys?: ReturnType<typeof newRepositoryKeys>): Promise<Buffer> {
    const target = Buffer.alloc(maxFrameLength(raw.length, keys));
    const length = await sealBlobWith(streams, KIND_DATA, blobId(raw, keys), raw, target, 0, keys, codec);
    return target.subarray(0, length);
  }

  function mixed(): Buffer {
    const block = randomBytes(MiB);
    text(256 * KiB).copy(block, 3 * 256 * KiB);
    return block;
  }

  test.each(CODECS.map((c) => [compressionName(c), c] as const))('%s: the same frames as sealBlob, byte for byte, and they open', async (_name, codec) => {
    const streams = new ZstdStreams();
    for (const raw of [text(MiB), text(MiB + 17), text(32 * KiB), Buffer.from('abc'), randomBytes(MiB), randomBytes(64 * KiB), mixed(), text(MiB)]) {
      const frame = await sealWith(streams, raw, codec);
      expect(frame.equals(sealBlobToBuffer(KIND_DATA, sha256(raw), raw, undefined, codec))).toBe(true);
      const opened = await openBlobWith(streams, frame, sha256(raw));
      if (typeof opened === 'string') throw new Error(opened);
      expect(opened.plaintext.equals(raw)).toBe(true);
    }
  });

  test('encrypted frames, and frames of every codec read by one thread', async () => {
    const keys = newRepositoryKeys();
    const streams = new ZstdStreams();
    for (const codec of CODECS) {
      const raw = text(MiB);
      const frame = await sealWith(streams, raw, codec, keys);
      expect(frame.readUInt8(5)).toBe((codec.codec === 'lz4' ? FLAG_LZ4 : FLAG_ZSTD) | FLAG_ENCRYPTED);
      const opened = await openBlobWith(streams, frame, blobId(raw, keys), keys);
      if (typeof opened === 'string') throw new Error(opened);
      expect(opened.plaintext.equals(raw)).toBe(true);
    }
  });

  test('the probe through kept contexts decides as the probe does', async () => {
    const streams = new ZstdStreams();
    for (const raw of [randomBytes(MiB), text(MiB), mixed(), randomBytes(64 * KiB)]) {
      expect(await worthCompressingZstd(streams, raw)).toBe(worthCompressing(DEFAULT_COMPRESSION, raw));
    }
  });

  test('many frames at once through one thread: each gets its own output, none mixed with another', async () => {
    const streams = new ZstdStreams();
    const codec: Compression = { codec: 'zstd', level: 3 };
    const blobs = Array.from({ length: 24 }, (_, i) => (i % 3 === 2 ? randomBytes(64 * KiB) : Buffer.concat([Buffer.from(`blob ${i}\n`), text(i % 2 === 0 ? MiB : 40 * KiB + i)])));
    const frames = await Promise.all(blobs.map((raw) => sealWith(streams, raw, codec)));
    frames.forEach((frame, i) => expect(frame.equals(sealBlobToBuffer(KIND_DATA, sha256(blobs[i]!), blobs[i]!, undefined, codec))).toBe(true));
    const opened = await Promise.all(frames.map((frame, i) => openBlobWith(streams, frame, sha256(blobs[i]!))));
    opened.forEach((o, i) => expect(typeof o === 'string' ? o : o.plaintext.equals(blobs[i]!)).toBe(true));
  });

  test('a cut frame from the kept streams is refused before it is sealed (ENGINE_INTERNAL), never stored', async () => {
    // Stands in for a Node whose stream delivers part of a frame's output after the write callback.
    class CuttingStreams extends ZstdStreams {
      constructor(private readonly keep: (c: Buffer) => Buffer) {
        super();
      }
      override async compress(level: number, raw: Buffer): Promise<Buffer> {
        return this.keep(await super.compress(level, raw));
      }
    }
    const raw = text(MiB);
    const codec: Compression = { codec: 'zstd', level: 1 };
    for (const keep of [(c: Buffer) => c.subarray(0, c.length - 1), (c: Buffer) => c.subarray(0, Math.floor(c.length / 2)), (c: Buffer) => c.subarray(0, 3)]) {
      const target = Buffer.alloc(maxFrameLength(raw.length));
      const sealing = sealBlobWith(new CuttingStreams(keep), KIND_DATA, sha256(raw), raw, target, 0, undefined, codec);
      await expect(sealing).rejects.toMatchObject({ name: 'EngineError', code: 'ENGINE_INTERNAL' });
      expect(target.equals(Buffer.alloc(target.length))).toBe(true);
    }
    // The same streams uncut seal it.
    expect((await sealWith(new CuttingStreams((c) => c), raw, codec)).equals(sealBlobToBuffer(KIND_DATA, sha256(raw), raw, undefined, codec))).toBe(true);
  });

  test('hostile payloads: the reasons openBlob gives, and the thread reads good frames after each', async () => {
    const raw = text(MiB);
    const id = sha256(raw);
    const good = frameOf(FLAG_ZSTD, raw.length, id, zstdFrame(raw));
    const lying = zstdFrame(text(2000));
    lying.writeUInt16LE(1000 - 256, 4 + 1 + ((lying.readUInt8(4) & 0x20) === 0 ? 1 : 0));
    const scrambled = zstdFrame(raw);
    for (let i = 20; i < scrambled.length; i += 7) scrambled[i] ^= 0x5a;
    const skippable = Buffer.alloc(8 + 20);
    skippable.writeUInt32LE(0x184d2a50, 0);
    skippable.writeUInt32LE(20, 4);
    const hostile: [Buffer, number][] = [
      [zstdFrame(Buffer.alloc(16 * MiB)), 4 * KiB],
      [lying, 1000],
      [zstdFrame(raw).subarray(0, 200), raw.length],
      [randomBytes(500), raw.length],
      [scrambled, raw.length],
      [Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x80, 0x88, 0x00, 0x00, 0x10, 0x00, 0, 0, 0]), raw.length],
      [Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0xa1, 0x01, 0x00, 0x00, 0x10, 0x00, 0, 0, 0]), raw.length],
      [zstdFrame(raw, { [zlibConstants.ZSTD_c_contentSizeFlag]: 0 }), raw.length],
      [Buffer.concat([zstdFrame(raw), Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x88, 0x01, 0x00, 0x00])]), raw.length],
      [Buffer.concat([zstdFrame(raw), skippable]), raw.length],
    ];
    const streams = new ZstdStreams();
    const libzstd = /^zstd payload (decompresses to more than the frame's \d+ bytes|does not decompress \(.+\))$/;
    for (const [payload, rawLength] of hostile) {
      const frame = frameOf(FLAG_ZSTD, rawLength, sha256(Buffer.alloc(rawLength)), payload);
      const expected = openBlob(frame);
      const reason = await openBlobWith(streams, frame);
      expect(typeof expected).toBe('string');
      if (libzstd.test(expected as string)) expect(reason).toMatch(libzstd);
      else expect(reason).toBe(expected);
      const opened = await openBlobWith(streams, good, id);
      expect(typeof opened === 'string' ? opened : opened.plaintext.equals(raw)).toBe(true);
    }
    expect(await streams.decompress(lying, 1000)).toMatch(libzstd);
  });

  test('a frame whose blocks decode past its raw length stops there, on the way (libzstd checks the size only at the last block)', async () => {
    const streams = new ZstdStreams();
    const raw = text(MiB);
    // A 1 MiB frame (the decompressor's buffers are then 1 MiB), a 32 KiB frame (the next output starts 32 KiB
    // into a buffer: libzstd then decodes block by block, not in one pass), then a frame that says 1 MiB of
    // content in a 512 KiB window (libzstd's buffer is then a ring of 640 KiB that wraps) but holds 100 RLE
    // blocks of 128 KiB each: 12.5 MiB.
    expect(await streams.decompress(zstdFrame(raw), MiB)).toEqual(raw);
    expect(await streams.decompress(zstdFrame(text(32 * KiB)), 32 * KiB)).toEqual(text(32 * KiB));
    const rle = (last: boolean): number[] => {
      const value = 128 * KiB * 8 + 1 * 2 + (last ? 1 : 0);
      return [value % 256, Math.floor(value / 256) % 256, Math.floor(value / 65536), 0x41];
    };
    const blocks = Array.from({ length: 100 }, (_, i) => rle(i === 99)).flat();
    // Not single-segment, window descriptor 0x48 (2^19 bytes), 4-byte content size: 1 MiB.
    const bomb = Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x80, 0x48, 0x00, 0x00, 0x10, 0x00, ...blocks]);
    expect(decompress(FLAG_ZSTD, bomb, MiB)).toMatch(/^zstd payload (decompresses to more than the frame's 1048576 bytes|does not decompress \(.+\))$/);
    expect(await streams.decompress(bomb, MiB)).toBe(`zstd payload decompresses to more than the frame's ${MiB} bytes`);
    expect(await streams.decompress(zstdFrame(raw), MiB)).toEqual(raw);
  });
});
