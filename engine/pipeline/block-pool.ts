/**
 * The worker pool and its shared slots. One pool serves a whole backup, restore or verify.
 *
 * Memory: 2 × slotCount × block size (+ frame overhead), chosen so that the pipeline stays near 32 MiB
 * of block buffers per side whatever the block size, and at least 8 slots so both workers stay busy
 * while the main thread reads, looks up and writes.
 */
import { availableParallelism } from 'node:os';
import type { Piscina } from 'piscina';
import { maxFrameLength } from '../../repo-format/blob-codec.js';
import { CorruptFrameError, CorruptPackError } from '../../repo-format/errors.js';
import type { RepositoryKeys } from '../../repo-format/crypto.js';
import type { Compression } from '../../repo-format/compression.js';
import type { FrameLocator } from '../../repo-format/frame-locator.js';
import type { BlockRunner } from './block-runner.js';
import { SlotPool } from './slot-pool.js';
import { pageAlignedSharedBuffer } from './aligned-memory.js';
import type { BlockTask, HashManyResult, HashResult, HashTask, OpenResult, OpenSpanResult, OpenSpanTask, SealManyResult, SealResult, SealTask, SharedSlots, VerifyPackResult, OpenTask, VerifyPackTask, WorkerSetup } from './tasks.js';
import { ID_SIZE } from '../../repo-format/constants.js';

const SLOT_BUDGET_BYTES = 32 * 1024 * 1024;
/**
 * A worker is started for at most every this many bytes of work: starting one costs ~60 ms of CPU here
 * (a thread, its isolate, the lz4 codec and xxhash-wasm loaded), about what hashing and compressing 32 MiB on
 * another core saves. A backup of a 10 MiB disk runs one worker, not one per core.
 */
export const BYTES_PER_WORKER = 32 * 1024 * 1024;

/** A frame to open: where a worker reads it itself (Repository.locateFrame), else how the main thread reads it. */
export interface FrameSource {
  locator?: FrameLocator | undefined;
  read: () => Promise<Buffer>;
}

export interface BlockPoolOptions {
  blockSize: number;
  workers?: number;
  slotCount?: number;
  /** The keys of an encrypted repository: the workers hash with HMAC-SHA256 and seal with AES-256-GCM. */
  keys?: RepositoryKeys | undefined;
  /** What seal compresses with: the repository's (Repository.compression); seal fails without it. Pools that never seal leave it out. */
  compression?: Compression | undefined;
  /** At most how many bytes the job hands the workers, when known: no more workers than BYTES_PER_WORKER each. */
  workBytes?: number | undefined;
}

/**
 * A job of at most this many bytes of work runs its blocks on the main thread and starts no worker. A worker costs
 * ~60-90 ms of CPU to start (and as much wall time before its first block), more than the main thread takes to hash
 * and compress this much (measured, bench/fixed-costs.ts); the pool pays only where a second core has work to share.
 */
export const INLINE_MAX_BYTES = 16 * 1024 * 1024;

/**
 * Whether a job runs its blocks on the main thread: a small job whose size is known, unless workers were asked for
 * (`--workers`). For the tests only, like ENGINE_CRASH_AT: ENGINE_TEST_BLOCK_WORKERS=pool starts the pool for every
 * job, so that the tests about the pipeline run its threads whatever the size of their disks.
 */
export function runsInline(requested: number | undefined, workBytes: number | undefined): boolean {
  if (requested !== undefined || workBytes === undefined) return false;
  if (process.env.ENGINE_TEST_BLOCK_WORKERS === 'pool') return false;
  return workBytes <= INLINE_MAX_BYTES;
}

/** Workers for a job: as asked (default one per core), but no more than its work can use (BYTES_PER_WORKER). */
export function workersFor(requested: number | undefined, workBytes: number | undefined): number {
  const asked = requested ?? Math.max(1, availableParallelism());
  if (workBytes === undefined) return asked;
  return Math.max(1, Math.min(asked, Math.ceil(workBytes / BYTES_PER_WORKER)));
}

