/**
 * One worker pool for many jobs at once (the server's: engine/server/jobs.ts). A CLI command makes a BlockPool of its
 * own (block-pool.ts): its threads and 2 × 32 MiB of slots live and die with the command. A server running jobs side
 * by side would make one per job — W threads and 64 MiB of SharedArrayBuffer each, which V8 frees only on a full
 * collection — so it lends each job a BlockPool made of parts of this one instead (BlockPool's LeasedPool):
 *
 * - Threads: W for all jobs (one per core by default). A job's tasks wait in a queue of its own; the pool sends them
 *   to the threads round-robin over the jobs, at most IN_FLIGHT_PER_WORKER per thread at once, so a big job's queue
 *   never stands before a small job's task: the small one waits for the tasks already sent, not for the big job.
 * - Slots: an arena per block size, allocated once and reused by job after job: ARENA_BYTES of blocks per side, at
 *   least MIN_LEASE_SLOTS per job the server runs at once. A job takes a lease of slots when its pipeline starts and
 *   holds them, alone, until it ends (a pipeline's backpressure counts on slots nobody else takes; a job never waits
 *   for another's slot mid-run). A lease is the arena's share for one job of `jobs`, at most what the job's own pool
 *   would have (block-pool.ts defaultSlotCount). Slot memory is therefore bounded by the arena, whatever the jobs.
 * - Idle: ARENA_IDLE_MS after the last lease ended with none since, the arenas are dropped and one full collection
 *   run (V8 counts SharedArrayBuffers as no pressure on a small heap and would keep them for ever): an idle server
 *   holds no slot memory. The next job makes its arena again.
 * - Workers know each job's keys and compression from the task (a context: blockSize, compression, keys), and keep a
 *   runner per context (shared-worker.ts): zstd contexts and buffers are per repository, not per job.
 *
 * Failures: a task that throws fails its promise only, so only its job. A thread that dies (killed, or crashed) fails
 * the tasks it ran: each is sent again once, on another thread (every task is idempotent: it reads and writes its own
 * job's slots); a task that kills its thread twice fails its job. Cancelling a job (its lease closed) drops its queued
 * tasks, waits for those sent, then gives its slots back: the other jobs' tasks are never touched.
 */
import { availableParallelism } from 'node:os';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { createHash } from 'node:crypto';
import { Piscina } from 'piscina';
import { maxFrameLength } from '../../repo-format/blob-codec.js';
import { EngineError, InterruptedError, type ErrorCode } from '../../repo-format/errors.js';
import type { RepositoryKeys } from '../../repo-format/crypto.js';
import type { Compression } from '../../repo-format/compression.js';
import { ENCRYPTION_OVERHEAD } from '../../repo-format/constants.js';
import { registeredS3Settings, type S3Settings } from '../../repo-format/v3/location.js';
import { BlockPool, defaultSlotCount, type TaskSink } from './block-pool.js';
import { SlotPool } from './slot-pool.js';
import { pageAlignedSharedBuffer } from './aligned-memory.js';
import type { BlockTask, SharedSlots, WorkerSetup } from './tasks.js';

/** Blocks of one block size held for all jobs, per side (plaintext, frames), unless jobs × MIN_LEASE_SLOTS is more. */
export const ARENA_BYTES = 64 * 1024 * 1024;
/** The fewest slots a job's pipeline gets: what keeps both workers busy while its main thread reads and writes. */
export const MIN_LEASE_SLOTS = 8;
/** An arena unused this long is given back (more than piscina's idle timeout: the threads, which reference it, are gone). */
export const ARENA_IDLE_MS = 90_000;
/** Tasks a thread holds at once (piscina's concurrentTasksPerWorker, as a job's own pool has). */
const IN_FLIGHT_PER_WORKER = 4;

/** What a job asks for: its repository's block size, keys and compression; `slotCount` when it needs fewer slots. */
export interface LeaseOptions {
  blockSize: number;
  keys?: RepositoryKeys | undefined;
  compression?: Compression | undefined;
  slotCount?: number | undefined;
  /** Waiting for slots ends when this aborts (the job was cancelled before its pipeline started). */
  signal?: AbortSignal | undefined;
}

