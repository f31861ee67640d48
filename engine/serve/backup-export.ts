/**
 * One disk of a backup as an NBD export: reads come from the block table (zero blocks are holes, never
 * read), chunks from the packs through the cache, with read-ahead of the next chunks when the client reads
 * sequentially. With an overlay the export is writable: writes go to the overlay, reads merge it over the
 * backup, and the repository is never written.
 */
import * as P from '../nbd/protocol.js';
import { ExportError, type AllocationExtent, type NbdExport, type ReadPiece } from '../nbd/export.js';
import type { BlockTable } from './block-table.js';
import { ChunkUnreadable, type ChunkLoader } from './chunk-cache.js';
import { GRANULE, type Overlay } from './overlay.js';

export interface BackupExportOptions {
  name: string;
  backupId: string;
  /** Distinguishes this export's chunks in the shared cache. */
  exportIndex: number;
  table: BlockTable;
  loader: ChunkLoader;
  readAheadBlocks: number;
  overlay?: Overlay | undefined;
  onLog?: ((message: string) => void) | undefined;
}

/** Zeros for the backup's zero blocks under a read-modify-write (a granule at most). */
const ZEROS = Buffer.alloc(GRANULE);

/** Room for 2^36 blocks per export in the cache key, far beyond any disk. */
const KEY_STRIDE = 2 ** 36;

export class BackupExport implements NbdExport {
  readonly name: string;
  readonly description: string;
  readonly size: number;
  readonly writable: boolean;
  private nextSequentialBlock = -1;
  badChunks = 0;

  constructor(private readonly options: BackupExportOptions) {
    this.name = options.name;
    this.size = options.table.diskSize;
    this.writable = options.overlay !== undefined;
    this.description = `disk ${options.name} of backup ${options.backupId}${this.writable ? ' (writable overlay; the backup is never changed)' : ''}`;
  }

  private get table(): BlockTable {
    return this.options.table;
  }

  async read(offset: number, length: number): Promise<ReadPiece[]> {
    const geometry = this.table.geometry;
    const { first, end: endBlock } = geometry.blocksTouched(offset, length);
    const parts: Promise<ReadPiece>[] = [];
    for (let block = first; block < endBlock; block += 1) {
      const start = Math.max(offset, geometry.offsetOf(block));
      const end = Math.min(offset + length, geometry.offsetOf(block) + geometry.lengthOf(block));
      parts.push(this.readInBlock(block, start, end - start));
    }
    const pieces = await Promise.all(parts);
    this.readAhead(first, endBlock - 1);
    return mergeHoles(pieces);
  }

  private async readInBlock(block: number, offset: number, length: number): Promise<ReadPiece> {
    const overlay = this.options.overlay;
    const inBlock = offset - this.table.geometry.offsetOf(block);
    if (overlay?.touches(block)) {
      const target = Buffer.alloc(length);
      // A range the overlay answers alone needs no backup read: an overwritten damaged chunk reads fine.
      if (!this.table.isZero(block) && !overlay.covers(block, inBlock, length)) (await this.chunk(block)).copy(target, 0, inBlock, inBlock + length);
      await overlay.readInto(block, inBlock, target);
      return { offset, data: target };
    }
    if (this.table.isZero(block)) return { offset, length, zero: true };
    const chunk = await this.chunk(block);
    return { offset, data: chunk.subarray(inBlock, inBlock + length) };
  }

  private async chunk(block: number): Promise<Buffer> {
    const key = this.key(block);
    // A cached chunk (the usual case: small reads fall in the chunk the last one read) costs no lookup.
    const cached = this.options.loader.cached(key);
    if (cached) return cached;
    const location = this.table.location(block);
    if (!location) {
      this.badChunks += 1;
      this.options.onLog?.(`${this.where(block)}: chunk ${this.table.id(block).toString('hex').slice(0, 16)}… is missing from the repository; answering EIO`);
      throw new ExportError(P.NBD_EIO, `${this.where(block)}: chunk missing from the repository`);
    }
    try {
      return await this.options.loader.fetch(key, location, this.table.lengthOf(block));
    } catch (error) {
      if (!(error instanceof ChunkUnreadable)) throw error;
      this.badChunks += 1;
      this.options.onLog?.(`${this.where(block)}: ${error.message}; answering EIO`);
      throw new ExportError(P.NBD_EIO, `${this.where(block)}: ${error.message}`);
    }
  }

