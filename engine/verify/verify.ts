/**
 * `engine verify`: checks that every backup can be restored, and lists the garbage a crash left. Phases,
 * each in its module, reading the repository and filling one report (run.ts):
 *
 * 0. Layout (here): temp files, loose modes, files that are not the repository's: warnings, never problems.
 * 1. Packs (packs.ts): every pack's header and frame chain parses to its end; frames matched with their
 *    index entries (counted).
 * 2. Index (index-check.ts): every index entry points at a frame of that id in an existing pack.
 * 3. Backups (backups.ts): every record parses, every map page reads and checks, every chunk a map
 *    references is in the index and not damaged; then the entries no backup references.
 * 4. Data (data-check.ts; --read-data, --subset): every frame of every chosen pack is re-read and re-hashed
 *    (xxh64, AES-256-GCM tag when encrypted, lz4, the blob id) in the workers. It runs alongside phase 1
 *    (the workers hash one pack while the next is scanned) and is done before phase 3, which names the
 *    backups, disks and offsets that reference each damaged chunk.
 */
import type { PoolLender } from '../pipeline/block-pool.js';
import { expiredLocks, OBJECT_LOCK_EXPIRED, OBJECT_LOCK_UNCHECKED } from '../../repo-format/v3/object-lock.js';
import { isStorageError } from '../../repo-format/storage/storage-error.js';
import { Repository } from '../../repo-format/repository.js';
import { listQuarantine } from '../../repo-format/quarantine.js';
import { findLooseModes, formatMode } from '../../repo-format/file-modes.js';
import type { Passphrase } from '../../repo-format/passphrase.js';
import { Interruption } from '../host/interrupt.js';
import { LeaseLostError } from '../../repo-format/errors.js';
import { loosePermissionsWarning, strayWarnings } from './layout.js';
import { VerifyRun, type VerifyProgress } from './run.js';
import { DataCheck } from './data-check.js';
import { checkPacks } from './packs.js';
import { checkIndex } from './index-check.js';
import { checkBackups, countUnreferenced } from './backups.js';
import { checkVerifications } from './verifications.js';
import type { VerifyReport } from './report.js';

export type { VerifyProblem, VerifyReport, VerifyWarning } from './report.js';
export type { MissingPackProblem } from './missing-packs.js';

export interface VerifyOptions {
  repo: string;
  /** The passphrase of an encrypted repository. */
  passphrase?: Passphrase | undefined;
  /** Read the S3 repository as it was at this time (ms since the epoch; SPEC.md 20.5): read-only, no lease. */
  asOf?: number | undefined;
  readData?: boolean | undefined;
  /** With readData: read only this fraction (0 < f ≤ 1) of the packs, chosen by `seed`. */
  subset?: number | undefined;
  /** Seeds the subset's choice (default: random, reported so that a run can be repeated). */
  seed?: string | undefined;
  workers?: number | undefined;
  /** The server's shared worker pool (shared-pool.ts): --read-data runs on a lease of it, not a pool of its own. */
  sharedPool?: PoolLender | undefined;
  /** SIGINT/SIGTERM: verify stops within a second (ENGINE_INTERRUPTED); it only reads, so nothing is left half-done. */
  signal?: AbortSignal | undefined;
  onProgress?: VerifyProgress | undefined;
}

export async function verify(options: VerifyOptions): Promise<VerifyReport> {
  const interruption = new Interruption(options.signal, 'verify', () => 'no result: it only reads, and changed nothing');
  interruption.check();
  const repo = await Repository.open(options.repo, { access: 'exclusive', command: 'verify', passphrase: options.passphrase, readWithoutLock: true, checkInterrupted: () => interruption.check(), manyWriters: true, signal: options.signal, asOf: options.asOf });
  let data: DataCheck | undefined;
  try {
    const run = new VerifyRun(repo, interruption, await listQuarantine(repo.store), options.readData === true, options.onProgress);
    await checkLayout(run);
    const listed = await repo.listPacks();
    const packIds = listed.map((pack) => pack.packId);
    if (options.readData) data = await DataCheck.start(run, listed, options);
    const packs = await checkPacks(run, packIds, data); // 1. structure (and 4. data, alongside)
    const missingPacks = await checkIndex(run, packs); // 2. index
    // Version 3: the index is the store's segments; one that cannot be read leaves its blobs absent for every host that has not cached it.
    for (const { key, why } of await repo.damagedSegments()) run.problem({ code: 'SEGMENT_DAMAGED', message: `index segment ${key} cannot be read (${why}): the blobs it names are absent for any host whose cache does not hold them`, path: key });
    const referenced = await checkBackups(run, missingPacks); // 3. backups and their references
    // One problem per missing pack, naming every backup that lost data with it: never cut by the limit.
    run.report.problems.unshift(...missingPacks.problems());
    await countUnreferenced(run, referenced);
    await checkVerifications(run, new Set(await repo.listBackupIds()));
    // Object Lock (SPEC.md 20.5): a kept object whose lock ran out, gc not having extended it, is unprotected.
    if (options.asOf === undefined) {
      // Credentials that may not read retentions (s3:GetObjectRetention) leave the locks unchecked: said, not fatal.
      const expiredList = await expiredLocks(repo.store, repo.config, options.signal).catch((error: unknown) => {
        if (!isStorageError(error, 'denied')) throw error;
        run.report.warnings.push({ code: OBJECT_LOCK_UNCHECKED, message: `the Object Lock of the objects could not be read with these credentials (${error.message}): their locks were not checked; give them s3:GetObjectRetention, or verify with the owner's` });
        return [];
      });
      for (const expired of expiredList) {
        run.report.warnings.push({ code: OBJECT_LOCK_EXPIRED, message: `${expired.key}: its Object Lock ${expired.until ? `ran out at ${expired.until}` : 'is missing'} and gc did not extend it: it can be deleted or overwritten now; run engine gc (it locks what it keeps again)`, path: expired.key });
      }
    }
    run.report.ok = run.report.problems.length === 0;
    return run.report;
  } catch (error) {
    if (error instanceof LeaseLostError) throw error.withConsequence('verify stopped with no result, since a gc may now delete the packs it reads; it changed nothing (run it again)');
    throw error;
  } finally {
    await data?.close();
    await repo.close();
  }
}

/** What a crash left in tmp/, files others may use, files that are not the repository's: warnings and garbage, never problems. */
async function checkLayout(run: VerifyRun): Promise<void> {
  const { repo, report } = run;
  report.garbage.tempFiles = await repo.listTempFiles();
  // A folder's files and folders (an S3 repository has no modes: its access is the bucket's policy).
  const loose = repo.onS3 ? { count: 0, examples: [] } : await findLooseModes(repo.root);
  report.permissions = { loose: loose.count, examples: loose.examples.map((e) => ({ path: e.path, mode: formatMode(e.mode) })) };
  if (loose.count > 0) report.warnings.push(loosePermissionsWarning(report.permissions, repo.root));
  report.warnings.push(...(await strayWarnings(repo)));
}
