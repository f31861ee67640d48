/**
 * Walks what backups reference: every map page and every chunk of every disk, in block order, with the
 * chunk's index location (one batched lookup per leaf). Verify reports from it; gc marks from it.
 */
import type { Repository } from '../../repo-format/repository.js';
import type { BackupRecord } from '../../repo-format/backup-record.js';
import { mapRootOf } from '../../repo-format/backup-record.js';
import { mapPageIds, readMap, runChunks } from '../../repo-format/block-map.js';
import { DiskGeometry } from '../../repo-format/disk-geometry.js';
import type { BlobLocation } from '../../repo-format/index-entry.js';
import { InterruptedError } from '../errors.js';
import type { Interruption } from '../host/interrupt.js';

export interface ChunkReference {
  backup: string;
  disk: string;
  /** Byte offset of the block in the disk. */
  offset: number;
  /** The block's length: the chunk must hold exactly this many bytes (SPEC.md, section 8). */
  length: number;
  id: Buffer;
  location: BlobLocation | undefined;
}

export interface ReferenceVisitor {
  page(id: Buffer, where: { backup: string; disk: string }): void;
  chunk(reference: ChunkReference): void;
  /** A map that cannot be read to its end (its pages missing or damaged). */
  mapDamaged(backup: string, disk: string, error: Error): void;
}

/**
 * `onRecord`: progress, before each record. `interruption`: checked per page and per run of the map (an
 * InterruptedError is not taken for a damaged map: it ends the walk).
 */
export async function walkReferences(
  repo: Repository,
  records: readonly BackupRecord[],
  visitor: ReferenceVisitor,
  options: { onRecord?: (n: number) => void; interruption?: Interruption } = {},
): Promise<void> {
  const interruption = options.interruption;
  for (const [n, record] of records.entries()) {
    options.onRecord?.(n);
    for (const disk of record.disks) {
      const geometry = new DiskGeometry(disk.size, record.blockSize);
      try {
        for await (const { id } of mapPageIds(mapRootOf(disk), repo.loadPage)) {
          await interruption?.tick();
          visitor.page(id, { backup: record.id, disk: disk.name });
        }
        for await (const run of readMap(mapRootOf(disk), repo.loadPage)) {
          await interruption?.tick();
          if (run.entries === null) continue;
          const { ids, blocks } = runChunks(run);
          const locations = await repo.lookup(ids);
          ids.forEach((id, i) => {
            visitor.chunk({ backup: record.id, disk: disk.name, offset: geometry.offsetOf(blocks[i]!), length: geometry.lengthOf(blocks[i]!), id, location: locations[i] });
          });
        }
      } catch (error) {
        if (error instanceof InterruptedError) throw error;
        visitor.mapDamaged(record.id, disk.name, error as Error);
      }
    }
  }
}
