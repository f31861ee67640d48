/** What `engine repair` reports (SPEC.md 14.2, `repair --json`); each phase fills its part. */
import type { QuarantinedFrame } from '../../repo-format/quarantine.js';
import type { RecoveredConfig } from '../../repo-format/config-recovery.js';
import type { ObjectLockConfig } from '../../repo-format/config.js';
import type { RestoredRecord } from '../catalogue/record-recovery.js';

export interface DamagedReference {
  code: 'CHUNK_DAMAGED' | 'CHUNK_MISSING' | 'MAP_DAMAGED' | 'RECORD_DAMAGED';
  message: string;
  backup: string;
  disk?: string;
  offset?: number;
  blob?: string;
}

export interface RebuiltConfig {
  /** Why the old config could not be used: missing, or what is wrong with it. */
  why: string;
  id: string;
  blockSize: number;
  version: number;
  encrypted: boolean;
  /** Where each value came from (SPEC.md, section 3.2). */
  sources: RecoveredConfig['sources'];
  /** The Object Lock of the rebuilt config (version 3 on S3, SPEC.md 20.5), null when it has none. */
  objectLock: ObjectLockConfig | null;
  /** The damaged config, kept beside the new one, or null when there was none. */
  keptAs: string | null;
}

export interface RepairReport {
  /** What the old index was: readable (and replaced all the same), unreadable, or missing. */
  previousIndex: 'readable' | 'unreadable' | 'missing';
  index: { packs: number; blobs: number };
  framesChecked: number;
  bytesChecked: number;
  /** Frames set aside by this run (earlier ones stay in quarantine/ and are not repeated). */
  quarantined: QuarantinedFrame[];
  tempFilesRemoved: number;
  /** The config, when it was lost or damaged and rebuilt from the rest (config-recovery.ts); null otherwise. */
  configRebuilt: RebuiltConfig | null;
  /** Damaged record files put back from the index catalogue's good copies (record-recovery.ts). */
  recordsRestored: RestoredRecord[];
  /** What still cannot be restored, per backup, disk and offset: nothing when `ok`. */
  damaged: DamagedReference[];
  ok: boolean;
}

export function emptyRepairReport(configRebuilt: RebuiltConfig | null): RepairReport {
  return {
    previousIndex: 'missing',
    index: { packs: 0, blobs: 0 },
    framesChecked: 0,
    bytesChecked: 0,
    quarantined: [],
    tempFilesRemoved: 0,
    configRebuilt,
    recordsRestored: [],
    damaged: [],
    ok: true,
  };
}
