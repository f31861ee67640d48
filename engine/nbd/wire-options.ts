/**
 * What follows an option header or an option reply header during the handshake, each as an encode/decode
 * pair (client and server both use them):
 *
 *   NBD_OPT_{LIST,SET}_META_CONTEXT  32 name length || name || 32 query count || (32 length || query)*
 *   NBD_OPT_INFO / NBD_OPT_GO        32 name length || name || 16 request count || (16 info type)*
 *   NBD_REP_SERVER                   32 name length || name || description (to the end)
 *   NBD_REP_META_CONTEXT             32 context id || name (to the end, at least one byte)
 *   NBD_REP_INFO                     16 info type || its fields:
 *       NBD_INFO_EXPORT                64 size || 16 transmission flags                  (12 bytes in all)
 *       NBD_INFO_NAME, _DESCRIPTION    text (to the end)
 *       NBD_INFO_BLOCK_SIZE            32 minimum || 32 preferred || 32 maximum          (14 bytes in all)
 *   NBD_OPT_EXPORT_NAME's reply      64 size || 16 transmission flags || 124 zero bytes unless NO_ZEROES
 *
 * Decoders never read past the data they are given (ByteCursor) and return a string saying what is wrong.
 */
import * as P from './protocol.js';
import { ByteCursor, encodeLengthPrefixed, readOffset } from './wire.js';

/** Data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT. */
export interface MetaContextOption {
  exportName: string;
  queries: string[];
}

/** Data of NBD_OPT_INFO and NBD_OPT_GO: the export, and the NBD_INFO_* types the client asks for. */
export interface InfoOption {
  exportName: string;
  requests: number[];
}

/** One NBD_REP_SERVER of the answer to NBD_OPT_LIST. */
export interface ServerReply {
  name: string;
  description: string;
}

/** NBD_REP_META_CONTEXT: a context the server has, and the id it goes by in BLOCK_STATUS replies. */
export interface MetaContextReply {
  id: number;
  name: string;
}

export type InfoReply =
  | { kind: 'export'; size: number; flags: number }
  | { kind: 'name'; name: string }
  | { kind: 'description'; description: string }
  | { kind: 'block-size'; minimum: number; preferred: number; maximum: number }
  /** An information type this side does not know: the protocol says to ignore it. */
  | { kind: 'unknown'; type: number };

/** The answer to NBD_OPT_EXPORT_NAME: the export's size and transmission flags. */
export interface ExportNameReply {
  size: number;
  flags: number;
}

export const INFO_EXPORT_SIZE = 12;
export const INFO_BLOCK_SIZE_SIZE = 14;
export const EXPORT_NAME_REPLY_SIZE = 10;
/** The zeroes an EXPORT_NAME reply ends with when the client did not send NBD_FLAG_C_NO_ZEROES. */
const EXPORT_NAME_PADDING = 124;

export function encodeMetaContextOption(option: MetaContextOption): Buffer {
  const count = Buffer.allocUnsafe(4);
  count.writeUInt32BE(option.queries.length, 0);
  return Buffer.concat([encodeLengthPrefixed(option.exportName), count, ...option.queries.map(encodeLengthPrefixed)]);
}

export function decodeMetaContextOption(data: Buffer): MetaContextOption | string {
  const decoded = decodeExportAndList(data, (c) => c.u32(), (c) => c.lengthPrefixed(), 'malformed metadata context option');
  return typeof decoded === 'string' ? decoded : { exportName: decoded.exportName, queries: decoded.items };
}

export function encodeInfoOption(option: InfoOption): Buffer {
  const requests = Buffer.allocUnsafe(2 + 2 * option.requests.length);
  requests.writeUInt16BE(option.requests.length, 0);
  option.requests.forEach((type, i) => requests.writeUInt16BE(type, 2 + 2 * i));
  return Buffer.concat([encodeLengthPrefixed(option.exportName), requests]);
}

export function decodeInfoOption(data: Buffer): InfoOption | string {
  const decoded = decodeExportAndList(data, (c) => c.u16(), (c) => c.u16(), 'malformed NBD_OPT_INFO/NBD_OPT_GO');
  return typeof decoded === 'string' ? decoded : { exportName: decoded.exportName, requests: decoded.items };
}

/**
 * The shape both options that name an export share: the name, a count, that many items, nothing after.
 * Bounded by the data, not by the count: a count larger than the items that fit is malformed, unread.
 */
