/** What `engine verify` reports (SPEC.md 14.2, `verify --json`); each phase fills its part. */
import type { QuarantinedFrame } from '../../repo-format/quarantine.js';

export interface VerifyProblem {
  code: string;
  message: string;
  backup?: string;
  disk?: string;
  offset?: number;
  pack?: string;
  packOffset?: number;
  blob?: string;
  /** The object concerned (an index segment's key), relative to the repository root. */
  path?: string;
}

export interface VerifyWarning {
  code: string;
  message: string;
  /** The file concerned, relative to the repository root. */
  path?: string;
}

export interface VerifyReport {
  ok: boolean;
  readData: boolean;
  backups: number;
  /** Verification records (boot tests, SPEC.md 9.2) read and checked. */
  verifications: number;
  packs: number;
  blobs: number;
  bytesChecked: number;
  problems: VerifyProblem[];
  /** With --subset: the share of packs whose data was read, the seed that chose them, how many. */
  subset: { percent: number; seed: string; packs: number } | null;
  /** Frames repair found damaged and set aside: known damage, not problems in themselves. */
  quarantined: QuarantinedFrame[];
  garbage: { tempFiles: string[]; unindexedPacks: string[]; unindexedBytes: number; unreferencedBlobs: number; unreferencedBytes: number };
  /**
   * Files and directories other users may read, write or enter (SPEC.md, 2.1), counted with examples; a
   * warning (PERMISSIONS_LOOSE in `warnings`), not a problem: repositories made before modes were set are like this.
   */
  permissions: { loose: number; examples: { path: string; mode: string }[] };
  /** What is not a problem for any backup but deserves a look: files that are not the repository's (SPEC 14.2). */
  warnings: VerifyWarning[];
}

export function emptyVerifyReport(readData: boolean): VerifyReport {
  return {
    ok: true,
    readData,
    backups: 0,
    verifications: 0,
    packs: 0,
    blobs: 0,
    bytesChecked: 0,
    problems: [],
    subset: null,
    quarantined: [],
    garbage: { tempFiles: [], unindexedPacks: [], unindexedBytes: 0, unreferencedBlobs: 0, unreferencedBytes: 0 },
    permissions: { loose: 0, examples: [] },
    warnings: [],
  };
}
