/**
 * Restores one disk of a backup, or every disk of it into a directory. Each backup's map is complete, so a
 * restore reads exactly one map per disk, whatever the backup's type. In phases:
 *
 *   check the request (no repository yet) → plan the targets (target-plan.ts: a TargetPlan) → per disk:
 *   open the target → choose the blocks (all, a compare, or a rollback through a bitmap) → write them
 *   (restore-disk.ts) → finish (flush) → report.
 *
 * An interruption or failure discards the target being written (a new file or image is removed) and says
 * what it left; a directory this restore created and left empty goes with it.
 */
import { Repository } from '../../repo-format/repository.js';
import type { BackupRecord } from '../../repo-format/backup-record.js';
import { InvalidArgumentError, LeaseLostError } from '../../repo-format/errors.js';
import { checkLocalPath } from '../../repo-format/local-path.js';
import type { Passphrase } from '../../repo-format/passphrase.js';
import { jobPool, type BlockPool, type PoolLender } from '../pipeline/block-pool.js';
import type { BlockSet } from '../common/block-set.js';
import type { Range } from '../pipeline/map-cursors.js';
import { InterruptedError } from '../errors.js';
import { Interruption } from '../host/interrupt.js';
import { FileTarget } from './file-target.js';
import { refuseDeviceWithData } from './target-in-use.js';
import { restorePointSignature } from './restore-point-signature.js';
import { planRollback } from './rollback-plan.js';
import { checkExisting, checkPolicies, createDirectory, gatherFacts, guardTargets, planTargets, removeCreatedDirectory, type CreatedDirectory, type PlannedTarget, type TargetPlan } from './target-plan.js';
import { restoreDisk, WrittenSpan, type RestoredDisk, type RestoreProgress } from './restore-disk.js';
import { isLocalTarget, type RestoreTarget, type RollbackPolicy, type WritePolicy } from './request.js';
import type { TargetWriter } from './target-writer.js';

export type { RestoreTarget, RollbackPolicy, WritePolicy } from './request.js';
export type { TargetWriter } from './target-writer.js';
export { restoreDisk, WrittenSpan, type RestoredDisk, type RestoreProgress, type RestoreDiskOptions } from './restore-disk.js';

export interface RestoreOptions {
  repo: string;
  /** The passphrase of an encrypted repository. */
  passphrase?: Passphrase | undefined;
  /** Read the S3 repository as it was at this time (ms since the epoch; SPEC.md 20.5): read-only, no lease. */
  asOf?: number | undefined;
  backupId: string;
  /** The disk to restore; omitted: the backup's only disk, or every disk into a directory target. */
  disk?: string | undefined;
  /** Where the disks go. */
  target: RestoreTarget;
  /** Roll an existing target back (write only what differs) instead of overwriting it whole. */
  rollback?: RollbackPolicy | undefined;
  /** What may be overwritten (default: nothing that holds data). */
  write?: WritePolicy | undefined;
  workers?: number | undefined;
  /** The server's shared worker pool (shared-pool.ts): the restore runs on a lease of it, not a pool of its own. */
  sharedPool?: PoolLender | undefined;
  signal?: AbortSignal | undefined;
  onProgress?: ((progress: RestoreProgress) => void) | undefined;
}

export interface RestoreResult {
  backup: BackupRecord;
  disks: RestoredDisk[];
  /** The directory this restore created for the disks (a new directory target), or null. */
  createdDirectory: string | null;
}

/** What a restore run shares between its phases. */
interface RestoreRun {
  repo: Repository;
  pool: BlockPool;
  record: BackupRecord;
  plan: TargetPlan;
  options: RestoreOptions;
  interruption: Interruption;
  /** The disks restored completely so far. */
  done: RestoredDisk[];
  created: CreatedDirectory | null;
}

