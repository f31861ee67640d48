/**
 * An independent reader of the engine's repository format, written from SPEC.md alone (no code of the
 * project): formats 1 (plain), 2 (encrypted) and 3 (index segments, plain or encrypted, a folder or a copy
 * of an S3 prefix whose keys became relative paths, SPEC 19.2 and 20.2). It lists the backups and restores
 * every disk of a backup to a file, checking what SPEC says a reader checks. Only node: built-ins.
 *
 * Where it finds a blob:
 * - format 3: the effective index segments (SPEC 19.3), the first segment by key winning; packs are never
 *   walked to find a frame.
 * - formats 1 and 2: the LevelDB index is not read; the reader walks the pack files' frame headers (SPEC 6:
 *   "Frames are self-describing, so the list of blobs in a pack is found by walking frame headers",
 *   the same walk SPEC 6 uses to rebuild the index), skipping quarantined frames (SPEC 12.5).
 */
import { createDecipheriv, createHash, createHmac, scryptSync } from 'node:crypto';
import { closeSync, fstatSync, ftruncateSync, lstatSync, openSync, readdirSync, readFileSync, readSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { lz4BlockDecode } from './lz4.js';
import { zstdDecode } from './zstd.js';
import { xxh64 } from './xxh64.js';

export class SpecReaderError extends Error {
  constructor(readonly code: string, message: string) {
    super(`${code}: ${message}`);
  }
}

const corruptFrame = (where: string, why: string) => new SpecReaderError('ENGINE_CORRUPT_FRAME', `${where}: ${why}`);
const corruptMeta = (where: string, why: string) => new SpecReaderError('ENGINE_CORRUPT_METADATA', `${where}: ${why}`);
const notRepo = (why: string) => new SpecReaderError('ENGINE_NOT_A_REPOSITORY', why);

const HEX32 = /^[0-9a-f]{32}$/;
const HEX64 = /^[0-9a-f]{64}$/;
const ZERO_ID = '0'.repeat(64);
const MIB = 1024 * 1024;
const MAX_RAW = 16 * MIB;
const FRAME_HEADER = 48;
const FRAME_OVERHEAD = 56;
const PACK_HEADER = 32;
const PACK_MAGIC = Buffer.from([0x45, 0x50, 0x41, 0x43, 0x4b, 0x00, 0x01, 0x0a]);
const FRAME_MAGIC = Buffer.from('EFRM', 'latin1');
const SEGMENT_MAGIC = Buffer.from('ESEG', 'latin1');
const SEAL_MAGIC = Buffer.from('EENC', 'latin1');
const GCM_NONCE = 12;
const GCM_TAG = 16;
const GCM_OVERHEAD = GCM_NONCE + GCM_TAG; // 28 (SPEC 18.3)
const SEGMENT_HEADER = 40;
const SEGMENT_NAME = 20;
const SEGMENT_ENTRY = 62;
const MAX_SEGMENT_ENTRIES = 1048576;
const MAX_SUPERSEDED = 65536;
const MAX_RECORD_BYTES = 16 * MIB;
const MAX_DISK = 2 ** 50;
const PAGE_ENTRIES = 1024;

/** Where a blob is: SPEC 7's 30-byte location. */
export interface Location {
  pack: string;
  offset: number;
  frameLength: number;
  rawLength: number;
  kind: number;
  flags: number;
}

export interface Config {
  format: string;
  version: number;
  id: string;
  blockSize: number;
  encrypted: boolean;
  keyFile?: string;
}

export interface DiskRecord {
  name: string;
  size: number;
  map: { root: string; depth: number; blocks: number };
}

export interface BackupRecord {
  id: string;
  name: string;
  type: string;
  startTime: string;
  blockSize: number;
  disks: DiskRecord[];
}

export interface RestoreResult {
  bytes: number;
  chunksRead: number;
  zeroBlocks: number;
  pagesRead: number;
}

export interface IndexReport {
  /** How the index was found: `segments` (format 3) or `pack-walk` (formats 1 and 2). */
  source: 'segments' | 'pack-walk';
  segmentsPresent: number;
  segmentsEffective: number;
  segmentsSuperseded: number;
  entries: number;
  /** Entries of effective segments that lost to an earlier key (SPEC 19.3 duplicates). */
  duplicates: number;
  strays: string[];
  quarantinedSkipped: number;
  /** Formats 1 and 2: where a pack's walk stopped at damage (SPEC 6). */
  damage: string[];
}

interface Keys {
  dataKey: Buffer;
  idKey: Buffer;
}

function readJson(path: string, what: string, limit = MAX_RECORD_BYTES): unknown {
  const st = lstatSync(path);
  if (!st.isFile()) throw corruptMeta(what, 'not a regular file');
  if (st.size > limit) throw corruptMeta(what, `larger than ${limit} bytes`);
  const text = readFileSync(path, 'utf8');
  try {
    return JSON.parse(text) as unknown;
  } catch (error) {
    throw corruptMeta(what, `not JSON (${(error as Error).message})`);
  }
}

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);
const isWhole = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;

function gcmOpen(key: Buffer, nonce: Buffer, ciphertext: Buffer, tag: Buffer, aad: Buffer): Buffer | undefined {
  const decipher = createDecipheriv('aes-256-gcm', key, nonce);
  decipher.setAAD(aad);
  decipher.setAuthTag(tag);
  try {
    return Buffer.concat([decipher.update(ciphertext), decipher.final()]);
  } catch {
    return undefined;
  }
}

