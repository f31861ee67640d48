/**
 * A repository on a local filesystem: config, packs/, backups/, index/ (LevelDB), tmp/, lock.
 *
 * Opening for reading (`list`, `show`) needs no lock: backup records are immutable files. Anything that
 * uses the index (backup, restore, verify) opens it exclusively: LevelDB admits one process at a time.
 */
import { chmod, readdir, rename, rm, rmdir, stat } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { randomBytes } from 'node:crypto';
import { CIPHER_ID, CONFIG_FILE_LIMIT, KEY_FILE_LIMIT, LAYOUT, RECORD_FILE_LIMIT, RESERVE_SIZE } from './constants.js';
import type { Compression } from './compression.js';
import { configCompression, decodeConfig, encodeConfig, isManyWriters, newConfig, newestReadableVersion, type RepositoryConfig } from './config.js';
import { isS3Url } from './storage/s3-url.js';
import {
  AmbiguousIdError,
  BackupNotFoundError,
  CorruptFrameError,
  CorruptMetadataError,
  FormatTooNewError,
  FormatUnsupportedError,
  InvalidArgumentError,
  isErrnoException,
  MissingBlobError,
  NotARepositoryError,
  NotEncryptedError,
  NoSpaceError,
  PassphraseRequiredError,
  RepositoryExistsError,
  ReadOnlyRepositoryError,
  RepositoryLockedError,
  type StorageRemedy,
} from './errors.js';
import { fsyncDirectory } from './durable-file.js';
import { createPrivateDirectory, ensurePrivateDirectory, formatMode, GROUP_OTHER_BITS, PRIVATE_DIRECTORY_MODE } from './file-modes.js';
import type { Passphrase } from './passphrase.js';
import { checkLocalPath } from './local-path.js';
import { displayText } from './display-text.js';
import { IndexStore } from './index-store.js';
import { acquireLock, readLockHolder, refuseIfLocked, type RepositoryLock } from './lock.js';
import { decodeBackupRecord, encodeBackupRecord, type BackupRecord } from './backup-record.js';
import type { FrameLocator } from './frame-locator.js';
import { deletePack, frameLocatorIn, notOwnPack, packSize, readFrameBytes, readPackBytes, scanPack, type StoreHandle, type PackScan, type PackTarget } from './pack-file.js';
import { blobId, openBlob, sealBlobToBuffer } from './blob-codec.js';
import { initChecksum } from './checksum.js';
import { BlobWriter } from './blob-writer.js';
import type { BlobIndex, BlobLocation, IndexEntry } from './index-entry.js';
import type { LoadPage, StorePage } from './block-map.js';
import { newRepositoryKeys, type RepositoryKeys } from './crypto.js';
import { checkPassphrase, createKeyFile, decodeKeyFile, encodeKeyFile, keyFileName, unlockKeyFileCompatibly } from './key-file.js';
import { openMetadata, sealMetadata } from './sealed-metadata.js';
import { decodeVerification, encodeVerification, verificationKey, verificationName, verificationOfKey, VERIFICATION_FILE_LIMIT, VERIFICATIONS_PREFIX, type BootVerification } from './verification-record.js';
import { crashPoint } from './crash-points.js';
import { liveWriterTokens } from './writers.js';
import { removeStaleRegistrations } from './registry.js';
import { listQuarantine, quarantineKey } from './quarantine.js';
import { scanPackFiles, scanRecordFiles, type StrayFile } from './layout-scan.js';
import { CONFIG_KEY, openStore, packIdOfKey, packKey, PACKS_PREFIX, recordIdOfKey, recordKey, RECORDS_PREFIX } from './store.js';
import type { Storage } from './storage/storage.js';
import { isStorageError, StorageError } from './storage/storage-error.js';
import { LocalStorage } from './storage/local.js';
import { hasRepositoryLayout } from './config-recovery.js';
import { noticeSink, type NoticeSink } from './notices.js';
import { createReserve, freeBytes, releaseReserve, reserveSize } from './space-reserve.js';
import { copyIndexForReading, privateIndexDir, removeIndexCopy, unwritableReason, withoutLockNotice, type Unwritable } from './unwritable.js';
import { PackPresence } from './pack-presence.js';
import { defaultCacheRoot, V3Session } from './v3/session.js';
import { decodeSegment, parseSegmentKey, SEGMENT_MAX_OBJECT_SIZE, SEGMENT_PREFIX, segmentKey } from './v3/segment.js';
import { locationKind, openLocation } from './v3/location.js';
import { lockedUntil } from './v3/object-lock.js';
import { isMidMigration } from './v3/migrate.js';
import { AsOfStorage } from './v3/as-of.js';
import { applyObjectLock } from './v3/object-lock.js';

export interface OpenOptions {
  /** 'read': records only, no lock. 'exclusive': lock + index. */
  access: 'read' | 'exclusive';
  /** 'skip': take the lock but leave the index closed (repair, which builds a new one). */
  index?: 'open' | 'skip';
  /** What the lock file says the holder is doing (e.g. "backup"). */
  command?: string;
  /** Unlocks an encrypted repository (bytes as given; a string stands for its UTF-8); ignored by a plain one unless `requireEncryption`. */
  passphrase?: Passphrase | undefined;
  /**
   * Refuse a plain repository (NotEncryptedError) before anything else: the caller expects an encrypted
   * one and is about to write. A config is not authenticated, so this is what stops an encrypted
   * repository whose config was rewritten as a plain one from receiving plaintext.
   */
  requireEncryption?: boolean | undefined;
  /** Says what opening did on its own (a stale lock broken, the index rebuilt, …); default: notices.ts's sink. */
  onNotice?: NoticeSink | undefined;
  /**
   * When the lock cannot be written because the repository is read-only, or full with no space reserve
   * to take it with: go on without the lock, reading the index from a private copy, rather than fail.
   * Readers only (restore, verify, serve): SPEC.md, section 12.6.
   */
  readWithoutLock?: boolean | undefined;
  /** May a full disk be met by using the space reserve to take the lock (default true; backup: false, it would only fill it). */
  useReserve?: boolean | undefined;
  /**
   * Called between the packs of an index rebuild (the one long step of opening): throws to stop it (the
   * engine's interruption check). The half-built index is removed.
   */
  checkInterrupted?: (() => void) | undefined;
  /**
   * The caller works on format version 3 (many writers, SPEC.md 19; every s3:// repository): it is opened
   * with a shared lease and the host's index cache instead of the lock and the repository's LevelDB. Without
   * it a version-3 repository is refused (ENGINE_FORMAT_UNSUPPORTED).
   */
  manyWriters?: boolean | undefined;
  /** Stops a wait for a lease and the cache's catch-up (version 3). */
  signal?: AbortSignal | undefined;
  /** Version 3: refuse while another live lease has the same command (gc: one at a time, SPEC.md 19.5). */
  alone?: boolean | undefined;
  /**
   * Version 3: take the cache's slot but leave its catch-up to the caller (repair: it replaces the index and
   * catches the cache up after, so a catch-up at open would only hold its memory and time for nothing).
   * Nothing may be looked up before the caller's catch-up.
   */
  catchUpLater?: boolean | undefined;
  /** `engine migrate`: open a repository mid-migration (SPEC.md 19.11), which every other command refuses. */
  migrating?: boolean | undefined;
  /**
   * `--as-of`: read an S3 repository in a versioned bucket as it was at this time (ms since the epoch; SPEC.md
   * 20.5): every object at its newest version then. Read-only: no lease is written, the host's index cache
   * is a private one removed at close, and any write is refused.
   */
  asOf?: number | undefined;
}

