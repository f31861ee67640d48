/**
 * gc's phase 1, mark (SPEC.md 10.2), under the lock: every page and chunk of every backup is marked live,
 * then every pack is classified (plan.ts). gc refuses to go on when it cannot tell what is live: a damaged
 * record with no good copy, an unreadable map, a referenced chunk neither indexed nor quarantined
 * (invariant 8). Phase 3 marks the backups committed since with the same `mark`.
 */
import type { Repository } from '../../repo-format/repository.js';
import { CorruptMetadataError, EngineError, MissingBlobError } from '../../repo-format/errors.js';
import { listQuarantine } from '../../repo-format/quarantine.js';
import type { BackupRecord } from '../../repo-format/backup-record.js';
import { IdPrefixSet } from '../common/id-set.js';
import { walkReferences } from '../catalogue/references.js';
import { catalogueCopyOf } from '../catalogue/record-recovery.js';
import type { Interruption } from '../host/interrupt.js';
import { classifyPacks, collectEntries, tallyPacks, type GcPlan } from './plan.js';
import type { GcReport } from './report.js';

/** Marks every backup, then plans what goes; fills the report's counts of what is there. */
export async function markAndPlan(repo: Repository, rewriteBelow: number, report: GcReport, notice: (message: string) => void, interruption: Interruption): Promise<GcPlan> {
  const records = await recordsOrRefuse(repo, notice);
  const live = new IdPrefixSet();
  const damagedReferenced = new Set<string>();
  await mark(repo, records, live, damagedReferenced, interruption);
  report.backups = records.length;

  // Two passes over the index, so that memory follows what gc changes, not the repository's size: the
  // first counts per pack (a few numbers per pack), the second keeps the entries of the packs that go.
  const tick = (): Promise<void> => interruption.tick();
  const tallies = await tallyPacks(repo.index.blobs(), live, tick);
  const packs = await packSizes(repo, interruption);
  report.packs.before = packs.length;
  report.bytes.before = packs.reduce((total, pack) => total + pack.size, 0);
  const { dead, rewrite, unindexed, liveChunks } = classifyPacks(packs, tallies, rewriteBelow);
  tallies.clear();
  report.chunks.live = liveChunks;
  await collectEntries(repo.index.blobs(), live, [...dead, ...rewrite], tick);
  // Entries naming packs that do not exist are verify's and repair's business, not gc's.
  return { marked: new Set(records.map((record) => record.id)), damagedReferenced, dead, rewrite, unindexed };
}

async function packSizes(repo: Repository, interruption: Interruption): Promise<{ packId: string; size: number }[]> {
  await interruption.tick();
  return repo.listPacks();
}

/**
 * Every record gc must mark from. A damaged record file whose catalogue copy in the index is good is
 * marked from that copy (it holds the bytes the backup wrote; repair puts them back). A damaged record with
 * no good copy might reference any chunk: gc refuses rather than guess, and says how to go on (forget it:
 * a record no one can read restores nothing).
 */
export async function recordsOrRefuse(repo: Repository, notice: (message: string) => void): Promise<BackupRecord[]> {
  const { backups, damaged } = await repo.listBackups();
  for (const { id, error } of damaged) {
    const copy = await catalogueCopyOf(repo, id);
    if (copy) {
      notice(`${error.message}; gc marks from its good copy in the index (\`engine repair\` restores the file)`);
      backups.push(copy.record);
      continue;
    }
    throw new CorruptMetadataError(
      `backup record ${id}`,
      `${String((error as EngineError).details?.why ?? error.message)}, and the index holds no good copy of it; gc cannot tell which chunks it needs and deletes nothing: \`engine forget ${id}\` removes that backup (no one can restore from it)`,
    );
  }
  return backups;
}

/**
 * Marks every page and chunk of `records`; refuses when one is neither indexed nor known damaged. The
 * known damaged (quarantined, no indexed copy) go into `damagedReferenced`.
 */
export async function mark(repo: Repository, records: readonly BackupRecord[], live: { add(id: Buffer): void }, damagedReferenced: Set<string>, interruption: Interruption): Promise<void> {
  const quarantined = new Set([...(await listQuarantine(repo.store)).values()].map((q) => q.blob).filter((b): b is string => b !== null));
  let refusal: EngineError | undefined;
  await walkReferences(repo, records, {
    page: (id) => live.add(id),
    chunk: ({ backup, disk, offset, id, location }) => {
      if (location) live.add(id);
      else if (quarantined.has(id.toString('hex'))) damagedReferenced.add(id.toString('hex'));
      else refusal ??= new MissingBlobError(id.toString('hex'), `gc refuses to run: chunk of backup ${backup}, disk ${disk}, offset ${offset},`);
    },
    mapDamaged: (backup, disk, error) => {
      refusal ??= new EngineError('ENGINE_CORRUPT_METADATA', `backup ${backup}, disk ${disk}: ${error.message}; gc cannot tell which chunks it needs and deletes nothing (run engine repair)`, { backup, disk });
    },
  }, { interruption });
  if (refusal) throw refusal;
}
