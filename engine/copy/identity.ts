/**
 * The identity of a backup across copies (SPEC.md 22.2): the repository it was first made in and its id
 * there. A record made by `copy` carries the identity of what it copies (`copiedFrom`); a copy of a copy
 * keeps the original's, so A→B→C and A→C name the same backup, and copying C back into A finds the original.
 */
import type { BackupRecord, CopiedFrom } from '../../repo-format/backup-record.js';

export function identityOf(record: BackupRecord, repositoryId: string): CopiedFrom {
  return record.copiedFrom ?? { repository: repositoryId, backup: record.id };
}

/** A key for maps and sets. */
export function identityKey(identity: CopiedFrom): string {
  return `${identity.repository}/${identity.backup}`;
}
