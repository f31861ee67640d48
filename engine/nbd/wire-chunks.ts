/**
 * The payloads of structured reply chunks (after the 20-byte chunk header of wire.ts), each as an
 * encode/decode pair (the server encodes, the client decodes):
 *
 *   NBD_REPLY_TYPE_OFFSET_DATA    64 offset || data (the rest of the chunk)     (the 8-byte head is a pair here)
 *   NBD_REPLY_TYPE_OFFSET_HOLE    64 offset || 32 hole length                   (12 bytes)
 *   NBD_REPLY_TYPE_BLOCK_STATUS   32 context id || (32 extent length || 32 status flags)+
 *   NBD_REPLY_TYPE_ERROR          32 errno || 16 message length || message
 *
 * Decoders return a string saying what is wrong; a length that would lead past the payload is one.
 */
import * as P from './protocol.js';
import { readOffset } from './wire.js';

export const OFFSET_DATA_HEAD_SIZE = 8;
export const OFFSET_HOLE_SIZE = 12;
export const ERROR_HEAD_SIZE = 6;
const BLOCK_STATUS_HEAD_SIZE = 4;
const DESCRIPTOR_SIZE = 8;

export interface OffsetHole {
  offset: number;
  length: number;
}

/** One block status descriptor: `length` bytes with these status flags (base:allocation's HOLE/ZERO, …). */
export interface BlockStatusDescriptor {
  length: number;
  flags: number;
}

export interface BlockStatusPayload {
  contextId: number;
  descriptors: BlockStatusDescriptor[];
}

export interface ErrorPayload {
  errno: number;
  message: string;
}

/** The head of an OFFSET_DATA chunk: where its data goes (the data itself is the rest of the chunk). */
export function encodeOffsetDataHead(offset: number): Buffer {
  const out = Buffer.allocUnsafe(OFFSET_DATA_HEAD_SIZE);
  out.writeBigUInt64BE(BigInt(offset), 0);
  return out;
}

export function decodeOffsetDataHead(bytes: Buffer): { offset: number } | string {
  if (bytes.length !== OFFSET_DATA_HEAD_SIZE) return `data chunk head of ${bytes.length} bytes`;
  const offset = readOffset(bytes, 0);
  return offset === undefined ? `data chunk offset ${bytes.readBigUInt64BE(0)} is too large` : { offset };
}

export function encodeOffsetHole(hole: OffsetHole): Buffer {
  const out = Buffer.allocUnsafe(OFFSET_HOLE_SIZE);
  out.writeBigUInt64BE(BigInt(hole.offset), 0);
  out.writeUInt32BE(hole.length, 8);
  return out;
}

export function decodeOffsetHole(bytes: Buffer): OffsetHole | string {
  if (bytes.length !== OFFSET_HOLE_SIZE) return `hole chunk of ${bytes.length} bytes`;
  const offset = readOffset(bytes, 0);
  if (offset === undefined) return `hole chunk offset ${bytes.readBigUInt64BE(0)} is too large`;
  return { offset, length: bytes.readUInt32BE(8) };
}

/** The size of a BLOCK_STATUS payload of `descriptors` descriptors. */
export function blockStatusSize(descriptors: number): number {
  return BLOCK_STATUS_HEAD_SIZE + DESCRIPTOR_SIZE * descriptors;
}

/** Whether `length` can be a BLOCK_STATUS payload (a context id and at least one whole descriptor). */
export function isBlockStatusSize(length: number): boolean {
  return length >= blockStatusSize(1) && (length - BLOCK_STATUS_HEAD_SIZE) % DESCRIPTOR_SIZE === 0;
}

export function encodeBlockStatus(payload: BlockStatusPayload): Buffer {
  const out = Buffer.allocUnsafe(blockStatusSize(payload.descriptors.length));
  out.writeUInt32BE(payload.contextId, 0);
  payload.descriptors.forEach((descriptor, i) => {
    out.writeUInt32BE(descriptor.length, BLOCK_STATUS_HEAD_SIZE + DESCRIPTOR_SIZE * i);
    out.writeUInt32BE(descriptor.flags, BLOCK_STATUS_HEAD_SIZE + DESCRIPTOR_SIZE * i + 4);
  });
  return out;
}

export function decodeBlockStatus(bytes: Buffer): BlockStatusPayload | string {
  if (!isBlockStatusSize(bytes.length)) return `block status chunk of ${bytes.length} bytes`;
  const descriptors: BlockStatusDescriptor[] = [];
  for (let at = BLOCK_STATUS_HEAD_SIZE; at < bytes.length; at += DESCRIPTOR_SIZE) {
    const length = bytes.readUInt32BE(at);
    // The protocol: a descriptor's length MUST be non-zero (a zero one would let a server never progress).
    if (length === 0) return 'block status extent of length 0';
    descriptors.push({ length, flags: bytes.readUInt32BE(at + 4) });
  }
  return { contextId: bytes.readUInt32BE(0), descriptors };
}

/** The message is cut to MAX_STRING bytes: the most a client takes (protocol.ts). */
export function encodeErrorChunk(payload: ErrorPayload): Buffer {
  const message = Buffer.from(payload.message, 'utf8').subarray(0, P.MAX_STRING);
  const out = Buffer.allocUnsafe(ERROR_HEAD_SIZE + message.length);
  out.writeUInt32BE(payload.errno, 0);
  out.writeUInt16BE(message.length, 4);
  message.copy(out, ERROR_HEAD_SIZE);
  return out;
}

/**
 * An error chunk; bytes after the message are allowed (NBD_REPLY_TYPE_ERROR_OFFSET carries the offset
 * there), a message running past the chunk is not.
 */
export function decodeErrorChunk(bytes: Buffer): ErrorPayload | string {
  if (bytes.length < ERROR_HEAD_SIZE) return `error chunk of ${bytes.length} bytes`;
  const messageLength = bytes.readUInt16BE(4);
  if (ERROR_HEAD_SIZE + messageLength > bytes.length) return 'error chunk message runs past the chunk';
  return { errno: bytes.readUInt32BE(0), message: bytes.toString('utf8', ERROR_HEAD_SIZE, ERROR_HEAD_SIZE + messageLength) };
}
