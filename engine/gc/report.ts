/** What `engine gc` reports (SPEC.md 14.2, `gc --json`); each phase fills its part. */

export interface GcReport {
  dryRun: boolean;
  rewriteBelow: number;
  backups: number;
  /** Backups committed while gc copied (marked in phase 3). */
  backupsCommittedDuringGc: string[];
  packs: {
    before: number;
    deleted: string[];
    rewritten: string[];
    created: string[];
    /** Packs planned for deletion or rewriting but left in place, with why. */
    kept: { pack: string; why: string }[];
    /** Packs no index entry names any more, not deleted because a reader is registered. */
    deferred: string[];
  };
  chunks: { live: number; removed: number; moved: number };
  bytes: { before: number; deleted: number; written: number; reclaimed: number };
  readers: number;
  /**
   * Markers that name nothing any more, removed (dry run: that would be): quarantine records
   * (`<pack>-<offset>`) of packs that no longer exist, but for blobs a backup still references with no good
   * copy; protection markers of backups whose record is gone; verification records (boot tests) of backups
   * that are gone, by key.
   */
  markers: { quarantine: string[]; protected: string[]; verifications: string[] };
  /** Format version 3 only: index segments present before the commit, written by gc, deleted (superseded). */
  segments?: { before: number; written: number; deleted: number };
  /**
   * Format version 3 only (not in a dry run): what writers killed mid-put left where no listing shows it,
   * removed (a folder's temporary files, S3's incomplete multipart uploads; SPEC.md 19.8, 2.5).
   */
  abandoned?: number;
  /**
   * S3 repositories with Object Lock only (not in a dry run; SPEC.md 20.5): locks of kept objects extended,
   * kept objects whose lock had run out (OBJECT_LOCK_EXPIRED, locked again), noncurrent versions and delete
   * markers removed for good, and noncurrent versions still locked (kept, with the latest date).
   */
  objectLock?: {
    extended: number;
    expired: { code: string; key: string; until: string | null }[];
    purged: number;
    locked: { versions: number; until: string | null };
  };
}

export function emptyGcReport(dryRun: boolean, rewriteBelow: number): GcReport {
  return {
    dryRun,
    rewriteBelow,
    backups: 0,
    backupsCommittedDuringGc: [],
    packs: { before: 0, deleted: [], rewritten: [], created: [], kept: [], deferred: [] },
    chunks: { live: 0, removed: 0, moved: 0 },
    bytes: { before: 0, deleted: 0, written: 0, reclaimed: 0 },
    readers: 0,
    markers: { quarantine: [], protected: [], verifications: [] },
  };
}

