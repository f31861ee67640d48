/**
 * SPEC 5's zstd payload, read from SPEC.md's words: one zstd frame (RFC 8878) whose header names no
 * dictionary, states its content size (equal to the frame's rawLength) and, unless single-segment, a window
 * of at most rawLength rounded up to a power of two (at least 1 KiB); blocks of at most min(window, 128 KiB),
 * none of the reserved type, the frame (last block, then its checksum if flagged) ending exactly at the
 * payload's end; decoded into at most rawLength bytes. The header and block rules are checked here, byte by
 * byte from RFC 8878 sections 3.1.1.1 and 3.1.1.2; the entropy decoding itself
 * is libzstd's (RFC 8878's reference implementation, as Node's zlib ships it): a zstd decoder written anew
 * would be thousands of lines for no independence the frame's rules need.
 */
import { constants, zstdDecompressSync } from 'node:zlib';

/** Decodes a zstd payload of a frame whose header says `rawLength`; throws an Error naming what is wrong. */
export function zstdDecode(payload: Buffer, rawLength: number): Buffer {
  if (payload.length < 6) throw new Error('zstd payload shorter than a frame header');
  if (payload.readUInt32LE(0) !== 0xfd2fb528) throw new Error('zstd payload without the zstd magic number');
  const fhd = payload[4] as number;
  const fcsFlag = fhd >> 6; // a header byte's bits, not an offset
  const single = ((fhd >> 5) & 1) === 1;
  const checksumFlag = ((fhd >> 2) & 1) === 1;
  if (((fhd >> 3) & 1) === 1) throw new Error('zstd frame header reserved bit set');
  if ((fhd & 3) !== 0) throw new Error('zstd frame with a dictionary id');
  let at = 5;
  let windowSize = 0;
  if (!single) {
    const wd = payload[at] as number;
    at += 1;
    const windowBase = 2 ** (10 + (wd >> 3));
    windowSize = windowBase + (windowBase / 8) * (wd & 7);
  }
  const fcsBytes = fcsFlag === 0 ? (single ? 1 : 0) : 2 ** fcsFlag;
  if (fcsBytes === 0) throw new Error('zstd frame without a content size');
  if (payload.length < at + fcsBytes) throw new Error('zstd frame header cut short');
  let contentSize: number;
  if (fcsBytes === 1) contentSize = payload[at] as number;
  else if (fcsBytes === 2) contentSize = payload.readUInt16LE(at) + 256;
  else if (fcsBytes === 4) contentSize = payload.readUInt32LE(at);
  else contentSize = Number(payload.readBigUInt64LE(at));
  at += fcsBytes;
  if (contentSize !== rawLength) throw new Error(`zstd content size ${contentSize} differs from rawLength ${rawLength}`);
  let bound = 1024;
  while (bound < rawLength) bound *= 2;
  if (!single && windowSize > bound) throw new Error(`zstd window of ${windowSize} bytes for ${rawLength} bytes of content`);
  const blockMaximum = Math.min(single ? contentSize : windowSize, 128 * 1024);
  for (let last = false; !last; ) {
    if (payload.length < at + 3) throw new Error('zstd frame cut short in its blocks');
    const blockHeader = payload.readUIntLE(at, 3); // 24 bits: Last_Block, Block_Type (2), Block_Size (21)
    at += 3;
    last = (blockHeader & 1) === 1;
    const blockType = (blockHeader >> 1) & 3;
    const blockSize = blockHeader >> 3;
    if (blockType === 3) throw new Error('zstd block of the reserved type');
    if (blockSize > blockMaximum) throw new Error(`zstd block of ${blockSize} bytes over the ${blockMaximum}-byte maximum`);
    at += blockType === 1 ? 1 : blockSize; // RLE: one byte; raw and compressed: Block_Size bytes
  }
  if (checksumFlag) at += 4;
  if (at !== payload.length) throw new Error(`zstd frame ends at ${at} of a ${payload.length}-byte payload: not exactly one frame`);
  try {
    return zstdDecompressSync(payload, { maxOutputLength: rawLength, chunkSize: Math.max(constants.Z_MIN_CHUNK, rawLength + 1) });
  } catch (error) {
    throw new Error(`zstd payload does not decode (${(error as Error).message})`);
  }
}
