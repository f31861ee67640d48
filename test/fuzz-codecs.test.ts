/**
 * Property and fuzz tests of every decoder that reads bytes the engine did not just write: frames, pack
 * headers, the pack resync walk, block-map pages, backup records, configs, key files, index entries,
 * quarantine records, registrations and the NBD wire messages. Each decoder, given any bytes — random, or a
 * valid encoding with bytes flipped, cut or appended — either returns a value that passes its own checks or
 * says why not (a reason string, or an EngineError with a stable code): never a TypeError or RangeError, never
 * a hang, never an allocation sized by the input. Encoders round-trip. Bounded: a few hundred cases each, a
 * fresh seed every run (fast-check prints the seed and the shrunk input of a failure to replay it).
 */
import { describe, expect, test } from 'vitest';
import fc from 'fast-check';
import { initChecksum } from '../dist/repo-format/checksum.js';
import { decodeFrame, decodeFrameHeader, encodeFrame } from '../dist/repo-format/frame.js';
import { decodePackHeader, encodePackHeader, walkPackBytes } from '../dist/repo-format/pack-file.js';
import { decodeLocation, encodeLocation } from '../dist/repo-format/index-entry.js';
import { decodeConfig, encodeConfig, newConfig } from '../dist/repo-format/config.js';
import { decodeBackupRecord, encodeBackupRecord, type BackupRecord } from '../dist/repo-format/backup-record.js';
import { decodeKeyFile } from '../dist/repo-format/key-file.js';
import { decodeQuarantined, encodeQuarantined } from '../dist/repo-format/quarantine.js';
import { parseRegistration } from '../dist/repo-format/registry.js';
import { MapBuilder, mapDepth, readMap } from '../dist/repo-format/block-map.js';
import { EngineError } from '../dist/repo-format/errors.js';
import { FRAME_HEADER_SIZE, ID_SIZE, KIND_DATA, KIND_MAP_LEAF, KIND_MAP_NODE, MAP_PAGE_ENTRIES, PACK_HEADER_SIZE, ZERO_ID } from '../dist/repo-format/constants.js';
import * as wire from '../dist/engine/nbd/wire.js';
import * as wireOptions from '../dist/engine/nbd/wire-options.js';
import * as wireChunks from '../dist/engine/nbd/wire-chunks.js';

await initChecksum();
const RUNS = { numRuns: 300 };
const hex = (bytes: number): fc.Arbitrary<string> => fc.uint8Array({ minLength: bytes, maxLength: bytes }).map((b) => Buffer.from(b).toString('hex'));
const bytes = (max = 512): fc.Arbitrary<Buffer> => fc.uint8Array({ maxLength: max }).map((b) => Buffer.from(b));

/** A valid encoding, then damaged the ways storage and networks damage things. */
function damaged(valid: Buffer): fc.Arbitrary<Buffer> {
  const length = Math.max(valid.length, 1);
  return fc.oneof(
    fc.array(fc.tuple(fc.nat(length - 1), fc.integer({ min: 1, max: 255 })), { minLength: 1, maxLength: 4 }).map((flips) => {
      const copy = Buffer.from(valid);
      for (const [at, xor] of flips) copy[at % copy.length] = (copy[at % copy.length] ?? 0) ^ xor;
      return copy;
    }),
    fc.nat(length).map((cut) => Buffer.from(valid.subarray(0, cut))),
    bytes(64).map((tail) => Buffer.concat([valid, tail])),
  );
}

/** The only acceptable failure: an EngineError with a stable code (a reason string is returned, not thrown). */
function engineErrorOr<T>(decode: () => T): T | EngineError {
  try {
    return decode();
  } catch (error) {
    if (error instanceof EngineError && /^ENGINE_[A-Z_]+$/.test(error.code)) return error;
    throw error;
  }
}

