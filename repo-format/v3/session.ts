/**
 * What a command holds while it works on a version-3 repository (SPEC.md 19.4, 19.5, 19.7): the host's
 * cache directory and id, its shared lease (kept alive until released), a slot of the per-host index
 * cache caught up with the store after the lease was taken, the slot's folder of temporary files, and for
 * a writer its segment writer. The index the repository's blob writers and readers ask is the cache and,
 * first, this writer's own entries not yet in a segment.
 */
import { homedir } from 'node:os';
import { join } from 'node:path';
import { mkdir, rm } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import type { RepositoryConfig } from '../config.js';
import { LEASE_SKEW_BOUND_MS, LEASE_TIME_MS } from '../constants.js';
import { createPrivateDirectory } from '../file-modes.js';
import { forgetSpareFiles } from '../pack-file.js';
import type { PackPresence } from '../pack-presence.js';
import type { BlobIndex, BlobLocation, IndexEntry } from '../index-entry.js';
import type { Storage } from '../storage/storage.js';
import { crashPoint } from '../crash-points.js';
import { systemClock } from './clock.js';
import { hostIdOf, processProbe, thisProcess } from './host.js';
import { IndexCache, type CatchUpResult } from './index-cache.js';
import { Leases, type HeldLease } from './leases.js';
import { isStorageError } from '../storage/storage-error.js';
import { SegmentWriter } from './segment-writer.js';
import { entryAt, locationAt, type SegmentEntry } from './segment.js';

/** The host's cache directory (SPEC.md 19.4): $ENGINE_CACHE_DIR, else /var/cache/engine for root, else $XDG_CACHE_HOME/engine or ~/.cache/engine. */
export function defaultCacheRoot(env: Readonly<Record<string, string | undefined>> = process.env): string {
  if (env.ENGINE_CACHE_DIR) return env.ENGINE_CACHE_DIR;
  if (process.getuid?.() === 0) return '/var/cache/engine';
  if (env.XDG_CACHE_HOME) return join(env.XDG_CACHE_HOME, 'engine');
  return join(homedir(), '.cache', 'engine');
}

export interface V3SessionOptions {
  storage: Storage;
  config: RepositoryConfig;
  dataKey?: Uint8Array | undefined;
  /** What the lease says holds it (backup, restore, verify …). */
  command: string;
  /** A writer gets a segment writer (backup); readers do not. */
  writer: boolean;
  /** A reader that may go on without a lease when the store does not let it write one (restore, verify, serve, mount). */
  readWithoutLease?: boolean | undefined;
  /** Refuse (ENGINE_REPOSITORY_LOCKED) while another live lease has the same command: one gc at a time (SPEC.md 19.5). */
  alone?: boolean | undefined;
  /** The cache's slot is taken but not caught up: the caller catches it up before any lookup (repair). */
  catchUpLater?: boolean | undefined;
  signal?: AbortSignal | undefined;
  notice: (message: string) => void;
  cacheRoot?: string | undefined;
  /** Write no lease at all (a point-in-time view, `--as-of`: read-only, and the store it shows is the past). */
  noLease?: boolean | undefined;
  /**
   * A cache of this process's own, in a fresh folder under the cache directory, removed at close: what a
   * point-in-time view shows is not the repository's present, which the host's cache follows.
   */
  privateCache?: boolean | undefined;
}

/**
 * The shared lease; or, for a reader (`readWithoutLease`) that the store does not let write it (a read-only
 * filesystem or mount: EROFS, EACCES, EPERM; S3 credentials that may not write: AccessDenied), a stand-in
 * that holds nothing, said in one notice (SPEC.md 19.9, "Without a lease"). A writer, and gc, fail as before.
 */
async function acquireOrReadWithout(leases: Leases, options: V3SessionOptions, waitMs: number): Promise<HeldLease> {
  try {
    return await leases.acquireShared({ command: options.command, alone: options.alone, waitMs, signal: options.signal });
  } catch (error) {
    if (!options.readWithoutLease || options.writer || !isStorageError(error, 'denied')) throw error;
    const why = error.storage.backendCode ?? 'denied';
    options.notice(
      `repository ${options.storage.properties.location} cannot be written (${why}): ${options.command} reads it without a lease, so a gc run meanwhile through a path that can write could delete what it reads (every frame is checked: it would then fail, never return wrong data)`,
    );
    return leases.unwritten(options.command);
  }
}

export class V3Session implements BlobIndex {
  /** Records the cache is known to cover: listed or read before a catch-up started (see cover). */
  private readonly covered = new Set<string>();
  /** Catch-ups one at a time. */
  private catching: Promise<void> = Promise.resolve();
  /** Damaged segments already reported (a catch-up tries them again, the notice is given once). */
  private readonly reportedDamaged = new Set<string>();
  /** A private cache directory (privateCache), removed at close. */
  private privateRoot: string | undefined;