export interface OpenReport {
  /** Who held a stale lock that opening broke. */
  brokeStaleLock?: { pid: number; hostname: string; since: string };
  /** Set when the index was missing and was rebuilt from the packs. */
  rebuiltIndex?: { packs: number; blobs: number };
  /** Set when the repository is read without the lock (readWithoutLock): why it could not be written. */
  withoutLock?: Unwritable;
}

/** For a lost or damaged config in what is otherwise a repository: the way out. */
async function rebuildHint(root: string): Promise<{ condition: string; remedy: StorageRemedy } | undefined> {
  return (await hasRepositoryLayout(root)) ? { condition: "it has a repository's packs/ and backups/", remedy: { kind: 'repair', repo: root, does: 'rebuilds the config from them' } } : undefined;
}

/** The directories `init` creates in the new repository, besides `index/` (LevelDB) and, encrypted, `keys/` (SPEC.md, section 3). */
export const INIT_DIRECTORIES: readonly string[] = [LAYOUT.packs, LAYOUT.backups, LAYOUT.tmp, LAYOUT.readers];
/** packs/00 … packs/ff. */
export const PACK_DIRECTORIES: readonly string[] = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, '0'));

/**
 * The directory a new repository goes into: created (0700) when missing, provided its parent exists (a
 * mistyped path is not silently created, parents and all); an existing one must be an empty directory,
 * and becomes private. Anything else is a usage error, said plainly.
 */
export async function prepareRepositoryRoot(root: string): Promise<void> {
  const existing = await stat(root).catch((error: unknown) => {
    if (isErrnoException(error) && error.code === 'ENOENT') return undefined;
    if (isErrnoException(error) && error.code === 'ENOTDIR') throw new InvalidArgumentError(`cannot create a repository at ${root}: a part of that path is a file, not a directory`);
    throw error;
  });
  if (existing === undefined) {
    const parent = dirname(resolve(root));
    const parentStats = await stat(parent).catch(() => undefined);
    if (!parentStats) throw new InvalidArgumentError(`cannot create a repository at ${root}: its parent directory ${parent} does not exist (create it first)`);
    if (!parentStats.isDirectory()) throw new InvalidArgumentError(`cannot create a repository at ${root}: ${parent} is not a directory`);
    await createPrivateDirectory(root);
    return;
  }
  if (!existing.isDirectory()) throw new InvalidArgumentError(`cannot create a repository at ${root}: it is a file, not a directory (give a new or empty directory)`);
  if ((await readdir(root)).length > 0) throw new RepositoryExistsError(root);
  await chmod(root, PRIVATE_DIRECTORY_MODE);
}

export class Repository {
  private indexStore: IndexStore | undefined;
  private lock: RepositoryLock | undefined;
  /** The private copy of the index a reader without the lock uses (deleted on close). */
  private indexCopy: string | undefined;
  /** The space reserve was deleted to take the lock: it is set aside again before the lock goes. */
  private reserveReleased = false;
  /** May this command use the space reserve (OpenOptions.useReserve)? */
  private mayUseReserve = true;
  private notice: NoticeSink = noticeSink();
  private checkInterrupted: (() => void) | undefined;
  readonly openReport: OpenReport = {};
  /** Pack presence, checked once per pack for this open (a run): what dedupe and incrementals trust. */
  readonly packPresence: PackPresence;

  /**
   * Where the repository's objects are read and written (store.ts): config, key file, packs, records,
   * markers. The lock, the index, the registrations, tmp/ and the space reserve are the host's, beside it.
   */
  readonly store: Storage;
  /** Where new packs go: the store, built in tmp/ first (version 3: in the host's cache slot). */
  readonly packTarget: PackTarget;
  /** Version 3, opened with its lease (access 'exclusive'): the lease, the index cache, the segment writer. */
  private v3: V3Session | undefined;

  private constructor(
    readonly root: string,
    readonly config: RepositoryConfig,
    /** The master keys of an encrypted repository; undefined for a plain one. */
    readonly keys: RepositoryKeys | undefined,
    store: Storage,
  ) {
    this.store = store;
    this.packTarget = { store, tempDir: join(root, LAYOUT.tmp) };
    this.packPresence = new PackPresence(store);
  }

  /** An s3:// repository (always version 3): no folder, no file modes. */
  get onS3(): boolean {
    return isS3Url(this.root);
  }

  /** Format version 3: many writers, leases, segments (SPEC.md 19). */
  get manyWriters(): boolean {
    return isManyWriters(this.config);
  }

  /** What new frames are compressed with (config `compression`); frames already stored say their own. */
  get compression(): Compression {
    return configCompression(this.config);
  }

  get blockSize(): number {
    return this.config.blockSize;
  }

  /** The id of a block or page: SHA-256, or HMAC-SHA256 under the id key in an encrypted repository. */
  readonly blobId = (data: Uint8Array): Buffer => blobId(data, this.keys);

  /** `passphrase` makes an encrypted repository (format version 2). */
  static async init(root: string, options: { blockSize: number; passphrase?: Passphrase | undefined; compression?: Compression | undefined }): Promise<RepositoryConfig> {
    checkLocalPath(root, 'repository');
    if (options.passphrase !== undefined) checkPassphrase(options.passphrase);
    const repositoryId = randomBytes(16).toString('hex');
    const keyId = randomBytes(8).toString('hex');
    const encryption = options.passphrase === undefined ? undefined : { cipher: CIPHER_ID, keyFile: `${LAYOUT.keys}/${keyFileName(keyId)}` };
    const config = newConfig(repositoryId, options.blockSize, new Date(), encryption, false, options.compression);
    await prepareRepositoryRoot(root);
    for (const dir of INIT_DIRECTORIES) await createPrivateDirectory(join(root, dir));
    const store = openStore(root);
    if (encryption && options.passphrase !== undefined) {
      await createPrivateDirectory(join(root, LAYOUT.keys));
      const keyFile = await createKeyFile(newRepositoryKeys(), options.passphrase, repositoryId, keyId);
      // Owner-only and written once (0400): whoever reads the key file can guess passphrases offline (SPEC.md, section 17).
      await store.put(encryption.keyFile, encodeKeyFile(keyFile), { ifAbsent: true });
    }
    const packs = join(root, LAYOUT.packs);
    await Promise.all(PACK_DIRECTORIES.map((dir) => createPrivateDirectory(join(packs, dir))));
    await fsyncDirectory(packs);
    const index = await IndexStore.open(join(root, LAYOUT.index), { create: true });
    await index.putMeta('repository-id', config.id);
    await index.close();
    // Space set aside for prune and gc to take the lock with once the disk is full (SPEC.md, section 12.6).
    await createReserve(root);
    // The config is written last: a directory without one is not a repository, so a crashed init is visible.
    await store.put(CONFIG_KEY, encodeConfig(config), { ifAbsent: true });
    await store.close();
    await fsyncDirectory(root);
    return config;
  }

  /** Reads and checks `config` (NotARepositoryError, FormatTooNewError), without keys, lock or index. */
  static async readConfig(root: string, store?: Storage, command?: string): Promise<RepositoryConfig> {
    // An S3 repository is always version 3, which the callers of this do not open: said as such, not as a URL.
    if (isS3Url(root)) throw new FormatUnsupportedError(root, command);
    const config = await Repository.loadConfig(root, store);
    if (isManyWriters(config)) throw new FormatUnsupportedError(root, command);
    return config;
  }