export interface SharedBlockPoolOptions {
  /** Threads for all jobs: default one per core. */
  workers?: number | undefined;
  /** Jobs that run at once (the server's limits.jobs): each gets an equal share of an arena's slots. */
  jobs: number;
}

/** A task as a shared worker takes it (shared-worker.ts): the task, and what its runner needs to be made. */
/** What every thread of the pool starts with. */
export interface SharedWorkerData {
  s3Settings: [string, S3Settings][];
}

export interface SharedTask {
  context: number;
  setup: WorkerSetup;
  task: BlockTask;
}
/** A shared worker's answer: the task's result, or what it threw (EngineError's JSON), never a rejection. */
export type SharedAnswer = { result: unknown } | { thrown: { code: ErrorCode; message: string; details: Record<string, unknown> } };

interface Queued {
  lease: Lease;
  task: BlockTask;
  transferList: ArrayBuffer[] | undefined;
  resolve: (result: unknown) => void;
  reject: (error: unknown) => void;
  /** Times its thread died under it. */
  deaths: number;
}

/** The slots of one block size, shared by the jobs: numbers handed out in leases, FIFO. */
class Arena {
  readonly shared: SharedSlots;
  private readonly free: number[];
  private readonly waiters: { count: number; resolve: (slots: number[]) => void }[] = [];

  constructor(blockSize: number, slotCount: number) {
    // Frames of an encrypted repository are the longest: one arena serves both kinds.
    const outputSlotSize = maxFrameLength(blockSize) + ENCRYPTION_OVERHEAD;
    this.shared = { input: pageAlignedSharedBuffer(slotCount * blockSize), output: new SharedArrayBuffer(slotCount * outputSlotSize), slotCount, inputSlotSize: blockSize, outputSlotSize };
    this.free = Array.from({ length: slotCount }, (_, i) => slotCount - 1 - i);
  }

  get available(): number {
    return this.free.length;
  }

  take(count: number, signal: AbortSignal | undefined): Promise<number[]> {
    if (signal?.aborted) return Promise.reject(new InterruptedError('the job', 'nothing was done'));
    if (this.waiters.length === 0 && this.free.length >= count) return Promise.resolve(this.free.splice(this.free.length - count, count));
    return new Promise((resolve, reject) => {
      const waiter = { count, resolve };
      this.waiters.push(waiter);
      signal?.addEventListener('abort', () => {
        const at = this.waiters.indexOf(waiter);
        if (at < 0) return;
        this.waiters.splice(at, 1);
        reject(new InterruptedError('the job', 'nothing was done'));
        this.serve();
      }, { once: true });
    });
  }

  give(slots: readonly number[]): void {
    this.free.push(...slots);
    this.serve();
  }

  private serve(): void {
    for (let waiter = this.waiters[0]; waiter && this.free.length >= waiter.count; waiter = this.waiters[0]) {
      this.waiters.shift();
      waiter.resolve(this.free.splice(this.free.length - waiter.count, waiter.count));
    }
  }
}

/** One job's share: its slots, its queue of tasks not yet sent, the tasks sent and not yet answered. */
class Lease implements TaskSink {
  readonly queue: Queued[] = [];
  readonly sent = new Set<Promise<unknown>>();
  closed = false;

  constructor(
    private readonly pool: SharedBlockPool,
    readonly arena: Arena,
    readonly slots: readonly number[],
    readonly context: number,
    readonly setup: WorkerSetup,
  ) {}

  run(task: BlockTask, transferList?: ArrayBuffer[]): Promise<unknown> {
    if (this.closed) return Promise.reject(new InterruptedError('the job', null));
    return new Promise((resolve, reject) => this.pool.enqueue({ lease: this, task, transferList, resolve, reject, deaths: 0 }));
  }

