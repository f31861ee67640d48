/**
 * gc's phase 3, commit (SPEC.md 10.2), under the lock again (gc waits for it: a backup may hold it for
 * hours). In order:
 *
 * 1. Backups committed since phase 1 are marked: they may have deduplicated against blobs phase 1 found
 *    dead (still where they were: nothing was deleted). A pack to delete or rewrite holding a blob live
 *    now is left alone.
 * 2. The changes are decided before any is made (CommitChanges): each entry moved or removed only if it
 *    still names the place phase 1 saw (compare-and-swap: a repair in between wins).
 * 3. New packs are renamed into packs/, then one index batch moves the copied entries and removes the
 *    dead ones of rewritten packs.
 * 4. Dead packs go in rounds (a bounded batch, then their packs), then every other pack no entry names;
 *    nothing is deleted while a reader is registered (deferred to a later gc).
 * 5. Markers naming what no longer exists are removed.
 */
import { Repository } from '../../repo-format/repository.js';
import { EngineError } from '../../repo-format/errors.js';
import { crashPoint } from '../../repo-format/crash-points.js';
import type { PackWriter } from '../../repo-format/pack-file.js';
import { listQuarantine, quarantineKey, removeFromQuarantine } from '../../repo-format/quarantine.js';
import { orphanedMarkers, removeOrphanedMarkers } from '../../repo-format/protection.js';
import { listReaders, removeStaleReaders } from '../../repo-format/readers.js';
import type { IndexEntry } from '../../repo-format/index-entry.js';
import type { Passphrase } from '../../repo-format/passphrase.js';
import { IdPrefixSet } from '../common/id-set.js';
import type { Interruption } from '../host/interrupt.js';
import { mark, recordsOrRefuse } from './mark.js';
import type { GcPlan, LiveSet, PackPlan } from './plan.js';
import type { GcCopies } from './copy.js';
import type { GcReport } from './report.js';

const LOOKUP_BATCH = 1024;
/** Index entries removed per batch when dead packs are deleted (about 40 bytes of the index's log each). */
const ROUND_ENTRIES = 8192;

export interface CommitArgs {
  repo: string;
  passphrase: Passphrase | undefined;
  notice: (message: string) => void;
  interruption: Interruption;
}

/** What phase 3 changes, decided before it changes anything. */
export interface CommitChanges {
  /** Entries of copied frames at their new places. */
  put: IndexEntry[];
  /** Dead entries of rewritten packs, removed in the same batch. */
  del: Buffer[];
  /** The new packs holding an entry of `put`: published before the batch. */
  publish: Set<PackWriter>;
  /**
   * The dead packs in rounds of a bounded batch each, their packs deleted right after: on a full disk the
   * first round needs only a little room in the index's log, and every round frees far more.
   */
  rounds: { packs: string[]; del: Buffer[] }[];
}

export async function commitChanges(plan: GcPlan, copies: GcCopies, args: CommitArgs, report: GcReport): Promise<void> {
  const repo = await openWhenFree(args.repo, args.passphrase, args.notice, args.interruption);
  try {
    await repo.removeTempFiles();
    const liveNow = await markCommittedSince(repo, plan, report, args.interruption);
    const changes = await decideChanges(repo, plan, copies, liveNow, report);
    // The last point to stop with nothing visible changed; from here gc finishes (renames, one batch, deletions).
    args.interruption.check();
    await publishAndIndex(repo, copies.packs, changes, report);
    await deleteUnnamedPacks(repo, changes.rounds, report, args.notice);
    // Markers naming what no longer exists: nothing can need them (the lock is held, so no protect runs).
    const stale = await staleMarkers(repo, plan.damagedReferenced, () => true);
    report.markers.quarantine = await removeFromQuarantine(repo.store, stale.quarantine);
    const existing = new Set(await repo.listBackupIds());
    report.markers.protected = await removeOrphanedMarkers(repo.store, existing);
    report.markers.verifications = await repo.removeOrphanedVerifications(existing);
    report.packs.rewritten = report.packs.rewritten.filter((id) => report.packs.deleted.includes(id) || report.packs.deferred.includes(id));
    report.bytes.reclaimed = report.bytes.deleted - report.bytes.written;
  } finally {
    await repo.close();
  }
}

