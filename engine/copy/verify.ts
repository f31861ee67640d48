/**
 * Verified on arrival (SPEC.md 22.5): after a copy's record is committed, it is read back from the target
 * and must decode to exactly what was written, and every page of each map is read (frame checked, id
 * checked) and every chunk it names must resolve in the target's index to a pack that is there. The chunks'
 * frames were checked as they were written (the write path seals and indexes what it wrote); what this adds
 * is the proof that the record the target now serves names only what the target holds.
 */
import { encodeBackupRecord, mapRootOf, type BackupRecord } from '../../repo-format/backup-record.js';
import { readMap, runChunks } from '../../repo-format/block-map.js';
import { CorruptMetadataError, MissingBlobError } from '../../repo-format/errors.js';
import type { Repository } from '../../repo-format/repository.js';
import type { Interruption } from '../host/interrupt.js';

export async function verifyArrival(target: Repository, written: BackupRecord, interruption: Interruption): Promise<{ chunks: number }> {
  const back = await target.readBackup(written.id);
  if (!encodeBackupRecord(back).equals(encodeBackupRecord(written))) throw new CorruptMetadataError(`backup record ${written.id} on the target`, 'reads back other than it was written');
  let chunks = 0;
  for (const disk of back.disks) {
    for await (const run of readMap(mapRootOf(disk), target.loadPage)) {
      await interruption.tick();
      const { ids } = runChunks(run);
      if (ids.length === 0) continue;
      const there = await target.available(ids);
      const missing = there.findIndex((ok) => !ok);
      if (missing >= 0) throw new MissingBlobError(ids[missing]!.toString('hex'), `chunk of the copy ${written.id}, disk ${disk.name}`);
      chunks += ids.length;
    }
  }
  return { chunks };
}