  private where(block: number): string {
    return `backup ${this.options.backupId}, disk ${this.name}, offset ${this.table.geometry.offsetOf(block)}`;
  }

  private key(block: number): number {
    return this.options.exportIndex * KEY_STRIDE + block;
  }

  /**
   * Sequential reads (this one starts where the last ended, or in the same block) load the next chunks early.
   * A read that ends in the block the last one ended in asks for the same chunks again: skipped (a guest's
   * small reads would otherwise look up every chunk of the window once per read).
   */
  private readAhead(first: number, last: number): void {
    const sequential = first === this.nextSequentialBlock || first === this.nextSequentialBlock - 1;
    const moved = last + 1 !== this.nextSequentialBlock;
    this.nextSequentialBlock = last + 1;
    if (!sequential || !moved) return;
    for (let block = last + 1; block <= last + this.options.readAheadBlocks && block < this.table.blocks; block += 1) {
      const location = this.table.location(block);
      if (!location || !this.options.loader.idle(this.key(block))) continue;
      // A failure here is reported by the read that needs the chunk, not by the guess.
      this.options.loader.load(this.key(block), location, this.table.lengthOf(block)).catch(() => undefined);
    }
  }

  async allocation(offset: number, length: number): Promise<AllocationExtent[]> {
    const geometry = this.table.geometry;
    const blockSize = geometry.blockSize;
    const extents: AllocationExtent[] = [];
    const end = offset + length;
    let block = geometry.blockAt(offset);
    let at = offset;
    while (at < end && block < this.table.blocks) {
      const zero = this.table.isZero(block) && !this.options.overlay?.touches(block);
      const flags = zero ? P.STATE_HOLE | P.STATE_ZERO : 0;
      const blockEnd = Math.min(end, geometry.offsetOf(block) + geometry.lengthOf(block));
      const previous = extents[extents.length - 1];
      // Extent lengths are u32: start a new extent rather than overflow one.
      if (previous && previous.flags === flags && previous.length + (blockEnd - at) <= 0xffffffff - blockSize) previous.length += blockEnd - at;
      else extents.push({ length: blockEnd - at, flags });
      at = blockEnd;
      block += 1;
    }
    return extents;
  }

  async write(data: Buffer, offset: number): Promise<void> {
    await overlayErrors(this.overlayOrRefuse().write(data, offset, (o, l) => this.backupBytes(o, l)));
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    await overlayErrors(this.overlayOrRefuse().zero(offset, length, (o, l) => this.backupBytes(o, l)));
  }

  async trim(offset: number, length: number): Promise<void> {
    // A trimmed range may read as anything afterwards; zeros are the simplest honest answer, and cost nothing.
    await this.writeZeroes(offset, length);
  }

  async flush(): Promise<void> {
    if (this.options.overlay) await overlayErrors(this.options.overlay.flush());
  }

  private overlayOrRefuse(): Overlay {
    if (!this.options.overlay) throw new ExportError(P.NBD_EPERM, 'the export is read-only');
    return this.options.overlay;
  }

  /**
   * The backup's bytes of a range inside one block, for the overlay's read-modify-write of a granule it does
   * not hold: a view of the cached chunk (or of zeros), no copy. A guest writing sequentially gets the
   * read-ahead a reader gets.
   */
  private async backupBytes(offset: number, length: number): Promise<Buffer> {
    const block = this.table.geometry.blockAt(offset);
    const inBlock = offset - this.table.geometry.offsetOf(block);
    const bytes = this.table.isZero(block) ? ZEROS.subarray(0, length) : (await this.chunk(block)).subarray(inBlock, inBlock + length);
    this.readAhead(block, block);
    return bytes;
  }
}

/** The overlay's file system full (or over quota) is NBD_ENOSPC to the guest, which can act on it; anything else NBD_EIO. */
async function overlayErrors(work: Promise<void>): Promise<void> {
  try {
    await work;
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'ENOSPC' || code === 'EDQUOT') throw new ExportError(P.NBD_ENOSPC, `the overlay's file system is full (${code})`);
    throw error;
  }
}

function mergeHoles(pieces: ReadPiece[]): ReadPiece[] {
  const merged: ReadPiece[] = [];
  for (const piece of pieces) {
    const previous = merged[merged.length - 1];
    if (previous && 'zero' in previous && 'zero' in piece) previous.length += piece.length;
    else merged.push('zero' in piece ? { ...piece } : piece);
  }
  return merged;
}
