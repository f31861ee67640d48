/**
 * S3 Object Lock for a version-3 repository (SPEC.md 20.5): what `init --object-lock` checks or creates, the
 * lock every write then carries, and what gc does with it — extend the retention of what it keeps before
 * it runs out, report a lock that ran out unextended (OBJECT_LOCK_EXPIRED), and remove the noncurrent
 * versions and delete markers whose lock has expired (an engine's delete in a versioned bucket only adds a
 * delete marker: the locked version stays, for `--as-of`, until its date).
 */
import type { ObjectLockConfig, RepositoryConfig } from '../config.js';
import { InvalidArgumentError } from '../errors.js';
import type { S3Storage } from '../storage/s3.js';
import type { ObjectVersion } from '../storage/s3-xml.js';
import { isStorageError, StorageError } from '../storage/storage-error.js';
import { keyProblem, type Storage } from '../storage/storage.js';
import { s3BackendOf } from './location.js';

/** Leases are rewritten every T/3 and protect nothing: they are written without a lock (and so can go). */
export const UNLOCKED_PREFIX = 'leases/';

/** The stable code of a kept object whose lock ran out without gc extending it. */
export const OBJECT_LOCK_EXPIRED = 'OBJECT_LOCK_EXPIRED';
/** verify's warning when its credentials may not read the locks (s3:GetObjectRetention denied). */
export const OBJECT_LOCK_UNCHECKED = 'OBJECT_LOCK_UNCHECKED';

/** gc extends a kept object's lock to now + R when less than this share of R is left. */
export const EXTEND_BELOW_FRACTION = 0.5;

/** Requests of retention reads and writes in flight at once. */
const IN_FLIGHT = 8;

const isUnlocked = (key: string): boolean => key.startsWith(UNLOCKED_PREFIX);
/** Objects under the prefix whose names are not storage keys are another program's (a stray README): never touched. */
const isStray = (key: string): boolean => keyProblem(key) !== undefined;

/** The S3 retention mode of a config's lock. */
export function s3Mode(lock: ObjectLockConfig): 'COMPLIANCE' | 'GOVERNANCE' {
  return lock.mode === 'compliance' ? 'COMPLIANCE' : 'GOVERNANCE';
}

/**
 * Makes every later put of `storage` carry the config's lock (but leases'). A config with a lock on a
 * store that cannot honour it (a folder) is refused: writing there unlocked would break its promise.
 */
export function applyObjectLock(storage: Storage, config: RepositoryConfig): S3Storage | undefined {
  const lock = config.objectLock;
  const backend = s3BackendOf(storage);
  if (!lock) return backend;
  if (!backend) throw new InvalidArgumentError(`repository ${storage.properties.location} names an S3 Object Lock, but it is not on S3`);
  backend.setObjectLock({ mode: s3Mode(lock), retentionMs: lock.retentionMs, exempt: isUnlocked });
  return backend;
}

/**
 * `init --object-lock` (SPEC.md 20.5): the bucket is created with Object Lock enabled (which enables
 * versioning) when it does not exist; an existing one must have both, else nothing is written.
 */
export async function prepareLockedBucket(backend: S3Storage, signal?: AbortSignal): Promise<'created' | 'checked'> {
  const where = backend.properties.location;
  let state: { objectLock: boolean; versioning: string | undefined };
  try {
    state = await backend.bucketProtection({ signal });
  } catch (error) {
    if (!isStorageError(error, 'no-bucket') && !(isStorageError(error, 'not-found') && error.storage.backendCode === 'NoSuchBucket')) throw error;
    await backend.createBucket({ objectLock: true, signal });
    state = await backend.bucketProtection({ signal });
    if (!state.objectLock || state.versioning !== 'Enabled') throw refusedBucket(where, state, 'was created with Object Lock but reports');
    return 'created';
  }
  if (!state.objectLock || state.versioning !== 'Enabled') throw refusedBucket(where, state, 'exists and has');
  return 'checked';
}

