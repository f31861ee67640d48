/**
 * Pack files: append-only, written under tmp/, fsynced, then renamed into packs/<2 hex>/<32 hex>.
 *
 *   pack header (32 B) || frame 1 || frame 2 || … || frame N
 *
 * The header is magic (8) || version u32 LE || reserved u32 (0) || pack id (16). Frames are self-describing
 * (frame.ts), so scanning a pack from offset 32 to its end yields every blob it holds: that is how the
 * index is rebuilt. See SPEC.md, "Pack".
 */
import { open, rename, unlink, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import {
  FRAME_MAGIC as FRAME_MAGIC_VALUE,
  FRAME_HEADER_SIZE,
  FRAME_OVERHEAD,
  LAYOUT,
  MAX_FRAME_LENGTH,
  PACK_HEADER_SIZE,
  PACK_ID_SIZE,
  PACK_MAGIC,
  PACK_MAX_SIZE,
  PACK_VERSION,
} from './constants.js';
import { classifyWriteError, CorruptFrameError, CorruptPackError, InvalidArgumentError } from './errors.js';
import { IMMUTABLE_FILE_MODE, MUTABLE_FILE_MODE, openNewFile } from './file-modes.js';
import { decodeFrameHeader, frameLength, type FrameHeader } from './frame.js';
import type { IndexEntry } from './index-entry.js';
import { LocalStorage } from './storage/local.js';
import { Md5Stream } from './storage/md5-off-thread.js';
import { isStorageError } from './storage/storage-error.js';
import { isS3Url } from './storage/s3-url.js';
import { StorageError } from './storage/storage-error.js';
import type { Storage } from './storage/storage.js';
import { openStore, packKey, storeAt } from './store.js';
import { localFrameLocator, type FrameLocator } from './frame-locator.js';

/**
 * Where packs go: the store, and a local folder on the same file system (the repository's tmp/) where a
 * pack is built before it is published whole under its key.
 */
export interface PackTarget {
  store: Storage;
  tempDir: string;
}

/** The store of a repository folder given by its path: the pack functions' older form (tools, tests). */
function localTarget(root: string): PackTarget {
  return { store: openStore(root), tempDir: join(root, LAYOUT.tmp) };
}

const storeOf = storeAt;

/**
 * A worker's way to a frame (frame-locator.ts): a local file's path, or for an S3 store the location it
 * opens its own client from; undefined for a span longer than a frame in S3 (a whole pack: read by the main
 * thread in bounded spans) and for any other store.
 */
export function frameLocatorIn(store: Storage, location: { packId: string; offset: number; length: number }): FrameLocator | undefined {
  if (store instanceof LocalStorage) return localFrameLocator(store.pathOf(packKey(location.packId)), location.offset, location.length);
  const where = store.properties.location;
  // A point-in-time view (v3/as-of.ts) reads pinned versions, which a worker's own client would not: the
  // main thread reads those frames.
  if ('asOf' in store) return undefined;
  if (isS3Url(where) && location.length <= MAX_FRAME_LENGTH) return { kind: 'store', location: where, packId: location.packId, offset: location.offset, length: location.length };
  return undefined;
}

/**
 * Publishes a finished local file as `key`: moved in by the local backend (no copy of 32 MiB), uploaded
 * by any other, whose temporary file is then removed. `md5`: the file's, computed as it was written (see
 * PutSource).
 */
export async function publishFile(store: Storage, key: string, file: string, md5?: string): Promise<void> {
  if (store instanceof LocalStorage) {
    await store.adopt(key, file);
    return;
  }
  await store.put(key, { file, md5 });
  await unlink(file).catch(() => undefined);
}

/**
 * Upload buffers kept for the next pack, per temporary folder: a pack's temporary file for an object store
 * is a buffer on the way to the PUT, and writing 32 MiB into pages the file already has costs a tenth of
 * writing it into a new file (measured here, 512 MiB: 0.08 CPU-s over pages already cached against 0.5-1.0
 * for a new file on ext4 or tmpfs: the kernel's allocation of page-cache pages, their accounting and their
 * release at unlink). So an uploaded pack's file is kept, at most SPARE_FILES a folder, and the next pack
 * is written over it (truncated to its size before its upload). The folder is the host cache's temporary
 * folder, this process's alone (v3 session), emptied when the session ends.
 */
const spareFiles = new Map<string, string[]>();
/** Packs being filled, uploaded and waiting at once (blob-writer.ts: 1 + 4 + 2), and one more. */
const SPARE_FILES = 8;

function takeSpare(tempDir: string): string | undefined {
  return spareFiles.get(tempDir)?.pop();
}

function keepSpare(tempDir: string, file: string): boolean {
  let spares = spareFiles.get(tempDir);
  if (!spares) spareFiles.set(tempDir, (spares = []));
  if (spares.length >= SPARE_FILES) return false;
  spares.push(file);
  return true;
}

/** Forgets the spare upload files of a temporary folder (its owner removes the folder). */
export function forgetSpareFiles(tempDir: string): void {
  spareFiles.delete(tempDir);
}

/** A spare upload file renamed to `path` and opened for writing over, or (none, or it is gone) a new file. */
async function openUploadFile(path: string, spare: string | undefined): Promise<FileHandle> {
  if (spare !== undefined) {
    try {
      await rename(spare, path);
      return await open(path, 'r+');
    } catch {
      // Its folder was emptied meanwhile, or it cannot be opened: a new file instead.
      await unlink(path).catch(() => undefined);
    }
  }
  return openNewFile(path, 'wx', MUTABLE_FILE_MODE);
}

/** The file of a pack in a repository folder (tools and tests; the engine asks the repository for packs, never for their place). */
export function packPath(root: string, packId: string): string {
  return join(root, ...packKey(packId).split('/'));
}

export function encodePackHeader(packId: string): Buffer {
  const header = Buffer.alloc(PACK_HEADER_SIZE);
  PACK_MAGIC.copy(header, 0);
  header.writeUInt32LE(PACK_VERSION, 8);
  header.writeUInt32LE(0, 12);
  Buffer.from(packId, 'hex').copy(header, 16, 0, PACK_ID_SIZE);
  return header;
}

export function decodePackHeader(header: Buffer, expectedPackId: string): string | undefined {
  if (header.length < PACK_HEADER_SIZE) return 'pack header is cut short';
  if (!header.subarray(0, 8).equals(PACK_MAGIC)) return 'bad pack magic';
  const version = header.readUInt32LE(8);
  if (version !== PACK_VERSION) return `unsupported pack version ${version}`;
  if (header.readUInt32LE(12) !== 0) return 'reserved pack header bytes are not zero';
  const id = header.toString('hex', 16, 16 + PACK_ID_SIZE);
  if (id !== expectedPackId) return `header names pack ${id}, file is named ${expectedPackId}`;
  return undefined;
}

/**
 * Appends frames to one pack. `append` assigns each frame its offset at once and writes it in the
 * background, so the pipeline can hand over the next frame without waiting for the disk; `seal` waits for
 * every write before making the pack durable.
 *
 * For a store that is not a local folder (S3) the temporary file is only a buffer on the way to the upload:
 * its MD5 (the upload's Content-MD5) is computed as frames are appended, in the pack's order, from the bytes
 * in memory, on the MD5 thread (md5-off-thread.ts: a frame in the pipeline's shared slots is hashed where
 * it is, and its write resolves only once it is hashed too), so the file is read once, to send it, and the
 * main thread does not spend ~1.6 s a GB on MD5; the file is not fsynced, as the store's answer to the
 * upload is the durability point. Measured: bench/results/v3-s3-latest.md.
 */
export class PackWriter {
  readonly packId: string;
  readonly entries: IndexEntry[] = [];
  private size = PACK_HEADER_SIZE;
  private readonly tempPath: string;
  private readonly target: PackTarget;
  private readonly opened: Promise<FileHandle>;
  private readonly writes = new Set<Promise<void>>();
  /** The first write that failed: a pack with a hole must never be sealed and indexed. */
  private writeFailure: unknown;
  /** The MD5 of the bytes appended so far, for an upload (undefined for a local folder, which moves the file in). */
  private readonly md5: Md5Stream | undefined;
  private contentMd5: string | undefined;

  /**
   * `target`: the repository's PackTarget (or a repository folder's path). `tempPrefix` names the temp file
   * `tmp/<prefix><pack id>.pack` (a registered writer's token, for gc).
   */
  constructor(target: PackTarget | string, options: { tempPrefix?: string } = {}) {
    this.target = typeof target === 'string' ? localTarget(target) : target;
    this.packId = randomBytes(PACK_ID_SIZE).toString('hex');
    this.tempPath = join(this.target.tempDir, `${options.tempPrefix ?? ''}${this.packId}.pack`);
    const upload = !(this.target.store instanceof LocalStorage);
    this.opened = (upload ? openUploadFile(this.tempPath, takeSpare(this.target.tempDir)) : openNewFile(this.tempPath, 'wx', IMMUTABLE_FILE_MODE)).catch((error: unknown) => {
      throw classifyWriteError(error, this.tempPath);
    });
    // Reported by whichever append, seal or abort awaits it first.
    this.opened.catch(() => undefined);
    const header = encodePackHeader(this.packId);
    this.md5 = upload ? new Md5Stream() : undefined;
    this.track(this.writeAndHash(header, 0));
  }

  get byteSize(): number {
    return this.size;
  }

  get isEmpty(): boolean {
    return this.entries.length === 0;
  }

  /**
   * Appends one complete frame (built by sealBlob). Resolves when the frame is written; `frame` must stay
   * unchanged until then.
   */
  append(frame: Uint8Array, header: Omit<FrameHeader, 'storedLength'>): Promise<void> {
    if (this.size + frame.length > PACK_MAX_SIZE) {
      // Offsets in the index are 32-bit (SPEC.md 7): a caller must seal the pack before it grows this far.
      return Promise.reject(new InvalidArgumentError(`pack ${this.packId} would grow to ${this.size + frame.length} bytes, past the largest a pack may be (${PACK_MAX_SIZE}): seal it first`, { packId: this.packId, size: this.size, frameLength: frame.length }));
    }
    const offset = this.size;
    this.size += frame.length;
    this.entries.push({
      id: header.id,
      packId: this.packId,
      offset,
      length: frame.length,
      rawLength: header.rawLength,
      kind: header.kind,
      flags: header.flags,
    });
    return this.track(this.writeAndHash(frame, offset));
  }

  /** Makes the pack durable under its final name. After this resolves, index entries may point at it. */
  async seal(): Promise<IndexEntry[]> {
    await this.finish();
    return this.publish();
  }

  /** Makes the pack's content durable under its temporary name (gc publishes later, under the lock). */
  async finish(): Promise<void> {
    const handle = await this.opened;
    await Promise.allSettled(this.writes);
    if (this.writeFailure !== undefined) throw this.writeFailure;
    try {
      // An upload's temporary file needs no fsync: what makes it durable is the store's answer to the PUT.
      if (!this.md5) await handle.sync();
      // A spare file written over may be longer than this pack: only the pack goes up.
      else if ((await handle.stat()).size > this.size) await handle.truncate(this.size);
      this.contentMd5 ??= await this.md5?.digest();
      await handle.close();
    } catch (error) {
      throw classifyWriteError(error, this.tempPath);
    }
  }

  /** Publishes a finished pack in the store under its key (local: renamed into packs/, the rename made durable). */
  async publish(): Promise<IndexEntry[]> {
    const store = this.target.store;
    if (store instanceof LocalStorage) {
      await publishFile(store, packKey(this.packId), this.tempPath, this.contentMd5);
      return this.entries;
    }
    try {
      await store.put(packKey(this.packId), { file: this.tempPath, md5: this.contentMd5 });
    } catch (error) {
      await unlink(this.tempPath).catch(() => undefined);
      throw error;
    }
    // Uploaded (every attempt over): the file is the next pack's buffer, or removed.
    if (!keepSpare(this.target.tempDir, this.tempPath)) await unlink(this.tempPath).catch(() => undefined);
    return this.entries;
  }

  /** Drops an unfinished pack (a failed or interrupted backup). */
  async abort(): Promise<void> {
    await Promise.allSettled(this.writes);
    if (this.contentMd5 === undefined) this.md5?.drop();
    const handle = await this.opened.catch(() => undefined);
    await handle?.close().catch(() => undefined);
    await unlink(this.tempPath).catch(() => undefined);
  }

  private track(write: Promise<void>): Promise<void> {
    this.writes.add(write);
    write.then(
      () => this.writes.delete(write),
      (error: unknown) => {
        this.writeFailure ??= error;
        this.writes.delete(write);
      },
    );
    return write;
  }

  /** Written at `position` and, for an upload, hashed (in append order): `data` may change once both are done. */
  private writeAndHash(data: Uint8Array, position: number): Promise<void> {
    const written = this.writeAt(data, position);
    if (!this.md5) return written;
    const hashed = this.md5.update(data);
    // Both settled before this resolves or fails: nothing may still read `data` or write the file then.
    return Promise.allSettled([written, hashed]).then(([write, hash]) => {
      if (write.status === 'rejected') throw write.reason;
      if (hash.status === 'rejected') throw hash.reason;
    });
  }

  private async writeAt(data: Uint8Array, position: number): Promise<void> {
    const handle = await this.opened;
    let written = 0;
    try {
      while (written < data.length) {
        const { bytesWritten } = await handle.write(data, written, data.length - written, position + written);
        written += bytesWritten;
      }
    } catch (error) {
      throw classifyWriteError(error, this.tempPath);
    }
  }
}

/** The errno (local) or the store's reason, for messages about a pack that cannot be read. */
function failureCode(error: unknown): string {
  if (error instanceof StorageError) return error.storage.backendCode ?? (error.reason === 'not-found' ? 'ENOENT' : error.reason);
  return (error as NodeJS.ErrnoException).code ?? String(error);
}

/** A pack that cannot be opened or read (gone, EIO, not a file): damaged, with the errno in `details.errno`. */
function unreadablePack(packId: string, what: string, error: unknown): CorruptPackError {
  const code = failureCode(error);
  return new CorruptPackError(packId, `${what} (${code})`, { errno: code });
}

/** Absent (what opening a missing file says), told apart from a pack that is there but cannot be read (a folder in its place: EISDIR). */
function isMissing(error: unknown): boolean {
  if (!(error instanceof StorageError)) return false;
  const code = error.storage.backendCode;
  return error.reason === 'no-bucket' || (error.reason === 'not-found' && (code === undefined || code === 'ENOENT' || code === 'ENOTDIR'));
}

/**
 * Reads one frame's bytes from the store (or a repository folder given by path); a pack that is missing or
 * too short is reported as damaged, naming pack and offset. `into`: where the store may place them (GetOptions).
 */
export async function readFrameBytes(store: Storage | string, packId: string, offset: number, length: number, into?: Buffer): Promise<Buffer> {
  // The length comes from the index: bound it before it sizes an allocation.
  if (length < FRAME_OVERHEAD || length > MAX_FRAME_LENGTH) {
    throw new CorruptFrameError(packId, offset, `the index gives an impossible frame length ${length}`);
  }
  return readPackSpan(store, packId, offset, length, into);
}

/**
 * Reads bytes [offset, offset + length) of a pack (several adjacent frames at once: a restore's span, whose
 * length its caller bounded), reporting a missing or short pack as readFrameBytes does.
 */
export async function readPackSpan(store: Storage | string, packId: string, offset: number, length: number, into?: Buffer): Promise<Buffer> {
  const from = storeOf(store);
  try {
    return await from.get(packKey(packId), { range: { offset, length }, into });
  } catch (error) {
    if (error instanceof StorageError && error.reason === 'out-of-range') {
      const size = (await from.stat(packKey(packId)).catch(() => undefined))?.size ?? 0;
      throw new CorruptFrameError(packId, offset, `pack is truncated: read ${Math.max(0, Math.min(length, size - offset))} of ${length} bytes`);
    }
    throw unreadablePack(packId, isMissing(error) ? 'cannot open pack' : 'cannot read pack', error);
  }
}

/** What reads frames for a server: a StoreHandle, or the repository handle itself (version 3, which holds the lease). */
export type FrameReader = Pick<StoreHandle, 'readFrame' | 'locateFrame'>;

/**
 * A repository's store through a handle of its own, for work done between two holds of the lock (gc's
 * copy phase) or after it (serve): frames read as the index locates them, new packs written. Closed by
 * its user.
 */
export interface StoreHandle {
  readFrame(location: { packId: string; offset: number; length: number }): Promise<Buffer>;
  /** Where a worker reads the frame itself, when the store's objects are local files (frame-locator.ts). */
  locateFrame(location: { packId: string; offset: number; length: number }): FrameLocator | undefined;
  readonly packTarget: PackTarget;
  close(): Promise<void>;
}

/** The whole of a pack, for the few that walk one in memory (repair): at most `maxSize` bytes. */
export async function readPackBytes(store: Storage, packId: string, maxSize: number): Promise<Buffer> {
  try {
    return await store.get(packKey(packId), { maxSize });
  } catch (error) {
    throw unreadablePack(packId, isMissing(error) ? 'cannot open pack' : 'cannot read pack', error);
  }
}

export interface ScannedFrame {
  offset: number;
  header: FrameHeader;
  length: number;
}

export interface PackScan {
  packId: string;
  size: number;
  frames: ScannedFrame[];
  /** Set when the pack cannot be read to its end; frames before the damage are still listed. */
  damage?: { offset: number; why: string };
}

/**
 * Walks a pack's frame headers (without reading payloads) to list its blobs. Used to rebuild the index
 * and by verify. Stops at the first header that does not parse: nothing after it can be located.
 * `encrypted`: the repository is encrypted (frame.ts, decodeFrameHeader). A pack that cannot be opened or
 * read at all is CorruptPackError (ENGINE_CORRUPT_PACK, the errno in `details.errno`).
 */
export async function scanPack(store: Storage | string, packId: string, encrypted = false): Promise<PackScan> {
  const from = storeOf(store);
  const key = packKey(packId);
  let size: number;
  try {
    size = (await from.stat(key)).size;
  } catch (error) {
    throw unreadablePack(packId, isMissing(error) ? 'cannot open pack' : 'cannot read pack', error);
  }
  // Up to `length` bytes at `offset`, fewer at the end of the pack (whose size was read once, above).
  const readAt = async (offset: number, length: number): Promise<Buffer> => {
    const available = Math.min(length, size - offset);
    if (available <= 0) return Buffer.alloc(0);
    return from.get(key, { range: { offset, length: available } });
  };
  try {
    return await scanFrames(readAt, size, packId, encrypted);
  } catch (error) {
    throw unreadablePack(packId, 'cannot read pack', error);
  }
}

async function scanFrames(readAt: (offset: number, length: number) => Promise<Buffer>, size: number, packId: string, encrypted: boolean): Promise<PackScan> {
  const scan: PackScan = { packId, size, frames: [] };
  const packProblem = decodePackHeader(await readAt(0, PACK_HEADER_SIZE), packId);
  if (packProblem) {
    scan.damage = { offset: 0, why: packProblem };
    return scan;
  }
  let offset = PACK_HEADER_SIZE;
  while (offset < size) {
    const decoded = decodeFrameHeader(await readAt(offset, FRAME_HEADER_SIZE), 0, encrypted);
    if (typeof decoded === 'string') {
      scan.damage = { offset, why: decoded };
      break;
    }
    const length = frameLength(decoded.storedLength);
    if (offset + length > size) {
      scan.damage = { offset, why: `frame of ${length} bytes runs past the end of the pack (${size} bytes): truncated` };
      break;
    }
    scan.frames.push({ offset, header: decoded, length });
    offset += length;
  }
  return scan;
}

/**
 * Why the object at pack `packId`'s key is not provably a pack of this engine (an object whose header
 * has the pack magic and names this pack id), or undefined when it is. gc deletes only what passes: a
 * stray file that merely has a pack's name is never the engine's to delete.
 */
export async function notOwnPack(store: Storage | string, packId: string): Promise<string | undefined> {
  const from = storeOf(store);
  let size: number;
  try {
    size = (await from.stat(packKey(packId))).size;
  } catch (error) {
    const code = failureCode(error);
    return code === 'EISDIR' ? 'it is not a regular file' : `it cannot be opened (${code})`;
  }
  try {
    const header = size === 0 ? Buffer.alloc(0) : await from.get(packKey(packId), { range: { offset: 0, length: Math.min(size, PACK_HEADER_SIZE) } });
    const problem = decodePackHeader(header, packId);
    return problem === undefined ? undefined : `it is not a pack of this engine (${problem})`;
  } catch (error) {
    return `it cannot be read (${failureCode(error)})`;
  }
}

/**
 * Deletes a pack (gc only: the caller has made sure no index entry, record or live reader needs it).
 * Returns why it could not (EPERM on an immutable file, EIO…), or undefined once it is gone.
 */
export async function deletePack(store: Storage | string, packId: string): Promise<string | undefined> {
  try {
    await storeOf(store).delete(packKey(packId));
    return undefined;
  } catch (error) {
    return `it cannot be deleted (${failureCode(error)})`;
  }
}

export interface PackDamage {
  offset: number;
  why: string;
  /** Set when the damage is one frame whose header parsed (its blob id, as the header says). */
  frame?: { header: FrameHeader; length: number };
}

/**
 * Walks a whole pack held in memory (repair), checking every frame with `check` and, unlike scanPack,
 * carrying on after damage: where no frame header parses, it searches forward for the next frame magic
 * whose frame passes its checks, so one damaged header does not hide every good frame behind it.
 */
export function walkPackBytes(
  bytes: Buffer,
  packId: string,
  check: (frame: Buffer, header: FrameHeader) => string | undefined,
  encrypted = false,
): { good: ScannedFrame[]; damage: PackDamage[] } {
  const good: ScannedFrame[] = [];
  const damage: PackDamage[] = [];
  const headerProblem = decodePackHeader(bytes.subarray(0, PACK_HEADER_SIZE), packId);
  if (headerProblem) damage.push({ offset: 0, why: headerProblem });
  const magic = Buffer.alloc(4);
  magic.writeUInt32LE(FRAME_MAGIC_VALUE, 0);
  let offset = PACK_HEADER_SIZE;
  let lost: PackDamage | undefined;
  while (offset < bytes.length) {
    const header = decodeFrameHeader(bytes, offset, encrypted);
    const length = typeof header === 'string' ? 0 : frameLength(header.storedLength);
    let why = typeof header === 'string' ? header : undefined;
    if (typeof header !== 'string' && offset + length > bytes.length) why = `frame of ${length} bytes runs past the end of the pack (${bytes.length} bytes): truncated`;
    if (typeof header !== 'string' && why === undefined) {
      why = check(bytes.subarray(offset, offset + length), header);
      if (why === undefined) {
        good.push({ offset, header, length });
        lost = undefined;
        offset += length;
        continue;
      }
      // A frame whose header parses but whose content fails: its length is probably right, and the
      // next frame is probably behind it; resync confirms either way.
      damage.push({ offset, why, frame: { header, length } });
      lost = undefined;
      const next = offset + length;
      if (next >= bytes.length) break;
      offset = typeof decodeFrameHeader(bytes, next, encrypted) !== 'string' ? next : bytes.indexOf(magic, offset + 1);
      if (offset < 0) break;
      continue;
    }
    if (!lost) {
      lost = { offset, why: why ?? 'damaged' };
      damage.push(lost);
    }
    offset = bytes.indexOf(magic, offset + 1);
    if (offset < 0) break;
  }
  return { good, damage };
}

/** The size of a pack, or undefined when the store says it is not there; any other failure is thrown. */
export async function packSize(store: Storage | string, packId: string): Promise<number | undefined> {
  try {
    return (await storeOf(store).stat(packKey(packId))).size;
  } catch (error) {
    // Only the store's "not found" means absent: a 503 or EIO is no proof a pack is gone (gc acts on it).
    if (isStorageError(error, 'not-found')) return undefined;
    throw error;
  }
}
