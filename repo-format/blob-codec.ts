/**
 * Turns plaintext into a stored frame and back, with every check a reader owes the data:
 * frame checksum (xxh64) first, then (encrypted repositories) AES-256-GCM decryption and its tag, then lz4
 * or zstd decompression (compression.ts) with a bounded size, then the blob id: SHA-256, or HMAC-SHA256 under the id key.
 * Used by the hashing workers (data chunks) and by the main thread (map pages) alike. `keys` is given
 * exactly when the repository is encrypted.
 */
import { hash } from 'node:crypto';
import { COMPRESSION_FLAGS, ENCRYPTION_OVERHEAD, FLAG_ENCRYPTED, FLAG_ZSTD, FRAME_HEADER_SIZE, FRAME_OVERHEAD, ID_SIZE } from './constants.js';
import { compressionFlag, compressTransient, decompress, lz4CompressInto, worthCompressing, worthCompressingZstd, zstdHeaderProblem, type Compression, type ZstdStreams } from './compression.js';
import { EngineError } from './errors.js';
import { decodeFrame, encodeFrame, encodeFrameHeader, finishFrame, type FrameHeader } from './frame.js';
import { gcmOpen, gcmSealInto, keyedId, type RepositoryKeys } from './crypto.js';

/** One-shot (crypto.hash): no Hash object per block (~3% of SHA-256's CPU on 1 MiB blocks, measured). */
export function sha256(data: Uint8Array): Buffer {
  return hash('sha256', data, 'buffer');
}

/** The id of a blob: SHA-256 of its plaintext, or in an encrypted repository HMAC-SHA256 under the id key. */
export function blobId(data: Uint8Array, keys?: RepositoryKeys): Buffer {
  return keys ? keyedId(keys.idKey, data) : sha256(data);
}

/** Bytes a frame of `rawLength` plaintext bytes may need at most (incompressible, and encrypted when `keys`). */
export function maxFrameLength(rawLength: number, keys?: RepositoryKeys): number {
  return FRAME_OVERHEAD + rawLength + (keys ? ENCRYPTION_OVERHEAD : 0);
}

/**
 * Writes the frame for `raw` into `target` at `at` and returns the frame length. The repository's
 * `compression` is tried when its probe says the blob may compress (worthCompressing), and kept only when it
 * makes the payload smaller; otherwise the plaintext is stored. With `keys`, that payload is sealed with
 * AES-256-GCM, the 48-byte frame header as authenticated data. `target` needs maxFrameLength(raw.length, keys) bytes.
 * `compression` has no default: every writer names its repository's, so none writes lz4 into a zstd repository unseen.
 */
export function sealBlob(kind: number, id: Buffer, raw: Buffer, target: Buffer, at: number, keys: RepositoryKeys | undefined, compression: Compression): number {
  if (!keys && compression.codec === 'lz4') {
    // liblz4 compresses straight into the frame's payload (the bytes below would give, without their copy).
    const payload = target.subarray(at + FRAME_HEADER_SIZE, at + FRAME_HEADER_SIZE + raw.length);
    const stored = worthCompressing(compression, raw) ? lz4CompressInto(raw, payload) : 0;
    if (stored !== undefined) {
      if (stored === 0) payload.set(raw);
      return finishFrame({ kind, flags: stored === 0 ? 0 : compressionFlag(compression), rawLength: raw.length, storedLength: stored === 0 ? raw.length : stored, id }, target, at);
    }
  }
  const compressed = worthCompressing(compression, raw) ? compressTransient(compression, raw) : undefined;
  return sealCompressed(kind, id, raw, compressed, target, at, keys, compression);
}

/**
 * sealBlob() with zstd's work done through a thread's own contexts (`streams`, compression.ts ZstdStreams): what
 * the block workers use, frame for frame the same as sealBlob() writes. Any other compression is sealBlob().
 */
export async function sealBlobWith(streams: ZstdStreams, kind: number, id: Buffer, raw: Buffer, target: Buffer, at: number, keys: RepositoryKeys | undefined, compression: Compression): Promise<number> {
  if (compression.codec !== 'zstd') return sealBlob(kind, id, raw, target, at, keys, compression);
  const compressed = (await worthCompressingZstd(streams, raw)) ? await streams.compress(compression.level, raw) : undefined;
  // A kept stream's frame is taken to be the output that arrives before its write callback (FrameStream): true of
  // Node 24, promised by no documentation. The block header walk is cheap, and it keeps a future Node that delivers
  // later from storing a cut frame that only a restore would find.
  const cut = compressed === undefined ? undefined : zstdHeaderProblem(compressed, raw.length);
  if (cut !== undefined) throw new EngineError('ENGINE_INTERNAL', `zstd gave a frame that does not check for a ${raw.length}-byte block: ${cut}`);
  return sealCompressed(kind, id, raw, compressed, target, at, keys, compression);
}

