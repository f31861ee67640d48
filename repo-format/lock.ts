/**
 * The repository lock: one process at a time opens the index (LevelDB enforces the same with an fcntl
 * lock; this file exists so that the refusal names the holder).
 *
 * `lock` holds JSON {pid, hostname, since, command}. It is created with O_EXCL. A lock whose holder is a
 * dead process on this host is stale and is broken; a lock from another host is never broken
 * automatically (its pid means nothing here).
 */
import { open, readFile, rename, unlink } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { LAYOUT } from './constants.js';
import { classifyWriteError, isErrnoException, RepositoryLockedError, type LockHolder } from './errors.js';

export interface RepositoryLock {
  holder: LockHolder;
  /** Set when acquiring broke a stale lock: who held it. */
  brokeStale?: LockHolder;
  release(): Promise<void>;
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return !(isErrnoException(error) && error.code === 'ESRCH');
  }
}

export async function readLockHolder(root: string): Promise<LockHolder | undefined> {
  return readLockFile(join(root, LAYOUT.lock));
}

async function readLockFile(path: string): Promise<LockHolder | undefined> {
  try {
    const value = JSON.parse(await readFile(path, 'utf8')) as Partial<LockHolder>;
    if (typeof value.pid !== 'number' || typeof value.hostname !== 'string' || typeof value.since !== 'string') return undefined;
    return { pid: value.pid, hostname: value.hostname, since: value.since, command: String(value.command ?? 'unknown') };
  } catch {
    return undefined;
  }
}

export function isStale(holder: LockHolder): boolean {
  return holder.hostname === hostname() && holder.pid !== process.pid && !isAlive(holder.pid);
}

export async function acquireLock(root: string, command: string): Promise<RepositoryLock> {
  const path = join(root, LAYOUT.lock);
  const holder: LockHolder = { pid: process.pid, hostname: hostname(), since: new Date().toISOString(), command };
  let brokeStale: LockHolder | undefined;
  for (let attempt = 0; attempt < 3; attempt += 1) {
    try {
      const handle = await open(path, 'wx', 0o644);
      try {
        await handle.writeFile(JSON.stringify(holder));
        await handle.sync();
      } finally {
        await handle.close();
      }
      const lock: RepositoryLock = {
        holder,
        release: async () => {
          const current = await readLockHolder(root);
          if (current && current.pid === holder.pid && current.since === holder.since) await unlink(path).catch(() => undefined);
        },
      };
      if (brokeStale) lock.brokeStale = brokeStale;
      return lock;
    } catch (error) {
      if (!isErrnoException(error) || error.code !== 'EEXIST') throw classifyWriteError(error, path);
    }
    const current = await readLockHolder(root);
    if (!current || !isStale(current)) throw new RepositoryLockedError(root, current);
    // Move the stale lock aside rather than unlinking it: of two processes breaking it at once only one
    // rename succeeds, and the loser finds the winner's fresh lock on its next attempt.
    const aside = join(root, LAYOUT.tmp, `stale-lock.${randomBytes(4).toString('hex')}`);
    try {
      await rename(path, aside);
      const moved = await readLockFile(aside);
      if (moved && (moved.pid !== current.pid || moved.since !== current.since)) {
        // We moved a fresh lock that replaced the stale one in between: put it back and give up.
        await rename(aside, path).catch(() => undefined);
        throw new RepositoryLockedError(root, moved);
      }
      await unlink(aside).catch(() => undefined);
      brokeStale = current;
    } catch (error) {
      if (error instanceof RepositoryLockedError) throw error;
      if (!isErrnoException(error) || error.code !== 'ENOENT') throw error;
    }
  }
  throw new RepositoryLockedError(root, await readLockHolder(root));
}