const frameInput = fc.record({
  kind: fc.constantFrom(KIND_DATA, KIND_MAP_LEAF, KIND_MAP_NODE),
  id: fc.uint8Array({ minLength: ID_SIZE, maxLength: ID_SIZE }).map((b) => Buffer.from(b)),
  payload: fc.uint8Array({ minLength: 1, maxLength: 2048 }).map((b) => Buffer.from(b)),
});

function frameOf(input: { kind: number; id: Buffer; payload: Buffer }): Buffer {
  const target = Buffer.alloc(FRAME_HEADER_SIZE + input.payload.length + 8);
  encodeFrame({ kind: input.kind, flags: 0, rawLength: input.payload.length, id: input.id }, input.payload, target);
  return target;
}

describe('frames', () => {
  test('round trip', () => {
    fc.assert(
      fc.property(frameInput, (input) => {
        const decoded = decodeFrame(frameOf(input));
        expect(typeof decoded).not.toBe('string');
        if (typeof decoded === 'string') return;
        expect(decoded.header).toMatchObject({ kind: input.kind, rawLength: input.payload.length, storedLength: input.payload.length });
        expect(decoded.header.id.equals(input.id)).toBe(true);
        expect(decoded.payload.equals(input.payload)).toBe(true);
      }),
      RUNS,
    );
  });

  test('a damaged frame is refused with a reason, never accepted or thrown', () => {
    fc.assert(
      fc.property(frameInput.chain((input) => fc.tuple(fc.constant(frameOf(input)), damaged(frameOf(input)))), ([valid, bad]) => {
        const decoded = decodeFrame(bad);
        if (bad.equals(valid)) return;
        expect(typeof decoded).toBe('string');
      }),
      RUNS,
    );
  });

  test('random bytes: a reason or a header that keeps its own bounds', () => {
    fc.assert(
      fc.property(bytes(), fc.boolean(), (input, encrypted) => {
        const header = decodeFrameHeader(input, 0, encrypted);
        if (typeof header !== 'string') {
          expect(header.rawLength).toBeGreaterThan(0);
          expect(header.storedLength).toBeGreaterThan(0);
        }
        const frame = decodeFrame(input, encrypted);
        if (typeof frame !== 'string') expect(frame.payload.length).toBe(frame.header.storedLength);
      }),
      RUNS,
    );
  });
});

describe('packs', () => {
  test('header round trip, and any other 32 bytes refused with a reason', () => {
    fc.assert(
      fc.property(hex(16), bytes(48), (packId, other) => {
        expect(decodePackHeader(encodePackHeader(packId), packId)).toBeUndefined();
        const header = encodePackHeader(packId);
        if (!other.subarray(0, PACK_HEADER_SIZE).equals(header)) expect(typeof decodePackHeader(other, packId)).toBe('string');
      }),
      RUNS,
    );
  });

  test('the resync walk over damaged packs finds exactly the intact frames it can reach, and always ends', () => {
    fc.assert(
      fc.property(hex(16), fc.array(frameInput, { minLength: 1, maxLength: 6 }), fc.array(fc.tuple(fc.nat(), fc.integer({ min: 1, max: 255 })), { maxLength: 3 }), (packId, inputs, flips) => {
        const frames = inputs.map(frameOf);
        const pack = Buffer.concat([encodePackHeader(packId), ...frames]);
        for (const [at, xor] of flips) pack[at % pack.length] = (pack[at % pack.length] ?? 0) ^ xor;
        const { good, damage } = walkPackBytes(pack, packId, (frame) => {
          const decoded = decodeFrame(frame);
          return typeof decoded === 'string' ? decoded : undefined;
        });
        for (const found of good) {
          expect(found.offset + found.length).toBeLessThanOrEqual(pack.length);
          expect(typeof decodeFrame(pack.subarray(found.offset, found.offset + found.length))).not.toBe('string');
        }
        if (flips.length === 0) {
          expect(damage).toEqual([]);
          expect(good.length).toBe(frames.length);
        }
      }),
      RUNS,
    );
  });
});

