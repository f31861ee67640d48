/**
 * The lease protocol (SPEC.md 19.5): shared and exclusive holds on a repository through objects in the store,
 * safe without compare-and-swap. What it needs of the store: create-if-absent, whole-object replace, and a
 * listing that reflects every put and delete completed before it started (Storage.properties
 * consistentListing; S3 and RGW give it, a local folder does).
 *
 * Acquiring is *write, then look*:
 * - shared: create my `shared` lease, then list; if another live lease is exclusive or exclusive-pending,
 *   delete mine and wait (writer preference); else I hold it.
 * - exclusive: create my `exclusive-pending` lease, then list: another live `exclusive`, or a pending one
 *   with a smaller id, and I delete mine and back off; any other live lease (shared, a pending with a larger
 *   id) and I keep mine and look again later; none, and I hold the repository alone (the lease is rewritten
 *   as `exclusive`, for people and for later acquirers).
 * Why two holders that conflict cannot both hold: each created its lease before it listed, and each listing
 * reflects every put completed before it. Of two conflicting acquirers the one that listed last listed after
 * the other's lease was written, so it saw it, and the rules above make it back off or wait: a shared one
 * backs off from any pending or exclusive one; an exclusive one holds only on a listing with no other live
 * lease at all. (A pending lease with a larger id seen by a smaller one is waited for, not ignored: its
 * owner sees the smaller one on its own listing and backs off.)
 *
 * Writer preference is bounded: an exclusive acquirer waits at most its `waitMs` for the shared holders
 * to finish, then deletes its pending lease and fails (ENGINE_REPOSITORY_LOCKED): new shared acquirers are
 * held back for no longer than that.
 *
 * A holder rewrites its lease every T/3 and stops when T − B has passed on its monotonic clock since the
 * start of its last successful write (HeldLease.assertHeld; ENGINE_LEASE_LOST), before any other host may
 * judge it expired (lease.ts: `expires + 2B` on theirs). Every write of a lease checks this host's clock
 * against the store's (the written object's modification time): beyond B, ENGINE_CLOCK_SKEW.
 */
import { randomBytes } from 'node:crypto';
import { holding } from '../held.js';
import { crashPoint } from '../crash-points.js';
import { ClockSkewError, EngineError, LeaseLostError, RepositoryLockedError } from '../errors.js';
import { isStorageError, StorageError } from '../storage/storage-error.js';
import type { ObjectInfo, Storage } from '../storage/storage.js';
import type { Clock } from './clock.js';
import {
  decodeLease,
  encodeLease,
  judgeLease,
  LEASE_MAX_SIZE,
  LEASE_PREFIX,
  LEASE_VERSION,
  leaseIdOfKey,
  leaseKey,
  type Lease,
  type LeaseHolder,
  type LeaseKind,
  type LeaseState,
  type ProcessProbe,
} from './lease.js';

export interface LeaseTiming {
  /** T: a lease is valid this long after it was written. */
  leaseMs: number;
  /** B: the largest difference allowed between this host's clock and the store's. B < T/4. */
  skewBoundMs: number;
  /** How often a waiting acquirer looks again (± 50% jitter). */
  pollMs: number;
}

export const DEFAULT_LEASE_TIMING: Readonly<LeaseTiming> = { leaseMs: 300_000, skewBoundMs: 60_000, pollMs: 2_000 };

/** S3's Last-Modified has whole seconds: the store's time of a write is known to within this. */
const STORE_TIME_RESOLUTION_MS = 1000;

export interface LeaseContext {
  storage: Storage;
  clock: Clock;
  /** This process (host.ts: thisProcess). */
  holder: LeaseHolder;
  /** Same-host liveness (host.ts: processProbe). */
  probe: ProcessProbe;
  timing?: Partial<LeaseTiming> | undefined;
  /** Lease ids; random by default. */
  newId?: (() => string) | undefined;
  /** Told of every lease broken because its holder is dead or its lease expired (for a notice). */
  onBroken?: ((lease: Lease, state: Exclude<LeaseState, 'live'>) => void) | undefined;
}

