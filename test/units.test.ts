/**
 * Size parsing and formatting for the CLI, and the compact id set verify uses to mark referenced blobs.
 */
import { describe, expect, test } from 'vitest';
import { randomBytes } from 'node:crypto';
import { formatBytes, parseSize } from '../dist/engine/common/units.js';
import { IdPrefixSet } from '../dist/engine/common/id-set.js';
import { InvalidArgumentError } from '../dist/repo-format/errors.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const TiB = 1024 * GiB;

describe('parseSize', () => {
  test('plain byte counts and binary units, any case', () => {
    expect(parseSize('1048576')).toBe(1048576);
    expect(parseSize('0')).toBe(0);
    expect(parseSize('256K')).toBe(256 * KiB);
    expect(parseSize('256k')).toBe(256 * KiB);
    expect(parseSize('256KiB')).toBe(256 * KiB);
    expect(parseSize('1M')).toBe(MiB);
    expect(parseSize('1MiB')).toBe(MiB);
    expect(parseSize('1mib')).toBe(MiB);
    expect(parseSize('4g')).toBe(4 * GiB);
    expect(parseSize('4GiB')).toBe(4 * GiB);
    expect(parseSize('2T')).toBe(2 * TiB);
    expect(parseSize('10b')).toBe(10);
    expect(parseSize('10B')).toBe(10);
  });

  test('fractions that come to whole bytes, and surrounding blanks', () => {
    expect(parseSize('1.5M')).toBe(1572864);
    expect(parseSize('0.5K')).toBe(512);
    expect(parseSize('1.25G')).toBe(1.25 * GiB);
    expect(parseSize(' 2 GiB ')).toBe(2 * GiB);
    expect(parseSize('64 K')).toBe(64 * KiB);
  });

  test('things that are not sizes are InvalidArgumentError', () => {
    for (const text of ['abc', '1X', '-1', '', ' ', 'M', '1KB', '1e3', '.5M', '1,5M', '1 2M', '0x10', '1.M', '+1']) {
      expect(() => parseSize(text), text).toThrow(InvalidArgumentError);
    }
    expect(() => parseSize('1X')).toThrow('"1X" is not a size');
    try {
      parseSize('-1');
      throw new Error('parseSize("-1") was accepted');
    } catch (error) {
      expect(error).toBeInstanceOf(InvalidArgumentError);
      expect((error as InvalidArgumentError).code).toBe('ENGINE_INVALID_ARGUMENT');
    }
  });

  test('fractions of a byte and sizes beyond 2^53 are refused', () => {
    expect(() => parseSize('1.5')).toThrow('"1.5" is not a whole number of bytes');
    expect(() => parseSize('0.1K')).toThrow(InvalidArgumentError);
    expect(() => parseSize(String(2 ** 53))).toThrow(InvalidArgumentError);
    expect(() => parseSize('9999999T')).toThrow(InvalidArgumentError);
    expect(parseSize(String(2 ** 53 - 1))).toBe(Number.MAX_SAFE_INTEGER);
  });
});

