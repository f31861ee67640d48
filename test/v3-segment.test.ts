/**
 * Index segments (SPEC.md 19.3): the encoding byte by byte (golden bytes), round trips plain and sealed, the
 * decoder's refusals (every damaged, cut, extended or renamed segment gives a reason, never a throw or an
 * allocation sized by the input), and the resolution rules: superseded segments count for nothing, and of
 * several segments naming one blob the first by key wins.
 */
import { describe, expect, test } from 'vitest';
import fc from 'fast-check';
import { initChecksum, checksum64 } from '../dist/repo-format/checksum.js';
import {
  decodeSegment,
  encodeSegment,
  parseSegmentKey,
  segmentKey,
  SEGMENT_ENTRY_SIZE,
  SEGMENT_HEADER_SIZE,
  SEGMENT_MAX_ENTRIES,
  type Segment,
  type SegmentEntry,
} from '../dist/repo-format/v3/segment.js';
import { resolveIndex, supersededKeys } from '../dist/repo-format/v3/segment-set.js';
import { openMetadata } from '../dist/repo-format/sealed-metadata.js';

await initChecksum();
const RUNS = { numRuns: 200 };
const WRITER = '00112233445566778899aabbccddeeff';
const key32 = Buffer.alloc(32, 7);

function entry(idByte: number, pack = 'ab'.repeat(16), offset = 32): SegmentEntry {
  return { id: Buffer.alloc(32, idByte), packId: pack, offset, length: 100, rawLength: 44, kind: 1, flags: 1 };
}

const entryArb: fc.Arbitrary<SegmentEntry> = fc.record({
  id: fc.uint8Array({ minLength: 32, maxLength: 32 }).map((b) => Buffer.from(b)),
  packId: fc.uint8Array({ minLength: 16, maxLength: 16 }).map((b) => Buffer.from(b).toString('hex')),
  offset: fc.integer({ min: 32, max: 2 ** 31 }),
  length: fc.integer({ min: 57, max: 16 * 1024 * 1024 }),
  rawLength: fc.integer({ min: 1, max: 16 * 1024 * 1024 }),
  kind: fc.constantFrom(1, 2, 3),
  flags: fc.constantFrom(0, 1, 2, 3),
});
const nameArb = fc.record({ writer: fc.uint8Array({ minLength: 16, maxLength: 16 }).map((b) => Buffer.from(b).toString('hex')), seq: fc.nat({ max: 0xffffffff }) });
const segmentArb: fc.Arbitrary<Segment> = fc
  .record({ name: nameArb, supersedes: fc.array(nameArb, { maxLength: 4 }), entries: fc.array(entryArb, { maxLength: 12 }) })
  .map(({ name, supersedes, entries }) => {
    const byId = new Map(entries.map((e) => [e.id.toString('hex'), e]));
    const sortedEntries = [...byId.values()].sort((a, b) => Buffer.compare(a.id, b.id));
    const names = new Map(supersedes.map((s) => [segmentKey(s), s]));
    names.delete(segmentKey(name));
    const sortedNames = [...names.entries()].sort(([a], [b]) => (a < b ? -1 : 1)).map(([, s]) => s);
    return { name, supersedes: sortedNames, entries: sortedEntries };
  });

describe('segment names', () => {
  test('key and parse are inverse; other keys are not segments', () => {
    expect(segmentKey({ writer: WRITER, seq: 258 })).toBe(`index/${WRITER}-00000102`);
    expect(parseSegmentKey(`index/${WRITER}-00000102`)).toEqual({ writer: WRITER, seq: 258 });
    for (const stray of ['index/README', `index/${WRITER}-102`, `index/${WRITER.toUpperCase()}-00000102`, `packs/${WRITER}-00000102`, `index/${WRITER}-00000102.tmp`]) {
      expect(parseSegmentKey(stray)).toBeUndefined();
    }
  });
});

