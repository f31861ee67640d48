/**
 * verify's checks of what records say about each other and about themselves beyond what decoding them
 * checks (SPEC.md, sections 9, 11 and 14.2), per backup: the references of a chain (`parent`, each disk's
 * `parent`, `cbt.chainFull`) are backup ids, never the backup itself, and a parent still in the repository
 * started before its child; the record's `type` and `parent` follow from its disks (section 11). None of
 * this stops a restore (every map is complete), but a chain built on it would be wrong: it is reported as
 * `RECORD_INCONSISTENT`. And for a damaged record, what can be done: its catalogue copy is good (repair
 * restores it), or it is gone (forget removes the backup).
 */
import type { BackupRecord } from '../../repo-format/backup-record.js';
import type { Repository } from '../../repo-format/repository.js';
import { catalogueCopyOf } from '../catalogue/record-recovery.js';
import type { VerifyProblem } from './report.js';

const BACKUP_ID = /^[0-9a-f]{32}$/;

function typeOf(record: BackupRecord): BackupRecord['type'] {
  if (record.disks.some((d) => d.mode === 'differential')) return 'differential';
  if (record.disks.some((d) => d.mode === 'incremental')) return 'incremental';
  return 'full';
}

export function recordConsistencyProblems(backups: readonly BackupRecord[]): VerifyProblem[] {
  const byId = new Map(backups.map((b) => [b.id, b]));
  const problems: VerifyProblem[] = [];
  for (const record of backups) {
    const say = (message: string, disk?: string): void => {
      problems.push({ code: 'RECORD_INCONSISTENT', message: `backup ${record.id}${disk === undefined ? '' : `, disk ${disk}`}: ${message}`, backup: record.id, ...(disk === undefined ? {} : { disk }) });
    };
    const firstParent = record.disks.find((d) => d.parent !== null)?.parent ?? null;
    if (record.parent !== null && !BACKUP_ID.test(record.parent)) say(`its parent ${JSON.stringify(record.parent)} is not a backup id`);
    else if (record.parent !== firstParent) say(`its parent ${record.parent ?? 'null'} is not its first disk's parent ${firstParent ?? 'null'}`);
    if (record.type !== typeOf(record)) say(`its type ${record.type} does not follow from its disks' modes (${typeOf(record)})`);
    for (const disk of record.disks) {
      const references = [
        ['parent', disk.parent],
        ['chain full backup', disk.cbt?.chainFull ?? null],
      ] as const;
      for (const [what, id] of references) {
        if (id === null) continue;
        if (!BACKUP_ID.test(id)) say(`its ${what} ${JSON.stringify(id)} is not a backup id`, disk.name);
        else if (id === record.id && !(what === 'chain full backup' && disk.mode === 'full')) say(`its ${what} is the backup itself`, disk.name);
        else {
          const other = byId.get(id);
          // A parent pruned since is fine (every map is complete); one still here must be older.
          if (other && other.id !== record.id && other.startTime > record.startTime) say(`its ${what} ${id} started after it (${other.startTime} > ${record.startTime})`, disk.name);
        }
      }
    }
  }
  return problems;
}

/** A damaged record's problem, saying what can be done about it. */
export async function damagedRecordProblem(repo: Repository, id: string, error: Error): Promise<VerifyProblem> {
  const copy = await catalogueCopyOf(repo, id).catch(() => undefined);
  const way = copy ? 'the index holds a good copy of it: `engine repair` restores it' : `no good copy of it is left: \`engine forget ${id}\` removes the backup`;
  return { code: 'RECORD_DAMAGED', message: `${error.message}; ${way}`, backup: id };
}
