/**
 * `engine gc`: reclaims the space of chunks and map pages no backup references, without trusting clocks
 * and without blocking backups for its long part. Three phases (SPEC.md, "Garbage collection"):
 *
 * 1. Mark (lock held): every page and chunk of every backup is marked live; refuses to go on if a record
 *    is damaged or a referenced blob is missing from the index (it could not tell what is live). Every
 *    indexed pack is classified: dead (no live blob), to rewrite (live bytes under the threshold), kept.
 *    gc registers in writers/ and releases the lock.
 * 2. Copy (no lock): live frames of the packs to rewrite are read, checked and copied byte for byte into
 *    new packs under tmp/<token>.*, made durable there. Nothing visible changes; backups run meanwhile.
 * 3. Commit (lock held again): backups committed since phase 1 are marked too (they may have deduplicated
 *    against blobs phase 1 found dead: those are still where they were, since nothing was deleted); a
 *    dead pack or pack to rewrite holding a blob live now is left alone. New packs are renamed into
 *    packs/, then one index batch moves the copied entries and removes the dead ones, each only if the
 *    entry still names the place phase 1 saw (compare-and-swap: a repair in between wins). Only then
 *    are packs that no index entry names deleted, unless a reader is registered: their deletion is then
 *    deferred to a later gc (they stay as unindexed packs, which any later gc deletes). Last, markers that
 *    name what no longer exists are removed: quarantine records of packs that are gone (except those of
 *    blobs a backup still references with no good copy) and protection markers of backups that are gone.
 */
import { stat } from 'node:fs/promises';
import { Repository } from '../../repo-format/repository.js';
import { CorruptMetadataError, EngineError, InvalidArgumentError, MissingBlobError, NoSpaceError } from '../../repo-format/errors.js';
import type { RepositoryKeys } from '../../repo-format/crypto.js';
import { crashPoint } from '../../repo-format/crash-points.js';
import { deletePack, notOwnPack, packPath, PackWriter, readFrameBytes } from '../../repo-format/pack-file.js';
import { openBlob } from '../../repo-format/blob-codec.js';
import { listQuarantine, quarantineKey, removeFromQuarantine } from '../../repo-format/quarantine.js';
import { orphanedMarkers, removeOrphanedMarkers } from '../../repo-format/protection.js';
import { registerWriter } from '../../repo-format/writers.js';
import { listReaders, removeStaleReaders } from '../../repo-format/readers.js';
import type { IndexEntry } from '../../repo-format/index-entry.js';
import type { BackupRecord } from '../../repo-format/backup-record.js';
import { GC_DEFAULT_REWRITE_BELOW, PACK_HEADER_SIZE, PACK_TARGET_SIZE } from '../../repo-format/constants.js';
import { IdPrefixSet } from '../common/id-set.js';
import { walkReferences } from '../catalogue/references.js';
import type { Passphrase } from '../../repo-format/passphrase.js';
import { catalogueCopyOf } from '../catalogue/record-recovery.js';
import { Interruption } from '../host/interrupt.js';

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

export interface GcReport {
  dryRun: boolean;
  rewriteBelow: number;
  backups: number;
  /** Backups committed while gc copied (marked in phase 3). */
  backupsCommittedDuringGc: string[];
  packs: {
    before: number;
    deleted: string[];
    rewritten: string[];
    created: string[];
    /** Packs planned for deletion or rewriting but left in place, with why. */
    kept: { pack: string; why: string }[];
    /** Packs no index entry names any more, not deleted because a reader is registered. */
    deferred: string[];
  };
  chunks: { live: number; removed: number; moved: number };
  bytes: { before: number; deleted: number; written: number; reclaimed: number };
  readers: number;
  /**
   * Markers that name nothing any more, removed (dry run: that would be): quarantine records
   * (`<pack>-<offset>`) of packs that no longer exist, but for blobs a backup still references with no good
   * copy; protection markers of backups whose record is gone.
   */
  markers: { quarantine: string[]; protected: string[] };
}

interface PackPlan {
  packId: string;
  size: number;
  live: IndexEntry[];
  dead: IndexEntry[];
}

const LOOKUP_BATCH = 1024;
/** Index entries removed per batch when dead packs are deleted (about 40 bytes of the index's log each). */
const ROUND_ENTRIES = 8192;

