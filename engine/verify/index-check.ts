/**
 * verify's index check: every entry must point at its frame. The structure check counted the entries that
 * do; each entry is located only when that count is off or a pack's frame chain is broken. Entries naming
 * a pack that is gone are summed up per pack (missing-packs.ts).
 */
import type { PackScan } from '../../repo-format/pack-file.js';
import { decodeFrameHeader, frameLength, type FrameHeader } from '../../repo-format/frame.js';
import { openBlob } from '../../repo-format/blob-codec.js';
import type { IndexEntry } from '../../repo-format/index-entry.js';
import { FRAME_HEADER_SIZE, FRAME_OVERHEAD, MAX_FRAME_LENGTH } from '../../repo-format/constants.js';
import { quarantineKey } from '../../repo-format/quarantine.js';
import type { Repository } from '../../repo-format/repository.js';
import { foreignPackWarning } from './layout.js';
import { MissingPacks } from './missing-packs.js';
import type { PackFindings } from './packs.js';
import type { VerifyProblem } from './report.js';
import type { VerifyRun } from './run.js';

/** Counts the entries, sorts out the packs with a bad header, and locates each entry if the counts disagree. */
export async function checkIndex(run: VerifyRun, packs: PackFindings): Promise<MissingPacks> {
  const missingPacks = new MissingPacks(run.repo.manyWriters);
  let entries = 0;
  const namedBadHeaders = new Set<string>();
  for await (const entry of run.repo.blobs()) {
    await run.interruption.tick();
    entries += 1;
    if (packs.badHeaders.has(entry.packId)) namedBadHeaders.add(entry.packId);
  }
  run.report.blobs = entries;
  for (const [packId, scan] of packs.badHeaders) sortBadHeader(run, packId, scan, namedBadHeaders.has(packId));
  if (packs.confirmedEntries !== entries || packs.damaged.size > 0) {
    for await (const entry of run.repo.blobs()) {
      await run.interruption.tick();
      // A pack that cannot be read was said once; every blob it holds is damaged.
      const unreadable = packs.unreadable.get(entry.packId);
      if (unreadable) {
        run.damagedBlobs.set(entry.id.toString('hex'), unreadable);
        continue;
      }
      const found = await checkEntry(run.repo, entry, packs, missingPacks);
      // Any entry that cannot deliver its blob makes the chunk damaged for every backup that uses it.
      if (found?.blob) run.blobDamaged({ ...found, blob: found.blob });
      else if (found) run.problem(found);
    }
  }
  return missingPacks;
}

/** A pack whose header is not a pack's: damaged if the index names it, else a file that is not the repository's (a warning). */
function sortBadHeader(run: VerifyRun, packId: string, scan: PackScan, named: boolean): void {
  const notAPack = named ? undefined : foreignPackWarning(run.repo, packId, scan);
  if (notAPack) run.report.warnings.push(notAPack);
  else if (!run.quarantine.has(quarantineKey(packId, 0))) run.problem({ code: 'PACK_DAMAGED', message: `pack ${packId} is damaged at offset 0: ${scan.damage!.why}`, pack: packId, packOffset: 0 });
}

/**
 * What is wrong with one entry, reading the frame behind it: entries that point at nothing or at another
 * blob are reported; in a damaged pack every indexed frame is opened and checked in full, since the scan
 * could not reach past the damage.
 */
async function checkEntry(repo: Repository, entry: IndexEntry, packs: PackFindings, missingPacks: MissingPacks): Promise<VerifyProblem | undefined> {
  const blob = entry.id.toString('hex');
  const size = packs.sizes.get(entry.packId);
  if (size === undefined) {
    missingPacks.noteEntry(entry.packId, blob);
    return undefined;
  }
  const bad = (why: string): VerifyProblem => ({ code: 'INDEX_ENTRY_BAD', pack: entry.packId, packOffset: entry.offset, blob, message: `index entry for blob ${blob.slice(0, 16)}… ${why}` });
  const placement = placementProblem(entry, size);
  if (placement) return bad(placement);
  const whole = packs.damaged.has(entry.packId);
  const bytes = await repo.readPackRange(entry.packId, entry.offset, whole ? entry.length : FRAME_HEADER_SIZE);
  const mismatch = headerProblem(entry, decodeFrameHeader(bytes, 0, repo.encrypted));
  if (mismatch) return bad(mismatch);
  if (!whole) return undefined;
  const opened = openBlob(bytes, entry.id, repo.keys);
  if (typeof opened !== 'string') return undefined;
  return { code: 'FRAME_DAMAGED', message: `pack ${entry.packId} offset ${entry.offset} (blob ${blob.slice(0, 16)}…): ${opened}`, pack: entry.packId, packOffset: entry.offset, blob };
}

/** Why an entry cannot name a frame of a pack of `packSize` bytes, before anything is read (its length sizes the read). */
export function placementProblem(entry: IndexEntry, packSize: number): string | undefined {
  if (entry.length < FRAME_OVERHEAD || entry.length > MAX_FRAME_LENGTH) return `gives an impossible frame length ${entry.length}`;
  if (entry.offset + entry.length > packSize) return `runs past the end of pack ${entry.packId}`;
  return undefined;
}

/** Why the frame header read at an entry's place is not the frame the entry describes. */
export function headerProblem(entry: IndexEntry, header: FrameHeader | string): string | undefined {
  if (typeof header === 'string' || !header.id.equals(entry.id)) return `does not point at that blob in pack ${entry.packId}`;
  if (frameLength(header.storedLength) !== entry.length || header.rawLength !== entry.rawLength || header.kind !== entry.kind || header.flags !== entry.flags) {
    return `disagrees with its frame in pack ${entry.packId} (length, raw length, kind or flags)`;
  }
  return undefined;
}


