/**
 * Where every block of a served disk lives, resolved once while holding the repository lock, so that the
 * server can then read packs for hours without the lock and without the index (SPEC 12.2).
 *
 * Compact typed arrays, one slot per block:
 *   pack      u32  index into the pack id list; ZERO (all-zero block) or MISSING (not in the index)
 *   offset    u32  frame offset in the pack
 *   length    u32  frame length
 *   id        32 B chunk id, checked against the chunk's SHA-256 before it is served
 * = 44 bytes per block: 44 MiB per TiB of disk at 1 MiB blocks. This is the only part of `serve` that
 * grows with the disk; pack ids are shared by all disks of the server.
 */
import { readMap } from '../../repo-format/block-map.js';
import { mapRootOf, type DiskRecord } from '../../repo-format/backup-record.js';
import { ID_SIZE, ZERO_ID } from '../../repo-format/constants.js';
import type { Repository } from '../../repo-format/repository.js';

export const ZERO_BLOCK = 0xffffffff;
export const MISSING_BLOCK = 0xfffffffe;
export const BYTES_PER_BLOCK = 4 + 4 + 4 + ID_SIZE;
const LOOKUP_BATCH = 4096;

/** Pack ids, each stored once and named by a small number in the tables. */
export class PackIds {
  private readonly indexOf = new Map<string, number>();
  readonly ids: string[] = [];

  number(packId: string): number {
    let n = this.indexOf.get(packId);
    if (n === undefined) {
      n = this.ids.length;
      this.ids.push(packId);
      this.indexOf.set(packId, n);
    }
    return n;
  }
}

export interface ChunkLocation {
  packId: string;
  offset: number;
  length: number;
  id: Buffer;
}

export class BlockTable {
  readonly blocks: number;
  private readonly pack: Uint32Array;
  private readonly offset: Uint32Array;
  private readonly length: Uint32Array;
  private readonly ids: Uint8Array;

  constructor(
    readonly diskSize: number,
    readonly blockSize: number,
    private readonly packIds: PackIds,
  ) {
    this.blocks = Math.ceil(diskSize / blockSize);
    this.pack = new Uint32Array(this.blocks).fill(ZERO_BLOCK);
    this.offset = new Uint32Array(this.blocks);
    this.length = new Uint32Array(this.blocks);
    this.ids = new Uint8Array(this.blocks * ID_SIZE);
  }

  /** Bytes of block `block` (the last block may be short). */
  lengthOf(block: number): number {
    return Math.min(this.blockSize, this.diskSize - block * this.blockSize);
  }

  isZero(block: number): boolean {
    return this.pack[block] === ZERO_BLOCK;
  }

  isMissing(block: number): boolean {
    return this.pack[block] === MISSING_BLOCK;
  }

  id(block: number): Buffer {
    return Buffer.from(this.ids.buffer, this.ids.byteOffset + block * ID_SIZE, ID_SIZE);
  }

  location(block: number): ChunkLocation | undefined {
    const pack = this.pack[block]!;
    if (pack === ZERO_BLOCK || pack === MISSING_BLOCK) return undefined;
    return { packId: this.packIds.ids[pack]!, offset: this.offset[block]!, length: this.length[block]!, id: this.id(block) };
  }

  setMissing(block: number, id: Uint8Array): void {
    this.pack[block] = MISSING_BLOCK;
    this.ids.set(id, block * ID_SIZE);
  }

  setChunk(block: number, id: Uint8Array, location: { packId: string; offset: number; length: number }): void {
    this.pack[block] = this.packIds.number(location.packId);
    this.offset[block] = location.offset;
    this.length[block] = location.length;
    this.ids.set(id, block * ID_SIZE);
  }

  get memoryBytes(): number {
    return this.blocks * BYTES_PER_BLOCK;
  }
}

/** Walks a disk's map and looks every chunk up in the index (batched). Needs the repository's index. */
export async function resolveBlockTable(repo: Repository, disk: DiskRecord, packIds: PackIds): Promise<{ table: BlockTable; missing: number }> {
  const table = new BlockTable(disk.size, repo.blockSize, packIds);
  let missing = 0;
  let batch: { block: number; id: Buffer }[] = [];
  const lookUp = async (): Promise<void> => {
    // A chunk whose pack is gone or cut short is missing too: announced at start, answered with EIO.
    const locations = await repo.packPresence.filter(await repo.lookup(batch.map((b) => b.id)));
    batch.forEach(({ block, id }, i) => {
      const location = locations[i];
      if (location) table.setChunk(block, id, location);
      else {
        table.setMissing(block, id);
        missing += 1;
      }
    });
    batch = [];
  };
  for await (const run of readMap(mapRootOf(disk), repo.loadPage)) {
    if (run.entries === null) continue;
    for (let i = 0; i < run.count; i += 1) {
      const id = run.entries.subarray(i * ID_SIZE, (i + 1) * ID_SIZE);
      if (ZERO_ID.equals(id)) continue;
      batch.push({ block: run.firstBlock + i, id: Buffer.from(id) });
      if (batch.length >= LOOKUP_BATCH) await lookUp();
    }
  }
  if (batch.length > 0) await lookUp();
  return { table, missing };
}
