/**
 * The local-folder backend: a repository's objects as files under its root, key "packs/ab/ab…" at
 * <root>/packs/ab/ab… — exactly today's layout (SPEC.md, section 2), so v1/v2 repositories are read and
 * written by it unchanged.
 *
 * Durability is the repository's one recipe (SPEC.md, section 10): a temporary file (in `tempDir`, the
 * repository's tmp/, or beside the target) written whole, fsynced and closed; then link() to create only if
 * absent (it fails with EEXIST where rename() would replace) or rename() to replace; then an fsync of the
 * directory that holds the name. A reader sees no file or the whole file. Files are 0400 (written once,
 * never changed in place), folders 0700, whatever the umask (file-modes.ts).
 *
 * Failures are StorageError with the errno as `backendCode`, except those the repository acts on by their
 * own codes: a full disk is NoSpaceError (ENGINE_NO_SPACE, which the space reserve answers, SPEC.md 12.6)
 * and a file past the filesystem's limit FileTooLargeError, as every durable write of the repository says
 * them.
 *
 * Beyond the Storage contract, `adopt` moves a finished local file into place (a pack built in tmp/):
 * the same durability without copying 32 MiB, where an S3 backend uploads the file instead.
 */
import { chmod, copyFile, link, lstat, open, readdir, rename, stat, unlink, type FileHandle } from 'node:fs/promises';
import { constants as fsConstants, type Dirent } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { classifyWriteError, EngineError, isErrnoException } from '../errors.js';
import { fsyncDirectory, writeAllSyncAndClose } from '../durable-file.js';
import { readFully } from '../file-io.js';
import { ensurePrivateDirectory, IMMUTABLE_FILE_MODE, openNewFile } from '../file-modes.js';
import { StorageError, type StorageFailure } from './storage-error.js';
import {
  checkKey,
  checkPrefix,
  checkRange,
  compareKeys,
  DEFAULT_MAX_GET_SIZE,
  keyProblem,
  throwIfAborted,
  type CallOptions,
  type GetOptions,
  type ListOptions,
  type ObjectInfo,
  type PutOptions,
  type PutSource,
  type Storage,
  type StorageProperties,
} from './storage.js';

/**
 * The name of a temporary file `put` makes beside its target: "." + the target's name (a key segment) + "." +
 * 12 hex digits + ".tmp". sweepAbandoned removes only files named exactly so.
 */
export const TEMP_NAME = /^\.[A-Za-z0-9][A-Za-z0-9._-]*\.[0-9a-f]{12}\.tmp$/;

export interface LocalStorageOptions {
  /**
   * Where temporary files are made (the repository's tmp/, on the same filesystem, where gc finds what a
   * crash left); default: beside the target, as `.<name>.<random>.tmp`, which no listing yields.
   */
  tempDir?: string | undefined;
}

/** errno → reason, for what is not a write the repository classifies itself. */
function reasonOf(errno: string | undefined): StorageFailure {
  switch (errno) {
    case 'ENOENT':
    case 'ENOTDIR':
    case 'EISDIR':
      return 'not-found';
    case 'EEXIST':
      return 'exists';
    case 'EACCES':
    case 'EPERM':
    case 'EROFS':
      return 'denied';
    default:
      return 'unavailable';
  }
}

export class LocalStorage implements Storage {
  readonly properties: StorageProperties;
  private readonly tempDir: string | undefined;

  constructor(
    readonly root: string,
    options: LocalStorageOptions = {},
  ) {
    this.tempDir = options.tempDir;
    this.properties = {
      location: root,
      atomicCreate: true,
      consistentListing: true,
      objectLock: false,
      // libuv's thread pool (4 by default) serves the file system: more in flight only queue there.
      connections: 8,
      maxObjectSize: Number.MAX_SAFE_INTEGER,
    };
  }

  /** The file that holds `key` (for this backend's own use and for tests; the engine never asks). */
  pathOf(key: string): string {
    checkKey(key);
    return join(this.root, ...key.split('/'));
  }

  private fail(error: unknown, operation: string, key: string, reason?: StorageFailure): StorageError {
    const errno = isErrnoException(error) ? error.code : undefined;
    const why = reason ?? reasonOf(errno);
    const text = error instanceof Error ? error.message : String(error);
    return new StorageError(
      why,
      `${this.properties.location}: ${operation} ${key}: ${errno ?? text}${errno && why === 'not-found' ? ' (no such object)' : ''}`,
      { location: this.properties.location, key, operation, backendCode: errno },
      // An errno of the local file system does not go away by asking again.
      { transient: false, cause: error },
    );
  }