describe('formatBytes', () => {
  test('bytes below 1 KiB are shown whole', () => {
    expect(formatBytes(0)).toBe('0 B');
    expect(formatBytes(1)).toBe('1 B');
    expect(formatBytes(1023)).toBe('1023 B');
  });

  test('larger values get a binary unit and three significant digits', () => {
    expect(formatBytes(1024)).toBe('1.00 KiB');
    expect(formatBytes(1536)).toBe('1.50 KiB');
    expect(formatBytes(10 * KiB)).toBe('10.0 KiB');
    expect(formatBytes(100 * KiB)).toBe('100 KiB');
    expect(formatBytes(1023 * KiB)).toBe('1023 KiB');
    expect(formatBytes(MiB)).toBe('1.00 MiB');
    expect(formatBytes(1.5 * MiB)).toBe('1.50 MiB');
    expect(formatBytes(GiB)).toBe('1.00 GiB');
    expect(formatBytes(4.25 * GiB)).toBe('4.25 GiB');
    expect(formatBytes(TiB)).toBe('1.00 TiB');
    expect(formatBytes(1024 * TiB)).toBe('1.00 PiB');
    // PiB is the largest unit: bigger values keep counting in it.
    expect(formatBytes(2048 * 1024 * TiB)).toBe('2048 PiB');
  });

  test('parseSize reads back what formatBytes writes for exact values', () => {
    for (const bytes of [KiB, 1536, 10 * KiB, 100 * KiB, MiB, 1.5 * MiB, GiB, 4.25 * GiB, TiB]) {
      const shown = formatBytes(bytes).replace(' ', '');
      expect(parseSize(shown)).toBe(bytes);
    }
  });

  test('values just below a unit boundary round into the next unit, never to "1024" of the smaller one', () => {
    // 1048575 B is 1023.999 KiB: three significant digits make it 1.00 MiB, not "1024 KiB".
    expect(formatBytes(MiB - 1)).toBe('1.00 MiB');
    expect(formatBytes(GiB - 1)).toBe('1.00 GiB');
    // 10239 B is 9.999 KiB: shown with the precision of the 10..99 range.
    expect(formatBytes(10 * KiB - 1)).toBe('10.0 KiB');
  });
});

describe('IdPrefixSet', () => {
  test('an empty set has nothing', () => {
    const set = new IdPrefixSet();
    expect(set.has(randomBytes(32))).toBe(false);
    expect(set.has(Buffer.alloc(32))).toBe(false);
  });

  test('many random ids: every added id is found, other ids are not', () => {
    const set = new IdPrefixSet();
    const added: Buffer[] = [];
    for (let i = 0; i < 20_000; i += 1) {
      const id = randomBytes(32);
      added.push(id);
      set.add(id);
    }
    for (const id of added) expect(set.has(id)).toBe(true);
    let falsePositives = 0;
    for (let i = 0; i < 20_000; i += 1) if (set.has(randomBytes(32))) falsePositives += 1;
    expect(falsePositives).toBe(0);
  });

  test('adding after a lookup re-sorts: interleaved add and has', () => {
    const set = new IdPrefixSet();
    const added: Buffer[] = [];
    for (let round = 0; round < 50; round += 1) {
      for (let i = 0; i < 97; i += 1) {
        const id = randomBytes(32);
        added.push(id);
        set.add(id);
      }
      // Check a sample including the newest ids, which sit unsorted at the end until has() sorts.
      for (const id of [...added.slice(-97), ...added.slice(0, 10)]) expect(set.has(id)).toBe(true);
      expect(set.has(randomBytes(32))).toBe(false);
    }
    for (const id of added) expect(set.has(id)).toBe(true);
  });

  test('extreme prefixes (0 and 2^64-1) and ids with the top bit set compare as unsigned', () => {
    const set = new IdPrefixSet();
    const low = Buffer.alloc(32);
    const high = Buffer.alloc(32, 0xff);
    const topBit = Buffer.alloc(32);
    topBit[0] = 0x80;
    const belowTop = Buffer.alloc(32, 0xff);
    belowTop[0] = 0x7f;
    for (const id of [high, topBit, low]) set.add(id);
    for (let i = 0; i < 2000; i += 1) set.add(randomBytes(32));
    expect(set.has(low)).toBe(true);
    expect(set.has(high)).toBe(true);
    expect(set.has(topBit)).toBe(true);
    expect(set.has(belowTop)).toBe(false);
    const almostHigh = Buffer.alloc(32, 0xff);
    almostHigh[7] = 0xfe;
    expect(set.has(almostHigh)).toBe(false);
  });

  test('duplicates are harmless, and ids are keyed by their first 8 bytes only', () => {
    const set = new IdPrefixSet();
    const id = randomBytes(32);
    for (let i = 0; i < 3000; i += 1) set.add(id);
    expect(set.has(id)).toBe(true);
    const samePrefix = Buffer.concat([id.subarray(0, 8), randomBytes(24)]);
    expect(set.has(samePrefix)).toBe(true);
    const otherPrefix = Buffer.from(id);
    otherPrefix[7]! ^= 0x01;
    expect(set.has(otherPrefix)).toBe(false);
  });
});
