/**
 * A repository's compression: which codec its writers use (config `compression`, and for zstd
 * `compressionLevel`), and the codecs themselves. Readers never need the config for this: each frame's flags
 * say how its payload is compressed (SPEC.md, section 5), so lz4 frames, zstd frames and stored-raw frames
 * all read in any repository.
 */
import { constants as zlibConstants, ZstdCompress, ZstdDecompress, zstdCompressSync, zstdDecompressSync } from 'node:zlib';
import { createRequire } from 'node:module';
import type * as Lz4Napi from 'lz4-napi';
import { COMPRESSION_ID, FLAG_LZ4, FLAG_ZSTD, MAX_ZSTD_LEVEL, MIN_ZSTD_LEVEL, ZSTD_COMPRESSION_ID } from './constants.js';
import { EngineError, InvalidArgumentError } from './errors.js';
import { nativeLz4 } from './lz4-native.js';

export type Compression = { codec: 'lz4' } | { codec: 'zstd'; level: number };

export const LZ4: Compression = { codec: 'lz4' };
/**
 * What `zstd` alone means: zstd level 1, measured by bench/compression.ts on the real /usr image (SPEC.md,
 * section 13.1): a quarter fewer stored bytes than lz4 for 1.3x its backup CPU; level 3 stores 9% less again
 * (restic's size) for 1.6x.
 */
export const DEFAULT_ZSTD_LEVEL = 1;
/** zstd at its default level: what `zstd` alone means, and what a lost version-3 config is rebuilt with (SPEC 3.2). */
export const DEFAULT_COMPRESSION: Compression = { codec: 'zstd', level: DEFAULT_ZSTD_LEVEL };
/**
 * What `init` gives a new repository unless told: lz4, by issue 15's rule (backup CPU x stored bytes x restore
 * CPU on the real image, SPEC.md 13.1: lz4 1.00, zstd level 1 and 2 1.20, level 3 1.37). Memory no longer
 * decides it: with ZstdStreams zstd peaks at or below lz4's RSS.
 */
export const INIT_COMPRESSION: Compression = LZ4;

/** How `init --compression` and the reports write it: `lz4`, `zstd:3`. */
export function compressionName(c: Compression): string {
  return c.codec === 'lz4' ? 'lz4' : `zstd:${c.level}`;
}

/** Parses `lz4`, `zstd` (the default level) or `zstd:LEVEL`. */
export function parseCompression(text: string): Compression {
  if (text === 'lz4') return LZ4;
  const match = /^zstd(?::(-?\d{1,3}))?$/.exec(text);
  if (match) {
    const level = match[1] === undefined ? DEFAULT_ZSTD_LEVEL : Number(match[1]);
    if (level >= MIN_ZSTD_LEVEL && level <= MAX_ZSTD_LEVEL) return { codec: 'zstd', level };
    throw new InvalidArgumentError(`zstd level ${level} is not allowed: ${MIN_ZSTD_LEVEL} to ${MAX_ZSTD_LEVEL}`, { compression: text });
  }
  throw new InvalidArgumentError(`compression '${text}' is not known: lz4, zstd or zstd:LEVEL (${MIN_ZSTD_LEVEL}-${MAX_ZSTD_LEVEL})`, { compression: text });
}

/** The config fields that name it. */
export function compressionConfig(c: Compression): { compression: string; compressionLevel?: number } {
  return c.codec === 'lz4' ? { compression: COMPRESSION_ID } : { compression: ZSTD_COMPRESSION_ID, compressionLevel: c.level };
}

/** The compression a config's fields name, or a reason (the config is damaged or of a newer engine). */
export function compressionOfConfig(c: Record<string, unknown>): Compression | string {
  if (c.compression === COMPRESSION_ID) return c.compressionLevel === undefined ? LZ4 : 'config gives a compression level to lz4';
  if (c.compression !== ZSTD_COMPRESSION_ID) return 'config names a hash, checksum or compression this engine does not know';
  const level = c.compressionLevel;
  if (typeof level !== 'number' || !Number.isInteger(level) || level < MIN_ZSTD_LEVEL || level > MAX_ZSTD_LEVEL) return `config names zstd without a valid level (${MIN_ZSTD_LEVEL}-${MAX_ZSTD_LEVEL})`;
  return { codec: 'zstd', level };
}

