/**
 * Seeded, reproducible disk images that look like VM disks, for the demo, the tests and bench/:
 * 256 KiB pieces of zeros (left as holes), text, binary-like data, random data, and copies of earlier
 * 1 MiB runs (duplicated files). Randomness comes from AES-128-CTR keyed by the seed: fast and the
 * same on every machine.
 */
import { createCipheriv, createHash } from 'node:crypto';
import { open } from 'node:fs/promises';
import { MUTABLE_FILE_MODE, openNewFile } from '../../repo-format/file-modes.js';

const PIECE = 256 * 1024;
const RUN = 1024 * 1024;
/** Duplicates copy from the last WINDOW_PIECES pieces written (64 MiB), which the writer keeps in memory. */
const WINDOW_PIECES = 256;

export interface ImageMix {
  zero: number;
  text: number;
  binary: number;
  random: number;
  duplicate: number;
}

/** Shares of the disk by kind: roughly an installed OS plus user data, a third free space, some duplicated files. */
export const VM_DISK_MIX: ImageMix = { zero: 0.3, text: 0.2, binary: 0.2, random: 0.15, duplicate: 0.15 };

export class SeededRandom {
  private readonly cipher;
  private readonly zeros = Buffer.alloc(PIECE);

  constructor(seed: string) {
    const key = createHash('sha256').update(seed).digest();
    this.cipher = createCipheriv('aes-128-ctr', key.subarray(0, 16), key.subarray(16, 32));
  }

  bytes(length: number): Buffer {
    const out = Buffer.allocUnsafe(length);
    for (let at = 0; at < length; at += PIECE) {
      const n = Math.min(PIECE, length - at);
      this.cipher.update(this.zeros.subarray(0, n)).copy(out, at);
    }
    return out;
  }

  /** A float in [0, 1). */
  next(): number {
    return this.bytes(6).readUIntBE(0, 6) / 2 ** 48;
  }

  below(limit: number): number {
    return Math.floor(this.next() * limit);
  }
}

const WORDS = (
  'the of and to in is that for it as was with be by on not he this are or his from at which but have an they you were her ' +
  'kernel module config service network storage volume backup restore snapshot system user error warning info debug ' +
  'lib usr share bin etc var log tmp home root boot proc sys dev run srv opt mnt media 0 1 2 3 4 5 6 7 8 9 10 100 1024'
).split(' ');

function textCorpus(random: SeededRandom, length: number): Buffer {
  const parts: string[] = [];
  let size = 0;
  const choices = random.bytes(length);
  let i = 0;
  while (size < length) {
    const word = WORDS[choices[i % choices.length]! % WORDS.length]!;
    const sep = choices[(i + 1) % choices.length]! % 13 === 0 ? '\n' : ' ';
    parts.push(word, sep);
    size += word.length + 1;
    i += 2;
  }
  return Buffer.from(parts.join(''), 'latin1').subarray(0, length);
}

export class ImageContent {
  private readonly random: SeededRandom;
  private readonly corpus: Buffer;
  private readonly written: number[] = [];
  private copyFrom: number | undefined;
  private kind: 'zero' | 'text' | 'binary' | 'random' | 'duplicate' | undefined;
  private zeroRunsLeft = 0;

  constructor(
    seed: string,
    private readonly mix: ImageMix = VM_DISK_MIX,
  ) {
    this.random = new SeededRandom(seed);
    this.corpus = textCorpus(new SeededRandom(`${seed}/corpus`), 4 * 1024 * 1024);
  }

