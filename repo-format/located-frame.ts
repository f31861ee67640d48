/**
 * Reads a located frame (frame-locator.ts) in the calling thread, a block worker: a local pack with pread, a
 * pack in an S3 store through a client this thread opens once per location (v3/location.ts: endpoint,
 * region, CA and credentials from the environment, which workers share with the process). The reasons are
 * worded as the main thread's reads word them (pack-file.ts, readFrameBytes): a missing or short pack is a
 * damaged frame, never a short read.
 */
import { CorruptFrameError, CorruptPackError } from './errors.js';
import { readLocalFrame, type FrameLocator } from './frame-locator.js';
import { readFrameBytes, readPackSpan } from './pack-file.js';
import type { Storage } from './storage/storage.js';
import { openLocation } from './v3/location.js';

/** This thread's stores, one per location; they live as long as the thread (a pool's workers). */
const stores = new Map<string, Promise<Storage>>();

function storeFor(location: string): Promise<Storage> {
  let store = stores.get(location);
  if (!store) {
    store = openLocation(location);
    // A store that failed to open is opened again by the next read, not remembered as failed.
    store.catch(() => stores.delete(location));
    stores.set(location, store);
  }
  return store;
}

/** Reads the frame into `target` (exactly `locator.length` bytes): undefined when it is all there, or why not. */
export async function readLocatedFrame(locator: FrameLocator, target: Buffer): Promise<string | undefined> {
  if (locator.kind === 'local-file') return readLocalFrame(locator, target);
  return readStored(target, async () => readFrameBytes(await storeFor(locator.location), locator.packId, locator.offset, locator.length, target));
}

/**
 * Reads several adjacent frames of one pack at once (a restore's span: one ranged GET instead of one per
 * frame) into `target`, exactly `locator.length` bytes, which its caller bounded. Undefined, or why not.
 */
export async function readLocatedSpan(locator: FrameLocator, target: Buffer): Promise<string | undefined> {
  if (locator.kind === 'local-file') return readLocalFrame(locator, target);
  return readStored(target, async () => readPackSpan(await storeFor(locator.location), locator.packId, locator.offset, locator.length, target));
}

/** The store places the bytes in `target` itself (GetOptions.into) when it can; otherwise they are copied there. */
async function readStored(target: Buffer, read: () => Promise<Buffer>): Promise<string | undefined> {
  try {
    const bytes = await read();
    if (bytes.buffer !== target.buffer || bytes.byteOffset !== target.byteOffset) bytes.copy(target);
    return undefined;
  } catch (error) {
    if (error instanceof CorruptPackError || error instanceof CorruptFrameError) return String(error.details.why ?? error.message);
    throw error;
  }
}