/**
 * At most this many blocks in one task. A message each way costs CPU on both threads (serializing, waking the
 * other thread, piscina's bookkeeping): with one task per block they were ~8% of a cold backup's CPU on the real
 * image. A run of RUN_BYTES (8 blocks of 1 MiB) is hashed as two tasks, one per worker, and a batch's new blocks
 * are sealed four to a task: enough tasks for both workers, a quarter of the messages.
 */
export const BLOCKS_PER_TASK = 4;

/**
 * Blocks asked for in one turn of the microtask queue, sent as tasks of up to BLOCKS_PER_TASK blocks, spread over
 * the pool's threads: each caller still gets its own block's promise. The reader asks for every block of a run at
 * once (when the run's read settles), the assembler for every new block of a batch: those become one task per worker.
 */
class Gather<Block, Result> {
  private pending: { block: Block; resolve: (result: Result) => void; reject: (error: unknown) => void }[] = [];

  constructor(
    private readonly pool: { readonly workers: number },
    private readonly send: (blocks: Block[]) => Promise<Result[]>,
  ) {}

  add(block: Block): Promise<Result> {
    return new Promise((resolve, reject) => {
      this.pending.push({ block, resolve, reject });
      if (this.pending.length === 1) queueMicrotask(() => this.flush());
    });
  }

  private flush(): void {
    const pending = this.pending;
    this.pending = [];
    const size = Math.min(BLOCKS_PER_TASK, Math.ceil(pending.length / this.pool.workers));
    for (let from = 0; from < pending.length; from += size) {
      const group = pending.slice(from, from + size);
      this.send(group.map((p) => p.block)).then(
        (results) => group.forEach((p, i) => p.resolve(results[i]!)),
        (error: unknown) => group.forEach((p) => p.reject(error)),
      );
    }
  }
}

/**
 * Where a pool's tasks run: its own piscina threads, the main thread (a small job, runsInline), or the workers of a
 * pool shared by the jobs of a server (shared-pool.ts). `transferList`: buffers that move to the worker with the task.
 */
export interface TaskSink {
  run(task: BlockTask, transferList?: ArrayBuffer[]): Promise<unknown>;
  close(): Promise<void>;
}

/** A job's pool made of parts a shared pool lends it (shared-pool.ts): slots of its memory, its workers' tasks. */
export interface LeasedPool {
  slots: SlotPool;
  shared: SharedSlots;
  workers: number;
  sink: TaskSink;
}

export class BlockPool {
  readonly slots: SlotPool;
  readonly shared: SharedSlots;
  /** The threads that run blocks: the pool's workers, or 1 for the main thread (a small job, runsInline). */
  readonly workers: number;
  private readonly sink: TaskSink;

  constructor(options: BlockPoolOptions | LeasedPool) {
    if ('sink' in options) {
      this.slots = options.slots;
      this.shared = options.shared;
      this.workers = options.workers;
      this.sink = options.sink;
      return;
    }
    const slotCount = options.slotCount ?? defaultSlotCount(options.blockSize);
    const outputSlotSize = maxFrameLength(options.blockSize, options.keys);
    this.shared = {
      // Page-aligned: a restore writes slots to an O_DIRECT target as they are (aligned-memory.ts).
      input: pageAlignedSharedBuffer(slotCount * options.blockSize),
      output: new SharedArrayBuffer(slotCount * outputSlotSize),
      slotCount,
      inputSlotSize: options.blockSize,
      outputSlotSize,
    };
    this.slots = new SlotPool(slotCount);
    const setup: WorkerSetup = { ...this.shared, keys: options.keys, compression: options.compression };
    if (runsInline(options.workers, options.workBytes)) {
      this.workers = 1;
      this.sink = inlineSink(setup);
      return;
    }
    const workers = workersFor(options.workers, options.workBytes);
    this.workers = workers;
    this.sink = piscinaSink(workers, setup);
  }

