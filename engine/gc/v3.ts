/**
 * `engine gc` on format version 3 (SPEC.md 19.8): the same report as versions 1 and 2, through the store and
 * leases instead of the lock and LevelDB.
 *
 * 1. Mark and copy, under a shared lease with command `gc` (one gc at a time): every page and chunk of every
 *    record is marked live; every segment is read and resolved (19.3: the first segment by key wins, the
 *    other entries of a blob are duplicates); each pack is classified from its winning live entries: dead
 *    (named, none live), to rewrite (live bytes under the threshold), kept, or named by no segment (a
 *    crashed or running writer's: deleted only once older than T + 2B by the store's clock). The live
 *    frames of the packs to rewrite are copied byte for byte into new packs, uploaded (durable) but named
 *    by no segment: nothing visible changes, backups run meanwhile.
 * 2. Commit, under the exclusive lease (the shared one let go first; waiting for every running backup,
 *    restore, verify … to finish): the cache caught up, the records committed since 1 marked, segments and
 *    packs listed again, then the plan (repo-format/v3/gc-plan.ts) decided and carried out step by step,
 *    the lease checked before each: gc's segment naming every live blob and superseding every segment
 *    present (the switch: the index changes in that one put), the superseded segments deleted, then every
 *    pack no entry of the new index names. Last, markers that name nothing.
 *
 * A crash anywhere leaves a repository every command opens and every committed backup restores from
 * (19.8's crash table); the next gc finishes the work. SIGINT/SIGTERM stops it between steps, releasing
 * its lease: before the switch nothing visible changed (its copies, named by nothing, are deleted); after
 * it the steps left are garbage for the next gc.
 */
import { randomBytes } from 'node:crypto';
import { Repository } from '../../repo-format/repository.js';
import { CorruptMetadataError, EngineError, MissingBlobError } from '../../repo-format/errors.js';
import { StorageError } from '../../repo-format/storage/storage-error.js';
import { crashPoint } from '../../repo-format/crash-points.js';
import { PackWriter } from '../../repo-format/pack-file.js';
import { openBlob } from '../../repo-format/blob-codec.js';
import { LEASE_SKEW_BOUND_MS, LEASE_TIME_MS, PACK_HEADER_SIZE, PACK_TARGET_SIZE } from '../../repo-format/constants.js';
import { packIdOfKey, PACKS_PREFIX } from '../../repo-format/store.js';
import type { DeadEntryTest } from '../../repo-format/pack-presence.js';
import { removeFromQuarantine } from '../../repo-format/quarantine.js';
import { removeOrphanedMarkers } from '../../repo-format/protection.js';
import type { BackupRecord } from '../../repo-format/backup-record.js';
import type { Passphrase } from '../../repo-format/passphrase.js';
import { join } from 'node:path';
import { applyGcStep, planGcCommit, type GcStep } from '../../repo-format/v3/gc-plan.js';
import { GcIndex } from '../../repo-format/v3/gc-index.js';
import { SEGMENT_MAX_SUPERSEDED } from '../../repo-format/v3/segment.js';
import type { IndexEntry } from '../../repo-format/index-entry.js';
import { Interruption } from '../host/interrupt.js';
import { mark } from './mark.js';
import { staleMarkers } from './commit.js';
import type { GcReport } from './report.js';
import { maintainLocks, OBJECT_LOCK_EXPIRED } from '../../repo-format/v3/object-lock.js';

/** How long gc waits for the exclusive lease (the running backups to end) before it gives up (SPEC.md 19.5). */
export const GC_EXCLUSIVE_WAIT_MS = 10 * 60 * 1000;

export interface GcVersion3Args {
  repo: string;
  passphrase: Passphrase | undefined;
  rewriteBelow: number;
  dryRun: boolean;
  signal: AbortSignal | undefined;
  notice: (message: string) => void;
  interruption: Interruption;
  report: GcReport;
}

/**
 * For the tests only, like ENGINE_CRASH_AT: ENGINE_TEST_GC_BATCH=n makes gc hold at most n writes of its
 * working index in memory and write at most n entries per segment, so that a small repository goes through
 * every path a large one takes (many batches, the new index split over several entry segments).
 */
function testLimits(): { batch: number; entries: number } | undefined {
  const n = Number(process.env.ENGINE_TEST_GC_BATCH);
  return Number.isSafeInteger(n) && n > 0 ? { batch: n, entries: n } : undefined;
}

