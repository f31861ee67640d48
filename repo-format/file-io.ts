/**
 * Whole reads and writes at a position of an open file. The kernel may move fewer bytes than asked (a
 * signal; a file that ends; a disk that fills, reported by the next call), so each loops from where the
 * last call stopped. Both return how many bytes moved and stop early only when a call moved none: the
 * caller knows what that means (a file shorter than expected, a write that cannot progress) and says so.
 * The repository's files and the engine's targets and overlay all go through these.
 */
import type { FileHandle } from 'node:fs/promises';

/** Reads until `target` is full or the file ends; returns how many bytes were read. */
export async function readFully(handle: FileHandle, target: Buffer, position: number): Promise<number> {
  let filled = 0;
  while (filled < target.length) {
    const { bytesRead } = await handle.read(target, filled, target.length - filled, position + filled);
    if (bytesRead === 0) break;
    filled += bytesRead;
  }
  return filled;
}

/**
 * Writes `buffers` in order from `position` with pwritev, again after a short write; returns the bytes
 * written (fewer than asked only when a call wrote none). `onCall` hears each call's count (the restore
 * counts its calls, and the bytes an O_DIRECT write got through before it failed).
 */
export async function writevFully(handle: FileHandle, buffers: readonly Uint8Array[], position: number, onCall?: (bytesWritten: number) => void): Promise<number> {
  let rest = buffers.filter((b) => b.length > 0);
  let written = 0;
  while (rest.length > 0) {
    const { bytesWritten } = await handle.writev(rest as Uint8Array[], position + written);
    onCall?.(bytesWritten);
    if (bytesWritten === 0) break;
    written += bytesWritten;
    rest = skipBytes(rest, bytesWritten);
  }
  return written;
}

/** `buffers` without their first `bytes` bytes (views, no copies). */
export function skipBytes<T extends Uint8Array>(buffers: readonly T[], bytes: number): T[] {
  let skip = bytes;
  let i = 0;
  while (i < buffers.length && skip >= buffers[i]!.length) {
    skip -= buffers[i]!.length;
    i += 1;
  }
  if (i === buffers.length) return [];
  return [buffers[i]!.subarray(skip) as T, ...buffers.slice(i + 1)];
}
