/**
 * Restore targets on the local host: a new raw file (created sparse, zero blocks left as holes, exact
 * final size), an existing file, or a block device (both must be large enough; zero blocks are written
 * as zeros there, since their old content is not zero). A block device is held exclusively while it is
 * written, and neither a device nor a file in use by someone else is written at all (target-in-use.ts).
 *
 * Writes go in runs (write-runs.ts: adjacent blocks in one pwritev) through a second descriptor opened with
 * O_DIRECT where the file system allows it: the block slots are page-aligned shared memory
 * (pipeline/aligned-memory.ts), so the disk reads them where the workers put them, without the copy into the
 * page cache that cost a buffered restore most of its system CPU (3.8 of 10.9 CPU-s restoring the 3 GiB /usr
 * image: bench/results/restore-cpu-account.md). A write that O_DIRECT cannot take (not aligned: a disk's
 * odd-sized tail, memory that is not page-aligned) goes through the ordinary descriptor; a file system without
 * O_DIRECT gets buffered writes only. Either way the restore ends with one fsync of the file (and of its directory when new),
 * before success is reported.
 */
import { open, stat, unlink, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { classifyWriteError, isErrnoException } from '../../repo-format/errors.js';
import { fsyncDirectory } from '../../repo-format/durable-file.js';
import { readFully, skipBytes, writevFully } from '../../repo-format/file-io.js';
import { MUTABLE_FILE_MODE, openNewFile } from '../../repo-format/file-modes.js';
import { TargetInUseError, TargetTooSmallError, TargetUnwritableError } from '../errors.js';
import { blockDeviceSize } from '../sources/device-size.js';
import { openDeviceExclusively, whoUsesFile } from './target-in-use.js';
import type { TargetWriter } from './target-writer.js';
import { RunWriter } from './write-runs.js';
import { alignedPrefix, DIRECT_IO_ALIGNMENT, reopenDirect } from '../pipeline/aligned-memory.js';

/**
 * Bytes written through the page cache between background flushes. Without them the kernel keeps a whole restore dirty in the page
 * cache (its background writeback starts at 10% of RAM) and the final fsync writes it all while nothing else
 * happens; with them the disk writes while the workers open the next chunks.
 */
const WRITE_BEHIND_BYTES = 256 * 1024 * 1024;

/** How the writes of one target went: what tests and benches read (test/restore-write-runs.test.ts). */
export interface FileTargetWrites {
  /** Write calls (one pwritev per run). */
  calls: number;
  /** Bytes written with O_DIRECT, and through the page cache. */
  directBytes: number;
  bufferedBytes: number;
}

export class FileTarget implements TargetWriter {
  private readonly runs = new RunWriter((buffers, offset) => this.writeRun(buffers, offset));
  readonly writes: FileTargetWrites = { calls: 0, directBytes: 0, bufferedBytes: 0 };
  private unflushed = 0;
  private flushing: Promise<void> | undefined;
  private flushError: unknown;

  private constructor(
    readonly path: string,
    private readonly handle: FileHandle,
    /** The same file opened with O_DIRECT, when its file system allows it; dropped if it refuses a write. */
    private direct: FileHandle | undefined,
    readonly zeroed: boolean,
    readonly created: boolean,
  ) {}

  /**
   * `assumeZeroed`: an existing target known to read as zeros (a freshly created disk), so zero blocks
   * need not be written. `checkDevice`: run on a block device once it is held exclusively (restore's
   * refusal of a device that holds data).
   */
  static async open(path: string, diskSize: number, options: { assumeZeroed?: boolean; checkDevice?: (path: string) => Promise<void> } = {}): Promise<FileTarget> {
    const existing = await stat(path, { bigint: true }).catch((error: unknown) => {
      if (isErrnoException(error) && error.code === 'ENOENT') return undefined;
      throw new TargetUnwritableError(path, String(error));
    });
    if (!existing) {
      let handle: FileHandle | undefined;
      try {
        handle = await openNewFile(path, 'wx', MUTABLE_FILE_MODE);
        await handle.truncate(diskSize);
      } catch (error) {
        if (handle) {
          await handle.close().catch(() => undefined);
          await unlink(path).catch(() => undefined);
        }
        const classified = classifyWriteError(error, path);
        if (classified !== error) throw classified;
        throw new TargetUnwritableError(path, isErrnoException(error) ? error.message : String(error));
      }
      return new FileTarget(path, handle, await reopenDirect(handle, 'write'), true, true);
    }
    let size: number;
    if (existing.isBlockDevice()) size = await blockDeviceSize(existing.rdev, (why) => new TargetUnwritableError(path, why));
    else if (existing.isFile()) size = Number(existing.size);
    else throw new TargetUnwritableError(path, 'it exists and is neither a regular file nor a block device');
    if (size < diskSize) throw new TargetTooSmallError(path, size, diskSize);
    if (existing.isBlockDevice()) {
      // Held from here until close: nothing can mount or claim it while the restore writes.
      const handle = await openDeviceExclusively(path, existing.rdev);
      try {
        await options.checkDevice?.(path);
      } catch (error) {
        await handle.close();
        throw error;
      }
      return new FileTarget(path, handle, await reopenDirect(handle, 'write'), options.assumeZeroed === true, false);
    }
    const inUse = await whoUsesFile(existing);
    if (inUse !== undefined) throw new TargetInUseError(path, inUse);
    try {
      const handle = await open(path, 'r+');
      return new FileTarget(path, handle, await reopenDirect(handle, 'write'), options.assumeZeroed === true, false);
    } catch (error) {
      throw new TargetUnwritableError(path, isErrnoException(error) ? error.message : String(error));
    }
  }

  /** Resolves once `data` is written (with the run it joined: write-runs.ts); `data` must stay as it is until then. */
  write(data: Buffer, offset: number): Promise<void> {
    return this.runs.write(data, offset);
  }

  /** One run: its page-aligned part with O_DIRECT, the rest (an odd-sized tail, or all of it) through the page cache. */
  private async writeRun(buffers: Buffer[], offset: number): Promise<void> {
    if (this.flushError !== undefined) throw classifyWriteError(this.flushError, this.path);
    const length = buffers.reduce((sum, b) => sum + b.length, 0);
    let done = 0;
    try {
      const aligned = this.direct && offset % DIRECT_IO_ALIGNMENT === 0 ? alignedPrefix(buffers) : 0;
      if (aligned > 0) {
        done = await this.writeDirect(buffers.slice(0, aligned), offset);
        this.writes.directBytes += done;
      }
      if (done < length) {
        await this.writeVector(this.handle, skipBytes(buffers, done), offset + done);
        this.writes.bufferedBytes += length - done;
      }
    } catch (error) {
      throw classifyWriteError(error, this.path);
    }
    this.writeBehind(length - done);
  }

  /**
   * Bytes of the run written with O_DIRECT: all of them, or fewer when the kernel refused the memory's
   * alignment (EINVAL: not page-aligned memory), after which this target writes through the page cache only.
   */
  private async writeDirect(buffers: Buffer[], offset: number): Promise<number> {
    let done = 0;
    try {
      await this.writeVector(this.direct!, buffers, offset, (bytes) => (done += bytes));
      return done;
    } catch (error) {
      if (!isErrnoException(error) || error.code !== 'EINVAL') throw error;
      const direct = this.direct;
      this.direct = undefined;
      await direct?.close().catch(() => undefined);
      return done;
    }
  }

  /** Writes every byte of `buffers` from `offset` (counting the calls); `onBytes` hears what each call wrote. */
  private async writeVector(handle: FileHandle, buffers: Buffer[], offset: number, onBytes?: (bytes: number) => void): Promise<void> {
    const length = buffers.reduce((sum, b) => sum + b.length, 0);
    const written = await writevFully(handle, buffers, offset, (bytes) => {
      this.writes.calls += 1;
      onBytes?.(bytes);
    });
    if (written < length) throw new TargetUnwritableError(this.path, `the system wrote nothing at offset ${offset + written}`);
  }

  /** Starts a background fdatasync every WRITE_BEHIND_BYTES; its failure fails the next write or finish(). */
  private writeBehind(length: number): void {
    this.unflushed += length;
    if (this.unflushed < WRITE_BEHIND_BYTES || this.flushing) return;
    this.unflushed = 0;
    this.flushing = this.handle
      .datasync()
      .catch((error: unknown) => {
        this.flushError ??= error;
      })
      .finally(() => {
        this.flushing = undefined;
      });
  }

  async read(target: Buffer, offset: number): Promise<void> {
    if ((await readFully(this.handle, target, offset)) < target.length) throw new TargetUnwritableError(this.path, `cannot read back ${target.length} bytes at offset ${offset}: the target ends first`);
  }

  async finish(): Promise<void> {
    try {
      await this.runs.idle();
      await this.flushing;
      if (this.flushError !== undefined) throw this.flushError;
      await this.handle.sync();
      // A new file's name must survive a power loss as well as its data.
      if (this.created) await fsyncDirectory(dirname(this.path));
    } catch (error) {
      throw classifyWriteError(error, this.path);
    } finally {
      await this.direct?.close().catch(() => undefined);
      await this.handle.close();
    }
  }

  async discard(): Promise<void> {
    await this.runs.idle();
    await this.flushing;
    await this.direct?.close().catch(() => undefined);
    await this.handle.close().catch(() => undefined);
    if (this.created) await unlink(this.path).catch(() => undefined);
  }
}