interface StoredPack {
  packId: string;
  size: number;
  modified: number | undefined;
}

/**
 * mark()'s interruption for a version-3 gc: its ticks (per map page and per run of a map) also wait while
 * the live ids handed to the working index are written, so that memory holds at most about two batches.
 */
class SettlingInterruption extends Interruption {
  constructor(
    private readonly inner: Interruption,
    private readonly index: GcIndex,
  ) {
    super(inner.signal, 'gc');
  }

  override async tick(): Promise<void> {
    await this.inner.tick();
    await this.index.settle();
  }

  override error(state?: string): ReturnType<Interruption['error']> {
    return this.inner.error(state);
  }
}

export async function gcVersion3(args: GcVersion3Args): Promise<GcReport> {
  const { report, interruption, notice } = args;
  const repo = await Repository.open(args.repo, {
    access: 'exclusive',
    command: 'gc',
    alone: true,
    manyWriters: true,
    passphrase: args.passphrase,
    signal: args.signal,
    onNotice: notice,
    checkInterrupted: () => interruption.check(),
  });
  const copies: PackWriter[] = [];
  let changed = false;
  // gc's working index (live set, entries, copies) lives on disk in the slot's temporary folder: gc's memory
  // does not grow with the repository (SPEC.md 19.8).
  let index: GcIndex | undefined;
  try {
    const limits = testLimits();
    index = await GcIndex.create(join(repo.session.tempDir, `gc-index.${randomBytes(4).toString('hex')}`), { batch: limits?.batch });
    const marking = new SettlingInterruption(interruption, index);
    const live = { add: (id: Buffer) => index!.addLive(id) };
    const timing = { leaseMs: repo.config.leases?.timeMs ?? LEASE_TIME_MS, skewBoundMs: repo.config.leases?.skewBoundMs ?? LEASE_SKEW_BOUND_MS };
    const minUnnamedAgeMs = timing.leaseMs + 2 * timing.skewBoundMs;

    // 1. Mark and classify, under the shared lease.
    const records = await recordsOrRefuse(repo);
    const damagedReferenced = new Set<string>();
    await mark(repo, records, live, damagedReferenced, marking);
    report.backups = records.length;
    await segmentsOrRefuse(repo, index, interruption, args.signal);
    const packs = await listPacks(repo, args.signal);
    index.deadEntry = (await lostPacks(repo, index, packs, args.signal)).dead;
    report.packs.before = packs.length;
    report.bytes.before = packs.reduce((total, pack) => total + pack.size, 0);
    const storeNow = await storeTime(repo);
    const classes = await classify(index, packs, args.rewriteBelow, storeNow, minUnnamedAgeMs, interruption);
    report.chunks.live = classes.liveEntries;
    if (args.dryRun) {
      reportDryRun(report, classes);
      report.markers = await staleMarkers(repo, damagedReferenced, (packId) => !classes.going.has(packId));
      return report;
    }

    // 1, copy: the live frames of the packs to rewrite, into new packs in the store that no segment names.
    await copyLiveFrames(repo, index, classes.rewrite, copies, report, interruption);
    crashPoint('gc-v3-copied');
    interruption.check();

    // 2. Commit, under the exclusive lease.
    // Not raced: the acquisition ends on the signal itself and deletes its pending lease before it throws.
    const caughtUp = await repo.session.takeExclusive({ waitMs: GC_EXCLUSIVE_WAIT_MS, signal: args.signal }).catch((error: unknown) => {
      throw interruption.aborted ? interruption.error() : error;
    });
    for (const damaged of caughtUp.damaged) notice(`index segment ${damaged.key} cannot be read (${damaged.why})`);
    crashPoint('gc-v3-exclusive');
    const lease = repo.session.lease;
    const all = await recordsOrRefuse(repo);
    const marked = new Set(records.map((record) => record.id));
    const newer = all.filter((record) => !marked.has(record.id));
    report.backupsCommittedDuringGc = newer.map((record) => record.id);
    report.backups = all.length;
    await mark(repo, newer, live, damagedReferenced, marking);
    await segmentsOrRefuse(repo, index, interruption, args.signal);
    const packsNow = await listPacks(repo, args.signal);
    const lost = await lostPacks(repo, index, packsNow, args.signal);
    index.deadEntry = lost.dead;
    const plan = await planGcCommit({
      index,
      packs: packsNow,
      writer: randomBytes(16).toString('hex'),
      firstSeq: 0,
      storeNow: await storeTime(repo),
      minUnnamedAgeMs,
      limits: limits && { entries: limits.entries, superseded: SEGMENT_MAX_SUPERSEDED },
    });
    // After the plan's pass over the live blobs: it found the short packs among them.
    if (lost.packs().length > 0) notice(await lostNotice(index, lost));
    if (plan.refused) {
      throw new MissingBlobError(plan.unnamedLive[0]!, `gc refuses to run (nothing was changed): ${plan.unnamedCount} live blob(s) named by no segment, the first`);
    }
    for (const kept of plan.kept) {
      report.packs.kept.push({ pack: kept.packId, why: kept.why === 'too-young' ? `named by no segment and younger than ${Math.round(minUnnamedAgeMs / 1000)} s by the store's clock: a writer may still name it; a later gc deletes it` : 'named by no segment, and the store tells not its age: kept' });
    }
    interruption.check();
    const sizes = new Map(packsNow.map((pack) => [pack.packId, pack.size]));
    const effectiveBefore = index.effectiveEntries;
    report.segments = { before: index.segmentNames().length, written: 0, deleted: 0 };
    changed = true;
    await carryOut(plan.steps(), plan.stepCount, { repo, lease, sizes, report, interruption, copies, rewrite: classes.rewrite });
    report.chunks.removed = Math.max(0, effectiveBefore - plan.entries);
    // Every copy is of a live blob (marked in 1, and the live set only grows), so the new index names each.
    report.chunks.moved = index.movedCount;

    // What writers killed mid-put left where no listing shows it (temporary files, multipart uploads): by the
    // same age rule as unnamed packs, which no live writer's put can reach (SPEC.md 19.8, 2.5).
    lease.assertHeld();
    if (repo.store.sweepAbandoned) {
      // A store that refuses it for good (a user without ListMultipartUploads) costs storage, not data: said, not fatal.
      report.abandoned = await repo.store.sweepAbandoned((await storeTime(repo)) - minUnnamedAgeMs, { signal: args.signal }).catch((error: unknown) => {
        if (!(error instanceof StorageError) || error.transient) throw error;
        notice(`what interrupted writers left (temporary files, multipart uploads) was not removed: ${error.message}`);
        return 0;
      });
    }

    // Markers naming what no longer exists: nothing can need them (the exclusive lease is held).
    lease.assertHeld();
    const stale = await staleMarkers(repo, damagedReferenced, () => true);
    report.markers.quarantine = await removeFromQuarantine(repo.store, stale.quarantine);
    const existing = new Set(await repo.listBackupIds());
    report.markers.protected = await removeOrphanedMarkers(repo.store, existing);
    report.markers.verifications = await repo.removeOrphanedVerifications(existing);
    report.bytes.reclaimed = report.bytes.deleted - report.bytes.written;

    // Object Lock (SPEC.md 20.5): what gc kept is locked again before its lock runs out; what deletes only
    // hid (delete markers) goes for good once its lock has expired, and what is still locked is kept.
    const locks = await maintainLocks(repo.store, repo.config, { signal: args.signal, assertHeld: () => lease.assertHeld() });
    if (locks) {
      report.objectLock = { ...locks, expired: locks.expired.map((expired) => ({ code: OBJECT_LOCK_EXPIRED, ...expired })) };
      for (const expired of locks.expired) {
        notice(`warning ${OBJECT_LOCK_EXPIRED}: ${expired.key}: its Object Lock ${expired.until ? `ran out at ${expired.until}` : 'was missing'} before gc extended it (it could have been deleted or overwritten meanwhile); locked again`);
      }
      if (locks.locked.versions > 0) notice(`kept: ${locks.locked.versions} deleted or replaced object version(s) locked until ${locks.locked.until}: a later gc removes them once their lock has expired`);
    }
    return report;
  } catch (error) {
    if (!changed) await dropCopies(repo, copies);
    throw error;
  } finally {
    await index?.close();
    await repo.close();
  }
}

