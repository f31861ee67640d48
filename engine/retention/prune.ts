/**
 * `engine prune`: removes the backups the retention policy (retention.ts) does not keep. It removes only
 * backup records (and their catalogue entries): every backup's map is complete, so removing one never
 * breaks another's restore; the chunks no backup references any more are reclaimed by `engine gc`.
 * Damaged records are never removed (their group cannot be known) and are reported.
 */
import { Repository } from '../../repo-format/repository.js';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { listProtected } from '../../repo-format/protection.js';
import { crashPoint } from '../../repo-format/crash-points.js';
import { Interruption } from '../host/interrupt.js';
import { applyRetention, KEEP_RULES, policyIsEmpty, type RetentionPolicy } from './policy.js';
import type { Passphrase } from '../../repo-format/passphrase.js';

export interface PruneOptions {
  repo: string;
  /** The passphrase of an encrypted repository. */
  passphrase?: Passphrase | undefined;
  policy: RetentionPolicy;
  dryRun?: boolean | undefined;
  /** Only the backups of these names (a policy's VMs): the others are neither kept nor removed, nor listed. */
  names?: readonly string[] | undefined;
  /** SIGINT/SIGTERM: prune stops between two removals (ENGINE_INTERRUPTED), saying which it removed. */
  signal?: AbortSignal | undefined;
}

export interface PrunedBackup {
  id: string;
  name: string;
  startTime: string;
  keep: boolean;
  reasons: string[];
}

export interface PruneReport {
  dryRun: boolean;
  policy: RetentionPolicy;
  /** Every backup, grouped by name, each group newest first. */
  backups: PrunedBackup[];
  kept: number;
  removed: number;
  damaged: { id: string; message: string }[];
  /**
   * S3 Object Lock only (SPEC.md 20.5): the removed backups' records are hidden (a delete marker), never
   * deleted while locked; each stays a version of the bucket, readable with --as-of, until this date, and
   * gc removes it after.
   */
  locked?: { id: string; until: string | null }[];
}

export async function prune(options: PruneOptions): Promise<PruneReport> {
  for (const rule of KEEP_RULES) {
    const n = options.policy[rule];
    if (n !== undefined && (!Number.isInteger(n) || n < 0)) throw new InvalidArgumentError(`retention rule ${rule} ${n}: give a whole number of 0 or more`, { rule });
  }
  if (policyIsEmpty(options.policy)) {
    throw new InvalidArgumentError('the retention policy has no rule: prune would remove every unprotected backup; say what to keep');
  }
  const removed: string[] = [];
  const interruption = new Interruption(options.signal, 'prune', () =>
    removed.length === 0 ? 'nothing was removed' : `it removed ${removed.length} backups (${removed.join(', ')}) and no other; prune again finishes`,
  );
  interruption.check();
  const repo = await Repository.open(options.repo, { access: 'exclusive', command: 'prune', passphrase: options.passphrase, checkInterrupted: () => interruption.check(), manyWriters: true, signal: options.signal });
  try {
    const listed = await repo.listBackups();
    const names = options.names === undefined ? undefined : new Set(options.names);
    const backups = names === undefined ? listed.backups : listed.backups.filter((b) => names.has(b.name));
    const { damaged } = listed;
    const decisions = applyRetention(backups, options.policy, await listProtected(repo.store));
    const report: PruneReport = {
      dryRun: options.dryRun === true,
      policy: options.policy,
      backups: decisions.map(({ backup, keep, reasons }) => ({ id: backup.id, name: backup.name, startTime: backup.startTime, keep, reasons })),
      kept: decisions.filter((d) => d.keep).length,
      removed: decisions.filter((d) => !d.keep).length,
      damaged: damaged.map(({ id, error }) => ({ id, message: error.message })),
    };
    if (!report.dryRun) {
      // One record at a time, each removal atomic: a crash leaves some removed, the rest intact, and
      // running prune again finishes the job.
      for (const decision of decisions.filter((d) => !d.keep)) {
        await interruption.tick();
        if (repo.config.objectLock) {
          const until = await repo.recordLockedUntil(decision.backup.id, options.signal);
          (report.locked ??= []).push({ id: decision.backup.id, until: until === undefined ? null : new Date(until).toISOString() });
        }
        await repo.removeBackup(decision.backup.id);
        removed.push(decision.backup.id);
        crashPoint('prune-record-removed');
      }
    }
    return report;
  } finally {
    await repo.close();
  }
}