  /** Whether the repository at `root` is of format version 3 (every s3:// one); a config that cannot be read is left to the open's own error. */
  static async isVersion3(root: string): Promise<boolean> {
    if (isS3Url(root)) return true;
    try {
      return isManyWriters(await Repository.loadConfig(root));
    } catch {
      // No readable config: a folder laid out as version 3 (leases/, or segments in index/) is one all the same.
      if (await stat(join(root, 'leases')).then(() => true, () => false)) return true;
      return (await readdir(join(root, LAYOUT.index)).catch(() => [] as string[])).some((name) => /^[0-9a-f]{32}-[0-9a-f]{8}$/.test(name));
    }
  }

  /** The config of any version this engine reads (3 included), from the store given or the folder's. */
  static async loadConfig(root: string, store?: Storage): Promise<RepositoryConfig> {
    if (!isS3Url(root)) checkLocalPath(root, 'repository');
    const from = store ?? openStore(root);
    let bytes: Buffer;
    try {
      bytes = await from.get(CONFIG_KEY, { maxSize: CONFIG_FILE_LIMIT });
    } catch (error) {
      if (isStorageError(error, 'too-large')) {
        const size = (await from.stat(CONFIG_KEY).catch(() => undefined))?.size ?? CONFIG_FILE_LIMIT + 1;
        throw new NotARepositoryError(root, `its config is ${size} bytes, far more than a config holds`);
      }
      const code = storageCode(error);
      if (code === 'ENOENT') throw new NotARepositoryError(root, 'it has no config file', await rebuildHint(root));
      throw new NotARepositoryError(root, `its config cannot be read (${code})`);
    } finally {
      if (!store) await from.close();
    }
    const config = decodeConfig(bytes);
    if (typeof config === 'string') throw new NotARepositoryError(root, config, await rebuildHint(root));
    if (config.version > newestReadableVersion(config)) throw new FormatTooNewError(root, config.version, newestReadableVersion(config));
    return config;
  }

  /**
   * Where the journals of the repository at `root` are (SPEC.md 12.1, 19.1): its folder for versions 1 and
   * 2; for version 3 (a folder or S3) this host's cache directory of it, `<cache>/<repository id>/` (19.4):
   * a journal names what a run of this host created, and an s3:// location is no folder. A folder whose
   * config cannot be read keeps the folder (opening the repository then says what is wrong with it).
   */
  static async journalRoot(root: string, cacheRoot = defaultCacheRoot()): Promise<string> {
    if (!isS3Url(root)) {
      const config = await Repository.loadConfig(root).catch(() => undefined);
      return config && isManyWriters(config) ? join(cacheRoot, config.id) : root;
    }
    const store = await openLocation(root);
    try {
      return join(cacheRoot, (await Repository.loadConfig(root, store)).id);
    } finally {
      await store.close();
    }
  }

  static async open(root: string, options: OpenOptions): Promise<Repository> {
    if (isS3Url(root) && options.manyWriters !== true) throw new FormatUnsupportedError(root, options.command);
    // A folder's store as v1/v2 use it (temporary files in tmp/), an S3 one through its retries and limit.
    // Commands other than init take the store's endpoint, region and CA from the AWS environment (location.ts).
    let store = isS3Url(root) ? await openLocation(root, { onWarning: noticeSink(options.onNotice) }) : openStore(root);
    let repo: Repository;
    try {
      if (options.asOf !== undefined) {
        if (!isS3Url(root)) throw new InvalidArgumentError(`--as-of reads the object versions of an S3 bucket: ${root} is a folder`);
        store = await AsOfStorage.open(store, options.asOf, options.signal);
      }
      let config = await Repository.loadConfig(root, store);
      if (isManyWriters(config)) {
        if (options.manyWriters !== true) throw new FormatUnsupportedError(root, options.command);
        if (!isS3Url(root)) {
          // A version-3 folder has no tmp/: its temporary files lie beside their objects (storage/local.ts).
          await store.close();
          store = await openLocation(root);
          config = await Repository.loadConfig(root, store);
        }
      }
      // Every later write carries the config's lock (Object Lock, SPEC.md 20.5); a folder cannot have one.
      if (isManyWriters(config) && options.asOf === undefined) applyObjectLock(store, config);
      if (!isManyWriters(config) && options.migrating !== true && (await isMidMigration(root))) {
        throw new NotARepositoryError(root, `a migration to format version 3 was cut short after its index was swapped (index.v2/ beside segments in index/): \`engine migrate ${root}\` finishes it`);
      }
      if (options.requireEncryption === true && !config.encryption) throw new NotEncryptedError(root);
      // Keys first: a wrong passphrase stops here, before the lock or anything else is written.
      const keys = config.encryption ? await Repository.unlock(root, store, config, options.passphrase, noticeSink(options.onNotice)) : undefined;
      repo = new Repository(root, config, keys, store);
    } catch (error) {
      await store.close();
      throw error;
    }
    await initChecksum();
    repo.notice = noticeSink(options.onNotice);
    repo.mayUseReserve = options.useReserve !== false;
    repo.checkInterrupted = options.checkInterrupted;
    if (options.access === 'exclusive') {
      if (repo.manyWriters) await repo.openWithLease(options.command ?? 'engine', options);
      else await repo.openExclusive(options.command ?? 'engine', options.index ?? 'open', options);
    }
    return repo;
  }

  private static async unlock(root: string, store: Storage, config: RepositoryConfig, passphrase: Passphrase | undefined, notice: NoticeSink): Promise<RepositoryKeys> {
    if (passphrase === undefined) throw new PassphraseRequiredError(root);
    const keyFile = config.encryption!.keyFile;
    const where = `key file ${keyFile}`;
    const bytes = await store.get(keyFile, { maxSize: KEY_FILE_LIMIT }).catch(async (error: unknown) => {
      if (isStorageError(error, 'too-large')) {
        const size = (await store.stat(keyFile).catch(() => undefined))?.size ?? KEY_FILE_LIMIT + 1;
        throw new CorruptMetadataError(where, `${size} bytes, more than a key file holds`);
      }
      throw new CorruptMetadataError(where, `cannot be read (${storageCode(error)})`);
    });
    const file = decodeKeyFile(bytes, where);
    if (`${LAYOUT.keys}/${keyFileName(file.id)}` !== keyFile) throw new CorruptMetadataError(where, `it names itself ${file.id}`);
    // A key file in a folder can be open to other users (a copy, a restore from elsewhere): said, with the fix.
    const path = store instanceof LocalStorage ? store.pathOf(keyFile) : undefined;
    const mode = path === undefined ? 0 : ((await stat(path).catch(() => undefined))?.mode ?? 0);
    if (path !== undefined && (mode & GROUP_OTHER_BITS) !== 0) {
      notice(`the key file ${keyFile} of repository ${root} is open to other users (mode ${formatMode(mode)}), who can try passphrases against it offline: chmod 400 ${path}`);
    }
    return unlockKeyFileCompatibly(file, passphrase, config.id, root, notice);
  }

  get encrypted(): boolean {
    return this.keys !== undefined;
  }

  /**
   * Version 3: the shared lease, then the host's index cache caught up (SPEC.md 19.4, 19.5); packs are built
   * in the cache slot's own folder. A backup also gets a segment writer.
   */
  private async openWithLease(command: string, options: OpenOptions): Promise<void> {
    try {
      const asOf = options.asOf !== undefined;
      if (asOf && command !== 'restore' && command !== 'verify' && command !== 'serve' && command !== 'mount') throw new InvalidArgumentError(`--as-of is for commands that only read (restore, verify, list, show): not ${command}`);
      this.v3 = await V3Session.open({
        storage: this.store,
        config: this.config,
        dataKey: this.keys?.dataKey,
        command,
        writer: command === 'backup' || command === 'copy',
        alone: options.alone,
        catchUpLater: options.catchUpLater,
        readWithoutLease: options.readWithoutLock,
        noLease: asOf,
        privateCache: asOf,
        signal: options.signal,
        notice: this.notice,
      });
    } catch (error) {
      await this.close();
      throw error;
    }
    (this.packTarget as { tempDir: string }).tempDir = this.v3.tempDir;
  }

