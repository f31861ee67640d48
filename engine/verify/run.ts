/** What the phases of one verify run share: the repository, the report, and what is known damaged so far. */
import type { Repository } from '../../repo-format/repository.js';
import type { QuarantinedFrame } from '../../repo-format/quarantine.js';
import type { Interruption } from '../host/interrupt.js';
import { emptyVerifyReport, type VerifyProblem, type VerifyReport } from './report.js';

/** Problems kept in the report; the count past it is not (the summaries of missing packs always are). */
const PROBLEM_LIMIT = 1000;

export type VerifyProgress = (progress: { phase: string; done: number; total: number }) => void;

export class VerifyRun {
  readonly report: VerifyReport;
  /**
   * Blob (hex) → the damage that makes every chunk reference to it damaged: the pack, data and index checks
   * fill it, the backup check names the backups, disks and offsets that use each.
   */
  readonly damagedBlobs = new Map<string, VerifyProblem>();

  constructor(
    readonly repo: Repository,
    readonly interruption: Interruption,
    /** Frames repair set aside (quarantineKey → frame): known damage, not a problem in itself. */
    readonly quarantine: ReadonlyMap<string, QuarantinedFrame>,
    readData: boolean,
    readonly onProgress: VerifyProgress | undefined,
  ) {
    this.report = emptyVerifyReport(readData);
    this.report.quarantined = [...quarantine.values()];
  }

  problem(found: VerifyProblem): void {
    if (this.report.problems.length < PROBLEM_LIMIT) this.report.problems.push(found);
  }

  /** A problem that makes every chunk reference to `found.blob` damaged too. */
  blobDamaged(found: VerifyProblem & { blob: string }): void {
    this.damagedBlobs.set(found.blob, found);
    this.problem(found);
  }
}