  /**
   * The next piece of `length` bytes at `offset`, or null for zeros. The kind is chosen once per 1 MiB
   * run (free space comes in long zero runs of 1–16 MiB; a duplicated file copies a whole earlier run),
   * and each piece of a run gets fresh content of that kind.
   */
  piece(offset: number, length: number, read: (offset: number, length: number) => Buffer | undefined): Buffer | null {
    if (offset % RUN === 0 || this.kind === undefined) this.startRun();
    if (this.kind === 'zero') return null;
    if (this.kind === 'duplicate') {
      const copied = read(this.copyFrom! + (offset % RUN), length);
      if (copied) return copied;
    }
    let data: Buffer;
    if (this.kind === 'text') {
      const start = this.random.below(this.corpus.length - length);
      data = Buffer.from(this.corpus.subarray(start, start + length));
      const noise = this.random.bytes(64);
      for (let k = 0; k < noise.length; k += 2) data[(noise[k]! * 4099) % length] = noise[k + 1]!;
    } else if (this.kind === 'binary') {
      data = this.random.bytes(length);
      const runs = this.random.bytes(Math.ceil(length / 64));
      for (let k = 0; k < runs.length; k += 1) if (runs[k]! < 128) data.fill(0, k * 64, k * 64 + 64);
    } else {
      data = this.random.bytes(length);
    }
    if (offset % RUN === 0) {
      this.written.push(offset);
      if (this.written.length > WINDOW_PIECES / 4) this.written.shift();
    }
    return data;
  }

  private startRun(): void {
    if (this.kind === 'zero' && this.zeroRunsLeft > 0) {
      this.zeroRunsLeft -= 1;
      return;
    }
    const pick = this.random.next();
    const { zero, text, binary, random } = this.mix;
    // Zero runs average 8 MiB, so pick them 8 times less often to keep the mix's share of zeros.
    const zeroPick = zero / 8 / (zero / 8 + (1 - zero));
    if (pick < zeroPick) {
      this.kind = 'zero';
      this.zeroRunsLeft = this.random.below(16);
      return;
    }
    const rest = (pick - zeroPick) / (1 - zeroPick) * (1 - zero);
    if (rest < text) this.kind = 'text';
    else if (rest < text + binary) this.kind = 'binary';
    else if (rest < text + binary + random || this.written.length === 0) this.kind = 'random';
    else {
      this.kind = 'duplicate';
      this.copyFrom = this.written[this.random.below(this.written.length)]!;
    }
  }
}

export interface GeneratedImage {
  path: string;
  size: number;
  dataBytes: number;
}

/** Writes a sparse image of `size` bytes (any size, not only multiples of the piece size); `signal` stops it. */
export async function generateImage(path: string, size: number, seed: string, mix: ImageMix = VM_DISK_MIX, signal?: AbortSignal): Promise<GeneratedImage> {
  const content = new ImageContent(seed, mix);
  const handle = await openNewFile(path, 'w', MUTABLE_FILE_MODE);
  let dataBytes = 0;
  try {
    await handle.truncate(size);
    // Duplicates copy earlier pieces; keep a bounded window of recent ones in memory to copy from.
    const recent = new Map<number, Buffer>();
    for (let offset = 0; offset < size && signal?.aborted !== true; offset += PIECE) {
      const length = Math.min(PIECE, size - offset);
      const data = content.piece(offset, length, (from, n) => {
        const earlier = recent.get(from);
        return earlier && earlier.length >= n ? Buffer.from(earlier.subarray(0, n)) : undefined;
      });
      if (data === null) continue;
      await handle.write(data, 0, length, offset);
      dataBytes += length;
      recent.set(offset, data);
      if (recent.size > WINDOW_PIECES + 4) recent.delete(recent.keys().next().value as number);
    }
  } finally {
    await handle.close();
  }
  return { path, size, dataBytes };
}

export interface Mutation {
  offset: number;
  length: number;
}

/**
 * Overwrites about `fraction` of the image with random writes of 4 KiB–1 MiB (4 KiB aligned, as a guest
 * filesystem writes), and returns what it wrote.
 */
export async function mutateImage(path: string, fraction: number, seed: string): Promise<Mutation[]> {
  const random = new SeededRandom(seed);
  const handle = await open(path, 'r+');
  const writes: Mutation[] = [];
  try {
    const { size } = await handle.stat();
    let budget = Math.floor(size * fraction);
    while (budget > 0) {
      const length = Math.min(budget, 4096 * (1 + random.below(256)));
      const offset = Math.min(size - length, random.below(Math.floor(size / 4096)) * 4096);
      await handle.write(random.bytes(length), 0, length, offset);
      writes.push({ offset, length });
      budget -= length;
    }
  } finally {
    await handle.close();
  }
  return writes;
}
