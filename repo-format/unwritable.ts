/**
 * Repositories that cannot be written where they are read (SPEC.md, section 12.6): a read-only filesystem,
 * mount or snapshot (an off-site copy), files this user may not write, or a full filesystem. What a
 * failure to write means, and the private copy of the index that a reader then uses: LevelDB cannot open
 * a database without writing to it (its LOCK file, a new manifest and log).
 */
import { chmod, cp, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PRIVATE_DIRECTORY_MODE } from './file-modes.js';
import { EngineError, isErrnoException, NoSpaceError, ReadOnlyRepositoryError, type LockHolder } from './errors.js';

export interface Unwritable {
  /** `full`: ENOSPC or EDQUOT; `read-only`: EROFS, EACCES or EPERM. */
  kind: 'full' | 'read-only';
  errno: string;
}

/** What a failed write says about the repository, or undefined for any other failure. */
export function unwritableReason(error: unknown): Unwritable | undefined {
  if (error instanceof ReadOnlyRepositoryError) return { kind: 'read-only', errno: String(error.details.errno) };
  if (error instanceof NoSpaceError) {
    // The errno under however many layers of NoSpaceError (a cause wrapped with a hint).
    let cause: unknown = error;
    while (cause instanceof NoSpaceError) cause = (cause as Error).cause;
    return { kind: 'full', errno: isErrnoException(cause) && (cause.code === 'EDQUOT' || cause.code === 'ENOSPC') ? cause.code : 'ENOSPC' };
  }
  if (!isErrnoException(error) || error instanceof EngineError) return undefined;
  switch (error.code) {
    case 'ENOSPC':
    case 'EDQUOT':
      return { kind: 'full', errno: error.code };
    case 'EROFS':
    case 'EACCES':
    case 'EPERM':
      return { kind: 'read-only', errno: error.code };
    default:
      return undefined;
  }
}

/**
 * Copies a LevelDB directory (without its LOCK file) into a new private directory under the system's
 * temporary directory ($TMPDIR), for a reader that may not write the repository. The copy is deleted
 * when the reader closes (`removeIndexCopy`).
 */
export async function copyIndexForReading(indexPath: string): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'engine-index-'));
  // The copy holds the catalogue (every backup record) and blob ids: its directory is the owner's alone.
  await chmod(dir, PRIVATE_DIRECTORY_MODE);
  const copy = join(dir, 'index');
  try {
    await cp(indexPath, copy, { recursive: true, filter: (source) => !source.endsWith('/LOCK') });
  } catch (error) {
    await rm(dir, { recursive: true, force: true });
    if (isErrnoException(error) && (error.code === 'ENOSPC' || error.code === 'EDQUOT')) {
      throw new NoSpaceError(dir, error, `a read-only or full repository is read through a private copy of its index in ${tmpdir()}: free space there, or set TMPDIR to a directory with room`);
    }
    throw error;
  }
  return copy;
}

/** A private directory for an index rebuilt from the packs of a repository this reader may not write. */
export async function privateIndexDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'engine-index-'));
  await chmod(dir, PRIVATE_DIRECTORY_MODE);
  return join(dir, 'index');
}

export async function removeIndexCopy(copy: string): Promise<void> {
  await rm(join(copy, '..'), { recursive: true, force: true });
}

/** What a reader without the lock says once, and what it costs (SPEC.md, section 12.6). */
export function withoutLockNotice(root: string, command: string, why: Unwritable, lock?: LockHolder): string {
  const what = why.kind === 'read-only' ? `repository ${root} cannot be written (${why.errno})` : `the filesystem holding ${root} is full (${why.errno}) and no space is set aside to take the lock with`;
  const held = lock ? `; it holds a lock of pid ${lock.pid} on ${lock.hostname} (${lock.command}, since ${lock.since}), which this process cannot check` : '';
  return `${what}: ${command} reads it without taking the lock or registering, from a private copy of its index${held}; a prune or gc run meanwhile through a writable path could remove data it reads (it would then fail, never return wrong data)`;
}
