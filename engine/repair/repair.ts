/**
 * `engine repair`: makes the index trustworthy again and sets damaged chunks aside.
 *
 * 1. Every frame of every pack is read and checked in full (checksum, lz4, SHA-256), walking past damage
 *    (pack-file.ts, walkPackBytes), so one bad header does not hide the good frames behind it.
 * 2. A new index is built from the good frames only, under tmp/, whatever state the old one is in
 *    (missing, unreadable, or readable but wrong).
 * 3. Damaged frames are quarantined (quarantine.ts), named by blob where the old index or the frame's
 *    header says which; so are the blobs the old index placed in a region of a pack that no longer holds
 *    a good frame (a truncated pack). Deduplication then misses them, and the next backup that reads such
 *    a block stores a good copy, which every older backup's map resolves to, since ids are content.
 * 4. The new index replaces the old one (Repository.installIndex), and every backup is checked: the
 *    backups that still reference damaged or missing data are reported per disk and offset.
 */
import { readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { Repository } from '../../repo-format/repository.js';
import { IndexStore } from '../../repo-format/index-store.js';
import { packPath, scanPack, walkPackBytes, type PackDamage, type PackScan, type ScannedFrame } from '../../repo-format/pack-file.js';
import { NoSpaceError } from '../../repo-format/errors.js';
import { openBlob } from '../../repo-format/blob-codec.js';
import { addToQuarantine, listQuarantine, quarantineKey, type QuarantinedFrame } from '../../repo-format/quarantine.js';
import { crashPoint } from '../../repo-format/crash-points.js';
import { LAYOUT, MAX_FRAME_LENGTH, PACK_HEADER_SIZE, PACK_TARGET_SIZE } from '../../repo-format/constants.js';
import type { IndexEntry } from '../../repo-format/index-entry.js';
import { IdPrefixSet } from '../common/id-set.js';
import { walkReferences, type ReferenceVisitor } from '../catalogue/references.js';
import { BlockPool } from '../pipeline/block-pool.js';
import type { Passphrase } from '../../repo-format/passphrase.js';
import { restoreRecordsFromCatalogue, type RestoredRecord } from '../catalogue/record-recovery.js';
import { configDamage, hasRepositoryLayout, rebuildConfig, type RecoveredConfig } from '../../repo-format/config-recovery.js';
import { acquireLock } from '../../repo-format/lock.js';
import { InterruptedError } from '../errors.js';
import { Interruption } from '../host/interrupt.js';
import { ensurePrivateDirectory } from '../../repo-format/file-modes.js';

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
}

export interface DamagedReference {
  code: 'CHUNK_DAMAGED' | 'CHUNK_MISSING' | 'MAP_DAMAGED' | 'RECORD_DAMAGED';
  message: string;
  backup: string;
  disk?: string;
  offset?: number;
  blob?: string;
}

export interface RepairReport {
  /** What the old index was: readable (and replaced all the same), unreadable, or missing. */
  previousIndex: 'readable' | 'unreadable' | 'missing';
  index: { packs: number; blobs: number };
  framesChecked: number;
  bytesChecked: number;
  /** Frames set aside by this run (earlier ones stay in quarantine/ and are not repeated). */
  quarantined: QuarantinedFrame[];
  tempFilesRemoved: number;
  /** The config, when it was lost or damaged and rebuilt from the rest (config-recovery.ts); null otherwise. */
  configRebuilt: RebuiltConfig | null;
  /** Damaged record files put back from the index catalogue's good copies (record-recovery.ts). */
  recordsRestored: RestoredRecord[];
  /** What still cannot be restored, per backup, disk and offset: nothing when `ok`. */
  damaged: DamagedReference[];
  ok: boolean;
}

const DAMAGE_LIMIT = 1000;
/**
 * A damaged pack is read whole to be walked past its damage; no pack this engine writes is larger (it is
 * sealed once it reaches PACK_TARGET_SIZE, after at most one more frame). A larger file is walked only as
 * far as its frame chain parses, never read whole.
 */
const MAX_WALKED_PACK = PACK_HEADER_SIZE + PACK_TARGET_SIZE + MAX_FRAME_LENGTH;