  /** Version 3 opened with its lease: the session (lease, cache); what gc's commit works through. */
  get session(): V3Session {
    if (!this.v3) throw new Error('a version-1/2 repository, or one opened without its lease, has no version-3 session');
    return this.v3;
  }

  /** The index blob writers and readers ask: the repository's LevelDB, or in version 3 the session's. */
  private get blobIndex(): BlobIndex {
    return this.v3 ?? this.index;
  }

  private async openExclusive(command: string, index: 'open' | 'skip', options: OpenOptions): Promise<void> {
    // A copy made by a tool that keeps no empty directory (git, some sync tools) may lack tmp/, where the lock and
    // every durable write begin, and backups/; packs/xx/ and the registries are created when first written.
    for (const dir of [LAYOUT.tmp, LAYOUT.backups]) await ensurePrivateDirectory(join(this.root, dir)).catch(() => undefined);
    try {
      this.lock = await this.takeLock(command, options);
    } catch (error) {
      const why = unwritableReason(error);
      if (!why || !options.readWithoutLock || error instanceof RepositoryLockedError) throw error;
      this.openReport.withoutLock = why;
      this.notice(withoutLockNotice(this.root, command, why, await readLockHolder(this.root)));
    }
    if (this.lock?.brokeStale) {
      const stale = this.lock.brokeStale;
      this.openReport.brokeStaleLock = stale;
      this.notice(`removed a stale lock of pid ${stale.pid} on ${stale.hostname} (since ${stale.since}): its ${stale.command} no longer runs`);
    }
    try {
      // Opening LevelDB writes (a new manifest and log): a full disk that left room for the lock meets it here.
      if (index === 'open') await (this.lock ? this.withSpaceReserve(() => this.openIndex()) : this.openIndex());
      if (this.openReport.rebuiltIndex) this.notice(`the index was missing; rebuilt it from ${this.openReport.rebuiltIndex.packs} packs`);
    } catch (error) {
      await this.close();
      throw error;
    }
  }

  /**
   * Takes the lock; on a full disk, with the space reserve when allowed (SPEC.md, section 12.6). A lock
   * held by a live process is the answer whatever the disk says. Failures that mean the repository cannot
   * be written are thrown as such (unwritableReason tells them apart for readWithoutLock).
   */
  private async takeLock(command: string, options: OpenOptions): Promise<RepositoryLock> {
    try {
      return await acquireLock(this.root, command);
    } catch (error) {
      const why = unwritableReason(error);
      if (!why) throw error;
      if (why.kind === 'read-only') {
        // A reader of a read-only copy (a snapshot, an off-site copy made while a backup ran) is not stopped
        // by a lock it cannot check; only by a holder that provably runs here, writing through another path.
        if (options.readWithoutLock) await refuseIfLocked(this.root, { otherHosts: false });
        throw Object.assign(new ReadOnlyRepositoryError(this.root, command, why.errno), { cause: error });
      }
      await refuseIfLocked(this.root);
      if (this.mayUseReserve && (await this.releaseReserve(command))) {
        try {
          return await acquireLock(this.root, command);
        } catch (again) {
          await createReserve(this.root).catch(() => 0);
          this.reserveReleased = false;
          throw again;
        }
      }
      const hint =
        options.useReserve === false
          ? `${command} cannot add data to a full repository: \`engine prune\` and \`engine gc\` free space (they can run on a full disk), or free space on the filesystem`
          : `no space is set aside to take the lock with (${LAYOUT.reserve} is used up or missing): free some space on that filesystem, then run \`engine gc\``;
      throw new NoSpaceError(join(this.root, LAYOUT.lock), error, hint);
    }
  }

  /** Deletes the space reserve to make room on a full disk; false when there is none (or it is already used). */
  private async releaseReserve(command: string): Promise<boolean> {
    if (this.reserveReleased || !(await releaseReserve(this.root).catch(() => false))) return false;
    this.reserveReleased = true;
    this.notice(`the filesystem holding ${this.root} is full: ${command} uses the space set aside for this (${LAYOUT.reserve}), and sets it aside again when it ends`);
    return true;
  }

  /**
   * Runs a write of a command that frees space or only reads (prune, gc, forget, restore …; never backup):
   * on a full disk it is tried once more with the space reserve deleted (SPEC.md, section 12.6). Only
   * while holding the lock, which is released only after the reserve is set aside again.
   */
  async withSpaceReserve<T>(write: () => Promise<T>): Promise<T> {
    try {
      return await write();
    } catch (error) {
      if (!(error instanceof NoSpaceError) || !this.lock || !this.mayUseReserve) throw error;
      if (!(await this.releaseReserve(this.lock.holder.command))) throw error;
      return write();
    }
  }

  private async openIndex(): Promise<void> {
    const indexPath = join(this.root, LAYOUT.index);
    const missing = await stat(join(indexPath, 'CURRENT')).then(() => false, () => true);
    if (this.openReport.withoutLock) {
      // Nothing may be written here: the index is read (or rebuilt from the packs) in a private directory.
      if (missing) {
        this.indexCopy = await privateIndexDir();
        this.openReport.rebuiltIndex = await this.rebuildIndexInto(this.indexCopy, { buildInPlace: true });
      } else {
        this.indexCopy = await copyIndexForReading(indexPath);
      }
    } else if (missing) {
      this.openReport.rebuiltIndex = await this.rebuildIndexInto(indexPath);
    }
    this.indexStore = await IndexStore.open(this.indexCopy ?? indexPath, { create: false }).catch(async (error: unknown) => {
      const cause = (error as { cause?: { code?: string } }).cause;
      if (cause?.code === 'LEVEL_LOCKED') throw new RepositoryLockedError(this.root, await readLockHolder(this.root));
      // Opening writes (a new MANIFEST and log, the old log as a table): on a full disk that is not damage.
      if (error instanceof NoSpaceError) throw error;
      throw new CorruptMetadataError('index (LevelDB)', `${String(cause ?? error)}; \`engine repair\` rebuilds it from the packs`);
    });
    try {
      await this.reconcileCatalogue();
    } catch (error) {
      // Closed, so that a retry (withSpaceReserve) can open it again.
      await this.indexStore.close().catch(() => undefined);
      this.indexStore = undefined;
      throw error;
    }
  }

  /**
   * Puts an index built elsewhere (under tmp/, complete and closed) in place of the current one: the old
   * index is moved aside, the new one renamed in, the repository directory fsynced, the old one deleted.
   * A crash between the two renames leaves no index/, which the next open rebuilds from the packs
   * (skipping quarantined frames): never a mix of the two.
   */
  async installIndex(builtPath: string): Promise<void> {
    if (!this.lock) throw new Error('installIndex needs the exclusive lock');
    await this.indexStore?.close().catch(() => undefined);
    this.indexStore = undefined;
    const indexPath = join(this.root, LAYOUT.index);
    const aside = join(this.root, LAYOUT.tmp, `index-old.${randomBytes(4).toString('hex')}`);
    await rename(indexPath, aside).catch((error: unknown) => {
      if (!isErrnoException(error) || error.code !== 'ENOENT') throw error;
    });
    await rename(builtPath, indexPath);
    await fsyncDirectory(this.root);
    crashPoint('repair-index-swapped');
    await rm(aside, { recursive: true, force: true });
    await this.openIndex();
  }