/** The frame flag of a codec. */
export function compressionFlag(c: Compression): number {
  return c.codec === 'lz4' ? FLAG_LZ4 : FLAG_ZSTD;
}

/**
 * Size of the lz4 payload's prefix: the uncompressed length as a little-endian u32 (lz4_flex's
 * `compress_prepend_size` layout, which lz4-napi writes; with liblz4 the engine writes it itself; SPEC.md 5).
 */
const LZ4_SIZE_PREFIX = 4;

/**
 * liblz4's output, reused by every compression on this thread (each worker has its own module instance): grown
 * to the largest block's bound once, never allocated per block as lz4-napi's output is.
 */
let lz4Scratch = Buffer.alloc(0);

/**
 * lz4-napi, loaded on first use: only a process without liblz4's addon (lz4-native.ts) uses it, and loading it
 * (its platform checks, a second addon) cost every engine process and every block worker ~3-5 ms of CPU, the
 * suite's ~3,800 engine processes some 15 CPU-s (measured: a bare import, with the compile cache).
 */
let lz4NapiModule: typeof Lz4Napi | undefined;
function lz4Napi(): typeof Lz4Napi {
  lz4NapiModule ??= createRequire(import.meta.url)('lz4-napi') as typeof Lz4Napi;
  return lz4NapiModule;
}

/** An lz4 payload of `raw` in this thread's scratch buffer (liblz4), or a new buffer (lz4-napi). */
function lz4Compress(raw: Buffer): Buffer {
  if (!nativeLz4) return lz4Napi().compressSync(raw);
  const bound = LZ4_SIZE_PREFIX + nativeLz4.compressBound(raw.length);
  if (lz4Scratch.length < bound) lz4Scratch = Buffer.allocUnsafeSlow(bound);
  lz4Scratch.writeUInt32LE(raw.length, 0);
  // Within the bound liblz4 always fits: 0 would be a broken library, not data.
  const written = nativeLz4.compress(raw, lz4Scratch.subarray(LZ4_SIZE_PREFIX, bound));
  if (written <= 0) throw new EngineError('ENGINE_INTERNAL', `liblz4 failed to compress ${raw.length} bytes into its bound`);
  return lz4Scratch.subarray(0, LZ4_SIZE_PREFIX + written);
}

/**
 * The lz4 payload of `raw` (size prefix and block) written straight into `target` when it is shorter than `raw`,
 * its length then; 0 when it is not (the caller stores `raw`); undefined without liblz4 (lz4-napi allocates its
 * own output: the caller takes compressTransient's). liblz4 with a bound of `raw.length` - 5 block bytes writes the
 * same bytes as with a full bound whenever they fit, and fails (0) otherwise: the same frames as compressing into
 * the scratch buffer and keeping the shorter, without the copy of every compressed block (~1 GiB for a backup of
 * the 3 GiB real image, ~0.1 CPU-s).
 */
export function lz4CompressInto(raw: Buffer, target: Buffer): number | undefined {
  if (!nativeLz4) return undefined;
  if (raw.length <= LZ4_SIZE_PREFIX + 1 || target.length < raw.length) return 0;
  const written = nativeLz4.compress(raw, target.subarray(LZ4_SIZE_PREFIX, raw.length - 1));
  if (written <= 0) return 0;
  target.writeUInt32LE(raw.length, 0);
  return LZ4_SIZE_PREFIX + written;
}

/**
 * Compresses a whole blob (its length may exceed the input's: the caller keeps the shorter). The result may be
 * this thread's scratch buffer (lz4 through liblz4): valid until the next compression on this thread, so the
 * caller copies what it keeps (sealBlob copies it into the frame). compress() gives a buffer of its own.
 */
export function compressTransient(c: Compression, raw: Buffer): Buffer {
  if (c.codec === 'lz4') return lz4Compress(raw);
  return zstdCompressSync(raw, { params: { [zlibConstants.ZSTD_c_compressionLevel]: c.level } });
}

/** compressTransient() into a buffer the caller owns. */
export function compress(c: Compression, raw: Buffer): Buffer {
  const compressed = compressTransient(c, raw);
  return c.codec === 'lz4' && nativeLz4 ? Buffer.from(compressed) : compressed;
}