  /** The plaintext side of a slot, as the main thread sees it. */
  input(slot: number, length: number): Buffer {
    return Buffer.from(this.shared.input, slot * this.shared.inputSlotSize, length);
  }

  output(slot: number, length: number): Buffer {
    return Buffer.from(this.shared.output, slot * this.shared.outputSlotSize, length);
  }

  /** Zero check and id of the block in input slot `slot`: gathered with the other blocks asked for at once (Gather). */
  hash(slot: number, length: number): Promise<HashResult> {
    return this.hashes.add({ slot, length });
  }

  /** The frame of the block in input slot `slot` into output slot `slot`: gathered as hash() is. */
  seal(slot: number, length: number, kind: number, id: Buffer): Promise<SealResult> {
    return this.seals.add({ slot, length, kind, id });
  }

  private readonly hashes = new Gather<{ slot: number; length: number }, HashResult>(this, async (blocks) => {
    const result = await this.run<HashManyResult>({ op: 'hash', slots: blocks.map((b) => b.slot), lengths: blocks.map((b) => b.length) } satisfies HashTask);
    return blocks.map((_, i): HashResult => (result.zero[i] === 1 ? { zero: true } : { zero: false, id: result.ids.subarray(i * ID_SIZE, (i + 1) * ID_SIZE) }));
  });

  private readonly seals = new Gather<{ slot: number; length: number; kind: number; id: Buffer }, SealResult>(this, async (blocks) => {
    // The ids in one buffer of their own: cloning a view would copy its whole backing pool.
    const ids = new Uint8Array(blocks.length * ID_SIZE);
    blocks.forEach((b, i) => ids.set(b.id.subarray(0, ID_SIZE), i * ID_SIZE));
    const task = { op: 'seal', slots: blocks.map((b) => b.slot), lengths: blocks.map((b) => b.length), kinds: blocks.map((b) => b.kind), ids } satisfies SealTask;
    const result = await this.run<SealManyResult>(task);
    return blocks.map((_, i) => ({ frameLength: result.frameLengths[i]!, flags: result.flags[i]! }));
  });

  /**
   * Reads a frame (`read`: through the repository's store), places it in output slot `slot`, and has a
   * worker check and open it into input slot `slot`. A frame whose pack is missing, cut short or unreadable
   * is a reason (`ok: false`) like one that fails its checks; any other failure (an interruption, a store
   * that is down) is thrown.
   */
  async open(slot: number, source: FrameSource, id: Buffer): Promise<OpenResult> {
    if (source.locator) {
      if (source.locator.length > this.shared.outputSlotSize) return { ok: false, why: `index says the frame is ${source.locator.length} bytes, more than a block can need` };
      return this.run({ op: 'open', slot, length: source.locator.length, id: new Uint8Array(id), locator: source.locator } satisfies OpenTask);
    }
    const read = source.read;
    let frame: Buffer;
    try {
      frame = await read();
    } catch (error) {
      if (error instanceof CorruptPackError || error instanceof CorruptFrameError) return { ok: false, why: String(error.details.why ?? error.message) };
      throw error;
    }
    if (frame.length > this.shared.outputSlotSize) return { ok: false, why: `index says the frame is ${frame.length} bytes, more than a block can need` };
    this.output(slot, frame.length).set(frame);
    return this.run({ op: 'open', slot, length: frame.length, id: new Uint8Array(id) } satisfies OpenTask);
  }

  /**
   * Has a worker read adjacent frames of one pack in one read (`locator` spans them, at most SPAN_BYTES) and
   * open each into its slot: one result per frame, as open() gives.
   */
  async openSpan(locator: FrameLocator, length: number, frames: OpenSpanTask['frames']): Promise<OpenResult[]> {
    const result = await this.run<OpenSpanResult>({ op: 'open-span', locator, length, frames } satisfies OpenSpanTask);
    return result.opened;
  }

  /** Checks frames of a pack that a worker reads itself (a store of local files: Repository.locateFrame). */
  verifyLocatedPack(locator: FrameLocator, frames: VerifyPackTask['frames']): Promise<VerifyPackResult> {
    return this.run({ op: 'verify-pack', locator, frames } satisfies VerifyPackTask);
  }

