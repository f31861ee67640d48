/**
 * The target's record of a copied backup (SPEC.md 22.5): the source's record with a new id, the target's
 * maps, every backup id it names (parents, a chain's full) mapped to the target's copy when there is one,
 * and `copiedFrom`; committed through Repository.commitBackup, the commit point a backup uses (the record
 * last, after every pack and index entry it needs is durable).
 */
import { randomBytes } from 'node:crypto';
import type { BackupRecord, CopiedFrom, DiskRecord } from '../../repo-format/backup-record.js';
import type { Repository } from '../../repo-format/repository.js';

export function copiedRecord(source: BackupRecord, identity: CopiedFrom, disks: readonly DiskRecord[], idMap: ReadonlyMap<string, string>): BackupRecord {
  const id = randomBytes(16).toString('hex');
  // A parent the target does not hold (pruned from the source before the copy) keeps its id: a dangling
  // parent reads as one pruned since, which every reader accepts (SPEC.md 9).
  const mapped = (ref: string): string => (ref === source.id ? id : (idMap.get(ref) ?? ref));
  return {
    ...source,
    id,
    parent: source.parent === null ? null : mapped(source.parent),
    disks: disks.map((disk) => ({
      ...disk,
      parent: disk.parent === null ? null : mapped(disk.parent),
      cbt: disk.cbt === null ? null : { ...disk.cbt, chainFull: mapped(disk.cbt.chainFull) },
    })),
    copiedFrom: identity,
  };
}

/** Commits the record; what failed after the commit point comes back as notices. */
export async function commitCopy(target: Repository, record: BackupRecord, notice: (message: string) => void): Promise<void> {
  for (const warning of await target.commitBackup(record)) notice(warning);
}
