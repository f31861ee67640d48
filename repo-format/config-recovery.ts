/**
 * Rebuilding a lost or damaged `config` (SPEC.md, section 3.2) from what the rest of the repository
 * holds, for `engine repair`. Everything in a config is either a constant of the format or recoverable:
 *
 * - encryption and its key file: `keys/` holds exactly one key file in an encrypted repository, and every
 *   frame of one carries flag bit 1; a repository whose frames are encrypted and whose key file is gone
 *   cannot be read by anyone, config or not;
 * - the repository id: the index's `repository-id`. Without an index a plain repository gets a new id (the
 *   old one only named its dirty bitmaps: the next backup of each qcow2 or libvirt chain is a full one,
 *   and the engine's old bitmaps stay on the images until removed by hand); an encrypted repository
 *   cannot be recovered then, since the id is bound into the key file's tag and kept nowhere else;
 * - the block size: every backup record states it (opened with the keys in an encrypted repository,
 *   which also proves passphrase and id right); with no record, the largest data frame's raw length,
 *   rounded up to a power of two of at least 64 KiB (a repository whose largest chunk is a short last
 *   block then gets a smaller block size than it had: only deduplication against its old chunks suffers);
 *   with no data frame either, the default;
 * - `created`: the oldest backup's start time, else the oldest pack's modification time, else now.
 *
 * The damaged config is kept beside it as `config.damaged-<time>`; a config of a newer format version is
 * never touched (FormatTooNewError stays the answer).
 */