export interface AcquireOptions {
  /** What the lease is for: backup, restore, gc … (shown to whoever waits). */
  command: string;
  /** Shared leases: refuse (ENGINE_REPOSITORY_LOCKED, without waiting) when another live lease has the same command (one gc at a time). */
  alone?: boolean | undefined;
  /** How long to wait for conflicting holders before ENGINE_REPOSITORY_LOCKED; 0: do not wait. */
  waitMs?: number | undefined;
  signal?: AbortSignal | undefined;
}

/** What `unlock` found of one lease, and whether it removed it. */
export interface UnlockedLease {
  key: string;
  lease: Lease | undefined;
  state: LeaseState | 'unreadable';
  removed: boolean;
}

/** Another lease seen by an acquirer: decoded, or unreadable (damaged: counted as live and of any kind). */
type Seen = { key: string; lease: Lease } | { key: string; lease: undefined; why: string };

function timingOf(context: LeaseContext): LeaseTiming {
  const timing = { ...DEFAULT_LEASE_TIMING, ...context.timing };
  if (!(timing.skewBoundMs > 0 && timing.skewBoundMs * 4 < timing.leaseMs && timing.pollMs > 0)) {
    throw new RangeError(`lease timing needs 0 < B < T/4 and a positive poll interval (T ${timing.leaseMs} ms, B ${timing.skewBoundMs} ms)`);
  }
  return timing;
}

/** The lease as v1/v2's lock error names a holder. */
function asLockHolder(lease: Lease): { pid: number; hostname: string; since: string; command: string; identity?: string } {
  return { pid: lease.pid, hostname: lease.hostname, since: lease.since, command: `${lease.command}, ${lease.kind} lease ${lease.id} until ${lease.expires}` };
}

function lockedError(storage: Storage, blocker: Seen | undefined, waitedMs: number): RepositoryLockedError {
  const where = storage.properties.location;
  if (blocker?.lease) {
    return new RepositoryLockedError(where, asLockHolder(blocker.lease), {
      condition: `waited ${Math.round(waitedMs / 1000)} s for it`,
      remedy: { kind: 'unlock', repo: where, force: true, removes: `the lease ${blocker.key}`, when: 'its holder has stopped (it is removed by itself once it expires)' },
    });
  }
  return new RepositoryLockedError(where, undefined, {
    condition: `the lease ${blocker?.key ?? '?'} cannot be read (${blocker && !blocker.lease ? blocker.why : 'unknown'}); it counts as held until removed`,
    remedy: { kind: 'unlock', repo: where, force: true, removes: `the lease ${blocker?.key ?? '?'}` },
  });
}

/**
 * A lease this process holds. The work it protects calls assertHeld() before each write that relies on it
 * (a segment, a record, a deletion), and stops when `lost` fires.
 */
export class HeldLease {
  private lease: Lease;
  /** Monotonic ms: the start of the last successful write of the lease. */
  private writtenAt = Number.NEGATIVE_INFINITY;
  private lostWhy: string | undefined;
  private readonly lostController = new AbortController();
  private keepAliveController: AbortController | undefined;
  private keepAliveDone: Promise<void> | undefined;
  private released = false;
  /** Set once acquired: this process then holds a lease (repo-format/held.ts) until release(). */
  private unhold: (() => void) | undefined;

  constructor(
    private readonly context: LeaseContext,
    private readonly timing: LeaseTiming,
    lease: Lease,
  ) {
    this.lease = lease;
  }

  get id(): string {
    return this.lease.id;
  }

  get kind(): LeaseKind {
    return this.lease.kind;
  }

  get key(): string {
    return leaseKey(this.lease.id);
  }

  /** Fires when the lease is lost: the holder's work must stop. */
  get lost(): AbortSignal {
    return this.lostController.signal;
  }

  /** Monotonic ms until which the holder may rely on the lease. */
  get validUntil(): number {
    return this.writtenAt + this.timing.leaseMs - this.timing.skewBoundMs;
  }