  /**
   * A write's failure: full disk and too large as the repository says them, the rest as StorageError. An
   * engine error (the interruption of an aborted call, a StorageError) is one already and stays as it is: its
   * code is no errno to report as the folder's.
   */
  private writeFailure(error: unknown, operation: string, key: string, path: string): unknown {
    const classified = classifyWriteError(error, path);
    if (classified !== error || error instanceof EngineError || !isErrnoException(error)) return classified;
    return this.fail(error, operation, key);
  }

  /** A missing root is 'no-bucket', told apart from a missing object. */
  private async checkRoot(operation: string, key: string): Promise<void> {
    const stats = await stat(this.root).catch(() => undefined);
    if (stats?.isDirectory() !== true) throw new StorageError('no-bucket', `${this.root}: ${operation} ${key}: the folder does not exist`, { location: this.root, key, operation }, { transient: false });
  }

  /** Creates the folders above `path` (0700) and makes their creation durable. */
  private async ensureParent(path: string): Promise<void> {
    const dir = dirname(path);
    const first = await ensurePrivateDirectory(dir);
    if (first !== undefined) {
      // Each created folder's name lives in its parent: sync from the deepest created up to the existing one.
      for (let at = dir; ; at = dirname(at)) {
        await fsyncDirectory(dirname(at));
        if (at === first || dirname(at) === at) break;
      }
    }
  }

  private tempPathFor(path: string): string {
    return join(this.tempDir ?? dirname(path), `.${basename(path)}.${randomBytes(6).toString('hex')}.tmp`);
  }

  /**
   * Removes the temporary files that writers killed between their write and their rename left beside their
   * targets (no listing yields them, so nothing else ever would): files anywhere under the root whose names
   * are exactly `tempPathFor`'s (TEMP_NAME) and whose mtime is before `olderThan`. Nothing else is touched:
   * not another program's dotfile, not a link, not a folder. Returns how many were removed. The mtime is the
   * temporary file's last write (copyFile does not carry the source's over), so a put still running has a
   * recent one; SPEC.md 19.8 says why the caller's `olderThan` leaves every live writer's alone.
   */
  async sweepAbandoned(olderThan: number, options: CallOptions = {}): Promise<number> {
    throwIfAborted(options.signal, this.properties.location, 'sweep', '');
    await this.checkRoot('sweep', '');
    let removed = 0;
    const sweep = async (dir: string): Promise<void> => {
      let entries: Dirent[];
      try {
        entries = await readdir(dir, { withFileTypes: true });
      } catch (error) {
        if (isErrnoException(error) && (error.code === 'ENOENT' || error.code === 'ENOTDIR')) return;
        throw this.fail(error, 'sweep', dir);
      }
      let here = 0;
      for (const entry of entries) {
        throwIfAborted(options.signal, this.properties.location, 'sweep', '');
        const path = join(dir, entry.name);
        if (entry.isDirectory()) {
          await sweep(path);
          continue;
        }
        if (!entry.isFile() || !TEMP_NAME.test(entry.name)) continue;
        const stats = await lstat(path).catch(() => undefined);
        if (!stats?.isFile() || stats.mtimeMs >= olderThan) continue;
        try {
          await unlink(path);
          here += 1;
        } catch (error) {
          // Renamed into place or removed by another meanwhile: not ours to count.
          if (isErrnoException(error) && error.code === 'ENOENT') continue;
          throw this.fail(error, 'sweep', path);
        }
      }
      if (here > 0) await fsyncDirectory(dir).catch((error: unknown) => {
        throw this.fail(error, 'sweep', dir);
      });
      removed += here;
    };
    await sweep(this.root);
    return removed;
  }