  /**
   * Removes a backup (prune): its record, the one file that makes it exist, then its catalogue entry.
   * Its chunks stay until gc finds no other backup referencing them.
   */
  async removeBackup(id: string): Promise<void> {
    if (this.manyWriters) {
      // Version 3: under the command's shared lease (SPEC.md 19.5, 19.8); there is no catalogue to follow.
      if (!this.v3) throw new Error('removeBackup on a version-3 repository opened without its lease');
      this.v3.lease.assertHeld();
      await this.removeVerifications(id);
      crashPoint('backup-verifications-swept');
      await this.store.delete(recordKey(id));
      crashPoint('backup-record-deleted');
      await this.removeVerifications(id);
      return;
    }
    if (!this.lock) throw new Error('removeBackup needs the exclusive lock');
    await this.removeVerifications(id);
    crashPoint('backup-verifications-swept');
    await this.store.delete(recordKey(id));
    await this.withSpaceReserve(() => this.index.deleteBackup(id));
    crashPoint('backup-record-deleted');
    await this.removeVerifications(id);
  }

  /**
   * Removes the verification records of a backup that is being removed (SPEC.md 9.2): before its record and
   * again after it, so that a boot test committing beside a version-3 prune leaves none behind (it checks
   * for the backup after its own put, and removes its record when the backup is gone).
   */
  private async removeVerifications(backupId: string): Promise<void> {
    const keys: string[] = [];
    for await (const { key } of this.store.list(`${VERIFICATIONS_PREFIX}${backupId}/`)) if (verificationOfKey(key)?.backup === backupId) keys.push(key);
    for (const key of keys) await this.store.delete(key);
    // Under the lock (versions 1 and 2) no boot test can be between creating the folder and writing into it;
    // a version-3 prune holds only a shared lease, so its folders are left to gc (exclusive).
    if (!this.manyWriters) await this.removeEmptyVerificationFolders(new Set([backupId]));
  }

  /**
   * gc (SPEC.md 9.2, 10.2 step 5): the verification records whose backup is gone — orphans a prune or forget
   * killed between the backup's record and its second sweep left — removed, with the empty folders of gone
   * backups on a folder repository. Only under the lock or the exclusive lease: a boot test commits under the
   * lock or a shared lease, so none is between its check and its put. `dryRun`: named, not removed.
   */
  async removeOrphanedVerifications(existingBackups: ReadonlySet<string>, options: { dryRun?: boolean } = {}): Promise<string[]> {
    if (!options.dryRun) {
      if (this.manyWriters) this.v3?.lease.assertHeld();
      else if (!this.lock) throw new Error('removeOrphanedVerifications needs the exclusive lock');
    }
    const orphans: string[] = [];
    for await (const { key } of this.store.list(VERIFICATIONS_PREFIX)) {
      const named = verificationOfKey(key);
      if (named && !existingBackups.has(named.backup)) orphans.push(key);
    }
    orphans.sort();
    if (options.dryRun) return orphans;
    for (const key of orphans) await this.store.delete(key);
    await this.removeEmptyVerificationFolders(undefined, existingBackups);
    return orphans;
  }

  /**
   * A folder store keeps the directory a key's path needs after its last key is deleted: `verifications/<id>/`
   * of the given backups, or of every backup not in `existing`, is removed when empty (rmdir refuses one that
   * is not, so a record written meanwhile stays whole).
   */
  private async removeEmptyVerificationFolders(backups: ReadonlySet<string> | undefined, existing?: ReadonlySet<string>): Promise<void> {
    if (locationKind(this.root) !== 'folder') return;
    const folder = join(this.root, VERIFICATIONS_PREFIX);
    const names = backups ? [...backups] : (await readdirIfPresent(folder)).filter((name) => !existing?.has(name));
    for (const name of names) {
      if (!/^[0-9a-f]{32}$/.test(name)) continue;
      await rmdir(join(folder, name)).catch((error: unknown) => {
        if (isErrnoException(error) && (error.code === 'ENOENT' || error.code === 'ENOTEMPTY' || error.code === 'EEXIST')) return;
        throw error;
      });
    }
  }

  /** Closes the LevelDB index and keeps the lock (migrate renames the index's directory). */
  async closeIndex(): Promise<void> {
    await this.indexStore?.close().catch(() => undefined);
    this.indexStore = undefined;
  }

  /** `setReserveAside` false: the repository became version 3 (migrate), which has no space reserve. */
  async close(options: { setReserveAside?: boolean } = {}): Promise<void> {
    await this.v3?.close();
    this.v3 = undefined;
    await this.indexStore?.close().catch(() => undefined);
    this.indexStore = undefined;
    if (this.indexCopy) await removeIndexCopy(this.indexCopy).catch(() => undefined);
    this.indexCopy = undefined;
    if (this.lock && options.setReserveAside !== false) await this.setReserveAside().catch(() => undefined);
    await this.lock?.release();
    this.lock = undefined;
    await this.store.close().catch(() => undefined);
  }

  /**
   * Before the lock goes: sets the space reserve aside again if this process used it, or if the
   * repository has none (made before it existed) and there is ample room.
   */
  private async setReserveAside(): Promise<void> {
    const current = await reserveSize(this.root);
    if (current >= RESERVE_SIZE) return;
    if (this.reserveReleased) {
      // Used to take the lock on a full disk: as much of it as fits now.
      const reserved = await createReserve(this.root);
      if (reserved < RESERVE_SIZE) {
        this.notice(`only ${reserved} of the ${RESERVE_SIZE} bytes of the space reserve could be set aside again: the disk is still full; \`engine gc\` frees space`);
      }
      this.reserveReleased = false;
      return;
    }
    // None (a repository made before it existed) or a part of one (set aside on a full disk): completed
    // only with ample room, and never replaced by a smaller one.
    const free = await freeBytes(this.root);
    if (free === undefined || free < 4 * RESERVE_SIZE) return;
    await createReserve(this.root, RESERVE_SIZE);
  }

  /** Whether this process reads the repository without its lock (SPEC.md, section 12.6): it may not write, nor register. */
  get withoutLock(): boolean {
    return this.openReport.withoutLock !== undefined;
  }

  get index(): IndexStore {
    if (this.manyWriters) throw new Error('a version-3 repository has no LevelDB index: its callers must not be wired to version 3');
    if (!this.indexStore) throw new Error('repository was opened without its index (access: read)');
    return this.indexStore;
  }

