/**
 * `engine repair` on format version 3 (SPEC.md 19.12): the segments are rebuilt from the packs, under the
 * exclusive lease. The host's index cache needs no repair (19.4: it is rebuilt from the segments whenever it
 * is lost, damaged or behind); what repair mends is the store's index itself, whatever state it is in
 * (segments lost, cut short, altered, naming frames that are damaged or gone), and it sets damaged frames
 * aside as in versions 1 and 2 (12.5). In order:
 *
 * 1. every frame of every pack is read and checked in full (check-packs.ts, the same as versions 1 and 2),
 *    the good ones entered into a LevelDB built in the cache slot's temporary folder;
 * 2. the damage is placed (old-index.ts's rule) against the entries of the segments that can still be read;
 *    damaged frames and places no good frame holds any more are quarantined (the lease checked first);
 * 3. repair's own segments name every good frame, then a switch supersedes every segment present (damaged
 *    ones included: their names are their keys), then the superseded segments are deleted — the steps and
 *    crash table of gc's commit (19.8), with repair's entries for gc's;
 * 4. the cache is caught up (it rebuilds: its segments were superseded) and every backup is checked for
 *    what still references damaged or missing data.
 */
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { rm } from 'node:fs/promises';
import { Repository } from '../../repo-format/repository.js';
import { IndexStore } from '../../repo-format/index-store.js';
import { addToQuarantine, listQuarantine, quarantineKey } from '../../repo-format/quarantine.js';
import { crashPoint } from '../../repo-format/crash-points.js';
import type { Passphrase } from '../../repo-format/passphrase.js';
import { applyGcStep, type GcStep } from '../../repo-format/v3/gc-plan.js';
import { GcIndex } from '../../repo-format/v3/gc-index.js';
import { parseSegmentKey, segmentKey, SEGMENT_MAX_SUPERSEDED, SEGMENT_PREFIX, type SegmentEntry, type SegmentName } from '../../repo-format/v3/segment.js';
import { FLUSH_ENTRIES } from '../../repo-format/v3/segment-writer.js';
import { compareKeys } from '../../repo-format/storage/storage.js';
import type { Interruption } from '../host/interrupt.js';
import { checkPacksIntoIndex } from './check-packs.js';
import { damagePlacer } from './old-index.js';
import { reportStillDamaged } from './still-damaged.js';
import type { RebuiltConfig, RepairReport } from './report.js';
import { NotARepositoryError } from '../../repo-format/errors.js';
import { openLocation } from '../../repo-format/v3/location.js';
import { hasVersion3Objects, rebuildVersion3Config } from '../../repo-format/v3/config-rebuild.js';
import { defaultCacheRoot } from '../../repo-format/v3/session.js';

/** How long repair waits for the exclusive lease (running backups, restores … to end). */
const REPAIR_EXCLUSIVE_WAIT_MS = 10 * 60 * 1000;

export interface RepairVersion3Args {
  repo: string;
  passphrase: Passphrase | undefined;
  workers: number | undefined;
  signal: AbortSignal | undefined;
  interruption: Interruption;
  onProgress: ((progress: { phase: string; done: number; total: number }) => void) | undefined;
  notice: (message: string) => void;
  report: RepairReport;
  done: { installed: boolean; quarantined: number };
}

