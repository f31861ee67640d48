/**
 * Index entry: where one blob lives. LevelDB key = 0x01 || blob id (33 B); value (30 B):
 *   packId (16) || frameOffset u32 LE || frameLength u32 LE || rawLength u32 LE || kind u8 || flags u8
 */
import { INDEX_ENTRY_SIZE, KEY_PREFIX_BLOB, ID_SIZE, PACK_ID_SIZE } from './constants.js';

export interface BlobLocation {
  packId: string;
  offset: number;
  length: number;
  rawLength: number;
  kind: number;
  flags: number;
}

export interface IndexEntry extends BlobLocation {
  id: Buffer;
}

export function blobKey(id: Uint8Array): Buffer {
  const key = Buffer.allocUnsafe(1 + ID_SIZE);
  key[0] = KEY_PREFIX_BLOB;
  key.set(id.subarray(0, ID_SIZE), 1);
  return key;
}

export function encodeLocation(location: BlobLocation): Buffer {
  const value = Buffer.alloc(INDEX_ENTRY_SIZE);
  Buffer.from(location.packId, 'hex').copy(value, 0, 0, PACK_ID_SIZE);
  value.writeUInt32LE(location.offset, 16);
  value.writeUInt32LE(location.length, 20);
  value.writeUInt32LE(location.rawLength, 24);
  value.writeUInt8(location.kind, 28);
  value.writeUInt8(location.flags, 29);
  return value;
}

export function decodeLocation(value: Uint8Array): BlobLocation | undefined {
  if (value.length !== INDEX_ENTRY_SIZE) return undefined;
  const buf = Buffer.from(value.buffer, value.byteOffset, value.byteLength);
  return {
    packId: buf.toString('hex', 0, PACK_ID_SIZE),
    offset: buf.readUInt32LE(16),
    length: buf.readUInt32LE(20),
    rawLength: buf.readUInt32LE(24),
    kind: buf.readUInt8(28),
    flags: buf.readUInt8(29),
  };
}

/**
 * The index as blob writers and readers use it: where blobs are, and a writer's new packs' entries. The
 * repository's LevelDB (index-store.ts) in versions 1 and 2; in version 3 a session's cache of the segments
 * and its own pending entries (v3/session.ts).
 */
export interface BlobIndex {
  lookup(ids: readonly Buffer[]): Promise<(BlobLocation | undefined)[]>;
  addEntries(entries: readonly IndexEntry[]): Promise<void>;
}