  async put(key: string, source: PutSource, options: PutOptions = {}): Promise<void> {
    const path = this.pathOf(key);
    throwIfAborted(options.signal, this.properties.location, 'put', key);
    await this.checkRoot('put', key);
    try {
      await this.ensureParent(path);
    } catch (error) {
      throw this.writeFailure(error, 'put', key, dirname(path));
    }
    const temp = this.tempPathFor(path);
    try {
      if (source instanceof Uint8Array) {
        await writeAllSyncAndClose(await openNewFile(temp, 'wx', IMMUTABLE_FILE_MODE), source);
      } else {
        await copyFile(source.file, temp, fsConstants.COPYFILE_EXCL);
        await chmod(temp, IMMUTABLE_FILE_MODE);
        await syncAndClose(await open(temp, 'r'));
      }
      throwIfAborted(options.signal, this.properties.location, 'put', key);
    } catch (error) {
      await unlink(temp).catch(() => undefined);
      throw this.writeFailure(error, 'put', key, path);
    }
    await this.install(temp, path, key, options.ifAbsent === true, 'put');
  }

  /**
   * Moves `file` (complete) into place as `key`: fsynced, renamed or linked (`ifAbsent`), the directory
   * fsynced. A file on another file system than the object's folder (a format-3 pack built in the host's
   * cache directory, SPEC.md 19.2, with the repository on another disk or an NFS export) cannot be renamed
   * there: it is copied in as by `put` and then removed. The file is gone afterwards whatever the outcome,
   * except when the move itself fails (it stays for the caller to remove).
   */
  async adopt(key: string, file: string, options: PutOptions = {}): Promise<void> {
    const path = this.pathOf(key);
    throwIfAborted(options.signal, this.properties.location, 'put', key);
    let sameFileSystem: boolean;
    try {
      await this.ensureParent(path);
      const [fileStats, folderStats] = await Promise.all([stat(file), stat(dirname(path))]);
      sameFileSystem = fileStats.dev === folderStats.dev;
      if (sameFileSystem) await syncAndClose(await open(file, 'r'));
    } catch (error) {
      throw this.writeFailure(error, 'put', key, path);
    }
    if (!sameFileSystem) {
      await this.put(key, { file }, options);
      await unlink(file).catch(() => undefined);
      return;
    }
    await this.install(file, path, key, options.ifAbsent === true, 'put');
  }

  /** temp → path (link: only if absent; rename: replacing), then the directory's fsync. */
  private async install(temp: string, path: string, key: string, ifAbsent: boolean, operation: string): Promise<void> {
    try {
      if (ifAbsent) await link(temp, path);
      else await rename(temp, path);
    } catch (error) {
      if (ifAbsent) await unlink(temp).catch(() => undefined);
      if (isErrnoException(error) && error.code === 'EEXIST') throw this.fail(error, operation, key, 'exists');
      throw this.writeFailure(error, operation, key, path);
    }
    if (ifAbsent) await unlink(temp).catch(() => undefined);
    // The object exists under its name now; what follows makes that durable.
    await fsyncDirectory(dirname(path)).catch((error: unknown) => {
      throw this.writeFailure(error, operation, key, dirname(path));
    });
  }

  async get(key: string, options: GetOptions = {}): Promise<Buffer> {
    const path = this.pathOf(key);
    if (options.range) checkRange(options.range);
    throwIfAborted(options.signal, this.properties.location, 'get', key);
    let handle: FileHandle;
    try {
      handle = await open(path, 'r');
    } catch (error) {
      if (isErrnoException(error) && error.code === 'ENOENT') await this.checkRoot('get', key);
      throw this.fail(error, 'get', key);
    }
    try {
      const stats = await handle.stat();
      if (!stats.isFile()) throw this.fail(Object.assign(new Error('not a regular file'), { code: 'EISDIR' }), 'get', key);
      let offset = 0;
      let length = stats.size;
      if (options.range) {
        ({ offset, length } = options.range);
        if (offset + length > stats.size) {
          throw this.fail(new Error(`bytes ${offset}..${offset + length - 1} asked, the object holds ${stats.size}`), 'get', key, 'out-of-range');
        }
      } else {
        const maxSize = options.maxSize ?? DEFAULT_MAX_GET_SIZE;
        if (stats.size > maxSize) throw this.fail(new Error(`the object holds ${stats.size} bytes, more than the ${maxSize} expected`), 'get', key, 'too-large');
      }
      const buffer = Buffer.allocUnsafe(length);
      const got = await readFully(handle, buffer, offset);
      // Cut between the stat and the read: short, which the contract never returns as a success.
      if (got !== length) throw this.fail(new Error(`read ${got} of ${length} bytes: the object was cut while read`), 'get', key, 'out-of-range');
      throwIfAborted(options.signal, this.properties.location, 'get', key);
      return buffer;
    } catch (error) {
      if (error instanceof EngineError || !isErrnoException(error)) throw error;
      throw this.fail(error, 'get', key);
    } finally {
      await handle.close().catch(() => undefined);
    }
  }

