/**
 * Which blocks a rollback through a dirty bitmap must write (rollback policy `bitmap`; the CLI's
 * `restore --only-changed --since-bitmap NAME`).
 *
 * The bitmap NAME is the checkpoint of a backup B of this disk (the engine created it when it took B,
 * before reading: SPEC 11.1). A block the bitmap calls clean has not been written since B read it, so the
 * target holds B's version of it. To bring the target to the restore point R, the engine must therefore
 * write (a) every block the bitmap marks dirty and (b) every block whose entry differs between R's map and
 * B's map. Both sets are exact at block granularity; the union is written, nothing is compared.
 */
import { MapPageReader, readMap } from '../../repo-format/block-map.js';
import { mapRootOf, type BackupRecord, type DiskRecord } from '../../repo-format/backup-record.js';
import { ID_SIZE, ZERO_ID } from '../../repo-format/constants.js';
import { DiskGeometry } from '../../repo-format/disk-geometry.js';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { withRemedies } from '../errors.js';
import type { Repository } from '../../repo-format/repository.js';
import type { Range } from '../pipeline/map-cursors.js';
import { BlockSet } from '../common/block-set.js';
import type { Interruption } from '../host/interrupt.js';

export interface RollbackPlan {
  /** Every block to write. */
  write: BlockSet;
  base: BackupRecord;
  blocksDirty: number;
  blocksChangedSinceBase: number;
}

/** The backup whose checkpoint is `bitmap` for a disk named `diskName`. */
export async function backupOfCheckpoint(repo: Repository, diskName: string, bitmap: string): Promise<{ record: BackupRecord; disk: DiskRecord }> {
  const { backups } = await repo.listBackups();
  for (const record of backups) {
    const disk = record.disks.find((d) => d.name === diskName && d.cbt?.checkpoint === bitmap);
    if (disk) return { record, disk };
  }
  throw new InvalidArgumentError(
    `no backup in this repository has checkpoint ${bitmap} for disk ${diskName}: the engine cannot know what the target held when the bitmap started`,
    withRemedies({ bitmap, disk: diskName }, { kind: 'compare-every-block' }),
  );
}

/** `interruption`: a long clean bitmap is walked over many NBD requests; it stops the walk within a second. */
export async function planRollback(repo: Repository, disk: DiskRecord, bitmap: string, dirty: AsyncIterable<Range>, interruption?: Interruption): Promise<RollbackPlan> {
  const base = await backupOfCheckpoint(repo, disk.name, bitmap);
  if (base.disk.size !== disk.size) throw new InvalidArgumentError(`disk ${disk.name} was ${base.disk.size} bytes in backup ${base.record.id} and is ${disk.size} in the restore point: a rollback cannot cross a resize`);
  const geometry = new DiskGeometry(disk.size, repo.blockSize);
  const write = new BlockSet();
  const ranges = dirty[Symbol.asyncIterator]();
  for (;;) {
    const next = await (interruption ? interruption.race(ranges.next()) : ranges.next());
    if (next.done) break;
    const { first, end } = geometry.blocksTouched(next.value.offset, next.value.length);
    for (let block = first; block < end; block += 1) write.add(block);
  }
  const blocksDirty = write.size;
  let blocksChangedSinceBase = 0;
  const baseMap = new MapPageReader(mapRootOf(base.disk), repo.loadPage);
  for await (const run of readMap(mapRootOf(disk), repo.loadPage)) {
    for (let i = 0; i < run.count; i += 1) {
      await interruption?.tick();
      const block = run.firstBlock + i;
      const entry = run.entries === null ? ZERO_ID : run.entries.subarray(i * ID_SIZE, (i + 1) * ID_SIZE);
      if (entry.equals(await baseMap.entry(block))) continue;
      blocksChangedSinceBase += 1;
      write.add(block);
    }
  }
  return { write, base: base.record, blocksDirty, blocksChangedSinceBase };
}