export async function repair(options: RepairOptions): Promise<RepairReport> {
  let installed = false;
  let quarantinedNow = 0;
  const interruption = new Interruption(options.signal, 'repair', () =>
    installed
      ? `the new index is in place and ${quarantinedNow} frames were quarantined; the check of which backups still reference damaged data did not finish (engine verify does it)`
      : 'nothing changed: the old index is as it was, and the half-built one was removed',
  );
  interruption.check();
  const configRebuilt = await rebuildLostConfig(options.repo, options.passphrase);
  const repo = await Repository.open(options.repo, { access: 'exclusive', command: 'repair', index: 'skip', passphrase: options.passphrase });
  const report: RepairReport = {
    previousIndex: 'missing',
    index: { packs: 0, blobs: 0 },
    framesChecked: 0,
    bytesChecked: 0,
    quarantined: [],
    tempFilesRemoved: 0,
    configRebuilt,
    recordsRestored: [],
    damaged: [],
    ok: true,
  };
  const building = join(repo.root, LAYOUT.tmp, `index-repair.${randomBytes(4).toString('hex')}`);
  let pool: BlockPool | undefined;
  try {
    report.tempFilesRemoved = await repo.removeTempFiles();
    // Damaged records whose catalogue copy in the (old) index is good get their bytes back first.
    report.recordsRestored = await restoreFromOldCatalogue(repo, join(repo.root, LAYOUT.index));
    const already = await listQuarantine(repo.root);
    const built = await IndexStore.open(building, { create: true });
    const good = new IdPrefixSet();
    const goodPlaces = new GoodPlaces();
    const found: QuarantinedFrame[] = [];
    const since = new Date().toISOString();
    pool = new BlockPool({ blockSize: repo.blockSize, workers: options.workers, slotCount: 1, keys: repo.keys });
    try {
      await built.putMeta('repository-id', repo.config.id);
      const packIds = await repo.listPackIds();
      // Packs are checked in the workers, a few ahead of the one whose result is entered, in pack order.
      const ahead: Promise<PackCheck>[] = [];
      for (let next = 0, done = 0; done < packIds.length; done += 1) {
        while (next < packIds.length && ahead.length <= pool.workers) {
          const checking = checkPack(repo, pool, packIds[next++]!);
          checking.catch(() => undefined); // an interrupted run leaves checks behind; their results no longer matter
          ahead.push(checking);
        }
        options.onProgress?.({ phase: 'reading packs', done, total: packIds.length });
        await interruption.tick();
        const check = await ahead.shift()!;
        interruption.check();
        const packId = packIds[done]!;
        if ('unreadable' in check) {
          found.push({ pack: packId, offset: 0, blob: null, why: check.unreadable, since });
          continue;
        }
        report.index.packs += 1;
        report.bytesChecked += check.size;
        const entries: IndexEntry[] = [];
        for (const frame of check.good) {
          if (already.has(quarantineKey(packId, frame.offset))) continue;
          entries.push({ id: frame.header.id, packId, offset: frame.offset, length: frame.length, rawLength: frame.header.rawLength, kind: frame.header.kind, flags: frame.header.flags });
          good.add(frame.header.id);
        }
        goodPlaces.addPack(packId, entries.map((e) => e.offset));
        await built.addEntries(entries);
        if (done === 0) crashPoint('repair-pack-read');
        report.index.blobs += entries.length;
        report.framesChecked += check.good.length + check.damage.filter((d) => d.frame).length;
        for (const damage of check.damage) {
          found.push({ pack: packId, offset: damage.offset, blob: damage.frame?.header.id.toString('hex') ?? null, why: damage.why, since });
        }
      }
    } finally {
      await built.close();
      await pool.close().catch(() => undefined);
      pool = undefined;
    }

    // The old index knows which blob each damaged place held, and which blobs sat where nothing good is left.
    const byPlace = new Map(found.map((f) => [quarantineKey(f.pack, f.offset), f]));
    report.previousIndex = await forEachOldEntry(join(repo.root, LAYOUT.index), interruption, (entry) => {
      const place = quarantineKey(entry.packId, entry.offset);
      if (goodPlaces.has(entry.packId, entry.offset) || already.has(place)) return;
      const damage = byPlace.get(place);
      if (damage) {
        damage.blob = entry.id.toString('hex'); // the header of a damaged frame may itself be what is damaged
      } else if (!good.has(entry.id)) {
        const lost: QuarantinedFrame = { pack: entry.packId, offset: entry.offset, blob: entry.id.toString('hex'), why: 'no good frame is left at this place of the pack (damaged or cut short)', since };
        found.push(lost);
        byPlace.set(place, lost);
      }
    });
    report.quarantined = found.filter((f) => !already.has(quarantineKey(f.pack, f.offset)));
    interruption.check();
    // From here to the installed index, an interruption waits: quarantine records without the new index
    // would leave the old index naming frames set aside (verify: INDEX_ENTRY_BAD) for nothing.
    quarantinedNow = report.quarantined.length;
    await addToQuarantine(repo.root, report.quarantined);
    crashPoint('repair-quarantined');
    await repo.installIndex(building);
    installed = true;

    // What still cannot be restored.
    const quarantinedBlobs = new Map<string, QuarantinedFrame>();
    for (const frame of (await listQuarantine(repo.root)).values()) if (frame.blob) quarantinedBlobs.set(frame.blob, frame);
    const damaged = (d: DamagedReference): void => {
      if (report.damaged.length < DAMAGE_LIMIT) report.damaged.push(d);
      report.ok = false;
    };
    const { backups, damaged: badRecords } = await repo.listBackups();
    for (const { id, error } of badRecords) damaged({ code: 'RECORD_DAMAGED', message: `${error.message}; no good copy of it is left: \`engine forget ${id}\` removes the backup`, backup: id });
    const stillDamaged: ReferenceVisitor = {
      page: () => undefined,
      chunk: ({ backup, disk, offset, id, location }) => {
        if (location) return;
        const hex = id.toString('hex');
        const known = quarantinedBlobs.get(hex);
        const prefix = `backup ${backup}, disk ${disk}, offset ${offset}: chunk ${hex.slice(0, 16)}…`;
        if (known) damaged({ code: 'CHUNK_DAMAGED', message: `${prefix} is damaged (pack ${known.pack} offset ${known.offset}: ${known.why}); back up a source that still holds this block to heal it`, backup, disk, offset, blob: hex });
        else damaged({ code: 'CHUNK_MISSING', message: `${prefix} is missing`, backup, disk, offset, blob: hex });
      },
      mapDamaged: (backup, disk, error) => damaged({ code: 'MAP_DAMAGED', message: `backup ${backup}, disk ${disk}: ${error.message}`, backup, disk }),
    };
    await walkReferences(repo, backups, stillDamaged, { interruption });
    return report;
  } finally {
    await pool?.close().catch(() => undefined);
    // A repair that failed (a full disk, an I/O error) leaves no half-built index behind.
    if (!installed) await rm(building, { recursive: true, force: true }).catch(() => undefined);
    await repo.close();
  }
}

