/**
 * gc's commit in format version 3 (SPEC.md 19.8), as a typed plan decided before any change, and the one
 * function that carries out a step. The engine wiring (mark and copy under a shared lease, this commit
 * under the exclusive one) comes with the engine's v3 repository.
 *
 * Order, and why each step may be cut short by a crash:
 * 1. *entry segments*: the consolidated index, one entry per live blob (at its copy when gc moved it,
 *    else where the effective segments put it), superseding nothing. Until step 2 they only duplicate what
 *    the effective segments already say, at places that exist (copies are durable before the plan).
 * 2. *switch segments*: supersede the old segments (at most SEGMENT_MAX_SUPERSEDED each). When a switch is
 *    durable, the old segments it names count for nothing (segment-set.ts): the change of index is that
 *    one put. Each switch is independent, since step 1 already holds every live entry.
 * 3. old segments deleted: they count for nothing already.
 * 4. packs deleted: only those no entry of the new index names — dead packs, rewritten ones, packs holding
 *    only duplicates, and packs no segment ever named (a crashed writer's) once they are older, by the
 *    store's clock, than `minUnnamedAgeMs` (T + 2B: a writer that paused past its lease and woke up cannot
 *    name them later, since it stops first).
 * The executor checks the exclusive lease before every step (HeldLease.assertHeld).
 *
 * Refusal (invariant 8, as in v1/v2): a live blob that no segment names and gc did not copy stops the plan
 * before any step.
 */
import type { Storage } from '../storage/storage.js';
import { packKey } from '../store.js';
import { compareKeys } from '../storage/storage.js';
import { encodeSegment, segmentKey, SEGMENT_MAX_ENTRIES, SEGMENT_MAX_SUPERSEDED, type Segment, type SegmentEntry, type SegmentName } from './segment.js';
import type { GcIndex, LiveBlob } from './gc-index.js';

export type PackDeletion = 'no-live-blob' | 'unnamed';

export type GcStep =
  | { kind: 'write-entries'; segment: Segment }
  | { kind: 'write-switch'; segment: Segment }
  | { kind: 'delete-segment'; key: string }
  | { kind: 'delete-pack'; packId: string; why: PackDeletion };

/**
 * Entries per segment gc writes: one segment is built in memory at a time, so this bounds gc's memory
 * whatever the number of live blobs (the format allows up to SEGMENT_MAX_ENTRIES).
 */
export const GC_SEGMENT_ENTRIES = 65536;
/** Live blobs named by no segment that a refusal lists (it counts them all). */
const UNNAMED_LISTED = 100;

export interface GcCommitInput {
  /**
   * gc's working index: every segment present in the store read (superseded ones included), the live
   * blobs marked from every record present under the exclusive lease, and gc's copies (hex id → the copy's
   * location in a new, durable pack).
   */
  index: GcIndex;
  /** Every pack in the store, with its modification time by the store's clock when known. */
  packs: readonly { packId: string; modified?: number | undefined }[];
  /** gc's writer id (32 hex) for its segments, and the first sequence number to use. */
  writer: string;
  firstSeq: number;
  /** The store's clock now, and the age under which a pack no segment names is left alone. */
  storeNow: number;
  minUnnamedAgeMs: number;
  /** Entries and superseded names per segment: GC_SEGMENT_ENTRIES and the format's limit unless smaller (tests of the split). */
  limits?: { entries: number; superseded: number } | undefined;
}

export type GcCommitPlan =
  | {
      refused: false;
      /** The steps in order, made as they are taken: an entry segment is read from the index when its turn comes. */
      steps: () => AsyncGenerator<GcStep>;
      /** How many steps there are. */
      stepCount: number;
      /** Entries of the new index (one per live blob), and the packs they name. */
      entries: number;
      namedNow: ReadonlySet<string>;
      kept: { packId: string; why: 'too-young' | 'age-unknown' }[];
    }
  | { refused: true; unnamedLive: string[]; unnamedCount: number };

function chunks<T>(items: readonly T[], size: number): T[][] {
  const out: T[][] = [];
  for (let i = 0; i < items.length; i += size) out.push(items.slice(i, i + size));
  return out;
}

/** The entry of the new index for a live blob: at gc's copy when it made one, else where the effective segments put it. */
function newEntryOf(blob: LiveBlob): SegmentEntry | undefined {
  const location = blob.moved ?? blob.winner;
  return location && { ...location, id: blob.id };
}

/**
 * Decides the commit before any change (one pass over the live blobs: the refusal, how many entries the
 * new index has and which packs it names, then the packs to delete); the entry segments themselves are
 * read from the index in id order when `steps` reaches them, so memory holds one segment's entries.
 */
