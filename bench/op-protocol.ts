/**
 * What bench/block-size.ts asks bench/run-op.ts to do (one operation per child process, so that the
 * child's peak RSS is that operation's) and the one JSON line the child answers with.
 */
import type { DiskStats } from '../engine/index.js';

export type OpRequest =
  | { op: 'generate'; path: string; size: number; seed: string }
  | { op: 'mutate'; path: string; fraction: number; seed: string }
  | { op: 'backup'; repo: string; source: string; diskName: string; name: string }
  | { op: 'restore'; repo: string; backupId: string; to: string }
  | { op: 'compute'; image: string; blockSize: number };

export type OpName = OpRequest['op'];

export interface GenerateOpResult {
  size: number;
  dataBytes: number;
}

export interface MutateOpResult {
  writes: number;
  bytes: number;
}

export interface BackupOpResult {
  backupId: string;
  blockSize: number;
  size: number;
  mapDepth: number;
  mapBlocks: number;
  stats: DiskStats;
}

export interface RestoreOpResult {
  size: number;
  bytesWritten: number;
  blocksZero: number;
}

/**
 * Single-thread compute over the image in blocks of `blockSize`. Times in nanoseconds, summed over the
 * blocks of each category; reading the file is not timed.
 */
export interface ComputeOpResult {
  blockSize: number;
  size: number;
  blocks: number;
  zeroBlocks: number;
  /** Non-zero blocks whose SHA-256 was seen earlier in the image (the engine would not compress them). */
  duplicateBlocks: number;
  newBlocks: number;
  newRawBytes: number;
  /** lz4 output of the new blocks, or their raw length where lz4 does not shrink them (as the engine stores). */
  newCompressedBytes: number;
  zeroCheckNs: number;
  /** SHA-256 of the non-zero blocks. */
  shaNonZeroNs: number;
  /** SHA-256 of the all-zero blocks (the engine skips it; counted only in the plain figure). */
  shaZeroNs: number;
  /** lz4 of the first occurrence of each non-zero block. */
  lz4NewNs: number;
  /** lz4 of repeated non-zero blocks and of zero blocks (the engine skips it; plain figure only). */
  lz4SkippedNs: number;
}

export interface OpResults {
  generate: GenerateOpResult;
  mutate: MutateOpResult;
  backup: BackupOpResult;
  restore: RestoreOpResult;
  compute: ComputeOpResult;
}

export interface OpSuccess<N extends OpName> {
  ok: true;
  op: N;
  result: OpResults[N];
  /** Wall time of the operation itself, measured in the child (process start-up and imports excluded). */
  wallMs: number;
  /** CPU time of the whole process (all threads, so the worker pool too) during the operation, µs. */
  cpuUserUs: number;
  cpuSystemUs: number;
  /** CPU time of the whole child process from its start, µs. */
  processCpuUserUs: number;
  processCpuSystemUs: number;
  /** process.resourceUsage().maxRSS at the end: the child's peak RSS, KiB. */
  maxRssKiB: number;
  /** RSS just before the operation started (Node + imports), MiB. */
  rssBeforeMiB: number;
  /** RSS sampled every 250 ms during the operation, at most 24 evenly spaced samples, MiB. */
  rssSamplesMiB: number[];
}

export interface OpFailure {
  ok: false;
  op: string;
  error: string;
}

export type OpOutput = OpSuccess<OpName> | OpFailure;