/** The frame of `raw` whose `compression` gave `compressed` (undefined: not tried), kept only when shorter. */
function sealCompressed(kind: number, id: Buffer, raw: Buffer, compressed: Buffer | undefined, target: Buffer, at: number, keys: RepositoryKeys | undefined, compression: Compression): number {
  const useCompressed = compressed !== undefined && compressed.length < raw.length;
  const inner = useCompressed ? compressed : raw;
  const codecFlag = useCompressed ? compressionFlag(compression) : 0;
  if (!keys) return encodeFrame({ kind, flags: codecFlag, rawLength: raw.length, id }, inner, target, at);
  const header: FrameHeader = { kind, flags: codecFlag | FLAG_ENCRYPTED, rawLength: raw.length, storedLength: inner.length + ENCRYPTION_OVERHEAD, id };
  encodeFrameHeader(header, target, at);
  const aad = target.subarray(at, at + FRAME_HEADER_SIZE);
  gcmSealInto(keys.dataKey, inner, aad, target, at + FRAME_HEADER_SIZE);
  return finishFrame(header, target, at);
}

export function sealBlobToBuffer(kind: number, id: Buffer, raw: Buffer, keys: RepositoryKeys | undefined, compression: Compression): Buffer {
  const target = Buffer.allocUnsafe(maxFrameLength(raw.length, keys));
  const length = sealBlob(kind, id, raw, target, 0, keys, compression);
  return target.subarray(0, length);
}

export interface OpenedBlob {
  header: FrameHeader;
  plaintext: Buffer;
}

/** Message of a frame whose GCM tag does not match: named so that verify and restore say the same. */
export const AUTHENTICATION_FAILED = 'authentication failed (AES-256-GCM tag): the encrypted payload or its header was altered';

/**
 * Checks and opens one frame. Returns a reason string on any failure: the caller knows the pack and
 * offset and turns it into a CorruptFrameError that names them. `into`: where the plaintext should go when the
 * codec can decode there (compression.ts decompress); the caller copies it there when it is not.
 */
export function openBlob(frame: Buffer, expectedId?: Buffer, keys?: RepositoryKeys, into?: Buffer): OpenedBlob | string {
  const payload = openPayload(frame, expectedId, keys);
  if (typeof payload === 'string') return payload;
  const { header } = payload;
  const plaintext = (header.flags & COMPRESSION_FLAGS) !== 0 ? decompress(header.flags, payload.payload, header.rawLength, into) : payload.payload;
  return checkedBlob(header, plaintext, keys);
}

/** openBlob() with zstd's work done through a thread's own contexts (`streams`): what the block workers use. */
export async function openBlobWith(streams: ZstdStreams, frame: Buffer, expectedId?: Buffer, keys?: RepositoryKeys, into?: Buffer): Promise<OpenedBlob | string> {
  const payload = openPayload(frame, expectedId, keys);
  if (typeof payload === 'string') return payload;
  const { header } = payload;
  // decompress() reads a frame that names both codecs as lz4: so does this.
  const zstd = (header.flags & COMPRESSION_FLAGS) === FLAG_ZSTD;
  const plaintext = zstd ? await streams.decompress(payload.payload, header.rawLength) : (header.flags & COMPRESSION_FLAGS) !== 0 ? decompress(header.flags, payload.payload, header.rawLength, into) : payload.payload;
  return checkedBlob(header, plaintext, keys);
}

/** A frame's checks up to its payload (decrypted in an encrypted repository), or a reason. */
function openPayload(frame: Buffer, expectedId: Buffer | undefined, keys: RepositoryKeys | undefined): { header: FrameHeader; payload: Buffer } | string {
  const decoded = decodeFrame(frame, keys !== undefined);
  if (typeof decoded === 'string') return decoded;
  const { header } = decoded;
  if (expectedId && !expectedId.equals(header.id)) return 'frame holds a different blob than the index says';
  if (!keys) return decoded;
  const opened = gcmOpen(keys.dataKey, decoded.payload, frame.subarray(0, FRAME_HEADER_SIZE));
  if (!opened) return AUTHENTICATION_FAILED;
  return { header, payload: opened };
}

/** The blob, once its plaintext (or the reason it has none) is known: its id must match. */
function checkedBlob(header: FrameHeader, plaintext: Buffer | string, keys: RepositoryKeys | undefined): OpenedBlob | string {
  if (typeof plaintext === 'string') return plaintext;
  const actual = blobId(plaintext, keys);
  if (!actual.equals(header.id.subarray(0, ID_SIZE))) return keys ? 'HMAC-SHA256 of the plaintext does not match the blob id' : 'SHA-256 of the plaintext does not match the blob id';
  return { header, plaintext };
}