/** SPEC 18.4 (records) and 19.3 (segments): "EENC" || 0x01 || nonce || GCM(...) || tag, aad = 5 bytes || name. */
function unseal(keys: Keys, sealed: Buffer, name: string): Buffer {
  if (sealed.length < 5 + GCM_OVERHEAD) throw corruptMeta(name, `sealed object of ${sealed.length} bytes is shorter than 33`);
  if (!sealed.subarray(0, 4).equals(SEAL_MAGIC)) throw corruptMeta(name, 'no EENC magic');
  if (sealed[4] !== 1) throw corruptMeta(name, `sealed version ${sealed[4]}`);
  const nonce = sealed.subarray(5, 5 + GCM_NONCE);
  const tag = sealed.subarray(sealed.length - GCM_TAG);
  const aad = Buffer.concat([sealed.subarray(0, 5), Buffer.from(name, 'utf8')]);
  const plain = gcmOpen(keys.dataKey, nonce, sealed.subarray(5 + GCM_NONCE, sealed.length - GCM_TAG), tag, aad);
  if (plain === undefined) throw corruptMeta(name, 'authentication failed (AES-256-GCM tag)');
  return plain;
}

function readRange(fd: number, position: number, length: number): Buffer {
  const buf = Buffer.alloc(length);
  let done = 0;
  while (done < length) {
    const n = readSync(fd, buf, done, length - done, position + done);
    if (n === 0) break;
    done += n;
  }
  return done === length ? buf : buf.subarray(0, done);
}

/** Blocks a map covers -> its depth (SPEC 8): the smallest d >= 0 with 1024^(d+1) >= blocks. */
export function depthFor(blocks: number): number {
  let depth = 0;
  while (PAGE_ENTRIES ** (depth + 1) < blocks) depth++;
  return depth;
}

export class Repository {
  readonly config: Config;
  private keys: Keys | undefined;
  private index = new Map<string, Location>();
  private packFds = new Map<string, number>();
  report!: IndexReport;

  private constructor(readonly root: string, config: Config) {
    this.config = config;
  }

  static open(root: string, options: { passphrase?: Buffer | string } = {}): Repository {
    const config = readConfig(root);
    const repo = new Repository(root, config);
    if (config.encrypted) {
      if (options.passphrase === undefined) throw new SpecReaderError('ENGINE_PASSPHRASE_REQUIRED', 'an encrypted repository needs its passphrase');
      const passphrase = typeof options.passphrase === 'string' ? Buffer.from(options.passphrase, 'utf8') : options.passphrase;
      repo.keys = openKeyFile(root, config, passphrase);
    }
    if (config.version === 3) repo.loadSegments();
    else repo.walkPacks();
    return repo;
  }

  close(): void {
    for (const fd of this.packFds.values()) closeSync(fd);
    this.packFds.clear();
  }

  lookup(id: string): Location | undefined {
    return this.index.get(id);
  }

  // ---- backups ---------------------------------------------------------------------------------------

  /** Record ids: regular files of backups/ named by 32 hex (SPEC 2: anything else is a stray). */
  listBackupIds(): string[] {
    const dir = join(this.root, 'backups');
    let names: string[];
    try {
      names = readdirSync(dir);
    } catch {
      return [];
    }
    return names.filter((n) => HEX32.test(n) && lstatSync(join(dir, n)).isFile()).sort();
  }

  listBackups(): BackupRecord[] {
    return this.listBackupIds()
      .map((id) => this.readRecord(id))
      .sort((a, b) => (a.startTime < b.startTime ? -1 : a.startTime > b.startTime ? 1 : 0));
  }

  readRecord(id: string): BackupRecord {
    const name = `backups/${id}`;
    const path = join(this.root, 'backups', id);
    const st = lstatSync(path);
    if (st.size > MAX_RECORD_BYTES) throw corruptMeta(name, 'record larger than 16 MiB');
    let bytes: Buffer = readFileSync(path);
    if (this.keys !== undefined) bytes = unseal(this.keys, bytes, name);
    let json: unknown;
    try {
      json = JSON.parse(bytes.toString('utf8')) as unknown;
    } catch (error) {
      throw corruptMeta(name, `not JSON (${(error as Error).message})`);
    }
    return validateRecord(json, id, this.config.blockSize);
  }

  // ---- restore ---------------------------------------------------------------------------------------

  /** Restores one disk of one backup into `outPath` (created or truncated), checking every frame. */
  restoreDisk(record: BackupRecord, diskName: string, outPath: string): RestoreResult {
    const disk = record.disks.find((d) => d.name === diskName);
    if (disk === undefined) throw new SpecReaderError('ENGINE_NOT_FOUND', `backup ${record.id} has no disk ${diskName}`);
    const result: RestoreResult = { bytes: disk.size, chunksRead: 0, zeroBlocks: 0, pagesRead: 0 };
    const fd = openSync(outPath, 'w', 0o600);
    try {
      ftruncateSync(fd, 0);
      ftruncateSync(fd, disk.size); // zero blocks stay holes: they read as zeros
      const { root, depth, blocks } = disk.map;
      if (blocks > 0) this.walkPage(record, disk, fd, root, depth, 0, blocks, result);
      if (fstatSync(fd).size !== disk.size) throw new Error(`restored ${outPath} is not ${disk.size} bytes`);
    } finally {
      closeSync(fd);
    }
    return result;
  }

