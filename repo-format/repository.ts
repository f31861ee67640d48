/**
 * A repository on a local filesystem: config, packs/, backups/, index/ (LevelDB), tmp/, lock.
 *
 * Opening for reading (`list`, `show`) needs no lock: backup records are immutable files. Anything that
 * uses the index (backup, restore, verify) opens it exclusively: LevelDB admits one process at a time.
 */
import { mkdir, readdir, readFile, rename, rm, stat, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { CIPHER_ID, LAYOUT } from './constants.js';
import { decodeConfig, encodeConfig, newConfig, newestReadableVersion, type RepositoryConfig } from './config.js';
import {
  AmbiguousIdError,
  BackupNotFoundError,
  CorruptFrameError,
  CorruptMetadataError,
  FormatTooNewError,
  isErrnoException,
  MissingBlobError,
  NotARepositoryError,
  NotEncryptedError,
  NoSpaceError,
  PassphraseRequiredError,
  RepositoryExistsError,
  RepositoryLockedError,
} from './errors.js';
import { fsyncDirectory, writeFileDurably } from './durable-file.js';
import { IndexStore } from './index-store.js';
import { acquireLock, readLockHolder, type RepositoryLock } from './lock.js';
import { decodeBackupRecord, encodeBackupRecord, type BackupRecord } from './backup-record.js';
import { readFrameBytes, scanPack } from './pack-file.js';
import { blobId, openBlob, sealBlobToBuffer } from './blob-codec.js';
import { initChecksum } from './checksum.js';
import { BlobWriter } from './blob-writer.js';
import type { BlobLocation } from './index-entry.js';
import type { LoadPage, StorePage } from './block-map.js';
import { newRepositoryKeys, type RepositoryKeys } from './crypto.js';
import { checkPassphrase, createKeyFile, decodeKeyFile, encodeKeyFile, keyFileName, unlockKeyFile } from './key-file.js';
import { openMetadata, sealMetadata } from './sealed-metadata.js';
import { crashPoint } from './crash-points.js';
import { liveWriterTokens } from './writers.js';
import { removeStaleRegistrations } from './registry.js';
import { listQuarantine, quarantineKey } from './quarantine.js';
import { PackPresence } from './pack-presence.js';

export interface OpenOptions {
  /** 'read': records only, no lock. 'exclusive': lock + index. */
  access: 'read' | 'exclusive';
  /** 'skip': take the lock but leave the index closed (repair, which builds a new one). */
  index?: 'open' | 'skip';
  /** What the lock file says the holder is doing (e.g. "backup"). */
  command?: string;
  /** Unlocks an encrypted repository; ignored by a plain one unless `requireEncryption`. */
  passphrase?: string | undefined;
  /**
   * Refuse a plain repository (NotEncryptedError) before anything else: the caller expects an encrypted
   * one and is about to write. A config is not authenticated, so this is what stops an encrypted
   * repository whose config was rewritten as a plain one from receiving plaintext.
   */
  requireEncryption?: boolean | undefined;
  /**
   * Called between the packs of an index rebuild (the one long step of opening): throws to stop it (the
   * engine's interruption check). The half-built index is removed.
   */
  checkInterrupted?: (() => void) | undefined;
}

export interface OpenReport {
  /** Who held a stale lock that opening broke. */
  brokeStaleLock?: { pid: number; hostname: string; since: string };
  /** Set when the index was missing and was rebuilt from the packs. */
  rebuiltIndex?: { packs: number; blobs: number };
}

export class Repository {
  private indexStore: IndexStore | undefined;
  private lock: RepositoryLock | undefined;
  private checkInterrupted: (() => void) | undefined;
  readonly openReport: OpenReport = {};
  /** Pack presence, checked once per pack for this open (a run): what dedupe and incrementals trust. */
  readonly packPresence: PackPresence;

  private constructor(
    readonly root: string,
    readonly config: RepositoryConfig,
    /** The master keys of an encrypted repository; undefined for a plain one. */
    readonly keys: RepositoryKeys | undefined,
  ) {
    this.packPresence = new PackPresence(root);
  }

  get blockSize(): number {
    return this.config.blockSize;
  }

  /** The id of a block or page: SHA-256, or HMAC-SHA256 under the id key in an encrypted repository. */
  readonly blobId = (data: Uint8Array): Buffer => blobId(data, this.keys);

  /** `passphrase` makes an encrypted repository (format version 2). */
  static async init(root: string, options: { blockSize: number; passphrase?: string | undefined }): Promise<RepositoryConfig> {
    if (options.passphrase !== undefined) checkPassphrase(options.passphrase);
    const repositoryId = randomBytes(16).toString('hex');
    const keyId = randomBytes(8).toString('hex');
    const encryption = options.passphrase === undefined ? undefined : { cipher: CIPHER_ID, keyFile: `${LAYOUT.keys}/${keyFileName(keyId)}` };
    const config = newConfig(repositoryId, options.blockSize, new Date(), encryption);
    try {
      const entries = await readdir(root);
      if (entries.length > 0) throw new RepositoryExistsError(root);
    } catch (error) {
      if (!isErrnoException(error) || error.code !== 'ENOENT') throw error;
    }
    await mkdir(root, { recursive: true });
    for (const dir of [LAYOUT.packs, LAYOUT.backups, LAYOUT.tmp, LAYOUT.readers]) await mkdir(join(root, dir), { recursive: true });
    if (encryption && options.passphrase !== undefined) {
      await mkdir(join(root, LAYOUT.keys));
      const keyFile = await createKeyFile(newRepositoryKeys(), options.passphrase, repositoryId, keyId);
      // Owner-only: whoever reads the key file can guess passphrases offline (SPEC.md, section 17).
      await writeFileDurably(join(root, encryption.keyFile), encodeKeyFile(keyFile), { exclusive: true, mode: 0o600 });
    }
    const packs = join(root, LAYOUT.packs);
    await Promise.all(Array.from({ length: 256 }, (_, i) => mkdir(join(packs, i.toString(16).padStart(2, '0')))));
    await fsyncDirectory(packs);
    const index = await IndexStore.open(join(root, LAYOUT.index), { create: true });
    await index.putMeta('repository-id', config.id);
    await index.close();
    // The config is written last: a directory without one is not a repository, so a crashed init is visible.
    await writeFileDurably(join(root, LAYOUT.config), encodeConfig(config), { exclusive: true });
    await fsyncDirectory(root);
    return config;
  }

  static async open(root: string, options: OpenOptions): Promise<Repository> {
    let bytes: Buffer;
    try {
      bytes = await readFile(join(root, LAYOUT.config));
    } catch (error) {
      const code = isErrnoException(error) ? error.code : undefined;
      throw new NotARepositoryError(root, code === 'ENOENT' ? 'it has no config file' : `its config cannot be read (${code ?? String(error)})`);
    }
    const config = decodeConfig(bytes);
    if (typeof config === 'string') throw new NotARepositoryError(root, config);
    if (config.version > newestReadableVersion(config)) throw new FormatTooNewError(root, config.version, newestReadableVersion(config));
    if (options.requireEncryption === true && !config.encryption) throw new NotEncryptedError(root);
    // Keys first: a wrong passphrase stops here, before the lock or anything else is written.
    const keys = config.encryption ? await Repository.unlock(root, config, options.passphrase) : undefined;
    const repo = new Repository(root, config, keys);
    await initChecksum();
    repo.checkInterrupted = options.checkInterrupted;
    if (options.access === 'exclusive') await repo.openExclusive(options.command ?? 'engine', options.index ?? 'open');
    return repo;
  }

  private static async unlock(root: string, config: RepositoryConfig, passphrase: string | undefined): Promise<RepositoryKeys> {
    if (passphrase === undefined) throw new PassphraseRequiredError(root);
    const keyFile = config.encryption!.keyFile;
    const where = `key file ${keyFile}`;
    const bytes = await readFile(join(root, keyFile)).catch((error: unknown) => {
      throw new CorruptMetadataError(where, `cannot be read (${isErrnoException(error) ? error.code : String(error)})`);
    });
    const file = decodeKeyFile(bytes, where);
    if (`${LAYOUT.keys}/${keyFileName(file.id)}` !== keyFile) throw new CorruptMetadataError(where, `it names itself ${file.id}`);
    return unlockKeyFile(file, passphrase, config.id, root);
  }

  get encrypted(): boolean {
    return this.keys !== undefined;
  }

  private async openExclusive(command: string, index: 'open' | 'skip'): Promise<void> {
    this.lock = await acquireLock(this.root, command);
    if (this.lock.brokeStale) this.openReport.brokeStaleLock = this.lock.brokeStale;
    try {
      if (index === 'open') await this.openIndex();
    } catch (error) {
      await this.close();
      throw error;
    }
  }

  private async openIndex(): Promise<void> {
    const indexPath = join(this.root, LAYOUT.index);
    const missing = await stat(join(indexPath, 'CURRENT')).then(() => false, () => true);
    if (missing) this.openReport.rebuiltIndex = await this.rebuildIndexInto(indexPath);
    this.indexStore = await IndexStore.open(indexPath, { create: false }).catch(async (error: unknown) => {
      const cause = (error as { cause?: { code?: string } }).cause;
      if (cause?.code === 'LEVEL_LOCKED') throw new RepositoryLockedError(this.root, await readLockHolder(this.root));
      // Opening writes (a new MANIFEST and log, the old log as a table): on a full disk that is not damage.
      if (error instanceof NoSpaceError) throw error;
      throw new CorruptMetadataError('index (LevelDB)', `${String(cause ?? error)}; \`engine repair\` rebuilds it from the packs`);
    });
    await this.reconcileCatalogue();
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
    if (!this.lock) throw new Error('removeBackup needs the exclusive lock');
    await unlink(join(this.root, LAYOUT.backups, id));
    await fsyncDirectory(join(this.root, LAYOUT.backups));
    await this.index.deleteBackup(id);
  }

  async close(): Promise<void> {
    await this.indexStore?.close().catch(() => undefined);
    this.indexStore = undefined;
    await this.lock?.release();
    this.lock = undefined;
  }

  get index(): IndexStore {
    if (!this.indexStore) throw new Error('repository was opened without its index (access: read)');
    return this.indexStore;
  }

  /**
   * Rebuilds the index from the packs, in a separate directory renamed into place when complete: an
   * interrupted rebuild leaves no index (and is simply done again), never a partial one that would be
   * trusted. The catalogue follows from backups/ on open.
   */
  private async rebuildIndexInto(indexPath: string): Promise<{ packs: number; blobs: number }> {
    const building = join(this.root, LAYOUT.tmp, `index-rebuild.${randomBytes(4).toString('hex')}`);
    const index = await IndexStore.open(building, { create: true });
    let packs = 0;
    let blobs = 0;
    let complete = false;
    try {
      await index.putMeta('repository-id', this.config.id);
      // Frames repair found damaged must not come back: deduplication would trust them again.
      const quarantined = await listQuarantine(this.root);
      for (const packId of await this.listPackIds()) {
        this.checkInterrupted?.();
        const scan = await scanPack(this.root, packId, this.encrypted);
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
    await rm(indexPath, { recursive: true, force: true });
    await rename(building, indexPath);
    await fsyncDirectory(this.root);
    return { packs, blobs };
  }

  async listPackIds(): Promise<string[]> {
    const ids: string[] = [];
    const packs = join(this.root, LAYOUT.packs);
    for (const dir of (await readdir(packs)).sort()) {
      for (const name of (await readdir(join(packs, dir))).sort()) {
        if (/^[0-9a-f]{32}$/.test(name) && name.startsWith(dir)) ids.push(name);
      }
    }
    return ids;
  }

  /** Makes deletions in packs/ durable: one fsync per pack directory touched. */
  async syncPackDirectories(packIds: readonly string[]): Promise<void> {
    for (const dir of new Set(packIds.map((id) => id.slice(0, 2)))) await fsyncDirectory(join(this.root, LAYOUT.packs, dir));
  }

  /** Files in tmp/ that no live registered writer (a gc between its phases) owns. */
  async listTempFiles(): Promise<string[]> {
    const live = await liveWriterTokens(this.root);
    return (await readdir(join(this.root, LAYOUT.tmp))).filter((name) => !live.some((token) => name.startsWith(token))).sort();
  }

  /**
   * Deletes leftovers of dead writers (unfinished packs, record temp files, interrupted index rebuilds).
   * Only valid while holding the exclusive lock, which no live writer then holds, and leaving alone the
   * files of live registered writers (writers.ts). `lock.*` files are another process's lock being
   * created right now and are left alone too.
   */
  async removeTempFiles(): Promise<number> {
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
      if (!inIndex.has(id)) await this.index.putBackup(id, await readFile(join(this.root, LAYOUT.backups, id)));
    }
    for (const id of inIndex) if (!onDisk.has(id)) await this.index.deleteBackup(id);
  }

  async listBackupIds(): Promise<string[]> {
    return (await readdir(join(this.root, LAYOUT.backups))).filter((name) => /^[0-9a-f]{32}$/.test(name));
  }

  async readBackup(id: string): Promise<BackupRecord> {
    const where = `backup record ${id}`;
    const bytes = await readFile(join(this.root, LAYOUT.backups, id)).catch(() => {
      throw new BackupNotFoundError(id);
    });
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
    const wanted = idOrPrefix.toLowerCase();
    if (!/^[0-9a-f]{4,32}$/.test(wanted)) throw new BackupNotFoundError(idOrPrefix);
    const matches = (await this.listBackupIds()).filter((id) => id.startsWith(wanted));
    if (matches.length === 0) throw new BackupNotFoundError(idOrPrefix);
    if (matches.length > 1) throw new AmbiguousIdError(idOrPrefix, matches);
    return this.readBackup(matches[0]!);
  }

  async lookup(ids: readonly Buffer[]): Promise<(BlobLocation | undefined)[]> {
    return this.index.lookup(ids);
  }

  /**
   * Whether each blob can be read without trusting more than the index and a stat: indexed, and its pack
   * there and long enough (PackPresence). For readers that build on a blob without reading it.
   */
  async available(ids: readonly Buffer[]): Promise<boolean[]> {
    return (await this.packPresence.filter(await this.index.lookup(ids))).map((location) => location !== undefined);
  }

  /** Reads, checks and opens one blob (used for map pages; data chunks go through the workers). */
  async readBlob(id: Buffer, what: string): Promise<Buffer> {
    const [location] = await this.index.lookup([id]);
    if (!location) throw new MissingBlobError(id.toString('hex'), what);
    const frame = await readFrameBytes(this.root, location.packId, location.offset, location.length);
    const opened = openBlob(frame, id, this.keys);
    if (typeof opened === 'string') throw new CorruptFrameError(location.packId, location.offset, opened, { blob: id.toString('hex'), what });
    return opened.plaintext;
  }

  readonly loadPage: LoadPage = (id) => this.readBlob(id, 'map page');

  createBlobWriter(packTargetSize?: number): BlobWriter {
    return new BlobWriter(this.root, this.index, packTargetSize, this.packPresence);
  }

  /** A StorePage that writes map pages through `writer`, skipping pages the repository already has. */
  pageStore(writer: BlobWriter): StorePage {
    return async (kind, page) => {
      const id = this.blobId(page);
      const [known] = await writer.known([id]);
      if (!known) {
        writer.claim(id);
        const frame = sealBlobToBuffer(kind, id, page, this.keys);
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
    crashPoint('before-record');
    await writeFileDurably(join(this.root, LAYOUT.backups, record.id), bytes, { exclusive: true, tempDir: join(this.root, LAYOUT.tmp) });
    crashPoint('record-written');
    // The backup exists from here on. A catalogue that fails to follow is repaired on the next open.
    try {
      await this.index.putBackup(record.id, bytes);
    } catch (error) {
      return [`backup ${record.id} is committed, but its catalogue entry was not written (${(error as Error).message}); the next command adds it`];
    }
    return [];
  }
}