export async function restore(options: RestoreOptions): Promise<RestoreResult> {
  checkRequest(options);
  const state: { done: RestoredDisk[]; created: CreatedDirectory | null } = { done: [], created: null };
  const interruption = new Interruption(options.signal, 'restore', () => interruptedState(state.done, state.created));
  interruption.check();
  // A read-only (or full, reserve-less) repository is restored from without the lock (SPEC.md, 12.6).
  const repo = await Repository.open(options.repo, { access: 'exclusive', command: 'restore', passphrase: options.passphrase, readWithoutLock: true, checkInterrupted: () => interruption.check(), manyWriters: true, signal: options.signal, asOf: options.asOf });
  let pool: BlockPool | undefined;
  let succeeded = false;
  try {
    const record = await repo.findBackup(options.backupId);
    const plan = await planRestore(repo, record, options);
    state.created = await createDirectory(plan);
    // Only blocks that are not zero go through the workers, unless a rollback compares the target's.
    const workBytes = plan.targets.reduce((sum, { disk }) => sum + (plan.write.kind === 'all' ? (disk.stats.blocksTotal - disk.stats.blocksZero) * record.blockSize : disk.size), 0);
    pool = await jobPool(options.sharedPool, { blockSize: record.blockSize, workers: options.workers, keys: repo.keys, workBytes, signal: options.signal });
    const run: RestoreRun = { repo, pool, record, plan, options, interruption, done: state.done, created: state.created };
    for (const planned of plan.targets) run.done.push(await restoreTarget(run, planned));
    succeeded = true;
    return { backup: record, disks: run.done, createdDirectory: state.created?.path ?? null };
  } finally {
    // A directory this run created and left empty goes with it.
    if (!succeeded && state.created) await removeCreatedDirectory(state.created);
    await pool?.close().catch(() => undefined);
    await repo.close();
  }
}

/** Before the repository is opened: a URL is never taken for a relative path; a rollback the target cannot take. */
function checkRequest(options: RestoreOptions): void {
  const target = options.target;
  checkPolicies(target, options.rollback);
  if (isLocalTarget(target) || target.kind === 'qcow2') checkLocalPath(target.path, `${target.kind === 'qcow2' ? 'qcow2' : 'restore'} target`);
}

/** Plans where each disk goes (target-plan.ts); local paths are checked before anything is written. */
async function planRestore(repo: Repository, record: BackupRecord, options: RestoreOptions): Promise<TargetPlan> {
  const request = { target: options.target, disk: options.disk, rollback: options.rollback, force: options.write?.force === true };
  const plan = planTargets(record, request, await gatherFacts(record, options.target));
  await guardTargets(plan, record, options.target, repo.root);
  checkExisting(plan);
  return plan;
}

/** An opened target, and for a rollback through a bitmap, the bitmap it exports (if it does). */
interface OpenedTarget {
  writer: TargetWriter;
  bitmap?: { exported: boolean; dirty: () => AsyncIterable<Range> } | undefined;
}

/** Which blocks to write: all, those a compare finds different, or `only`. */
interface BlockChoice {
  compare: boolean;
  only?: BlockSet | undefined;
  rollback?: RestoredDisk['rollback'];
}

/** One disk: open → choose the blocks → write them → finish; a failure discards the target, saying what it left. */
async function restoreTarget(run: RestoreRun, planned: PlannedTarget): Promise<RestoredDisk> {
  run.interruption.check();
  const opened = await openTarget(run, planned);
  const written = new WrittenSpan();
  try {
    const blocks = await chooseBlocks(run, planned, opened);
    const { signal, onProgress } = run.options;
    const restored = await restoreDisk(run.repo, run.pool, run.record, planned.disk, opened.writer, { signal, onProgress, compare: blocks.compare, only: blocks.only, written });
    if (blocks.rollback) restored.rollback = blocks.rollback;
    // A target that can abandon its requests waits on a server for its flush too (NBD): a signal stops that
    // wait, and the target is said to be partially written (its writes are not known to be stable). A local
    // target's finish is left to end: discard() must not run beside it.
    await (opened.writer.abandon ? run.interruption.race(opened.writer.finish()) : opened.writer.finish());
    return restored;
  } catch (error) {
    await opened.writer.discard();
    // A lost lease ends the restore as an interruption does (19.9), and says what it left of the target.
    if (error instanceof LeaseLostError) throw error.withConsequence(`restore stopped, since a gc may now delete the packs it reads: ${interruptedState(run.done, run.created, { planned, writer: opened.writer, written })}`);
    if (!(error instanceof InterruptedError)) throw error;
    throw run.interruption.error(interruptedState(run.done, run.created, { planned, writer: opened.writer, written }));
  }
}

