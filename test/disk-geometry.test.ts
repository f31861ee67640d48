/**
 * The disk geometry every map reader and writer uses (repo-format/disk-geometry.ts): block counts, offsets,
 * the last short block, the blocks of a range. Checked against BigInt arithmetic, with sizes past 2^32 (where
 * a bitwise operator would wrap) and up to 2^53 - 1 (the largest safe integer). No root, no qemu.
 */
import { describe, expect, test } from 'vitest';
import fc from 'fast-check';
import { DiskGeometry, blockAt, blockCount, blockOffset } from '../dist/repo-format/disk-geometry.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const MAX_SAFE = Number.MAX_SAFE_INTEGER; // 2^53 - 1

/** The reference: exact integer arithmetic. */
const exact = {
  count: (size: number, bs: number): number => Number((BigInt(size) + BigInt(bs) - 1n) / BigInt(bs)),
  at: (offset: number, bs: number): number => Number(BigInt(offset) / BigInt(bs)),
  length: (size: number, bs: number, block: number): number => {
    const rest = BigInt(size) - BigInt(block) * BigInt(bs);
    return Number(rest < BigInt(bs) ? rest : BigInt(bs));
  },
};

describe('DiskGeometry', () => {
  test('a disk of whole blocks, one with a short last block, an empty disk', () => {
    const whole = new DiskGeometry(4 * MiB, MiB);
    expect([whole.blocks, whole.offsetOf(3), whole.lengthOf(3), whole.bytesOf(0, 4)]).toEqual([4, 3 * MiB, MiB, 4 * MiB]);
    const short = new DiskGeometry(4 * MiB + 512, MiB);
    expect([short.blocks, short.offsetOf(4), short.lengthOf(4), short.lengthOf(3)]).toEqual([5, 4 * MiB, 512, MiB]);
    expect(short.bytesOf(3, 2)).toBe(MiB + 512);
    expect(short.bytesOf(4, 1)).toBe(512);
    expect(short.bytesOf(2, 0)).toBe(0);
    const empty = new DiskGeometry(0, MiB);
    expect([empty.blocks, empty.bytesOf(0, 0)]).toEqual([0, 0]);
    expect(empty.blocksTouched(0, 10)).toEqual({ first: 0, end: 0 });
  });

  test('the blocks a range touches, clipped to the disk', () => {
    const g = new DiskGeometry(10 * MiB + 7, MiB);
    expect(g.blocksTouched(0, 1)).toEqual({ first: 0, end: 1 });
    expect(g.blocksTouched(MiB - 1, 2)).toEqual({ first: 0, end: 2 });
    expect(g.blocksTouched(MiB, MiB)).toEqual({ first: 1, end: 2 });
    expect(g.blocksTouched(10 * MiB, 100 * MiB)).toEqual({ first: 10, end: 11 });
    expect(g.blocksTouched(5 * MiB, 0)).toEqual({ first: 0, end: 0 });
    expect(g.blocksTouched(20 * MiB, MiB)).toEqual({ first: 0, end: 0 });
  });

  test('past 2^32: offsets and counts do not wrap (no bitwise operator on them)', () => {
    const size = 2 ** 32 + 5;
    const bytes = new DiskGeometry(size, 1);
    expect([bytes.blocks, bytes.blockAt(2 ** 32 + 4), bytes.offsetOf(2 ** 32 + 1), bytes.lengthOf(2 ** 32 + 4)]).toEqual([size, 2 ** 32 + 4, 2 ** 32 + 1, 1]);
    const big = new DiskGeometry(5 * 2 ** 40 + 3, 64 * KiB); // 5 TiB and 3 bytes
    expect(big.blocks).toBe(5 * 2 ** 24 + 1);
    expect(big.offsetOf(big.blocks - 1)).toBe(5 * 2 ** 40);
    expect(big.lengthOf(big.blocks - 1)).toBe(3);
    expect(big.blocksTouched(2 ** 33 - 1, 2)).toEqual({ first: 2 ** 17 - 1, end: 2 ** 17 + 1 });
  });

  test('up to 2^53 - 1: the largest safe size, with power-of-two and other block sizes', () => {
    for (const bs of [64 * KiB, MiB, 16 * MiB, 3 * MiB, 1_000_003, 7]) {
      const g = new DiskGeometry(MAX_SAFE, bs);
      expect(g.blocks, `block size ${bs}`).toBe(exact.count(MAX_SAFE, bs));
      const last = g.blocks - 1;
      expect(g.lengthOf(last)).toBe(exact.length(MAX_SAFE, bs, last));
      expect(g.offsetOf(last) + g.lengthOf(last)).toBe(MAX_SAFE);
      expect(g.blockAt(MAX_SAFE - 1)).toBe(last);
      expect(g.bytesOf(0, g.blocks)).toBe(MAX_SAFE);
    }
  });

  test('agrees with exact integer arithmetic for any safe size, block size and offset', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: MAX_SAFE }), fc.integer({ min: 1, max: 2 ** 30 }), fc.double({ min: 0, max: 1, noNaN: true }), (size, bs, where) => {
        const g = new DiskGeometry(size, bs);
        expect(g.blocks).toBe(exact.count(size, bs));
        expect(blockCount(size, bs)).toBe(g.blocks);
        if (size === 0) return;
        const offset = Math.min(size - 1, Math.floor(where * size));
        const block = g.blockAt(offset);
        expect(block).toBe(exact.at(offset, bs));
        expect(blockAt(offset, bs)).toBe(block);
        expect(blockOffset(block, bs)).toBe(Number(BigInt(block) * BigInt(bs)));
        expect(g.lengthOf(block)).toBe(exact.length(size, bs, block));
        expect(g.offsetOf(block) <= offset && offset < g.offsetOf(block) + g.lengthOf(block)).toBe(true);
        const { first, end } = g.blocksTouched(offset, size - offset);
        expect([first, end]).toEqual([block, g.blocks]);
        expect(g.bytesOf(first, end - first)).toBe(size - g.offsetOf(block));
      }),
      { numRuns: 5000 },
    );
  });

  test('refuses sizes that are not safe whole numbers', () => {
    expect(() => new DiskGeometry(2 ** 53, MiB)).toThrow(RangeError);
    expect(() => new DiskGeometry(-1, MiB)).toThrow(RangeError);
    expect(() => new DiskGeometry(1.5, MiB)).toThrow(RangeError);
    expect(() => new DiskGeometry(MiB, 0)).toThrow(RangeError);
  });
});
