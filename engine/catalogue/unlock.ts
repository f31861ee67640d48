/**
 * `engine unlock`: the way out of a lock or registration that blocks the repository (SPEC.md, section
 * 12.7). Every command already breaks what is provably stale (a dead or reused pid on this host, an
 * earlier boot); unlock says what holds the repository, removes what is provably stale, and with --force
 * also what it cannot prove stale:
 *
 * - the lock: one of another host (its pid means nothing here), one of an older engine whose pid is alive
 *   (no identity to tell a reused pid), an unreadable one, and even one whose holder provably runs here;
 * - registrations (readers/, writers/) of another host, of an older engine, or unreadable; never one
 *   whose process provably runs on this host: stopping that process (umount, SIGTERM) removes it.
 *
 * It takes no lock and needs no passphrase: it changes nothing but lock and registration files.
 */
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { rename, stat, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { Repository } from '../../repo-format/repository.js';
import { LAYOUT } from '../../repo-format/constants.js';
import { FormatUnsupportedError, isErrnoException, ReadOnlyRepositoryError, type StorageRemedy } from '../../repo-format/errors.js';
import { openLocation } from '../../repo-format/v3/location.js';
import { defaultCacheRoot } from '../../repo-format/v3/session.js';
import { hostIdOf, processProbe, thisProcess } from '../../repo-format/v3/host.js';
import { Leases } from '../../repo-format/v3/leases.js';
import { systemClock } from '../../repo-format/v3/clock.js';
import { LEASE_SKEW_BOUND_MS, LEASE_TIME_MS } from '../../repo-format/constants.js';
import { lockedHint, lockLiveness, readLockFile } from '../../repo-format/lock.js';
import { listRegistrations, removeRegistration, type RegistryDir } from '../../repo-format/registry.js';
import type { HolderLiveness } from '../../repo-format/process-alive.js';

export interface UnlockOptions {
  repo: string;
  /** Also remove what cannot be proven stale (see the module comment). */
  force?: boolean | undefined;
}

export interface UnlockItem {
  /** Relative to the repository root: `lock`, `readers/<token>.json`, `writers/<token>.json`. */
  file: string;
  holder: { pid: number; hostname: string; since: string; command: string } | null;
  /** What is known of the holder: dead, alive, unverified (an older engine's file, pid alive), other-host, unreadable. */
  state: HolderLiveness | 'unreadable';
  removed: boolean;
  /** What was done and why, or what stands in the way. */
  message: string;
  /** What the caller can do about an item left in place (an unlock with `force`), worded by the front end. */
  remedies?: StorageRemedy[];
}

export interface UnlockReport {
  repo: string;
  force: boolean;
  /** The lock, or null when there was none. */
  lock: UnlockItem | null;
  registrations: UnlockItem[];
  /** Whether a lock is still in place (exit code 3). */
  locked: boolean;
}

function describe(holder: UnlockItem['holder']): string {
  return holder ? `pid ${holder.pid} on ${holder.hostname} (${holder.command}, since ${holder.since})` : 'an unknown holder (the file cannot be read)';
}

/** What now runs under a pid, for a user deciding whether it is an engine process. */
function commandLineOf(pid: number): string | undefined {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter(Boolean).join(' ').slice(0, 200);
  } catch {
    return undefined;
  }
}

function stateText(state: UnlockItem['state'], holder: UnlockItem['holder']): string {
  switch (state) {
    case 'dead':
      return 'that process no longer runs';
    case 'alive':
      return 'that process is running';
    case 'unverified': {
      const now = holder ? commandLineOf(holder.pid) : undefined;
      return `pid ${holder?.pid} is alive${now ? ` (${now})` : ''}, and the file (of an older engine) does not say whether it is the same process`;
    }
    case 'other-host':
      return 'this host cannot tell whether it still runs';
    default:
      return 'the file cannot be read';
  }
}