  /**
   * Rebuilds the index from the packs, in a separate directory renamed into place when complete: an
   * interrupted rebuild leaves no index (and is simply done again), never a partial one that would be
   * trusted. The catalogue follows from backups/ on open.
   */
  private async rebuildIndexInto(indexPath: string, options: { buildInPlace?: boolean } = {}): Promise<{ packs: number; blobs: number }> {
    const building = options.buildInPlace ? indexPath : join(this.root, LAYOUT.tmp, `index-rebuild.${randomBytes(4).toString('hex')}`);
    const index = await IndexStore.open(building, { create: true });
    let packs = 0;
    let blobs = 0;
    let complete = false;
    try {
      await index.putMeta('repository-id', this.config.id);
      // Frames repair found damaged must not come back: deduplication would trust them again.
      const quarantined = await listQuarantine(this.store);
      for (const packId of await this.listPackIds()) {
        this.checkInterrupted?.();
        const scan = await this.scanPack(packId);
        const frames = scan.frames.filter((frame) => !quarantined.has(quarantineKey(packId, frame.offset)));
        packs += 1;
        blobs += frames.length;
        if (packs === 1) crashPoint('index-rebuild-pack');
        await index.addEntries(
          frames.map((frame) => ({
            id: frame.header.id,
            packId,
            offset: frame.offset,
            length: frame.length,
            rawLength: frame.header.rawLength,
            kind: frame.header.kind,
            flags: frame.header.flags,
          })),
        );
      }
      complete = true;
    } finally {
      await index.close();
      // An interrupted or failed rebuild leaves nothing behind (the next open starts again).
      if (!complete) await rm(building, { recursive: true, force: true }).catch(() => undefined);
    }
    if (options.buildInPlace) return { packs, blobs };
    await rm(indexPath, { recursive: true, force: true });
    await rename(building, indexPath);
    await fsyncDirectory(this.root);
    return { packs, blobs };
  }

  /**
   * Until when a backup's record is locked (S3 Object Lock, SPEC.md 20.5), in ms since the epoch; undefined where
   * the repository has no lock or the store does not say. prune reports it for each record it removes.
   */
  async recordLockedUntil(backupId: string, signal?: AbortSignal): Promise<number | undefined> {
    if (!this.config.objectLock) return undefined;
    return lockedUntil(this.store, recordKey(backupId), signal);
  }

  /** Every pack, by id, sorted; what else lies in packs/ is skipped (strays() lists it). */
  async listPackIds(): Promise<string[]> {
    return (await this.listPacks()).map((pack) => pack.packId);
  }

  /** Every pack with its size, sorted by id: one listing of the store. */
  async listPacks(): Promise<{ packId: string; size: number }[]> {
    const packs: { packId: string; size: number }[] = [];
    for await (const { key, size } of this.store.list(PACKS_PREFIX)) {
      const packId = packIdOfKey(key);
      if (packId) packs.push({ packId, size });
    }
    return packs;
  }

  /**
   * What lies in packs/ and backups/ without being a pack or a record (a README, an editor's backup, a
   * directory named like a pack): verify warns about each. Only a folder can hold such things.
   */
  async strays(): Promise<StrayFile[]> {
    if (!(this.store instanceof LocalStorage)) return [];
    const [packs, records] = await Promise.all([scanPackFiles(this.root), scanRecordFiles(this.root)]);
    return [...packs.strays, ...records.strays];
  }

  /** Where a pack is, relative to the repository (its key: packs/ab/ab…), for messages. */
  packDisplayPath(packId: string): string {
    return packKey(packId);
  }

  /**
   * Version 3: the shared lease this handle holds (SPEC.md 19.5, 19.9), its key and a signal that fires when
   * it is lost; undefined for versions 1 and 2 and for a handle opened without it (access 'read').
   */
  get lease(): { key: string; lost: AbortSignal } | undefined {
    return this.v3 ? { key: this.v3.lease.key, lost: this.v3.lease.lost } : undefined;
  }

  /** One frame's bytes, as the index locates it (CorruptPackError / CorruptFrameError when it cannot be read whole). */
  readFrame(location: { packId: string; offset: number; length: number }): Promise<Buffer> {
    // Version 3: a reader whose lease is lost reads no more packs (SPEC.md 19.9): gc may be deleting them.
    this.v3?.lease.assertHeld();
    return readFrameBytes(this.store, location.packId, location.offset, location.length);
  }

  /**
   * The store through a handle of its own that outlives this repository handle (serve reads after the lock
   * is released; gc copies between its two holds of it). Its close() releases it.
   */
  detachedStore(): StoreHandle {
    // A folder's store only (versions 1 and 2): an s3:// location is no path, and a version-3 reader keeps
    // its own handle (and lease) for as long as it reads.
    if (this.onS3) throw new Error('detachedStore of an S3 repository: read through the repository handle that holds the lease');
    const store = openStore(this.root);
    return {
      readFrame: (location) => readFrameBytes(store, location.packId, location.offset, location.length),
      locateFrame: (location) => frameLocatorIn(store, location),
      packTarget: { store, tempDir: this.packTarget.tempDir },
      close: () => store.close(),
    };
  }

  /**
   * Where a block worker reads a frame itself (a store of local files: pread in the worker, no copy through
   * this thread), or undefined: the frame is then read with readFrame. Measured: frame-locator.ts.
   */
  locateFrame(location: { packId: string; offset: number; length: number }): FrameLocator | undefined {
    this.v3?.lease.assertHeld();
    return frameLocatorIn(this.store, location);
  }

  /** `length` bytes of a pack at `offset` (a frame's header, for verify): exactly those, or ENGINE_STORAGE 'out-of-range'. */
  readPackRange(packId: string, offset: number, length: number): Promise<Buffer> {
    this.v3?.lease.assertHeld();
    return this.store.get(packKey(packId), { range: { offset, length } });
  }

  /** The frames of a pack, from their headers (pack-file.ts, scanPack). */
  scanPack(packId: string): Promise<PackScan> {
    this.v3?.lease.assertHeld();
    return scanPack(this.store, packId, this.encrypted);
  }

  /** A whole pack in memory (repair walks it): at most `maxSize` bytes. */
  readPack(packId: string, maxSize: number): Promise<Buffer> {
    this.v3?.lease.assertHeld();
    return readPackBytes(this.store, packId, maxSize);
  }

  /** A pack's size, or undefined when it is not there. */
  packSize(packId: string): Promise<number | undefined> {
    return packSize(this.store, packId);
  }

  /**
   * Deletes a pack that no segment names and no one else knows of (version 3: the copies gc made before it
   * stopped without changing anything); a failure is ignored, the pack then being garbage a later gc removes.
   */
  async dropUnnamedPack(packId: string): Promise<void> {
    await this.store.delete(packKey(packId)).catch(() => undefined);
  }

  /** Why the object at a pack's key is not provably this engine's pack (gc deletes only its own). */
  notOwnPack(packId: string): Promise<string | undefined> {
    return notOwnPack(this.store, packId);
  }

  /** Deletes a pack (gc, under the lock, once nothing needs it), durably; why it could not, or undefined. */
  deletePack(packId: string): Promise<string | undefined> {
    if (!this.lock) throw new Error('deletePack needs the exclusive lock');
    return deletePack(this.store, packId);
  }

  /**
   * Writes a record's bytes back in place (the catalogue's copy of a lost or damaged record): replaced
   * whole, durably. Only under the lock.
   */
  async rewriteRecord(id: string, bytes: Buffer): Promise<void> {
    if (!this.lock) throw new Error('rewriteRecord needs the exclusive lock');
    await this.store.put(recordKey(id), bytes);
  }

  /** Files in tmp/ that no live registered writer (a gc between its phases) owns. */
  async listTempFiles(): Promise<string[]> {
    // Version 3 keeps no temporary file in the repository (SPEC.md 19.1): they are in the host's cache slots.
    if (this.manyWriters) return [];
    const live = await liveWriterTokens(this.root);
    return (await readdirIfPresent(join(this.root, LAYOUT.tmp))).filter((name) => !live.some((token) => name.startsWith(token))).sort();
  }