/** Every record gc must mark from; a damaged one might reference any chunk: gc refuses (invariant 8). Version 3 has no catalogue copy. */
async function recordsOrRefuse(repo: Repository): Promise<BackupRecord[]> {
  const { backups, damaged } = await repo.listBackups();
  const first = damaged[0];
  if (first) {
    throw new CorruptMetadataError(
      `backup record ${first.id}`,
      `${String((first.error as EngineError).details?.why ?? first.error.message)}; gc cannot tell which chunks it needs and deletes nothing: \`engine forget ${first.id}\` removes that backup (no one can restore from it)`,
    );
  }
  return backups;
}

/** Every segment, read into gc's index; one that cannot be read stops gc before any change (its blobs may be live). */
async function segmentsOrRefuse(repo: Repository, index: GcIndex, interruption: Interruption, signal: AbortSignal | undefined): Promise<void> {
  const { damaged } = await index.readSegments(repo.store, { dataKey: repo.keys?.dataKey, signal, tick: () => interruption.tick(), liveOnly: true });
  const first = damaged[0];
  if (first) throw new CorruptMetadataError(`index segment ${first.key}`, `${first.why}; gc cannot tell where the blobs it names are and deletes nothing (\`engine repair\` rebuilds the segments from the packs)`);
}

async function listPacks(repo: Repository, signal: AbortSignal | undefined): Promise<StoredPack[]> {
  const packs: StoredPack[] = [];
  for await (const info of repo.store.list(PACKS_PREFIX, { signal })) {
    const packId = packIdOfKey(info.key);
    if (packId) packs.push({ packId, size: info.size, modified: info.modified });
  }
  return packs;
}

