/**
 * Messages between the main thread and the block workers. Block data never travels in messages: it
 * sits in two SharedArrayBuffers of `slotCount` slots each, created once per pool:
 *   input  slot i: blockSize bytes (plaintext: read from the source, or restored from a pack)
 *   output slot i: the largest frame of a block (a sealed frame, or frame bytes read from a pack)
 *
 * Workers never name a repository file: they get a frame's bytes, read by the main thread through the
 * repository's store, or an opaque locator the repository made, which repo-format reads for them.
 */
export interface SharedSlots {
  input: SharedArrayBuffer;
  output: SharedArrayBuffer;
  slotCount: number;
  inputSlotSize: number;
  outputSlotSize: number;
}

import type { FrameLocator } from '../../repo-format/frame-locator.js';
import type { Compression } from '../../repo-format/compression.js';

/** What each worker gets once, at pool creation: the slots, and the keys of an encrypted repository. */
export interface WorkerSetup extends SharedSlots {
  keys?: { dataKey: Uint8Array; idKey: Uint8Array } | undefined;
  /** What seal compresses with: the repository's compression (config); a seal task fails without it. */
  compression?: Compression | undefined;
}

/**
 * Zero check, then the block id (SHA-256, or HMAC-SHA256 in an encrypted repository) of input slots `slots` (each
 * `lengths[i]` bytes): several blocks a message (BlockPool gathers the blocks asked for at once), since a message
 * each way costs CPU on both threads. The answer: `zero[i]` 1 for a block of zeros, else its id at `ids[32 i]`.
 */
export interface HashTask {
  op: 'hash';
  slots: number[];
  lengths: number[];
}
export interface HashManyResult {
  zero: Uint8Array;
  ids: Uint8Array;
}
/** What BlockPool.hash gives for one block. */
export type HashResult = { zero: true } | { zero: false; id: Uint8Array };

/**
 * lz4 (when it helps), encryption (encrypted repositories) and frame assembly from input slot `slots[i]` into output
 * slot `slots[i]`, of a block of `lengths[i]` bytes whose id is at `ids[32 i]`: several blocks a message, as HashTask.
 */
export interface SealTask {
  op: 'seal';
  slots: number[];
  lengths: number[];
  kinds: number[];
  ids: Uint8Array;
}
export interface SealManyResult {
  frameLengths: number[];
  flags: number[];
}
/** What BlockPool.seal gives for one block. */
export interface SealResult {
  frameLength: number;
  flags: number;
}

/**
 * Check a frame of `length` bytes and place its plaintext in input slot `slot`. The frame is in output slot
 * `slot` (read by the main thread through the store), or the worker reads it there from `locator` (the
 * repository's opaque FrameLocator: a local pack file, or a pack in S3).
 */
export interface OpenTask {
  op: 'open';
  slot: number;
  length: number;
  id: Uint8Array;
  locator?: FrameLocator | undefined;
}
export type OpenResult = { ok: true; rawLength: number } | { ok: false; why: string };

/**
 * Adjacent frames of one pack read at once (`locator` spans them all: one ranged GET on S3) into a buffer of
 * the worker's, each frame then checked and opened into its input slot as OpenTask does. `offset` of a frame
 * is relative to the span. One result per frame, in order.
 */
/** At most this many bytes in one span: what each span a worker has in flight holds in memory. */
export const SPAN_BYTES = 2 * 1024 * 1024;

export interface OpenSpanTask {
  op: 'open-span';
  locator: FrameLocator;
  /** The span's length in bytes (the locator's, which only repo-format reads). */
  length: number;
  /** `locator`: the frame's own, read alone when the span cannot be read whole. */
  frames: { slot: number; offset: number; length: number; id: Uint8Array; locator: FrameLocator }[];
}
export interface OpenSpanResult {
  opened: OpenResult[];
}

/**
 * Check frames of a pack (verify --read-data, repair): a span of its bytes moved to the worker (not
 * copied), `frames` relative to the span; or, for a store of local files, a locator of the pack from which
 * the worker reads each frame itself.
 */
export type VerifyPackTask =
  | { op: 'verify-pack'; pack: Uint8Array; frames: { offset: number; length: number }[] }
  | { op: 'verify-pack'; locator: FrameLocator; frames: { offset: number; length: number }[] };
export interface VerifyPackResult {
  bad: { offset: number; why: string }[];
}

export type BlockTask = HashTask | SealTask | OpenTask | OpenSpanTask | VerifyPackTask;
