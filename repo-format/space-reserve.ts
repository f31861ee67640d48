/**
 * The space reserve: `reserve`, a file of RESERVE_SIZE random bytes that `init` (or, in an older
 * repository, the first lock holder that finds room) sets aside, so that a repository whose filesystem
 * filled up can still be pruned and collected: a command that cannot write its lock because the disk is
 * full deletes the reserve, takes the lock, and sets the reserve aside again (as much of it as fits)
 * before it lets the lock go. `backup` never uses it: it would only fill it. SPEC.md, section 12.6.
 *
 * Random bytes, not zeros: a filesystem that compresses (btrfs, ZFS) stores zeros in no space at all.
 */
import { rename, stat, statfs, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { randomBytes, randomFillSync } from 'node:crypto';
import { LAYOUT, RESERVE_SIZE } from './constants.js';
import { fsyncDirectory } from './durable-file.js';
import { isErrnoException } from './errors.js';
import { IMMUTABLE_FILE_MODE, openNewFile } from './file-modes.js';

const PIECE = 256 * 1024;

export function reservePath(root: string): string {
  return join(root, LAYOUT.reserve);
}

/** Deletes the reserve; false when there was none. */
export async function releaseReserve(root: string): Promise<boolean> {
  try {
    await unlink(reservePath(root));
  } catch (error) {
    if (isErrnoException(error) && error.code === 'ENOENT') return false;
    throw error;
  }
  await fsyncDirectory(root).catch(() => undefined);
  return true;
}

/** Bytes the reserve holds (0: there is none). */
export async function reserveSize(root: string): Promise<number> {
  return stat(reservePath(root)).then(
    (s) => s.size,
    () => 0,
  );
}

/** Bytes free to this user on the filesystem holding `root` (undefined where statfs cannot tell). */
export async function freeBytes(root: string): Promise<number | undefined> {
  return statfs(root).then(
    (s) => s.bavail * s.bsize,
    () => undefined,
  );
}

/**
 * Sets the reserve aside: up to RESERVE_SIZE bytes, as many as fit (a full disk leaves less), written
 * under tmp/ and renamed to `reserve` (over a smaller one) only once durable, and only if at least
 * `minimum` bytes fit (else whatever reserve there was stays). Returns the bytes reserved (0: none). Only
 * a lock holder calls it (tmp/ is its to write).
 */
export async function createReserve(root: string, minimum = 1, size = RESERVE_SIZE): Promise<number> {
  const temp = join(root, LAYOUT.tmp, `reserve.${randomBytes(6).toString('hex')}`);
  let written = 0;
  try {
    // Written once, then only deleted: 0400 like every such file (SPEC.md, 2.1).
    const handle = await openNewFile(temp, 'wx', IMMUTABLE_FILE_MODE);
    try {
      const piece = Buffer.allocUnsafe(PIECE);
      while (written < size) {
        randomFillSync(piece);
        const length = Math.min(PIECE, size - written);
        try {
          const { bytesWritten } = await handle.write(piece, 0, length, written);
          written += bytesWritten;
        } catch (error) {
          if (isErrnoException(error) && (error.code === 'ENOSPC' || error.code === 'EDQUOT')) break;
          throw error;
        }
      }
      // A page that did not fit may have been counted as written by a partial write: keep only what syncs.
      await handle.truncate(written);
      await handle.sync();
    } finally {
      await handle.close();
    }
    if (written === 0 || written < minimum) {
      await unlink(temp).catch(() => undefined);
      return 0;
    }
    await rename(temp, reservePath(root));
    await fsyncDirectory(root);
    return written;
  } catch (error) {
    await unlink(temp).catch(() => undefined);
    if (isErrnoException(error) && (error.code === 'ENOSPC' || error.code === 'EDQUOT' || error.code === 'EROFS' || error.code === 'EACCES')) return 0;
    throw error;
  }
}