interface LostPacks {
  /** Packs segments name that the store says are not there, and the packs found shorter than a frame named in them so far. */
  packs: () => string[];
  /** Whether an entry is dead (a frame in a lost pack, or past its pack's end); it notes the short packs it meets. */
  dead: DeadEntryTest;
}

/**
 * The packs that segments name and that are lost (SPEC.md 19.8, "Lost packs"): absent from the listing and
 * not found by a `stat` of their own (a listing that missed one proves nothing), or listed shorter than a frame an
 * entry names. Safe to act on: a segment gc read names only packs durable before it was written (invariant
 * 1'), so before gc's listing, and the engine deletes a pack only when no effective segment names it.
 */
async function lostPacks(repo: Repository, index: GcIndex, packs: readonly StoredPack[], signal: AbortSignal | undefined): Promise<LostPacks> {
  const sizes = new Map(packs.map((pack) => [pack.packId, pack.size]));
  const gone = new Set<string>();
  for (const packId of index.namedPacks) {
    if (sizes.has(packId)) continue;
    signal?.throwIfAborted();
    const size = await repo.packSize(packId);
    if (size === undefined) gone.add(packId);
    else sizes.set(packId, size);
  }
  const short = new Set<string>();
  const dead: DeadEntryTest = (entry) => {
    if (gone.has(entry.packId)) return true;
    const size = sizes.get(entry.packId);
    if (size === undefined || entry.offset + entry.length <= size) return false;
    short.add(entry.packId);
    return true;
  };
  return { packs: () => [...gone, ...short].sort(), dead };
}

/** One line: what gc does about lost packs, and what the user does. */
async function lostNotice(index: GcIndex, lost: LostPacks): Promise<string> {
  let unrecoverable = 0;
  for await (const blob of index.live()) if (!blob.moved && blob.winner && lost.dead(blob.winner)) unrecoverable += 1;
  const names = lost.packs();
  const packs = `${names.length} lost pack(s) (${names.slice(0, 3).join(', ')}${names.length > 3 ? ', …' : ''})`;
  return unrecoverable === 0
    ? `the index named ${packs}: gc drops those entries, every blob a backup needs has another copy`
    : `the index names ${packs} holding the only copy of ${unrecoverable} blob(s) backups need: gc drops the other entries and keeps those; \`engine verify\` names the damaged backups, and backing their disks up again stores those blobs anew`;
}

/** The store's clock now (a folder shares this host's). */
async function storeTime(repo: Repository): Promise<number> {
  return repo.store.time ? (await repo.store.time()).storeMs : Date.now();
}

interface RewrittenPack {
  packId: string;
  size: number;
  /** Its live winning entries (their entries are in gc's index, by offset) and their bytes. */
  liveCount: number;
  liveBytes: number;
}