function refusedBucket(where: string, state: { objectLock: boolean; versioning: string | undefined }, what: string): StorageError {
  return new StorageError(
    'refused',
    `${where}: --object-lock needs a bucket with Object Lock and versioning enabled; the bucket ${what} Object Lock ${state.objectLock ? 'enabled' : 'not enabled'} and versioning ${state.versioning ?? 'never enabled'}: Object Lock can only be enabled when a bucket is created, so give a new bucket name (init creates it) or one created with Object Lock`,
    { location: where, operation: 'init' },
  );
}

/** Runs `work` over the items with at most IN_FLIGHT at once. */
async function eachLimited<T>(items: AsyncIterable<T> | Iterable<T>, work: (item: T) => Promise<void>): Promise<void> {
  const running = new Set<Promise<void>>();
  let failure: unknown;
  for await (const item of items) {
    if (failure !== undefined) break;
    const task: Promise<void> = work(item).catch((error: unknown) => {
      failure ??= error;
    });
    running.add(task);
    void task.finally(() => running.delete(task));
    if (running.size >= IN_FLIGHT) await Promise.race(running);
  }
  await Promise.all(running);
  if (failure !== undefined) throw failure;
}

export interface ExpiredLock {
  key: string;
  /** The lock's date (ISO), or null when the object carries none. */
  until: string | null;
}

export interface LockReport {
  /** Kept objects whose lock gc pushed to now + R. */
  extended: number;
  /** Kept objects whose lock had run out (or that carried none): OBJECT_LOCK_EXPIRED; gc locks them again. */
  expired: ExpiredLock[];
  /** Noncurrent versions and delete markers removed for good (their lock, if any, had expired). */
  purged: number;
  /** Noncurrent versions still locked: kept, and the latest date among them. */
  locked: { versions: number; until: string | null };
}

/**
 * The kept (current) objects whose lock has run out, each checked by its retention only when the lower
 * bound (its write + R, by the store's clock, minus the skew bound) does not already prove it locked.
 * `extendTo`: gc's pass, which also extends every lock with less than R/2 left (and the expired ones).
 */
async function currentLocks(storage: Storage, backend: S3Storage, lock: ObjectLockConfig, options: { now: number; skewMs: number; extend: boolean; signal?: AbortSignal | undefined }): Promise<{ extended: number; expired: ExpiredLock[] }> {
  const margin = lock.retentionMs * EXTEND_BELOW_FRACTION;
  const expired: ExpiredLock[] = [];
  let extended = 0;
  const mode = s3Mode(lock);
  await eachLimited(storage.list('', { signal: options.signal }), async (object) => {
    if (isUnlocked(object.key) || isStray(object.key)) return;
    const lowerBound = object.modified === undefined ? Number.NEGATIVE_INFINITY : object.modified + lock.retentionMs - options.skewMs;
    const needed = options.extend ? options.now + margin : options.now;
    if (lowerBound > needed) return;
    let retention: { mode: string; until: number } | undefined;
    try {
      retention = await backend.retention(object.key, { signal: options.signal });
    } catch (error) {
      if (isStorageError(error, 'not-found')) return; // deleted meanwhile
      throw error;
    }
    const until = retention?.until;
    if (until === undefined || until <= options.now) expired.push({ key: object.key, until: until === undefined ? null : new Date(until).toISOString() });
    if (options.extend && (until === undefined || until < options.now + margin)) {
      await backend.setRetention(object.key, mode, options.now + lock.retentionMs, { signal: options.signal });
      extended++;
    }
  });
  expired.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
  return { extended, expired };
}

/** The end of the lock of `key`'s current version (ms), or undefined when it has none or is gone; S3 only. */
export async function lockedUntil(storage: Storage, key: string, signal?: AbortSignal): Promise<number | undefined> {
  const backend = s3BackendOf(storage);
  if (!backend) return undefined;
  try {
    return (await backend.retention(key, { signal }))?.until;
  } catch (error) {
    if (isStorageError(error, 'not-found')) return undefined;
    throw error;
  }
}

