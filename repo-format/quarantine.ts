/**
 * The quarantine: frames found damaged by `repair`. Packs are immutable, so a damaged frame stays where
 * it is; what moves is its identity: its index entry is removed (deduplication then misses the blob, and
 * the next backup that reads the block stores a good copy) and its place is recorded here, one file per
 * frame, `quarantine/<pack id>-<offset>.json`:
 *
 *   {"pack": <32 hex>, "offset": <integer>, "blob": <64 hex> | null, "why": <text>, "since": <ISO 8601>}
 *
 * `blob` is null for damage that is not one frame (a pack header, or a frame chain cut where no header
 * parses). An index rebuilt from the packs never enters a quarantined frame; verify reports a
 * quarantined frame as known damage, not as a new problem; gc removes the records of packs that no longer
 * exist, except those of blobs a backup still references with no good copy (the only trace of that damage).
 */
import { SMALL_FILE_LIMIT } from './constants.js';
import type { Storage } from './storage/storage.js';
import { QUARANTINE_PREFIX, storeAt } from './store.js';

export interface QuarantinedFrame {
  pack: string;
  offset: number;
  blob: string | null;
  why: string;
  since: string;
}

export function quarantineKey(pack: string, offset: number): string {
  return `${pack}-${offset}`;
}

export function encodeQuarantined(frame: QuarantinedFrame): Buffer {
  return Buffer.from(JSON.stringify({ pack: frame.pack, offset: frame.offset, blob: frame.blob, why: frame.why, since: frame.since }));
}

export function decodeQuarantined(bytes: Buffer): QuarantinedFrame | undefined {
  try {
    const value = JSON.parse(bytes.toString('utf8')) as Partial<QuarantinedFrame>;
    if (typeof value.pack !== 'string' || !/^[0-9a-f]{32}$/.test(value.pack)) return undefined;
    if (typeof value.offset !== 'number' || !Number.isSafeInteger(value.offset) || value.offset < 0) return undefined;
    if (value.blob !== null && (typeof value.blob !== 'string' || !/^[0-9a-f]{64}$/.test(value.blob))) return undefined;
    return { pack: value.pack, offset: value.offset, blob: value.blob, why: String(value.why ?? ''), since: String(value.since ?? '') };
  } catch {
    return undefined;
  }
}

function markerKey(key: string): string {
  return `${QUARANTINE_PREFIX}${key}.json`;
}

/** Every quarantined frame, keyed by quarantineKey(pack, offset). Unreadable records are skipped. */
export async function listQuarantine(where: Storage | string): Promise<Map<string, QuarantinedFrame>> {
  const store = storeAt(where);
  const frames = new Map<string, QuarantinedFrame>();
  for await (const { key } of store.list(QUARANTINE_PREFIX)) {
    if (!key.endsWith('.json') || key.slice(QUARANTINE_PREFIX.length).includes('/')) continue;
    const bytes = await store.get(key, { maxSize: SMALL_FILE_LIMIT }).catch(() => undefined);
    const frame = bytes && decodeQuarantined(bytes);
    if (frame) frames.set(quarantineKey(frame.pack, frame.offset), frame);
  }
  return frames;
}

/** Records frames durably; one already recorded keeps its first record. */
export async function addToQuarantine(where: Storage | string, frames: QuarantinedFrame[]): Promise<void> {
  const store = storeAt(where);
  if (frames.length === 0) return;
  const known = await listQuarantine(store);
  for (const frame of frames) {
    if (known.has(quarantineKey(frame.pack, frame.offset))) continue;
    await store.put(markerKey(quarantineKey(frame.pack, frame.offset)), encodeQuarantined(frame));
  }
}

/** Removes the records of the given frames (quarantineKey(pack, offset) each); returns the keys removed. */
export async function removeFromQuarantine(where: Storage | string, keys: readonly string[]): Promise<string[]> {
  const store = storeAt(where);
  const removed: string[] = [];
  for (const key of keys) {
    const present = await store.stat(markerKey(key)).then(
      () => true,
      () => false,
    );
    if (!present) continue;
    const gone = await store.delete(markerKey(key)).then(
      () => true,
      () => false,
    );
    if (gone) removed.push(key);
  }
  return removed;
}
