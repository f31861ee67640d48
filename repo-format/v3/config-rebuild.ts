/**
 * A lost or damaged config of a version-3 repository (a folder or S3), rebuilt by repair from the rest
 * (SPEC.md 19.12): version 3 with init's lease timing; the block size every readable record states; the
 * encryption of the one key file in keys/. The repository id is kept nowhere else in the store: a plain
 * repository gets a new one (the host caches, named by the old id, are left behind and rebuilt under the new
 * one); an encrypted one's id is bound to its key file's seal, and is found among the ids this host's cache
 * directory holds (a host that used the repository), else repair refuses. A damaged config is kept beside
 * the new one as `config.damaged-<time>`; a missing one is created only if absent.
 *
 * A versioned S3 bucket remembers what `config` held: a delete there only adds a delete marker, an overwrite a
 * new version, and in an Object Lock bucket no version can go before its lock ends (SPEC.md 20.5). So on S3
 * the newest earlier version that is still a valid version-3 config agreeing with the store (its key file
 * present and opened by the passphrase) is restored whole: its id, lease timing and Object Lock included.
 * Without one, a bucket with Object Lock enabled still tells the lock: each object's retention, read back,
 * is its write time plus R (gc only ever lengthens it), so the shortest span over the newest objects is R.
 * A rebuilt config that forgot the lock would have every later backup written unlocked.
 */
import { randomBytes } from 'node:crypto';
import { readdir } from 'node:fs/promises';
import { CIPHER_ID, DEFAULT_BLOCK_SIZE, KEY_FILE_LIMIT, RECORD_FILE_LIMIT, SEALED_METADATA_MAGIC } from '../constants.js';
import { decodeConfig, encodeConfig, isManyWriters, newConfig, OBJECT_LOCK_MAX_MS, OBJECT_LOCK_MIN_MS, validateBlockSize, type ObjectLockConfig, type RepositoryConfig } from '../config.js';
import { DEFAULT_COMPRESSION } from '../compression.js';
import { NotARepositoryError, PassphraseRequiredError } from '../errors.js';
import { decodeKeyFile, unlockKeyFile } from '../key-file.js';
import { decodeBackupRecord } from '../backup-record.js';
import { openMetadata } from '../sealed-metadata.js';
import type { Passphrase } from '../passphrase.js';
import type { RepositoryKeys } from '../crypto.js';
import type { Storage } from '../storage/storage.js';
import { isStorageError } from '../storage/storage-error.js';
import type { RecoveredConfig } from '../config-recovery.js';
import type { S3Storage } from '../storage/s3.js';
import { s3BackendOf } from './location.js';
import { applyObjectLock, UNLOCKED_PREFIX } from './object-lock.js';

/** Earlier versions of `config` tried, newest first; objects whose retention is read to find R. */
const EARLIER_VERSIONS_TRIED = 32;
const RETENTIONS_READ = 64;

async function keys(storage: Storage, prefix: string): Promise<string[]> {
  const out: string[] = [];
  for await (const info of storage.list(prefix)) out.push(info.key);
  return out;
}

/** Whether the store holds a version-3 repository's objects (packs, records or segments) besides its config. */
export async function hasVersion3Objects(storage: Storage): Promise<boolean> {
  for (const prefix of ['index/', 'packs/', 'backups/']) {
    for await (const _ of storage.list(prefix)) return true;
  }
  return false;
}

