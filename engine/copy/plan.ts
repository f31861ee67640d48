/**
 * The plan of a copy (SPEC.md 22): for each selected backup, copy it or skip it because the target holds it
 * already (a record with the same identity, identity.ts), and the source-to-target id map that the records'
 * parents are rewritten through. Refuses, before anything is written, what cannot be copied soundly.
 */
import type { BackupRecord, CopiedFrom } from '../../repo-format/backup-record.js';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import type { Repository } from '../../repo-format/repository.js';
import { BlockSizeMismatchError } from '../errors.js';
import { identityKey, identityOf } from './identity.js';

export interface CopyStep {
  source: BackupRecord;
  identity: CopiedFrom;
  /** The target's record of it when the target has it already: the step is skipped. */
  existing: string | null;
}

export interface CopyPlan {
  steps: CopyStep[];
  /** Source backup id → the target's id of the same backup, for every one the target holds (grows as steps commit). */
  idMap: Map<string, string>;
}

/**
 * Block sizes must agree: a map entry is one block, so another block size would mean re-chunking every disk
 * (reading it whole and hashing it anew), which is a backup of a restore, not a copy.
 */
export function checkCompatible(from: string, to: string, source: { id: string; blockSize: number }, target: { id: string; blockSize: number }): void {
  if (source.id === target.id) throw new InvalidArgumentError(`${from} and ${to} are the same repository (id ${source.id}): a copy needs another repository`);
  if (source.blockSize !== target.blockSize) throw new BlockSizeMismatchError(from, source.blockSize, to, target.blockSize);
}

export async function planCopy(source: Repository, target: Repository, records: readonly BackupRecord[]): Promise<CopyPlan> {
  const present = new Map<string, string>();
  // A damaged target record is no identity to match: the backup is copied again under a new id.
  const held = (await target.listBackups()).backups;
  for (const record of held) present.set(identityKey(identityOf(record, target.config.id)), record.id);
  const idMap = new Map<string, string>();
  const steps = records.map((record) => {
    const identity = identityOf(record, source.config.id);
    const existing = present.get(identityKey(identity)) ?? null;
    if (existing !== null) idMap.set(record.id, existing);
    return { source: record, identity, existing };
  });
  // Parents the selection did not take (pruned from the source since, or copied before) map too when the target has them.
  for (const record of held) {
    const identity = identityOf(record, target.config.id);
    if (identity.repository === source.config.id && !idMap.has(identity.backup)) idMap.set(identity.backup, record.id);
  }
  return { steps, idMap };
}