  async stat(key: string, options: CallOptions = {}): Promise<ObjectInfo> {
    const path = this.pathOf(key);
    throwIfAborted(options.signal, this.properties.location, 'stat', key);
    const stats = await lstat(path).catch(async (error: unknown) => {
      if (isErrnoException(error) && error.code === 'ENOENT') await this.checkRoot('stat', key);
      throw this.fail(error, 'stat', key);
    });
    if (!stats.isFile()) throw this.fail(Object.assign(new Error('not a regular file'), { code: 'EISDIR' }), 'stat', key);
    // The file's mtime, set by this host or the file server that stores it: the store's clock (SPEC.md 19.6).
    return { key, size: stats.size, modified: Math.floor(stats.mtimeMs) };
  }

  /**
   * Walks the folders in key order: a folder's entries sorted with a folder named `d` standing for its keys
   * `d/…` (so "a-b" comes before "a/…" and "a0" after, as the keys' bytes compare). Memory holds one
   * folder's names per level of the walk, never the whole listing. Only regular files whose names are valid
   * keys are objects: temporary files (".…tmp"), links and special files are not.
   */
  async *list(prefix: string, options: ListOptions = {}): AsyncIterable<ObjectInfo> {
    checkPrefix(prefix);
    throwIfAborted(options.signal, this.properties.location, 'list', prefix);
    await this.checkRoot('list', prefix);
    yield* this.walk('', prefix, options);
  }

  private async *walk(dirKey: string, prefix: string, options: ListOptions): AsyncIterable<ObjectInfo> {
    let entries: Dirent[];
    try {
      entries = await readdir(dirKey === '' ? this.root : join(this.root, ...dirKey.split('/')), { withFileTypes: true });
    } catch (error) {
      // A folder removed meanwhile, or a file where a folder was expected: it holds no objects.
      if (isErrnoException(error) && (error.code === 'ENOENT' || error.code === 'ENOTDIR')) return;
      throw this.fail(error, 'list', dirKey || prefix);
    }
    const sorted = entries
      .filter((entry) => keyProblem(entry.name) === undefined && (entry.isFile() || entry.isDirectory()))
      .map((entry) => ({ entry, order: dirKey + entry.name + (entry.isDirectory() ? '/' : '') }))
      .sort((a, b) => compareKeys(a.order, b.order));
    for (const { entry, order } of sorted) {
      throwIfAborted(options.signal, this.properties.location, 'list', prefix);
      const after = options.startAfter;
      if (entry.isDirectory()) {
        // Only folders whose keys can start with the prefix, and can come after startAfter.
        if (!(order.startsWith(prefix) || prefix.startsWith(order))) continue;
        if (after !== undefined && !after.startsWith(order) && compareKeys(order, after) < 0) continue;
        yield* this.walk(order, prefix, options);
        continue;
      }
      const key = order;
      if (!key.startsWith(prefix)) continue;
      if (after !== undefined && compareKeys(key, after) <= 0) continue;
      const stats = await lstat(join(this.root, ...key.split('/'))).catch(() => undefined);
      // Deleted since the folder was read: not there any more.
      if (!stats?.isFile()) continue;
      yield { key, size: stats.size, modified: Math.floor(stats.mtimeMs) };
    }
  }

  async delete(key: string, options: CallOptions = {}): Promise<void> {
    const path = this.pathOf(key);
    throwIfAborted(options.signal, this.properties.location, 'delete', key);
    try {
      await unlink(path);
    } catch (error) {
      if (isErrnoException(error) && (error.code === 'ENOENT' || error.code === 'ENOTDIR')) {
        await this.checkRoot('delete', key);
        return;
      }
      throw this.fail(error, 'delete', key);
    }
    await fsyncDirectory(dirname(path)).catch((error: unknown) => {
      throw this.fail(error, 'delete', key);
    });
  }

  async close(): Promise<void> {}
}

async function syncAndClose(handle: FileHandle): Promise<void> {
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
