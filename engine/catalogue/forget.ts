/**
 * `engine forget <id>`: removes one backup, named by id, whatever its record holds: also a damaged record
 * that no command can read (prune leaves those, since it cannot tell their name and age). Like prune
 * (SPEC.md, section 10.1) it removes the record file, then its catalogue entry, nothing else: the chunks
 * only it referenced stay until gc. A protected backup is refused (unprotect it first).
 *
 * A damaged record whose catalogue copy in the index is good is better repaired than forgotten:
 * `engine repair` puts the copy back (record-recovery.ts), and forget says so before it removes anything.
 */
import { Repository } from '../../repo-format/repository.js';
import { EngineError, InvalidArgumentError } from '../../repo-format/errors.js';
import { withRemedies } from '../errors.js';
import { listProtected } from '../../repo-format/protection.js';
import { catalogueCopyOf } from './record-recovery.js';
import { crashPoint } from '../../repo-format/crash-points.js';
import type { Passphrase } from '../../repo-format/passphrase.js';

export interface ForgetOptions {
  repo: string;
  /** The backup id, or a unique prefix of at least 4 characters of it. */
  backupId: string;
  /** The passphrase of an encrypted repository. */
  passphrase?: Passphrase | undefined;
  /** Forget a damaged record even when the index holds a good copy that repair would restore. */
  force?: boolean | undefined;
}

export interface ForgetResult {
  backup: string;
  /** The backup's name, or null when its record is damaged. */
  name: string | null;
  startTime: string | null;
  /** Why the record could not be read, or null for a readable one. */
  damaged: string | null;
}

export async function forget(options: ForgetOptions): Promise<ForgetResult> {
  const repo = await Repository.open(options.repo, { access: 'exclusive', command: 'forget', passphrase: options.passphrase, manyWriters: true });
  try {
    const id = await repo.findBackupId(options.backupId);
    if ((await listProtected(repo.store)).has(id)) throw new InvalidArgumentError(`backup ${id} is protected`, withRemedies({ backup: id }, { kind: 'unprotect', backup: id }));
    let result: ForgetResult;
    try {
      const record = await repo.readBackup(id);
      result = { backup: id, name: record.name, startTime: record.startTime, damaged: null };
    } catch (error) {
      if (!(error instanceof EngineError) || error.code !== 'ENGINE_CORRUPT_METADATA') throw error;
      // Version 3 keeps no catalogue copy of records: a damaged one has nothing to be restored from.
      if (!options.force && !repo.manyWriters && (await catalogueCopyOf(repo, id))) {
        throw new InvalidArgumentError(
          `backup record ${id} is damaged (${String(error.details.why)}), but the index holds a good copy of it`,
          withRemedies({ backup: id }, { kind: 'repair', does: 'restores the backup' }, { kind: 'override', option: 'force', to: 'remove it all the same' }),
        );
      }
      result = { backup: id, name: null, startTime: null, damaged: String(error.details.why ?? error.message) };
    }
    await repo.removeBackup(id);
    crashPoint('forget-record-removed');
    return result;
  } finally {
    await repo.close();
  }
}
