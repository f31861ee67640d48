/**
 * Index segments (format version 3, SPEC.md 19.3): the store's own index. Each writer lists the blobs of the
 * packs it made in a segment, `index/<writer id>-<seq>`, written once (create-if-absent) after those packs are
 * durable and before any record that references them. The union of the segments is the index; the per-host
 * LevelDB (cache.ts) is only a copy of it.
 *
 *   header (40) || superseded (20 each) || entries (62 each, ascending blob id) || xxh64 (8)
 *
 * In an encrypted repository the whole of it is sealed as a record is (SPEC.md 18.4) with the key as the
 * authenticated name: a segment cannot be passed off under another name, nor read without the data key.
 *
 * A decoder sizes nothing from the bytes before it has checked that their length is exactly the one the
 * counts imply; the counts themselves are bounded.
 */
import { checksum64 } from '../checksum.js';
import {
  FRAME_OVERHEAD,
  ID_SIZE,
  KNOWN_ENCRYPTED_FRAME_FLAGS,
  KIND_DATA,
  KIND_MAP_NODE,
  MAX_FRAME_LENGTH,
  MAX_FRAME_RAW_LENGTH,
  PACK_HEADER_SIZE,
  PACK_ID_SIZE,
  PACK_MAX_SIZE,
  ENCRYPTION_OVERHEAD,
  SEALED_METADATA_HEADER_SIZE,
} from '../constants.js';
import type { BlobLocation } from '../index-entry.js';
import { openMetadata, sealMetadata } from '../sealed-metadata.js';

/** "ESEG". */
export const SEGMENT_MAGIC = Buffer.from('ESEG', 'latin1');
export const SEGMENT_VERSION = 1;
export const SEGMENT_HEADER_SIZE = 40;
export const SEGMENT_NAME_SIZE = PACK_ID_SIZE + 4;
export const SEGMENT_ENTRY_SIZE = ID_SIZE + PACK_ID_SIZE + 4 + 4 + 4 + 1 + 1;
export const SEGMENT_TRAILER_SIZE = 8;
/** Entries of one segment at most (65 MB): a writer with more writes several. 1 TiB of new 1 MiB chunks. */
export const SEGMENT_MAX_ENTRIES = 1024 * 1024;
/** Segments one segment may supersede at most: gc consolidates more in several rounds. */
export const SEGMENT_MAX_SUPERSEDED = 65536;
/** The largest segment object, sealed: whole-object reads are bounded by it. */
export const SEGMENT_MAX_OBJECT_SIZE =
  SEALED_METADATA_HEADER_SIZE + ENCRYPTION_OVERHEAD + SEGMENT_HEADER_SIZE + SEGMENT_MAX_SUPERSEDED * SEGMENT_NAME_SIZE + SEGMENT_MAX_ENTRIES * SEGMENT_ENTRY_SIZE + SEGMENT_TRAILER_SIZE;

export const SEGMENT_PREFIX = 'index/';
const NAME_PATTERN = /^index\/([0-9a-f]{32})-([0-9a-f]{8})$/;

/** Who wrote a segment, and its number among that writer's segments. */
export interface SegmentName {
  /** 32 hex: random per writing process (a backup run, a gc). */
  writer: string;
  /** 0 … 2^32 − 1, ascending per writer. */
  seq: number;
}

export function segmentKey(name: SegmentName): string {
  return `${SEGMENT_PREFIX}${name.writer}-${name.seq.toString(16).padStart(8, '0')}`;
}

/** The name a storage key gives, or undefined for a key that is not a segment's (a stray: skipped). */
export function parseSegmentKey(key: string): SegmentName | undefined {
  const match = NAME_PATTERN.exec(key);
  if (!match) return undefined;
  return { writer: match[1]!, seq: Number.parseInt(match[2]!, 16) };
}

export interface SegmentEntry extends BlobLocation {
  /** 32 bytes. */
  id: Buffer;
}

export interface Segment {
  name: SegmentName;
  /** Segments this one replaces (gc's consolidation): once this one exists, theirs count for nothing. */
  supersedes: SegmentName[];
  /** Strictly ascending by id; at most one entry per blob. */
  entries: SegmentEntry[];
}

/** Encrypted repositories pass their data key; plain ones pass nothing. */
export interface SegmentCodecOptions {
  dataKey?: Uint8Array | undefined;
}

