import { Repository } from '../../repo-format/repository.js';
import type { BackupRecord } from '../../repo-format/backup-record.js';
import type { Passphrase } from '../../repo-format/passphrase.js';

/** Lists backups without taking the lock: records are immutable files, readable during a backup. */
/** `passphrase`: of an encrypted repository, whose records are encrypted. */
/** `boots`: the latest boot test of each backup that has one (latestBootResults), read from the same opening. */
export async function listBackups(repoPath: string, options: { passphrase?: Passphrase | undefined; asOf?: number | undefined } = {}): Promise<{ backups: BackupRecord[]; damaged: { id: string; message: string }[]; boots: Record<string, BootSummary> }> {
  const repo = await Repository.open(repoPath, { access: 'read', passphrase: options.passphrase, manyWriters: true, asOf: options.asOf });
  try {
    const { backups, damaged } = await repo.listBackups();
    return { backups, damaged: damaged.map(({ id, error }) => ({ id, message: error.message })), boots: await latestBoots(repo) };
  } finally {
    // A long-running caller (the server) opens repositories again and again: each opening's handles (a
    // version-3 repository's lease and index cache) go with it, not with the process.
    await repo.close();
  }
}

export async function showBackup(repoPath: string, idOrPrefix: string, options: { passphrase?: Passphrase | undefined; asOf?: number | undefined } = {}): Promise<BackupRecord> {
  return (await describeBackup(repoPath, idOrPrefix, options)).record;
}

/** A backup's record and its latest boot test (`null`: never boot-tested), from one opening of the repository. */
export async function describeBackup(repoPath: string, idOrPrefix: string, options: { passphrase?: Passphrase | undefined; asOf?: number | undefined } = {}): Promise<{ record: BackupRecord; boot: BootSummary | null }> {
  const repo = await Repository.open(repoPath, { access: 'read', passphrase: options.passphrase, manyWriters: true, asOf: options.asOf });
  try {
    const record = await repo.findBackup(idOrPrefix);
    return { record, boot: (await latestBoots(repo, record.id))[record.id] ?? null };
  } finally {
    await repo.close();
  }
}

/** What `list` and `show` say of a backup's latest boot test (SPEC.md 9.2, 14.2). */
export interface BootSummary {
  result: 'passed' | 'failed';
  started: string;
  ended: string;
  reason: { code: string; message: string } | null;
  proofOfLifeMs: number | null;
  accelerator: string;
  consoleLogPath: string | null;
  /** The verification record's key. */
  record: string;
}

/**
 * The latest boot test of each backup (of `backupId` alone, when given), by backup id; backups never
 * boot-tested are absent. Damaged verification records are skipped here (verify reports them).
 */
export async function latestBootResults(repoPath: string, options: { passphrase?: Passphrase | undefined; backupId?: string | undefined } = {}): Promise<Record<string, BootSummary>> {
  const repo = await Repository.open(repoPath, { access: 'read', passphrase: options.passphrase, manyWriters: true });
  try {
    return await latestBoots(repo, options.backupId === undefined ? undefined : await repo.findBackupId(options.backupId));
  } finally {
    await repo.close();
  }
}

export async function latestBoots(repo: Repository, id?: string): Promise<Record<string, BootSummary>> {
  const { records } = await repo.listVerifications(id);
  const latest: Record<string, BootSummary> = {};
  // Names sort by start time within a backup (verification-record.ts): the last one listed is the latest.
  for (const { key, record } of records) {
    latest[record.backup] = { result: record.result, started: record.started, ended: record.ended, reason: record.reason, proofOfLifeMs: record.proofOfLifeMs, accelerator: record.accelerator, consoleLogPath: record.consoleLogPath, record: key };
  }
  return latest;
}
