/**
 * `engine migrate REPO` (SPEC.md 19.11): a version-1 or -2 repository on a folder becomes version 3 in place.
 * The steps and their crash table are repo-format/v3/migrate.ts's; this is the command around them: the
 * version-1/2 lock, the refusals (a live reader or writer registered, an oVirt journal), a migration cut
 * short taken on where it stopped, and the leftovers of one cut short after its commit point removed.
 */
import { join } from 'node:path';
import { Repository } from '../../repo-format/repository.js';
import { EngineError, InvalidArgumentError } from '../../repo-format/errors.js';
import { isManyWriters } from '../../repo-format/config.js';
import { isS3Url } from '../../repo-format/storage/s3-url.js';
import { LAYOUT } from '../../repo-format/constants.js';
import { acquireLock } from '../../repo-format/lock.js';
import { ensurePrivateDirectory } from '../../repo-format/file-modes.js';
import { listRegistrations, removeStaleRegistrations, type RegistryDir } from '../../repo-format/registry.js';
import type { Passphrase } from '../../repo-format/passphrase.js';
import { clearEarlierAttempt, isMidMigration, removeLeftoverLock, removeLeftovers, swapInSegments, writeMigrationSegments, writeVersion3Config } from '../../repo-format/v3/migrate.js';
import { readdir } from 'node:fs/promises';
import { Interruption } from '../host/interrupt.js';

export interface MigrateOptions {
  repo: string;
  passphrase?: Passphrase | undefined;
  /**
   * SIGINT/SIGTERM: before the index is swapped (step 2) migrate stops within a second and the repository is
   * the version-1/2 one it was; from the swap on it finishes (renames and one config write: moments).
   */
  signal?: AbortSignal | undefined;
}

export interface MigrateReport {
  repo: string;
  /** The version found: 1 or 2, or 3 when only leftovers of an earlier migration were left. */
  from: number;
  version: 3;
  /** Segments written and the blob entries they name (0 when the segments were already in place). */
  segments: number;
  blobs: number;
  /** An earlier migration had swapped the index in and was cut short before its config: taken on from there. */
  resumed: boolean;
  /** What version 3 has no use for, removed (index.v2, readers, writers, journal, reserve, tmp, lock). */
  removed: string[];
}

export async function migrate(options: MigrateOptions): Promise<MigrateReport> {
  const root = options.repo;
  if (isS3Url(root)) throw new InvalidArgumentError(`${root}: an S3 repository is always format version 3; there is nothing to migrate`);
  let stage = 'nothing changed: the repository is the version-1/2 one it was';
  const interruption = new Interruption(options.signal, 'migrate', () => stage);
  interruption.check();
  const config = await Repository.loadConfig(root);
  const report: MigrateReport = { repo: root, from: config.version, version: 3, segments: 0, blobs: 0, resumed: false, removed: [] };
  if (isManyWriters(config)) {
    report.removed = await removeVersion3Leftovers(root);
    return report;
  }
  report.resumed = await isMidMigration(root);
  const repo = await Repository.open(root, {
    access: 'exclusive',
    command: 'migrate',
    index: report.resumed ? 'skip' : 'open',
    passphrase: options.passphrase,
    migrating: true,
    checkInterrupted: () => interruption.check(),
  });
  let committed = false;
  try {
    await refuseWhileBusy(root);
    if (!report.resumed) {
      await clearEarlierAttempt(root);
      const written = await writeMigrationSegments(root, repo.index.blobs(), { dataKey: repo.keys?.dataKey, tick: () => interruption.tick() });
      report.segments = written.segments;
      report.blobs = written.blobs;
      // The last moment to stop with nothing changed; from the swap on, migrate finishes (renames and a config).
      interruption.check();
      await repo.closeIndex();
      stage = 'the index was swapped for segments (mid-migration): `engine migrate` takes it on from there';
      await swapInSegments(root);
    }
    await writeVersion3Config(root, config);
    committed = true;
    stage = 'the repository is version 3; leftovers of version 1/2 remain, which `engine migrate` removes';
    report.removed = await removeLeftovers(root);
    return report;
  } finally {
    // Version 3 has no space reserve: the lock goes without setting one aside again.
    await repo.close({ setReserveAside: !committed });
    if (committed && !report.removed.includes(LAYOUT.lock)) report.removed.push(LAYOUT.lock);
  }
}

/** A live reader or writer registration, or an oVirt journal, stops migrate before it changes anything (19.11). */
async function refuseWhileBusy(root: string): Promise<void> {
  for (const dir of [LAYOUT.writers, LAYOUT.readers] as RegistryDir[]) {
    await removeStaleRegistrations(root, dir).catch(() => 0);
    const { live } = await listRegistrations(root, dir);
    const first = live[0];
    if (first) {
      const who = 'unreadable' in first ? `an unreadable registration (${first.unreadable})` : `${first.command} (pid ${first.pid} on ${first.hostname}, since ${first.since})`;
      throw new EngineError('ENGINE_REPOSITORY_LOCKED', `repository ${root} is in use by ${who}, registered in ${dir}/: migrate waits for it to end (\`engine unlock\` removes what is stale)`, { path: root, dir });
    }
  }
  const journals = (await readdir(join(root, 'journal')).catch(() => [] as string[])).filter((name) => name.endsWith('.json'));
  if (journals.length > 0) {
    throw new EngineError('ENGINE_REPOSITORY_LOCKED', `repository ${root} has ${journals.length} oVirt journal(s) of resources an interrupted run created (journal/): \`engine ovirt cleanup\` first, then migrate`, { path: root, journals: journals.length });
  }
}

/** A version-3 folder with leftovers of a migration cut short after its commit point: removed, the lock last. */
async function removeVersion3Leftovers(root: string): Promise<string[]> {
  const top = await readdir(root);
  const leftovers = ['index.v2', LAYOUT.readers, LAYOUT.writers, 'journal', LAYOUT.reserve, LAYOUT.tmp, LAYOUT.lock].filter((name) => top.includes(name));
  if (leftovers.length === 0) return [];
  if (top.includes(LAYOUT.lock)) {
    // The lock of a migration cut short is stale (its process is gone); a live one is another migrate's.
    await ensurePrivateDirectory(join(root, LAYOUT.tmp));
    const lock = await acquireLock(root, 'migrate');
    try {
      const removed = await removeLeftovers(root);
      await lock.release();
      return [...removed, LAYOUT.lock];
    } catch (error) {
      await lock.release().catch(() => undefined);
      throw error;
    }
  }
  const removed = await removeLeftovers(root);
  if (await removeLeftoverLock(root)) removed.push(LAYOUT.lock);
  return removed;
}