  /** Drops the tasks not sent, waits for those sent (they write into these slots), then gives the slots back. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.pool.ended(this);
    for (const queued of this.queue.splice(0)) queued.reject(new InterruptedError('the job', null));
    while (this.sent.size > 0) await Promise.allSettled([...this.sent]);
    this.arena.give(this.slots);
  }
}

export class SharedBlockPool {
  readonly workers: number;
  private readonly jobs: number;
  private readonly arenas = new Map<number, Arena>();
  /** Leases with tasks queued, in the order the pool serves them (round-robin). */
  private readonly ready: Lease[] = [];
  private inFlight = 0;
  private readonly contexts = new Map<string, number>();
  /** Context numbers are never used twice: a thread may still hold a runner of a dropped arena's context. */
  private nextContext = 1;
  private leases = 0;
  private idleTimer: NodeJS.Timeout | undefined;
  private readonly piscina: Piscina;
  private closing = false;
  /** Tasks sent to the threads, per lease: what the tests and the benches count. */
  readonly dispatched: { context: number; slots: readonly number[] }[] = [];
  private record = false;
  /** Tasks sent again because their thread died under them. */
  resent = 0;

  constructor(options: SharedBlockPoolOptions) {
    this.workers = Math.max(1, options.workers ?? availableParallelism());
    this.jobs = Math.max(1, options.jobs);
    this.piscina = new Piscina({
      filename: new URL('./shared-worker.js', import.meta.url).href,
      // Threads start with the first task and end after a minute idle: an idle server holds none.
      minThreads: 0,
      maxThreads: this.workers,
      atomics: 'disabled',
      concurrentTasksPerWorker: IN_FLIGHT_PER_WORKER,
      idleTimeout: 60_000,
      // The threads read packs themselves (a store of objects: located-frame.ts): each s3:// repository's own
      // settings, registered by the server before its jobs start, go with them (location.ts).
      workerData: { s3Settings: registeredS3Settings() } satisfies SharedWorkerData,
    });
    // A thread that dies with no task running (between tasks): piscina replaces it; nothing of a job is lost.
    this.piscina.on('error', () => undefined);
  }

  /** The arena's slots for `blockSize`: made by the first job of that block size, kept for the next. */
  private arenaFor(blockSize: number): Arena {
    let arena = this.arenas.get(blockSize);
    if (!arena) {
      arena = new Arena(blockSize, Math.max(this.jobs * MIN_LEASE_SLOTS, Math.floor(ARENA_BYTES / blockSize)));
      this.arenas.set(blockSize, arena);
    }
    return arena;
  }

  /** Slots held by arenas in all (taken or free), and free now: bounded whatever the jobs. */
  slotCounts(): { blockSize: number; slots: number; free: number }[] {
    return [...this.arenas].map(([blockSize, arena]) => ({ blockSize, slots: arena.shared.slotCount, free: arena.available }));
  }

  /** A job's pool: waits until the arena has the job's share of slots free (FIFO among jobs). */
  async lease(options: LeaseOptions): Promise<BlockPool> {
    if (this.closing) throw new InterruptedError('the job', 'the server is stopping: nothing was done');
    this.leases++;
    clearTimeout(this.idleTimer);
    const arena = this.arenaFor(options.blockSize);
    const share = Math.max(MIN_LEASE_SLOTS, Math.floor(arena.shared.slotCount / this.jobs));
    const count = Math.min(options.slotCount ?? Math.min(share, defaultSlotCount(options.blockSize)), arena.shared.slotCount);
    const slots = await arena.take(count, options.signal).catch((error: unknown) => {
      this.released();
      throw error;
    });
    const setup: WorkerSetup = { ...arena.shared, keys: options.keys, compression: options.compression };
    const lease = new Lease(this, arena, slots, this.contextOf(options), setup);
    return new BlockPool({ slots: new SlotPool(slots.length, slots), shared: arena.shared, workers: this.workers, sink: lease });
  }

  /** The same number for every job of one block size, compression and keys: workers keep a runner per context. */
  private contextOf(options: LeaseOptions): number {
    const keys = options.keys ? createHash('sha256').update(options.keys.dataKey).update(options.keys.idKey).digest('hex') : '';
    const key = `${options.blockSize}/${JSON.stringify(options.compression ?? null)}/${keys}`;
    let context = this.contexts.get(key);
    if (context === undefined) {
      context = this.nextContext++;
      this.contexts.set(key, context);
    }
    return context;
  }

