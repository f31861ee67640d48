/**
 * repair's first phase: a config that is missing or damaged in what is otherwise a repository (packs/ and
 * backups/) is rebuilt from the rest (config-recovery.ts, SPEC.md 3.2), under the lock, before the
 * repository is opened; anything else (a newer format, a directory that is no repository) stays the error it is.
 */
import { join } from 'node:path';
import { Repository } from '../../repo-format/repository.js';
import { configDamage, hasRepositoryLayout, rebuildConfig } from '../../repo-format/config-recovery.js';
import { acquireLock } from '../../repo-format/lock.js';
import { ensurePrivateDirectory } from '../../repo-format/file-modes.js';
import { LAYOUT } from '../../repo-format/constants.js';
import type { Passphrase } from '../../repo-format/passphrase.js';
import type { RebuiltConfig } from './report.js';

export async function rebuildLostConfig(root: string, passphrase: Passphrase | undefined): Promise<RebuiltConfig | null> {
  let why: string | undefined;
  try {
    await Repository.readConfig(root, undefined, 'repair');
    return null;
  } catch (error) {
    why = configDamage(error);
    if (why === undefined || !(await hasRepositoryLayout(root))) throw error;
  }
  await ensurePrivateDirectory(join(root, LAYOUT.tmp));
  const lock = await acquireLock(root, 'repair');
  try {
    const rebuilt = await rebuildConfig(root, why, passphrase);
    const c = rebuilt.config;
    return { why, id: c.id, blockSize: c.blockSize, version: c.version, encrypted: c.encryption !== undefined, sources: rebuilt.sources, objectLock: c.objectLock ?? null, keptAs: rebuilt.keptAs };
  } finally {
    await lock.release();
  }
}