  /** Throws ENGINE_LEASE_LOST unless the lease is still provably held. */
  assertHeld(): void {
    if (this.lostWhy === undefined && this.context.clock.monotonic() >= this.validUntil) {
      this.markLost(`it was not refreshed within ${Math.round((this.timing.leaseMs - this.timing.skewBoundMs) / 1000)} s`);
    }
    if (this.lostWhy !== undefined) throw new LeaseLostError(this.context.storage.properties.location, this.key, this.lostWhy);
  }

  private markLost(why: string): void {
    if (this.lostWhy !== undefined) return;
    this.lostWhy = why;
    this.lostController.abort(new LeaseLostError(this.context.storage.properties.location, this.key, why));
  }

  /**
   * Writes the lease (create-if-absent the first time), with `expires` = now + T, and checks the clock
   * against the store's. Valid from the start of the write.
   */
  async write(kind: LeaseKind, create: boolean, signal?: AbortSignal): Promise<void> {
    const { storage, clock } = this.context;
    const startedAt = clock.monotonic();
    const wallBefore = clock.wall();
    const next: Lease = { ...this.lease, kind, expires: new Date(wallBefore + this.timing.leaseMs).toISOString() };
    await storage.put(this.key, encodeLease(next), { ifAbsent: create, signal });
    const wallAfter = clock.wall();
    let info: ObjectInfo;
    try {
      info = await storage.stat(this.key, { signal });
    } catch (error) {
      if (!isStorageError(error, 'not-found')) throw error;
      // Broken between the put and the stat: judged expired (a stalled process) by another.
      this.markLost('it was removed by another process');
      throw new LeaseLostError(storage.properties.location, this.key, 'it was removed by another process');
    }
    this.lease = next;
    const skewProblem = checkSkew(wallBefore, wallAfter, info.modified, this.timing.skewBoundMs);
    if (skewProblem) {
      await storage.delete(this.key).catch(() => undefined);
      this.markLost('clock skew');
      throw new ClockSkewError(storage.properties.location, skewProblem.why, { skewMs: skewProblem.skewMs, boundMs: this.timing.skewBoundMs });
    }
    if (!create && startedAt > this.writtenAt + this.timing.leaseMs - this.timing.skewBoundMs) {
      // Others may already have judged the old one expired and acted on it.
      this.markLost(`it was refreshed too late (${Math.round((startedAt - this.writtenAt) / 1000)} s after the last write)`);
      this.assertHeld();
    }
    this.writtenAt = startedAt;
  }

  /** Rewrites the lease if it is still this process's; ENGINE_LEASE_LOST if it was removed or replaced. */
  async refresh(signal?: AbortSignal): Promise<void> {
    this.assertHeld();
    let bytes: Buffer;
    try {
      bytes = await this.context.storage.get(this.key, { maxSize: LEASE_MAX_SIZE, signal });
    } catch (error) {
      if (isStorageError(error, 'not-found')) {
        this.markLost('it was removed by another process');
        this.assertHeld();
      }
      throw error;
    }
    const stored = decodeLease(bytes, this.key);
    if (typeof stored === 'string' || stored.pid !== this.lease.pid || stored.host !== this.lease.host || stored.since !== this.lease.since) {
      this.markLost('it was replaced by another process');
      this.assertHeld();
    }
    await this.write(this.lease.kind, false, signal);
  }

  /**
   * Refreshes every T/3 until released; a failed refresh is tried again every poll interval until the
   * lease's validity ends, and then the lease is lost (`lost` fires).
   */
  keepAlive(): void {
    if (this.keepAliveController || this.released) return;
    const controller = new AbortController();
    this.keepAliveController = controller;
    const { clock } = this.context;
    this.keepAliveDone = (async () => {
      let wait = this.timing.leaseMs / 3;
      let failure: unknown;
      while (!controller.signal.aborted && this.lostWhy === undefined) {
        try {
          await clock.sleep(wait, controller.signal);
        } catch {
          return;
        }
        if (failure !== undefined && clock.monotonic() >= this.validUntil) {
          this.markLost(`it could not be refreshed: ${failure instanceof Error ? failure.message : String(failure)}`);
          return;
        }
        try {
          await this.refresh(controller.signal);
          wait = this.timing.leaseMs / 3;
          failure = undefined;
        } catch (error) {
          if (controller.signal.aborted) return;
          if (error instanceof EngineError && (error.code === 'ENGINE_LEASE_LOST' || error.code === 'ENGINE_CLOCK_SKEW')) return;
          // A store that fails now may answer in a moment: try again until the validity runs out.
          failure = error;
          if (clock.monotonic() >= this.validUntil) {
            this.markLost(`it could not be refreshed: ${error instanceof Error ? error.message : String(error)}`);
            return;
          }
          wait = Math.min(this.timing.pollMs, Math.max(1, this.validUntil - clock.monotonic()));
        }
      }
    })();
  }

