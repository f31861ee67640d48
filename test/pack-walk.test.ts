/**
 * The pack resync walk repair uses (walkPackBytes), case by case on packs built in memory: a damaged pack
 * header, a damaged frame header, a frame whose content fails, a pack cut inside a frame, garbage between
 * frames, the frame magic inside a payload (never taken for a frame while the walk is in step), and a
 * whole frame embedded in a payload. Each asserts exactly which frames are good and where damage is.
 */
import { describe, expect, test } from 'vitest';
import { initChecksum } from '../dist/repo-format/checksum.js';
import { decodeFrame, encodeFrame } from '../dist/repo-format/frame.js';
import { encodePackHeader, walkPackBytes } from '../dist/repo-format/pack-file.js';
import { FRAME_HEADER_SIZE, FRAME_MAGIC, FRAME_OVERHEAD, ID_SIZE, KIND_DATA, PACK_HEADER_SIZE } from '../dist/repo-format/constants.js';

await initChecksum();

const PACK = 'c0ffee00c0ffee00c0ffee00c0ffee00';
const MAGIC = Buffer.alloc(4);
MAGIC.writeUInt32LE(FRAME_MAGIC, 0);

function frame(n: number, payload: Buffer = Buffer.alloc(200, n)): Buffer {
  const id = Buffer.alloc(ID_SIZE, n);
  const target = Buffer.alloc(FRAME_OVERHEAD + payload.length);
  encodeFrame({ kind: KIND_DATA, flags: 0, rawLength: payload.length, id }, payload, target);
  return target;
}

/** The pack's bytes and the offset of each piece after the header. */
function pack(...pieces: Buffer[]): { bytes: Buffer; at: number[] } {
  const at: number[] = [];
  let offset = PACK_HEADER_SIZE;
  for (const piece of pieces) {
    at.push(offset);
    offset += piece.length;
  }
  return { bytes: Buffer.concat([encodePackHeader(PACK), ...pieces]), at };
}

const check = (bytes: Buffer): string | undefined => {
  const decoded = decodeFrame(bytes);
  return typeof decoded === 'string' ? decoded : undefined;
};

function walk(bytes: Buffer) {
  const { good, damage } = walkPackBytes(bytes, PACK, check);
  return {
    good: good.map((f) => ({ offset: f.offset, id: f.header.id[0] })),
    damage: damage.map((d) => ({ offset: d.offset, why: d.why, frameId: d.frame?.header.id[0] })),
  };
}

describe('walkPackBytes', () => {
  test('an intact pack: every frame good, in order, no damage', () => {
    const { bytes, at } = pack(frame(1), frame(2), frame(3));
    expect(walk(bytes)).toEqual({ good: [1, 2, 3].map((id, i) => ({ offset: at[i], id })), damage: [] });
  });

  test('a damaged pack header is damage at offset 0; the frames behind it are still found', () => {
    const { bytes, at } = pack(frame(1), frame(2));
    bytes[0] = bytes[0]! ^ 0xff;
    expect(walk(bytes)).toEqual({ good: [{ offset: at[0], id: 1 }, { offset: at[1], id: 2 }], damage: [{ offset: 0, why: 'bad pack magic', frameId: undefined }] });
  });

  test('a damaged frame header: one damage where it was, the walk finds the next frame by its magic', () => {
    const { bytes, at } = pack(frame(1), frame(2), frame(3));
    bytes[at[1]!] = bytes[at[1]!]! ^ 0xff; // frame 2's magic
    expect(walk(bytes)).toEqual({ good: [{ offset: at[0], id: 1 }, { offset: at[2], id: 3 }], damage: [{ offset: at[1], why: 'bad frame magic', frameId: undefined }] });
  });

  test('a frame whose content fails its checks: damage naming the blob its header names, the next frame right behind it', () => {
    const { bytes, at } = pack(frame(1), frame(2), frame(3));
    bytes[at[1]! + 100] = bytes[at[1]! + 100]! ^ 0x01; // a payload byte of frame 2
    expect(walk(bytes)).toEqual({ good: [{ offset: at[0], id: 1 }, { offset: at[2], id: 3 }], damage: [{ offset: at[1], why: 'checksum mismatch', frameId: 2 }] });
  });

  test('a pack cut inside its last frame: the frames before it good, the cut frame damage', () => {
    const { bytes, at } = pack(frame(1), frame(2));
    const cut = bytes.subarray(0, at[1]! + 60);
    const result = walk(cut);
    expect(result.good).toEqual([{ offset: at[0], id: 1 }]);
    expect(result.damage).toEqual([{ offset: at[1], why: `frame of ${FRAME_OVERHEAD + 200} bytes runs past the end of the pack (${cut.length} bytes): truncated`, frameId: undefined }]);
  });

  test('garbage between frames: one damage for the whole stretch, the frame behind it found at its shifted place', () => {
    const garbage = Buffer.alloc(333, 0x5a);
    const { bytes, at } = pack(frame(1), garbage, frame(2));
    expect(walk(bytes)).toEqual({ good: [{ offset: at[0], id: 1 }, { offset: at[2], id: 2 }], damage: [{ offset: at[1], why: 'bad frame magic', frameId: undefined }] });
  });

  test('the frame magic inside a payload: never a frame while the walk is in step; in a damaged stretch, passed over', () => {
    // Frame 2's payload holds the magic twice, once followed by bytes that are no frame header.
    const payload = Buffer.concat([Buffer.alloc(50, 7), MAGIC, Buffer.alloc(50, 7), MAGIC, Buffer.alloc(92, 9)]);
    const { bytes, at } = pack(frame(1), frame(2, payload), frame(3));
    expect(walk(bytes).damage).toEqual([]);
    expect(walk(bytes).good.map((f) => f.id)).toEqual([1, 2, 3]);
    // With frame 2's header damaged, the search meets the magics in its payload: they do not parse, and the
    // damaged stretch stays one damage until frame 3.
    bytes[at[1]! + 4] = 0xee; // frame 2's kind
    expect(walk(bytes)).toEqual({ good: [{ offset: at[0], id: 1 }, { offset: at[2], id: 3 }], damage: [{ offset: at[1], why: 'unknown frame kind 238', frameId: undefined }] });
  });

  test('a whole valid frame inside a payload is found only when the walk has lost step (it is then a real frame)', () => {
    const inner = frame(9, Buffer.alloc(40, 9));
    const payload = Buffer.concat([Buffer.alloc(20, 1), inner, Buffer.alloc(20, 1)]);
    const { bytes, at } = pack(frame(1), frame(2, payload), frame(3));
    expect(walk(bytes).good.map((f) => f.id)).toEqual([1, 2, 3]);
    bytes[at[1]!] = bytes[at[1]!]! ^ 0xff;
    const lost = walk(bytes);
    expect(lost.good).toEqual([{ offset: at[0], id: 1 }, { offset: at[1]! + FRAME_HEADER_SIZE + 20, id: 9 }, { offset: at[2], id: 3 }]);
    expect(lost.damage).toEqual([{ offset: at[1], why: 'bad frame magic', frameId: undefined }, { offset: at[1]! + FRAME_HEADER_SIZE + 20 + inner.length, why: 'bad frame magic', frameId: undefined }]);
  });

  test('nothing but a header, or less: no frames, and only a short header is damage', () => {
    expect(walk(encodePackHeader(PACK))).toEqual({ good: [], damage: [] });
    expect(walk(encodePackHeader(PACK).subarray(0, 10))).toEqual({ good: [], damage: [{ offset: 0, why: 'pack header is cut short', frameId: undefined }] });
  });
});