/** Moves a file aside into tmp/ and deletes it; `still` says whether what was moved is what was judged. */
async function removeJudged(root: string, file: string, still: (moved: string) => Promise<boolean>): Promise<boolean> {
  const aside = join(root, LAYOUT.tmp, `unlock.${randomBytes(4).toString('hex')}`);
  try {
    await rename(join(root, file), aside);
  } catch (error) {
    if (isErrnoException(error) && error.code === 'ENOENT') return true; // gone meanwhile
    if (isErrnoException(error) && (error.code === 'EROFS' || error.code === 'EACCES' || error.code === 'EPERM')) throw new ReadOnlyRepositoryError(root, 'unlock', error.code);
    throw error;
  }
  if (!(await still(aside))) {
    // Replaced between the look and the move (a new lock taken): put it back, untouched.
    await rename(aside, join(root, file)).catch(() => undefined);
    return false;
  }
  await unlink(aside).catch(() => undefined);
  return true;
}

async function unlockLock(root: string, force: boolean): Promise<UnlockItem | null> {
  const path = join(root, LAYOUT.lock);
  if (!(await stat(path).then(() => true, () => false))) return null;
  const current = await readLockFile(path);
  const holder = current ? { pid: current.pid, hostname: current.hostname, since: current.since, command: current.command } : null;
  const state: UnlockItem['state'] = current ? lockLiveness(current) : 'unreadable';
  const item: UnlockItem = { file: LAYOUT.lock, holder, state, removed: false, message: '' };
  if (state !== 'dead' && !force) {
    const hint = state === 'alive' ? { condition: 'wait for it to finish, or stop it', remedy: undefined } : lockedHint(root, holder ?? undefined);
    const said = stateText(state, holder);
    // lockedHint's condition repeats the state for a holder this host cannot check: say it once.
    item.message = `kept the lock of ${describe(holder)}: ${said}${hint.condition && hint.condition !== said ? `; ${hint.condition}` : ''}`;
    if (hint.remedy) item.remedies = [hint.remedy];
    return item;
  }
  item.removed = await removeJudged(root, LAYOUT.lock, async (moved) => (await readLockFile(moved))?.token === current?.token);
  if (!item.removed) item.message = 'kept the lock: another process took it meanwhile';
  else if (state === 'dead') item.message = `removed the stale lock of ${describe(holder)}: ${stateText(state, holder)}`;
  else item.message = `WARNING: removed the lock of ${describe(holder)} although ${stateText(state, holder)} (forced): if that process still works on the repository, two processes may now change it at once`;
  return item;
}

/** An unlock with force removes what this one kept. */
function forcedUnlock(root: string): StorageRemedy {
  return { kind: 'unlock', repo: root, force: true, removes: 'it' };
}

async function unlockRegistrations(root: string, dir: RegistryDir, force: boolean): Promise<UnlockItem[]> {
  const items: UnlockItem[] = [];
  const { live, stale } = await listRegistrations(root, dir);
  for (const r of stale) {
    await removeRegistration(root, dir, r.token);
    const holder = { pid: r.pid, hostname: r.hostname, since: r.since, command: r.command };
    items.push({ file: `${dir}/${r.token}.json`, holder, state: 'dead', removed: true, message: `removed the stale registration ${dir}/${r.token}.json of ${describe(holder)}: that process no longer runs` });
  }
  for (const r of live) {
    if ('unreadable' in r) {
      const file = `${dir}/${r.unreadable}`;
      const removed = force && (await removeJudged(root, file, async () => true));
      items.push(removed ? { file, holder: null, state: 'unreadable', removed, message: `WARNING: removed ${file}, which cannot be read (forced)` } : { file, holder: null, state: 'unreadable', removed, message: `kept ${file}: it cannot be read`, remedies: [forcedUnlock(root)] });
      continue;
    }
    const holder = { pid: r.pid, hostname: r.hostname, since: r.since, command: r.command };
    const state = lockLiveness(r);
    const file = `${dir}/${r.token}.json`;
    if (state === 'alive' || !force) {
      const kept = `kept ${file} of ${describe(holder)}: ${stateText(state, holder)}`;
      if (state !== 'alive') items.push({ file, holder, state, removed: false, message: kept, remedies: [forcedUnlock(root)] });
      else items.push({ file, holder, state, removed: false, message: `${kept}; ${dir === LAYOUT.readers ? 'stop it (engine umount, or SIGTERM to an engine serve) to remove it' : 'wait for it to finish, or stop it'}` });
      continue;
    }
    await removeRegistration(root, dir, r.token);
    items.push({ file, holder, state, removed: true, message: `WARNING: removed ${file} of ${describe(holder)} although ${stateText(state, holder)} (forced): if it still ${dir === LAYOUT.readers ? 'reads, gc may delete packs it reads' : 'writes, its work is lost'}` });
  }
  return items;
}

