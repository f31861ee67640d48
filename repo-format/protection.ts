/**
 * Protection of backups against prune. Records are immutable, so protection lives outside them: an empty
 * file `protected/<backup id>` (created durably, removed by unprotect). Prune never removes a backup that
 * has one. A marker whose backup is gone (a record deleted by hand) means nothing; gc removes it.
 */
import { readdir, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { LAYOUT } from './constants.js';
import { fsyncDirectory, writeFileDurably } from './durable-file.js';
import { isErrnoException } from './errors.js';
import { ensurePrivateDirectory } from './file-modes.js';

function markerPath(root: string, backupId: string): string {
  return join(root, LAYOUT.protected, backupId);
}

export async function listProtected(root: string): Promise<Set<string>> {
  const names = await readdir(join(root, LAYOUT.protected)).catch(() => [] as string[]);
  return new Set(names.filter((name) => /^[0-9a-f]{32}$/.test(name)));
}

/** Returns false when the backup was already protected. */
export async function protectBackup(root: string, backupId: string): Promise<boolean> {
  // Repositories made before protection existed have no protected/ yet.
  await ensurePrivateDirectory(join(root, LAYOUT.protected));
  try {
    await writeFileDurably(markerPath(root, backupId), new Uint8Array(0), { exclusive: true, tempDir: join(root, LAYOUT.tmp) });
    return true;
  } catch (error) {
    if (isErrnoException(error) && error.code === 'EEXIST') return false;
    throw error;
  }
}

/** Returns false when the backup was not protected. */
export async function unprotectBackup(root: string, backupId: string): Promise<boolean> {
  try {
    await unlink(markerPath(root, backupId));
  } catch (error) {
    if (isErrnoException(error) && error.code === 'ENOENT') return false;
    throw error;
  }
  await fsyncDirectory(join(root, LAYOUT.protected));
  return true;
}

/** Removes the markers of backups whose record file no longer exists; returns their ids. */
export async function removeOrphanedMarkers(root: string, existingBackups: ReadonlySet<string>): Promise<string[]> {
  const removed: string[] = [];
  for (const id of await orphanedMarkers(root, existingBackups)) {
    await unlink(markerPath(root, id)).catch(() => undefined);
    removed.push(id);
  }
  if (removed.length > 0) await fsyncDirectory(join(root, LAYOUT.protected));
  return removed;
}

export async function orphanedMarkers(root: string, existingBackups: ReadonlySet<string>): Promise<string[]> {
  return [...(await listProtected(root))].filter((id) => !existingBackups.has(id)).sort();
}
