/**
 * gc's plan (SPEC.md 10.2, phase 1): which packs go, and why. Each named pack is classified from how many
 * of its index entries are live: *dead* (none), *to rewrite* (live frame bytes under the threshold of its
 * size less its header), or kept; a pack no index entry names is *unindexed* (garbage of a crash or an
 * earlier gc). The classification is pure; the two passes over the index that feed it keep memory to a
 * few numbers per pack, plus the entries of the packs that go (never those of the packs gc keeps).
 */
import type { IndexEntry } from '../../repo-format/index-entry.js';
import { PACK_HEADER_SIZE } from '../../repo-format/constants.js';

/** A pack gc deletes or rewrites, with its index entries as phase 1 saw them. */
export interface PackPlan {
  packId: string;
  size: number;
  live: IndexEntry[];
  dead: IndexEntry[];
}

/** What phase 1 (mark) hands to phase 2 (copy) and phase 3 (commit). */
export interface GcPlan {
  /** The records marked in phase 1: phase 3 marks only those committed since. */
  marked: ReadonlySet<string>;
  /** Referenced blobs with no indexed copy, only a quarantine record (hex ids); phase 3 adds to it. */
  damagedReferenced: Set<string>;
  /** Packs with no live blob: deleted. */
  dead: PackPlan[];
  /** Packs whose live bytes are under the threshold: their live frames are copied, then they are deleted. */
  rewrite: PackPlan[];
  /** Packs no index entry names: deleted. */
  unindexed: PackPlan[];
}

/** How many of a pack's index entries are live, and their bytes. */
export interface PackTally {
  live: number;
  liveBytes: number;
}

export type PackFate = 'dead' | 'rewrite' | 'kept' | 'unindexed';

/** What becomes of a pack of `size` bytes with `tally` (undefined: no index entry names it). */
export function packFate(tally: PackTally | undefined, size: number, rewriteBelow: number): PackFate {
  if (!tally) return 'unindexed';
  if (tally.live === 0) return 'dead';
  if (tally.liveBytes < rewriteBelow * (size - PACK_HEADER_SIZE)) return 'rewrite';
  return 'kept';
}

export interface PackClasses {
  dead: PackPlan[];
  rewrite: PackPlan[];
  unindexed: PackPlan[];
  /** Live index entries over every indexed pack, kept ones included. */
  liveChunks: number;
}

/** Sorts the packs into dead, to rewrite and unindexed (the kept ones are in none); entries come later (collectEntries). */
export function classifyPacks(packs: Iterable<{ packId: string; size: number }>, tallies: ReadonlyMap<string, PackTally>, rewriteBelow: number): PackClasses {
  const classes: PackClasses = { dead: [], rewrite: [], unindexed: [], liveChunks: 0 };
  for (const { packId, size } of packs) {
    const tally = tallies.get(packId);
    classes.liveChunks += tally?.live ?? 0;
    const fate = packFate(tally, size, rewriteBelow);
    if (fate !== 'kept') classes[fate].push({ packId, size, live: [], dead: [] });
  }
  return classes;
}

/** Something that says whether a blob is live (the mark set). */
export interface LiveSet {
  has(id: Buffer): boolean;
}

/** First pass over the index: per pack, its live entries and bytes. */
export async function tallyPacks(entries: AsyncIterable<IndexEntry>, live: LiveSet, tick: () => Promise<void>): Promise<Map<string, PackTally>> {
  const tallies = new Map<string, PackTally>();
  for await (const entry of entries) {
    await tick();
    let tally = tallies.get(entry.packId);
    if (!tally) tallies.set(entry.packId, (tally = { live: 0, liveBytes: 0 }));
    if (live.has(entry.id)) {
      tally.live += 1;
      tally.liveBytes += entry.length;
    }
  }
  return tallies;
}

/** Second pass over the index: the live and dead entries of the packs that go (dead and to rewrite). */
export async function collectEntries(entries: AsyncIterable<IndexEntry>, live: LiveSet, going: readonly PackPlan[], tick: () => Promise<void>): Promise<void> {
  if (going.length === 0) return;
  const byPack = new Map(going.map((plan) => [plan.packId, plan]));
  for await (const entry of entries) {
    await tick();
    const plan = byPack.get(entry.packId);
    if (plan) (live.has(entry.id) ? plan.live : plan.dead).push(entry);
  }
}

const sum = <T>(items: readonly T[], of: (item: T) => number): number => items.reduce((total, item) => total + of(item), 0);

/** The bytes of the live frames of a pack: what rewriting it writes. */
export function liveBytesOf(plan: PackPlan): number {
  return sum(plan.live, (entry) => entry.length);
}

/** What carrying out the whole plan would change (a dry run's report). */
export function planTotals(plan: Pick<GcPlan, 'dead' | 'rewrite' | 'unindexed'>): {
  deleted: string[];
  rewritten: string[];
  chunksRemoved: number;
  chunksMoved: number;
  bytesDeleted: number;
  bytesWritten: number;
} {
  const going = [...plan.dead, ...plan.rewrite, ...plan.unindexed];
  return {
    deleted: going.map((p) => p.packId),
    rewritten: plan.rewrite.map((p) => p.packId),
    chunksRemoved: sum([...plan.dead, ...plan.rewrite], (p) => p.dead.length),
    chunksMoved: sum(plan.rewrite, (p) => p.live.length),
    bytesDeleted: sum(going, (p) => p.size),
    bytesWritten: sum(plan.rewrite, liveBytesOf),
  };
}