export async function gc(options: GcOptions): Promise<GcReport> {
  const rewriteBelow = options.rewriteBelow ?? GC_DEFAULT_REWRITE_BELOW;
  if (!(rewriteBelow >= 0 && rewriteBelow <= 1)) throw new InvalidArgumentError(`rewrite threshold ${rewriteBelow}: give a fraction from 0 to 1 (0%–100%)`);
  const notice = options.onNotice ?? (() => undefined);
  const report: GcReport = {
    dryRun: options.dryRun === true,
    rewriteBelow,
    backups: 0,
    backupsCommittedDuringGc: [],
    packs: { before: 0, deleted: [], rewritten: [], created: [], kept: [], deferred: [] },
    chunks: { live: 0, removed: 0, moved: 0 },
    bytes: { before: 0, deleted: 0, written: 0, reclaimed: 0 },
    readers: 0,
    markers: { quarantine: [], protected: [] },
  };

  const interruption = new Interruption(options.signal, 'gc', () => 'nothing visible changed: the packs it had copied under tmp/ were removed');
  interruption.check();
  // Phase 1: mark and plan, under the lock.
  let repo = await Repository.open(options.repo, { access: 'exclusive', command: 'gc', passphrase: options.passphrase, checkInterrupted: () => interruption.check() });
  const live = new IdPrefixSet();
  /** Referenced blobs with no indexed copy, only a quarantine record (hex ids; as many as damaged chunks). */
  const damagedReferenced = new Set<string>();
  const marked = new Set<string>();
  const dead: PackPlan[] = [];
  const rewrite: PackPlan[] = [];
  const unindexed: PackPlan[] = [];
  let writer: Awaited<ReturnType<typeof registerWriter>> | undefined;
  try {
    await repo.removeTempFiles();
    const records = await recordsOrRefuse(repo, notice);
    await mark(repo, records, live, damagedReferenced, interruption);
    for (const record of records) marked.add(record.id);
    report.backups = records.length;

    // Two passes over the index, so that memory follows what gc changes, not the repository's size: the
    // first counts per pack (a few numbers per pack), the second keeps the entries of the packs that go.
    const tally = new Map<string, { live: number; liveBytes: number }>();
    for await (const entry of repo.index.blobs()) {
      await interruption.tick();
      let counts = tally.get(entry.packId);
      if (!counts) tally.set(entry.packId, (counts = { live: 0, liveBytes: 0 }));
      if (live.has(entry.id)) {
        counts.live += 1;
        counts.liveBytes += entry.length;
      }
    }
    const packIds = await repo.listPackIds();
    report.packs.before = packIds.length;
    const going = new Map<string, PackPlan>();
    for (const packId of packIds) {
      await interruption.tick();
      const size = (await stat(packPath(repo.root, packId))).size;
      report.bytes.before += size;
      const counts = tally.get(packId);
      if (!counts) {
        unindexed.push({ packId, size, live: [], dead: [] }); // garbage of a crash or an earlier gc, deleted in phase 3
        continue;
      }
      report.chunks.live += counts.live;
      const plan: PackPlan = { packId, size, live: [], dead: [] };
      if (counts.live === 0) dead.push(plan);
      else if (counts.liveBytes < rewriteBelow * (size - PACK_HEADER_SIZE)) rewrite.push(plan);
      else continue;
      going.set(packId, plan);
    }
    tally.clear();
    if (going.size > 0) {
      for await (const entry of repo.index.blobs()) {
        await interruption.tick();
        const plan = going.get(entry.packId);
        if (plan) (live.has(entry.id) ? plan.live : plan.dead).push(entry);
      }
    }
    // Entries naming packs that do not exist are verify's and repair's business, not gc's.
    if (report.dryRun) {
      report.packs.deleted = [...dead, ...rewrite, ...unindexed].map((p) => p.packId);
      report.packs.rewritten = rewrite.map((p) => p.packId);
      report.chunks.removed = [...dead, ...rewrite].reduce((sum, p) => sum + p.dead.length, 0);
      report.chunks.moved = rewrite.reduce((sum, p) => sum + p.live.length, 0);
      report.bytes.deleted = [...dead, ...rewrite, ...unindexed].reduce((sum, p) => sum + p.size, 0);
      report.bytes.written = rewrite.reduce((sum, p) => sum + p.live.reduce((s, e) => s + e.length, 0), 0);
      report.bytes.reclaimed = report.bytes.deleted - report.bytes.written;
      const goingPacks = new Set([...dead, ...rewrite, ...unindexed].map((p) => p.packId));
      report.markers = await staleMarkers(repo, damagedReferenced, (packId) => !goingPacks.has(packId));
      return report;
    }
    // Registered before the lock is let go, so that no other gc starts and no lock holder clears our tmp files.
    writer = await repo.withSpaceReserve(() => registerWriter(repo.root, 'gc'));
  } finally {
    await repo.close();
  }

  const created: PackWriter[] = [];
  try {
    crashPoint('gc-marked');

    // Phase 2: copy live frames of sparse packs, without the lock.
    const copied = new Map<string, IndexEntry[]>(); // old pack → the entries of its frames in new packs
    try {
      await copyLiveFrames(options.repo, repo.keys, rewrite, writer!.registration.token, created, copied, report, interruption);
    } catch (error) {
      if (!(error instanceof NoSpaceError)) throw error;
      // A full disk: no pack is rewritten this time, but dead packs are still deleted in phase 3, and the
      // next gc rewrites with the room this one frees.
      for (const pack of created.splice(0)) await pack.abort().catch(() => undefined);
      copied.clear();
      for (const plan of rewrite) {
        if (report.packs.kept.some((k) => k.pack === plan.packId)) continue;
        const liveBytes = plan.live.reduce((sum, e) => sum + e.length, 0);
        report.packs.kept.push({ pack: plan.packId, why: `not rewritten: no space left for its ${liveBytes} live bytes; the next gc rewrites it with the room this one frees` });
      }
      notice(`the repository's filesystem is full: no pack is rewritten this time; dead packs are still deleted`);
    }
    crashPoint('gc-copied');

    // Phase 3: commit, under the lock again (waiting for a running backup to finish).
    repo = await openWhenFree(options.repo, options.passphrase, notice, interruption);
    try {
      await repo.removeTempFiles();
      const all = await recordsOrRefuse(repo, () => undefined);
      const newer = all.filter((r) => !marked.has(r.id));
      report.backupsCommittedDuringGc = newer.map((r) => r.id);
      report.backups = all.length;
      const liveNow = new IdPrefixSet();
      await mark(repo, newer, liveNow, damagedReferenced, interruption);

      const put: IndexEntry[] = [];
      const del: Buffer[] = [];
      const stillNamed = async (entries: IndexEntry[]): Promise<boolean[]> => {
        const answer: boolean[] = [];
        for (let at = 0; at < entries.length; at += LOOKUP_BATCH) {
          const slice = entries.slice(at, at + LOOKUP_BATCH);
          const locations = await repo.lookup(slice.map((e) => e.id));
          slice.forEach((e, i) => answer.push(locations[i]?.packId === e.packId && locations[i]?.offset === e.offset));
        }
        return answer;
      };
      const revived = (plan: PackPlan): IndexEntry | undefined => plan.dead.find((e) => liveNow.has(e.id));
      // Dead packs go in rounds of a bounded batch each, their packs deleted right after: on a full disk
      // the first round needs only a little room in the index's log, and every round frees far more.
      const rounds: { packs: string[]; del: Buffer[] }[] = [];
      for (const plan of dead) {
        const back = revived(plan);
        if (back) {
          report.packs.kept.push({ pack: plan.packId, why: `blob ${back.id.toString('hex').slice(0, 16)}… is referenced by a backup committed during gc` });
          continue;
        }
        const named = await stillNamed(plan.dead);
        let round = rounds[rounds.length - 1];
        if (!round || round.del.length >= ROUND_ENTRIES) rounds.push((round = { packs: [], del: [] }));
        round.packs.push(plan.packId);
        plan.dead.forEach((e, i) => named[i] && round.del.push(e.id));
      }
      const publish = new Set<PackWriter>();
      for (const plan of rewrite) {
        const moved = copied.get(plan.packId);
        if (!moved) continue;
        const back = revived(plan);
        if (back) {
          report.packs.kept.push({ pack: plan.packId, why: `blob ${back.id.toString('hex').slice(0, 16)}… is referenced by a backup committed during gc` });
          continue;
        }
        const liveNamed = await stillNamed(plan.live);
        const deadNamed = await stillNamed(plan.dead);
        plan.live.forEach((_, i) => {
          if (!liveNamed[i]) return;
          put.push(moved[i]!);
          publish.add(created.find((w) => w.packId === moved[i]!.packId)!);
        });
        plan.dead.forEach((e, i) => deadNamed[i] && del.push(e.id));
        report.packs.rewritten.push(plan.packId);
      }
      // The last point to stop with nothing visible changed; from here gc finishes (renames, one batch, deletions).
      interruption.check();
      // Write order: new packs durable under their names, then the index batch, then deletions.
      for (const pack of created) {
        if (!publish.has(pack)) continue;
        await pack.publish();
        report.packs.created.push(pack.packId);
        report.bytes.written += pack.byteSize;
      }
      crashPoint('gc-published');
      await repo.withSpaceReserve(() => repo.index.applyBatch({ put, del }));
      crashPoint('gc-indexed');
      report.chunks.moved = put.length;
      report.chunks.removed = del.length;

      await removeStaleReaders(repo.root);
      const { live: readers } = await listReaders(repo.root);
      report.readers = readers.length;
      let deletions = 0;
      /** Deletes packs no index entry names: nothing can reach them any more. Never one that is not provably a pack of this repository. */
      const deleteUnnamed = async (packIds: readonly string[]): Promise<void> => {
        if (readers.length > 0) {
          report.packs.deferred.push(...packIds);
          return;
        }
        const gone: string[] = [];
        for (const packId of packIds) {
          const foreign = await notOwnPack(repo.root, packId);
          if (foreign) {
            report.packs.kept.push({ pack: packId, why: `not deleted: ${foreign}` });
            continue;
          }
          report.bytes.deleted += (await stat(packPath(repo.root, packId)).catch(() => ({ size: 0 }))).size;
          await deletePack(repo.root, packId);
          report.packs.deleted.push(packId);
          gone.push(packId);
          if (deletions++ === 0) crashPoint('gc-pack-deleted');
        }
        await repo.syncPackDirectories(gone);
      };
      for (const round of rounds) {
        await repo.withSpaceReserve(() => repo.index.applyBatch({ put: [], del: round.del }));
        report.chunks.removed += round.del.length;
        await deleteUnnamed(round.packs);
      }
      // The rest: rewritten packs, and packs a crash or an earlier gc left unnamed.
      const named = new Set<string>();
      for await (const entry of repo.index.blobs()) named.add(entry.packId);
      const handled = new Set([...report.packs.deleted, ...report.packs.deferred, ...report.packs.kept.map((k) => k.pack)]);
      await deleteUnnamed((await repo.listPackIds()).filter((id) => !named.has(id) && !handled.has(id)));
      if (report.packs.deferred.length > 0) {
        notice(`${readers.length} ${readers.length === 1 ? 'reader is' : 'readers are'} registered (engine serve/mount): deleting ${report.packs.deferred.length === 1 ? '1 pack' : `${report.packs.deferred.length} packs`} is deferred to a later gc`);
      }
      // Markers naming what no longer exists: nothing can need them (the lock is held, so no protect runs).
      const stale = await staleMarkers(repo, damagedReferenced, () => true);
      report.markers.quarantine = await removeFromQuarantine(repo.root, stale.quarantine);
      report.markers.protected = await removeOrphanedMarkers(repo.root, new Set(await repo.listBackupIds()));
      report.packs.rewritten = report.packs.rewritten.filter((id) => report.packs.deleted.includes(id) || report.packs.deferred.includes(id));
      report.bytes.reclaimed = report.bytes.deleted - report.bytes.written;
    } finally {
      await repo.close();
    }
    return report;
  } finally {
    for (const pack of created) await pack.abort().catch(() => undefined);
    await writer?.release();
  }
}