  private walkPage(record: BackupRecord, disk: DiskRecord, fd: number, pageId: string, level: number, firstBlock: number, blockCount: number, result: RestoreResult): void {
    if (pageId === ZERO_ID) {
      result.zeroBlocks += blockCount;
      return;
    }
    const span = PAGE_ENTRIES ** level; // blocks under each entry of this page
    const entries = level === 0 ? blockCount : Math.ceil(blockCount / span);
    const where = `backup ${record.id} disk ${disk.name} map page ${pageId} (level ${level}, block ${firstBlock})`;
    // Ids name content, not roles (SPEC 8): any kind is accepted, the length is what matters.
    const page = this.readBlob(pageId, where);
    result.pagesRead++;
    if (page.length !== entries * 32) throw corruptMeta(where, `page holds ${page.length} bytes, its position implies ${entries} entries (${entries * 32} bytes)`);
    for (let i = 0; i < entries; i++) {
      const child = page.subarray(i * 32, i * 32 + 32).toString('hex');
      if (level > 0) {
        const childFirst = firstBlock + i * span;
        const childCount = Math.min(span, firstBlock + blockCount - childFirst);
        this.walkPage(record, disk, fd, child, level - 1, childFirst, childCount, result);
        continue;
      }
      const block = firstBlock + i;
      if (child === ZERO_ID) {
        result.zeroBlocks++;
        continue;
      }
      const offset = block * this.config.blockSize;
      const length = Math.min(this.config.blockSize, disk.size - offset);
      const chunk = this.readBlob(child, `backup ${record.id} disk ${disk.name} offset ${offset}`);
      if (chunk.length !== length) throw corruptFrame(`backup ${record.id} disk ${disk.name} offset ${offset}`, `chunk ${child} holds ${chunk.length} bytes, the block ${length}`);
      let written = 0;
      while (written < length) written += writeSync(fd, chunk, written, length - written, offset + written);
      result.chunksRead++;
    }
  }

  /** Reads the blob `id` through the index and checks its frame in full (SPEC 5, 18.3). */
  readBlob(id: string, why: string): Buffer {
    const loc = this.index.get(id);
    if (loc === undefined) throw new SpecReaderError('ENGINE_CORRUPT_METADATA', `${why}: blob ${id} is in no index entry`);
    const fd = this.packFd(loc.pack, why);
    const where = `pack ${loc.pack} offset ${loc.offset} (${why})`;
    const frame = readRange(fd, loc.offset, loc.frameLength);
    if (frame.length !== loc.frameLength) throw corruptFrame(where, `pack ends ${frame.length} bytes into a frame of ${loc.frameLength}`);
    const plain = this.checkFrame(frame, where, id);
    if (frame.readUInt32LE(12) + FRAME_OVERHEAD !== loc.frameLength) throw corruptFrame(where, 'frame length in the index differs from the header');
    return plain;
  }

  private packFd(pack: string, why: string): number {
    let fd = this.packFds.get(pack);
    if (fd === undefined) {
      try {
        fd = openSync(join(this.root, 'packs', pack.slice(0, 2), pack), 'r');
      } catch (error) {
        throw corruptFrame(`pack ${pack} (${why})`, `cannot be opened: ${(error as Error).message}`);
      }
      this.packFds.set(pack, fd);
    }
    return fd;
  }

  /**
   * SPEC 5's checks in order (plain): magic, kind, flags, reserved, rawLength, storedLength, uncompressed
   * equality, checksum, [id asked for], lz4 prefix (or the zstd frame header's rules), decompressed length,
   * SHA-256 = id. Encrypted (18.3): the header rules, checksum, id asked for, GCM tag, lz4 prefix or zstd
   * header and length, HMAC-SHA256 = id.
   */
  checkFrame(frame: Buffer, where: string, expectedId?: string): Buffer {
    const header = this.checkFrameHeader(frame, where);
    const { storedLength, rawLength, codec } = header;
    if (frame.length !== FRAME_OVERHEAD + storedLength) throw corruptFrame(where, 'frame length differs from 56 + storedLength');
    const checksum = frame.readBigUInt64LE(FRAME_HEADER + storedLength);
    const computed = xxh64(frame.subarray(0, FRAME_HEADER + storedLength));
    if (checksum !== computed) throw corruptFrame(where, `checksum mismatch (stored ${checksum.toString(16)}, computed ${computed.toString(16)})`);
    const headerId = frame.subarray(16, 48).toString('hex');
    if (expectedId !== undefined && headerId !== expectedId) throw corruptFrame(where, `frame holds blob ${headerId}, not ${expectedId}`);
    let inner = frame.subarray(FRAME_HEADER, FRAME_HEADER + storedLength);
    if (this.keys !== undefined) {
      const opened = gcmOpen(this.keys.dataKey, inner.subarray(0, GCM_NONCE), inner.subarray(GCM_NONCE, inner.length - GCM_TAG), inner.subarray(inner.length - GCM_TAG), frame.subarray(0, FRAME_HEADER));
      if (opened === undefined) throw corruptFrame(where, 'authentication failed (AES-256-GCM tag)');
      inner = opened;
    }
    let plain: Buffer;
    if (codec === 'zstd') {
      try {
        plain = zstdDecode(inner, rawLength);
      } catch (error) {
        throw corruptFrame(where, (error as Error).message);
      }
    } else if (codec === 'lz4') {
      if (inner.length < 5) throw corruptFrame(where, 'compressed payload shorter than its size prefix');
      const prefix = inner.readUInt32LE(0);
      if (prefix !== rawLength) throw corruptFrame(where, `lz4 size prefix ${prefix} differs from rawLength ${rawLength}`);
      try {
        plain = lz4BlockDecode(inner.subarray(4), rawLength);
      } catch (error) {
        throw corruptFrame(where, (error as Error).message);
      }
    } else {
      plain = Buffer.from(inner);
    }
    if (plain.length !== rawLength) throw corruptFrame(where, `plaintext of ${plain.length} bytes, rawLength ${rawLength}`);
    const id = this.keys !== undefined ? createHmac('sha256', this.keys.idKey).update(plain).digest('hex') : createHash('sha256').update(plain).digest('hex');
    if (id !== headerId) throw corruptFrame(where, `content hashes to ${id}, the header says ${headerId}`);
    return plain;
  }