  /** Records that the acquirer now holds this lease (what a slow stop after SIGINT says it releases). */
  acquired(): this {
    this.unhold ??= holding('lease');
    return this;
  }

  /** Stops refreshing and deletes the lease (or, with credentials that may not delete, retires it). */
  async release(): Promise<void> {
    this.released = true;
    if (this.unhold) crashPoint('guard-releasing');
    try {
      this.keepAliveController?.abort();
      await this.keepAliveDone;
      await this.discard();
    } finally {
      this.unhold?.();
    }
  }

  /**
   * Deletes the lease. Append-only credentials (SPEC.md 20.5: a backup whose user may put but not delete)
   * are refused the delete (`denied`): the lease is then rewritten in place with `expires` 4B before now, so
   * that every observer, whose clock is within 2B of this one's, judges it expired at once (live only while
   * now ≤ expires + 2B) — the holder has stopped relying on it — and the next process with delete rights that
   * looks (gc, prune, another backup with full credentials) breaks it as any expired lease.
   */
  async discard(): Promise<void> {
    const { storage, clock } = this.context;
    try {
      await storage.delete(this.key);
    } catch (error) {
      if (!isStorageError(error, 'denied')) throw error;
      const retired: Lease = { ...this.lease, expires: new Date(clock.wall() - 4 * this.timing.skewBoundMs - STORE_TIME_RESOLUTION_MS).toISOString() };
      await storage.put(this.key, encodeLease(retired));
      this.lease = retired;
    }
  }
}

/**
 * What a reader holds when it cannot write a lease (SPEC.md 19.9, "Without a lease"): a repository on a
 * read-only filesystem or mount, or credentials that may not write. Nothing is in the store: there is
 * nothing to refresh, to lose or to delete, and every check passes. A gc elsewhere cannot see such a reader.
 */
class UnwrittenLease extends HeldLease {
  override assertHeld(): void {}
  override async refresh(): Promise<void> {}
  override keepAlive(): void {}
  override async release(): Promise<void> {}
}

/** Why the local clock is beyond the bound, measured around one write (`modified`: the store's time of it). */
export function checkSkew(wallBefore: number, wallAfter: number, modified: number | undefined, boundMs: number): { why: string; skewMs?: number } | undefined {
  if (modified === undefined || !Number.isFinite(modified)) return { why: 'the store reports no modification time to check the clock against' };
  // The store wrote the object at some local time in [wallBefore, wallAfter], stamped within the resolution.
  const lowest = wallBefore - modified - STORE_TIME_RESOLUTION_MS;
  const highest = wallAfter - modified;
  const skewMs = Math.round((wallBefore + wallAfter) / 2 - modified);
  if (lowest > boundMs) return { why: `this host's clock is ${Math.round(skewMs / 1000)} s ahead of the store's, more than the ${boundMs / 1000} s allowed`, skewMs };
  if (highest < -boundMs) return { why: `this host's clock is ${Math.round(-skewMs / 1000)} s behind the store's, more than the ${boundMs / 1000} s allowed`, skewMs };
  return undefined;
}

export class Leases {
  private readonly timing: LeaseTiming;

  constructor(private readonly context: LeaseContext) {
    this.timing = timingOf(context);
    // Write-then-look is safe only if a listing shows every lease written before it started.
    if (!context.storage.properties.consistentListing) {
      throw new StorageError('refused', `${context.storage.properties.location}: the store does not promise listings that show every completed write; leases cannot be trusted on it`, {
        location: context.storage.properties.location,
        operation: 'lease',
      });
    }
  }