  /** Checks every frame of a pack held in memory; its bytes move to the worker (the buffer is unusable afterwards). */
  verifyPack(pack: Buffer, frames: VerifyPackTask['frames']): Promise<VerifyPackResult> {
    // A buffer that shares its memory (Node's small-buffer pool) is copied: only what it owns may move.
    const bytes = pack.byteOffset === 0 && pack.byteLength === pack.buffer.byteLength && pack.buffer instanceof ArrayBuffer ? new Uint8Array(pack.buffer, 0, pack.byteLength) : new Uint8Array(pack);
    const task = { op: 'verify-pack', pack: bytes, frames } satisfies VerifyPackTask;
    return this.sink.run(task, [bytes.buffer as ArrayBuffer]) as Promise<VerifyPackResult>;
  }

  async close(): Promise<void> {
    await this.sink.close();
  }

  private run<T>(task: BlockTask): Promise<T> {
    return this.sink.run(task) as Promise<T>;
  }
}

/**
 * What lends a job its pool instead of the job making one: the server's SharedBlockPool (shared-pool.ts). An option of
 * backup, restore and verify; the CLI leaves it out and each command makes its own pool, as before.
 */
export interface PoolLender {
  lease(options: { blockSize: number; keys?: RepositoryKeys | undefined; compression?: Compression | undefined; slotCount?: number | undefined; signal?: AbortSignal | undefined }): Promise<BlockPool>;
}

/** A job's pool: lent by `lender` when there is one, else its own. */
export async function jobPool(lender: PoolLender | undefined, options: BlockPoolOptions & { signal?: AbortSignal | undefined }): Promise<BlockPool> {
  return lender ? lender.lease(options) : new BlockPool(options);
}

/** Slots of a job's own pool: near SLOT_BUDGET_BYTES of blocks per side, at least 8 and at most 32. */
export function defaultSlotCount(blockSize: number): number {
  return Math.min(32, Math.max(8, Math.floor(SLOT_BUDGET_BYTES / blockSize)));
}

/**
 * The job's own worker pool, started by the first task: a job that hands the workers nothing (an incremental of an
 * unchanged disk, whose size was not known when the pool was made) starts no thread.
 */
function piscinaSink(workers: number, setup: WorkerSetup): TaskSink {
  // piscina itself is loaded with the pool: a job on the main thread never loads it (~15 ms CPU, with the
  // worker_threads and perf_hooks modules it brings; measured, a bare import with the compile cache). Tasks asked
  // for while it loads reach it in the order they were asked for (one promise, settled once).
  let piscina: Promise<Piscina> | undefined;
  return {
    async run(task, transferList) {
      piscina ??= import('piscina').then(({ Piscina }) => new Piscina({
        filename: new URL('./block-worker.js', import.meta.url).href,
        minThreads: workers,
        maxThreads: workers,
        // 'sync' blocks the worker's event loop between tasks; lz4-napi's buffers then never get freed.
        atomics: 'disabled',
        // Several tasks queued per worker: it starts the next one without a round trip through the main thread.
        concurrentTasksPerWorker: 4,
        workerData: setup,
        idleTimeout: 60_000,
      }));
      return (await piscina).run(task, transferList === undefined ? undefined : { transferList });
    },
    async close() {
      await (await piscina)?.destroy();
    },
  };
}

/**
 * Tasks on the main thread, its runner made on first use. The event loop turns before each (as a worker's does
 * between tasks): signals, I/O and lz4-napi's finalizers are served between blocks.
 */
function inlineSink(setup: WorkerSetup): TaskSink {
  let inline: Promise<BlockRunner> | undefined;
  return {
    async run(task) {
      inline ??= import('./block-runner.js').then(({ blockRunner }) => blockRunner(setup, { collect: false }));
      const run = await inline;
      await new Promise((resolve) => setImmediate(resolve));
      return run(task);
    },
    async close() {},
  };
}