  private checkFrameHeader(frame: Buffer, where: string): { kind: number; flags: number; rawLength: number; storedLength: number; codec: 'lz4' | 'zstd' | undefined } {
    if (frame.length < FRAME_HEADER) throw corruptFrame(where, 'frame header cut short');
    if (!frame.subarray(0, 4).equals(FRAME_MAGIC)) throw corruptFrame(where, 'bad frame magic');
    const kind = frame[4] as number;
    if (kind < 1 || kind > 3) throw corruptFrame(where, `unknown frame kind ${kind}`);
    const flags = frame[5] as number;
    // SPEC 5: bit 0 lz4, bit 1 encrypted, bit 2 zstd, bits 3-7 reserved; never bits 0 and 2 together.
    if (flags > 7) throw corruptFrame(where, 'unknown frame flags');
    const lz4 = flags % 2 === 1;
    const encryptedFlag = Math.floor(flags / 2) % 2 === 1;
    const zstd = flags >= 4;
    if (lz4 && zstd) throw corruptFrame(where, 'frame flags name lz4 and zstd');
    if (this.keys === undefined && encryptedFlag) throw corruptFrame(where, 'unknown frame flags');
    if (this.keys !== undefined && !encryptedFlag) throw corruptFrame(where, 'frame is not encrypted');
    if (frame[6] !== 0 || frame[7] !== 0) throw corruptFrame(where, 'reserved bytes not zero');
    const rawLength = frame.readUInt32LE(8);
    const storedLength = frame.readUInt32LE(12);
    if (rawLength < 1 || rawLength > MAX_RAW) throw corruptFrame(where, `rawLength ${rawLength} out of range`);
    const compressed = lz4 || zstd;
    const innerLength = this.keys !== undefined ? storedLength - GCM_OVERHEAD : storedLength;
    if (innerLength < 1 || innerLength > rawLength) throw corruptFrame(where, `storedLength ${storedLength} out of range`);
    if (!compressed && innerLength !== rawLength) throw corruptFrame(where, 'uncompressed frame whose stored length differs from rawLength');
    return { kind, flags, rawLength, storedLength, codec: lz4 ? 'lz4' : zstd ? 'zstd' : undefined };
  }

  // ---- format 3: index segments (SPEC 19.3) --------------------------------------------------------