describe('block maps', () => {
  const entryOf = (block: number, seed: number): Buffer => {
    const id = Buffer.alloc(ID_SIZE);
    id.writeUInt32LE(block + 1, 0);
    id.writeUInt32LE(seed, 4);
    return id;
  };

  test('round trip: built pages read back block for block, zero runs as zero', async () => {
    await fc.assert(
      fc.asyncProperty(fc.integer({ min: 0, max: 3 * MAP_PAGE_ENTRIES + 7 }), fc.double({ min: 0, max: 1, noNaN: true }), fc.nat(), async (blocks, zeroShare, seed) => {
        const pages = new Map<string, Buffer>();
        let pageCount = 0;
        const builder = new MapBuilder(blocks, async (_kind, page) => {
          const id = Buffer.alloc(ID_SIZE);
          id.writeUInt32LE((pageCount += 1), 0);
          id.writeUInt32LE(0xfeed, 8);
          pages.set(id.toString('hex'), Buffer.from(page));
          return id;
        });
        const zero = (block: number): boolean => ((block * 2654435761 + seed) % 1000) / 1000 < zeroShare;
        for (let block = 0; block < blocks; block += 1) await builder.push(zero(block) ? ZERO_ID : entryOf(block, seed));
        const root = await builder.finish();
        let next = 0;
        for await (const run of readMap(root, async (id) => pages.get(id.toString('hex')) ?? Buffer.alloc(0))) {
          expect(run.firstBlock).toBe(next);
          for (let i = 0; i < run.count; i += 1) {
            const entry = run.entries === null ? ZERO_ID : run.entries.subarray(i * ID_SIZE, (i + 1) * ID_SIZE);
            expect(entry.equals(zero(next + i) ? ZERO_ID : entryOf(next + i, seed))).toBe(true);
          }
          next += run.count;
        }
        expect(next).toBe(blocks);
      }),
      { numRuns: 60 },
    );
  });

  test('hostile roots and pages: an EngineError or runs that stay inside the disk, reading pages lazily', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.record({ blocks: fc.oneof(fc.nat(5000), fc.constant(2 ** 50), fc.constant(Number.MAX_SAFE_INTEGER)), depth: fc.nat(6), root: fc.uint8Array({ minLength: ID_SIZE, maxLength: ID_SIZE }) }),
        fc.array(bytes(3 * ID_SIZE * 8), { minLength: 1, maxLength: 4 }),
        async (shape, pagePool) => {
          let loads = 0;
          const root = { blocks: shape.blocks, depth: shape.depth, root: Buffer.from(shape.root) };
          const outcome = await (async () => {
            try {
              let covered = 0;
              for await (const run of readMap(root, async () => pagePool[(loads += 1) % pagePool.length] ?? Buffer.alloc(0))) {
                expect(run.firstBlock).toBe(covered);
                expect(run.count).toBeGreaterThan(0);
                covered += run.count;
                expect(covered).toBeLessThanOrEqual(shape.blocks);
                if (loads > 64) break; // enough: the walk is lazy, whatever the disk size claims
              }
              return 'ok';
            } catch (error) {
              if (error instanceof EngineError) return error.code;
              throw error;
            }
          })();
          expect(outcome).toMatch(/^(ok|ENGINE_[A-Z_]+)$/);
          if (shape.depth !== mapDepth(shape.blocks) && shape.blocks > 0) expect(outcome).not.toBe('ok');
        },
      ),
      RUNS,
    );
  });
});