interface Classes {
  /** Packs with live blobs under the threshold. */
  rewrite: RewrittenPack[];
  dead: StoredPack[];
  unnamedOld: StoredPack[];
  /** Every pack that would go (dry run). */
  going: Set<string>;
  liveEntries: number;
  /** Entries of the effective segments that would not be carried into the new index. */
  removable: number;
}

/**
 * Each pack's fate from the effective index (winning entries only: duplicates are dead bytes). Two passes
 * over the live blobs, so that memory holds a few numbers per pack: the first counts each pack's live
 * bytes, the second puts the entries of the packs to rewrite into gc's index, by pack and offset.
 */
async function classify(index: GcIndex, packs: readonly StoredPack[], rewriteBelow: number, storeNow: number, minUnnamedAgeMs: number, interruption: Interruption): Promise<Classes> {
  const tallies = new Map<string, { count: number; bytes: number }>();
  let liveEntries = 0;
  for await (const { winner } of index.live()) {
    await interruption.tick();
    if (!winner) continue;
    liveEntries += 1;
    const tally = tallies.get(winner.packId);
    if (tally) {
      tally.count += 1;
      tally.bytes += winner.length;
    } else tallies.set(winner.packId, { count: 1, bytes: winner.length });
  }
  const classes: Classes = { rewrite: [], dead: [], unnamedOld: [], going: new Set(), liveEntries, removable: index.effectiveEntries - liveEntries };
  for (const pack of packs) {
    const tally = tallies.get(pack.packId);
    if (tally) {
      if (tally.bytes < rewriteBelow * (pack.size - PACK_HEADER_SIZE)) {
        classes.rewrite.push({ packId: pack.packId, size: pack.size, liveCount: tally.count, liveBytes: tally.bytes });
        classes.going.add(pack.packId);
      }
    } else if (index.namedPacks.has(pack.packId)) {
      classes.dead.push(pack);
      classes.going.add(pack.packId);
    } else if (pack.modified !== undefined && storeNow - pack.modified >= minUnnamedAgeMs) {
      classes.unnamedOld.push(pack);
      classes.going.add(pack.packId);
    }
  }
  if (classes.rewrite.length > 0) {
    const rewritten = new Set(classes.rewrite.map((pack) => pack.packId));
    for await (const { id, winner } of index.live()) {
      await interruption.tick();
      if (winner && rewritten.has(winner.packId)) {
        index.addRewrite({ ...winner, id });
        await index.settle();
      }
    }
    await index.drain();
  }
  return classes;
}

function reportDryRun(report: GcReport, classes: Classes): void {
  const going = [...classes.dead, ...classes.rewrite, ...classes.unnamedOld];
  report.packs.deleted = going.map((pack) => pack.packId).sort();
  report.packs.rewritten = classes.rewrite.map((pack) => pack.packId).sort();
  report.chunks.moved = classes.rewrite.reduce((total, pack) => total + pack.liveCount, 0);
  report.chunks.removed = classes.removable;
  report.bytes.deleted = going.reduce((total, pack) => total + pack.size, 0);
  report.bytes.written = classes.rewrite.reduce((total, pack) => total + pack.liveBytes, 0);
  report.bytes.reclaimed = report.bytes.deleted - report.bytes.written;
}

/**
 * Copies the live frames of each pack to rewrite, checked in full, into new packs stored whole (durable)
 * and named by no segment. A pack with a damaged live frame is not rewritten (repair first).
 */
async function copyLiveFrames(repo: Repository, index: GcIndex, rewrite: Classes['rewrite'], copies: PackWriter[], report: GcReport, interruption: Interruption): Promise<void> {
  let current: PackWriter | undefined;
  const seal = async (): Promise<void> => {
    const pack = current;
    current = undefined;
    if (!pack) return;
    await pack.seal();
    report.packs.created.push(pack.packId);
    report.bytes.written += pack.byteSize;
  };
  for (const pack of rewrite) {
    const frames: { entry: IndexEntry; bytes: Buffer }[] = [];
    let damage: string | undefined;
    for await (const entry of index.rewriteEntries(pack.packId)) {
      await interruption.tick();
      try {
        const bytes = await repo.readFrame(entry);
        const opened = openBlob(bytes, entry.id, repo.keys);
        if (typeof opened === 'string') damage = `the frame of blob ${entry.id.toString('hex').slice(0, 16)}… at offset ${entry.offset} is damaged (${opened})`;
        else frames.push({ entry, bytes });
      } catch (error) {
        damage = (error as Error).message;
      }
      if (damage) break;
    }
    if (damage) {
      report.packs.kept.push({ pack: pack.packId, why: `not rewritten: ${damage}; run engine repair` });
      continue;
    }
    for (const { entry, bytes } of frames) {
      await interruption.tick();
      if (!current) copies.push((current = new PackWriter(repo.packTarget)));
      const at = current.entries.length;
      await current.append(bytes, { kind: entry.kind, flags: entry.flags, rawLength: entry.rawLength, id: entry.id });
      index.addMoved(entry.id, current.entries[at]!);
      await index.settle();
      if (current.byteSize >= PACK_TARGET_SIZE) await seal();
    }
  }
  await seal();
  await index.drain();
}

