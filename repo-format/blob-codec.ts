/**
 * Turns plaintext into a stored frame and back, with every check a reader owes the data:
 * frame checksum (xxh64) first, then lz4 decompression with a bounded size, then SHA-256 against the id.
 * Used by the hashing workers (data chunks) and by the main thread (map pages) alike.
 */
import { createHash } from 'node:crypto';
import { compressSync, uncompressSync } from 'lz4-napi';
import { FLAG_LZ4, FRAME_OVERHEAD, ID_SIZE } from './constants.js';
import { decodeFrame, encodeFrame, type FrameHeader } from './frame.js';

export function sha256(data: Uint8Array): Buffer {
  return createHash('sha256').update(data).digest();
}

/** Size of the lz4-napi block prefix: the uncompressed length as a little-endian u32. */
const LZ4_SIZE_PREFIX = 4;

/**
 * Writes the frame for `raw` into `target` at `at` and returns the frame length. lz4 is kept only when
 * it makes the payload smaller; otherwise the plaintext is stored. `target` needs FRAME_OVERHEAD + raw.length bytes.
 */
export function sealBlob(kind: number, id: Buffer, raw: Buffer, target: Buffer, at = 0): number {
  const compressed = compressSync(raw);
  if (compressed.length < raw.length) {
    return encodeFrame({ kind, flags: FLAG_LZ4, rawLength: raw.length, id }, compressed, target, at);
  }
  return encodeFrame({ kind, flags: 0, rawLength: raw.length, id }, raw, target, at);
}

export function sealBlobToBuffer(kind: number, id: Buffer, raw: Buffer): Buffer {
  const target = Buffer.allocUnsafe(FRAME_OVERHEAD + raw.length);
  const length = sealBlob(kind, id, raw, target);
  return target.subarray(0, length);
}

export interface OpenedBlob {
  header: FrameHeader;
  plaintext: Buffer;
}

/**
 * Checks and opens one frame. Returns a reason string on any failure: the caller knows the pack and
 * offset and turns it into a CorruptFrameError that names them.
 */
export function openBlob(frame: Buffer, expectedId?: Buffer): OpenedBlob | string {
  const decoded = decodeFrame(frame);
  if (typeof decoded === 'string') return decoded;
  const { header, payload } = decoded;
  if (expectedId && !expectedId.equals(header.id)) return 'frame holds a different blob than the index says';
  let plaintext: Buffer;
  if ((header.flags & FLAG_LZ4) !== 0) {
    // The prefix is covered by the checksum, but check it anyway: it sizes lz4's output allocation.
    if (payload.length < LZ4_SIZE_PREFIX || payload.readUInt32LE(0) !== header.rawLength) return 'lz4 size prefix disagrees with the frame header';
    try {
      plaintext = uncompressSync(payload);
    } catch (error) {
      return `lz4 payload does not decompress (${(error as Error).message})`;
    }
    if (plaintext.length !== header.rawLength) return `decompressed to ${plaintext.length} bytes, expected ${header.rawLength}`;
  } else {
    plaintext = payload;
  }
  const actual = sha256(plaintext);
  if (!actual.equals(header.id.subarray(0, ID_SIZE))) return 'SHA-256 of the plaintext does not match the blob id';
  return { header, plaintext };
}
