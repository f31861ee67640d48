import { open, realpath, stat, type FileHandle } from 'node:fs/promises';
import { constants, type Stats } from 'node:fs';
import { basename } from 'node:path';
import { isErrnoException } from '../../repo-format/errors.js';
import { skipBytes } from '../../repo-format/file-io.js';
import { alignedPrefix, DIRECT_IO_ALIGNMENT, reopenDirect } from '../pipeline/aligned-memory.js';
import { SourceChangedError, SourceUnreadableError } from '../errors.js';
import { blockDeviceSize } from './device-size.js';
import { FileHoleMap, mayHaveHoles } from './file-holes.js';
import type { BlockSource, Extent, SourceDescription } from './source.js';

/** A raw image file or a block device (an attached disk snapshot inside the backup appliance). */
export class FileSource implements BlockSource {
  private constructor(
    private readonly handle: FileHandle,
    readonly size: number,
    readonly description: SourceDescription,
    private readonly currentSize: () => Promise<number>,
    /** A sparse regular file's holes (file-holes.ts); none for a block device or a fully allocated file. */
    private readonly holes: FileHoleMap | undefined,
    /**
     * The same file opened with O_DIRECT, where its file system allows it: a run read into the pipeline's
     * page-aligned slots goes from the disk straight into them, neither copied out of the page cache nor
     * filling it (a backup reads each block once). Measured, a cold full backup of the real /usr image: system
     * CPU 3.05 -> 1.13 s (bench/results/lz4-native-backup.md). Dropped at its first failed read (readDirect).
     */
    private direct: FileHandle | undefined,
  ) {}

  /** Bytes read with O_DIRECT and through the page cache (an odd-sized tail, a run after an O_DIRECT read failed, no O_DIRECT). */
  readonly reads = { directBytes: 0, bufferedBytes: 0 };

  get defaultName(): string {
    return basename(this.description.path);
  }

  /**
   * Refuses what is neither a regular file nor a block device, without opening it: open() of a FIFO
   * waits for a writer, in a thread no signal interrupts. Called before the repository is locked.
   */
  static async check(path: string): Promise<void> {
    // A path that cannot be stat()ed is reported by open(), which says why in the usual words.
    const stats: Stats | undefined = await stat(path).catch(() => undefined);
    if (!stats || stats.isFile() || stats.isBlockDevice()) return;
    const kind = stats.isFIFO() ? 'a FIFO' : stats.isSocket() ? 'a socket' : stats.isCharacterDevice() ? 'a character device' : stats.isDirectory() ? 'a directory' : 'something else';
    throw new SourceUnreadableError(path, `it is ${kind}, not a regular file or a block device (give one, or an NBD URI)`);
  }

  static async open(path: string): Promise<FileSource> {
    await FileSource.check(path);
    let handle: FileHandle;
    try {
      // O_NONBLOCK: should the path have become a FIFO since the check, open() returns rather than wait
      // for a writer (it changes nothing for files and block devices); fstat below refuses it.
      handle = await open(path, constants.O_RDONLY | constants.O_NONBLOCK);
    } catch (error) {
      throw new SourceUnreadableError(path, error instanceof Error ? error.message : String(error));
    }
    try {
      const stats = await handle.stat();
      if (stats.isBlockDevice()) {
        const size = () => blockDeviceSize(stats.rdev, (why) => new SourceUnreadableError(path, why));
        return new FileSource(handle, await size(), { kind: 'block-device', path, realPath: await realpath(path) }, size, undefined, await reopenDirect(handle, 'read'));
      }
      if (!stats.isFile()) throw new SourceUnreadableError(path, 'not a regular file or a block device');
      const size = async () => (await handle.stat()).size;
      const realPath = await realpath(path);
      return new FileSource(handle, stats.size, { kind: 'file', path, realPath }, size, mayHaveHoles(stats) ? new FileHoleMap(realPath) : undefined, await reopenDirect(handle, 'read'));
    } catch (error) {
      await handle.close();
      throw error;
    }
  }

  /** Where a sparse file's holes are: the blocks inside them are recorded as zeros, unread. */
  get extents(): (() => AsyncIterable<Extent>) | undefined {
    const holes = this.holes;
    return holes ? () => holes.extents() : undefined;
  }

  async read(target: Buffer, offset: number): Promise<void> {
    await this.readRun([target], offset);
  }

  /** One preadv per run (more only when the kernel returns less), into the targets in order. */
  async readRun(targets: readonly Buffer[], offset: number): Promise<void> {
    let pending = targets.filter((target) => target.length > 0);
    let at = offset;
    while (pending.length > 0) {
      let bytesRead: number;
      try {
        const aligned = this.direct && at % DIRECT_IO_ALIGNMENT === 0 ? alignedPrefix(pending) : 0;
        const direct = aligned > 0 ? await this.readDirect(pending.slice(0, aligned), at) : undefined;
        if (direct !== undefined) {
          bytesRead = direct.bytesRead;
          this.reads.directBytes += bytesRead;
        } else {
          ({ bytesRead } = await this.handle.readv(pending, at));
          this.reads.bufferedBytes += bytesRead;
        }
      } catch (error) {
        throw new SourceUnreadableError(this.description.path, isErrnoException(error) ? `${error.code} at offset ${at}` : String(error));
      }
      if (bytesRead === 0) {
        throw new SourceChangedError(this.description.path, `it ended at offset ${at}, but had ${this.size} bytes when the backup started`);
      }
      at += bytesRead;
      pending = skipBytes(pending, bytesRead);
    }
  }

  /**
   * An O_DIRECT read, or undefined when it failed for any reason: the caller then reads the run through the
   * page cache, and so does this source from then on. O_DIRECT refuses what buffered reads take (memory or
   * lengths a device's alignment rules out: EINVAL; a file system that takes the open but not the read), and
   * which errors mean that differs between kernels and file systems; an error the disk really has comes back
   * from the buffered read, which is the one reported.
   */
  private async readDirect(targets: Buffer[], at: number): Promise<{ bytesRead: number } | undefined> {
    try {
      return await this.direct!.readv(targets, at);
    } catch {
      const direct = this.direct;
      this.direct = undefined;
      await direct?.close().catch(() => undefined);
      return undefined;
    }
  }

  async close(): Promise<void> {
    this.holes?.stop();
    await this.direct?.close().catch(() => undefined);
    try {
      const now = await this.currentSize();
      if (now !== this.size) throw new SourceChangedError(this.description.path, `its size went from ${this.size} to ${now} bytes`);
    } finally {
      await this.handle.close();
    }
  }

  /** Releases the source without the size check (after another failure). */
  async dispose(): Promise<void> {
    this.holes?.stop();
    await this.direct?.close().catch(() => undefined);
    await this.handle.close().catch(() => undefined);
  }
}
