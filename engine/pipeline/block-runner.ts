/**
 * The CPU-heavy half of the pipeline (zero check, block id, lz4 or zstd, AES-256-GCM, xxh64), on blocks that sit in shared
 * memory: run by each block worker (block-worker.ts, a piscina thread), or on the main thread for a small job
 * (block-pool.ts: the job then starts no thread at all).
 */
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { initChecksum } from '../../repo-format/checksum.js';
import { blobId, openBlobWith, sealBlobWith } from '../../repo-format/blob-codec.js';
import { locatorAt } from '../../repo-format/frame-locator.js';
import { readLocatedFrame, readLocatedSpan } from '../../repo-format/located-frame.js';
import type { RepositoryKeys } from '../../repo-format/crypto.js';
import { ZstdStreams, type Compression } from '../../repo-format/compression.js';
import { EngineError } from '../../repo-format/errors.js';
import { ID_SIZE } from '../../repo-format/constants.js';
import { LZ4_IMPLEMENTATION } from '../../repo-format/lz4-native.js';
import { SPAN_BYTES, type BlockTask, type HashTask, type SealTask, type HashManyResult, type OpenResult, type OpenSpanResult, type SealManyResult, type VerifyPackResult, type WorkerSetup } from './tasks.js';

export type BlockRunner = (task: BlockTask) => HashManyResult | Promise<SealManyResult> | Promise<OpenResult> | Promise<OpenSpanResult> | Promise<VerifyPackResult>;

/*
 * lz4-napi returns a new Buffer per call, freed only when V8 collects its wrapper. V8 counts that memory
 * as external and collects late: a worker sealing 1 MiB blocks grew ~100 MiB before each collection. A
 * young-generation collection every few blocks keeps it near zero and is cheaper than the page faults of
 * the churn (measured: 3000 blocks of 1 MiB, a collection every 4: 148 → 61 MiB RSS, 3.8 → 3.5 s).
 * Only a worker thread does this (`collect`): a job small enough for the main thread allocates too little to matter.
 * Measured with lz4-napi, the codec then. liblz4 (the engine's lz4 where its addon built) compresses into the
 * frame and decodes into the slot, so an unencrypted lz4 seal allocates nothing outside V8's heap: there the
 * collections only cost CPU, and a seal does not count towards them (sealAllocates). Measured on a cold backup of
 * the 3 GiB real image, 5 interleaved pairs: CPU x0.95, peak RSS 189 MiB either way. The fallback, zstd and
 * encryption still allocate and still collect.
 */
const COLLECT_EVERY_BYTES = 4 * 1024 * 1024;
/** Lets this thread's event loop turn (N-API finalizers run: lz4-napi's buffers are freed). */
const turn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

