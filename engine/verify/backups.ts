/**
 * verify's check of the backups: every record parses and agrees with the others, every map page reads and
 * checks, every chunk a map references is indexed, holds the block's length, and is not one the pack, data
 * or index checks found damaged (each reported with the backup, disk and offset that use it). Then the
 * garbage: index entries no backup references.
 */
import type { QuarantinedFrame } from '../../repo-format/quarantine.js';
import { walkReferences, type ChunkReference } from '../catalogue/references.js';
import { IdPrefixSet } from '../common/id-set.js';
import type { MissingPacks } from './missing-packs.js';
import { damagedRecordProblem, recordConsistencyProblems } from './records.js';
import type { VerifyProblem } from './report.js';
import type { VerifyRun } from './run.js';

/** Checks every backup; returns the blobs they reference (pages and chunks). */
export async function checkBackups(run: VerifyRun, missingPacks: MissingPacks): Promise<IdPrefixSet> {
  const { repo } = run;
  const referenced = new IdPrefixSet();
  const { backups, damaged } = await repo.listBackups();
  for (const { id, error } of damaged) run.problem(await damagedRecordProblem(repo, id, error));
  for (const found of recordConsistencyProblems(backups)) run.problem(found);
  run.report.backups = backups.length;
  const quarantinedBlobs = new Map<string, QuarantinedFrame>();
  for (const frame of run.quarantine.values()) if (frame.blob) quarantinedBlobs.set(frame.blob, frame);
  await walkReferences(
    repo,
    backups,
    {
      page: (id, { backup, disk }) => {
        referenced.add(id);
        missingPacks.noteReference(id.toString('hex'), backup, disk, null);
      },
      chunk: (reference) => {
        const hex = reference.id.toString('hex');
        const lostWith = missingPacks.packOf(hex);
        if (lostWith !== undefined) missingPacks.noteReference(hex, reference.backup, reference.disk, reference.offset);
        if (reference.location || lostWith !== undefined) referenced.add(reference.id);
        for (const found of chunkProblems(reference, { lostWith, damagedBlobs: run.damagedBlobs, quarantinedBlobs })) run.problem(found);
      },
      mapDamaged: (backup, disk, error) => run.problem({ code: 'MAP_DAMAGED', message: `backup ${backup}, disk ${disk}: ${error.message}`, backup, disk }),
    },
    { onRecord: (n) => run.onProgress?.({ phase: 'checking backups', done: n, total: backups.length }), interruption: run.interruption },
  );
  return referenced;
}

/** What verify knows of damage when it checks a chunk reference. */
export interface KnownDamage {
  /** The missing pack the index places the chunk in, if any. */
  lostWith: string | undefined;
  /** Blob (hex) → the damage found in its frame or its index entry. */
  damagedBlobs: ReadonlyMap<string, VerifyProblem>;
  /** Blob (hex) → the frame repair set aside. */
  quarantinedBlobs: ReadonlyMap<string, QuarantinedFrame>;
}

/** What is wrong with one chunk reference (nothing, mostly). */
export function chunkProblems({ backup, disk, offset, length, id, location }: ChunkReference, known: KnownDamage): VerifyProblem[] {
  const hex = id.toString('hex');
  const { lostWith } = known;
  if (lostWith !== undefined) {
    return [{ code: 'CHUNK_DAMAGED', message: `backup ${backup}, disk ${disk}, offset ${offset}: chunk ${hex.slice(0, 16)}… is lost: its pack ${lostWith} is missing`, backup, disk, offset, blob: hex, pack: lostWith }];
  }
  const problems: VerifyProblem[] = [];
  const where = { backup, disk, offset, blob: hex };
  const prefix = `backup ${backup}, disk ${disk}, offset ${offset}: chunk ${hex.slice(0, 16)}…`;
  if (location) {
    // Whatever kind of frame holds it (ids name content, not roles: SPEC.md 8), a chunk is the block's length.
    if (location.rawLength !== length) problems.push({ code: 'CHUNK_DAMAGED', message: `${prefix} holds ${location.rawLength} bytes, the block needs ${length}`, ...where, pack: location.packId, packOffset: location.offset });
  } else {
    const set = known.quarantinedBlobs.get(hex);
    if (set) problems.push({ code: 'CHUNK_DAMAGED', message: `${prefix} is damaged (quarantined by repair: pack ${set.pack} offset ${set.offset}: ${set.why}); the next backup of a source that still holds this block stores a good copy`, ...where, pack: set.pack, packOffset: set.offset });
    else problems.push({ code: 'CHUNK_MISSING', message: `${prefix} is missing`, ...where });
  }
  const damage = known.damagedBlobs.get(hex);
  if (damage) problems.push({ code: 'CHUNK_DAMAGED', message: `${prefix} is damaged (${damage.message})`, ...where, ...(damage.pack ? { pack: damage.pack } : {}) });
  return problems;
}

/** Index entries no backup references: garbage gc reclaims. */
export async function countUnreferenced(run: VerifyRun, referenced: IdPrefixSet): Promise<void> {
  const garbage = run.report.garbage;
  garbage.unreferencedBlobs = 0;
  garbage.unreferencedBytes = 0;
  for await (const entry of run.repo.blobs()) {
    await run.interruption.tick();
    if (!referenced.has(entry.id)) {
      garbage.unreferencedBlobs += 1;
      garbage.unreferencedBytes += entry.length;
    }
  }
}
