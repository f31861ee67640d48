/**
 * The repository lock: one process at a time opens the index (LevelDB enforces the same with an fcntl
 * lock; this file exists so that the refusal names the holder).
 *
 * `lock` holds JSON {pid, hostname, since, command, token}. It appears whole: a complete temp file is
 * link()ed to `lock`, which fails if one exists. The token tells this acquisition apart. A lock whose holder is a
 * dead process on this host is stale and is broken; a lock from another host is never broken
 * automatically (its pid means nothing here).
 */
import { link, readFile, rename, unlink } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { LAYOUT } from './constants.js';
import { isProcessAlive } from './process-alive.js';
import { IMMUTABLE_FILE_MODE, openNewFile } from './file-modes.js';
import { classifyWriteError, isErrnoException, RepositoryLockedError, type LockHolder } from './errors.js';

export interface RepositoryLock {
  holder: LockHolder;
  /** Set when acquiring broke a stale lock: who held it. */
  brokeStale?: LockHolder;
  release(): Promise<void>;
}

export async function readLockHolder(root: string): Promise<LockHolder | undefined> {
  return publicHolder(await readLockFile(join(root, LAYOUT.lock)));
}

/** The holder as reported to users, without the token. */
function publicHolder(holder: (LockHolder & { token: string }) | undefined): LockHolder | undefined {
  if (!holder) return undefined;
  return { pid: holder.pid, hostname: holder.hostname, since: holder.since, command: holder.command };
}

async function readLockFile(path: string): Promise<(LockHolder & { token: string }) | undefined> {
  try {
    const value = JSON.parse(await readFile(path, 'utf8')) as Partial<LockHolder & { token: string }>;
    if (typeof value.pid !== 'number' || typeof value.hostname !== 'string' || typeof value.since !== 'string') return undefined;
    return { pid: value.pid, hostname: value.hostname, since: value.since, command: String(value.command ?? 'unknown'), token: String(value.token ?? '') };
  } catch {
    return undefined;
  }
}

export function isStale(holder: LockHolder): boolean {
  return holder.hostname === hostname() && holder.pid !== process.pid && !isProcessAlive(holder.pid);
}

/** Creates `lock` with its content in one step (link of a complete temp file): never an empty lock file. */
async function createLockFile(root: string, holder: LockHolder & { token: string }): Promise<void> {
  const temp = join(root, LAYOUT.tmp, `lock.${holder.token}`);
  const handle = await openNewFile(temp, 'wx', IMMUTABLE_FILE_MODE);
  try {
    try {
      await handle.writeFile(JSON.stringify(holder));
      await handle.sync();
    } finally {
      await handle.close();
    }
    await link(temp, join(root, LAYOUT.lock));
  } finally {
    // Also when writing failed (a full disk): nobody else removes another process's lock.* files.
    await unlink(temp).catch(() => undefined);
  }
}

export async function acquireLock(root: string, command: string): Promise<RepositoryLock> {
  const path = join(root, LAYOUT.lock);
  const token = randomBytes(8).toString('hex');
  const holder = { pid: process.pid, hostname: hostname(), since: new Date().toISOString(), command, token };
  let brokeStale: LockHolder | undefined;
  for (let attempt = 0; attempt < 3; attempt += 1) {
    try {
      await createLockFile(root, holder);
      const lock: RepositoryLock = {
        holder: publicHolder(holder)!,
        release: async () => {
          // Remove the lock only if it is still ours (the token is unique to this acquisition).
          const current = await readLockFile(path);
          if (current?.token === token) await unlink(path).catch(() => undefined);
        },
      };
      if (brokeStale) lock.brokeStale = brokeStale;
      return lock;
    } catch (error) {
      if (!isErrnoException(error) || error.code !== 'EEXIST') throw classifyWriteError(error, path);
    }
    const current = await readLockFile(path);
    if (!current || !isStale(current)) throw new RepositoryLockedError(root, publicHolder(current));
    // Move the stale lock aside rather than unlinking it: of two processes breaking it at once only one
    // rename succeeds, and the loser finds the winner's fresh lock on its next attempt.
    const aside = join(root, LAYOUT.tmp, `stale-lock.${randomBytes(4).toString('hex')}`);
    try {
      await rename(path, aside);
      const moved = await readLockFile(aside);
      if (moved && moved.token !== current.token) {
        // We moved a fresh lock that replaced the stale one in between: put it back and give up.
        await rename(aside, path).catch(() => undefined);
        throw new RepositoryLockedError(root, publicHolder(moved));
      }
      await unlink(aside).catch(() => undefined);
      brokeStale = publicHolder(current);
    } catch (error) {
      if (error instanceof RepositoryLockedError) throw error;
      if (!isErrnoException(error) || error.code !== 'ENOENT') throw error;
    }
  }
  throw new RepositoryLockedError(root, await readLockHolder(root));
}