describe('segment encoding', () => {
  test('golden bytes: header, one superseded name, one entry, xxh64 trailer', () => {
    const segment: Segment = {
      name: { writer: WRITER, seq: 5 },
      supersedes: [{ writer: 'ff'.repeat(16), seq: 1 }],
      entries: [{ id: Buffer.alloc(32, 0x11), packId: '22'.repeat(16), offset: 32, length: 0x0100, rawLength: 0x00010000, kind: 1, flags: 1 }],
    };
    const bytes = encodeSegment(segment);
    const body =
      '45534547' + '0100' + '0000' + WRITER + '05000000' + '01000000' + '01000000' + '00000000' + // header
      'ff'.repeat(16) + '01000000' + // superseded
      '11'.repeat(32) + '22'.repeat(16) + '20000000' + '00010000' + '00000100' + '01' + '01'; // entry
    const trailer = Buffer.alloc(8);
    trailer.writeBigUInt64LE(checksum64(Buffer.from(body, 'hex')));
    expect(bytes.toString('hex')).toBe(body + trailer.toString('hex'));
    expect(bytes.length).toBe(SEGMENT_HEADER_SIZE + 20 + SEGMENT_ENTRY_SIZE + 8);
  });

  test('round trip, plain and sealed', () => {
    fc.assert(
      fc.property(segmentArb, fc.boolean(), (segment, sealed) => {
        const options = sealed ? { dataKey: key32 } : {};
        const bytes = encodeSegment(segment, options);
        const decoded = decodeSegment(bytes, segmentKey(segment.name), options);
        expect(decoded).toEqual(segment);
      }),
      RUNS,
    );
  });

  test('a sealed segment is authenticated with its key: moved under another name it fails', () => {
    const segment: Segment = { name: { writer: WRITER, seq: 1 }, supersedes: [], entries: [entry(1)] };
    const sealed = encodeSegment(segment, { dataKey: key32 });
    expect(sealed.subarray(0, 4).toString('latin1')).toBe('EENC');
    expect(typeof openMetadata(key32, sealed, segmentKey(segment.name))).not.toBe('string');
    expect(decodeSegment(sealed, segmentKey({ writer: WRITER, seq: 2 }), { dataKey: key32 })).toMatch(/authentication failed/);
    expect(decodeSegment(sealed, segmentKey(segment.name), { dataKey: Buffer.alloc(32, 8) })).toMatch(/authentication failed/);
    // A plain segment in an encrypted repository is refused, not read.
    expect(decodeSegment(encodeSegment(segment), segmentKey(segment.name), { dataKey: key32 })).toMatch(/not encrypted/);
  });

  test('a plain segment stored under another name is refused', () => {
    const segment: Segment = { name: { writer: WRITER, seq: 1 }, supersedes: [], entries: [entry(1)] };
    expect(decodeSegment(encodeSegment(segment), segmentKey({ writer: WRITER, seq: 9 }))).toMatch(/names itself/);
  });

  test('the encoder refuses what a decoder would refuse', () => {
    const name = { writer: WRITER, seq: 1 };
    expect(() => encodeSegment({ name, supersedes: [], entries: [entry(2), entry(1)] })).toThrow(RangeError);
    expect(() => encodeSegment({ name, supersedes: [], entries: [entry(1), entry(1)] })).toThrow(RangeError);
    expect(() => encodeSegment({ name, supersedes: [], entries: [entry(1, 'ab'.repeat(16), 8)] })).toThrow(/before the first frame/);
    expect(() => encodeSegment({ name, supersedes: [name], entries: [] })).toThrow(/itself/);
    expect(() => encodeSegment({ name, supersedes: [], entries: [{ ...entry(1), kind: 4 }] })).toThrow(/kind/);
  });
});