/**
 * gc's phase 2: the live frames of each pack to rewrite, read at their index locations, checked in full
 * and appended byte for byte to new packs under tmp/<token>.*, made durable there (not published). A pack
 * holding a damaged live frame is not rewritten (repair first). Fills `copied` (old pack → the entries
 * of its frames in the new packs, in plan.live order) and `created`.
 */
async function copyLiveFrames(
  root: string,
  keys: RepositoryKeys | undefined,
  rewrite: readonly PackPlan[],
  token: string,
  created: PackWriter[],
  copied: Map<string, IndexEntry[]>,
  report: GcReport,
  interruption: Interruption,
): Promise<void> {
  let current: PackWriter | undefined;
  for (const plan of rewrite) {
    const moved: IndexEntry[] = [];
    let damaged: string | undefined;
    const frames: { entry: IndexEntry; bytes: Buffer }[] = [];
    plan.live.sort((a, b) => a.offset - b.offset); // phase 3 pairs plan.live[i] with moved[i]
    for (const entry of plan.live) {
      await interruption.tick();
      try {
        const bytes = await readFrameBytes(root, entry.packId, entry.offset, entry.length);
        const opened = openBlob(bytes, entry.id, keys);
        if (typeof opened === 'string') damaged = `the frame of blob ${entry.id.toString('hex').slice(0, 16)}… at offset ${entry.offset} is damaged (${opened})`;
        else frames.push({ entry, bytes });
      } catch (error) {
        damaged = (error as Error).message;
      }
      if (damaged) break;
    }
    if (damaged) {
      // Copying would leave the damaged blob behind; verify and repair deal with it first.
      report.packs.kept.push({ pack: plan.packId, why: `not rewritten: ${damaged}; run engine repair` });
      continue;
    }
    copied.set(plan.packId, moved);
    for (const { entry, bytes } of frames) {
      await interruption.tick();
      if (!current) {
        current = new PackWriter(root, { tempPrefix: `${token}.` });
        created.push(current);
      }
      const before = current.entries.length;
      await current.append(bytes, { kind: entry.kind, flags: entry.flags, rawLength: entry.rawLength, id: entry.id });
      moved.push(current.entries[before]!);
      if (current.byteSize >= PACK_TARGET_SIZE) {
        await current.finish();
        current = undefined;
      }
    }
  }
  if (current) await current.finish();
}

