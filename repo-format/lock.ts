/**
 * The repository lock: one process at a time opens the index (LevelDB enforces the same with an fcntl
 * lock; this file exists so that the refusal names the holder).
 *
 * `lock` holds JSON {pid, hostname, since, command, token, identity}. It appears whole: a complete temp file is
 * link()ed to `lock`, which fails if one exists. The token tells this acquisition apart. A lock whose
 * holder is provably gone is stale and is broken: on this host, its pid runs no process or another one
 * (`identity`, boot id and start time, tells a reused pid apart; a lock of an earlier boot is always
 * stale). A lock of an older engine (no `identity`) whose pid is alive is taken as live; a lock from
 * another host is never broken automatically (its pid means nothing here): `engine unlock` (unlock.ts)
 * is the way out, and every refusal says so.
 */
import { link, rename, unlink } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { LAYOUT, SMALL_FILE_LIMIT } from './constants.js';
import { readBoundedFile } from './bounded-read.js';
import { holderLiveness, processIdentity, type HolderLiveness } from './process-alive.js';
import { IMMUTABLE_FILE_MODE, openNewFile } from './file-modes.js';
import { holding } from './held.js';
import { crashPoint } from './crash-points.js';
import { classifyWriteError, isErrnoException, RepositoryLockedError, type LockedHint, type LockHolder, type StorageRemedy } from './errors.js';

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
  return { pid: holder.pid, hostname: holder.hostname, since: holder.since, command: holder.command, ...(holder.identity === undefined ? {} : { identity: holder.identity }) };
}

export async function readLockFile(path: string): Promise<(LockHolder & { token: string }) | undefined> {
  try {
    // A lock file is a few hundred bytes; a bigger one is not a lock this engine wrote.
    const text = (await readBoundedFile(path, SMALL_FILE_LIMIT)).toString('utf8');
    const value = JSON.parse(text) as Partial<LockHolder & { token: string }>;
    if (typeof value.pid !== 'number' || !Number.isSafeInteger(value.pid) || typeof value.hostname !== 'string' || typeof value.since !== 'string') return undefined;
    const identity = typeof value.identity === 'string' ? { identity: value.identity } : {};
    return { pid: value.pid, hostname: value.hostname, since: value.since, command: String(value.command ?? 'unknown'), token: String(value.token ?? ''), ...identity };
  } catch {
    return undefined;
  }
}

/** What is known of the holder's process (process-alive.ts): only `dead` is ever broken automatically. */
export function lockLiveness(holder: { pid: number; hostname: string; identity?: string | undefined }): HolderLiveness {
  return holderLiveness(holder, hostname());
}

export function isStale(holder: { pid: number; hostname: string; identity?: string | undefined }): boolean {
  return lockLiveness(holder) === 'dead';
}

/** What a refusal says of the holder, and the way out (an unlock, forced where the holder cannot be proven gone). */
export function lockedHint(root: string, holder: LockHolder | undefined, what = 'the lock'): LockedHint {
  const unlock = (force: boolean, when?: string): StorageRemedy => ({ kind: 'unlock', repo: root, force, removes: what, ...(when ? { when } : {}) });
  if (!holder) return { remedy: unlock(true, 'if no engine process uses the repository') };
  switch (lockLiveness(holder)) {
    case 'alive':
      return { condition: 'that process is running: wait for it to finish' };
    case 'unverified':
      return { condition: `pid ${holder.pid} is alive, but its file does not say whether it is still the holder`, remedy: unlock(true, 'if it is not an engine process') };
    case 'other-host':
      return { condition: 'this host cannot tell whether it still runs', remedy: unlock(true, `once it has finished (or host ${holder.hostname} is down)`) };
    default:
      return { condition: 'that process is gone', remedy: unlock(false) };
  }
}

/**
 * Throws RepositoryLockedError when a lock is present and its holder not provably gone: a command that
 * could not write its own lock (a full or read-only disk) must still respect another's. `otherHosts:
 * false`: a lock of another host does not count (a reader of a read-only copy).
 */
export async function refuseIfLocked(root: string, options: { otherHosts?: boolean } = {}): Promise<void> {
  const current = await readLockFile(join(root, LAYOUT.lock));
  if (!current || isStale(current)) return;
  if (options.otherHosts === false && lockLiveness(current) === 'other-host') return;
  throw lockedError(root, publicHolder(current));
}

function lockedError(root: string, holder: LockHolder | undefined): RepositoryLockedError {
  return new RepositoryLockedError(root, holder, lockedHint(root, holder));
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
  const identity = processIdentity(process.pid);
  const holder = { pid: process.pid, hostname: hostname(), since: new Date().toISOString(), command, token, ...(identity === undefined ? {} : { identity }) };
  let brokeStale: LockHolder | undefined;
  for (let attempt = 0; attempt < 3; attempt += 1) {
    try {
      await createLockFile(root, holder);
      const released = holding('lock');
      const lock: RepositoryLock = {
        holder: publicHolder(holder)!,
        release: async () => {
          // Remove the lock only if it is still ours (the token is unique to this acquisition).
          crashPoint('guard-releasing');
          try {
            const current = await readLockFile(path);
            if (current?.token === token) await unlink(path).catch(() => undefined);
          } finally {
            released();
          }
        },
      };
      if (brokeStale) lock.brokeStale = brokeStale;
      return lock;
    } catch (error) {
      if (!isErrnoException(error) || error.code !== 'EEXIST') throw classifyWriteError(error, path);
    }
    const current = await readLockFile(path);
    if (!current || !isStale(current)) throw lockedError(root, publicHolder(current));
    // Move the stale lock aside rather than unlinking it: of two processes breaking it at once only one
    // rename succeeds, and the loser finds the winner's fresh lock on its next attempt.
    const aside = join(root, LAYOUT.tmp, `stale-lock.${randomBytes(4).toString('hex')}`);
    try {
      await rename(path, aside);
      const moved = await readLockFile(aside);
      if (moved && moved.token !== current.token) {
        // We moved a fresh lock that replaced the stale one in between: put it back and give up.
        await rename(aside, path).catch(() => undefined);
        throw lockedError(root, publicHolder(moved));
      }
      await unlink(aside).catch(() => undefined);
      brokeStale = publicHolder(current);
    } catch (error) {
      if (error instanceof RepositoryLockedError) throw error;
      if (!isErrnoException(error) || error.code !== 'ENOENT') throw error;
    }
  }
  throw lockedError(root, await readLockHolder(root));
}