/** gc stopped before it changed anything: its copies, which no segment names and no one else knows of, go. */
async function dropCopies(repo: Repository, copies: readonly PackWriter[]): Promise<void> {
  for (const pack of copies) {
    await pack.abort().catch(() => undefined);
    await repo.dropUnnamedPack(pack.packId);
  }
}

interface CarryOut {
  repo: Repository;
  lease: { assertHeld: () => void };
  sizes: ReadonlyMap<string, number>;
  report: GcReport;
  interruption: Interruption;
  copies: readonly PackWriter[];
  rewrite: Classes['rewrite'];
}

/**
 * The plan's steps in order, the lease checked before each (applyGcStep). A pack is deleted only when it is
 * provably a pack of this engine (invariant 10). An interruption stops between steps: every prefix of the
 * plan leaves a repository every backup restores from (19.8), and the next gc finishes.
 */
async function carryOut(steps: AsyncIterable<GcStep>, stepCount: number, args: CarryOut): Promise<void> {
  const { repo, report, interruption } = args;
  const rewritten = new Set(args.rewrite.map((pack) => pack.packId));
  const context = { storage: repo.store, dataKey: repo.keys?.dataKey, assertHeld: () => args.lease.assertHeld() };
  let done = 0;
  const stopIfAsked = (): void => {
    if (interruption.aborted) throw interruption.error(`gc stopped after ${done} of its ${stepCount} steps (segments written, superseded ones and packs deleted); what is left is garbage the next gc reclaims`);
  };
  for await (const step of steps) {
    stopIfAsked();
    if (step.kind === 'delete-pack') {
      const foreign = await repo.notOwnPack(step.packId);
      if (foreign) {
        report.packs.kept.push({ pack: step.packId, why: `not deleted: ${foreign}` });
        done++;
        continue;
      }
      const refused = await refusedDelete(step, context);
      if (refused !== undefined) {
        // Named by no segment from the switch on: garbage a later gc deletes, as in versions 1 and 2 (10.2).
        report.packs.kept.push({ pack: step.packId, why: `not deleted: it cannot be deleted (${refused}); a later gc deletes it` });
        done++;
        continue;
      }
      done++;
      report.packs.deleted.push(step.packId);
      report.bytes.deleted += args.sizes.get(step.packId) ?? 0;
      if (rewritten.has(step.packId)) report.packs.rewritten.push(step.packId);
      if (report.packs.deleted.length === 1) crashPoint('gc-v3-pack-deleted');
      continue;
    }
    await applyGcStep(step, context);
    done++;
    switch (step.kind) {
      case 'write-entries':
        report.segments!.written++;
        crashPoint('gc-v3-entries');
        break;
      case 'write-switch':
        report.segments!.written++;
        crashPoint('gc-v3-switched');
        break;
      case 'delete-segment':
        report.segments!.deleted++;
        if (report.segments!.deleted === 1) crashPoint('gc-v3-segment-deleted');
        break;
    }
  }
}

/**
 * Deletes a pack (one step of the plan): undefined once it is gone, or the errno (the store's reason) of a
 * store that refuses for good (an immutable file: EPERM; a denied delete, an S3 Object Lock): the pack is
 * kept and the rest of the plan goes on. A lost lease, an interruption and a transient failure that
 * outlasted the retries still stop gc.
 */
async function refusedDelete(step: GcStep, context: Parameters<typeof applyGcStep>[1]): Promise<string | undefined> {
  try {
    await applyGcStep(step, context);
    return undefined;
  } catch (error) {
    if (!(error instanceof StorageError) || error.transient) throw error;
    return error.storage.backendCode ?? error.reason;
  }
}