  /** A reader's stand-in for a lease it could not write (UnwrittenLease). */
  unwritten(command: string): HeldLease {
    return new UnwrittenLease(this.context, this.timing, this.leaseOf('shared', command));
  }

  private newLease(kind: LeaseKind, command: string): HeldLease {
    return new HeldLease(this.context, this.timing, this.leaseOf(kind, command));
  }

  private leaseOf(kind: LeaseKind, command: string): Lease {
    const id = this.context.newId?.() ?? randomBytes(16).toString('hex');
    const lease: Lease = {
      version: LEASE_VERSION,
      id,
      kind,
      ...this.context.holder,
      command,
      since: new Date(this.context.clock.wall()).toISOString(),
      expires: new Date(this.context.clock.wall() + this.timing.leaseMs).toISOString(),
    };
    return lease;
  }

  /**
   * Every other lease, live; dead and expired ones are deleted on the way (broken). Unreadable ones are
   * returned as live: only `unlock --force` removes them.
   */
  async survey(ownKey: string | undefined, signal?: AbortSignal): Promise<Seen[]> {
    const { storage, clock, probe } = this.context;
    const seen: Seen[] = [];
    for await (const info of storage.list(LEASE_PREFIX, { signal })) {
      if (info.key === ownKey || leaseIdOfKey(info.key) === undefined) continue;
      let bytes: Buffer;
      try {
        bytes = await storage.get(info.key, { maxSize: LEASE_MAX_SIZE, signal });
      } catch (error) {
        if (isStorageError(error, 'not-found')) continue; // released meanwhile
        if (isStorageError(error, 'too-large')) {
          seen.push({ key: info.key, lease: undefined, why: 'larger than a lease' });
          continue;
        }
        throw error;
      }
      const lease = decodeLease(bytes, info.key);
      if (typeof lease === 'string') {
        seen.push({ key: info.key, lease: undefined, why: lease });
        continue;
      }
      const state = judgeLease(lease, { host: this.context.holder.host, boot: this.context.holder.boot, now: clock.wall(), skewBoundMs: this.timing.skewBoundMs }, probe);
      if (state === 'live') {
        seen.push({ key: info.key, lease });
        continue;
      }
      try {
        await storage.delete(info.key, { signal });
      } catch (error) {
        // Append-only credentials: an expired or dead lease counts for nothing whether or not it can be
        // removed; one with delete rights (gc) removes it later.
        if (isStorageError(error, 'denied')) continue;
        throw error;
      }
      this.context.onBroken?.(lease, state);
    }
    return seen;
  }

  /**
   * `engine unlock` in version 3 (SPEC.md 19.5): removes dead and expired leases, and with `force` every
   * lease, live or unreadable (whose holder, if it still works, then loses it at its next refresh).
   */
  async unlock(options: { force: boolean; signal?: AbortSignal | undefined }): Promise<UnlockedLease[]> {
    const { storage, clock, probe, holder } = this.context;
    const result: UnlockedLease[] = [];
    for await (const info of storage.list(LEASE_PREFIX, { signal: options.signal })) {
      if (leaseIdOfKey(info.key) === undefined) continue;
      let state: UnlockedLease['state'];
      let lease: Lease | undefined;
      try {
        const decoded = decodeLease(await storage.get(info.key, { maxSize: LEASE_MAX_SIZE, signal: options.signal }), info.key);
        if (typeof decoded === 'string') state = 'unreadable';
        else {
          lease = decoded;
          state = judgeLease(decoded, { host: holder.host, boot: holder.boot, now: clock.wall(), skewBoundMs: this.timing.skewBoundMs }, probe);
        }
      } catch (error) {
        if (isStorageError(error, 'not-found')) continue;
        if (!isStorageError(error, 'too-large')) throw error;
        state = 'unreadable';
      }
      const removed = state === 'dead' || state === 'expired' || options.force;
      if (removed) await storage.delete(info.key, { signal: options.signal });
      result.push({ key: info.key, lease, state, removed });
    }
    return result;
  }