type PackCheck = { unreadable: string } | { size: number; good: ScannedFrame[]; damage: PackDamage[] };

/**
 * Checks every frame of one pack. The common case, a pack whose frame chain parses to its end, is
 * checked in full by a worker (verify --read-data's task) while the main thread goes on; only a pack with
 * damage is read whole into memory and walked here, past the damage (walkPackBytes), so that each good
 * frame behind a bad one is found and each bad one located.
 */
async function checkPack(repo: Repository, pool: BlockPool, packId: string): Promise<PackCheck> {
  const path = packPath(repo.root, packId);
  let scan: PackScan | undefined;
  let bad: { offset: number; why: string }[] | undefined;
  try {
    scan = await scanPack(repo.root, packId, repo.encrypted);
    if (!scan.damage || scan.size > MAX_WALKED_PACK) bad = (await pool.verifyPack({ packPath: path, frames: scan.frames.map((f) => ({ offset: f.offset, length: f.length })) }).catch(() => undefined))?.bad;
    if (!scan.damage && bad && bad.length === 0) return { size: scan.size, good: scan.frames, damage: [] };
  } catch {
    // Unreadable through a scan: the whole-file read below says why, or walks what it can.
  }
  if (scan && bad && scan.size > MAX_WALKED_PACK) {
    // Larger than any pack this engine writes: never read whole. What the scan reached is all there is.
    const failed = new Map(bad.map((b) => [b.offset, b.why]));
    const damage: PackDamage[] = scan.frames.filter((f) => failed.has(f.offset)).map((f) => ({ offset: f.offset, why: failed.get(f.offset)!, frame: { header: f.header, length: f.length } }));
    if (scan.damage) damage.push({ offset: scan.damage.offset, why: `${scan.damage.why} (the file is larger than any pack, ${scan.size} bytes: not searched past the damage)` });
    return { size: scan.size, good: scan.frames.filter((f) => !failed.has(f.offset)), damage };
  }
  if (scan && scan.size > MAX_WALKED_PACK) {
    return { unreadable: `a file of ${scan.size} bytes, larger than any pack, whose frames cannot be checked` };
  }
  let bytes: Buffer;
  try {
    bytes = await readFile(path);
  } catch (error) {
    return { unreadable: `pack cannot be read (${(error as NodeJS.ErrnoException).code ?? String(error)})` };
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

/**
 * The offsets of the good frames of every pack, 8 bytes per frame (a Float64Array per pack, in the
 * increasing order the walk finds them): repair asks, for each entry of the old index, whether a good
 * frame sits where it points.
 */
class GoodPlaces {
  private readonly byPack = new Map<string, Float64Array>();

  addPack(packId: string, offsets: readonly number[]): void {
    this.byPack.set(packId, Float64Array.from(offsets));
  }

  has(packId: string, offset: number): boolean {
    const offsets = this.byPack.get(packId);
    if (!offsets) return false;
    let low = 0;
    let high = offsets.length - 1;
    while (low <= high) {
      const mid = Math.floor((low + high) / 2);
      const value = offsets[mid]!;
      if (value === offset) return true;
      if (value < offset) low = mid + 1;
      else high = mid - 1;
    }
    return false;
  }
}

export interface RebuiltConfig {
  /** Why the old config could not be used: missing, or what is wrong with it. */
  why: string;
  id: string;
  blockSize: number;
  version: number;
  encrypted: boolean;
  /** Where each value came from (SPEC.md, section 3.2). */
  sources: RecoveredConfig['sources'];
  /** The damaged config, kept beside the new one, or null when there was none. */
  keptAs: string | null;
}

/**
 * A config that is missing or damaged in what is otherwise a repository (packs/ and backups/) is rebuilt
 * first, under the lock; anything else (a newer format, a directory that is no repository) stays the error it is.
 */
async function rebuildLostConfig(root: string, passphrase: Passphrase | undefined): Promise<RebuiltConfig | null> {
  let why: string | undefined;
  try {
    await Repository.readConfig(root);
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
    return { why, id: c.id, blockSize: c.blockSize, version: c.version, encrypted: c.encryption !== undefined, sources: rebuilt.sources, keptAs: rebuilt.keptAs };
  } finally {
    await lock.release();
  }
}

/** Restores damaged records from the old index's catalogue, when that index can be opened at all. */
async function restoreFromOldCatalogue(repo: Repository, path: string): Promise<RestoredRecord[]> {
  let index: IndexStore;
  try {
    index = await IndexStore.open(path, { create: false });
  } catch (error) {
    if (error instanceof NoSpaceError) throw error;
    return [];
  }
  try {
    return await restoreRecordsFromCatalogue(repo, index);
  } finally {
    await index.close().catch(() => undefined);
  }
}

/**
 * Streams the old index's entries to `visit` (never all in memory at once), as far as they can be read:
 * a missing or unreadable index has none, one that fails half-way those before the failure.
 */
async function forEachOldEntry(path: string, interruption: Interruption, visit: (entry: IndexEntry) => void): Promise<RepairReport['previousIndex']> {
  let index: IndexStore;
  try {
    index = await IndexStore.open(path, { create: false });
  } catch (error) {
    if (error instanceof NoSpaceError) throw error; // not damage: say so rather than repair without the old entries
    const missing = String((error as { cause?: unknown }).cause ?? error).includes('does not exist');
    return missing ? 'missing' : 'unreadable';
  }
  try {
    for await (const entry of index.blobs()) {
      await interruption.tick();
      visit(entry);
    }
    return 'readable';
  } catch (error) {
    if (error instanceof InterruptedError) throw error;
    return 'unreadable';
  } finally {
    await index.close().catch(() => undefined);
  }
}
