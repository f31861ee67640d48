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
import { readdir, unlink } from 'node:fs/promises';
import { readBoundedFile } from './bounded-read.js';
import { join } from 'node:path';
import { LAYOUT, SMALL_FILE_LIMIT } from './constants.js';
import { fsyncDirectory, writeFileDurably } from './durable-file.js';
import { ensurePrivateDirectory } from './file-modes.js';

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

/** Every quarantined frame, keyed by quarantineKey(pack, offset). Unreadable files are skipped. */
export async function listQuarantine(root: string): Promise<Map<string, QuarantinedFrame>> {
  const dir = join(root, LAYOUT.quarantine);
  const names = await readdir(dir).catch(() => [] as string[]);
  const frames = new Map<string, QuarantinedFrame>();
  for (const name of names.filter((n) => n.endsWith('.json'))) {
    const bytes = await readBoundedFile(join(dir, name), SMALL_FILE_LIMIT).catch(() => undefined);
    const frame = bytes && decodeQuarantined(bytes);
    if (frame) frames.set(quarantineKey(frame.pack, frame.offset), frame);
  }
  return frames;
}

/** Records frames durably; one already recorded keeps its first record. */
export async function addToQuarantine(root: string, frames: QuarantinedFrame[]): Promise<void> {
  if (frames.length === 0) return;
  const dir = join(root, LAYOUT.quarantine);
  await ensurePrivateDirectory(dir);
  const known = await listQuarantine(root);
  for (const frame of frames) {
    if (known.has(quarantineKey(frame.pack, frame.offset))) continue;
    await writeFileDurably(join(dir, `${quarantineKey(frame.pack, frame.offset)}.json`), encodeQuarantined(frame), { tempDir: join(root, LAYOUT.tmp) });
  }
}

/** Removes the records of the given frames (quarantineKey(pack, offset) each); returns the keys removed. */
export async function removeFromQuarantine(root: string, keys: readonly string[]): Promise<string[]> {
  const dir = join(root, LAYOUT.quarantine);
  const removed: string[] = [];
  for (const key of keys) {
    const gone = await unlink(join(dir, `${key}.json`)).then(
      () => true,
      () => false,
    );
    if (gone) removed.push(key);
  }
  if (removed.length > 0) await fsyncDirectory(dir);
  return removed;
}
