import { Repository } from '../../repo-format/repository.js';
import type { BackupRecord } from '../../repo-format/backup-record.js';
import type { Passphrase } from '../../repo-format/passphrase.js';

/** Lists backups without taking the lock: records are immutable files, readable during a backup. */
/** `passphrase`: of an encrypted repository, whose records are encrypted. */
export async function listBackups(repoPath: string, options: { passphrase?: Passphrase | undefined } = {}): Promise<{ backups: BackupRecord[]; damaged: { id: string; message: string }[] }> {
  const repo = await Repository.open(repoPath, { access: 'read', passphrase: options.passphrase, manyWriters: true });
  const { backups, damaged } = await repo.listBackups();
  return { backups, damaged: damaged.map(({ id, error }) => ({ id, message: error.message })) };
}

export async function showBackup(repoPath: string, idOrPrefix: string, options: { passphrase?: Passphrase | undefined } = {}): Promise<BackupRecord> {
  const repo = await Repository.open(repoPath, { access: 'read', passphrase: options.passphrase, manyWriters: true });
  return repo.findBackup(idOrPrefix);
}