/**
 * Every record gc must mark from. A damaged record file whose catalogue copy in the index is good is
 * marked from that copy (it holds the bytes the backup wrote; repair puts them back). A damaged record with
 * no good copy might reference any chunk: gc refuses rather than guess, and says how to go on (forget it:
 * a record no one can read restores nothing).
 */
async function recordsOrRefuse(repo: Repository, notice: (message: string) => void): Promise<BackupRecord[]> {
  const { backups, damaged } = await repo.listBackups();
  for (const { id, error } of damaged) {
    const copy = await catalogueCopyOf(repo, id);
    if (copy) {
      notice(`${error.message}; gc marks from its good copy in the index (\`engine repair\` restores the file)`);
      backups.push(copy.record);
      continue;
    }
    throw new CorruptMetadataError(
      `backup record ${id}`,
      `${String((error as EngineError).details?.why ?? error.message)}, and the index holds no good copy of it; gc cannot tell which chunks it needs and deletes nothing: \`engine forget ${id}\` removes that backup (no one can restore from it)`,
    );
  }
  return backups;
}

/**
 * The markers gc removes: quarantine records of packs that do not exist (or, for a dry run, will not:
 * `stays` says which existing packs stay), unless the blob is one a backup still references with no
 * indexed copy (the record is then the only trace of that damage, and what lets gc mark past it); and
 * protection markers of backups whose record file is gone.
 */
