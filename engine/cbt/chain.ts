/**
 * The chain logic shared by every changed-block-tracking source (offline qcow2 images, libvirt domains):
 * decide what can be done for a disk and why not more, audit the base before trusting it, and compute the
 * CBT state the backup records. Only the check of the base itself (a qcow2 bitmap, a libvirt checkpoint)
 * differs between sources.
 */
import { mapRootOf, type Consistency, type BackupRecord, type RecordAttachment, type BackupType, type DiskCbt, type DiskRecord } from '../../repo-format/backup-record.js';
import type { LoadPage } from '../../repo-format/block-map.js';
import type { BlockSource } from '../sources/source.js';
import type { IncrementalPlan } from '../pipeline/backup-disk.js';
import type { Range } from '../pipeline/map-cursors.js';
import { auditCleanBlocks } from './audit.js';
import { readMap, runChunks, type MapRoot } from '../../repo-format/block-map.js';
import { mergeRanges } from '../pipeline/map-cursors.js';
import { blockOffset } from '../../repo-format/disk-geometry.js';

export type RequestedMode = 'full' | 'incremental' | 'differential' | 'auto';

/** What a changed-block-tracking flow needs to decide the chains of its disks. */
export interface ChainArgs {
  backupId: string;
  requested: RequestedMode;
  /** Backups of this VM (same name), newest first. */
  history: BackupRecord[];
  repositoryId: string;
  loadPage: LoadPage;
  blockSize: number;
  /** The repository's block id (SHA-256, or HMAC-SHA256 when encrypted): the audit compares ids. */
  blockId: (data: Uint8Array) => Buffer;
  /** Whether each chunk can be trusted without reading it: indexed, its pack there (Repository.available). */
  available: (ids: readonly Buffer[]) => Promise<boolean[]>;
  /** Says what the user should know (e.g. a disk name from outside that was mapped to a safe one). */
  onNotice?: ((message: string) => void) | undefined;
}

/** The changed-block-tracking bookkeeping around some disks (one qcow2 image, one libvirt or oVirt job). */
export interface CbtSession {
  /** How consistent the disks are at the session's point in time (a libvirt job's quiesce); absent: the backup does not know. */
  consistency?: Consistency | undefined;
  /** Documents the session keeps with the backup (a libvirt domain's definition), after the caller's. */
  attachments?: RecordAttachment[] | undefined;
  release(): Promise<void>;
  finish(): Promise<void>;
  rollback(): Promise<void>;
}

/** A disk ready to be read: its source, and how (whole, or against a parent), and its CBT state. */
export interface CbtDiskJob {
  name: string;
  source: BlockSource;
  plan: IncrementalPlan | undefined;
  mode: BackupType;
  modeReason: string | null;
  parent: string | null;
  /** Null when the source keeps no changed-block tracking state for this disk. */
  cbt: DiskCbt | null;
  /**
   * At most how many bytes the read hands the block workers: an incremental's, the blocks its dirty and unavailable
   * ranges touch; undefined: the whole source. A small one runs on the main thread, no worker started (block-pool.ts).
   */
  workBytes?: number | undefined;
}

/**
 * A disk whose source is opened only when its turn comes: its chain is settled (and its source opened)
 * right before it is read, not when the backup starts. An oVirt image transfer is such a source: oVirt
 * cancels one that sits idle longer than its inactivity timeout while other disks are read.
 */
export interface DeferredCbtDiskJob {
  name: string;
  prepare(): Promise<CbtDiskJob>;
}

/** What a changed-block-tracking provider hands the backup: its session and its disks, in order. */
export type CbtProvision = CbtSession & { disks: (CbtDiskJob | DeferredCbtDiskJob)[] };

export interface Chain {
  mode: BackupType;
  /** Why a full read although more was asked; null otherwise. */
  reason: string | null;
  /** The checkpoint to read dirty blocks against; null for a full read. */
  base: string | null;
  parent: { record: BackupRecord; disk: DiskRecord } | null;
  previous: DiskRecord | null;
}