const validRecord: BackupRecord = JSON.parse(`{
  "version": 1, "id": "0123456789abcdef0123456789abcdef", "name": "vm", "type": "incremental",
  "parent": "fedcba9876543210fedcba9876543210", "startTime": "2026-12-06T00:00:00.000Z", "endTime": "2026-12-06T00:01:00.000Z",
  "hostname": "host", "engineVersion": "0.1.0", "blockSize": 1048576,
  "disks": [{ "name": "os", "size": 10485761, "source": { "kind": "file", "path": "/dev/vda" },
    "map": { "root": "${'ab'.repeat(32)}", "depth": 0, "blocks": 11 }, "mode": "incremental", "modeReason": null,
    "parent": "fedcba9876543210fedcba9876543210", "cbt": null,
    "stats": { "bytesRead": 1, "bytesNew": 1, "bytesStored": 1, "blocksTotal": 11, "blocksZero": 0, "blocksNew": 1, "blocksDeduplicated": 0, "blocksUnchanged": 10, "durationMs": 5 } }],
  "attachments": []
}`) as BackupRecord;

/** A JSON value with one field, anywhere in the tree, replaced by something hostile. */
function mutatedJson(valid: unknown): fc.Arbitrary<string> {
  const paths: (string | number)[][] = [];
  const collect = (value: unknown, path: (string | number)[]): void => {
    paths.push(path);
    if (value !== null && typeof value === 'object') for (const [key, child] of Object.entries(value)) collect(child, [...path, Array.isArray(value) ? Number(key) : key]);
  };
  collect(valid, []);
  const hostile = fc.oneof(
    fc.constantFrom(null, true, -1, 0, 1.5, 2 ** 50, Number.MAX_SAFE_INTEGER, 1e308, '', 'x'.repeat(5000), '\u001b[2J', '../..', [], {}, { length: 2 ** 40 }),
    fc.jsonValue(),
  );
  return fc.tuple(fc.constantFrom(...paths.filter((p) => p.length > 0)), hostile, fc.boolean()).map(([path, value, remove]) => {
    const copy = structuredClone(valid) as Record<string | number, unknown>;
    let parent: Record<string | number, unknown> = copy;
    for (const key of path.slice(0, -1)) parent = parent[key] as Record<string | number, unknown>;
    const last = path[path.length - 1] as string | number;
    if (remove) delete parent[last];
    else parent[last] = value;
    return JSON.stringify(copy);
  });
}

describe('backup records', () => {
  test('round trip', () => {
    expect(decodeBackupRecord(encodeBackupRecord(validRecord), 'record')).toEqual(validRecord);
  });

  test('a hostile field: refused with ENGINE_CORRUPT_METADATA, or a record whose map fits its disk', () => {
    fc.assert(
      fc.property(fc.oneof(mutatedJson(validRecord), damaged(encodeBackupRecord(validRecord)).map((b) => b.toString('latin1'))), (text) => {
        const outcome = engineErrorOr(() => decodeBackupRecord(Buffer.from(text, 'latin1'), 'record'));
        if (outcome instanceof EngineError) {
          expect(outcome.code).toBe('ENGINE_CORRUPT_METADATA');
          return;
        }
        for (const disk of outcome.disks) {
          expect(Number.isSafeInteger(disk.size) && disk.size >= 0).toBe(true);
          expect(disk.map.blocks).toBe(Math.ceil(disk.size / outcome.blockSize));
        }
      }),
      { numRuns: 500 },
    );
  });
});