function compareNames(a: SegmentName, b: SegmentName): number {
  return a.writer < b.writer ? -1 : a.writer > b.writer ? 1 : a.seq - b.seq;
}

/** Why `location` cannot be a frame's place in a pack, or undefined. */
export function locationProblem(location: BlobLocation): string | undefined {
  if (!/^[0-9a-f]{32}$/.test(location.packId)) return 'pack id is not 32 hex';
  return placeProblem(location.offset, location.length, location.rawLength, location.kind, location.flags);
}

/** Why these numbers cannot be a frame's place in a pack, or undefined (locationProblem without the pack id). */
function placeProblem(offset: number, length: number, rawLength: number, kind: number, flags: number): string | undefined {
  if (!Number.isSafeInteger(offset) || offset < PACK_HEADER_SIZE) return `offset ${offset} is before the first frame`;
  if (!Number.isSafeInteger(length) || length <= FRAME_OVERHEAD || length > MAX_FRAME_LENGTH) return `frame length ${length} is impossible`;
  if (offset + length > PACK_MAX_SIZE) return 'the frame ends past the largest pack';
  if (!Number.isSafeInteger(rawLength) || rawLength < 1 || rawLength > MAX_FRAME_RAW_LENGTH) return `raw length ${rawLength} is impossible`;
  if (kind < KIND_DATA || kind > KIND_MAP_NODE) return `unknown kind ${kind}`;
  if (!Number.isInteger(flags) || flags < 0 || (flags & ~KNOWN_ENCRYPTED_FRAME_FLAGS) !== 0) return `unknown flags ${flags}`;
  return undefined;
}

/** The plaintext bytes of a segment; throws RangeError on a caller's bug (unsorted, duplicate or impossible entries). */
export function encodeSegmentPlain(segment: Segment): Buffer {
  const { name, supersedes, entries } = segment;
  if (!/^[0-9a-f]{32}$/.test(name.writer) || !Number.isInteger(name.seq) || name.seq < 0 || name.seq > 0xffff_ffff) throw new RangeError('invalid segment name');
  if (entries.length > SEGMENT_MAX_ENTRIES) throw new RangeError(`a segment holds at most ${SEGMENT_MAX_ENTRIES} entries`);
  if (supersedes.length > SEGMENT_MAX_SUPERSEDED) throw new RangeError(`a segment supersedes at most ${SEGMENT_MAX_SUPERSEDED} segments`);
  const size = SEGMENT_HEADER_SIZE + supersedes.length * SEGMENT_NAME_SIZE + entries.length * SEGMENT_ENTRY_SIZE + SEGMENT_TRAILER_SIZE;
  const out = Buffer.alloc(size);
  SEGMENT_MAGIC.copy(out, 0);
  out.writeUInt16LE(SEGMENT_VERSION, 4);
  out.write(name.writer, 8, 'hex');
  out.writeUInt32LE(name.seq, 24);
  out.writeUInt32LE(entries.length, 28);
  out.writeUInt32LE(supersedes.length, 32);
  let at = SEGMENT_HEADER_SIZE;
  for (let i = 0; i < supersedes.length; i++) {
    const old = supersedes[i]!;
    if (i > 0 && compareNames(supersedes[i - 1]!, old) >= 0) throw new RangeError('superseded segments must be strictly ascending');
    if (compareNames(old, name) === 0) throw new RangeError('a segment cannot supersede itself');
    out.write(old.writer, at, 'hex');
    out.writeUInt32LE(old.seq, at + PACK_ID_SIZE);
    at += SEGMENT_NAME_SIZE;
  }
  for (let i = 0; i < entries.length; i++) {
    const entry = entries[i]!;
    if (entry.id.length !== ID_SIZE) throw new RangeError('a blob id is 32 bytes');
    if (i > 0 && Buffer.compare(entries[i - 1]!.id, entry.id) >= 0) throw new RangeError('segment entries must be strictly ascending by blob id');
    const problem = locationProblem(entry);
    if (problem) throw new RangeError(`segment entry: ${problem}`);
    entry.id.copy(out, at);
    out.write(entry.packId, at + 32, 'hex');
    out.writeUInt32LE(entry.offset, at + 48);
    out.writeUInt32LE(entry.length, at + 52);
    out.writeUInt32LE(entry.rawLength, at + 56);
    out.writeUInt8(entry.kind, at + 60);
    out.writeUInt8(entry.flags, at + 61);
    at += SEGMENT_ENTRY_SIZE;
  }
  out.writeBigUInt64LE(checksum64(out.subarray(0, at)), at);
  return out;
}

