/**
 * The CBT audit: before trusting a bitmap, re-read a small random sample of the blocks it calls clean and
 * compare them with the parent's map. A bitmap that missed a write (a bug, a tool that wrote around QEMU,
 * a restored image with stale bitmaps) is caught here, and the disk is read in full instead of producing a
 * silently incomplete incremental.
 */
import { randomInt } from 'node:crypto';
import { ZERO_ID } from '../../repo-format/constants.js';
import { DiskGeometry } from '../../repo-format/disk-geometry.js';
import { MapPageReader, type LoadPage, type MapRoot } from '../../repo-format/block-map.js';
import { DirtyCursor, type Range } from '../pipeline/map-cursors.js';
import type { BlockSource } from '../sources/source.js';

export interface AuditResult {
  audited: number;
  /** The first clean block that differs from the parent, if any. */
  mismatch?: { offset: number };
}

/** 16 blocks, plus one per 16384 (64 per TiB at 1 MiB blocks). */
export function auditSampleSize(blockCount: number): number {
  return Math.min(blockCount, 16 + Math.floor(blockCount / 16384));
}

export async function auditCleanBlocks(args: {
  source: BlockSource;
  parent: MapRoot;
  loadPage: LoadPage;
  dirty: AsyncIterable<Range>;
  blockSize: number;
  /** The repository's block id: SHA-256, or HMAC-SHA256 in an encrypted repository. */
  blockId: (data: Uint8Array) => Buffer;
}): Promise<AuditResult> {
  const { source, blockSize } = args;
  const geometry = new DiskGeometry(source.size, blockSize);
  const blockCount = geometry.blocks;
  const candidates = [...new Set(Array.from({ length: auditSampleSize(blockCount) }, () => randomInt(blockCount)))].sort((a, b) => a - b);
  const dirty = new DirtyCursor(args.dirty);
  const clean: number[] = [];
  for (const block of candidates) if ((await dirty.nextDirtyBlock(block, blockSize, blockCount)) !== block) clean.push(block); // dirty: not a sample
  const parent = new MapPageReader(args.parent, args.loadPage);
  const zeros = Buffer.alloc(blockSize);
  // AUDIT_READS_AT_ONCE reads in flight, compared in block order: the sample's blocks are scattered, and read one
  // at a time, each waited for, the 16 reads of a small disk's audit were 16 round trips through the NBD server.
  const buffers = Array.from({ length: Math.min(AUDIT_READS_AT_ONCE, clean.length) }, () => Buffer.allocUnsafe(blockSize));
  let audited = 0;
  for (let first = 0; first < clean.length; first += buffers.length) {
    const window = clean.slice(first, first + buffers.length);
    const data = window.map((block, i) => buffers[i]!.subarray(0, geometry.lengthOf(block)));
    await Promise.all(window.map((block, i) => source.read(data[i]!, geometry.offsetOf(block))));
    for (const [i, block] of window.entries()) {
      const id = data[i]!.equals(zeros.subarray(0, data[i]!.length)) ? ZERO_ID : args.blockId(data[i]!);
      audited += 1;
      if (!id.equals(await parent.entry(block))) return { audited, mismatch: { offset: geometry.offsetOf(block) } };
    }
  }
  return { audited };
}

/** The audit's reads in flight at once: 4 x the block size of buffers. */
const AUDIT_READS_AT_ONCE = 4;