export async function repairVersion3(args: RepairVersion3Args): Promise<RepairReport> {
  const { report, interruption } = args;
  report.configRebuilt = await rebuildLostConfig(args.repo, args.passphrase);
  // The cache's slot is taken (its folder of temporary files holds the indexes built here) but not caught up:
  // the segments are all replaced in step 3 and the cache caught up (rebuilt) in step 4, before its first
  // lookup. A catch-up at open would hold its memory and time for nothing (SPEC.md 19.12, "Memory").
  const repo = await Repository.open(args.repo, { access: 'exclusive', command: 'repair', manyWriters: true, catchUpLater: true, passphrase: args.passphrase, signal: args.signal, onNotice: args.notice });
  const building = join(repo.session.tempDir, `repair-index.${randomBytes(4).toString('hex')}`);
  try {
    // Not raced: the acquisition ends on the signal itself and deletes its pending lease before it throws.
    await repo.session.takeExclusive({ waitMs: REPAIR_EXCLUSIVE_WAIT_MS, signal: args.signal }).catch((error: unknown) => {
      throw interruption.aborted ? interruption.error() : error;
    });
    const lease = repo.session.lease;
    const already = await listQuarantine(repo.store);
    const checked = await checkPacksIntoIndex(building, { repo, already, workers: args.workers, interruption, onProgress: args.onProgress }, report);

    // The old index: every segment that can still be read; the others are named by their keys only.
    const present: SegmentName[] = [];
    for await (const info of repo.store.list(SEGMENT_PREFIX, { signal: args.signal })) {
      const name = parseSegmentKey(info.key);
      if (name) present.push(name);
    }
    // Read into an index on disk (gc's working index), one segment in memory at a time: memory does not
    // grow with the old index's entries.
    const oldIndex = await GcIndex.create(join(repo.session.tempDir, `repair-old-index.${randomBytes(4).toString('hex')}`));
    try {
      const { damaged } = await oldIndex.readSegments(repo.store, { dataKey: repo.keys?.dataKey, signal: args.signal, tick: () => interruption.tick() });
      for (const d of damaged) args.notice(`index segment ${d.key} cannot be read (${d.why}): repair replaces it`);
      report.previousIndex = present.length === 0 ? 'missing' : damaged.length > 0 ? 'unreadable' : 'readable';
      const place = damagePlacer(checked, already);
      for await (const entry of oldIndex.winners()) {
        await interruption.tick();
        place(entry);
      }
    } finally {
      await oldIndex.close();
    }
    report.quarantined = checked.found.filter((f) => !already.has(quarantineKey(f.pack, f.offset)));
    interruption.check();

    // From here to the switch an interruption waits (seconds): quarantine records without the new segments
    // would leave the old ones naming frames set aside.
    args.done.quarantined = report.quarantined.length;
    lease.assertHeld();
    await addToQuarantine(repo.store, report.quarantined);
    crashPoint('repair-quarantined');
    const context = { storage: repo.store, dataKey: repo.keys?.dataKey, assertHeld: () => lease.assertHeld() };
    const writer = randomBytes(16).toString('hex');
    let seq = 0;
    const step = async (s: GcStep): Promise<void> => applyGcStep(s, context);
    const old = present.sort((a, b) => compareKeys(segmentKey(a), segmentKey(b)));
    const built = await IndexStore.open(building, { create: false });
    try {
      // Entries in parts of FLUSH_ENTRIES (memory: one part); the usual case, one part and at most
      // SEGMENT_MAX_SUPERSEDED old segments, is one segment that both names and supersedes (as gc's plan).
      let pending: SegmentEntry[] = [];
      let parts = 0;
      const flush = async (): Promise<void> => {
        if (pending.length === 0) return;
        await step({ kind: 'write-entries', segment: { name: { writer, seq: seq++ }, supersedes: [], entries: pending } });
        pending = [];
        parts++;
      };
      for await (const entry of built.blobs()) {
        if (pending.length >= FLUSH_ENTRIES) await flush();
        pending.push(entry);
      }
      if (parts === 0 && old.length <= SEGMENT_MAX_SUPERSEDED) {
        if (pending.length > 0 || old.length > 0) await step({ kind: 'write-switch', segment: { name: { writer, seq: seq++ }, supersedes: old, entries: pending } });
      } else {
        await flush();
        for (let at = 0; at < old.length; at += SEGMENT_MAX_SUPERSEDED) {
          await step({ kind: 'write-switch', segment: { name: { writer, seq: seq++ }, supersedes: old.slice(at, at + SEGMENT_MAX_SUPERSEDED), entries: [] } });
        }
      }
    } finally {
      await built.close();
    }
    crashPoint('repair-index-swapped');
    args.done.installed = true;
    for (const name of old) await step({ kind: 'delete-segment', key: segmentKey(name) });

    const caughtUp = await repo.session.cache.catchUp();
    for (const d of caughtUp.damaged) args.notice(`index segment ${d.key} cannot be read (${d.why})`);
    await reportStillDamaged(repo, report, interruption);
    return report;
  } finally {
    await rm(building, { recursive: true, force: true }).catch(() => undefined);
    await repo.close();
  }
}

/** A config that is missing or damaged in what holds a version-3 repository's objects is rebuilt (19.12). */
async function rebuildLostConfig(root: string, passphrase: Passphrase | undefined): Promise<RebuiltConfig | null> {
  const storage = await openLocation(root);
  try {
    try {
      await Repository.loadConfig(root, storage);
      return null;
    } catch (error) {
      if (!(error instanceof NotARepositoryError) || !(await hasVersion3Objects(storage))) throw error;
      const why = String(error.details.why ?? error.message);
      const rebuilt = await rebuildVersion3Config(storage, root, why, { passphrase, cacheRoot: defaultCacheRoot() });
      const c = rebuilt.config;
      return { why, id: c.id, blockSize: c.blockSize, version: c.version, encrypted: c.encryption !== undefined, sources: rebuilt.sources, objectLock: c.objectLock ?? null, keptAs: rebuilt.keptAs };
    }
  } finally {
    await storage.close();
  }
}