  private constructor(
    private held: HeldLease,
    private readonly leases: Leases,
    private readonly command: string,
    readonly cache: IndexCache,
    /** The slot's own folder of temporary files (packs being built): only this process uses it. */
    readonly tempDir: string,
    readonly catchUp: CatchUpResult,
    readonly segments: SegmentWriter | undefined,
    private readonly notice: (message: string) => void,
  ) {
    for (const damaged of catchUp.damaged) this.reportedDamaged.add(damaged.key);
  }

  /**
   * Makes the cache cover the records `ids`, which the caller has just listed or read from the store: a
   * record is created only after the segments naming its blobs are durable (SPEC.md 19.7, invariant 2'), so
   * a catch-up that starts after the record was seen ingests them. Without it, a record committed by
   * another writer after this process's first catch-up would look damaged (its blobs "not in the index").
   * One listing of index/ when nothing is new; nothing at all for records already covered.
   */
  async cover(ids: readonly string[]): Promise<void> {
    const uncovered = (): boolean => ids.some((id) => !this.covered.has(id));
    if (!uncovered()) return;
    const run = this.catching.then(async () => {
      if (!uncovered()) return;
      await this.catchUpNow();
      for (const id of ids) this.covered.add(id);
    });
    this.catching = run.catch(() => undefined);
    await run;
  }

  /** One catch-up of the cache with the store, each damaged segment reported once. */
  private async catchUpNow(): Promise<void> {
    const result = await this.cache.catchUp();
    for (const damaged of result.damaged) {
      if (this.reportedDamaged.has(damaged.key)) continue;
      this.reportedDamaged.add(damaged.key);
      this.notice(`index segment ${damaged.key} cannot be read (${damaged.why}): the blobs it names count as absent`);
    }
  }

  /**
   * SPEC.md 19.7, step 3a: this run proved some index entries dead (their pack is gone or short) and stored
   * those blobs again. Until the dead entries leave the index, an effective segment whose key sorts before
   * this writer's would still win for those blobs (19.3) and send every reader to the lost pack. So every
   * effective segment naming a dead entry is replaced by a copy without it, each in one put that supersedes
   * it, before the record. A blob may have had entries in several lost packs (duplicates, 19.3): once the
   * first are dropped, the entry now in effect for each blob whose entry was dropped is checked in turn
   * (a stat per pack not yet asked), and the round is repeated while that proves more packs lost. A crash
   * in between leaves some replaced and no record: nothing a committed backup needs changed (what is
   * dropped names nothing), and the next backup that meets the loss does the rest.
   */
  private async dropDeadEntries(presence: PackPresence): Promise<void> {
    const segments = this.segments!;
    let replaced = 0;
    let dropped = 0;
    for (let dead = presence.provenDead(); dead !== undefined; ) {
      const test = dead;
      // Segments committed by other writers since this run's catch-up are effective too.
      await this.catchUpNow();
      const droppedIds = new Map<string, Buffer>();
      await this.cache.eachIngested(async (view) => {
        // Scanned in its bytes, one entry's place at a time: only a segment that names a dead entry is
        // turned into entries (its copy's).
        let first = 0;
        while (first < view.count && !test(locationAt(view, first))) first++;
        if (first === view.count) return;
        const kept: SegmentEntry[] = [];
        for (let i = 0; i < view.count; i++) {
          const entry = entryAt(view, i);
          if (i >= first && test(entry)) droppedIds.set(entry.id.toString('hex'), entry.id);
          else kept.push(entry);
        }
        await segments.replace(view.name, kept);
        replaced++;
        dropped += view.count - kept.length;
      });
      if (droppedIds.size === 0) break;
      // The cache meets the copies (and rebuilds); what now wins for those blobs must name a pack that is there.
      await this.catchUpNow();
      const proven = presence.provenCount;
      await presence.filter(await this.cache.lookup([...droppedIds.values()]));
      dead = presence.provenCount > proven ? presence.provenDead() : undefined;
    }
    if (replaced > 0) this.notice(`dropped ${dropped} index entries naming lost packs from ${replaced} index segment${replaced === 1 ? '' : 's'} (each replaced by a copy without them)`);
  }