  /**
   * Deletes leftovers of dead writers (unfinished packs, record temp files, interrupted index rebuilds).
   * Only valid while holding the exclusive lock, which no live writer then holds, and leaving alone the
   * files of live registered writers (writers.ts). `lock.*` files are another process's lock being
   * created right now and are left alone too.
   */
  async removeTempFiles(): Promise<number> {
    // Version 3: the cache slot's folder of temporary files was cleared when the slot was taken.
    if (this.v3) return 0;
    if (!this.lock) throw new Error('removeTempFiles needs the exclusive lock');
    await removeStaleRegistrations(this.root, LAYOUT.writers);
    const names = (await this.listTempFiles()).filter((name) => !name.startsWith('lock.'));
    for (const name of names) await rm(join(this.root, LAYOUT.tmp, name), { recursive: true, force: true });
    return names.length;
  }

  /** Makes the LevelDB catalogue agree with backups/, which is the truth. */
  private async reconcileCatalogue(): Promise<void> {
    const onDisk = new Set(await this.listBackupIds());
    const inIndex = new Set(await this.index.backupIds());
    for (const id of onDisk) {
      if (inIndex.has(id)) continue;
      // A record too large (or gone since the listing) is not one to mirror; readers report it as damaged.
      const bytes = await this.store.get(recordKey(id), { maxSize: RECORD_FILE_LIMIT }).catch(() => undefined);
      if (bytes) await this.index.putBackup(id, bytes);
    }
    for (const id of inIndex) if (!onDisk.has(id)) await this.index.deleteBackup(id);
  }

  /**
   * Version 3 (verify): every index segment in the store read whole and checked as any reader checks it
   * (SPEC.md 19.3); those that fail and that no readable segment supersedes, with why. A host whose cache
   * ingested a segment before it was damaged still reads its backups; another host cannot: only this finds it.
   * One segment in memory at a time. Empty for versions 1 and 2.
   */
  async damagedSegments(): Promise<{ key: string; why: string }[]> {
    if (!this.manyWriters) return [];
    const damaged: { key: string; why: string }[] = [];
    const superseded = new Set<string>();
    for await (const { key } of this.store.list(SEGMENT_PREFIX)) {
      if (!parseSegmentKey(key)) continue;
      let bytes: Buffer;
      try {
        bytes = await this.store.get(key, { maxSize: SEGMENT_MAX_OBJECT_SIZE });
      } catch (error) {
        if (isStorageError(error, 'not-found')) continue; // superseded and deleted by gc meanwhile
        if (!isStorageError(error, 'too-large')) throw error;
        damaged.push({ key, why: 'larger than any segment' });
        continue;
      }
      const segment = decodeSegment(bytes, key, { dataKey: this.keys?.dataKey });
      if (typeof segment === 'string') damaged.push({ key, why: segment });
      else for (const name of segment.supersedes) superseded.add(segmentKey(name));
    }
    return damaged.filter((d) => !superseded.has(d.key));
  }

  /** Every backup record, by id, sorted; what else lies in backups/ is skipped (strays() lists it). */
  async listBackupIds(): Promise<string[]> {
    const ids: string[] = [];
    for await (const { key } of this.store.list(RECORDS_PREFIX)) {
      const id = recordIdOfKey(key);
      if (id) ids.push(id);
    }
    // Version 3: the cache catches up with what these records need (segments precede records, SPEC.md 19.7).
    await this.v3?.cover(ids);
    return ids;
  }

  async readBackup(id: string): Promise<BackupRecord> {
    const where = `backup record ${id}`;
    const bytes = await this.store.get(recordKey(id), { maxSize: RECORD_FILE_LIMIT }).catch(async (error: unknown) => {
      if (isStorageError(error, 'too-large')) {
        const size = (await this.store.stat(recordKey(id)).catch(() => undefined))?.size ?? RECORD_FILE_LIMIT + 1;
        throw new CorruptMetadataError(where, `${size} bytes, more than the ${RECORD_FILE_LIMIT} a record may hold`);
      }
      const code = storageCode(error);
      if (code !== 'ENOENT') throw new CorruptMetadataError(where, `cannot be read (${code})`);
      throw new BackupNotFoundError(id);
    });
    await this.v3?.cover([id]);
    return this.decodeRecord(bytes, id);
  }

  /** Opens (encrypted repositories) and checks the bytes of backup record `id`: the file's, or its catalogue copy's. */
  decodeRecord(bytes: Buffer, id: string, where = `backup record ${id}`): BackupRecord {
    const record = decodeBackupRecord(this.openRecordBytes(bytes, id, where), where);
    if (record.id !== id) throw new CorruptMetadataError(where, `it names itself ${record.id}`);
    if (record.blockSize !== this.config.blockSize) throw new CorruptMetadataError(where, `block size ${record.blockSize} differs from the repository's ${this.config.blockSize}`);
    return record;
  }

  private openRecordBytes(bytes: Buffer, id: string, where: string): Buffer {
    if (!this.keys) return bytes;
    const plaintext = openMetadata(this.keys.dataKey, bytes, `${LAYOUT.backups}/${id}`);
    if (typeof plaintext === 'string') throw new CorruptMetadataError(where, plaintext);
    return plaintext;
  }

  /** Every backup, oldest first. A damaged record is reported, not skipped silently. */
  async listBackups(): Promise<{ backups: BackupRecord[]; damaged: { id: string; error: Error }[] }> {
    const backups: BackupRecord[] = [];
    const damaged: { id: string; error: Error }[] = [];
    for (const id of await this.listBackupIds()) {
      try {
        backups.push(await this.readBackup(id));
      } catch (error) {
        damaged.push({ id, error: error as Error });
      }
    }
    backups.sort((a, b) => a.startTime.localeCompare(b.startTime) || a.id.localeCompare(b.id));
    return { backups, damaged };
  }

  /** Resolves a full id or a unique prefix (at least 4 hex characters). */
  async findBackup(idOrPrefix: string): Promise<BackupRecord> {
    return this.readBackup(await this.findBackupId(idOrPrefix));
  }

  /** The id of the record file a full id or unique prefix names, without reading it (it may be damaged). */
  async findBackupId(idOrPrefix: string): Promise<string> {
    const wanted = idOrPrefix.toLowerCase();
    if (!/^[0-9a-f]+$/.test(wanted) || wanted.length > 32) {
      throw new InvalidArgumentError(`"${displayText(idOrPrefix, 64)}" is not a backup id: ids are 32 hexadecimal characters, and any unique prefix of 4 or more names one`);
    }
    if (wanted.length < 4) throw new InvalidArgumentError(`backup id prefix "${wanted}" is too short: give at least 4 characters (a prefix of 4 or more names one backup if it is unique)`);
    const matches = (await this.listBackupIds()).filter((id) => id.startsWith(wanted));
    if (matches.length === 0) throw new BackupNotFoundError(idOrPrefix);
    if (matches.length > 1) throw new AmbiguousIdError(idOrPrefix, matches);
    return matches[0]!;
  }

  async lookup(ids: readonly Buffer[]): Promise<(BlobLocation | undefined)[]> {
    return this.blobIndex.lookup(ids);
  }

  /** Every blob the index names, one at a time (verify): the LevelDB index, or in version 3 the host's cache of the segments. */
  blobs(): AsyncGenerator<IndexEntry> {
    return this.v3 ? this.v3.cache.blobs() : this.index.blobs();
  }

  /**
   * Whether each blob can be read without trusting more than the index and a stat: indexed, and its pack
   * there and long enough (PackPresence). For readers that build on a blob without reading it.
   */
  async available(ids: readonly Buffer[]): Promise<boolean[]> {
    return (await this.packPresence.filter(await this.blobIndex.lookup(ids))).map((location) => location !== undefined);
  }