/** lz4's payload decoded into at most `rawLength` bytes (of `into` when it is given and large enough), or a reason. */
function lz4Decompress(payload: Buffer, rawLength: number, into: Buffer | undefined): Buffer | string {
  // The prefix is covered by the checksum, but check it anyway: it sizes lz4-napi's output allocation.
  if (payload.length < LZ4_SIZE_PREFIX || payload.readUInt32LE(0) !== rawLength) return 'lz4 size prefix disagrees with the frame header';
  if (!nativeLz4) {
    try {
      return lz4Napi().uncompressSync(payload);
    } catch (error) {
      return `lz4 payload does not decompress (${(error as Error).message})`;
    }
  }
  // LZ4_decompress_safe reads only the payload and writes at most rawLength bytes, whatever the block says.
  const plaintext = into !== undefined && into.length >= rawLength ? into.subarray(0, rawLength) : Buffer.allocUnsafe(rawLength);
  const written = nativeLz4.decompress(payload.subarray(LZ4_SIZE_PREFIX), plaintext);
  if (written < 0) return `lz4 payload does not decompress (liblz4: a malformed block, or one of more than the frame's ${rawLength} bytes)`;
  return plaintext.subarray(0, written);
}

/**
 * Decompresses the payload of a frame whose flags are `flags`, into at most `rawLength` bytes; returns the
 * plaintext, or a reason. Nothing here allocates more than `rawLength` bytes of output whatever the payload
 * says: lz4's size prefix must equal `rawLength` before it sizes anything (liblz4 decodes into exactly
 * `rawLength` bytes and stops there), and zstd stops at `maxOutputLength` (a payload that would decompress
 * further is corruption, never an allocation). `into`: where the caller wants the plaintext (a restore's block
 * slot); lz4 through liblz4 decodes straight into it (the result is then a view of it, and `into` holds garbage
 * after a failure), other codecs return a buffer of their own.
 * For zstd one blob now and then (the main thread's map pages, gc, repair): every call of node:zlib's zstd
 * functions makes a context of its own, freed only when V8 collects it (see ZstdStreams); the block workers use
 * ZstdStreams.
 */
export function decompress(flags: number, payload: Buffer, rawLength: number, into?: Buffer): Buffer | string {
  if ((flags & FLAG_LZ4) !== 0) {
    const decoded = lz4Decompress(payload, rawLength, into);
    return typeof decoded === 'string' ? decoded : (lengthProblem(decoded, rawLength) ?? decoded);
  }
  const header = zstdHeaderProblem(payload, rawLength);
  if (header) return header;
  let plaintext: Buffer;
  try {
    // One output buffer of rawLength + 1 bytes: a payload that decodes to more stops at the first byte past
    // rawLength (maxOutputLength) instead of growing a second buffer.
    plaintext = zstdDecompressSync(payload, { maxOutputLength: rawLength, chunkSize: Math.max(zlibConstants.Z_MIN_CHUNK, rawLength + 1) });
  } catch (error) {
    const e = error as NodeJS.ErrnoException;
    if (e.code === 'ERR_BUFFER_TOO_LARGE') return `zstd payload decompresses to more than the frame's ${rawLength} bytes`;
    return `zstd payload does not decompress (${e.message})`;
  }
  return lengthProblem(plaintext, rawLength) ?? plaintext;
}

function lengthProblem(plaintext: Buffer, rawLength: number): string | undefined {
  return plaintext.length === rawLength ? undefined : `decompressed to ${plaintext.length} bytes, expected ${rawLength}`;
}

/** What a FrameStream fails with when a frame's output passes its limit. */
class OutputTooLarge extends Error {}

/**
 * One node:zlib zstd stream kept for many frames: each write is one whole frame (the compressor's flush flag
 * is ZSTD_e_end), so the compressor sees the whole block at once and states its content size, and the
 * decompressor's context starts afresh at the next frame. Writes are queued: a stream holds one frame at a
 * time, and the output parts that arrive between a write and its callback are that frame's. A frame whose
 * output passes `limit` stops the stream there (node:zlib's streams have no maxOutputLength; the stream is
 * destroyed from its 'data' event, before it asks for another output buffer). A stream that failed is
 * destroyed and never used again.
 */