describe('segment decoding: bounded, and every damage gives a reason', () => {
  test('flipped, cut or extended bytes are refused with a reason', () => {
    fc.assert(
      fc.property(
        segmentArb.chain((segment) => fc.tuple(fc.constant(segment), fc.oneof(
          fc.array(fc.tuple(fc.nat(), fc.integer({ min: 1, max: 255 })), { minLength: 1, maxLength: 3 }).map((flips) => ({ flips, cut: undefined, tail: undefined })),
          fc.nat().map((cut) => ({ flips: [] as [number, number][], cut, tail: undefined })),
          fc.uint8Array({ minLength: 1, maxLength: 70 }).map((tail) => ({ flips: [] as [number, number][], cut: undefined, tail: Buffer.from(tail) })),
        ))),
        fc.boolean(),
        ([segment, damage], sealed) => {
          const options = sealed ? { dataKey: key32 } : {};
          const valid = encodeSegment(segment, options);
          let bad = Buffer.from(valid);
          for (const [at, xor] of damage.flips) bad[at % bad.length] = (bad[at % bad.length] ?? 0) ^ xor;
          if (damage.cut !== undefined) bad = bad.subarray(0, damage.cut % valid.length);
          if (damage.tail) bad = Buffer.concat([bad, damage.tail]);
          if (bad.equals(valid)) return; // two flips of one byte that cancel out
          const decoded = decodeSegment(bad, segmentKey(segment.name), options);
          expect(typeof decoded).toBe('string');
        },
      ),
      RUNS,
    );
  });

  test('random bytes: a reason, never a throw', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 400 }), fc.boolean(), (input, sealed) => {
        const decoded = decodeSegment(Buffer.from(input), segmentKey({ writer: WRITER, seq: 0 }), sealed ? { dataKey: key32 } : {});
        expect(typeof decoded).toBe('string');
      }),
      RUNS,
    );
  });

  test('a header claiming more entries than allowed is refused before anything is sized by it', () => {
    const header = encodeSegment({ name: { writer: WRITER, seq: 0 }, supersedes: [], entries: [] });
    header.writeUInt32LE(SEGMENT_MAX_ENTRIES + 1, 28);
    expect(decodeSegment(header, segmentKey({ writer: WRITER, seq: 0 }))).toMatch(/more than the/);
    header.writeUInt32LE(0xffffffff, 28);
    expect(decodeSegment(header, segmentKey({ writer: WRITER, seq: 0 }))).toMatch(/more than the/);
    header.writeUInt32LE(1000, 28);
    expect(decodeSegment(header, segmentKey({ writer: WRITER, seq: 0 }))).toMatch(/counts need/);
  });
});

describe('resolution: superseded segments and duplicates', () => {
  const a = { writer: 'aa'.repeat(16), seq: 0 };
  const b = { writer: 'bb'.repeat(16), seq: 0 };
  const gc = { writer: 'cc'.repeat(16), seq: 0 };

  test('two writers stored one chunk: the segment first by key wins, for every reader', () => {
    const segments: Segment[] = [
      { name: b, supersedes: [], entries: [entry(1, '0b'.repeat(16))] },
      { name: a, supersedes: [], entries: [entry(1, '0a'.repeat(16)), entry(2, '0a'.repeat(16), 132)] },
    ];
    for (const order of [segments, [...segments].reverse()]) {
      const index = resolveIndex(order);
      expect(index.get('01'.repeat(32))?.entry.packId).toBe('0a'.repeat(16));
      expect(index.get('01'.repeat(32))?.segment).toBe(segmentKey(a));
      expect(index.size).toBe(2);
    }
  });

  test('a consolidated segment replaces the ones it supersedes as soon as it exists, deleted or not', () => {
    const old = { name: a, supersedes: [], entries: [entry(1, '0a'.repeat(16)), entry(2, '0a'.repeat(16), 132)] };
    // gc moved blob 1 to pack 0c and found blob 2 dead.
    const consolidated = { name: gc, supersedes: [a], entries: [entry(1, '0c'.repeat(16))] };
    const index = resolveIndex([old, consolidated]);
    expect([...index.keys()]).toEqual(['01'.repeat(32)]);
    expect(index.get('01'.repeat(32))?.entry.packId).toBe('0c'.repeat(16));
    expect(supersededKeys([{ key: segmentKey(a), supersedes: [] }, { key: segmentKey(gc), supersedes: [a, b] }])).toEqual(new Set([segmentKey(a)]));
  });
});