export interface ChainFacts {
  /** The disk's size now. */
  size: number;
  /** Why this base cannot be trusted (missing, inconsistent, …), or null. */
  baseProblem(base: string, previous: DiskCbt): string | null;
  /** Said after "no earlier backup of this disk…" when the VM has older backups (a disk added since). */
  addedDisk?: boolean;
  /**
   * Which disks of earlier backups are this disk (default: a disk of the same name). An offline image
   * knows better: the disks whose checkpoint bitmap it holds (image-disk.ts).
   */
  isThisDisk?: (disk: DiskRecord) => boolean;
  /** Why no earlier disk is this one, when the caller can say more than that there is none (the full read's reason). */
  whyNoPrevious?: () => string | undefined;
}

/** The reason of a disk's first backup: expected, so not announced as a surprise (backup.ts). */
export const NO_EARLIER_BACKUP = 'no earlier backup of this disk with changed-block tracking';

/** Decides what can be done for disk `name`. `history` holds the backups of this VM, newest first. */
export function chooseChain(name: string, requested: RequestedMode, facts: ChainFacts, history: BackupRecord[]): Chain {
  const full = (reason: string | null): Chain => ({ mode: 'full', reason, base: null, parent: null, previous: null });
  if (requested === 'full') return full(null);
  const isThisDisk = facts.isThisDisk ?? ((d: DiskRecord) => d.name === name);
  const previousRecord = history.find((r) => r.disks.some((d) => isThisDisk(d) && d.cbt !== null));
  const previous = previousRecord?.disks.find((d) => isThisDisk(d) && d.cbt !== null) ?? null;
  if (!previousRecord || !previous?.cbt) {
    const why = facts.whyNoPrevious?.();
    if (why) return full(why);
    return full(`${NO_EARLIER_BACKUP}${facts.addedDisk && history.length > 0 ? ' (a disk added since the last backup)' : ''}`);
  }
  const wanted: BackupType = requested === 'differential' ? 'differential' : 'incremental';
  const base = wanted === 'differential' ? previous.cbt.chainCheckpoint : previous.cbt.checkpoint;
  const parentId = wanted === 'differential' ? previous.cbt.chainFull : previousRecord.id;
  if (facts.size !== previous.size) return full(`the disk size changed from ${previous.size} to ${facts.size} bytes`);
  const problem = facts.baseProblem(base, previous.cbt);
  if (problem) return full(problem);
  const parentRecord = history.find((r) => r.id === parentId);
  const parentDisk = parentRecord?.disks.find(isThisDisk);
  if (!parentRecord || !parentDisk) return full(`parent backup ${parentId} of this disk is no longer in the repository`);
  if (parentDisk.size !== facts.size) return full(`the disk size changed since parent backup ${parentId}`);
  return { mode: wanted, reason: null, base, parent: { record: parentRecord, disk: parentDisk }, previous };
}

export interface SettledChain {
  chain: Chain;
  cbt: DiskCbt;
  plan: IncrementalPlan | undefined;
  /** The bytes of the blocks the plan reads (CbtDiskJob.workBytes); undefined for a full read, or not counted. */
  workBytes: number | undefined;
}

/**
 * Runs the CBT audit on an incremental or differential chain (a mismatch turns it into a full read, said),
 * then computes the CBT state and the incremental plan.
 */