export async function rebuildVersion3Config(storage: Storage, where: string, why: string, options: { passphrase: Passphrase | undefined; cacheRoot: string }): Promise<RecoveredConfig> {
  const keyFiles = (await keys(storage, 'keys/')).filter((key) => /^keys\/[0-9a-f]{16}\.json$/.test(key));
  if (keyFiles.length > 1) throw new NotARepositoryError(where, `its config is lost (${why}), and keys/ holds ${keyFiles.length} key files with no config to say which is the repository's`);
  const keyFile = keyFiles[0];
  const backend = s3BackendOf(storage);
  const earlier = backend ? await earlierConfigVersion(backend, where, keyFile, options.passphrase) : undefined;
  if (earlier) {
    const from = 'config version' as const;
    return writeRebuiltConfig(storage, earlier, why, { id: from, blockSize: from, created: from, encryption: earlier.encryption ? 'key file' : 'none', objectLock: earlier.objectLock ? from : 'none' });
  }
  let id: string | undefined;
  let unlocked: RepositoryKeys | undefined;
  if (keyFile) {
    if (options.passphrase === undefined) throw new PassphraseRequiredError(where);
    const file = decodeKeyFile(await storage.get(keyFile, { maxSize: KEY_FILE_LIMIT }), `key file ${keyFile}`);
    const candidates = (await readdir(options.cacheRoot).catch(() => [] as string[])).filter((name) => /^[0-9a-f]{32}$/.test(name));
    for (const candidate of candidates) {
      try {
        unlocked = await unlockKeyFile(file, options.passphrase, candidate, where);
        id = candidate;
        break;
      } catch {
        // Another repository's cache, or a wrong passphrase: the next candidate.
      }
    }
    if (!id) {
      throw new NotARepositoryError(where, `its config is lost (${why}); the repository id, to which the key file's seal is bound, is kept only there and in the index cache of a host that used the repository (none here, or the passphrase is wrong): run repair on such a host, or restore the config from a copy`);
    }
  }
  const sizes = new Set<number>();
  let oldest: string | undefined;
  for (const key of await keys(storage, 'backups/')) {
    try {
      const bytes = await storage.get(key, { maxSize: RECORD_FILE_LIMIT });
      // A sealed record with no key file: the repository is encrypted and its key file lost. A plain config
      // written now would make every command misread it (and the key file, restored later, would not count).
      if (!unlocked && bytes.subarray(0, SEALED_METADATA_MAGIC.length).equals(SEALED_METADATA_MAGIC)) {
        throw new NotARepositoryError(where, `its config is lost (${why}), and its records are encrypted (${key} is sealed) while keys/ holds no key file: restore the key file (keys/<id>.json) from a copy, then run repair again`);
      }
      const plaintext = unlocked ? openMetadata(unlocked.dataKey, bytes, key) : bytes;
      if (typeof plaintext === 'string') continue;
      const record = decodeBackupRecord(plaintext, key);
      validateBlockSize(record.blockSize);
      sizes.add(record.blockSize);
      if (oldest === undefined || record.startTime < oldest) oldest = record.startTime;
    } catch (error) {
      if (error instanceof NotARepositoryError) throw error;
      // A damaged record says nothing; repair reports it afterwards.
    }
  }
  if (sizes.size > 1) throw new NotARepositoryError(where, `its config is lost (${why}), and the records state ${sizes.size} different block sizes`);
  const blockSize = sizes.values().next().value ?? DEFAULT_BLOCK_SIZE;
  // Compression: the default of a new repository. Its frames read whatever they hold; naming zstd keeps
  // engines that predate it out (they would take its zstd frames for damage), which lz4 would not.
  const config: RepositoryConfig = newConfig(id ?? randomBytes(16).toString('hex'), blockSize, oldest ? new Date(oldest) : new Date(), keyFile ? { cipher: CIPHER_ID, keyFile } : undefined, true, DEFAULT_COMPRESSION);
  const lock = backend ? await lockOfRetentions(backend) : undefined;
  if (lock) config.objectLock = lock;
  return writeRebuiltConfig(storage, config, why, {
    id: id ? 'index' : 'new',
    blockSize: sizes.size > 0 ? 'records' : 'default',
    created: oldest ? 'records' : 'now',
    encryption: keyFile ? 'key file' : 'none',
    objectLock: lock ? 'retention' : 'none',
  });
}