describe('config, key file, index entries, quarantine records, registrations', () => {
  test('config round trip; hostile configs are a reason string', () => {
    const config = newConfig('0123456789abcdef0123456789abcdef', 1024 * 1024, new Date(0));
    expect(decodeConfig(encodeConfig(config))).toEqual(config);
    fc.assert(
      fc.property(fc.oneof(mutatedJson(config), damaged(encodeConfig(config)).map((b) => b.toString('latin1'))), (text) => {
        const decoded = engineErrorOr(() => decodeConfig(Buffer.from(text, 'latin1')));
        expect(decoded instanceof EngineError).toBe(false);
      }),
      RUNS,
    );
  });

  test('key files: hostile ones are ENGINE_CORRUPT_METADATA', () => {
    const keyFile = {
      version: 1, id: '0123456789abcdef', created: '2026-12-06T00:00:00.000Z', cipher: 'aes-256-gcm',
      kdf: { name: 'scrypt', N: 32768, r: 8, p: 1, salt: Buffer.alloc(32).toString('base64') }, sealed: Buffer.alloc(92).toString('base64'),
    };
    fc.assert(
      fc.property(fc.oneof(mutatedJson(keyFile), bytes().map((b) => b.toString('latin1'))), (text) => {
        const outcome = engineErrorOr(() => decodeKeyFile(Buffer.from(text, 'latin1'), 'key file'));
        if (outcome instanceof EngineError) expect(outcome.code).toBe('ENGINE_CORRUPT_METADATA');
      }),
      RUNS,
    );
  });

  test('index entries, quarantine records and registrations: round trip, and undefined for anything else', () => {
    fc.assert(
      fc.property(
        fc.record({ packId: hex(16), offset: fc.nat(2 ** 32 - 1), length: fc.nat(2 ** 32 - 1), rawLength: fc.nat(2 ** 32 - 1), kind: fc.nat(255), flags: fc.nat(255) }),
        bytes(64),
        (location, other) => {
          expect(decodeLocation(encodeLocation(location))).toEqual(location);
          const decoded = decodeLocation(other);
          if (decoded) expect(decoded.packId).toMatch(/^[0-9a-f]{32}$/);
        },
      ),
      RUNS,
    );
    const quarantined = { pack: 'ab'.repeat(16), offset: 4096, blob: 'cd'.repeat(32), why: 'checksum mismatch', since: '2026-12-06T00:00:00.000Z' };
    expect(decodeQuarantined(encodeQuarantined(quarantined))).toEqual(quarantined);
    fc.assert(
      fc.property(fc.oneof(mutatedJson(quarantined), bytes().map((b) => b.toString('latin1'))), (text) => {
        const decoded = decodeQuarantined(Buffer.from(text, 'latin1'));
        if (decoded) expect(Number.isSafeInteger(decoded.offset)).toBe(true);
      }),
      RUNS,
    );
    const registration = { pid: 4242, hostname: 'host', since: '2026-12-06T00:00:00.000Z', command: 'serve', token: '0123456789abcdef', backupIds: ['ab'.repeat(16)] };
    fc.assert(
      fc.property(fc.oneof(mutatedJson(registration), bytes().map((b) => b.toString('latin1'))), (text) => {
        const decoded = parseRegistration(text);
        if (decoded) expect(typeof decoded.pid).toBe('number');
      }),
      RUNS,
    );
  });
});