import { readdir, rename, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { DEFAULT_COMPRESSION, LZ4 } from './compression.js';
import { CIPHER_ID, DEFAULT_BLOCK_SIZE, FLAG_ENCRYPTED, FLAG_ZSTD, KEY_FILE_LIMIT, KIND_DATA, LAYOUT, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, RECORD_FILE_LIMIT } from './constants.js';
import { encodeConfig, newConfig, validateBlockSize, type RepositoryConfig } from './config.js';
import { CorruptMetadataError, EngineError, NotARepositoryError, PassphraseRequiredError } from './errors.js';
import { readBoundedFile } from './bounded-read.js';
import { decodeKeyFile, unlockKeyFileCompatibly } from './key-file.js';
import { noticeSink } from './notices.js';
import type { Passphrase } from './passphrase.js';
import { openMetadata } from './sealed-metadata.js';
import { decodeBackupRecord } from './backup-record.js';
import { IndexStore } from './index-store.js';
import { scanPackFiles, scanRecordFiles } from './layout-scan.js';
import { scanPack } from './pack-file.js';
import { writeFileDurably, fsyncDirectory } from './durable-file.js';
import type { RepositoryKeys } from './crypto.js';

export interface RecoveredConfig {
  config: RepositoryConfig;
  /** Why the old config could not be used. */
  why: string;
  /** Where each recovered value came from. */
  sources: {
    id: 'index' | 'new' | 'config version';
    blockSize: 'records' | 'frames' | 'default' | 'config version';
    created: 'records' | 'packs' | 'now' | 'config version';
    encryption: 'key file' | 'none';
    /** Version 3 on S3 only (SPEC.md 19.12): an earlier version of the config, the objects' retention, or none. */
    objectLock?: 'config version' | 'retention' | 'none';
  };
  /** The damaged config, kept (relative to the root), or null when there was none. */
  keptAs: string | null;
}

/** Whether `root` has the layout of a repository (packs/ and backups/), so that a config may be rebuilt there. */
export async function hasRepositoryLayout(root: string): Promise<boolean> {
  const isDir = (name: string): Promise<boolean> => stat(join(root, name)).then((s) => s.isDirectory(), () => false);
  return (await isDir(LAYOUT.packs)) && (await isDir(LAYOUT.backups));
}

async function indexRepositoryId(root: string): Promise<string | undefined> {
  let index: IndexStore;
  try {
    index = await IndexStore.open(join(root, LAYOUT.index), { create: false });
  } catch {
    return undefined;
  }
  try {
    const id = await index.getMeta('repository-id').catch(() => undefined);
    return id !== undefined && /^[0-9a-f]{32}$/.test(id) ? id : undefined;
  } finally {
    await index.close().catch(() => undefined);
  }
}

/** The one key file of keys/, or undefined (none); several is ambiguous. */
async function keyFileOf(root: string): Promise<string | undefined> {
  const names = (await readdir(join(root, LAYOUT.keys)).catch(() => [] as string[])).filter((n) => /^[0-9a-f]{16}\.json$/.test(n));
  if (names.length > 1) throw new CorruptMetadataError('keys/', `${names.length} key files, and no config to say which one is the repository's`);
  return names[0] === undefined ? undefined : `${LAYOUT.keys}/${names[0]}`;
}

/** Whether the frames say the repository is encrypted (undefined: no frame found), and the largest data frame's raw length. */
async function frameFacts(root: string): Promise<{ encrypted: boolean | undefined; largestData: number; oldestPack: number | undefined; zstd: boolean }> {
  let encrypted: boolean | undefined;
  let zstd = false;
  let largestData = 0;
  let oldestPack: number | undefined;
  for (const packId of (await scanPackFiles(root)).packs) {
    const mtime = await stat(join(root, LAYOUT.packs, packId.slice(0, 2), packId)).then((s) => s.mtimeMs, () => undefined);
    if (mtime !== undefined) oldestPack = Math.min(oldestPack ?? mtime, mtime);
    let scan = await scanPack(root, packId, encrypted ?? false).catch(() => undefined);
    if (scan && scan.frames.length === 0 && encrypted === undefined) {
      const asEncrypted = await scanPack(root, packId, true).catch(() => undefined);
      if (asEncrypted && asEncrypted.frames.length > 0) scan = asEncrypted;
    }
    for (const frame of scan?.frames ?? []) {
      encrypted ??= (frame.header.flags & FLAG_ENCRYPTED) !== 0; // a flag bit of a header byte, not an offset
      if ((frame.header.flags & FLAG_ZSTD) !== 0) zstd = true; // a flag bit of a header byte, not an offset
      if (frame.header.kind === KIND_DATA) largestData = Math.max(largestData, frame.header.rawLength);
    }
  }
  return { encrypted, largestData, oldestPack, zstd };
}

/** The block size every readable record states (they must agree), and the oldest start time. */
async function recordFacts(root: string, keys: RepositoryKeys | undefined): Promise<{ blockSize: number | undefined; oldest: string | undefined; readable: number }> {
  const sizes = new Set<number>();
  let oldest: string | undefined;
  let readable = 0;
  for (const id of (await scanRecordFiles(root)).records) {
    try {
      const bytes = await readBoundedFile(join(root, LAYOUT.backups, id), RECORD_FILE_LIMIT);
      const plaintext = keys ? openMetadata(keys.dataKey, bytes, `${LAYOUT.backups}/${id}`) : bytes;
      if (typeof plaintext === 'string') continue;
      const record = decodeBackupRecord(plaintext, `backup record ${id}`);
      validateBlockSize(record.blockSize);
      sizes.add(record.blockSize);
      readable += 1;
      if (oldest === undefined || record.startTime < oldest) oldest = record.startTime;
    } catch {
      // A damaged record says nothing; repair reports it afterwards.
    }
  }
  if (sizes.size > 1) throw new CorruptMetadataError('backups/', `the records state ${sizes.size} different block sizes (${[...sizes].join(', ')}), and no config says which is the repository's`);
  return { blockSize: sizes.values().next().value, oldest, readable };
}

function powerOfTwoAtLeast(bytes: number): number {
  let size = MIN_BLOCK_SIZE;
  while (size < bytes && size < MAX_BLOCK_SIZE) size *= 2;
  return size;
}

/**
 * Rebuilds `config` from the rest of the repository; the caller holds the lock and has established that
 * the config is missing or damaged (`why`) and that `root` has the layout of a repository.
 */
export async function rebuildConfig(root: string, why: string, passphrase: Passphrase | undefined): Promise<RecoveredConfig> {
  const keyFile = await keyFileOf(root);
  const frames = await frameFacts(root);
  if (frames.encrypted === true && keyFile === undefined) {
    throw new NotARepositoryError(root, `its config is lost (${why}), and its frames are encrypted but keys/ holds no key file: nothing can read it`);
  }
  const encrypted = keyFile !== undefined;
  const indexId = await indexRepositoryId(root);
  let keys: RepositoryKeys | undefined;
  if (encrypted) {
    if (indexId === undefined) {
      throw new NotARepositoryError(root, `its config is lost (${why}) and so is its index: the repository id, to which the key file's seal is bound, was kept only in those two; restore the config from a copy`);
    }
    if (passphrase === undefined) throw new PassphraseRequiredError(root);
    const file = decodeKeyFile(await readBoundedFile(join(root, keyFile), KEY_FILE_LIMIT), `key file ${keyFile}`);
    keys = await unlockKeyFileCompatibly(file, passphrase, indexId, root, noticeSink());
  }
  const records = await recordFacts(root, keys);
  const blockSize = records.blockSize ?? (frames.largestData > 0 ? powerOfTwoAtLeast(frames.largestData) : DEFAULT_BLOCK_SIZE);
  const created = records.oldest !== undefined ? new Date(records.oldest) : frames.oldestPack !== undefined ? new Date(frames.oldestPack) : new Date();
  const id = indexId ?? randomBytes(16).toString('hex');
  // Compression: zstd (the default level) as soon as one frame holds zstd, so that no engine predating it
  // opens the repository and takes those frames for damage; lz4 otherwise, as every repository before zstd.
  const config = newConfig(id, blockSize, created, keyFile === undefined ? undefined : { cipher: CIPHER_ID, keyFile }, false, frames.zstd ? DEFAULT_COMPRESSION : LZ4);

  // Keep what was there (damaged) beside it; the new config is written whole, where none exists.
  let keptAs: string | null = null;
  const damaged = await stat(join(root, LAYOUT.config)).then(() => true, () => false);
  if (damaged) {
    keptAs = `${LAYOUT.config}.damaged-${new Date().toISOString().replace(/[:.]/g, '-')}`;
    await rename(join(root, LAYOUT.config), join(root, keptAs));
  }
  await writeFileDurably(join(root, LAYOUT.config), encodeConfig(config), { exclusive: true, tempDir: join(root, LAYOUT.tmp) });
  await fsyncDirectory(root);
  return {
    config,
    why,
    sources: {
      id: indexId === undefined ? 'new' : 'index',
      blockSize: records.blockSize !== undefined ? 'records' : frames.largestData > 0 ? 'frames' : 'default',
      created: records.oldest !== undefined ? 'records' : frames.oldestPack !== undefined ? 'packs' : 'now',
      encryption: encrypted ? 'key file' : 'none',
    },
    keptAs,
  };
}

/** Whether an error from reading the config means it is missing or damaged (not: newer, unreadable for another reason). */
export function configDamage(error: unknown): string | undefined {
  if (!(error instanceof EngineError) || error.code !== 'ENGINE_NOT_A_REPOSITORY') return undefined;
  const why = String(error.details.why ?? '');
  if (why === '' || why.startsWith('its config cannot be read')) return undefined;
  return why === 'it has no config file' ? 'missing' : why;
}