  /**
   * Creates the lease; if anything fails after the put (the stat, the skew check), it is deleted again.
   * False when it was broken by another before it could be checked (a stalled process): try again.
   */
  private async create(held: HeldLease, kind: LeaseKind, signal: AbortSignal | undefined): Promise<boolean> {
    try {
      await held.write(kind, true, signal);
      return true;
    } catch (error) {
      await this.context.storage.delete(held.key).catch(() => undefined);
      if (error instanceof LeaseLostError) return false;
      throw error;
    }
  }

  private async pause(signal: AbortSignal | undefined): Promise<void> {
    const { pollMs } = this.timing;
    await this.context.clock.sleep(pollMs / 2 + Math.random() * pollMs, signal);
  }

  /** A shared lease: backup, restore, verify, serve, mount, prune, forget, gc's mark and copy. */
  async acquireShared(options: AcquireOptions): Promise<HeldLease> {
    const { clock } = this.context;
    const started = clock.monotonic();
    const blocks = (seen: Seen): boolean => seen.lease === undefined || seen.lease.kind !== 'shared';
    for (;;) {
      // Look first (cheap, and it breaks what is dead); then write, and look again: that look decides.
      let blocker = (await this.survey(undefined, options.signal)).find(blocks);
      if (!blocker) {
        const held = this.newLease('shared', options.command);
        if (!(await this.create(held, 'shared', options.signal))) {
          await this.pause(options.signal);
          continue;
        }
        let others: Seen[];
        try {
          others = await this.survey(held.key, options.signal);
        } catch (error) {
          await this.context.storage.delete(held.key).catch(() => undefined);
          throw error;
        }
        blocker = others.find(blocks);
        // One at a time (gc), by the same write-then-look: of two at once, at least one sees the other.
        const twin = options.alone ? others.find((seen) => seen.lease?.command === options.command) : undefined;
        if (!blocker && twin) {
          await held.discard();
          throw lockedError(this.context.storage, twin, 0);
        }
        if (!blocker) return held.acquired();
        await held.discard();
      }
      if (clock.monotonic() - started >= (options.waitMs ?? 0)) throw lockedError(this.context.storage, blocker, clock.monotonic() - started);
      await this.pause(options.signal);
    }
  }

  /** The exclusive lease: gc's commit (segment consolidation and deletion), repair's rebuild, migrate. */
  async acquireExclusive(options: AcquireOptions): Promise<HeldLease> {
    const { clock, storage } = this.context;
    const started = clock.monotonic();
    const outOfTime = (): boolean => clock.monotonic() - started >= (options.waitMs ?? 0);
    for (;;) {
      const held = this.newLease('exclusive-pending', options.command);
      if (!(await this.create(held, 'exclusive-pending', options.signal))) {
        await this.pause(options.signal);
        continue;
      }
      let lastBlocker: Seen | undefined;
      try {
        for (;;) {
          const others = await this.survey(held.key, options.signal);
          const yieldTo = others.find((seen) => seen.lease !== undefined && (seen.lease.kind === 'exclusive' || (seen.lease.kind === 'exclusive-pending' && seen.lease.id < held.id)));
          if (yieldTo) {
            lastBlocker = yieldTo;
            break; // back off: delete mine, wait, try again with a new id
          }
          if (others.length === 0) {
            try {
              await held.write('exclusive', false, options.signal);
              return held.acquired();
            } catch (error) {
              // The pending lease lapsed before this write: others may have broken it and gone ahead.
              if (!(error instanceof LeaseLostError)) throw error;
              break;
            }
          }
          lastBlocker = others[0];
          if (outOfTime()) break;
          if (clock.monotonic() >= held.validUntil - this.timing.leaseMs / 2) {
            try {
              await held.refresh(options.signal);
            } catch (error) {
              // A pending lease that lapsed while waiting (a stalled process) protected nothing yet: start over.
              if (!(error instanceof LeaseLostError)) throw error;
              break;
            }
          }
          await this.pause(options.signal);
        }
      } catch (error) {
        await storage.delete(held.key).catch(() => undefined);
        throw error;
      }
      await storage.delete(held.key);
      if (outOfTime()) throw lockedError(storage, lastBlocker, clock.monotonic() - started);
      await this.pause(options.signal);
    }
  }
}
