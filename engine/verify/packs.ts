/**
 * verify's structure check of the packs: every pack's header and frame chain parses to its end, and each
 * frame is matched with its index entry (counted cheaply here; the index check locates a disagreement
 * only when the count is off). A pack no entry names is garbage a crash left; a pack whose header is not a
 * pack's is sorted out by the index check (damaged if named, else not the repository's).
 */
import type { PackScan, ScannedFrame } from '../../repo-format/pack-file.js';
import { EngineError } from '../../repo-format/errors.js';
import type { BlobLocation } from '../../repo-format/index-entry.js';
import { quarantineKey } from '../../repo-format/quarantine.js';
import { crashPoint } from '../../repo-format/crash-points.js';
import type { DataCheck } from './data-check.js';
import type { VerifyProblem } from './report.js';
import type { VerifyRun } from './run.js';

/** What the structure check hands to the index check. */
export interface PackFindings {
  /** Every pack read, with its size. */
  sizes: Map<string, number>;
  /** Packs whose frame chain breaks or whose data could not be checked: the index check reads every entry of these in full. */
  damaged: Set<string>;
  /** Packs whose header is not a pack's. */
  badHeaders: Map<string, PackScan>;
  /** Packs that cannot be read at all, with the problem said: every blob indexed in one is damaged. */
  unreadable: Map<string, VerifyProblem>;
  /** Index entries found naming their frame exactly. */
  confirmedEntries: number;
}

/** Scans every pack (and hands each to `data`, which reads the chosen ones in full meanwhile). */
export async function checkPacks(run: VerifyRun, packIds: readonly string[], data: DataCheck | undefined): Promise<PackFindings> {
  const findings: PackFindings = { sizes: new Map(), damaged: new Set(), badHeaders: new Map(), unreadable: new Map(), confirmedEntries: 0 };
  for (const [n, packId] of packIds.entries()) {
    await run.interruption.tick();
    run.onProgress?.({ phase: data ? 'reading packs' : 'scanning packs', done: n, total: packIds.length });
    const scan = await scanOrSay(run, packId, findings);
    if (n === 0) crashPoint('verify-pack-scanned');
    if (!scan) continue;
    await checkPack(run, scan, findings);
    await data?.submit(scan);
  }
  if (data) {
    await data.drain();
    for (const packId of data.unchecked) findings.damaged.add(packId);
  }
  return findings;
}

/**
 * The pack's scan; undefined for a pack that is gone since it was listed (the index check reports it
 * missing) or that cannot be read (said here: every blob indexed in it is damaged).
 */
async function scanOrSay(run: VerifyRun, packId: string, findings: PackFindings): Promise<PackScan | undefined> {
  try {
    return await run.repo.scanPack(packId);
  } catch (error) {
    if (!(error instanceof EngineError) || error.code !== 'ENGINE_CORRUPT_PACK') throw error;
    if (error.details.errno === 'ENOENT') return undefined;
    const found: VerifyProblem = { code: 'PACK_DAMAGED', message: error.message, pack: packId };
    run.report.packs += 1;
    findings.unreadable.set(packId, found);
    run.problem(found);
    return undefined;
  }
}

async function checkPack(run: VerifyRun, scan: PackScan, findings: PackFindings): Promise<void> {
  const { packId } = scan;
  findings.sizes.set(packId, scan.size);
  run.report.packs += 1;
  const locations = await run.repo.lookup(scan.frames.map((f) => f.header.id));
  const named = scan.frames.filter((frame, i) => namesFrame(locations[i], packId, frame)).length;
  findings.confirmedEntries += named;
  // An entry still naming a frame repair set aside (a repair killed before its new index was in place).
  scan.frames.forEach((frame, i) => {
    const location = locations[i];
    if (!location || location.packId !== packId || location.offset !== frame.offset || !run.quarantine.has(quarantineKey(packId, frame.offset))) return;
    const blob = frame.header.id.toString('hex');
    run.blobDamaged({ code: 'INDEX_ENTRY_BAD', message: `index entry for blob ${blob.slice(0, 16)}… names a quarantined (damaged) frame in pack ${packId} at offset ${frame.offset}: run engine repair`, pack: packId, packOffset: frame.offset, blob });
  });
  if (scan.damage) {
    findings.damaged.add(packId);
    // A bad header: a damaged pack if the index names it, else a file that is not a pack (the index check decides).
    if (scan.damage.offset === 0) findings.badHeaders.set(packId, scan);
    else if (!run.quarantine.has(quarantineKey(packId, scan.damage.offset))) run.problem({ code: 'PACK_DAMAGED', message: `pack ${packId} is damaged at offset ${scan.damage.offset}: ${scan.damage.why}`, pack: packId, packOffset: scan.damage.offset });
  }
  // A pack sealed by a writer that died before its index batch: nothing can reach its blobs.
  if (named === 0 && !scan.damage) {
    run.report.garbage.unindexedPacks.push(packId);
    run.report.garbage.unindexedBytes += scan.size;
  }
}

/** Whether an index entry names exactly this frame: its place, length, raw length, kind and flags. */
export function namesFrame(location: BlobLocation | undefined, packId: string, frame: ScannedFrame): boolean {
  return (
    location !== undefined &&
    location.packId === packId &&
    location.offset === frame.offset &&
    location.length === frame.length &&
    location.rawLength === frame.header.rawLength &&
    location.kind === frame.header.kind &&
    location.flags === frame.header.flags
  );
}
