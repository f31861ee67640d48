/**
 * repair's pack check, which builds the new index as it goes: every frame of every pack is read and
 * checked in full (checksum, lz4, SHA-256), walking past damage (pack-file.ts, walkPackBytes), so one bad
 * header does not hide the good frames behind it. The good frames go into a new index under tmp/, pack by
 * pack (never all in memory); the damaged ones, and packs that cannot be read at all, are collected for
 * the quarantine.
 */
import type { Repository } from '../../repo-format/repository.js';
import type { EngineError } from '../../repo-format/errors.js';
import { IndexStore } from '../../repo-format/index-store.js';
import { walkPackBytes, type PackDamage, type PackScan, type ScannedFrame } from '../../repo-format/pack-file.js';
import { openBlob } from '../../repo-format/blob-codec.js';
import { quarantineKey, type QuarantinedFrame } from '../../repo-format/quarantine.js';
import { crashPoint } from '../../repo-format/crash-points.js';
import { MAX_FRAME_LENGTH, PACK_HEADER_SIZE, PACK_TARGET_SIZE } from '../../repo-format/constants.js';
import type { IndexEntry } from '../../repo-format/index-entry.js';
import { IdPrefixSet } from '../common/id-set.js';
import { BlockPool } from '../pipeline/block-pool.js';
import { checkPackFrames } from '../pipeline/pack-check.js';
import type { Interruption } from '../host/interrupt.js';
import { GoodPlaces } from './good-places.js';
import type { RepairReport } from './report.js';

/**
 * A damaged pack is read whole to be walked past its damage; no pack this engine writes is larger (it is
 * sealed once it reaches PACK_TARGET_SIZE, after at most one more frame). A larger file is walked only as
 * far as its frame chain parses, never read whole.
 */
const MAX_WALKED_PACK = PACK_HEADER_SIZE + PACK_TARGET_SIZE + MAX_FRAME_LENGTH;

/** What the pack check hands to the quarantine decision. */
export interface CheckedPacks {
  /** Damaged frames and unreadable packs (blob null where the frame's header could not say). */
  found: QuarantinedFrame[];
  /** The blobs the new index holds a good frame of. */
  good: IdPrefixSet;
  /** Where those good frames are. */
  goodPlaces: GoodPlaces;
  /** The time this run started, for its quarantine records. */
  since: string;
}

export interface PackCheckArgs {
  repo: Repository;
  /** The frames set aside by earlier repairs (quarantineKey): never indexed again. */
  already: ReadonlyMap<string, QuarantinedFrame>;
  workers: number | undefined;
  interruption: Interruption;
  onProgress: ((progress: { phase: string; done: number; total: number }) => void) | undefined;
}

/** Checks every pack, entering the good frames into a new index at `building`. */
export async function checkPacksIntoIndex(building: string, args: PackCheckArgs, report: RepairReport): Promise<CheckedPacks> {
  const { repo } = args;
  const checked: CheckedPacks = { found: [], good: new IdPrefixSet(), goodPlaces: new GoodPlaces(), since: new Date().toISOString() };
  const packs = await repo.listPacks();
  const built = await IndexStore.open(building, { create: true });
  // No more workers than the packs' bytes can use, none for a small repository (block-pool.ts: runsInline, as verify).
  const workBytes = packs.reduce((sum, pack) => sum + pack.size, 0);
  const pool = new BlockPool({ blockSize: repo.blockSize, workers: args.workers, slotCount: 1, keys: repo.keys, workBytes });
  try {
    await built.putMeta('repository-id', repo.config.id);
    for await (const { packId, n, check } of checkedInOrder(repo, pool, packs.map((pack) => pack.packId), args)) {
      if ('unreadable' in check) {
        checked.found.push({ pack: packId, offset: 0, blob: null, why: check.unreadable, since: checked.since });
        continue;
      }
      report.index.packs += 1;
      report.bytesChecked += check.size;
      const entries = goodEntries(packId, check.good, args.already);
      for (const entry of entries) checked.good.add(entry.id);
      checked.goodPlaces.addPack(packId, entries.map((e) => e.offset));
      await built.addEntries(entries);
      if (n === 0) crashPoint('repair-pack-read');
      report.index.blobs += entries.length;
      report.framesChecked += check.good.length + check.damage.filter((d) => d.frame).length;
      for (const damage of check.damage) {
        checked.found.push({ pack: packId, offset: damage.offset, blob: damage.frame?.header.id.toString('hex') ?? null, why: damage.why, since: checked.since });
      }
    }
    return checked;
  } finally {
    await built.close();
    await pool.close().catch(() => undefined);
  }
}

