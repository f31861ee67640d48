/**
 * Shared memory whose start is page-aligned, so that a block slot (a whole number of pages) can be written
 * to a target opened with O_DIRECT straight from where a worker placed it: the disk's DMA reads the slot,
 * and no copy into the page cache happens. A plain SharedArrayBuffer comes from malloc (its start was 16 mod
 * 4096 here: O_DIRECT refuses it with EINVAL); a shared WebAssembly memory is mapped by V8 on page
 * boundaries (checked on this machine: O_DIRECT accepts it, and 16 bytes past its start it refuses).
 */

import { constants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';

/** Offsets, lengths and memory of an O_DIRECT transfer are multiples of this (the largest logical block size in use). */
export const DIRECT_IO_ALIGNMENT = 4096;

/** How many of the leading buffers are whole multiples of DIRECT_IO_ALIGNMENT long: the part of a run O_DIRECT can take. */
export function alignedPrefix(buffers: readonly Buffer[]): number {
  const odd = buffers.findIndex((b) => b.length % DIRECT_IO_ALIGNMENT !== 0);
  return odd < 0 ? buffers.length : odd;
}

/** The part of the WebAssembly global used here (the project's TypeScript libraries do not declare it). */
declare const WebAssembly: { Memory: new (descriptor: { initial: number; maximum: number; shared: boolean }) => { buffer: SharedArrayBuffer } };

const WASM_PAGE_BYTES = 64 * 1024;
/** A 32-bit WebAssembly memory holds at most 65536 pages (4 GiB). */
const WASM_MAX_PAGES = 65536;

/**
 * A SharedArrayBuffer of at least `bytes` bytes, page-aligned where the runtime gives one (WebAssembly), else a
 * plain one: alignment only makes O_DIRECT possible, it is never required (a target falls back to buffered writes).
 */
export function pageAlignedSharedBuffer(bytes: number): SharedArrayBuffer {
  const pages = Math.max(1, Math.ceil(bytes / WASM_PAGE_BYTES));
  if (pages <= WASM_MAX_PAGES) {
    try {
      return new WebAssembly.Memory({ initial: pages, maximum: pages, shared: true }).buffer;
    } catch {
      // No room for the reservation (a ulimit -v, say): plain memory, written through the page cache.
    }
  }
  return new SharedArrayBuffer(bytes);
}

/** `length` zero bytes in page-aligned memory: zeros written to a target opened with O_DIRECT. */
export function pageAlignedZeros(length: number): Buffer {
  return Buffer.from(pageAlignedSharedBuffer(length), 0, length);
}

/**
 * The file `handle` has open, opened again with O_DIRECT for `access`, or undefined where that is refused (a
 * file system without O_DIRECT, no /proc). Through /proc/self/fd, not the path: a path re-pointed since the
 * first open (a symlink, a rotated image) would read another file's bytes, or write into another file. tmpfs
 * takes O_DIRECT on this kernel (6.18) and serves it from its pages like a buffered read or write.
 */
export async function reopenDirect(handle: FileHandle, access: 'read' | 'write'): Promise<FileHandle | undefined> {
  const flags = access === 'read' ? constants.O_RDONLY | constants.O_NONBLOCK : constants.O_WRONLY;
  return open(`/proc/self/fd/${handle.fd}`, flags | constants.O_DIRECT).catch(() => undefined);
}
