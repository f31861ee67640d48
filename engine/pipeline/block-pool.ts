/**
 * The worker pool and its shared slots. One pool serves a whole backup, restore or verify.
 *
 * Memory: 2 × slotCount × block size (+ frame overhead), chosen so that the pipeline stays near 32 MiB
 * of block buffers per side whatever the block size, and at least 8 slots so both workers stay busy
 * while the main thread reads, looks up and writes.
 */
import { availableParallelism } from 'node:os';
import { Piscina } from 'piscina';
import { maxFrameLength } from '../../repo-format/blob-codec.js';
import type { RepositoryKeys } from '../../repo-format/crypto.js';
import { SlotPool } from './slot-pool.js';
import type { BlockTask, HashResult, OpenResult, SealResult, SharedSlots, VerifyPackResult, OpenTask, VerifyPackTask, WorkerSetup } from './tasks.js';

const SLOT_BUDGET_BYTES = 32 * 1024 * 1024;

export interface BlockPoolOptions {
  blockSize: number;
  workers?: number;
  slotCount?: number;
  /** The keys of an encrypted repository: the workers hash with HMAC-SHA256 and seal with AES-256-GCM. */
  keys?: RepositoryKeys | undefined;
}

export class BlockPool {
  readonly slots: SlotPool;
  readonly shared: SharedSlots;
  readonly workers: number;
  private readonly piscina: Piscina;

  constructor(options: BlockPoolOptions) {
    const slotCount = options.slotCount ?? Math.min(32, Math.max(8, Math.floor(SLOT_BUDGET_BYTES / options.blockSize)));
    const outputSlotSize = maxFrameLength(options.blockSize, options.keys);
    this.shared = {
      input: new SharedArrayBuffer(slotCount * options.blockSize),
      output: new SharedArrayBuffer(slotCount * outputSlotSize),
      slotCount,
      inputSlotSize: options.blockSize,
      outputSlotSize,
    };
    this.slots = new SlotPool(slotCount);
    this.workers = options.workers ?? Math.max(1, availableParallelism());
    this.piscina = new Piscina({
      filename: new URL('./block-worker.js', import.meta.url).href,
      minThreads: this.workers,
      maxThreads: this.workers,
      // 'sync' blocks the worker's event loop between tasks; lz4-napi's buffers then never get freed.
      atomics: 'disabled',
      // Several tasks queued per worker: it starts the next one without a round trip through the main thread.
      concurrentTasksPerWorker: 4,
      workerData: { ...this.shared, keys: options.keys } satisfies WorkerSetup,
      idleTimeout: 60_000,
    });
  }

  /** The plaintext side of a slot, as the main thread sees it. */
  input(slot: number, length: number): Buffer {
    return Buffer.from(this.shared.input, slot * this.shared.inputSlotSize, length);
  }

  output(slot: number, length: number): Buffer {
    return Buffer.from(this.shared.output, slot * this.shared.outputSlotSize, length);
  }

  hash(slot: number, length: number): Promise<HashResult> {
    return this.run({ op: 'hash', slot, length });
  }

  seal(slot: number, length: number, kind: number, id: Buffer): Promise<SealResult> {
    // A copy with its own 32-byte ArrayBuffer: cloning a view would copy its whole backing pool.
    return this.run({ op: 'seal', slot, length, kind, id: new Uint8Array(id) });
  }

  open(task: Omit<OpenTask, 'op'>): Promise<OpenResult> {
    return this.run({ op: 'open', ...task, id: new Uint8Array(task.id) });
  }

  verifyPack(task: Omit<VerifyPackTask, 'op'>): Promise<VerifyPackResult> {
    return this.run({ op: 'verify-pack', ...task });
  }

  async close(): Promise<void> {
    await this.piscina.destroy();
  }

  private run<T>(task: BlockTask): Promise<T> {
    return this.piscina.run(task) as Promise<T>;
  }
}
