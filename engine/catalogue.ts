import { Repository } from '../repo-format/repository.js';
import type { BackupRecord } from '../repo-format/backup-record.js';

/** Lists backups without taking the lock: records are immutable files, readable during a backup. */
export async function listBackups(repoPath: string): Promise<{ backups: BackupRecord[]; damaged: { id: string; message: string }[] }> {
  const repo = await Repository.open(repoPath, { access: 'read' });
  const { backups, damaged } = await repo.listBackups();
  return { backups, damaged: damaged.map(({ id, error }) => ({ id, message: error.message })) };
}

export async function showBackup(repoPath: string, idOrPrefix: string): Promise<BackupRecord> {
  const repo = await Repository.open(repoPath, { access: 'read' });
  return repo.findBackup(idOrPrefix);
}