/** Waits for the lock (a backup may hold it for hours): gc has work in flight and holds nothing. */
async function openWhenFree(path: string, passphrase: Passphrase | undefined, notice: (message: string) => void, interruption: Interruption): Promise<Repository> {
  let told = false;
  for (;;) {
    interruption.check();
    try {
      return await Repository.open(path, { access: 'exclusive', command: 'gc', passphrase, checkInterrupted: () => interruption.check() });
    } catch (error) {
      if (!(error instanceof EngineError) || error.code !== 'ENGINE_REPOSITORY_LOCKED') throw error;
      if (!told) notice(`waiting to commit: ${error.message}`);
      told = true;
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  }
}

/** Step 1: the blobs of the backups committed while gc copied (ids of the others are in plan.marked). */
async function markCommittedSince(repo: Repository, plan: GcPlan, report: GcReport, interruption: Interruption): Promise<IdPrefixSet> {
  const all = await recordsOrRefuse(repo, () => undefined);
  const newer = all.filter((r) => !plan.marked.has(r.id));
  report.backupsCommittedDuringGc = newer.map((r) => r.id);
  report.backups = all.length;
  const liveNow = new IdPrefixSet();
  await mark(repo, newer, liveNow, plan.damagedReferenced, interruption);
  return liveNow;
}

/** Step 2: every change, each entry only where it still names what phase 1 saw; packs revived now are kept. */
async function decideChanges(repo: Repository, plan: GcPlan, copies: GcCopies, liveNow: LiveSet, report: GcReport): Promise<CommitChanges> {
  const changes: CommitChanges = { put: [], del: [], publish: new Set(), rounds: [] };
  const keptIfRevived = (pack: PackPlan): boolean => {
    const back = pack.dead.find((e) => liveNow.has(e.id));
    if (back) report.packs.kept.push({ pack: pack.packId, why: `blob ${back.id.toString('hex').slice(0, 16)}… is referenced by a backup committed during gc` });
    return back !== undefined;
  };
  for (const pack of plan.dead) {
    if (keptIfRevived(pack)) continue;
    const named = await stillNamed(repo, pack.dead);
    let round = changes.rounds[changes.rounds.length - 1];
    if (!round || round.del.length >= ROUND_ENTRIES) changes.rounds.push((round = { packs: [], del: [] }));
    round.packs.push(pack.packId);
    pack.dead.forEach((e, i) => named[i] && round.del.push(e.id));
  }
  for (const pack of plan.rewrite) {
    const moved = copies.moved.get(pack.packId);
    if (!moved || keptIfRevived(pack)) continue;
    const liveNamed = await stillNamed(repo, pack.live);
    const deadNamed = await stillNamed(repo, pack.dead);
    pack.live.forEach((_, i) => {
      if (!liveNamed[i]) return;
      changes.put.push(moved[i]!);
      changes.publish.add(copies.packs.find((w) => w.packId === moved[i]!.packId)!);
    });
    pack.dead.forEach((e, i) => deadNamed[i] && changes.del.push(e.id));
    report.packs.rewritten.push(pack.packId);
  }
  return changes;
}

/** Whether each entry is still indexed where phase 1 saw it (a repair in between may have moved it). */
async function stillNamed(repo: Repository, entries: readonly IndexEntry[]): Promise<boolean[]> {
  const answer: boolean[] = [];
  for (let at = 0; at < entries.length; at += LOOKUP_BATCH) {
    const slice = entries.slice(at, at + LOOKUP_BATCH);
    const locations = await repo.lookup(slice.map((e) => e.id));
    slice.forEach((e, i) => answer.push(locations[i]?.packId === e.packId && locations[i]?.offset === e.offset));
  }
  return answer;
}

/** Step 3, in write order: new packs durable under their names, then the index batch. */
async function publishAndIndex(repo: Repository, packs: readonly PackWriter[], changes: CommitChanges, report: GcReport): Promise<void> {
  for (const pack of packs) {
    if (!changes.publish.has(pack)) continue;
    await pack.publish();
    report.packs.created.push(pack.packId);
    report.bytes.written += pack.byteSize;
  }
  crashPoint('gc-published');
  await repo.withSpaceReserve(() => repo.index.applyBatch({ put: changes.put, del: changes.del }));
  crashPoint('gc-indexed');
  report.chunks.moved = changes.put.length;
  report.chunks.removed = changes.del.length;
}

/** Step 4: the dead packs round by round, then every other pack no index entry names. */
async function deleteUnnamedPacks(repo: Repository, rounds: CommitChanges['rounds'], report: GcReport, notice: (message: string) => void): Promise<void> {
  await removeStaleReaders(repo.root);
  const { live: readers } = await listReaders(repo.root);
  report.readers = readers.length;
  const deletion = new UnnamedPackDeletion(repo, readers.length > 0, report);
  for (const round of rounds) {
    await repo.withSpaceReserve(() => repo.index.applyBatch({ put: [], del: round.del }));
    report.chunks.removed += round.del.length;
    await deletion.delete(round.packs);
  }
  // The rest: rewritten packs, and packs a crash or an earlier gc left unnamed.
  const named = new Set<string>();
  for await (const entry of repo.index.blobs()) named.add(entry.packId);
  const handled = new Set([...report.packs.deleted, ...report.packs.deferred, ...report.packs.kept.map((k) => k.pack)]);
  await deletion.delete((await repo.listPackIds()).filter((id) => !named.has(id) && !handled.has(id)));
  const deferred = report.packs.deferred.length;
  if (deferred > 0) {
    notice(`${readers.length} ${readers.length === 1 ? 'reader is' : 'readers are'} registered (engine serve/mount): deleting ${deferred === 1 ? '1 pack' : `${deferred} packs`} is deferred to a later gc`);
  }
}

/** Deletes packs no index entry names: nothing can reach them any more. Never one that is not provably a pack of this repository. */
class UnnamedPackDeletion {
  private deletions = 0;

  constructor(
    private readonly repo: Repository,
    private readonly readersRegistered: boolean,
    private readonly report: GcReport,
  ) {}

  async delete(packIds: readonly string[]): Promise<void> {
    const { repo, report } = this;
    if (this.readersRegistered) {
      report.packs.deferred.push(...packIds);
      return;
    }
    for (const packId of packIds) {
      const foreign = await repo.notOwnPack(packId);
      if (foreign) {
        report.packs.kept.push({ pack: packId, why: `not deleted: ${foreign}` });
        continue;
      }
      // Only for the report's byte count: a failed stat must not stop the deletion.
      const size = (await repo.packSize(packId).catch(() => undefined)) ?? 0;
      const failed = await repo.deletePack(packId);
      if (failed) {
        // Unnamed now: any later gc deletes it once it can be.
        report.packs.kept.push({ pack: packId, why: `not deleted: ${failed}; a later gc deletes it` });
        continue;
      }
      report.bytes.deleted += size;
      report.packs.deleted.push(packId);
      if (this.deletions++ === 0) crashPoint('gc-pack-deleted');
    }
  }
}

/**
 * The markers gc removes: quarantine records of packs that do not exist (or, for a dry run, will not:
 * `stays` says which existing packs stay), unless the blob is one a backup still references with no
 * indexed copy (the record is then the only trace of that damage, and what lets gc mark past it); and
 * protection markers and verification records of backups whose record file is gone.
 */
export async function staleMarkers(repo: Repository, damagedReferenced: ReadonlySet<string>, stays: (packId: string) => boolean): Promise<GcReport['markers']> {
  const packs = new Set((await repo.listPackIds()).filter(stays));
  const quarantine = [...(await listQuarantine(repo.store)).values()]
    .filter((q) => !packs.has(q.pack) && !(q.blob !== null && damagedReferenced.has(q.blob)))
    .map((q) => quarantineKey(q.pack, q.offset))
    .sort();
  const existing = new Set(await repo.listBackupIds());
  return { quarantine, protected: await orphanedMarkers(repo.store, existing), verifications: await repo.removeOrphanedVerifications(existing, { dryRun: true }) };
}
