/**
 * verify --read-data's worker task (verify-pack) with several tasks at once on one worker thread, as piscina runs
 * them (concurrentTasksPerWorker): each task must check its own frames' bytes. Once a thread had one frame buffer
 * for all its verify tasks: while one task awaited a zstd decode of its frame, another read its frame into the same
 * buffer, and good frames were reported damaged (or, with a read that awaits, a damaged frame passed as another's).
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initChecksum } from '../dist/repo-format/checksum.js';
import { FRAME_HEADER_SIZE, KIND_DATA } from '../dist/repo-format/constants.js';
import { sealBlobToBuffer, sha256 } from '../dist/repo-format/blob-codec.js';
import { LZ4, type Compression } from '../dist/repo-format/compression.js';
import { localFrameLocator } from '../dist/repo-format/frame-locator.js';
import { BlockPool } from '../dist/engine/pipeline/block-pool.js';

const KiB = 1024;
const BLOCK = 256 * KiB;
const PACKS = 12;
const FRAMES = 24;

let dir: string;
beforeAll(async () => {
  await initChecksum();
  dir = mkdtempSync(join(tmpdir(), 'engine-verify-tasks-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A pack file of FRAMES frames of distinct compressible blocks; every frame with (p + i) % 5 === 0 damaged. */
function pack(p: number, codec: Compression): { file: string; size: number; frames: { offset: number; length: number }[]; damaged: number[] } {
  const frames: { offset: number; length: number }[] = [];
  const damaged: number[] = [];
  const parts: Buffer[] = [];
  let offset = 0;
  for (let i = 0; i < FRAMES; i++) {
    const raw = Buffer.alloc(BLOCK, `pack ${String(p).padStart(3, '0')} frame ${String(i).padStart(3, '0')}: the quick brown fox jumps over the lazy dog ${p * i}\n`);
    const frame = sealBlobToBuffer(KIND_DATA, sha256(raw), raw, undefined, codec);
    if ((p + i) % 5 === 0) {
      // A byte of the payload flipped: the frame's xxh64 no longer matches.
      frame[FRAME_HEADER_SIZE + Math.floor((frame.length - FRAME_HEADER_SIZE) / 2)] ^= 0x40;
      damaged.push(offset);
    }
    frames.push({ offset, length: frame.length });
    parts.push(frame);
    offset += frame.length;
  }
  const file = join(dir, `${codec.codec}-${p}.pack`);
  writeFileSync(file, Buffer.concat(parts));
  return { file, size: offset, frames, damaged };
}

describe('verify-pack tasks in flight together on one worker', () => {
  test.each([['zstd', { codec: 'zstd', level: 1 } as Compression], ['lz4', LZ4]] as const)('%s: each pack reports exactly its damaged frames, round after round', async (_name, codec) => {
    const packs = Array.from({ length: PACKS }, (_, p) => pack(p, codec));
    // One worker: every task shares its thread, up to concurrentTasksPerWorker (4) at once.
    const pool = new BlockPool({ blockSize: BLOCK, workers: 1, slotCount: 1 });
    try {
      for (let round = 0; round < 4; round++) {
        const results = await Promise.all(packs.map((p) => pool.verifyLocatedPack(localFrameLocator(p.file, 0, p.size), p.frames)));
        results.forEach((result, i) => expect({ pack: i, bad: result.bad.map((b) => b.offset) }).toEqual({ pack: i, bad: packs[i]!.damaged }));
        for (const result of results) for (const { why } of result.bad) expect(why).toMatch(/checksum|xxh64/i);
      }
    } finally {
      await pool.close();
    }
  });
});