class FrameStream {
  private parts: Buffer[] = [];
  private bytes = 0;
  private limit = Infinity;
  private tail: Promise<unknown> = Promise.resolve();
  private current: { resolve: (parts: Buffer[]) => void; reject: (error: Error) => void } | undefined;
  failed: Error | undefined;

  constructor(private readonly stream: ZstdCompress | ZstdDecompress) {
    stream.on('data', (part: Buffer) => {
      this.bytes += part.length;
      if (this.bytes > this.limit) return this.fail(new OutputTooLarge());
      this.parts.push(part);
    });
    stream.on('error', (error: Error) => this.fail(error));
  }

  /** The output of one frame's input, in the parts it arrived in; OutputTooLarge past `limit` bytes. */
  run(input: Buffer, limit = Infinity): Promise<Buffer[]> {
    const result = this.tail.then(
      () =>
        new Promise<Buffer[]>((resolve, reject) => {
          if (this.failed) return reject(this.failed);
          this.current = { resolve, reject };
          this.bytes = 0;
          this.limit = limit;
          this.stream.write(input, (error) => {
            if (error) return this.fail(error);
            const parts = this.parts;
            this.parts = [];
            const current = this.current;
            this.current = undefined;
            current?.resolve(parts);
          });
        }),
    );
    this.tail = result.catch(() => undefined);
    return result;
  }

  /** Ends the stream once the frames queued on it are done (it takes no more). */
  retire(): void {
    this.tail = this.tail.then(() => this.stream.destroy());
  }

  private fail(error: Error): void {
    this.failed ??= error;
    this.parts = [];
    const current = this.current;
    this.current = undefined;
    current?.reject(error);
    this.stream.destroy();
  }
}

/**
 * Output buffers of a thread's compressor. A stream fills one buffer frame after frame until it is full, so a
 * buffer lives as long as the frames it holds: a 1 MiB buffer held four blocks' output, outlived the block
 * workers' young-generation collections (block-runner.ts), was promoted and stayed until a full collection,
 * and a zstd:3 backup of the real image grew to 310 MiB. 64 KiB buffers die young; a block's output comes
 * in a few of them, joined once.
 */
const COMPRESS_CHUNK = 64 * 1024;

/**
 * A thread's own zstd contexts, one compressor per level and one decompressor, kept for every frame it
 * writes or reads. node:zlib's zstdCompressSync and zstdDecompressSync make a new libzstd context per call
 * (1.5 MiB for level 1 on a 1 MiB block: its window and buffers) with plain malloc, out of V8's sight, and
 * free it only when V8 collects the stream object that holds it: the zstd context's close frees nothing. Those
 * objects outlive the young-generation collections and wait for a full one, so a block worker held dozens of
 * dead contexts at a time: backups and restores of the real image peaked 90-100 MiB above lz4's (SPEC.md 13.1,
 * Memory). Kept contexts cost their size once per thread. The work runs on libuv's thread pool (node:zlib
 * has no synchronous use of a kept stream), and the thread awaits it.
 */
export class ZstdStreams {
  private readonly compressors = new Map<number, FrameStream>();
  private decompressor: FrameStream | undefined;
  private decompressChunk = 0;

  /** Compresses `raw` into one zstd frame (the caller keeps it only when shorter than `raw`). */
  async compress(level: number, raw: Buffer): Promise<Buffer> {
    let stream = this.compressors.get(level);
    if (!stream || stream.failed) {
      stream = new FrameStream(new ZstdCompress({ flush: zlibConstants.ZSTD_e_end, chunkSize: COMPRESS_CHUNK, params: { [zlibConstants.ZSTD_c_compressionLevel]: level } }));
      this.compressors.set(level, stream);
    }
    return joined(await stream.run(raw));
  }