  /** Reads, checks and opens one blob (used for map pages; data chunks go through the workers). */
  async readBlob(id: Buffer, what: string): Promise<Buffer> {
    const [location] = await this.blobIndex.lookup([id]);
    if (!location) throw new MissingBlobError(id.toString('hex'), what);
    return this.openFrame(await this.readFrame(location), id, location, what);
  }

  /** The plaintext of blob `id` from its frame's bytes, read from `location` (checksum, keys, id all checked). */
  openFrame(frame: Buffer, id: Buffer, location: BlobLocation, what: string): Buffer {
    const opened = openBlob(frame, id, this.keys);
    if (typeof opened === 'string') throw new CorruptFrameError(location.packId, location.offset, opened, { blob: id.toString('hex'), what });
    return opened.plaintext;
  }

  readonly loadPage: LoadPage = (id) => this.readBlob(id, 'map page');

  createBlobWriter(packTargetSize?: number): BlobWriter {
    return new BlobWriter(this.packTarget, this.blobIndex, packTargetSize, this.packPresence);
  }

  /** A StorePage that writes map pages through `writer`, skipping pages the repository already has. */
  pageStore(writer: BlobWriter): StorePage {
    return async (kind, page) => {
      const id = this.blobId(page);
      const [known] = await writer.known([id]);
      if (!known) {
        writer.claim(id);
        const frame = sealBlobToBuffer(kind, id, page, this.keys, this.compression);
        await writer.add(frame, { kind, flags: frame.readUInt8(5), rawLength: page.length, id });
      }
      return id;
    };
  }

  /**
   * The commit point of a backup. Call only after every blob it references is in the index
   * (BlobWriter.flush). The record file is written once, durably; the catalogue entry follows. Returns
   * warnings about what failed after the commit point (the backup exists all the same).
   */
  async commitBackup(record: BackupRecord): Promise<string[]> {
    const plaintext = encodeBackupRecord(record);
    const bytes = this.keys ? sealMetadata(this.keys.dataKey, plaintext, `${LAYOUT.backups}/${record.id}`) : plaintext;
    // Readers refuse larger records (RECORD_FILE_LIMIT): never write one they would call damaged.
    if (bytes.length > RECORD_FILE_LIMIT) throw new InvalidArgumentError(`backup record ${record.id} would be ${bytes.length} bytes, more than the ${RECORD_FILE_LIMIT} a record may hold (its attachments are too large)`, { bytes: bytes.length });
    crashPoint('before-record');
    if (this.manyWriters) {
      // Version 3: the writer's pending segment first, its lease checked, then the record (SPEC.md 19.7); no catalogue.
      if (!this.v3) throw new Error('commitBackup on a version-3 repository opened without its lease');
      await this.v3.commitRecord(recordKey(record.id), bytes, this.packPresence);
      crashPoint('record-written');
      return [];
    }
    await this.store.put(recordKey(record.id), bytes, { ifAbsent: true });
    crashPoint('record-written');
    // The backup exists from here on. A catalogue that fails to follow is repaired on the next open.
    try {
      await this.index.putBackup(record.id, bytes);
    } catch (error) {
      return [`backup ${record.id} is committed, but its catalogue entry was not written (${(error as Error).message}); the next command adds it`];
    }
    return [];
  }

  /**
   * Stores a boot test's record next to its backup (SPEC.md 9.2): written once (create-if-absent), sealed
   * in an encrypted repository. Versions 1 and 2: under the lock, after checking that the backup is still
   * there. Version 3: under the command's lease; the backup is checked after the put too, and the record
   * removed again when a prune took the backup meanwhile (prune removes the records before and after the
   * backup's, so one of the two sees it).
   */
  async commitVerification(record: BootVerification): Promise<string> {
    const key = verificationKey(record.backup, verificationName(new Date(record.started)));
    const plaintext = encodeVerification(record);
    const bytes = this.keys ? sealMetadata(this.keys.dataKey, plaintext, key) : plaintext;
    if (bytes.length > VERIFICATION_FILE_LIMIT) throw new InvalidArgumentError(`verification record ${key} would be ${bytes.length} bytes, more than the ${VERIFICATION_FILE_LIMIT} a verification record may hold`);
    if (this.manyWriters) {
      if (!this.v3) throw new Error('commitVerification on a version-3 repository opened without its lease');
      this.v3.lease.assertHeld();
    } else if (!this.lock) throw new Error('commitVerification needs the exclusive lock');
    const exists = async (): Promise<boolean> => this.store.stat(recordKey(record.backup)).then(() => true, () => false);
    if (!(await exists())) throw new BackupNotFoundError(record.backup);
    await this.store.put(key, bytes, { ifAbsent: true });
    if (this.manyWriters && !(await exists())) {
      await this.store.delete(key).catch(() => undefined);
      throw new BackupNotFoundError(record.backup);
    }
    return key;
  }

  /**
   * The verification records of one backup (or of all), oldest first by name; damaged ones reported. Keys
   * under verifications/ that are not a record's name are skipped (strays).
   */
  async listVerifications(backupId?: string): Promise<{ records: { key: string; record: BootVerification }[]; damaged: { key: string; backup: string; error: Error }[] }> {
    const records: { key: string; record: BootVerification }[] = [];
    const damaged: { key: string; backup: string; error: Error }[] = [];
    const keys: { key: string; backup: string; name: string }[] = [];
    for await (const { key } of this.store.list(backupId === undefined ? VERIFICATIONS_PREFIX : `${VERIFICATIONS_PREFIX}${backupId}/`)) {
      const named = verificationOfKey(key);
      if (named && (backupId === undefined || named.backup === backupId)) keys.push({ key, ...named });
    }
    keys.sort((a, b) => a.backup.localeCompare(b.backup) || a.name.localeCompare(b.name));
    for (const { key, backup } of keys) {
      try {
        const bytes = await this.store.get(key, { maxSize: VERIFICATION_FILE_LIMIT }).catch((error: unknown) => {
          if (isStorageError(error, 'too-large')) throw new CorruptMetadataError(`verification record ${key}`, `more than the ${VERIFICATION_FILE_LIMIT} bytes a verification record may hold`);
          throw error;
        });
        let plaintext = bytes;
        if (this.keys) {
          const opened = openMetadata(this.keys.dataKey, bytes, key);
          if (typeof opened === 'string') throw new CorruptMetadataError(`verification record ${key}`, opened);
          plaintext = opened;
        }
        records.push({ key, record: decodeVerification(plaintext, key) });
      } catch (error) {
        if (isStorageError(error, 'not-found')) continue; // removed with its backup meanwhile
        damaged.push({ key, backup, error: error as Error });
      }
    }
    return { records, damaged };
  }
}

/**
 * The names in one of the repository's directories, none when it is absent: a repository copied by a tool that
 * keeps no empty directory (git, some sync tools) lacks the empty ones, which hold nothing by definition.
 */
async function readdirIfPresent(path: string): Promise<string[]> {
  return readdir(path).catch((error: unknown) => {
    if (isErrnoException(error) && error.code === 'ENOENT') return [];
    throw error;
  });
}

/**
 * What stopped a read of the store, as the repository's messages say it: the errno of a folder (ENOENT for
 * an object that is not there), or the store's reason.
 */
function storageCode(error: unknown): string {
  if (error instanceof StorageError) {
    if (error.reason === 'not-found' && (error.storage.backendCode === undefined || error.storage.backendCode === 'ENOENT')) return 'ENOENT';
    if (error.reason === 'no-bucket') return 'ENOENT';
    return error.storage.backendCode ?? error.reason;
  }
  if (isErrnoException(error)) return error.code ?? String(error);
  return String(error);
}
