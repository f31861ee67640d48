/**
 * The fixed-size NBD messages, each as an encode/decode pair (client and server both use them):
 *
 *   option request     64 IHAVEOPT || 32 option || 32 length                       (16 bytes, then data)
 *   option reply       64 0x3e889045565a9 || 32 option || 32 type || 32 length     (20 bytes, then data)
 *   request            32 0x25609513 || 16 flags || 16 type || 64 cookie || 64 offset || 32 length (28 bytes)
 *   simple reply       32 0x67446698 || 32 error || 64 cookie                      (16 bytes)
 *   structured chunk   32 0x668e33ef || 16 flags || 16 type || 64 cookie || 32 length (20 bytes)
 *
 * All big-endian. Decoders return a string saying what is wrong instead of throwing, so that a server can
 * answer (or hang up on) a misbehaving peer without an exception path.
 */
import * as P from './protocol.js';

export const OPTION_HEADER_SIZE = 16;
export const OPTION_REPLY_HEADER_SIZE = 20;
export const REQUEST_SIZE = 28;
export const SIMPLE_REPLY_SIZE = 16;
export const CHUNK_HEADER_SIZE = 20;

export interface OptionHeader {
  option: number;
  length: number;
}

export interface OptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

export interface RequestHeader {
  flags: number;
  type: number;
  cookie: bigint;
  offset: number;
  length: number;
}

export interface ChunkHeader {
  flags: number;
  type: number;
  cookie: bigint;
  length: number;
}

export function encodeOptionHeader(header: OptionHeader): Buffer {
  const out = Buffer.allocUnsafe(OPTION_HEADER_SIZE);
  out.writeBigUInt64BE(P.IHAVEOPT, 0);
  out.writeUInt32BE(header.option, 8);
  out.writeUInt32BE(header.length, 12);
  return out;
}

export function decodeOptionHeader(bytes: Buffer): OptionHeader | string {
  if (bytes.length !== OPTION_HEADER_SIZE) return `option header of ${bytes.length} bytes`;
  if (bytes.readBigUInt64BE(0) !== P.IHAVEOPT) return 'bad option magic (expected IHAVEOPT)';
  return { option: bytes.readUInt32BE(8), length: bytes.readUInt32BE(12) };
}

export function encodeOptionReply(header: OptionReplyHeader, data: Buffer = Buffer.alloc(0)): Buffer {
  const out = Buffer.allocUnsafe(OPTION_REPLY_HEADER_SIZE + data.length);
  out.writeBigUInt64BE(P.OPTION_REPLY_MAGIC, 0);
  out.writeUInt32BE(header.option, 8);
  out.writeUInt32BE(header.type, 12);
  out.writeUInt32BE(data.length, 16);
  data.copy(out, OPTION_REPLY_HEADER_SIZE);
  return out;
}

export function decodeOptionReplyHeader(bytes: Buffer): OptionReplyHeader | string {
  if (bytes.length !== OPTION_REPLY_HEADER_SIZE) return `option reply header of ${bytes.length} bytes`;
  if (bytes.readBigUInt64BE(0) !== P.OPTION_REPLY_MAGIC) return 'bad option reply magic';
  return { option: bytes.readUInt32BE(8), type: bytes.readUInt32BE(12), length: bytes.readUInt32BE(16) };
}

export function encodeRequest(header: RequestHeader): Buffer {
  const out = Buffer.allocUnsafe(REQUEST_SIZE);
  out.writeUInt32BE(P.REQUEST_MAGIC, 0);
  out.writeUInt16BE(header.flags, 4);
  out.writeUInt16BE(header.type, 6);
  out.writeBigUInt64BE(header.cookie, 8);
  out.writeBigUInt64BE(BigInt(header.offset), 16);
  out.writeUInt32BE(header.length, 24);
  return out;
}

export function decodeRequest(bytes: Buffer): RequestHeader | string {
  if (bytes.length !== REQUEST_SIZE) return `request of ${bytes.length} bytes`;
  const magic = bytes.readUInt32BE(0);
  if (magic !== P.REQUEST_MAGIC) return `bad request magic 0x${magic.toString(16)}`;
  const offset = bytes.readBigUInt64BE(16);
  // Beyond 2^53 no export can reach: Infinity fails every range check, where a rounded number might not.
  const safeOffset = offset > BigInt(Number.MAX_SAFE_INTEGER) ? Number.POSITIVE_INFINITY : Number(offset);
  return { flags: bytes.readUInt16BE(4), type: bytes.readUInt16BE(6), cookie: bytes.readBigUInt64BE(8), offset: safeOffset, length: bytes.readUInt32BE(24) };
}

export function encodeSimpleReply(errno: number, cookie: bigint): Buffer {
  const out = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
  out.writeUInt32BE(P.SIMPLE_REPLY_MAGIC, 0);
  out.writeUInt32BE(errno, 4);
  out.writeBigUInt64BE(cookie, 8);
  return out;
}

export function decodeSimpleReply(bytes: Buffer): { errno: number; cookie: bigint } | string {
  if (bytes.length !== SIMPLE_REPLY_SIZE) return `simple reply of ${bytes.length} bytes`;
  if (bytes.readUInt32BE(0) !== P.SIMPLE_REPLY_MAGIC) return 'bad simple reply magic';
  return { errno: bytes.readUInt32BE(4), cookie: bytes.readBigUInt64BE(8) };
}

export function encodeChunkHeader(header: ChunkHeader): Buffer {
  const out = Buffer.allocUnsafe(CHUNK_HEADER_SIZE);
  out.writeUInt32BE(P.STRUCTURED_REPLY_MAGIC, 0);
  out.writeUInt16BE(header.flags, 4);
  out.writeUInt16BE(header.type, 6);
  out.writeBigUInt64BE(header.cookie, 8);
  out.writeUInt32BE(header.length, 16);
  return out;
}

export function decodeChunkHeader(bytes: Buffer): ChunkHeader | string {
  if (bytes.length !== CHUNK_HEADER_SIZE) return `chunk header of ${bytes.length} bytes`;
  if (bytes.readUInt32BE(0) !== P.STRUCTURED_REPLY_MAGIC) return 'bad structured reply magic';
  return { flags: bytes.readUInt16BE(4), type: bytes.readUInt16BE(6), cookie: bytes.readBigUInt64BE(8), length: bytes.readUInt32BE(16) };
}

/** A u32 length followed by UTF-8 bytes: export names and metadata context names in options. */
export function encodeLengthPrefixed(text: string): Buffer {
  const bytes = Buffer.from(text, 'utf8');
  const field = Buffer.allocUnsafe(4 + bytes.length);
  field.writeUInt32BE(bytes.length, 0);
  bytes.copy(field, 4);
  return field;
}
