/**
 * `engine repair`: makes the index trustworthy again and sets damaged chunks aside. Phases, in order, each
 * named below and in its module:
 *
 * 1. Config (config.ts): a lost or damaged config is rebuilt from the rest of the repository.
 * 2. Records (old-index.ts): damaged records whose copy in the old index's catalogue is good get it back.
 * 3. Packs and the new index (check-packs.ts): every frame of every pack is read and checked in full,
 *    walking past damage (pack-file.ts, walkPackBytes), so one bad header does not hide the good frames
 *    behind it; a new index is built from the good frames only, under tmp/, whatever state the old one is
 *    in (missing, unreadable, or readable but wrong).
 * 4. Quarantine (old-index.ts, placeDamage): damaged frames are named by blob where the old index or the
 *    frame's header says which; so are the blobs the old index placed in a region of a pack that no longer
 *    holds a good frame (a truncated pack). They are quarantined (quarantine.ts): deduplication then misses
 *    them, and the next backup that reads such a block stores a good copy, which every older backup's map
 *    resolves to, since ids are content.
 * 5. Install: the new index replaces the old one (Repository.installIndex).
 * 6. Report (still-damaged.ts): every backup is checked; those that still reference damaged or missing
 *    data are reported per disk and offset.
 */
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { Repository } from '../../repo-format/repository.js';
import { addToQuarantine, listQuarantine, quarantineKey } from '../../repo-format/quarantine.js';
import { crashPoint } from '../../repo-format/crash-points.js';
import { LAYOUT } from '../../repo-format/constants.js';
import type { Passphrase } from '../../repo-format/passphrase.js';
import { Interruption } from '../host/interrupt.js';
import { rebuildLostConfig } from './config.js';
import { checkPacksIntoIndex } from './check-packs.js';
import { placeDamage, restoreFromOldCatalogue } from './old-index.js';
import { reportStillDamaged } from './still-damaged.js';
import { emptyRepairReport, type RepairReport } from './report.js';
import { repairVersion3 } from './v3.js';

export type { DamagedReference, RebuiltConfig, RepairReport } from './report.js';

export interface RepairOptions {
  repo: string;
  /** The passphrase of an encrypted repository. */
  passphrase?: Passphrase | undefined;
  /** Worker threads that check frames (default: one per core). */
  workers?: number | undefined;
  /**
   * SIGINT/SIGTERM: repair stops within a second (ENGINE_INTERRUPTED) and says what it left: before its
   * new index is installed, nothing changed (the half-built index is removed); once quarantine records are
   * written it finishes installing the index first (seconds), then stops.
   */
  signal?: AbortSignal | undefined;
  onProgress?: ((progress: { phase: string; done: number; total: number }) => void) | undefined;
  /** What repair says on the way (version 3: damaged segments it replaces). */
  onNotice?: ((message: string) => void) | undefined;
}

export async function repair(options: RepairOptions): Promise<RepairReport> {
  const done = { installed: false, quarantined: 0 };
  const interruption = new Interruption(options.signal, 'repair', () =>
    done.installed
      ? `the new index is in place and ${done.quarantined} frames were quarantined; the check of which backups still reference damaged data did not finish (engine verify does it)`
      : 'nothing changed: the old index is as it was, and the half-built one was removed',
  );
  interruption.check();
  if (await Repository.isVersion3(options.repo)) {
    return repairVersion3({ repo: options.repo, passphrase: options.passphrase, workers: options.workers, signal: options.signal, interruption, onProgress: options.onProgress, notice: options.onNotice ?? (() => undefined), report: emptyRepairReport(null), done });
  }
  const report = emptyRepairReport(await rebuildLostConfig(options.repo, options.passphrase));
  const repo = await Repository.open(options.repo, { access: 'exclusive', command: 'repair', index: 'skip', passphrase: options.passphrase });
  const oldIndex = join(repo.root, LAYOUT.index);
  const building = join(repo.root, LAYOUT.tmp, `index-repair.${randomBytes(4).toString('hex')}`);
  try {
    report.tempFilesRemoved = await repo.removeTempFiles();
    report.recordsRestored = await restoreFromOldCatalogue(repo, oldIndex);
    const already = await listQuarantine(repo.store);
    const checked = await checkPacksIntoIndex(building, { repo, already, workers: options.workers, interruption, onProgress: options.onProgress }, report);
    report.previousIndex = await placeDamage(oldIndex, checked, already, interruption);
    report.quarantined = checked.found.filter((f) => !already.has(quarantineKey(f.pack, f.offset)));
    interruption.check();
    // From here to the installed index, an interruption waits: quarantine records without the new index
    // would leave the old index naming frames set aside (verify: INDEX_ENTRY_BAD) for nothing.
    done.quarantined = report.quarantined.length;
    await addToQuarantine(repo.store, report.quarantined);
    crashPoint('repair-quarantined');
    await repo.installIndex(building);
    done.installed = true;
    await reportStillDamaged(repo, report, interruption);
    return report;
  } finally {
    // A repair that failed (a full disk, an I/O error) leaves no half-built index behind.
    if (!done.installed) await rm(building, { recursive: true, force: true }).catch(() => undefined);
    await repo.close();
  }
}