/** verify (SPEC.md 20.5): the kept objects whose lock ran out, OBJECT_LOCK_EXPIRED each; nothing is written. */
export async function expiredLocks(storage: Storage, config: RepositoryConfig, signal?: AbortSignal): Promise<ExpiredLock[]> {
  const backend = s3BackendOf(storage);
  if (!config.objectLock || !backend) return [];
  const skewMs = config.leases?.skewBoundMs ?? 0;
  return (await currentLocks(storage, backend, config.objectLock, { now: Date.now(), skewMs, extend: false, signal })).expired;
}

/**
 * gc, under its exclusive lease, after its plan (SPEC.md 20.5): extend the locks of what it kept, report
 * those that had run out, then remove for good the noncurrent versions and delete markers whose lock has
 * expired (a version still locked is never sent a delete: it is counted as kept, with its date). A
 * version the store still refuses to delete (a lock longer than it looked, GOVERNANCE without bypass) is
 * kept too.
 */
export async function maintainLocks(storage: Storage, config: RepositoryConfig, options: { signal?: AbortSignal | undefined; assertHeld: () => void }): Promise<LockReport | undefined> {
  const backend = s3BackendOf(storage);
  const lock = config.objectLock;
  if (!lock || !backend) return undefined;
  const skewMs = config.leases?.skewBoundMs ?? 0;
  const now = Date.now();
  options.assertHeld();
  const { extended, expired } = await currentLocks(storage, backend, lock, { now, skewMs, extend: true, signal: options.signal });
  const report: LockReport = { extended, expired, purged: 0, locked: { versions: 0, until: null } };
  let latestLocked = 0;
  const keepLocked = (until: number): void => {
    report.locked.versions++;
    latestLocked = Math.max(latestLocked, until);
  };
  // The versions of one key at a time (the listing gives them by key, newest first).
  let group: ObjectVersion[] = [];
  const purgeGroup = async (versions: ObjectVersion[]): Promise<void> => {
    if (versions.length === 0) return;
    const latest = versions[0]!;
    let objectsLeft = latest.deleteMarker ? 0 : 1;
    const removals: ObjectVersion[] = [];
    for (const version of versions.slice(1)) {
      if (version.deleteMarker) {
        removals.push(version); // a noncurrent marker hides nothing
        continue;
      }
      const lowerBound = version.modified === undefined || isUnlocked(version.key) ? Number.NEGATIVE_INFINITY : version.modified + lock.retentionMs - skewMs;
      if (lowerBound > now) {
        keepLocked(lowerBound);
        objectsLeft++;
        continue;
      }
      const retention = isUnlocked(version.key) ? undefined : await backend.retention(version.key, { versionId: version.versionId, signal: options.signal }).catch((error: unknown) => {
        if (isStorageError(error, 'not-found')) return undefined;
        throw error;
      });
      if (retention && retention.until > now) {
        keepLocked(retention.until);
        objectsLeft++;
        continue;
      }
      removals.push(version);
    }
    for (const version of removals) {
      options.assertHeld();
      try {
        await backend.delete(version.key, { versionId: version.versionId, signal: options.signal });
        report.purged++;
      } catch (error) {
        if (!isStorageError(error, 'denied')) throw error;
        keepLocked(now);
        if (!version.deleteMarker) objectsLeft++;
      }
    }
    // A delete marker that is the latest hides the key: it goes only once no version is left behind it.
    if (latest.deleteMarker && objectsLeft === 0) {
      options.assertHeld();
      await backend.delete(latest.key, { versionId: latest.versionId, signal: options.signal });
      report.purged++;
    }
  };
  for await (const version of backend.listVersions('', { signal: options.signal })) {
    if (isStray(version.key)) continue;
    if (group.length > 0 && group[0]!.key !== version.key) {
      await purgeGroup(group);
      group = [];
    }
    group.push(version);
  }
  await purgeGroup(group);
  report.locked.until = latestLocked > 0 ? new Date(latestLocked).toISOString() : null;
  return report;
}
