/**
 * `engine gc`: reclaims the space of chunks and map pages no backup references, without trusting clocks
 * and without blocking backups for its long part. Three phases (SPEC.md, "Garbage collection"), each in
 * its module, with the plan (plan.ts) and the copies (copy.ts, GcCopies) handed from one to the next:
 *
 * 1. Mark (lock held; mark.ts): every page and chunk of every backup is marked live; refuses to go on if a
 *    record is damaged or a referenced blob is missing from the index (it could not tell what is live).
 *    Every indexed pack is classified: dead (no live blob), to rewrite (live bytes under the threshold),
 *    kept. gc registers in writers/ and releases the lock.
 * 2. Copy (no lock; copy.ts): live frames of the packs to rewrite are read, checked and copied byte for
 *    byte into new packs under tmp/<token>.*, made durable there. Nothing visible changes; backups run
 *    meanwhile.
 * 3. Commit (lock held again; commit.ts): backups committed since phase 1 are marked too (they may have
 *    deduplicated against blobs phase 1 found dead: those are still where they were, since nothing was
 *    deleted); a dead pack or pack to rewrite holding a blob live now is left alone. New packs are renamed
 *    into packs/, then one index batch moves the copied entries and removes the dead ones, each only if the
 *    entry still names the place phase 1 saw (compare-and-swap: a repair in between wins). Only then
 *    are packs that no index entry names deleted, unless a reader is registered: their deletion is then
 *    deferred to a later gc (they stay as unindexed packs, which any later gc deletes). Last, markers that
 *    name what no longer exists are removed: quarantine records of packs that are gone (except those of
 *    blobs a backup still references with no good copy), protection markers and boot-test records of backups
 *    that are gone.
 */
import { Repository } from '../../repo-format/repository.js';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import type { RepositoryKeys } from '../../repo-format/crypto.js';
import type { StoreHandle } from '../../repo-format/pack-file.js';
import { crashPoint } from '../../repo-format/crash-points.js';
import { registerWriter } from '../../repo-format/writers.js';
import type { Registered } from '../../repo-format/registry.js';
import { GC_DEFAULT_REWRITE_BELOW } from '../../repo-format/constants.js';
import type { Passphrase } from '../../repo-format/passphrase.js';
import { Interruption } from '../host/interrupt.js';
import { markAndPlan } from './mark.js';
import { planTotals, type GcPlan } from './plan.js';
import { copyLiveFrames, type GcCopies } from './copy.js';
import { commitChanges, staleMarkers } from './commit.js';
import { emptyGcReport, type GcReport } from './report.js';
import { gcVersion3 } from './v3.js';

export type { GcReport } from './report.js';

export interface GcOptions {
  repo: string;
  /** The passphrase of an encrypted repository. */
  passphrase?: Passphrase | undefined;
  /** Rewrite packs whose live share of bytes is under this fraction (0 … 1); default 0.5. */
  rewriteBelow?: number | undefined;
  /** Plan only: report what would be deleted and rewritten, change nothing. */
  dryRun?: boolean | undefined;
  /**
   * SIGINT/SIGTERM: gc stops within a second (ENGINE_INTERRUPTED) while it marks, copies or waits for the
   * lock, having changed nothing visible (its copies under tmp/ are removed, its registration released).
   * Once its index batch is written it finishes deleting what the batch unnamed (fast) before it stops.
   */
  signal?: AbortSignal | undefined;
  onNotice?: ((message: string) => void) | undefined;
}

export async function gc(options: GcOptions): Promise<GcReport> {
  const rewriteBelow = options.rewriteBelow ?? GC_DEFAULT_REWRITE_BELOW;
  if (!(rewriteBelow >= 0 && rewriteBelow <= 1)) throw new InvalidArgumentError(`rewrite threshold ${rewriteBelow}: give a fraction from 0 to 1 (0%–100%)`);
  const notice = options.onNotice ?? (() => undefined);
  const report = emptyGcReport(options.dryRun === true, rewriteBelow);
  const interruption = new Interruption(options.signal, 'gc', () => 'nothing visible changed: the packs it had copied under tmp/ were removed');
  interruption.check();
  // Format version 3 (every s3:// repository): leases and segments (SPEC.md 19.8).
  if (await Repository.isVersion3(options.repo)) {
    return gcVersion3({ repo: options.repo, passphrase: options.passphrase, rewriteBelow, dryRun: options.dryRun === true, signal: options.signal, notice, interruption, report });
  }

  // Phase 1, mark: what is live, and the plan (under the lock).
  const marked = await markPhase(options, rewriteBelow, report, notice, interruption);
  if (!marked.writer || !marked.store) return report; // a dry run: the plan is the report
  const { plan, writer, keys } = marked;
  const store = marked.store;
  let copies: GcCopies | undefined;
  try {
    crashPoint('gc-marked');
    // Phase 2, copy: the live frames of the packs to rewrite, into new packs under tmp/ (no lock).
    copies = await copyLiveFrames(plan.rewrite, { store, keys, token: writer.registration.token, notice, interruption }, report);
    crashPoint('gc-copied');
    // Phase 3, commit: publish, one index batch, deletions, stale markers (under the lock again).
    await commitChanges(plan, copies, { repo: options.repo, passphrase: options.passphrase, notice, interruption }, report);
    return report;
  } finally {
    // New packs phase 3 did not publish (all of them if it failed) are dropped.
    for (const pack of copies?.packs ?? []) await pack.abort().catch(() => undefined);
    await store.close().catch(() => undefined);
    await writer.release();
  }
}

/**
 * Phase 1 under the lock: temp files of dead writers removed, every backup marked, every pack classified.
 * gc then registers in writers/ (before the lock is let go, so that no other gc starts and no lock holder
 * clears its tmp files) and releases the lock. A dry run reports the plan instead and registers nothing.
 */
async function markPhase(
  options: GcOptions,
  rewriteBelow: number,
  report: GcReport,
  notice: (message: string) => void,
  interruption: Interruption,
): Promise<{ plan: GcPlan; writer: Registered | undefined; keys: RepositoryKeys | undefined; store: StoreHandle | undefined }> {
  const repo = await Repository.open(options.repo, { access: 'exclusive', command: 'gc', passphrase: options.passphrase, checkInterrupted: () => interruption.check() });
  try {
    await repo.removeTempFiles();
    const plan = await markAndPlan(repo, rewriteBelow, report, notice, interruption);
    if (report.dryRun) {
      await reportPlan(repo, plan, report);
      return { plan, writer: undefined, keys: repo.keys, store: undefined };
    }
    const writer = await repo.withSpaceReserve(() => registerWriter(repo.root, 'gc'));
    // The store goes on being read and written between the two holds of the lock (phase 2).
    return { plan, writer, keys: repo.keys, store: repo.detachedStore() };
  } finally {
    await repo.close();
  }
}

/** A dry run's report: what carrying out the plan would change. */
async function reportPlan(repo: Repository, plan: GcPlan, report: GcReport): Promise<void> {
  const totals = planTotals(plan);
  report.packs.deleted = totals.deleted;
  report.packs.rewritten = totals.rewritten;
  report.chunks.removed = totals.chunksRemoved;
  report.chunks.moved = totals.chunksMoved;
  report.bytes.deleted = totals.bytesDeleted;
  report.bytes.written = totals.bytesWritten;
  report.bytes.reclaimed = totals.bytesDeleted - totals.bytesWritten;
  const going = new Set(totals.deleted);
  report.markers = await staleMarkers(repo, plan.damagedReferenced, (packId) => !going.has(packId));
}