  /** decompress() for a zstd payload, with the same checks and reasons, through this thread's decompressor. */
  async decompress(payload: Buffer, rawLength: number): Promise<Buffer | string> {
    const header = zstdHeaderProblem(payload, rawLength);
    if (header) return header;
    // Output buffers of exactly a frame's rawLength: a block's frame then decodes in one pass into one buffer
    // of its own (a frame that fills the buffer leaves the next frame a new one), none copied. A stream is
    // made anew for a larger frame, so the output buffer is the largest frame's size.
    if (!this.decompressor || this.decompressor.failed || rawLength > this.decompressChunk) {
      this.decompressor?.retire();
      this.decompressChunk = Math.max(zlibConstants.Z_MIN_CHUNK, rawLength, this.decompressChunk);
      this.decompressor = new FrameStream(new ZstdDecompress({ chunkSize: this.decompressChunk }));
    }
    let plaintext: Buffer;
    try {
      // libzstd compares what a frame's blocks decoded with its content size only at the last block, and its
      // blocks may be many: the limit stops a frame whose blocks say more than rawLength bytes on the way.
      plaintext = joined(await this.decompressor.run(payload, rawLength));
    } catch (error) {
      if (error instanceof OutputTooLarge) return `zstd payload decompresses to more than the frame's ${rawLength} bytes`;
      return `zstd payload does not decompress (${(error as Error).message})`;
    }
    return lengthProblem(plaintext, rawLength) ?? plaintext;
  }
}

function joined(parts: Buffer[]): Buffer {
  return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
}

const ZSTD_MAGIC = 0xfd2fb528;
/** RFC 8878, 3.1.1.2: a block's size field never exceeds this, nor the frame's window. */
const ZSTD_MAX_BLOCK = 128 * 1024;
const ZSTD_BLOCK_HEADER = 3;
const ZSTD_CHECKSUM = 4;

/**
 * Checks a zstd payload's frame (RFC 8878, 3.1.1) before anything decodes it: the decoder sizes its window
 * from the header, so a hostile one could make it allocate up to 128 MiB for a tiny frame. A frame of ours
 * names no dictionary, states its content size, equal to the frame's rawLength, and a window no larger than
 * rawLength rounded up to a power of two. And the payload is that one frame, nothing after it: libzstd decodes
 * every frame that follows (a second frame with a 128 MiB window and no content, a skippable frame), so the
 * frame's blocks are walked by their headers, each at most min(window, 128 KiB), and the last block (and the
 * content checksum, when the header says there is one) must end exactly at the payload's end.
 */
export function zstdHeaderProblem(payload: Buffer, rawLength: number): string | undefined {
  if (payload.length < 6 || payload.readUInt32LE(0) !== ZSTD_MAGIC) return 'zstd payload does not start with a zstd frame';
  const descriptor = payload.readUInt8(4);
  const sizeFlag = Math.floor(descriptor / 64);
  const singleSegment = Math.floor(descriptor / 32) % 2 === 1;
  if (Math.floor(descriptor / 8) % 2 === 1) return 'zstd frame header has its reserved bit set';
  const hasChecksum = Math.floor(descriptor / 4) % 2 === 1;
  if (descriptor % 4 !== 0) return 'zstd frame names a dictionary';
  let at = 5;
  let window = 0;
  if (!singleSegment) {
    const w = payload.readUInt8(at);
    at += 1;
    const base = 2 ** (10 + Math.floor(w / 8));
    window = base + (base / 8) * (w % 8);
  }
  const sizeBytes = [singleSegment ? 1 : 0, 2, 4, 8][sizeFlag]!;
  if (sizeBytes === 0) return 'zstd frame does not state its content size';
  if (payload.length < at + sizeBytes) return 'zstd frame header is cut short';
  const contentSize = sizeBytes === 1 ? payload.readUInt8(at) : sizeBytes === 2 ? payload.readUInt16LE(at) + 256 : sizeBytes === 4 ? payload.readUInt32LE(at) : Number(payload.readBigUInt64LE(at));
  at += sizeBytes;
  if (contentSize !== rawLength) return `zstd frame states ${contentSize} bytes of content, the frame header ${rawLength}`;
  let roundedUp = 1024;
  while (roundedUp < rawLength) roundedUp *= 2;
  if (!singleSegment && window > roundedUp) return `zstd frame asks for a ${window}-byte window, more than its ${rawLength} bytes need`;
  return zstdBlocksProblem(payload, at, Math.min(singleSegment ? contentSize : window, ZSTD_MAX_BLOCK), hasChecksum);
}

