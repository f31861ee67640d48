/**
 * The LevelDB index: blob id → location (index-entry.ts), and the backup catalogue (backup id → record).
 * It is a cache of what the packs and the backups/ folder hold: Repository rebuilds it from them when it
 * is missing.
 * LevelDB admits one process at a time; the repository lock (lock.ts) is taken before it is opened.
 */
import { levelDb, type LevelDb } from './leveldb.js';
import { KEY_PREFIX_BACKUP, KEY_PREFIX_BLOB, KEY_PREFIX_META } from './constants.js';
import { blobKey, decodeLocation, encodeLocation, type BlobLocation, type IndexEntry } from './index-entry.js';
import { CorruptMetadataError, classifyWriteError, NoSpaceError } from './errors.js';
import { makeTreePrivate } from './file-modes.js';
import { levelOptions } from './level-options.js';

type Db = LevelDb;

/** LevelDB's own read errors (a corrupt table or log) are a damaged index: say so, and what mends it. */
function readFailure(error: unknown): never {
  if (error instanceof CorruptMetadataError) throw error;
  const cause = (error as { cause?: unknown }).cause;
  throw new CorruptMetadataError('index (LevelDB)', `${String(cause ?? error)}; \`engine repair\` rebuilds it from the packs`);
}

function prefixed(prefix: number, text: string): Buffer {
  return Buffer.concat([Buffer.from([prefix]), Buffer.from(text, 'utf8')]);
}

export class IndexStore {
  private constructor(
    private readonly db: Db,
    readonly path: string,
  ) {}

  static async open(path: string, options: { create: boolean }): Promise<IndexStore> {
    const db: Db = await levelDb(path, levelOptions('index-store', { createIfMissing: options.create, errorIfExists: false }));
    try {
      await db.open();
    } catch (error) {
      // A full disk while creating or opening (a new MANIFEST and log are written) says so; the rest is the caller's.
      const full = classifyWriteError(error, path);
      if (full instanceof NoSpaceError) throw full;
      throw error;
    }
    // LevelDB creates its directory and files under the umask: make them private (SPEC.md, section 2.1),
    // now and again on close for the tables and logs written meanwhile (inside a 0700 directory). Best
    // effort: a repository that cannot be changed (read-only) is still read; verify reports loose modes.
    await makeTreePrivate(path).catch(() => undefined);
    return new IndexStore(db, path);
  }

  async close(): Promise<void> {
    await this.db.close();
    await makeTreePrivate(this.path).catch(() => undefined);
  }

  /** One batched read for many ids: the dedupe path never issues one get per block. */
  async lookup(ids: readonly Buffer[]): Promise<(BlobLocation | undefined)[]> {
    if (ids.length === 0) return [];
    const values = await this.db.getMany(ids.map(blobKey)).catch(readFailure);
    return values.map((value, i) => {
      if (value === undefined) return undefined;
      const location = decodeLocation(value);
      if (!location) throw new CorruptMetadataError('index', `entry for blob ${ids[i]!.toString('hex')} has a bad length`);
      return location;
    });
  }

  /** Adds the entries of one sealed pack in one synchronous batch. */
  async addEntries(entries: readonly IndexEntry[]): Promise<void> {
    if (entries.length === 0) return;
    try {
      await this.db.batch(
        entries.map((entry) => ({ type: 'put' as const, key: blobKey(entry.id), value: encodeLocation(entry) })),
        { sync: true },
      );
    } catch (error) {
      throw classifyWriteError(error, this.path);
    }
  }

  /**
   * gc's one step on the index: entries moved to new packs and entries removed, in one synchronous batch,
   * so that no crash leaves some moved and others not.
   */
  async applyBatch(changes: { put: readonly IndexEntry[]; del: readonly Buffer[] }): Promise<void> {
    if (changes.put.length + changes.del.length === 0) return;
    try {
      await this.db.batch(
        [
          ...changes.put.map((entry) => ({ type: 'put' as const, key: blobKey(entry.id), value: encodeLocation(entry) })),
          ...changes.del.map((id) => ({ type: 'del' as const, key: blobKey(id) })),
        ],
        { sync: true },
      );
    } catch (error) {
      throw classifyWriteError(error, this.path);
    }
  }

  async *blobs(): AsyncGenerator<IndexEntry> {
    const entries = this.db.iterator({ gte: Buffer.from([KEY_PREFIX_BLOB]), lt: Buffer.from([KEY_PREFIX_BLOB + 1]) });
    try {
      for (;;) {
        const next = await entries.next().catch(readFailure);
        if (next === undefined) return;
        const [key, value] = next;
        const location = decodeLocation(value);
        if (!location || key.length !== 33) throw new CorruptMetadataError('index', `entry for blob ${key.toString('hex', 1)} has a bad length; \`engine repair\` rebuilds the index`);
        yield { id: Buffer.from(key.subarray(1)), ...location };
      }
    } finally {
      await entries.close().catch(() => undefined);
    }
  }

  async putBackup(id: string, record: Buffer): Promise<void> {
    await this.db.put(prefixed(KEY_PREFIX_BACKUP, id), record, { sync: true }).catch((error: unknown) => {
      throw classifyWriteError(error, this.path);
    });
  }

  async deleteBackup(id: string): Promise<void> {
    await this.db.del(prefixed(KEY_PREFIX_BACKUP, id), { sync: true }).catch((error: unknown) => {
      throw classifyWriteError(error, this.path);
    });
  }

  async backupIds(): Promise<string[]> {
    const ids: string[] = [];
    try {
      for await (const key of this.db.keys({ gte: Buffer.from([KEY_PREFIX_BACKUP]), lt: Buffer.from([KEY_PREFIX_BACKUP + 1]) })) {
        ids.push(key.toString('utf8', 1));
      }
    } catch (error) {
      readFailure(error);
    }
    return ids;
  }

  async getBackup(id: string): Promise<Buffer | undefined> {
    return this.db.get(prefixed(KEY_PREFIX_BACKUP, id)).catch(readFailure);
  }

  async getMeta(name: string): Promise<string | undefined> {
    const value = await this.db.get(prefixed(KEY_PREFIX_META, name)).catch(readFailure);
    return value?.toString('utf8');
  }

  async putMeta(name: string, value: string): Promise<void> {
    await this.db.put(prefixed(KEY_PREFIX_META, name), Buffer.from(value, 'utf8'), { sync: true });
  }
}