/** The object stored at segmentKey(segment.name): sealed when a data key is given. */
export function encodeSegment(segment: Segment, options: SegmentCodecOptions = {}): Buffer {
  const plain = encodeSegmentPlain(segment);
  return options.dataKey ? sealMetadata(options.dataKey, plain, segmentKey(segment.name)) : plain;
}

export interface SegmentHeader {
  name: SegmentName;
  /** Entries. */
  count: number;
  /** Superseded names, which follow the header. */
  superseded: number;
  /** The whole segment's length, as the counts give it. */
  size: number;
}

/** The header (the first SEGMENT_HEADER_SIZE bytes of a plain segment), or why it is not a segment's. */
export function decodeSegmentHeader(bytes: Buffer): SegmentHeader | string {
  if (bytes.length < SEGMENT_HEADER_SIZE) return `too short for a segment (${bytes.length} bytes)`;
  if (!bytes.subarray(0, 4).equals(SEGMENT_MAGIC)) return 'not a segment (no ESEG magic)';
  const version = bytes.readUInt16LE(4);
  if (version !== SEGMENT_VERSION) return `unknown segment version ${version}`;
  if (bytes.readUInt16LE(6) !== 0 || bytes.readUInt32LE(36) !== 0) return 'reserved header bytes are not zero';
  const count = bytes.readUInt32LE(28);
  const superseded = bytes.readUInt32LE(32);
  if (count > SEGMENT_MAX_ENTRIES) return `${count} entries, more than the ${SEGMENT_MAX_ENTRIES} a segment may hold`;
  if (superseded > SEGMENT_MAX_SUPERSEDED) return `${superseded} superseded segments, more than ${SEGMENT_MAX_SUPERSEDED}`;
  const size = SEGMENT_HEADER_SIZE + superseded * SEGMENT_NAME_SIZE + count * SEGMENT_ENTRY_SIZE + SEGMENT_TRAILER_SIZE;
  return { name: { writer: bytes.toString('hex', 8, 24), seq: bytes.readUInt32LE(24) }, count, superseded, size };
}

/** The superseded names in `bytes` (20 bytes each, from `at`), or why they are not in order. */
export function decodeSupersededNames(bytes: Buffer, at: number, count: number, own: SegmentName): SegmentName[] | string {
  const supersedes: SegmentName[] = [];
  for (let i = 0; i < count; i++, at += SEGMENT_NAME_SIZE) {
    const old: SegmentName = { writer: bytes.toString('hex', at, at + PACK_ID_SIZE), seq: bytes.readUInt32LE(at + PACK_ID_SIZE) };
    if (i > 0 && compareNames(supersedes[i - 1]!, old) >= 0) return 'superseded segments are not strictly ascending';
    if (compareNames(old, own) === 0) return 'the segment supersedes itself';
    supersedes.push(old);
  }
  return supersedes;
}

/**
 * A segment checked whole (length, checksum, name, superseded names, every entry's order and place) whose
 * entries stay in its bytes: readers that take entries one by one (the cache's catch-up, gc's working
 * index, repair) hold the segment's bytes and a few entries, never an object per entry (SPEC.md 19.4).
 */
export interface SegmentView {
  name: SegmentName;
  supersedes: SegmentName[];
  /** Entries. */
  count: number;
  /** The plaintext bytes; entry i is the SEGMENT_ENTRY_SIZE bytes at entryOffset(view, i). */
  bytes: Buffer;
  /** Where the first entry starts in `bytes`. */
  entriesAt: number;
}

/** Where entry `i` of the view starts in its bytes: its blob id (32 bytes), then its location (30, as encodeLocation). */
export function entryOffset(view: SegmentView, i: number): number {
  return view.entriesAt + i * SEGMENT_ENTRY_SIZE;
}

/** Entry `i` of the view as an object. */
export function entryAt(view: SegmentView, i: number): SegmentEntry {
  const at = entryOffset(view, i);
  return { id: Buffer.from(view.bytes.subarray(at, at + ID_SIZE)), ...locationAt(view, i) };
}