export async function unlock(options: UnlockOptions): Promise<UnlockReport> {
  try {
    await Repository.readConfig(options.repo, undefined, 'unlock'); // a clear error for a path that is not a repository
  } catch (error) {
    if (error instanceof FormatUnsupportedError) return unlockLeases(options);
    throw error;
  }
  const force = options.force === true;
  const lock = await unlockLock(options.repo, force);
  const registrations = [...(await unlockRegistrations(options.repo, LAYOUT.writers, force)), ...(await unlockRegistrations(options.repo, LAYOUT.readers, force))];
  return { repo: options.repo, force, lock, registrations, locked: lock !== null && !lock.removed };
}

/**
 * Version 3 (SPEC.md 19.5): the leases take the place of the lock and the registrations. Dead and expired
 * ones are removed; with `force` every one, live or unreadable (a holder that still works then loses its
 * lease at its next refresh and stops). The repository counts as locked while a live or unreadable
 * exclusive or pending lease remains: that is what keeps backups out.
 */
async function unlockLeases(options: UnlockOptions): Promise<UnlockReport> {
  const force = options.force === true;
  const storage = await openLocation(options.repo);
  try {
    const config = await Repository.loadConfig(options.repo, storage);
    const hostId = await hostIdOf(defaultCacheRoot());
    const leases = new Leases({
      storage,
      clock: systemClock,
      holder: thisProcess(hostId),
      probe: processProbe,
      timing: { leaseMs: config.leases?.timeMs ?? LEASE_TIME_MS, skewBoundMs: config.leases?.skewBoundMs ?? LEASE_SKEW_BOUND_MS },
    });
    const items: UnlockItem[] = [];
    let locked = false;
    for (const found of await leases.unlock({ force })) {
      const lease = found.lease;
      const holder = lease ? { pid: lease.pid, hostname: lease.hostname, since: lease.since, command: `${lease.command}, ${lease.kind} lease until ${lease.expires}` } : null;
      const state: UnlockItem['state'] = found.state === 'unreadable' ? 'unreadable' : found.state !== 'live' ? 'dead' : lease!.host === hostId ? 'alive' : 'other-host';
      const why = found.state === 'live' ? 'it is live' : found.state === 'unreadable' ? 'it cannot be read' : `it is ${found.state}`;
      if (!found.removed) {
        if (lease === undefined || lease.kind !== 'shared') locked = true;
        items.push({ file: found.key, holder, state, removed: false, message: `kept ${found.key} of ${describe(holder)}: ${why}`, remedies: [forcedUnlock(options.repo)] });
      } else {
        items.push({ file: found.key, holder, state, removed: true, message: found.state === 'live' || found.state === 'unreadable' ? `WARNING: removed ${found.key} of ${describe(holder)} although ${why} (forced): if its holder still works, it stops at its next refresh` : `removed ${found.key} of ${describe(holder)}: ${why}` });
      }
    }
    return { repo: options.repo, force, lock: null, registrations: items, locked };
  } finally {
    await storage.close();
  }
}