/** The NBD and qcow2 targets are loaded when used: their modules (node:net, node:tls, qemu-nbd) cost ~30 ms of CPU a restore to a file need not pay. */
async function openTarget(run: RestoreRun, planned: PlannedTarget): Promise<OpenedTarget> {
  const { opening, disk } = planned;
  switch (opening.kind) {
    case 'local':
      return { writer: await FileTarget.open(opening.path, disk.size, { assumeZeroed: opening.blank, checkDevice: deviceCheck(run, planned) }) };
    case 'qcow2':
      return { writer: await (await import('./qcow2-target.js')).Qcow2Target.create(opening.path, disk.size) };
    case 'custom':
      return { writer: await opening.open(disk) };
    case 'nbd': {
      const write = run.plan.write;
      const context = write.kind === 'bitmap' ? `qemu:dirty-bitmap:${write.bitmap}` : undefined;
      const [{ NbdTarget }, { STATE_DIRTY }] = await Promise.all([import('./nbd-target.js'), import('../nbd/protocol.js')]);
      const target = await NbdTarget.open(opening.uri, disk.size, { metaContexts: context ? [context] : [] });
      return { writer: target, bitmap: context === undefined ? undefined : { exported: target.hasContext(context), dirty: () => target.flaggedRanges(context, STATE_DIRTY, disk.size) } };
    }
  }
}

/**
 * What a block device target must pass once held exclusively: no filesystem, partition table or volume
 * signature unless forced, or, for a rollback, the same disk as the restore point (same filesystem or
 * partition-table UUID: an older state of this disk, which is what a rollback is for). A blank device (the
 * caller just created it) is exempt.
 */
function deviceCheck(run: RestoreRun, planned: PlannedTarget): ((path: string) => Promise<void>) | undefined {
  if (run.plan.force || (planned.opening.kind === 'local' && planned.opening.blank)) return undefined;
  const rollback = run.plan.write.kind !== 'all';
  return (path) => refuseDeviceWithData(path, rollback ? () => restorePointSignature(run.repo, planned.disk) : undefined);
}

async function chooseBlocks(run: RestoreRun, planned: PlannedTarget, opened: OpenedTarget): Promise<BlockChoice> {
  const write = run.plan.write;
  if (write.kind === 'all') return { compare: false };
  if (!opened.writer.read) throw new InvalidArgumentError(`a rollback compares the target with the restore point, and target ${opened.writer.path} cannot be read back`);
  if (write.kind === 'compare') return { compare: true };
  if (!opened.bitmap?.exported) throw new InvalidArgumentError(`${opened.writer.path} exports no dirty bitmap ${write.bitmap} (qemu-nbd -B ${write.bitmap})`);
  const plan = await planRollback(run.repo, planned.disk, write.bitmap, opened.bitmap.dirty(), run.interruption);
  return { compare: false, only: plan.write, rollback: { bitmap: write.bitmap, baseBackup: plan.base.id, blocksDirty: plan.blocksDirty, blocksChangedSinceBase: plan.blocksChangedSinceBase } };
}

/**
 * What an interrupted restore left: of the target it was writing (if any), and of the disks before it.
 * A created directory left empty is removed with the failure (restore's finally).
 */
function interruptedState(done: readonly RestoredDisk[], created: CreatedDirectory | null, writing?: { planned: PlannedTarget; writer: TargetWriter; written: WrittenSpan }): string {
  const parts: string[] = [];
  if (writing) {
    const { planned, writer, written } = writing;
    if (writer.created) parts.push(`the new ${planned.opening.kind === 'qcow2' ? 'image' : 'file'} ${writer.path} it was writing was removed`);
    else if (written.empty) parts.push(`target ${writer.path} was not written`);
    else parts.push(`target ${writer.path} was partially written: bytes ${written.low} to ${written.high - 1} (of ${planned.disk.size}) may differ from both its old content and the backup; the rest of it is unchanged`);
  }
  for (const disk of done) parts.push(`disk ${disk.name} was restored completely to ${disk.path}`);
  if (created && done.length === 0) parts.push(`the directory ${created.path} it created was removed`);
  return parts.length > 0 ? parts.join('; ') : 'nothing was written';
}