/** Where entry `i` of the view says its blob is (no copy of its id: what a scan of the entries needs). */
export function locationAt(view: SegmentView, i: number): BlobLocation {
  const { bytes } = view;
  const at = entryOffset(view, i);
  return {
    packId: bytes.toString('hex', at + 32, at + 48),
    offset: bytes.readUInt32LE(at + 48),
    length: bytes.readUInt32LE(at + 52),
    rawLength: bytes.readUInt32LE(at + 56),
    kind: bytes.readUInt8(at + 60),
    flags: bytes.readUInt8(at + 61),
  };
}

/** A plain segment checked whole, its entries left in its bytes; or why the bytes are not one. */
export function viewSegmentPlain(bytes: Buffer, expected?: SegmentName): SegmentView | string {
  if (bytes.length < SEGMENT_HEADER_SIZE + SEGMENT_TRAILER_SIZE) return `too short for a segment (${bytes.length} bytes)`;
  const header = decodeSegmentHeader(bytes);
  if (typeof header === 'string') return header;
  const { name, count, superseded, size } = header;
  if (bytes.length !== size) return `${bytes.length} bytes, where its counts need ${size}`;
  const body = size - SEGMENT_TRAILER_SIZE;
  if (bytes.readBigUInt64LE(body) !== checksum64(bytes.subarray(0, body))) return 'checksum mismatch';
  if (expected && compareNames(name, expected) !== 0) return `it names itself ${segmentKey(name)}, not ${segmentKey(expected)}`;
  const supersedes = decodeSupersededNames(bytes, SEGMENT_HEADER_SIZE, superseded, name);
  if (typeof supersedes === 'string') return supersedes;
  const entriesAt = SEGMENT_HEADER_SIZE + superseded * SEGMENT_NAME_SIZE;
  for (let i = 0, at = entriesAt; i < count; i++, at += SEGMENT_ENTRY_SIZE) {
    // Ids compared in place (no copy): strictly ascending.
    if (i > 0 && bytes.compare(bytes, at - SEGMENT_ENTRY_SIZE, at - SEGMENT_ENTRY_SIZE + ID_SIZE, at, at + ID_SIZE) <= 0) return `entry ${i} is not in ascending blob id order`;
    // 16 raw bytes are always 32 hex: only the numbers can be wrong.
    const problem = placeProblem(bytes.readUInt32LE(at + 48), bytes.readUInt32LE(at + 52), bytes.readUInt32LE(at + 56), bytes.readUInt8(at + 60), bytes.readUInt8(at + 61));
    if (problem) return `entry ${i}: ${problem}`;
  }
  return { name, supersedes, count, bytes, entriesAt };
}

/** A decoded segment, or why the bytes are not one (the caller names the object). */
export function decodeSegmentPlain(bytes: Buffer, expected?: SegmentName): Segment | string {
  const view = viewSegmentPlain(bytes, expected);
  return typeof view === 'string' ? view : segmentOfView(view);
}

/** Every entry of the view as an object (what small readers and tests want; large ones take entries one by one). */
export function segmentOfView(view: SegmentView): Segment {
  const entries: SegmentEntry[] = new Array<SegmentEntry>(view.count);
  for (let i = 0; i < view.count; i++) entries[i] = entryAt(view, i);
  return { name: view.name, supersedes: view.supersedes, entries };
}

/** The object stored under `key` (opened first in an encrypted repository), checked whole, entries left in its bytes. */
export function viewSegment(bytes: Buffer, key: string, options: SegmentCodecOptions = {}): SegmentView | string {
  const name = parseSegmentKey(key);
  if (!name) return `${key} is not a segment's name`;
  if (bytes.length > SEGMENT_MAX_OBJECT_SIZE) return `${bytes.length} bytes, more than any segment`;
  let plain = bytes;
  if (options.dataKey) {
    const opened = openMetadata(options.dataKey, bytes, key);
    if (typeof opened === 'string') return opened;
    plain = opened;
  }
  return viewSegmentPlain(plain, name);
}

/** Decodes the object stored under `key` (opened first in an encrypted repository). */
export function decodeSegment(bytes: Buffer, key: string, options: SegmentCodecOptions = {}): Segment | string {
  const view = viewSegment(bytes, key, options);
  return typeof view === 'string' ? view : segmentOfView(view);
}

export { compareNames as compareSegmentNames };
