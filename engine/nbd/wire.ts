/**
 * The fixed-size NBD messages, each as an encode/decode pair (client and server both use them):
 *
 *   greeting           64 NBDMAGIC || 64 IHAVEOPT || 16 handshake flags             (18 bytes)
 *   client flags       32 flags                                                    (4 bytes)
 *   option request     64 IHAVEOPT || 32 option || 32 length                       (16 bytes, then data)
 *   option reply       64 0x3e889045565a9 || 32 option || 32 type || 32 length     (20 bytes, then data)
 *   request            32 0x25609513 || 16 flags || 16 type || 64 cookie || 64 offset || 32 length (28 bytes)
 *   simple reply       32 0x67446698 || 32 error || 64 cookie                      (16 bytes)
 *   structured chunk   32 0x668e33ef || 16 flags || 16 type || 64 cookie || 32 length (20 bytes)
 *
 * All big-endian. Decoders return a string saying what is wrong instead of throwing, so that a server can
 * answer (or hang up on) a misbehaving peer, and a client name it in its error, without an exception path.
 * What follows a header (option data, option reply data, structured reply chunk payloads) has its own
 * pairs: wire-options.ts and wire-chunks.ts.
 */
import * as P from './protocol.js';

export const GREETING_SIZE = 18;
export const CLIENT_FLAGS_SIZE = 4;
export const OPTION_HEADER_SIZE = 16;
export const OPTION_REPLY_HEADER_SIZE = 20;
export const REQUEST_SIZE = 28;
export const SIMPLE_REPLY_SIZE = 16;
export const CHUNK_HEADER_SIZE = 20;

/** The fixed newstyle greeting's handshake flags (FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES). */
export interface Greeting {
  flags: number;
}

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

/** The greeting; a server that sends anything else is named by what it sent instead. */
export function decodeGreeting(bytes: Buffer): Greeting | string {
  if (bytes.length !== GREETING_SIZE) return `greeting of ${bytes.length} bytes`;
  if (bytes.readBigUInt64BE(0) !== P.NBDMAGIC) return 'not an NBD server (bad greeting magic)';
  if (bytes.readBigUInt64BE(8) !== P.IHAVEOPT) return 'the server speaks oldstyle NBD, which is not supported';
  return { flags: bytes.readUInt16BE(16) };
}

export function encodeGreeting(greeting: Greeting): Buffer {
  const out = Buffer.allocUnsafe(GREETING_SIZE);
  // The two magics are the ASCII of their names (protocol.ts: NBDMAGIC, IHAVEOPT).
  out.write('NBDMAGICIHAVEOPT', 0, 'latin1');
  out.writeUInt16BE(greeting.flags, 16);
  return out;
}

export function encodeClientFlags(flags: number): Buffer {
  const out = Buffer.allocUnsafe(CLIENT_FLAGS_SIZE);
  out.writeUInt32BE(flags, 0);
  return out;
}

export function decodeClientFlags(bytes: Buffer): number | string {
  if (bytes.length !== CLIENT_FLAGS_SIZE) return `client flags of ${bytes.length} bytes`;
  return bytes.readUInt32BE(0);
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
  // Beyond 2^53 no export can reach: Infinity fails every range check, where a rounded number might not.
  const offset = readOffset(bytes, 16) ?? Number.POSITIVE_INFINITY;
  return { flags: bytes.readUInt16BE(4), type: bytes.readUInt16BE(6), cookie: bytes.readBigUInt64BE(8), offset, length: bytes.readUInt32BE(24) };
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

/** A u64 offset or size at `at`, or undefined beyond 2^53 (no export reaches that far; a rounded number would lie). */
export function readOffset(bytes: Buffer, at: number): number | undefined {
  const value = bytes.readBigUInt64BE(at);
  return value > BigInt(Number.MAX_SAFE_INTEGER) ? undefined : Number(value);
}

/** A u32 length followed by UTF-8 bytes: export names and metadata context names in options. */
export function encodeLengthPrefixed(text: string): Buffer {
  const bytes = Buffer.from(text, 'utf8');
  const field = Buffer.allocUnsafe(4 + bytes.length);
  field.writeUInt32BE(bytes.length, 0);
  bytes.copy(field, 4);
  return field;
}

/**
 * A cursor over a message's data that refuses to read past it: each read gives undefined when the data
 * does not hold it, so a length field can never make a decoder read (or allocate) beyond what arrived.
 */
export class ByteCursor {
  private at = 0;
  constructor(private readonly data: Buffer) {}
  get remaining(): number {
    return this.data.length - this.at;
  }
  u16(): number | undefined {
    if (this.remaining < 2) return undefined;
    this.at += 2;
    return this.data.readUInt16BE(this.at - 2);
  }
  u32(): number | undefined {
    if (this.remaining < 4) return undefined;
    this.at += 4;
    return this.data.readUInt32BE(this.at - 4);
  }
  /** UTF-8 text of exactly `length` bytes. */
  text(length: number): string | undefined {
    if (length > this.remaining) return undefined;
    this.at += length;
    return this.data.toString('utf8', this.at - length, this.at);
  }
  /** What is left, as text. */
  rest(): string {
    return this.text(this.remaining)!;
  }
  /** A u32 length (at most `max`) and that many bytes of UTF-8 text. */
  lengthPrefixed(max = P.MAX_STRING): string | undefined {
    const length = this.u32();
    if (length === undefined || length > max) return undefined;
    return this.text(length);
  }
}