async function staleMarkers(repo: Repository, damagedReferenced: ReadonlySet<string>, stays: (packId: string) => boolean): Promise<GcReport['markers']> {
  const packs = new Set((await repo.listPackIds()).filter(stays));
  const quarantine = [...(await listQuarantine(repo.root)).values()]
    .filter((q) => !packs.has(q.pack) && !(q.blob !== null && damagedReferenced.has(q.blob)))
    .map((q) => quarantineKey(q.pack, q.offset))
    .sort();
  return { quarantine, protected: await orphanedMarkers(repo.root, new Set(await repo.listBackupIds())) };
}

/**
 * Marks every page and chunk of `records`; refuses when one is neither indexed nor known damaged. The
 * known damaged (quarantined, no indexed copy) go into `damagedReferenced`.
 */
async function mark(repo: Repository, records: readonly BackupRecord[], live: IdPrefixSet, damagedReferenced: Set<string>, interruption: Interruption): Promise<void> {
  const quarantined = new Set([...(await listQuarantine(repo.root)).values()].map((q) => q.blob).filter((b): b is string => b !== null));
  let refusal: EngineError | undefined;
  await walkReferences(repo, records, {
    page: (id) => live.add(id),
    chunk: ({ backup, disk, offset, id, location }) => {
      if (location) live.add(id);
      else if (quarantined.has(id.toString('hex'))) damagedReferenced.add(id.toString('hex'));
      else refusal ??= new MissingBlobError(id.toString('hex'), `gc refuses to run: chunk of backup ${backup}, disk ${disk}, offset ${offset},`);
    },
    mapDamaged: (backup, disk, error) => {
      refusal ??= new EngineError('ENGINE_CORRUPT_METADATA', `backup ${backup}, disk ${disk}: ${error.message}; gc cannot tell which chunks it needs and deletes nothing (run engine repair)`, { backup, disk });
    },
  }, { interruption });
  if (refusal) throw refusal;
}

/** Phase 3 waits for the lock (a backup may hold it for hours): gc has work in flight and holds nothing. */
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
