/**
 * Which segments count, and which entry a blob resolves to when several segments name it (SPEC.md 19.3).
 *
 * - A segment is *superseded* when another segment present in the store lists it in its `supersedes`
 *   (gc's consolidation): from the moment the superseding segment is durable, the superseded one counts for
 *   nothing, whether or not it has been deleted yet. This makes gc's switch to new pack locations one
 *   atomic step (the put of the consolidated segment).
 * - The *effective* segments are the present ones that are not superseded.
 * - Several effective segments may name one blob (two writers stored the same new chunk at once, or a crash
 *   left a copy): the entry of the segment whose key sorts first (UTF-8 bytes, the listing order) wins. The
 *   others are duplicates: dead bytes gc reclaims. Every entry is a durable frame (invariant 1'), so any
 *   choice would read right; the rule only makes every reader choose the same.
 */
import { compareKeys } from '../storage/storage.js';
import { segmentKey, type Segment, type SegmentEntry, type SegmentName } from './segment.js';

/** The keys of present segments that a present segment supersedes. */
export function supersededKeys(present: Iterable<{ key: string; supersedes: readonly SegmentName[] }>): Set<string> {
  const all = [...present];
  const presentKeys = new Set(all.map((segment) => segment.key));
  const superseded = new Set<string>();
  for (const segment of all) {
    for (const old of segment.supersedes) {
      const key = segmentKey(old);
      if (presentKeys.has(key)) superseded.add(key);
    }
  }
  return superseded;
}

/** True when the entry of segment `a` wins over the entry of segment `b` for the same blob. */
export function segmentWins(a: string, b: string): boolean {
  return compareKeys(a, b) < 0;
}

export interface ResolvedEntry {
  entry: SegmentEntry;
  /** The segment the entry was taken from. */
  segment: string;
}

/**
 * The index the effective segments among `segments` make: blob id (hex) → the winning entry. For gc's plan
 * and for tests; the per-host cache (cache.ts) applies the same rules in LevelDB, segment by segment.
 */
export function resolveIndex(segments: readonly Segment[]): Map<string, ResolvedEntry> {
  const keyed = segments.map((segment) => ({ key: segmentKey(segment.name), supersedes: segment.supersedes, segment }));
  const superseded = supersededKeys(keyed);
  const index = new Map<string, ResolvedEntry>();
  for (const { key, segment } of keyed) {
    if (superseded.has(key)) continue;
    for (const entry of segment.entries) {
      const id = entry.id.toString('hex');
      const current = index.get(id);
      if (!current || segmentWins(key, current.segment)) index.set(id, { entry, segment: key });
    }
  }
  return index;
}
