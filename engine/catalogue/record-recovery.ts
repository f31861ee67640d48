/**
 * Damaged backup records and their catalogue copies (SPEC.md, sections 7 and 12.8). The index mirrors
 * every record file byte for byte in its catalogue, and an exclusive open only adds entries for records it
 * lacks, never overwrites one: so when a record file is damaged later (a bad sector, a stray write), the
 * catalogue usually still holds the bytes the backup wrote. `repair` puts them back; gc marks from them;
 * verify and forget say so.
 */
import type { Repository } from '../../repo-format/repository.js';
import type { IndexStore } from '../../repo-format/index-store.js';
import type { BackupRecord } from '../../repo-format/backup-record.js';

/** The good catalogue copy of record `id` in `index` (default: the repository's open index), or undefined. */
export async function catalogueCopyOf(repo: Repository, id: string, index: IndexStore = repo.index): Promise<{ record: BackupRecord; bytes: Buffer } | undefined> {
  const bytes = await index.getBackup(id).catch(() => undefined);
  if (!bytes) return undefined;
  try {
    return { record: repo.decodeRecord(bytes, id, `catalogue copy of backup record ${id}`), bytes };
  } catch {
    return undefined;
  }
}

export interface RestoredRecord {
  backup: string;
  /** Why the file was damaged. */
  was: string;
}

/**
 * Puts back, from the catalogue copies in `index`, every damaged record file whose copy is good: the same
 * bytes the backup wrote, written durably over the damaged file (temp, fsync, rename, fsync of backups/).
 * The only time a record file is written twice: with what it held. Under the lock.
 */
export async function restoreRecordsFromCatalogue(repo: Repository, index: IndexStore): Promise<RestoredRecord[]> {
  const restored: RestoredRecord[] = [];
  const { damaged } = await repo.listBackups();
  for (const { id, error } of damaged) {
    const copy = await catalogueCopyOf(repo, id, index);
    if (!copy) continue;
    await repo.rewriteRecord(id, copy.bytes);
    const why = (error as { details?: { why?: unknown } }).details?.why;
    restored.push({ backup: id, was: typeof why === 'string' ? why : error.message });
  }
  return restored;
}