export async function planGcCommit(input: GcCommitInput): Promise<GcCommitPlan> {
  const { index } = input;
  const unnamedLive: string[] = [];
  let unnamedCount = 0;
  let entries = 0;
  const namedNow = new Set<string>();
  for await (const blob of index.live()) {
    const entry = newEntryOf(blob);
    if (!entry) {
      unnamedCount += 1;
      if (unnamedLive.length < UNNAMED_LISTED) unnamedLive.push(blob.id.toString('hex'));
      continue;
    }
    entries += 1;
    namedNow.add(entry.packId);
  }
  if (unnamedCount > 0) return { refused: true, unnamedLive, unnamedCount };

  const entryLimit = Math.min(input.limits?.entries ?? GC_SEGMENT_ENTRIES, SEGMENT_MAX_ENTRIES);
  const old = index.segmentNames();
  const switchParts = chunks(old, Math.min(input.limits?.superseded ?? SEGMENT_MAX_SUPERSEDED, SEGMENT_MAX_SUPERSEDED));
  const entryParts = Math.ceil(entries / entryLimit);
  // The usual case: one segment both holds the new index and supersedes the old ones.
  const single = entryParts <= 1 && switchParts.length <= 1;

  const deletions: GcStep[] = [];
  const kept: { packId: string; why: 'too-young' | 'age-unknown' }[] = [];
  for (const pack of [...input.packs].sort((a, b) => compareKeys(a.packId, b.packId))) {
    if (namedNow.has(pack.packId)) continue;
    if (index.namedPacks.has(pack.packId)) {
      deletions.push({ kind: 'delete-pack', packId: pack.packId, why: 'no-live-blob' });
      continue;
    }
    if (pack.modified === undefined) kept.push({ packId: pack.packId, why: 'age-unknown' });
    else if (input.storeNow - pack.modified < input.minUnnamedAgeMs) kept.push({ packId: pack.packId, why: 'too-young' });
    else deletions.push({ kind: 'delete-pack', packId: pack.packId, why: 'unnamed' });
  }

  async function* steps(): AsyncGenerator<GcStep> {
    let seq = input.firstSeq;
    const next = (): SegmentName => ({ writer: input.writer, seq: seq++ });
    let part: SegmentEntry[] = [];
    for await (const blob of index.live()) {
      part.push(newEntryOf(blob)!);
      if (part.length === entryLimit && !single) {
        yield { kind: 'write-entries', segment: { name: next(), supersedes: [], entries: part } };
        part = [];
      }
    }
    if (single) {
      yield { kind: 'write-switch', segment: { name: next(), supersedes: switchParts[0] ?? [], entries: part } };
    } else {
      if (part.length > 0) yield { kind: 'write-entries', segment: { name: next(), supersedes: [], entries: part } };
      for (const names of switchParts) yield { kind: 'write-switch', segment: { name: next(), supersedes: names, entries: [] } };
    }
    for (const name of old) yield { kind: 'delete-segment', key: segmentKey(name) };
    yield* deletions;
  }
  const stepCount = (single ? 1 : entryParts + switchParts.length) + old.length + deletions.length;
  return { refused: false, steps, stepCount, entries, namedNow, kept };
}


export interface StepContext {
  storage: Storage;
  /** Encrypted repositories seal segments. */
  dataKey?: Uint8Array | undefined;
  /** Throws unless the exclusive lease is still held (HeldLease.assertHeld). */
  assertHeld: () => void;
  signal?: AbortSignal | undefined;
}

/** Carries out one step, after checking the lease. Segments are created only if absent. */
export async function applyGcStep(step: GcStep, context: StepContext): Promise<void> {
  context.assertHeld();
  const { storage, signal } = context;
  switch (step.kind) {
    case 'write-entries':
    case 'write-switch': {
      const key = segmentKey(step.segment.name);
      await storage.put(key, encodeSegment(step.segment, { dataKey: context.dataKey }), { ifAbsent: true, signal });
      try {
        // As a backup's segment (segment-writer.ts, SPEC.md 19.6): a put that landed after the lease lapsed
        // (this process paused between its check and the request) could name copies a later gc deleted as
        // unnamed, or supersede segments another gc wrote: take it back.
        context.assertHeld();
      } catch (error) {
        await storage.delete(key).catch(() => undefined);
        throw error;
      }
      return;
    }
    case 'delete-segment':
      await storage.delete(step.key, { signal });
      return;
    case 'delete-pack':
      await storage.delete(packKey(step.packId), { signal });
      return;
  }
}
