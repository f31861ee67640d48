/**
 * A frame is one stored blob inside a pack, self-describing so that the index can be rebuilt from the
 * packs alone:
 *
 *   header (48 B) || payload (storedLength B) || xxh64(header || payload) (8 B, little-endian)
 *
 * See SPEC.md, "Frame", for the byte table. In an encrypted repository the payload is
 * nonce || AES-256-GCM(lz4, zstd or plain) || tag and flag bit 1 is set (SPEC.md, section 18.3).
 */
import {
  FRAME_HEADER_SIZE,
  FRAME_MAGIC,
  FRAME_OVERHEAD,
  FRAME_TRAILER_SIZE,
  ID_SIZE,
  KIND_DATA,
  KIND_MAP_LEAF,
  KIND_MAP_NODE,
  KNOWN_FRAME_FLAGS,
  KNOWN_ENCRYPTED_FRAME_FLAGS,
  ENCRYPTION_OVERHEAD,
  FLAG_ENCRYPTED,
  COMPRESSION_FLAGS,
  FLAG_LZ4,
  FLAG_ZSTD,
  MAX_FRAME_RAW_LENGTH,
} from './constants.js';
import { checksum64 } from './checksum.js';

export interface FrameHeader {
  kind: number;
  flags: number;
  rawLength: number;
  storedLength: number;
  id: Buffer;
}

/** Writes the 48-byte header into `target` at `at`. */
export function encodeFrameHeader(header: FrameHeader, target: Buffer, at = 0): void {
  target.writeUInt32LE(FRAME_MAGIC, at);
  target.writeUInt8(header.kind, at + 4);
  target.writeUInt8(header.flags, at + 5);
  target.writeUInt16LE(0, at + 6);
  target.writeUInt32LE(header.rawLength, at + 8);
  target.writeUInt32LE(header.storedLength, at + 12);
  header.id.copy(target, at + 16, 0, ID_SIZE);
}

/**
 * Parses and bounds-checks a header; returns a reason string instead of throwing so callers can add context.
 * `encrypted`: the repository is encrypted, so every frame must carry FLAG_ENCRYPTED and its payload is
 * the inner payload plus 28 bytes (nonce and tag); in a plain repository the flag is not allowed.
 */
export function decodeFrameHeader(source: Buffer, at = 0, encrypted = false): FrameHeader | string {
  if (source.length - at < FRAME_HEADER_SIZE) return 'frame header is cut short';
  if (source.readUInt32LE(at) !== FRAME_MAGIC) return 'bad frame magic';
  const kind = source.readUInt8(at + 4);
  if (kind !== KIND_DATA && kind !== KIND_MAP_LEAF && kind !== KIND_MAP_NODE) return `unknown frame kind ${kind}`;
  const flags = source.readUInt8(at + 5);
  if ((flags & ~(encrypted ? KNOWN_ENCRYPTED_FRAME_FLAGS : KNOWN_FRAME_FLAGS)) !== 0) return `unknown frame flags 0x${flags.toString(16)}`;
  if (encrypted && (flags & FLAG_ENCRYPTED) === 0) return 'frame is not encrypted, in an encrypted repository';
  if ((flags & FLAG_LZ4) !== 0 && (flags & FLAG_ZSTD) !== 0) return 'frame flags name two compressions (lz4 and zstd)';
  if (source.readUInt16LE(at + 6) !== 0) return 'reserved header bytes are not zero';
  const rawLength = source.readUInt32LE(at + 8);
  const storedLength = source.readUInt32LE(at + 12);
  if (rawLength === 0 || rawLength > MAX_FRAME_RAW_LENGTH) return `impossible raw length ${rawLength}`;
  const innerLength = encrypted ? storedLength - ENCRYPTION_OVERHEAD : storedLength;
  if (innerLength <= 0 || innerLength > rawLength) return `impossible stored length ${storedLength} for raw length ${rawLength}`;
  if ((flags & COMPRESSION_FLAGS) === 0 && innerLength !== rawLength) return 'uncompressed frame whose stored and raw lengths differ';
  const id = Buffer.from(source.subarray(at + 16, at + 16 + ID_SIZE));
  return { kind, flags, rawLength, storedLength, id };
}

export function frameLength(storedLength: number): number {
  return FRAME_OVERHEAD + storedLength;
}

/** Writes the header for a payload of `storedLength` bytes and the checksum after it; the payload must already be in place. */
export function finishFrame(header: FrameHeader, target: Buffer, at = 0): number {
  encodeFrameHeader(header, target, at);
  const end = at + FRAME_HEADER_SIZE + header.storedLength;
  target.writeBigUInt64LE(checksum64(target.subarray(at, end)), end);
  return end + FRAME_TRAILER_SIZE - at;
}

/**
 * Assembles a whole frame into `target` (which must hold frameLength(payload.length) bytes from `at`)
 * and returns its length. The checksum covers header and payload.
 */
export function encodeFrame(header: Omit<FrameHeader, 'storedLength'>, payload: Uint8Array, target: Buffer, at = 0): number {
  target.set(payload, at + FRAME_HEADER_SIZE);
  return finishFrame({ ...header, storedLength: payload.length }, target, at);
}

/** Checks a whole frame held in `frame` (exactly one frame); returns its header and payload or a reason. */
export function decodeFrame(frame: Buffer, encrypted = false): { header: FrameHeader; payload: Buffer } | string {
  const header = decodeFrameHeader(frame, 0, encrypted);
  if (typeof header === 'string') return header;
  const expected = frameLength(header.storedLength);
  if (frame.length !== expected) return `frame is ${frame.length} bytes, its header says ${expected}`;
  const end = FRAME_HEADER_SIZE + header.storedLength;
  const stored = frame.readBigUInt64LE(end);
  if (checksum64(frame.subarray(0, end)) !== stored) return 'checksum mismatch';
  return { header, payload: frame.subarray(FRAME_HEADER_SIZE, end) };
}