function decodeExportAndList<T>(data: Buffer, count: (cursor: ByteCursor) => number | undefined, item: (cursor: ByteCursor) => T | undefined, malformed: string): { exportName: string; items: T[] } | string {
  const cursor = new ByteCursor(data);
  const exportName = cursor.lengthPrefixed();
  const wanted = count(cursor);
  if (exportName === undefined || wanted === undefined) return malformed;
  const items: T[] = [];
  while (items.length < wanted) {
    const next = item(cursor);
    if (next === undefined) return malformed;
    items.push(next);
  }
  return cursor.remaining === 0 ? { exportName, items } : malformed;
}

export function encodeServerReply(reply: ServerReply): Buffer {
  return Buffer.concat([encodeLengthPrefixed(reply.name), Buffer.from(reply.description, 'utf8')]);
}

export function decodeServerReply(data: Buffer): ServerReply | string {
  const cursor = new ByteCursor(data);
  const name = cursor.lengthPrefixed(data.length);
  if (name === undefined) return 'malformed NBD_REP_SERVER';
  return { name, description: cursor.rest() };
}

export function encodeMetaContextReply(reply: MetaContextReply): Buffer {
  const out = Buffer.allocUnsafe(4);
  out.writeUInt32BE(reply.id, 0);
  return Buffer.concat([out, Buffer.from(reply.name, 'utf8')]);
}

export function decodeMetaContextReply(data: Buffer): MetaContextReply | string {
  if (data.length < 5) return 'short META_CONTEXT reply';
  return { id: data.readUInt32BE(0), name: data.toString('utf8', 4) };
}

export function encodeInfoReply(info: InfoReply): Buffer {
  switch (info.kind) {
    case 'export': {
      const out = Buffer.allocUnsafe(INFO_EXPORT_SIZE);
      out.writeUInt16BE(P.INFO_EXPORT, 0);
      out.writeBigUInt64BE(BigInt(info.size), 2);
      out.writeUInt16BE(info.flags, 10);
      return out;
    }
    case 'block-size': {
      const out = Buffer.allocUnsafe(INFO_BLOCK_SIZE_SIZE);
      out.writeUInt16BE(P.INFO_BLOCK_SIZE, 0);
      out.writeUInt32BE(info.minimum, 2);
      out.writeUInt32BE(info.preferred, 6);
      out.writeUInt32BE(info.maximum, 10);
      return out;
    }
    case 'name':
      return Buffer.concat([infoType(P.INFO_NAME), Buffer.from(info.name, 'utf8')]);
    case 'description':
      return Buffer.concat([infoType(P.INFO_DESCRIPTION), Buffer.from(info.description, 'utf8')]);
    case 'unknown':
      return infoType(info.type);
  }
}

function infoType(type: number): Buffer {
  const out = Buffer.allocUnsafe(2);
  out.writeUInt16BE(type, 0);
  return out;
}

export function decodeInfoReply(data: Buffer): InfoReply | string {
  if (data.length < 2) return 'short INFO reply';
  const type = data.readUInt16BE(0);
  switch (type) {
    case P.INFO_EXPORT: {
      if (data.length !== INFO_EXPORT_SIZE) return 'bad NBD_INFO_EXPORT length';
      const size = readOffset(data, 2);
      if (size === undefined) return `export size ${data.readBigUInt64BE(2)} is too large`;
      return { kind: 'export', size, flags: data.readUInt16BE(10) };
    }
    case P.INFO_BLOCK_SIZE:
      if (data.length !== INFO_BLOCK_SIZE_SIZE) return 'bad NBD_INFO_BLOCK_SIZE length';
      return { kind: 'block-size', minimum: data.readUInt32BE(2), preferred: data.readUInt32BE(6), maximum: data.readUInt32BE(10) };
    case P.INFO_NAME:
      return { kind: 'name', name: data.toString('utf8', 2) };
    case P.INFO_DESCRIPTION:
      return { kind: 'description', description: data.toString('utf8', 2) };
    default:
      return { kind: 'unknown', type };
  }
}

export function encodeExportNameReply(reply: ExportNameReply, noZeroes: boolean): Buffer {
  const out = Buffer.alloc(EXPORT_NAME_REPLY_SIZE + (noZeroes ? 0 : EXPORT_NAME_PADDING));
  out.writeBigUInt64BE(BigInt(reply.size), 0);
  out.writeUInt16BE(reply.flags, 8);
  return out;
}

/** The reply without its padding (the caller knows whether zeroes follow: it chose NO_ZEROES). */
export function decodeExportNameReply(bytes: Buffer): ExportNameReply | string {
  if (bytes.length !== EXPORT_NAME_REPLY_SIZE) return `export name reply of ${bytes.length} bytes`;
  const size = readOffset(bytes, 0);
  if (size === undefined) return `export size ${bytes.readBigUInt64BE(0)} is too large`;
  return { size, flags: bytes.readUInt16BE(8) };
}
