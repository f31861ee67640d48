/**
 * Messages between the main thread and the block workers. Block data never travels in messages: it
 * sits in two SharedArrayBuffers of `slotCount` slots each, created once per pool:
 *   input  slot i: blockSize bytes (plaintext: read from the source, or restored from a pack)
 *   output slot i: the largest frame of a block (a sealed frame, or frame bytes read from a pack)
 *
 * Workers never touch the repository: the main thread reads frames and packs through the repository's
 * store (whatever backend it is) and hands the bytes over; the workers do the CPU's part.
 */
export interface SharedSlots {
  input: SharedArrayBuffer;
  output: SharedArrayBuffer;
  slotCount: number;
  inputSlotSize: number;
  outputSlotSize: number;
}

/** What each worker gets once, at pool creation: the slots, and the keys of an encrypted repository. */
export interface WorkerSetup extends SharedSlots {
  keys?: { dataKey: Uint8Array; idKey: Uint8Array } | undefined;
}

/** Zero check, then the block id (SHA-256, or HMAC-SHA256 in an encrypted repository) of input slot `slot`. */
export interface HashTask {
  op: 'hash';
  slot: number;
  length: number;
}
export type HashResult = { zero: true } | { zero: false; id: Uint8Array };

/** lz4 (when it helps), encryption (encrypted repositories) and frame assembly from input slot `slot` into output slot `slot`. */
export interface SealTask {
  op: 'seal';
  slot: number;
  length: number;
  kind: number;
  id: Uint8Array;
}
export interface SealResult {
  frameLength: number;
  flags: number;
}

/** Check the frame of `length` bytes in output slot `slot` (read from its pack by the main thread), and place its plaintext in input slot `slot`. */
export interface OpenTask {
  op: 'open';
  slot: number;
  length: number;
  id: Uint8Array;
}
export type OpenResult = { ok: true; rawLength: number } | { ok: false; why: string };

/** Check every frame of a whole pack (verify --read-data), its bytes moved to the worker (not copied). */
export interface VerifyPackTask {
  op: 'verify-pack';
  pack: Uint8Array;
  frames: { offset: number; length: number }[];
}
export interface VerifyPackResult {
  bad: { offset: number; why: string }[];
}

export type BlockTask = HashTask | SealTask | OpenTask | VerifyPackTask;