describe('NBD wire messages', () => {
  const u16 = fc.nat(0xffff);
  const u32 = fc.nat(0xffffffff);
  const u64 = fc.bigInt({ min: 0n, max: 2n ** 64n - 1n });

  test('every encode/decode pair round-trips', () => {
    fc.assert(
      fc.property(u32, u32, u32, u16, u16, u64, fc.nat(Number.MAX_SAFE_INTEGER), (option, length, type, flags, type16, cookie, offset) => {
        expect(wire.decodeOptionHeader(wire.encodeOptionHeader({ option, length }))).toEqual({ option, length });
        expect(wire.decodeOptionReplyHeader(wire.encodeOptionReply({ option, type, length: 0 }))).toEqual({ option, type, length: 0 });
        expect(wire.decodeRequest(wire.encodeRequest({ flags, type: type16, cookie, offset, length }))).toEqual({ flags, type: type16, cookie, offset, length });
        expect(wire.decodeSimpleReply(wire.encodeSimpleReply(length, cookie))).toEqual({ errno: length, cookie });
        expect(wire.decodeChunkHeader(wire.encodeChunkHeader({ flags, type: type16, cookie, length }))).toEqual({ flags, type: type16, cookie, length });
      }),
      RUNS,
    );
  });

  test('handshake and chunk payload pairs round-trip', () => {
    const text = (max: number): fc.Arbitrary<string> => fc.string({ unit: 'grapheme', maxLength: max }).filter((t) => Buffer.byteLength(t) <= 4096);
    const offset = fc.nat(Number.MAX_SAFE_INTEGER);
    fc.assert(
      fc.property(u16, u32, text(64), fc.array(text(32), { maxLength: 8 }), fc.array(u16, { maxLength: 8 }), offset, (flags, id, name, queries, requests, at) => {
        expect(wire.decodeGreeting(wire.encodeGreeting({ flags }))).toEqual({ flags });
        expect(wire.decodeClientFlags(wire.encodeClientFlags(id))).toBe(id);
        expect(wireOptions.decodeMetaContextOption(wireOptions.encodeMetaContextOption({ exportName: name, queries }))).toEqual({ exportName: name, queries });
        expect(wireOptions.decodeInfoOption(wireOptions.encodeInfoOption({ exportName: name, requests }))).toEqual({ exportName: name, requests });
        expect(wireOptions.decodeServerReply(wireOptions.encodeServerReply({ name, description: queries.join(',') }))).toEqual({ name, description: queries.join(',') });
        if (name !== '') expect(wireOptions.decodeMetaContextReply(wireOptions.encodeMetaContextReply({ id, name }))).toEqual({ id, name });
        expect(wireOptions.decodeInfoReply(wireOptions.encodeInfoReply({ kind: 'export', size: at, flags }))).toEqual({ kind: 'export', size: at, flags });
        expect(wireOptions.decodeInfoReply(wireOptions.encodeInfoReply({ kind: 'block-size', minimum: id, preferred: flags, maximum: id }))).toEqual({ kind: 'block-size', minimum: id, preferred: flags, maximum: id });
        expect(wireOptions.decodeExportNameReply(wireOptions.encodeExportNameReply({ size: at, flags }, true))).toEqual({ size: at, flags });
        expect(wireChunks.decodeOffsetDataHead(wireChunks.encodeOffsetDataHead(at))).toEqual({ offset: at });
        expect(wireChunks.decodeOffsetHole(wireChunks.encodeOffsetHole({ offset: at, length: id }))).toEqual({ offset: at, length: id });
        const descriptors = requests.map((r, i) => ({ length: r + 1, flags: i }));
        if (descriptors.length > 0) expect(wireChunks.decodeBlockStatus(wireChunks.encodeBlockStatus({ contextId: id, descriptors }))).toEqual({ contextId: id, descriptors });
        expect(wireChunks.decodeErrorChunk(wireChunks.encodeErrorChunk({ errno: id, message: name }))).toEqual({ errno: id, message: name });
      }),
      RUNS,
    );
  });

  test('any bytes: a reason string or a message, never an exception', () => {
    const decoders: ((bytes: Buffer) => unknown)[] = [
      wire.decodeGreeting,
      wire.decodeClientFlags,
      wire.decodeOptionHeader,
      wire.decodeOptionReplyHeader,
      wire.decodeRequest,
      wire.decodeSimpleReply,
      wire.decodeChunkHeader,
      wireOptions.decodeMetaContextOption,
      wireOptions.decodeInfoOption,
      wireOptions.decodeServerReply,
      wireOptions.decodeMetaContextReply,
      wireOptions.decodeInfoReply,
      wireOptions.decodeExportNameReply,
      wireChunks.decodeOffsetDataHead,
      wireChunks.decodeOffsetHole,
      wireChunks.decodeBlockStatus,
      wireChunks.decodeErrorChunk,
    ];
    fc.assert(
      fc.property(bytes(40), (input) => {
        for (const decode of decoders) {
          const decoded = decode(input);
          expect(['string', 'object', 'number']).toContain(typeof decoded);
        }
        const request = wire.decodeRequest(input);
        if (typeof request !== 'string') expect(Number.isSafeInteger(request.offset) || request.offset === Number.POSITIVE_INFINITY).toBe(true);
      }),
      { numRuns: 1000 },
    );
  });
});