/** Writes the rebuilt config (locked as it says: applyObjectLock), keeping a damaged one beside it. */
async function writeRebuiltConfig(storage: Storage, config: RepositoryConfig, why: string, sources: RecoveredConfig['sources']): Promise<RecoveredConfig> {
  applyObjectLock(storage, config);
  let keptAs: string | null = null;
  const present = await storage.get('config', { maxSize: 1024 * 1024 }).catch((error: unknown) => {
    if (isStorageError(error, 'not-found')) return undefined;
    if (isStorageError(error, 'too-large')) return Buffer.from('(larger than 1 MiB: not kept)');
    throw error;
  });
  if (present) {
    keptAs = `config.damaged-${new Date().toISOString().replace(/[^0-9]/g, '')}`;
    await storage.put(keptAs, present, { ifAbsent: true });
    await storage.put('config', encodeConfig(config));
  } else {
    await storage.put('config', encodeConfig(config), { ifAbsent: true });
  }
  return { config, why, sources, keptAs };
}

/**
 * The newest earlier version of `config` (S3's ListObjectVersions) that is a valid version-3 config and
 * agrees with the store: the key file it names is the one in keys/ and the passphrase opens it under its id
 * (or it is plain and keys/ is empty). Undefined when none does (an unversioned bucket keeps no earlier one).
 */
async function earlierConfigVersion(backend: S3Storage, where: string, keyFile: string | undefined, passphrase: Passphrase | undefined): Promise<RepositoryConfig | undefined> {
  const versions: string[] = [];
  for await (const version of backend.listVersions('config')) {
    // The current version is the one every command refused: only earlier ones can be what it was.
    if (version.key === 'config' && !version.deleteMarker && !version.latest) versions.push(version.versionId);
    if (versions.length === EARLIER_VERSIONS_TRIED) break;
  }
  for (const versionId of versions) {
    const bytes = await backend.get('config', { versionId, maxSize: 1024 * 1024 }).catch((error: unknown) => {
      if (isStorageError(error, 'not-found') || isStorageError(error, 'too-large')) return undefined;
      throw error;
    });
    const config = bytes ? decodeConfig(bytes) : 'unreadable';
    if (typeof config === 'string' || !isManyWriters(config)) continue;
    if ((config.encryption?.keyFile ?? undefined) !== keyFile) continue;
    if (config.encryption && keyFile) {
      if (passphrase === undefined) throw new PassphraseRequiredError(where);
      const file = decodeKeyFile(await backend.get(keyFile, { maxSize: KEY_FILE_LIMIT }), `key file ${keyFile}`);
      const opened = await unlockKeyFile(file, passphrase, config.id, where).then(() => true, () => false);
      if (!opened) continue;
    }
    return config;
  }
  return undefined;
}

/**
 * The lock of a bucket with Object Lock enabled, read back from its objects: each was written locked until
 * its write + R, and gc only lengthens a lock, so over the newest objects (leases are unlocked) the shortest
 * span from write to retain-until is R, give or take the store's one-second resolution and the host's skew:
 * rounded to the second. Undefined when the bucket has no Object Lock or no object carries a retention.
 */
async function lockOfRetentions(backend: S3Storage): Promise<ObjectLockConfig | undefined> {
  if (!(await backend.bucketProtection()).objectLock) return undefined;
  const objects: { key: string; modified: number }[] = [];
  for await (const info of backend.list('')) {
    if (!info.key.startsWith(UNLOCKED_PREFIX) && info.key !== 'config' && info.modified !== undefined) objects.push({ key: info.key, modified: info.modified });
  }
  objects.sort((a, b) => b.modified - a.modified);
  let best: ObjectLockConfig | undefined;
  for (const object of objects.slice(0, RETENTIONS_READ)) {
    const retention = await backend.retention(object.key);
    if (!retention || (retention.mode !== 'COMPLIANCE' && retention.mode !== 'GOVERNANCE')) continue;
    const span = Math.round((retention.until - object.modified) / 1000) * 1000;
    if (span < OBJECT_LOCK_MIN_MS || span > OBJECT_LOCK_MAX_MS) continue;
    if (best === undefined || span < best.retentionMs) best = { mode: retention.mode === 'COMPLIANCE' ? 'compliance' : 'governance', retentionMs: span };
  }
  return best;
}
