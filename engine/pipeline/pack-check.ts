/**
 * Every frame of a pack checked in full by the workers (verify --read-data, repair). A store of local files
 * gives a locator, and a worker reads the frames itself (pread, one frame at a time); any other store is
 * read through the repository in spans of at most SPAN_BYTES, each span's bytes moved to a worker. Memory:
 * a frame and a block per task in flight (block-runner.ts, verifyPack), or a span per worker; never a whole pack (measured: whole 40 MiB spans per worker
 * raised verify --read-data's peak RSS of a 1 GiB repository from 239 to 353 MiB).
 */
import { StorageError } from '../../repo-format/storage/storage-error.js';
import type { FrameLocator } from '../../repo-format/frame-locator.js';
import type { BlockPool } from './block-pool.js';
import type { VerifyPackResult } from './tasks.js';

/** Bytes read at once from a store that is not local files (S3: one ranged GET). */
const SPAN_BYTES = 8 * 1024 * 1024;

type Frame = { offset: number; length: number };

/** Why a span could not be read, said of each of its frames as the worker would. */
function readFailure(error: unknown): string {
  if (error instanceof StorageError && error.reason === 'out-of-range') return 'pack is truncated';
  if (error instanceof StorageError) return `read error (${error.storage.backendCode ?? error.reason})`;
  throw error;
}

/** Consecutive frames grouped into spans of at most SPAN_BYTES (a larger frame is a span of its own). */
function spans(frames: readonly Frame[]): Frame[][] {
  const groups: Frame[][] = [];
  let current: Frame[] = [];
  let start = 0;
  for (const frame of frames) {
    const contiguous = current.length > 0 && frame.offset === current[current.length - 1]!.offset + current[current.length - 1]!.length;
    if (current.length > 0 && (!contiguous || frame.offset + frame.length - start > SPAN_BYTES)) {
      groups.push(current);
      current = [];
    }
    if (current.length === 0) start = frame.offset;
    current.push(frame);
  }
  if (current.length > 0) groups.push(current);
  return groups;
}

/**
 * Checks `frames` of a pack; `readRange(offset, length)` reads exactly those bytes of it (the repository's
 * readPackRange). Spans are checked one after another: at most one span per call is in memory.
 */
export async function checkPackFrames(pool: BlockPool, pack: { locator: FrameLocator | undefined; readRange: (offset: number, length: number) => Promise<Buffer> }, frames: readonly Frame[]): Promise<VerifyPackResult> {
  if (pack.locator) return pool.verifyLocatedPack(pack.locator, frames.map(({ offset, length }) => ({ offset, length })));
  const readRange = pack.readRange;
  const bad: VerifyPackResult['bad'] = [];
  for (const group of spans(frames)) {
    const start = group[0]!.offset;
    const last = group[group.length - 1]!;
    let bytes: Buffer;
    try {
      bytes = await readRange(start, last.offset + last.length - start);
    } catch (error) {
      const why = readFailure(error);
      for (const frame of group) bad.push({ offset: frame.offset, why });
      continue;
    }
    const result = await pool.verifyPack(bytes, group.map((frame) => ({ offset: frame.offset - start, length: frame.length })));
    for (const { offset, why } of result.bad) bad.push({ offset: offset + start, why });
  }
  return { bad };
}