  /** Keeps a list of the tasks sent (`dispatched`) from now on: for the tests and benches that count them. */
  recordDispatches(): void {
    this.record = true;
  }

  /** @internal A lease's task: queued behind its own, served in turn with the other leases'. */
  enqueue(queued: Queued, first = false): void {
    const lease = queued.lease;
    if (first) lease.queue.unshift(queued);
    else lease.queue.push(queued);
    if (!this.ready.includes(lease)) this.ready.push(lease);
    this.pump();
  }

  /** @internal A closed lease is served no more. */
  ended(lease: Lease): void {
    const at = this.ready.indexOf(lease);
    if (at >= 0) this.ready.splice(at, 1);
    this.released();
  }

  /** A lease ended (or its wait did): with none left, the arenas go after ARENA_IDLE_MS unless a job comes. */
  private released(): void {
    if (--this.leases > 0 || this.closing) return;
    clearTimeout(this.idleTimer);
    this.idleTimer = setTimeout(() => this.releaseIdle(), ARENA_IDLE_MS);
    this.idleTimer.unref();
  }

  /**
   * Drops the arenas when no job holds a lease (the idle timer's work; the tests call it), and runs one full
   * collection, which frees their memory: the pool then holds no slot memory until the next job.
   */
  releaseIdle(): void {
    if (this.leases > 0 || this.arenas.size === 0) return;
    this.arenas.clear();
    this.contexts.clear();
    collectGarbage();
  }

  /** Sends tasks while the threads have room: one of each lease in turn. */
  private pump(): void {
    while (this.inFlight < this.workers * IN_FLIGHT_PER_WORKER && this.ready.length > 0) {
      const lease = this.ready.shift()!;
      const queued = lease.queue.shift()!;
      if (lease.queue.length > 0) this.ready.push(lease);
      this.send(queued);
    }
  }

  private send(queued: Queued): void {
    const { lease, task, transferList } = queued;
    this.inFlight++;
    if (this.record) this.dispatched.push({ context: lease.context, slots: lease.slots });
    const message: SharedTask = { context: lease.context, setup: lease.setup, task };
    const answer = this.piscina.run(message, transferList === undefined ? undefined : { transferList }) as Promise<SharedAnswer>;
    const settled = answer.then(
      (reply) => {
        if ('thrown' in reply) queued.reject(new EngineError(reply.thrown.code, reply.thrown.message, reply.thrown.details));
        else queued.resolve(reply.result);
      },
      (error: unknown) => {
        // The thread died under the task (a task's own failure is an answer): once more on another, unless its job is gone.
        queued.deaths++;
        // Bytes that moved to the dead thread are gone with it: such a task cannot be sent again.
        const moved = transferList !== undefined;
        if (queued.deaths < 2 && !lease.closed && !this.closing && !moved) {
          this.resent++;
          this.enqueue(queued, true);
        } else queued.reject(new EngineError('ENGINE_INTERNAL', `a block worker died running a ${task.op} task: ${(error as Error).message}`, { op: task.op }));
      },
    );
    lease.sent.add(settled);
    void settled.finally(() => {
      lease.sent.delete(settled);
      this.inFlight--;
      this.pump();
    });
  }

  /** The pool's threads (for the tests: one killed must fail no job). */
  get threads(): readonly import('node:worker_threads').Worker[] {
    return this.piscina.threads;
  }

  /** Stops the threads; jobs are ended first (the server's stop()). */
  async close(): Promise<void> {
    this.closing = true;
    clearTimeout(this.idleTimer);
    await this.piscina.destroy();
  }
}

let collect: (() => void) | undefined;

/** A full collection: Node exposes gc() only with --expose-gc; the flag set at run time, gc read from a fresh context. */
function collectGarbage(): void {
  if (!collect) {
    setFlagsFromString('--expose-gc');
    collect = runInNewContext('gc') as () => void;
  }
  collect();
}
