/** `engine protect` / `unprotect`: prune never removes a protected backup (repo-format/protection.ts). */
import { Repository } from '../../repo-format/repository.js';
import { protectBackup, unprotectBackup } from '../../repo-format/protection.js';
import type { Passphrase } from '../../repo-format/passphrase.js';

export interface ProtectResult {
  backup: string;
  protected: boolean;
  /** False when the backup already was in the state asked for. */
  changed: boolean;
}

/** Takes the lock, so that a prune running at the same time either sees the marker or has finished. */
export async function setProtection(repoPath: string, idOrPrefix: string, wanted: boolean, options: { passphrase?: Passphrase | undefined } = {}): Promise<ProtectResult> {
  const repo = await Repository.open(repoPath, { access: 'exclusive', command: wanted ? 'protect' : 'unprotect', index: 'skip', passphrase: options.passphrase, manyWriters: true });
  try {
    const record = await repo.findBackup(idOrPrefix);
    const changed = wanted ? await protectBackup(repo.store, record.id) : await unprotectBackup(repo.store, record.id);
    return { backup: record.id, protected: wanted, changed };
  } finally {
    await repo.close();
  }
}