/** The task runner of one thread, for slots `slots` (and the keys of an encrypted repository, given once, never per task). */
export async function blockRunner(slots: WorkerSetup, options: { collect: boolean }): Promise<BlockRunner> {
  const keys: RepositoryKeys | undefined = slots.keys ? { dataKey: Buffer.from(slots.keys.dataKey), idKey: Buffer.from(slots.keys.idKey) } : undefined;
  // No default: a pool that seals names its repository's compression, so none writes lz4 into a zstd repository unseen.
  const compression: Compression | undefined = slots.compression;
  let collectGarbage: ((options: { type: 'minor' | 'major' }) => void) | undefined;
  if (options.collect) {
    setFlagsFromString('--expose-gc');
    collectGarbage = runInNewContext('gc') as (options: { type: 'minor' | 'major' }) => void;
  }
  let allocatedBytes = 0;
  function allocated(bytes: number): void {
    if (collectGarbage === undefined) return;
    allocatedBytes += bytes;
    if (allocatedBytes >= COLLECT_EVERY_BYTES) {
      allocatedBytes = 0;
      collectGarbage({ type: 'minor' });
    }
  }
  /** This thread's zstd contexts, kept for every frame (compression.ts ZstdStreams: a context per call piles up). */
  const zstd = new ZstdStreams();
  const zeros = Buffer.alloc(slots.inputSlotSize);
  /**
   * Buffers of a verify task: a frame's bytes and its plaintext, one pair per verify task in flight on this thread
   * (piscina runs up to concurrentTasksPerWorker at once), reused. Never one pair for the thread: while a task
   * awaits a read or a zstd decode, another would read its frame into the same bytes, and the first (with no id
   * to expect on this path) would check the other's frame in place of its own (test/verify-concurrent-tasks.test.ts).
   * And lz4 decodes into the task's plaintext buffer, not a new 1 MiB buffer per frame: those piled up until a
   * collection, and bin/engine's malloc settings keep freed memory resident, so verify --read-data of the 3 GiB
   * real image (34 packs, 1 GiB stored) peaked at 305-375 MiB RSS; with the kept buffers 132-134 MiB, 4 cold pairs.
   * Memory is now bounded per task, whatever the repository's size: workers × 4 × (a frame + a block).
   */
  const verifyBuffers: { frame: Buffer; plaintext: Buffer }[] = [];
  await initChecksum();

  function inputSlot(slot: number, length: number): Buffer {
    return Buffer.from(slots.input, slot * slots.inputSlotSize, length);
  }

  function outputSlot(slot: number, length = slots.outputSlotSize): Buffer {
    return Buffer.from(slots.output, slot * slots.outputSlotSize, length);
  }

  function hash(task: HashTask): HashManyResult {
    const count = task.slots.length;
    const result = { zero: new Uint8Array(count), ids: new Uint8Array(count * ID_SIZE) };
    for (let i = 0; i < count; i++) {
      const length = task.lengths[i]!;
      const block = inputSlot(task.slots[i]!, length);
      if (block.equals(zeros.subarray(0, length))) result.zero[i] = 1;
      else result.ids.set(blobId(block, keys), i * ID_SIZE);
    }
    return result;
  }

  /**
   * Whether sealing allocates per block, memory that only a collection frees: lz4-napi's output (the fallback), zstd's,
   * an encrypted frame's ciphertext. liblz4 into the frame, unencrypted, does not (COLLECT_EVERY_BYTES).
   */
  const sealAllocates = keys !== undefined || compression?.codec !== 'lz4' || LZ4_IMPLEMENTATION !== 'liblz4';

  async function seal(task: SealTask): Promise<SealManyResult> {
    if (compression === undefined) throw new EngineError('ENGINE_INTERNAL', 'a block pool that seals was started without the repository\'s compression');
    const result: SealManyResult = { frameLengths: [], flags: [] };
    const ids = Buffer.from(task.ids.buffer, task.ids.byteOffset, task.ids.byteLength);
    for (let i = 0; i < task.slots.length; i++) {
      const slot = task.slots[i]!;
      const length = task.lengths[i]!;
      if (sealAllocates) allocated(length);
      const target = outputSlot(slot);
      result.frameLengths.push(await sealBlobWith(zstd, task.kinds[i]!, ids.subarray(i * ID_SIZE, (i + 1) * ID_SIZE), inputSlot(slot, length), target, 0, keys, compression));
      result.flags.push(target.readUInt8(5));
    }
    return result;
  }

  async function openFrame(task: Extract<BlockTask, { op: 'open' }>): Promise<OpenResult> {
    if (task.length > slots.outputSlotSize) return { ok: false, why: `index says the frame is ${task.length} bytes, more than a block can need` };
    const frame = outputSlot(task.slot, task.length);
    if (task.locator) {
      const unreadable = await readLocatedFrame(task.locator, frame);
      if (unreadable) return { ok: false, why: unreadable };
    }
    return openInto(frame, task.slot, task.id);
  }

  /** Checks and opens a frame's bytes into input slot `slot`. */
  async function openInto(frame: Buffer, slot: number, id: Uint8Array): Promise<OpenResult> {
    // liblz4 decodes straight into the slot: no plaintext buffer per block, no copy.
    const target = inputSlot(slot, slots.inputSlotSize);
    const opened = await openBlobWith(zstd, frame, Buffer.from(id), keys, target);
    if (typeof opened === 'string') return { ok: false, why: opened };
    if (opened.plaintext.length > slots.inputSlotSize) return { ok: false, why: 'blob is larger than a block' };
    if (opened.plaintext.buffer !== target.buffer || opened.plaintext.byteOffset !== target.byteOffset) target.set(opened.plaintext);
    return { ok: true, rawLength: opened.plaintext.length };
  }

  /**
   * Span buffers of SPAN_BYTES, one per span this worker has in flight (piscina's concurrentTasksPerWorker
   * bounds them), reused: a span's bytes are received into one and never allocated again.
   */
  const spanBuffers: Buffer[] = [];

  async function openSpan(task: Extract<BlockTask, { op: 'open-span' }>): Promise<OpenSpanResult> {
    if (task.length > SPAN_BYTES) return { opened: task.frames.map(() => ({ ok: false, why: `a span of ${task.length} bytes is more than ${SPAN_BYTES}` })) };
    const buffer = spanBuffers.pop() ?? Buffer.allocUnsafeSlow(SPAN_BYTES);
    try {
      const span = buffer.subarray(0, task.length);
      const unreadable = await readLocatedSpan(task.locator, span);
      // A damaged span (a pack cut short, say): each frame read alone says which are whole and why the others are not.
      if (unreadable) return { opened: await Promise.all(task.frames.map((f) => openFrame({ op: 'open', slot: f.slot, length: f.length, id: f.id, locator: f.locator }))) };
      const opened: OpenResult[] = [];
      for (const f of task.frames) {
        opened.push(f.offset + f.length > span.length ? { ok: false, why: 'frame lies outside its span' } : await openInto(span.subarray(f.offset, f.offset + f.length), f.slot, f.id));
        // A frame's plaintext may be a buffer of its own, freed only by a collection and a turn of the event loop:
        // lz4-napi's (the fallback), zstd's decoder's, an encrypted frame's decrypted payload. liblz4 decodes into the
        // slot and allocates nothing, so this counts more than it must there (not measured whether that costs).
        allocated(f.length);
        await turn();
      }
      return { opened };
    } finally {
      spanBuffers.push(buffer);
    }
  }

  async function verifyPack(task: Extract<BlockTask, { op: 'verify-pack' }>): Promise<VerifyPackResult> {
    const buffers = verifyBuffers.pop() ?? { frame: Buffer.allocUnsafeSlow(slots.outputSlotSize), plaintext: Buffer.allocUnsafeSlow(slots.inputSlotSize) };
    try {
      return await verifyPackWith(task, buffers);
    } finally {
      verifyBuffers.push(buffers);
    }
  }

  /**
   * What a frame's check allocated counts towards the next collection: a plaintext that is not the task's buffer
   * (zstd's decoder gives each frame a new one), and the decrypted payload of an encrypted frame (gcmOpen gives a
   * new one). Counted once per pack, a worker held a pack's worth of them: verify --read-data of the real image
   * peaked at 272-285 MiB RSS in a zstd repository (184-194 counted per frame), 231 MiB in an encrypted one.
   */
  function collectFor(frameLength: number, plaintext: Buffer, own: Buffer): void {
    allocated((keys ? frameLength : 0) + (plaintext.buffer !== own.buffer ? plaintext.length : 0));
  }

  async function verifyPackWith(task: Extract<BlockTask, { op: 'verify-pack' }>, buffers: { frame: Buffer; plaintext: Buffer }): Promise<VerifyPackResult> {
    const bad: VerifyPackResult['bad'] = [];
    if ('locator' in task) {
      for (const { offset, length } of task.frames) {
        const frame = buffers.frame.length >= length ? buffers.frame.subarray(0, length) : Buffer.allocUnsafe(length);
        const unreadable = await readLocatedFrame(locatorAt(task.locator, offset, length), frame);
        const opened = unreadable ?? (await openBlobWith(zstd, frame, undefined, keys, buffers.plaintext));
        if (typeof opened === 'string') bad.push({ offset, why: opened });
        else collectFor(length, opened.plaintext, buffers.plaintext);
      }
      return { bad };
    }
    const pack = Buffer.from(task.pack.buffer, task.pack.byteOffset, task.pack.byteLength);
    for (const { offset, length } of task.frames) {
      if (offset + length > pack.length) {
        bad.push({ offset, why: `pack is truncated: read ${Math.max(0, pack.length - offset)} of ${length} bytes` });
        continue;
      }
      const opened = await openBlobWith(zstd, pack.subarray(offset, offset + length), undefined, keys, buffers.plaintext);
      if (typeof opened === 'string') bad.push({ offset, why: opened });
      else collectFor(length, opened.plaintext, buffers.plaintext);
    }
    return { bad };
  }

  return function run(task: BlockTask): ReturnType<BlockRunner> {
    switch (task.op) {
      case 'hash':
        return hash(task);
      case 'seal':
        return seal(task);
      case 'open':
        allocated(task.length);
        return openFrame(task);
      case 'open-span':
        return openSpan(task);
      case 'verify-pack':
        allocated(COLLECT_EVERY_BYTES);
        return verifyPack(task);
    }
  };
}