/** The index entries of a pack's good frames, but for those an earlier repair set aside. */
export function goodEntries(packId: string, frames: readonly ScannedFrame[], already: ReadonlyMap<string, unknown>): IndexEntry[] {
  return frames
    .filter((frame) => !already.has(quarantineKey(packId, frame.offset)))
    .map((frame) => ({ id: frame.header.id, packId, offset: frame.offset, length: frame.length, rawLength: frame.header.rawLength, kind: frame.header.kind, flags: frame.header.flags }));
}

type PackCheck = { unreadable: string } | { size: number; good: ScannedFrame[]; damage: PackDamage[] };

/** Each pack's check, in pack order; the workers check a few packs ahead of the one whose result is entered. */
async function* checkedInOrder(repo: Repository, pool: BlockPool, packIds: readonly string[], args: PackCheckArgs): AsyncGenerator<{ packId: string; n: number; check: PackCheck }> {
  const ahead: Promise<PackCheck>[] = [];
  for (let next = 0, done = 0; done < packIds.length; done += 1) {
    while (next < packIds.length && ahead.length <= pool.workers) {
      const checking = checkPack(repo, pool, packIds[next++]!);
      checking.catch(() => undefined); // an interrupted run leaves checks behind; their results no longer matter
      ahead.push(checking);
    }
    args.onProgress?.({ phase: 'reading packs', done, total: packIds.length });
    await args.interruption.tick();
    const check = await ahead.shift()!;
    args.interruption.check();
    yield { packId: packIds[done]!, n: done, check };
  }
}

/**
 * Checks every frame of one pack. The common case, a pack whose frame chain parses to its end, is
 * checked in full by a worker (verify --read-data's task) while the main thread goes on; only a pack with
 * damage is read whole into memory and walked here, past the damage (walkPackBytes), so that each good
 * frame behind a bad one is found and each bad one located.
 */
async function checkPack(repo: Repository, pool: BlockPool, packId: string): Promise<PackCheck> {
  let scan: PackScan | undefined;
  let bad: { offset: number; why: string }[] | undefined;
  try {
    scan = await repo.scanPack(packId);
    const frames = scan.frames;
    if (!scan.damage || scan.size > MAX_WALKED_PACK) bad = (await checkPackFrames(pool, { locator: repo.locateFrame({ packId, offset: 0, length: scan.size }), readRange: (offset, length) => repo.readPackRange(packId, offset, length) }, frames).catch(() => undefined))?.bad;
    if (!scan.damage && bad && bad.length === 0) return { size: scan.size, good: scan.frames, damage: [] };
  } catch {
    // Unreadable through a scan: the whole-file read below says why, or walks what it can.
  }
  if (scan && scan.size > MAX_WALKED_PACK) return oversizedPack(scan, bad);
  return walkWholePack(repo, packId);
}

/** A file larger than any pack this engine writes: never read whole. What the scan reached is all there is. */
function oversizedPack(scan: PackScan, bad: { offset: number; why: string }[] | undefined): PackCheck {
  if (!bad) return { unreadable: `a file of ${scan.size} bytes, larger than any pack, whose frames cannot be checked` };
  const failed = new Map(bad.map((b) => [b.offset, b.why]));
  const damage: PackDamage[] = scan.frames.filter((f) => failed.has(f.offset)).map((f) => ({ offset: f.offset, why: failed.get(f.offset)!, frame: { header: f.header, length: f.length } }));
  if (scan.damage) damage.push({ offset: scan.damage.offset, why: `${scan.damage.why} (the file is larger than any pack, ${scan.size} bytes: not searched past the damage)` });
  return { size: scan.size, good: scan.frames.filter((f) => !failed.has(f.offset)), damage };
}

/** Reads a damaged pack whole and walks it past its damage, checking every frame in full. */
async function walkWholePack(repo: Repository, packId: string): Promise<PackCheck> {
  let bytes: Buffer;
  try {
    bytes = await repo.readPack(packId, MAX_WALKED_PACK);
  } catch (error) {
    return { unreadable: `pack cannot be read (${String((error as EngineError).details?.errno ?? (error as Error).message)})` };
  }
  const walk = walkPackBytes(
    bytes,
    packId,
    (frame, header) => {
      const opened = openBlob(frame, header.id, repo.keys);
      return typeof opened === 'string' ? opened : undefined;
    },
    repo.encrypted,
  );
  return { size: bytes.length, ...walk };
}