/** Walks the blocks from `at` (RFC 8878, 3.1.1.2): each within `maxBlock`, the frame ending at the payload's end. */
function zstdBlocksProblem(payload: Buffer, at: number, maxBlock: number, hasChecksum: boolean): string | undefined {
  for (;;) {
    if (payload.length < at + ZSTD_BLOCK_HEADER) return 'zstd frame is cut short';
    // Block header, 24 bits little-endian: bit 0 Last_Block, bits 1-2 Block_Type, bits 3-23 Block_Size.
    const header = payload.readUIntLE(at, ZSTD_BLOCK_HEADER);
    at += ZSTD_BLOCK_HEADER;
    const last = header % 2 === 1;
    const type = Math.floor(header / 2) % 4;
    const size = Math.floor(header / 8);
    if (type === 3) return 'zstd frame has a block of the reserved type';
    if (size > maxBlock) return `zstd frame has a ${size}-byte block, more than its ${maxBlock}-byte limit`;
    // Raw and compressed blocks carry Block_Size bytes; an RLE block one byte, repeated Block_Size times.
    at += type === 1 ? 1 : size;
    if (last) break;
  }
  if (hasChecksum) at += ZSTD_CHECKSUM;
  if (at > payload.length) return 'zstd frame is cut short';
  if (at < payload.length) return `zstd payload holds ${payload.length - at} bytes after its frame`;
  return undefined;
}

/** The probe: this many slices of PROBE_SLICE bytes, spread evenly over a blob. */
const PROBE_SLICES = 4;
const PROBE_SLICE = 16 * 1024;
/** Blobs up to this size are compressed without a probe: the probe would cost a sizeable part of the work. */
const PROBE_FROM = 8 * PROBE_SLICES * PROBE_SLICE;
/** A probe that compresses to more than this share of its size says the blob is not worth compressing. */
const PROBE_KEEP_BELOW = 0.97;
const ZSTD_PROBE = { codec: 'zstd', level: 1 } as const;

/**
 * The early, cheap test: is `raw` worth compressing? For zstd and lz4-napi: compresses four 16 KiB slices spread over the blob
 * (6% of a 1 MiB block) with the codec's fastest setting; when even those do not shrink by 3%, the blob
 * is stored raw without compressing the whole of it (random, already compressed or encrypted guest data).
 * A blob with any compressible region among the slices is compressed whole, as before.
 */
export function worthCompressing(c: Compression, raw: Buffer): boolean {
  // liblz4 gives up on incompressible data by itself: 0.09 CPU-s per GiB of random 1 MiB blocks, where the probe
  // costs 0.11 per GiB of the real image's blocks (0.26 CPU-s a backup) to save at most that (SPEC.md 13.1).
  if (c.codec === 'lz4' && nativeLz4) return true;
  const sample = probeSample(raw, probeScratch);
  return sample === undefined || compressTransient(c.codec === 'lz4' ? LZ4 : ZSTD_PROBE, sample).length < sample.length * PROBE_KEEP_BELOW;
}

/** worthCompressing() for a zstd repository, through a thread's own contexts. */
export async function worthCompressingZstd(streams: ZstdStreams, raw: Buffer): Promise<boolean> {
  const sample = probeSample(raw, Buffer.allocUnsafe(PROBE_SLICES * PROBE_SLICE));
  return sample === undefined || (await streams.compress(ZSTD_PROBE.level, sample)).length < sample.length * PROBE_KEEP_BELOW;
}

/**
 * The synchronous probe's slices, kept per thread and reused: a new 64 KiB buffer per block is memory outside V8's
 * heap that only a collection frees (the block workers no longer force one every few blocks where nothing else
 * allocates). Safe because worthCompressing is done with it before it returns; zstd's probe through a thread's
 * streams awaits, so two seals of one worker could overlap there: it gets a buffer of its own.
 */
const probeScratch = Buffer.allocUnsafeSlow(PROBE_SLICES * PROBE_SLICE);

/** The probe's slices of `raw` copied into `sample`, or undefined for a blob compressed without a probe. */
function probeSample(raw: Buffer, sample: Buffer): Buffer | undefined {
  if (raw.length < PROBE_FROM) return undefined;
  const stride = Math.floor((raw.length - PROBE_SLICE) / (PROBE_SLICES - 1));
  for (let i = 0; i < PROBE_SLICES; i++) raw.copy(sample, i * PROBE_SLICE, i * stride, i * stride + PROBE_SLICE);
  return sample;
}
