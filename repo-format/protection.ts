/**
 * Protection of backups against prune. Records are immutable, so protection lives outside them: an empty
 * object `protected/<backup id>` (created durably, removed by unprotect). Prune never removes a backup that
 * has one. A marker whose backup is gone (a record deleted by hand) means nothing; gc removes it.
 */
import type { Storage } from './storage/storage.js';
import { isStorageError } from './storage/storage-error.js';
import { PROTECTED_PREFIX, storeAt } from './store.js';

const MARKER = /^protected\/([0-9a-f]{32})$/;

function markerKey(backupId: string): string {
  return `${PROTECTED_PREFIX}${backupId}`;
}

export async function listProtected(where: Storage | string): Promise<Set<string>> {
  const store = storeAt(where);
  const ids = new Set<string>();
  for await (const { key } of store.list(PROTECTED_PREFIX)) {
    const id = MARKER.exec(key)?.[1];
    if (id) ids.add(id);
  }
  return ids;
}

/** Returns false when the backup was already protected. */
export async function protectBackup(where: Storage | string, backupId: string): Promise<boolean> {
  const store = storeAt(where);
  try {
    await store.put(markerKey(backupId), new Uint8Array(0), { ifAbsent: true });
    return true;
  } catch (error) {
    if (isStorageError(error, 'exists')) return false;
    throw error;
  }
}

/** Returns false when the backup was not protected. */
export async function unprotectBackup(where: Storage | string, backupId: string): Promise<boolean> {
  const store = storeAt(where);
  const present = await store.stat(markerKey(backupId)).then(
    () => true,
    (error: unknown) => {
      if (isStorageError(error, 'not-found')) return false;
      throw error;
    },
  );
  if (!present) return false;
  await store.delete(markerKey(backupId));
  return true;
}

/** Removes the markers of backups whose record no longer exists; returns their ids. */
export async function removeOrphanedMarkers(where: Storage | string, existingBackups: ReadonlySet<string>): Promise<string[]> {
  const store = storeAt(where);
  const removed: string[] = [];
  for (const id of await orphanedMarkers(store, existingBackups)) {
    await store.delete(markerKey(id)).catch(() => undefined);
    removed.push(id);
  }
  return removed;
}

export async function orphanedMarkers(where: Storage | string, existingBackups: ReadonlySet<string>): Promise<string[]> {
  const store = storeAt(where);
  return [...(await listProtected(store))].filter((id) => !existingBackups.has(id)).sort();
}