  static async open(options: V3SessionOptions): Promise<V3Session> {
    const { storage, config, signal, notice } = options;
    const hostCacheRoot = options.cacheRoot ?? defaultCacheRoot();
    const privateRoot = options.privateCache ? join(hostCacheRoot, 'as-of', `${process.pid}-${randomBytes(4).toString('hex')}`) : undefined;
    if (privateRoot) await mkdir(privateRoot, { recursive: true, mode: 0o700 });
    const cacheRoot = privateRoot ?? hostCacheRoot;
    const hostId = await hostIdOf(cacheRoot);
    const timing = { leaseMs: config.leases?.timeMs ?? LEASE_TIME_MS, skewBoundMs: config.leases?.skewBoundMs ?? LEASE_SKEW_BOUND_MS };
    const leases = new Leases({
      storage,
      clock: systemClock,
      holder: thisProcess(hostId),
      probe: processProbe,
      timing,
      onBroken: (lease, state) => notice(`removed the ${state} ${lease.kind} lease ${lease.id} of ${lease.command} (pid ${lease.pid} on ${lease.hostname}, since ${lease.since})`),
    });
    const lease = options.noLease ? leases.unwritten(options.command) : await acquireOrReadWithout(leases, options, timing.leaseMs);
    lease.keepAlive();
    crashPoint('lease-held');
    let cache: IndexCache | undefined;
    try {
      // After the lease, never before: a gc that completed in between could have deleted packs the cache names.
      const opened = await IndexCache.open({ cacheRoot, repositoryId: config.id, storage, dataKey: options.dataKey, signal, catchUpLater: options.catchUpLater, onRebuild: (why) => notice(`rebuilt this host's index cache of the repository: ${why}`) });
      cache = opened.cache;
      for (const damaged of opened.catchUp.damaged) notice(`index segment ${damaged.key} cannot be read (${damaged.why}): the blobs it names count as absent`);
      // The slot is this process's alone (LevelDB's lock): whatever lies in its temporary folder is a dead holder's.
      const tempDir = `${cache.path}.tmp`;
      forgetSpareFiles(tempDir);
      await rm(tempDir, { recursive: true, force: true });
      await createPrivateDirectory(tempDir);
      const segments = options.writer
        ? new SegmentWriter({ storage, dataKey: options.dataKey, assertHeld: () => lease.assertHeld(), confirmHeld: () => lease.refresh(signal), onSegment: (segment) => cache!.ingest(segment), signal })
        : undefined;
      const session = new V3Session(lease, leases, options.command, cache, tempDir, opened.catchUp, segments, notice);
      session.privateRoot = privateRoot;
      return session;
    } catch (error) {
      await cache?.close().catch(() => undefined);
      await lease.release().catch(() => undefined);
      if (privateRoot) await rm(privateRoot, { recursive: true, force: true }).catch(() => undefined);
      throw error;
    }
  }

  /** The lease this process holds now: shared, or exclusive after `takeExclusive`. */
  get lease(): HeldLease {
    return this.held;
  }

  /**
   * gc's commit (SPEC.md 19.8, 2): lets the shared lease go, takes the exclusive one (the pending lease of
   * 19.5 first, waiting at most `waitMs` for the shared holders), keeps it alive, and catches the cache up
   * with the store under it (what writers committed meanwhile). The shared lease goes first: an exclusive
   * acquirer waits for every other lease, its own holder's included.
   */
  async takeExclusive(options: { waitMs: number; signal?: AbortSignal | undefined }): Promise<CatchUpResult> {
    await this.held.release();
    this.held = await this.leases.acquireExclusive({ command: this.command, waitMs: options.waitMs, signal: options.signal });
    this.held.keepAlive();
    return this.cache.catchUp();
  }

  async lookup(ids: readonly Buffer[]): Promise<(BlobLocation | undefined)[]> {
    const answer: (BlobLocation | undefined)[] = ids.map((id) => this.segments?.pendingEntry(id));
    const ask = ids.filter((_, i) => answer[i] === undefined);
    if (ask.length === 0) return answer;
    const cached = await this.cache.lookup(ask);
    let j = 0;
    return answer.map((found) => found ?? cached[j++]);
  }

  /** A writer's new pack, durable in the store: its entries go into the writer's next segment. */
  async addEntries(entries: readonly IndexEntry[]): Promise<void> {
    if (!this.segments) throw new Error('addEntries on a version-3 session opened for reading');
    await this.segments.addPack(entries);
  }

  /** Writes pending entries as a segment, then the record (create-if-absent): the commit point (SPEC.md 19.7). */
  async commitRecord(key: string, bytes: Uint8Array, presence?: PackPresence): Promise<void> {
    if (!this.segments) throw new Error('commitRecord on a version-3 session opened for reading');
    if (presence?.provenDead()) await this.dropDeadEntries(presence);
    await this.segments.commitRecord(key, bytes);
  }

  async close(): Promise<void> {
    await this.cache.close().catch(() => undefined);
    forgetSpareFiles(this.tempDir);
    await rm(this.tempDir, { recursive: true, force: true }).catch(() => undefined);
    await this.held.release().catch(() => undefined);
    if (this.privateRoot) await rm(this.privateRoot, { recursive: true, force: true }).catch(() => undefined);
  }
}