export async function settleChain(args: {
  chain: Chain;
  source: BlockSource;
  dirty: () => AsyncIterable<Range>;
  what: string;
  checkpoint: string;
  backupId: string;
  granularity: number;
  loadPage: LoadPage;
  blockSize: number;
  blockId: (data: Uint8Array) => Buffer;
  available: ChainArgs['available'];
  /**
   * Whether to count the plan's work (SettledChain.workBytes) before the read: where the pool is sized from it
   * (image and libvirt disks, opened before the pool starts), not where a disk is prepared later (oVirt's), for
   * which the extra pass over its dirty extents would be one more request for nothing.
   */
  countWork?: boolean;
}): Promise<SettledChain> {
  let chain = args.chain;
  let audited = 0;
  let unavailable: Range[] = [];
  if (chain.parent) {
    // The clean blocks take the parent's entries unread: only entries whose chunk is still there. A chunk
    // in a lost or cut pack is read again from the source (and stored again); a map that cannot be read
    // at all makes the disk a full read.
    try {
      unavailable = await unavailableRanges(mapRootOf(chain.parent.disk), args.loadPage, args.available, args.blockSize);
    } catch (error) {
      chain = { ...chain, mode: 'full', reason: `the map of parent backup ${chain.parent.record.id} cannot be read (${(error as Error).message})`, base: null, parent: null };
    }
  }
  if (chain.parent && chain.base) {
    const audit = await auditCleanBlocks({ source: args.source, parent: mapRootOf(chain.parent.disk), loadPage: args.loadPage, dirty: args.dirty(), blockSize: args.blockSize, blockId: args.blockId });
    audited = audit.audited;
    if (audit.mismatch) {
      const reason = `CBT audit: the block at offset ${audit.mismatch.offset} differs from parent backup ${chain.parent.record.id} although ${args.what} ${chain.base} calls it clean`;
      chain = { ...chain, mode: 'full', reason, base: null, parent: null };
      audited = 0;
    }
  }
  const previous = chain.mode === 'full' ? undefined : chain.previous?.cbt;
  // One more pass over the dirty extents (block status: a few requests for a few changes) so that the pool knows
  // the job's size before it starts workers: a 1% incremental of a 1 GiB disk is a small job, not a 1 GiB one.
  const workBytes = chain.parent && args.countWork ? await touchedBytes(mergeRanges(args.dirty(), unavailable), args.blockSize) : undefined;
  return {
    workBytes,
    chain,
    cbt: {
      checkpoint: args.checkpoint,
      base: chain.base,
      chainFull: previous ? previous.chainFull : args.backupId,
      chainCheckpoint: previous ? previous.chainCheckpoint : args.checkpoint,
      granularity: args.granularity,
      audited,
    },
    plan: chain.parent ? { parent: mapRootOf(chain.parent.disk), dirty: mergeRanges(args.dirty(), unavailable) } : undefined,
  };
}

/** The bytes of the blocks that `ranges` (in order, not overlapping) touch, each block counted once, whole. */
export async function touchedBytes(ranges: AsyncIterable<Range>, blockSize: number): Promise<number> {
  let bytes = 0;
  let counted = 0; // the end of the blocks counted so far
  for await (const range of ranges) {
    if (range.length <= 0) continue;
    const first = Math.max(Math.floor(range.offset / blockSize) * blockSize, counted);
    const end = Math.ceil((range.offset + range.length) / blockSize) * blockSize;
    if (end > first) {
      bytes += end - first;
      counted = end;
    }
  }
  return bytes;
}

/**
 * The blocks of a map whose chunk is not available (not indexed, or its pack missing or cut short), as
 * byte ranges in block order, consecutive blocks merged. One batched lookup per leaf; the ranges are few
 * (a lost pack holds a few dozen chunks), so they are collected before the backup reads anything.
 */
export async function unavailableRanges(map: MapRoot, loadPage: LoadPage, available: ChainArgs['available'], blockSize: number): Promise<Range[]> {
  const ranges: Range[] = [];
  for await (const run of readMap(map, loadPage)) {
    if (run.entries === null) continue;
    const { ids, blocks } = runChunks(run);
    const answers = await available(ids);
    answers.forEach((ok, i) => {
      if (ok) return;
      const offset = blockOffset(blocks[i]!, blockSize);
      const last = ranges[ranges.length - 1];
      if (last && last.offset + last.length === offset) last.length += blockSize;
      else ranges.push({ offset, length: blockSize });
    });
  }
  return ranges;
}