  private loadSegments(): void {
    const dir = join(this.root, 'index');
    const report: IndexReport = { source: 'segments', segmentsPresent: 0, segmentsEffective: 0, segmentsSuperseded: 0, entries: 0, duplicates: 0, strays: [], quarantinedSkipped: 0, damage: [] };
    let names: string[] = [];
    try {
      names = readdirSync(dir);
    } catch {
      names = [];
    }
    const segments: ParsedSegment[] = [];
    // Listing order: ascending UTF-8 bytes of the keys (SPEC 20.1); compare buffers, not UTF-16.
    names.sort((a, b) => Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8')));
    for (const name of names) {
      const path = join(dir, name);
      if (!/^[0-9a-f]{32}-[0-9a-f]{8}$/.test(name) || !lstatSync(path).isFile()) {
        report.strays.push(`index/${name}`);
        continue;
      }
      segments.push(this.readSegment(`index/${name}`, path));
    }
    report.segmentsPresent = segments.length;
    const superseded = new Set<string>();
    for (const seg of segments) for (const n of seg.superseded) superseded.add(n);
    for (const seg of segments) {
      if (superseded.has(seg.name)) {
        report.segmentsSuperseded++;
        continue;
      }
      report.segmentsEffective++;
      for (const [id, loc] of seg.entries) {
        if (this.index.has(id)) {
          report.duplicates++;
          continue;
        }
        this.index.set(id, loc);
      }
    }
    report.entries = this.index.size;
    this.report = report;
  }

  private readSegment(key: string, path: string): ParsedSegment {
    const maxPlain = SEGMENT_HEADER + MAX_SUPERSEDED * SEGMENT_NAME + MAX_SEGMENT_ENTRIES * SEGMENT_ENTRY + 8;
    const maxStored = this.keys !== undefined ? maxPlain + 5 + GCM_OVERHEAD : maxPlain;
    const size = lstatSync(path).size;
    if (size > maxStored) throw corruptMeta(key, `object of ${size} bytes is larger than the largest segment`);
    let bytes: Buffer = readFileSync(path);
    if (this.keys !== undefined) bytes = unseal(this.keys, bytes, key);
    return parseSegment(bytes, key, this.keys !== undefined);
  }

  // ---- formats 1 and 2: the pack walk (SPEC 6) -----------------------------------------------------

  private walkPacks(): void {
    const report: IndexReport = { source: 'pack-walk', segmentsPresent: 0, segmentsEffective: 0, segmentsSuperseded: 0, entries: 0, duplicates: 0, strays: [], quarantinedSkipped: 0, damage: [] };
    const quarantined = this.readQuarantine();
    const packsDir = join(this.root, 'packs');
    const prefixes = readdirSync(packsDir).filter((p) => /^[0-9a-f]{2}$/.test(p)).sort();
    for (const prefix of prefixes) {
      const sub = join(packsDir, prefix);
      if (!lstatSync(sub).isDirectory()) continue;
      for (const name of readdirSync(sub).sort()) {
        const path = join(sub, name);
        if (!HEX32.test(name) || !name.startsWith(prefix) || !lstatSync(path).isFile()) {
          report.strays.push(`packs/${prefix}/${name}`);
          continue;
        }
        this.walkPack(name, path, quarantined, report);
      }
    }
    report.entries = this.index.size;
    this.report = report;
  }

  private walkPack(pack: string, path: string, quarantined: Set<string>, report: IndexReport): void {
    const fd = openSync(path, 'r');
    try {
      const size = fstatSync(fd).size;
      const header = readRange(fd, 0, PACK_HEADER);
      // SPEC 2: a pack-named file whose header is not a pack's is NOT_A_PACK: skipped.
      if (header.length < PACK_HEADER || !header.subarray(0, 8).equals(PACK_MAGIC) || header.readUInt32LE(8) !== 1 || header.readUInt32LE(12) !== 0 || header.subarray(16, 32).toString('hex') !== pack) {
        report.strays.push(`packs/${pack.slice(0, 2)}/${pack} (not a pack)`);
        return;
      }
      let offset = PACK_HEADER;
      while (offset < size) {
        const frameHeader = readRange(fd, offset, FRAME_HEADER);
        const where = `pack ${pack} offset ${offset}`;
        // SPEC 6: a header that fails its checks, or a frame past the end of the file, ends this pack's walk
        // and is damage at that offset; the frames before it stay found, and a block that needed a frame
        // behind the damage fails at restore (no index entry) rather than the whole repository here.
        let parsed;
        try {
          parsed = this.checkFrameHeader(frameHeader, where);
        } catch (error) {
          report.damage.push(`${where}: ${(error as Error).message}`);
          return;
        }
        const frameLength = FRAME_OVERHEAD + parsed.storedLength;
        if (offset + frameLength > size) {
          report.damage.push(`${where}: frame runs past the end of the pack`);
          return;
        }
        const id = frameHeader.subarray(16, 48).toString('hex');
        if (quarantined.has(`${pack}-${offset}`)) report.quarantinedSkipped++;
        else if (this.index.has(id)) report.duplicates++;
        else this.index.set(id, { pack, offset, frameLength, rawLength: parsed.rawLength, kind: parsed.kind, flags: parsed.flags });
        offset += frameLength;
      }
    } finally {
      closeSync(fd);
    }
  }

  private readQuarantine(): Set<string> {
    const out = new Set<string>();
    const dir = join(this.root, 'quarantine');
    let names: string[];
    try {
      names = readdirSync(dir);
    } catch {
      return out;
    }
    for (const name of names) {
      const m = /^([0-9a-f]{32})-(0|[1-9][0-9]*)\.json$/.exec(name);
      if (m !== null) out.add(`${m[1]}-${m[2]}`);
    }
    return out;
  }
}

interface ParsedSegment {
  name: string; // "<writer hex>-<seq hex>"
  superseded: string[];
  entries: Array<[string, Location]>;
}

/** SPEC 19.3: parse and check one segment (plaintext). */
export function parseSegment(bytes: Buffer, key: string, encrypted: boolean): ParsedSegment {
  if (bytes.length < SEGMENT_HEADER + 8) throw corruptMeta(key, 'segment shorter than its header and trailer');
  if (!bytes.subarray(0, 4).equals(SEGMENT_MAGIC)) throw corruptMeta(key, 'bad segment magic');
  if (bytes.readUInt16LE(4) !== 1) throw corruptMeta(key, `segment version ${bytes.readUInt16LE(4)}`);
  if (bytes.readUInt16LE(6) !== 0 || bytes.readUInt32LE(36) !== 0) throw corruptMeta(key, 'reserved bytes not zero');
  const writer = bytes.subarray(8, 24).toString('hex');
  const seq = bytes.readUInt32LE(24);
  const count = bytes.readUInt32LE(28);
  const supersededCount = bytes.readUInt32LE(32);
  if (count > MAX_SEGMENT_ENTRIES) throw corruptMeta(key, `count ${count} above its limit`);
  if (supersededCount > MAX_SUPERSEDED) throw corruptMeta(key, `superseded ${supersededCount} above its limit`);
  const expected = SEGMENT_HEADER + supersededCount * SEGMENT_NAME + count * SEGMENT_ENTRY + 8;
  if (bytes.length !== expected) throw corruptMeta(key, `length ${bytes.length}, the counts give ${expected}`);
  const stored = bytes.readBigUInt64LE(bytes.length - 8);
  if (stored !== xxh64(bytes.subarray(0, bytes.length - 8))) throw corruptMeta(key, 'segment checksum mismatch');
  const name = `${writer}-${seq.toString(16).padStart(8, '0')}`;
  if (`index/${name}` !== key) throw corruptMeta(key, `segment names itself index/${name}`);
  const superseded: string[] = [];
  let pos = SEGMENT_HEADER;
  let previous: Buffer | undefined;
  for (let i = 0; i < supersededCount; i++, pos += SEGMENT_NAME) {
    const raw = bytes.subarray(pos, pos + SEGMENT_NAME);
    // Order: writer id bytes, then seq as a number (u32 LE, so compare the number, not the bytes).
    const cmp = previous === undefined ? 1 : compareSegmentNames(previous, raw);
    if (cmp >= 0 && previous !== undefined) throw corruptMeta(key, 'superseded names out of order or repeated');
    const n = `${raw.subarray(0, 16).toString('hex')}-${raw.readUInt32LE(16).toString(16).padStart(8, '0')}`;
    if (n === name) throw corruptMeta(key, 'a segment supersedes itself');
    superseded.push(n);
    previous = raw;
  }
  const maxFrame = FRAME_OVERHEAD + MAX_RAW + (encrypted ? GCM_OVERHEAD : 0);
  const entries: Array<[string, Location]> = [];
  let previousId: Buffer | undefined;
  for (let i = 0; i < count; i++, pos += SEGMENT_ENTRY) {
    const idBytes = bytes.subarray(pos, pos + 32);
    if (previousId !== undefined && Buffer.compare(previousId, idBytes) >= 0) throw corruptMeta(key, 'entries out of order or repeated');
    previousId = idBytes;
    const l = pos + 32;
    const loc: Location = {
      pack: bytes.subarray(l, l + 16).toString('hex'),
      offset: bytes.readUInt32LE(l + 16),
      frameLength: bytes.readUInt32LE(l + 20),
      rawLength: bytes.readUInt32LE(l + 24),
      kind: bytes[l + 28] as number,
      flags: bytes[l + 29] as number,
    };
    if (loc.offset < PACK_HEADER) throw corruptMeta(key, `entry ${i}: offset ${loc.offset} below 32`);
    if (loc.frameLength < FRAME_OVERHEAD + 1 || loc.frameLength > maxFrame) throw corruptMeta(key, `entry ${i}: frame length ${loc.frameLength}`);
    if (loc.offset + loc.frameLength > 2 ** 32 - 1) throw corruptMeta(key, `entry ${i}: ends past 2^32 - 1`);
    if (loc.rawLength < 1 || loc.rawLength > MAX_RAW) throw corruptMeta(key, `entry ${i}: rawLength ${loc.rawLength}`);
    if (loc.kind < 1 || loc.kind > 3) throw corruptMeta(key, `entry ${i}: kind ${loc.kind}`);
    if (loc.flags > 7 || loc.flags % 2 + Math.floor(loc.flags / 4) === 2) throw corruptMeta(key, `entry ${i}: flags ${loc.flags}`);
    entries.push([idBytes.toString('hex'), loc]);
  }
  return { name, superseded, entries };
}

function compareSegmentNames(a: Buffer, b: Buffer): number {
  const byWriter = Buffer.compare(a.subarray(0, 16), b.subarray(0, 16));
  if (byWriter !== 0) return byWriter;
  return a.readUInt32LE(16) - b.readUInt32LE(16);
}

// ---- config and keys ------------------------------------------------------------------------------

function readConfig(root: string): Config {
  let raw: unknown;
  try {
    raw = readJson(join(root, 'config'), 'config', 1024 * 1024);
  } catch (error) {
    throw notRepo(`no readable config in ${root}: ${(error as Error).message}`);
  }
  if (!isObject(raw)) throw notRepo('config is not an object');
  if (raw.format !== 'vm-backup-engine repository') throw notRepo(`unknown format ${String(raw.format)}`);
  const version = raw.version;
  if (!isWhole(version) || version < 1) throw notRepo('config version is not a positive integer');
  const encryption = raw.encryption;
  const encrypted = encryption !== undefined;
  // SPEC 3 as extended by 19.1: plain knows 1 and 3, encrypted 2 and 3.
  if (version > 3) throw new SpecReaderError('ENGINE_FORMAT_TOO_NEW', `config version ${version}`);
  if (version === 1 && encrypted) throw notRepo('an encryption object in a version-1 config');
  if (version === 2 && !encrypted) throw notRepo('a version-2 config without encryption');
  if (typeof raw.id !== 'string' || !HEX32.test(raw.id)) throw notRepo('config id is not 32 hex');
  const blockSize = raw.blockSize;
  if (!isWhole(blockSize) || blockSize < 65536 || blockSize > 16 * MIB || !Number.isInteger(Math.log2(blockSize))) throw notRepo(`blockSize ${String(blockSize)}`);
  if (raw.hash !== (encrypted ? 'hmac-sha256' : 'sha256')) throw notRepo(`hash ${String(raw.hash)}`);
  if (raw.checksum !== 'xxh64') throw notRepo(`checksum ${String(raw.checksum)}`);
  // SPEC 3: "lz4-block", or "zstd" with a whole compressionLevel from 1 to 19; no level with lz4.
  if (raw.compression === 'lz4-block') {
    if (raw.compressionLevel !== undefined) throw notRepo('compressionLevel with lz4-block');
  } else if (raw.compression === 'zstd') {
    if (!isWhole(raw.compressionLevel) || raw.compressionLevel < 1 || raw.compressionLevel > 19) throw notRepo(`zstd compressionLevel ${String(raw.compressionLevel)}`);
  } else {
    throw notRepo(`compression ${String(raw.compression)}`);
  }
  if (raw.mapPageEntries !== 1024) throw notRepo(`mapPageEntries ${String(raw.mapPageEntries)}`);
  let keyFile: string | undefined;
  if (encrypted) {
    if (!isObject(encryption) || encryption.cipher !== 'aes-256-gcm') throw notRepo('unknown encryption cipher');
    if (typeof encryption.keyFile !== 'string' || !/^keys\/[0-9a-f]{16}\.json$/.test(encryption.keyFile)) throw notRepo('encryption.keyFile is not keys/<16 hex>.json');
    keyFile = encryption.keyFile;
  }
  if (version === 3) {
    const leases = raw.leases;
    if (!isObject(leases) || !isWhole(leases.timeMs) || !isWhole(leases.skewBoundMs)) throw notRepo('a version-3 config without leases');
    if (leases.skewBoundMs < 1000 || 4 * leases.skewBoundMs >= leases.timeMs) throw notRepo('leases: B < 1000 or 4B >= T');
  } else if (raw.leases !== undefined) {
    throw notRepo('leases in a version-1/2 config');
  }
  return { format: raw.format, version, id: raw.id, blockSize, encrypted, ...(keyFile !== undefined ? { keyFile } : {}) };
}

function openKeyFile(root: string, config: Config, passphrase: Buffer): Keys {
  const rel = config.keyFile as string;
  const keyId = rel.slice('keys/'.length, -'.json'.length);
  const raw = readJson(join(root, rel), rel, 64 * 1024);
  if (!isObject(raw)) throw corruptMeta(rel, 'not an object');
  if (raw.version !== 1) throw corruptMeta(rel, `version ${String(raw.version)}`);
  if (raw.id !== keyId) throw corruptMeta(rel, `id ${String(raw.id)} is not the file's ${keyId}`);
  if (raw.cipher !== 'aes-256-gcm') throw corruptMeta(rel, `cipher ${String(raw.cipher)}`);
  const kdf = raw.kdf;
  if (!isObject(kdf) || kdf.name !== 'scrypt') throw corruptMeta(rel, 'kdf is not scrypt');
  const { N, r, p } = kdf;
  if (!isWhole(N) || N < 2 ** 15 || !Number.isInteger(Math.log2(N))) throw corruptMeta(rel, `scrypt N ${String(N)}`);
  if (!isWhole(r) || r < 1 || r > 32) throw corruptMeta(rel, `scrypt r ${String(r)}`);
  if (!isWhole(p) || p < 1 || p > 16) throw corruptMeta(rel, `scrypt p ${String(p)}`);
  if (128 * N * r > 1024 * MIB) throw corruptMeta(rel, 'scrypt memory above 1 GiB');
  if (typeof kdf.salt !== 'string' || typeof raw.sealed !== 'string') throw corruptMeta(rel, 'salt or sealed missing');
  const salt = Buffer.from(kdf.salt, 'base64');
  const sealed = Buffer.from(raw.sealed, 'base64');
  if (salt.length !== 32) throw corruptMeta(rel, 'salt is not 32 bytes');
  if (sealed.length !== 92) throw corruptMeta(rel, 'sealed is not 92 bytes');
  if (raw.passphrase !== undefined && raw.passphrase !== 'bytes') throw corruptMeta(rel, `passphrase ${String(raw.passphrase)}`);
  const aad = Buffer.from(`vm-backup-engine key ${config.id} ${keyId}`, 'utf8');
  const attempt = (pass: Buffer): Buffer | undefined => {
    const wrapping = scryptSync(pass, salt, 32, { N, r, p, maxmem: 128 * N * r * 2 + 64 * MIB });
    return gcmOpen(wrapping, sealed.subarray(0, 12), sealed.subarray(12, 76), sealed.subarray(76), aad);
  };
  let keys = attempt(passphrase);
  if (keys === undefined && raw.passphrase === undefined) {
    // SPEC 18.2: older key files were keyed by the passphrase decoded as UTF-8 with U+FFFD replacement.
    const decoded = Buffer.from(new TextDecoder('utf-8').decode(passphrase), 'utf8');
    if (!decoded.equals(passphrase)) keys = attempt(decoded);
  }
  if (keys === undefined) throw new SpecReaderError('ENGINE_WRONG_PASSPHRASE', `the passphrase does not open ${rel}`);
  return { dataKey: keys.subarray(0, 32), idKey: keys.subarray(32, 64) };
}

// ---- records (SPEC 9) ------------------------------------------------------------------------------

const TIME = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$/;

function validateRecord(json: unknown, id: string, blockSize: number): BackupRecord {
  const where = `backups/${id}`;
  const bad = (why: string) => corruptMeta(where, why);
  if (!isObject(json)) throw bad('not an object');
  if (json.version !== 1) throw bad(`record version ${String(json.version)}`);
  if (json.id !== id) throw bad(`id ${String(json.id)} differs from its file name`);
  for (const f of ['name', 'type', 'startTime', 'endTime', 'hostname', 'engineVersion'] as const) if (typeof json[f] !== 'string') throw bad(`field ${f} missing or not a string`);
  if (!TIME.test(json.startTime as string) || !TIME.test(json.endTime as string)) throw bad('times not of the form YYYY-MM-DDTHH:MM:SS[.f]Z');
  if (!['full', 'incremental', 'differential'].includes(json.type as string)) throw bad(`type ${String(json.type)}`);
  if (json.parent !== null && !(typeof json.parent === 'string' && HEX32.test(json.parent))) throw bad('parent is neither null nor 32 hex');
  if (json.blockSize !== blockSize) throw bad(`blockSize ${String(json.blockSize)} differs from the config's ${blockSize}`);
  if (!Array.isArray(json.attachments)) throw bad('attachments missing');
  for (const a of json.attachments as unknown[]) {
    if (!isObject(a) || typeof a.name !== 'string' || a.name === '' || typeof a.mediaType !== 'string' || typeof a.data !== 'string') throw bad('an attachment is not {name, mediaType, data}');
  }
  // SPEC 9: `consistency` is optional; when present, a known level, a method, freezeMs null or whole, reason null or text.
  if (json.consistency !== undefined) {
    const c = json.consistency;
    if (!isObject(c) || !['application', 'filesystem', 'crash'].includes(c.level as string) || typeof c.method !== 'string') throw bad('consistency is not {level, method, freezeMs, reason}');
    if ((c.freezeMs !== null && !isWhole(c.freezeMs)) || (c.reason !== null && typeof c.reason !== 'string')) throw bad('consistency freezeMs or reason');
  }
  if (!Array.isArray(json.disks) || json.disks.length === 0) throw bad('no disks');
  const names = new Set<string>();
  const disks: DiskRecord[] = [];
  for (const d of json.disks as unknown[]) {
    if (!isObject(d)) throw bad('a disk is not an object');
    const name = d.name;
    // Reader limits (SPEC 9): not empty, '.', '..', no / \ or C0, at most 765 bytes of UTF-8, unique.
    // eslint-disable-next-line no-control-regex
    if (typeof name !== 'string' || name === '' || name === '.' || name === '..' || /[/\\\u0000-\u001f]/.test(name) || Buffer.byteLength(name, 'utf8') > 765) throw bad(`disk name ${JSON.stringify(name)}`);
    if (names.has(name)) throw bad(`disk name ${name} repeated`);
    names.add(name);
    const size = d.size;
    if (!isWhole(size) || size > MAX_DISK) throw bad(`disk ${name}: size ${String(size)}`);
    if (!isObject(d.source) || typeof d.source.kind !== 'string' || typeof d.source.path !== 'string') throw bad(`disk ${name}: source`);
    if (!['full', 'incremental', 'differential'].includes(d.mode as string)) throw bad(`disk ${name}: mode ${String(d.mode)}`);
    if (d.modeReason !== null && typeof d.modeReason !== 'string') throw bad(`disk ${name}: modeReason`);
    if (d.parent !== null && !(typeof d.parent === 'string' && HEX32.test(d.parent))) throw bad(`disk ${name}: parent`);
    if ((d.mode === 'full') !== (d.parent === null)) throw bad(`disk ${name}: mode ${String(d.mode)} with parent ${String(d.parent)}`);
    if (d.cbt !== null) {
      const cbt = d.cbt;
      if (!isObject(cbt) || typeof cbt.checkpoint !== 'string' || (cbt.base !== null && typeof cbt.base !== 'string') || typeof cbt.chainFull !== 'string' || typeof cbt.chainCheckpoint !== 'string' || !isWhole(cbt.granularity) || !isWhole(cbt.audited)) {
        throw bad(`disk ${name}: cbt is not {checkpoint, base, chainFull, chainCheckpoint, granularity, audited}`);
      }
    }
    const source = d.source as Record<string, unknown>;
    if (!['file', 'block-device', 'nbd', 'qcow2-image', 'libvirt-disk', 'ovirt-imageio'].includes(source.kind as string)) throw bad(`disk ${name}: source kind ${String(source.kind)}`);
    if (source.realPath !== undefined && typeof source.realPath !== 'string') throw bad(`disk ${name}: source.realPath`);
    if (!isObject(d.stats)) throw bad(`disk ${name}: stats`);
    for (const s of ['bytesRead', 'bytesNew', 'bytesStored', 'blocksTotal', 'blocksZero', 'blocksNew', 'blocksDeduplicated', 'blocksUnchanged', 'durationMs']) if (!isWhole(d.stats[s])) throw bad(`disk ${name}: stats.${s}`);
    const map = d.map;
    if (!isObject(map) || typeof map.root !== 'string' || !HEX64.test(map.root) || !isWhole(map.depth) || !isWhole(map.blocks)) throw bad(`disk ${name}: map`);
    if (map.blocks !== Math.ceil(size / blockSize)) throw bad(`disk ${name}: map blocks ${map.blocks} do not cover ${size} bytes`);
    if (map.depth !== depthFor(map.blocks)) throw bad(`disk ${name}: map depth ${map.depth} is not the depth of ${map.blocks} blocks`);
    if (size === 0 && map.root !== ZERO_ID) throw bad(`disk ${name}: a 0-byte disk with a root other than ZERO_ID`);
    disks.push({ name, size, map: { root: map.root, depth: map.depth, blocks: map.blocks } });
  }
  return { id, name: json.name as string, type: json.type as string, startTime: json.startTime as string, blockSize, disks };
}
