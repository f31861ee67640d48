/**
 * Where a frame's bytes are, for a block worker to read them itself: an opaque value the repository builds
 * (Repository.locateFrame, StoreHandle.locateFrame) and only repo-format reads (this module for local files,
 * located-frame.ts for any); engine/ passes it along without looking inside.
 *
 * Why it exists, measured (whole-process timings, 1 GiB restored, 5 runs against the code before the
 * storage interface, on the shared 2-core machine): with every frame read by the main thread through the
 * store, a restore took 1.61 times the wall time and 1.26 times the CPU of workers reading their frames
 * with pread (an open, fstat, read and close on libuv's pool, a 1 MiB buffer and a copy per frame, on the
 * thread that also writes the target); with locators, 1.02 and 0.94.
 *
 * S3 (a store of objects, not files): the locator names the repository's location (the s3:// URL) and the
 * object; each worker opens a client of its own from it, with the endpoint, region, CA and credentials of
 * the process's environment (as every command but init), never anything in a message or argv. Measured
 * with bench/v3-s3-restore.ts (a 1 GiB random image restored from RGW on this machine, whole processes,
 * the two ways interleaved, 3 runs each, load average ~17 from other work): the main thread fetching each
 * frame through the store, 12.9–15.3 s wall, 7.5–8.2 CPU-seconds, 262–269 MiB peak RSS; each worker
 * fetching its own, 11.7–15.5 s, 5.9–7.8 CPU-seconds, 261–265 MiB (every restore cmp-identical). Workers
 * fetching is kept: less CPU on the thread that also writes the target, the same bounded memory (one frame
 * per slot either way). A whole pack (verify --read-data, repair) gets no S3 locator: the main thread reads
 * it in bounded spans (pipeline/pack-check.ts).
 */
import { closeSync, openSync, readSync } from 'node:fs';

/** Opaque outside repo-format: made by the repository, read by located-frame.ts. */
export type FrameLocator = LocalFrameLocator | StoredFrameLocator;

/** A frame of a pack that is a local file: read with pread. */
export interface LocalFrameLocator {
  readonly kind: 'local-file';
  readonly file: string;
  readonly offset: number;
  readonly length: number;
}

/** A frame of a pack in an S3 store: the worker reads it through a client of its own, opened from `location`. */
export interface StoredFrameLocator {
  readonly kind: 'store';
  /** The repository's location (s3://bucket/prefix): no credentials, which come from the environment. */
  readonly location: string;
  readonly packId: string;
  readonly offset: number;
  readonly length: number;
}

/** The same pack, another range (a worker checking a pack's frames one after another). */
export function locatorAt<L extends FrameLocator>(locator: L, offset: number, length: number): L {
  return { ...locator, offset, length };
}

/**
 * `span` extended by `next` when `next` starts where `span` ends in the same pack object and the two fit in
 * `maxBytes`: one read (one ranged GET) for adjacent frames. Only for a pack in a store of objects, where a
 * read is a request; a local pack is read a frame at a time (pread, measured above). Else undefined.
 */
export function extendSpan(span: FrameLocator, next: FrameLocator, maxBytes: number): FrameLocator | undefined {
  if (span.kind !== 'store' || next.kind !== 'store') return undefined;
  if (next.location !== span.location || next.packId !== span.packId || next.offset !== span.offset + span.length) return undefined;
  if (span.length + next.length > maxBytes) return undefined;
  return { ...span, length: span.length + next.length };
}

export function localFrameLocator(file: string, offset: number, length: number): FrameLocator {
  return { kind: 'local-file', file, offset, length };
}

/**
 * Reads the located frame of a local pack into `target` (exactly `locator.length` bytes) with pread, in the calling thread.
 * Returns undefined when it is all there, or why not, worded as a damaged pack is everywhere else.
 */
export function readLocalFrame(locator: LocalFrameLocator, target: Buffer): string | undefined {
  let fd: number;
  try {
    fd = openSync(locator.file, 'r');
  } catch (error) {
    return `cannot open pack (${(error as NodeJS.ErrnoException).code ?? String(error)})`;
  }
  try {
    let filled = 0;
    while (filled < locator.length) {
      const got = readSync(fd, target, filled, locator.length - filled, locator.offset + filled);
      if (got === 0) break;
      filled += got;
    }
    if (filled !== locator.length) return `pack is truncated: read ${filled} of ${locator.length} bytes`;
    return undefined;
  } catch (error) {
    return `read error (${(error as NodeJS.ErrnoException).code ?? String(error)})`;
  } finally {
    closeSync(fd);
  }
}
