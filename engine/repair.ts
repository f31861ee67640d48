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
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { Repository } from '../repo-format/repository.js';
import { IndexStore } from '../repo-format/index-store.js';
import { packPath, walkPackBytes } from '../repo-format/pack-file.js';
import { openBlob } from '../repo-format/blob-codec.js';
import { addToQuarantine, listQuarantine, quarantineKey, type QuarantinedFrame } from '../repo-format/quarantine.js';
import { crashPoint } from '../repo-format/crash-points.js';
import { LAYOUT } from '../repo-format/constants.js';
import type { IndexEntry } from '../repo-format/index-entry.js';
import { IdPrefixSet } from './id-set.js';
import { walkReferences } from './references.js';

export interface RepairOptions {
  repo: string;
  /** The passphrase of an encrypted repository. */
  passphrase?: string | undefined;
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
  /** What still cannot be restored, per backup, disk and offset: nothing when `ok`. */
  damaged: DamagedReference[];
  ok: boolean;
}

const DAMAGE_LIMIT = 1000;

export async function repair(options: RepairOptions): Promise<RepairReport> {
  const repo = await Repository.open(options.repo, { access: 'exclusive', command: 'repair', index: 'skip', passphrase: options.passphrase });
  const report: RepairReport = {
    previousIndex: 'missing',
    index: { packs: 0, blobs: 0 },
    framesChecked: 0,
    bytesChecked: 0,
    quarantined: [],
    tempFilesRemoved: 0,
    damaged: [],
    ok: true,
  };
  const building = join(repo.root, LAYOUT.tmp, `index-repair.${randomBytes(4).toString('hex')}`);
  try {
    report.tempFilesRemoved = await repo.removeTempFiles();
    const already = await listQuarantine(repo.root);
    const built = await IndexStore.open(building, { create: true });
    const good = new IdPrefixSet();
    const goodPlaces = new Set<string>();
    const found: QuarantinedFrame[] = [];
    const since = new Date().toISOString();
    try {
      await built.putMeta('repository-id', repo.config.id);
      const packIds = await repo.listPackIds();
      for (const [n, packId] of packIds.entries()) {
        options.onProgress?.({ phase: 'reading packs', done: n, total: packIds.length });
        let bytes: Buffer;
        try {
          bytes = await readFile(packPath(repo.root, packId));
        } catch (error) {
          found.push({ pack: packId, offset: 0, blob: null, why: `pack cannot be read (${(error as NodeJS.ErrnoException).code ?? String(error)})`, since });
          continue;
        }
        report.index.packs += 1;
        report.bytesChecked += bytes.length;
        const walk = walkPackBytes(
          bytes,
          packId,
          (frame, header) => {
            const opened = openBlob(frame, header.id, repo.keys);
            return typeof opened === 'string' ? opened : undefined;
          },
          repo.encrypted,
        );
        const entries: IndexEntry[] = [];
        for (const frame of walk.good) {
          if (already.has(quarantineKey(packId, frame.offset))) continue;
          entries.push({ id: frame.header.id, packId, offset: frame.offset, length: frame.length, rawLength: frame.header.rawLength, kind: frame.header.kind, flags: frame.header.flags });
          good.add(frame.header.id);
          goodPlaces.add(quarantineKey(packId, frame.offset));
        }
        await built.addEntries(entries);
        report.index.blobs += entries.length;
        report.framesChecked += walk.good.length + walk.damage.filter((d) => d.frame).length;
        for (const damage of walk.damage) {
          found.push({ pack: packId, offset: damage.offset, blob: damage.frame?.header.id.toString('hex') ?? null, why: damage.why, since });
        }
      }
    } finally {
      await built.close();
    }

    // The old index knows which blob each damaged place held, and which blobs sat where nothing good is left.
    const named = await oldIndexEntries(join(repo.root, LAYOUT.index));
    report.previousIndex = named.state;
    const byPlace = new Map(found.map((f) => [quarantineKey(f.pack, f.offset), f]));
    for (const entry of named.entries) {
      const place = quarantineKey(entry.packId, entry.offset);
      if (goodPlaces.has(place) || already.has(place)) continue;
      const damage = byPlace.get(place);
      if (damage) {
        damage.blob = entry.id.toString('hex'); // the header of a damaged frame may itself be what is damaged
      } else if (!good.has(entry.id)) {
        const lost: QuarantinedFrame = { pack: entry.packId, offset: entry.offset, blob: entry.id.toString('hex'), why: 'no good frame is left at this place of the pack (damaged or cut short)', since };
        found.push(lost);
        byPlace.set(place, lost);
      }
    }
    report.quarantined = found.filter((f) => !already.has(quarantineKey(f.pack, f.offset)));
    // Quarantine first: an index rebuilt after a crash from here on leaves these frames out too.
    await addToQuarantine(repo.root, report.quarantined);
    crashPoint('repair-quarantined');
    await repo.installIndex(building);

    // What still cannot be restored.
    const quarantinedBlobs = new Map<string, QuarantinedFrame>();
    for (const frame of (await listQuarantine(repo.root)).values()) if (frame.blob) quarantinedBlobs.set(frame.blob, frame);
    const damaged = (d: DamagedReference): void => {
      if (report.damaged.length < DAMAGE_LIMIT) report.damaged.push(d);
      report.ok = false;
    };
    const { backups, damaged: badRecords } = await repo.listBackups();
    for (const { id, error } of badRecords) damaged({ code: 'RECORD_DAMAGED', message: error.message, backup: id });
    await walkReferences(repo, backups, {
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
    });
    return report;
  } finally {
    await repo.close();
  }
}

/** Reads what it can of the old index: its entries, or nothing when it is missing or unreadable. */
async function oldIndexEntries(path: string): Promise<{ state: RepairReport['previousIndex']; entries: IndexEntry[] }> {
  let index: IndexStore;
  try {
    index = await IndexStore.open(path, { create: false });
  } catch (error) {
    const missing = String((error as { cause?: unknown }).cause ?? error).includes('does not exist');
    return { state: missing ? 'missing' : 'unreadable', entries: [] };
  }
  const entries: IndexEntry[] = [];
  try {
    for await (const entry of index.blobs()) entries.push(entry);
    return { state: 'readable', entries };
  } catch {
    return { state: 'unreadable', entries };
  } finally {
    await index.close().catch(() => undefined);
  }
}
