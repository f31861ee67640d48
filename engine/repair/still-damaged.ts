/**
 * repair's last phase, with the new index in place: which backups still reference damaged or missing
 * data, per backup, disk and offset (and records no good copy of is left). They heal when a backup of a
 * source that still holds those blocks stores them again.
 */
import type { Repository } from '../../repo-format/repository.js';
import { listQuarantine, type QuarantinedFrame } from '../../repo-format/quarantine.js';
import { walkReferences, type ReferenceVisitor } from '../catalogue/references.js';
import type { Interruption } from '../host/interrupt.js';
import type { DamagedReference, RepairReport } from './report.js';

const DAMAGE_LIMIT = 1000;

export async function reportStillDamaged(repo: Repository, report: RepairReport, interruption: Interruption): Promise<void> {
  const quarantinedBlobs = new Map<string, QuarantinedFrame>();
  for (const frame of (await listQuarantine(repo.store)).values()) if (frame.blob) quarantinedBlobs.set(frame.blob, frame);
  const damaged = (d: DamagedReference): void => {
    if (report.damaged.length < DAMAGE_LIMIT) report.damaged.push(d);
    report.ok = false;
  };
  const { backups, damaged: badRecords } = await repo.listBackups();
  for (const { id, error } of badRecords) damaged({ code: 'RECORD_DAMAGED', message: `${error.message}; no good copy of it is left: \`engine forget ${id}\` removes the backup`, backup: id });
  const stillDamaged: ReferenceVisitor = {
    page: () => undefined,
    chunk: ({ backup, disk, offset, id, location }) => {
      if (location) return;
      const hex = id.toString('hex');
      const known = quarantinedBlobs.get(hex);
      const prefix = `backup ${backup}, disk ${disk}, offset ${offset}: chunk ${hex.slice(0, 16)}…`;
      if (known) damaged({ code: 'CHUNK_DAMAGED', message: `${prefix} is damaged (pack ${known.pack} offset ${known.offset}: ${known.why}); back up a source that still holds this block to heal it`, backup, disk, offset, blob: hex });
      else damaged({ code: 'CHUNK_MISSING', message: `${prefix} is missing`, backup, disk, offset, blob: hex });
    },
    mapDamaged: (backup, disk, error) => damaged({ code: 'MAP_DAMAGED', message: `backup ${backup}, disk ${disk}: ${error.message}`, backup, disk }),
  };
  await walkReferences(repo, backups, stillDamaged, { interruption });
}
