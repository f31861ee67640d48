/**
 * `engine verify`: checks that every backup can be restored, and lists the garbage a crash left.
 *
 * Structure (always): every pack's header and frame chain parses to its end; every index entry points at
 * a frame of that id in an existing pack; every backup record parses; every map page reads and checks;
 * every chunk a map references is in the index.
 * Data (--read-data): every frame of every pack is re-read and re-hashed (xxh64, AES-256-GCM tag when
 * encrypted, lz4, the blob id) in the workers; a damaged chunk is reported with the backups, disks and offsets that reference it.
 */
import { open } from 'node:fs/promises';
import { Repository } from '../../repo-format/repository.js';
import { packPath, scanPack, type PackScan } from '../../repo-format/pack-file.js';
import { decodeFrameHeader, frameLength } from '../../repo-format/frame.js';
import { openBlob } from '../../repo-format/blob-codec.js';
import { createHash, randomBytes } from 'node:crypto';
import { FRAME_HEADER_SIZE, FRAME_OVERHEAD, MAX_FRAME_LENGTH } from '../../repo-format/constants.js';
import { listQuarantine, quarantineKey, type QuarantinedFrame } from '../../repo-format/quarantine.js';
import { walkReferences } from '../catalogue/references.js';
import { BlockPool } from '../pipeline/block-pool.js';
import { IdPrefixSet } from '../common/id-set.js';
import { findLooseModes, formatMode } from '../../repo-format/file-modes.js';
import type { Passphrase } from '../../repo-format/passphrase.js';
import { foreignPackWarning, strayWarnings } from './layout.js';
import { damagedRecordProblem, recordConsistencyProblems } from './records.js';
import { Interruption } from '../host/interrupt.js';
import { MissingPacks } from './missing-packs.js';
import { crashPoint } from '../../repo-format/crash-points.js';

export interface VerifyProblem {
  code: string;
  message: string;
  backup?: string;
  disk?: string;
  offset?: number;
  pack?: string;
  packOffset?: number;
  blob?: string;
}

export type { MissingPackProblem } from './missing-packs.js';

export interface VerifyReport {
  ok: boolean;
  readData: boolean;
  backups: number;
  packs: number;
  blobs: number;
  bytesChecked: number;
  problems: VerifyProblem[];
  /** With --subset: the share of packs whose data was read, the seed that chose them, how many. */
  subset: { percent: number; seed: string; packs: number } | null;
  /** Frames repair found damaged and set aside: known damage, not problems in themselves. */
  quarantined: QuarantinedFrame[];
  garbage: { tempFiles: string[]; unindexedPacks: string[]; unindexedBytes: number; unreferencedBlobs: number; unreferencedBytes: number };
  /**
   * Files and directories other users may read, write or enter (SPEC.md, 2.1), counted with examples; a
   * warning (PERMISSIONS_LOOSE in `warnings`), not a problem: repositories made before modes were set are like this.
   */
  permissions: { loose: number; examples: { path: string; mode: string }[] };
  /** What is not a problem for any backup but deserves a look: files that are not the repository's (SPEC 14.2). */
  warnings: VerifyWarning[];
}

export interface VerifyWarning {
  code: string;
  message: string;
  /** The file concerned, relative to the repository root. */
  path?: string;
}

/** A path as one shell word, for a command the user may paste. */
function shellWord(text: string): string {
  return /^[\w@%+=:,./-]+$/.test(text) ? text : `'${text.replace(/'/g, `'\\''`)}'`;
}

/** The warning for files and directories other users may use (SPEC.md, 2.1), with the command that fixes them. */
function loosePermissionsWarning(permissions: VerifyReport['permissions'], root: string): VerifyWarning {
  const { loose, examples } = permissions;
  const shown = examples.slice(0, 3).map((e) => `${e.path} ${e.mode}`).join(', ');
  return {
    code: 'PERMISSIONS_LOOSE',
    message: `${loose === 1 ? '1 file or directory' : `${loose} files and directories`} of the repository ${loose === 1 ? 'is' : 'are'} open to other users (${shown}${loose > 3 ? ', …' : ''}); make it private with: chmod -R go= ${shellWord(root)}`,
    path: examples[0]!.path,
  };
}

export interface VerifyOptions {
  repo: string;
  /** The passphrase of an encrypted repository. */
  passphrase?: Passphrase | undefined;
  readData?: boolean | undefined;
  /** With readData: read only this fraction (0 < f ≤ 1) of the packs, chosen by `seed`. */
  subset?: number | undefined;
  /** Seeds the subset's choice (default: random, reported so that a run can be repeated). */
  seed?: string | undefined;
  workers?: number | undefined;
  /** SIGINT/SIGTERM: verify stops within a second (ENGINE_INTERRUPTED); it only reads, so nothing is left half-done. */
  signal?: AbortSignal | undefined;
  onProgress?: ((progress: { phase: string; done: number; total: number }) => void) | undefined;
}

const PROBLEM_LIMIT = 1000;

export async function verify(options: VerifyOptions): Promise<VerifyReport> {
  const interruption = new Interruption(options.signal, 'verify', () => 'no result: it only reads, and changed nothing');
  interruption.check();
  const repo = await Repository.open(options.repo, { access: 'exclusive', command: 'verify', passphrase: options.passphrase, readWithoutLock: true, checkInterrupted: () => interruption.check() });
  const report: VerifyReport = {
    ok: true,
    readData: options.readData === true,
    backups: 0,
    packs: 0,
    blobs: 0,
    bytesChecked: 0,
    problems: [],
    subset: null,
    quarantined: [],
    garbage: { tempFiles: [], unindexedPacks: [], unindexedBytes: 0, unreferencedBlobs: 0, unreferencedBytes: 0 },
    permissions: { loose: 0, examples: [] },
    warnings: [],
  };
  const problem = (p: VerifyProblem): void => {
    if (report.problems.length < PROBLEM_LIMIT) report.problems.push(p);
  };
  let pool: BlockPool | undefined;
  try {
    report.garbage.tempFiles = await repo.listTempFiles();
    const loose = await findLooseModes(repo.root);
    report.permissions = { loose: loose.count, examples: loose.examples.map((e) => ({ path: e.path, mode: formatMode(e.mode) })) };
    if (loose.count > 0) report.warnings.push(loosePermissionsWarning(report.permissions, repo.root));
    report.warnings.push(...(await strayWarnings(repo.root)));
    if (report.readData) pool = new BlockPool({ blockSize: repo.blockSize, workers: options.workers, slotCount: 1, keys: repo.keys });

    const quarantine = await listQuarantine(repo.root);
    report.quarantined = [...quarantine.values()];
    const quarantinedBlobs = new Map<string, QuarantinedFrame>();
    for (const frame of quarantine.values()) if (frame.blob) quarantinedBlobs.set(frame.blob, frame);

    // 1. Packs: frame chains, and (with --read-data) every frame's content, or that of a subset of packs.
    const damagedBlobs = new Map<string, VerifyProblem>();
    const packIds = await repo.listPackIds();
    const readPacks = report.readData ? choosePacks(packIds, options.subset, options.seed) : Object.assign(new Set<string>(), { seed: '' });
    if (report.readData && options.subset !== undefined) {
      report.subset = { percent: Math.round(options.subset * 10000) / 100, seed: readPacks.seed, packs: readPacks.size };
    }
    const packSizes = new Map<string, number>();
    const damagedPacks = new Set<string>();
    const badHeaders = new Map<string, PackScan>();
    const packChecks = new Set<Promise<void>>();
    let confirmedEntries = 0;
    for (const [n, packId] of packIds.entries()) {
      await interruption.tick();
      options.onProgress?.({ phase: report.readData ? 'reading packs' : 'scanning packs', done: n, total: packIds.length });
      const scan = await scanPack(repo.root, packId, repo.encrypted);
      if (n === 0) crashPoint('verify-pack-scanned');
      packSizes.set(packId, scan.size);
      report.packs += 1;
      const locations = await repo.lookup(scan.frames.map((f) => f.header.id));
      let named = 0;
      scan.frames.forEach((frame, i) => {
        const location = locations[i];
        if (
          location &&
          location.packId === packId &&
          location.offset === frame.offset &&
          location.length === frame.length &&
          location.rawLength === frame.header.rawLength &&
          location.kind === frame.header.kind &&
          location.flags === frame.header.flags
        ) {
          named += 1;
        }
      });
      // An entry still naming a frame repair set aside (a repair killed before its new index was in place).
      scan.frames.forEach((frame, i) => {
        const location = locations[i];
        if (!location || location.packId !== packId || location.offset !== frame.offset || !quarantine.has(quarantineKey(packId, frame.offset))) return;
        const blob = frame.header.id.toString('hex');
        const found: VerifyProblem = { code: 'INDEX_ENTRY_BAD', message: `index entry for blob ${blob.slice(0, 16)}… names a quarantined (damaged) frame in pack ${packId} at offset ${frame.offset}: run engine repair`, pack: packId, packOffset: frame.offset, blob };
        damagedBlobs.set(blob, found);
        problem(found);
      });
      confirmedEntries += named;
      if (scan.damage) {
        damagedPacks.add(packId);
        // A bad header: a damaged pack if the index names it, else a file that is not a pack (decided below).
        if (scan.damage.offset === 0) badHeaders.set(packId, scan);
        else if (!quarantine.has(quarantineKey(packId, scan.damage.offset))) problem({ code: 'PACK_DAMAGED', message: `pack ${packId} is damaged at offset ${scan.damage.offset}: ${scan.damage.why}`, pack: packId, packOffset: scan.damage.offset });
      }
      // A pack sealed by a writer that died before its index batch: nothing can reach its blobs.
      if (named === 0 && !scan.damage) {
        report.garbage.unindexedPacks.push(packId);
        report.garbage.unindexedBytes += scan.size;
      }
      if (readPacks.has(packId) && pool && scan.frames.length > 0) {
        // One pack per worker at a time: the main thread scans the next pack while the workers hash.
        while (packChecks.size >= pool.workers) {
          await Promise.race(packChecks);
          interruption.check();
        }
        const check = pool
          .verifyPack({ packPath: packPath(repo.root, packId), frames: scan.frames.map((f) => ({ offset: f.offset, length: f.length })) })
          .then(
            ({ bad }) => {
              report.bytesChecked += scan.size;
              for (const { offset, why } of bad) {
                if (quarantine.has(quarantineKey(packId, offset))) continue;
                const frame = scan.frames.find((f) => f.offset === offset)!;
                const blob = frame.header.id.toString('hex');
                const found: VerifyProblem = { code: 'FRAME_DAMAGED', message: `pack ${packId} offset ${offset} (blob ${blob.slice(0, 16)}…): ${why}`, pack: packId, packOffset: offset, blob };
                damagedBlobs.set(blob, found);
                problem(found);
              }
            },
            (error: unknown) => {
              // The check itself failed (a worker died): the pack was not verified, which is a problem too.
              damagedPacks.add(packId);
              problem({ code: 'PACK_DAMAGED', message: `pack ${packId} could not be checked: ${(error as Error).message}`, pack: packId });
            },
          );
        packChecks.add(check);
        void check.then(
          () => packChecks.delete(check),
          () => packChecks.delete(check),
        );
      }
    }
    while (packChecks.size > 0) {
      await Promise.race(packChecks);
      interruption.check();
    }

    // 2. Index: every entry must point at its frame. Counted cheaply above; located only if the count is
    // off. Entries naming a pack that is gone are summed up per pack.
    const missingPacks = new MissingPacks();
    let indexEntries = 0;
    const namedBadHeaders = new Set<string>();
    for await (const entry of repo.index.blobs()) {
      await interruption.tick();
      indexEntries += 1;
      if (badHeaders.has(entry.packId)) namedBadHeaders.add(entry.packId);
    }
    report.blobs = indexEntries;
    for (const [packId, scan] of badHeaders) {
      const notAPack = namedBadHeaders.has(packId) ? undefined : foreignPackWarning(packId, scan);
      if (notAPack) report.warnings.push(notAPack);
      else if (!quarantine.has(quarantineKey(packId, 0))) problem({ code: 'PACK_DAMAGED', message: `pack ${packId} is damaged at offset 0: ${scan.damage!.why}`, pack: packId, packOffset: 0 });
    }
    if (confirmedEntries !== indexEntries || damagedPacks.size > 0) {
      await checkIndexEntries(repo, packSizes, damagedPacks, interruption, missingPacks, (found) => {
        // Any entry that cannot deliver its blob makes the chunk damaged for every backup that uses it.
        if (found.blob) damagedBlobs.set(found.blob, found);
        problem(found);
      });
    }

    // 3. Backups: records, map pages, chunk references.
    const referenced = new IdPrefixSet();
    const { backups, damaged } = await repo.listBackups();
    for (const { id, error } of damaged) problem(await damagedRecordProblem(repo, id, error));
    for (const found of recordConsistencyProblems(backups)) problem(found);
    report.backups = backups.length;
    await walkReferences(
      repo,
      backups,
      {
        page: (id, { backup, disk }) => {
          referenced.add(id);
          missingPacks.noteReference(id.toString('hex'), backup, disk, null);
        },
        chunk: ({ backup, disk, offset, length, id, location }) => {
          const hex = id.toString('hex');
          const lostWith = missingPacks.packOf(hex);
          if (lostWith !== undefined) {
            missingPacks.noteReference(hex, backup, disk, offset);
            referenced.add(id);
            problem({ code: 'CHUNK_DAMAGED', message: `backup ${backup}, disk ${disk}, offset ${offset}: chunk ${hex.slice(0, 16)}… is lost: its pack ${lostWith} is missing`, backup, disk, offset, blob: hex, pack: lostWith });
            return;
          }
          const where = { backup, disk, offset, blob: hex };
          const prefix = `backup ${backup}, disk ${disk}, offset ${offset}: chunk ${hex.slice(0, 16)}…`;
          if (location) {
            referenced.add(id);
            // Whatever kind of frame holds it (ids name content, not roles: SPEC.md 8), a chunk is the block's length.
            if (location.rawLength !== length) problem({ code: 'CHUNK_DAMAGED', message: `${prefix} holds ${location.rawLength} bytes, the block needs ${length}`, ...where, pack: location.packId, packOffset: location.offset });
          } else {
            const known = quarantinedBlobs.get(hex);
            if (known) problem({ code: 'CHUNK_DAMAGED', message: `${prefix} is damaged (quarantined by repair: pack ${known.pack} offset ${known.offset}: ${known.why}); the next backup of a source that still holds this block stores a good copy`, ...where, pack: known.pack, packOffset: known.offset });
            else problem({ code: 'CHUNK_MISSING', message: `${prefix} is missing`, ...where });
          }
          const damage = damagedBlobs.get(hex);
          if (damage) problem({ code: 'CHUNK_DAMAGED', message: `${prefix} is damaged (${damage.message})`, ...where, ...(damage.pack ? { pack: damage.pack } : {}) });
        },
        mapDamaged: (backup, disk, error) => problem({ code: 'MAP_DAMAGED', message: `backup ${backup}, disk ${disk}: ${error.message}`, backup, disk }),
      },
      { onRecord: (n) => options.onProgress?.({ phase: 'checking backups', done: n, total: backups.length }), interruption },
    );
    // One problem per missing pack, naming every backup that lost data with it: never cut by the limit.
    report.problems.unshift(...missingPacks.problems());
    report.garbage.unreferencedBlobs = 0;
    report.garbage.unreferencedBytes = 0;
    for await (const entry of repo.index.blobs()) {
      await interruption.tick();
      if (!referenced.has(entry.id)) {
        report.garbage.unreferencedBlobs += 1;
        report.garbage.unreferencedBytes += entry.length;
      }
    }
    report.ok = report.problems.length === 0;
    return report;
  } finally {
    await pool?.close().catch(() => undefined);
    await repo.close();
  }
}

/**
 * Reads the frame behind each index entry (only when the cheap count in step 1 disagrees, or a pack's
 * frame chain is broken): entries that point at nothing or at another blob are reported; in a damaged
 * pack every indexed frame is opened and checked in full, since the scan could not reach past the damage.
 */
async function checkIndexEntries(
  repo: Repository,
  packSizes: Map<string, number>,
  damagedPacks: Set<string>,
  interruption: Interruption,
  missingPacks: MissingPacks,
  problem: (p: VerifyProblem) => void,
): Promise<void> {
  for await (const entry of repo.index.blobs()) {
    await interruption.tick();
    const blob = entry.id.toString('hex');
    const size = packSizes.get(entry.packId);
    const base = { code: 'INDEX_ENTRY_BAD', pack: entry.packId, packOffset: entry.offset, blob };
    if (size === undefined) {
      missingPacks.noteEntry(entry.packId, blob);
      continue;
    }
    // The length sizes the read below: an index entry never names a frame larger than any frame can be.
    if (entry.length < FRAME_OVERHEAD || entry.length > MAX_FRAME_LENGTH) {
      problem({ ...base, message: `index entry for blob ${blob.slice(0, 16)}… gives an impossible frame length ${entry.length}` });
      continue;
    }
    if (entry.offset + entry.length > size) {
      problem({ ...base, message: `index entry for blob ${blob.slice(0, 16)}… runs past the end of pack ${entry.packId}` });
      continue;
    }
    const wanted = damagedPacks.has(entry.packId) ? entry.length : FRAME_HEADER_SIZE;
    const bytes = Buffer.alloc(wanted);
    const handle = await open(packPath(repo.root, entry.packId), 'r');
    try {
      await handle.read(bytes, 0, wanted, entry.offset);
    } finally {
      await handle.close();
    }
    const decoded = decodeFrameHeader(bytes, 0, repo.encrypted);
    if (typeof decoded === 'string' || !decoded.id.equals(entry.id)) {
      problem({ ...base, message: `index entry for blob ${blob.slice(0, 16)}… does not point at that blob in pack ${entry.packId}` });
      continue;
    }
    if (frameLength(decoded.storedLength) !== entry.length || decoded.rawLength !== entry.rawLength || decoded.kind !== entry.kind || decoded.flags !== entry.flags) {
      problem({ ...base, message: `index entry for blob ${blob.slice(0, 16)}… disagrees with its frame in pack ${entry.packId} (length, raw length, kind or flags)` });
      continue;
    }
    if (wanted === entry.length) {
      const opened = openBlob(bytes, entry.id, repo.keys);
      if (typeof opened === 'string') {
        problem({ code: 'FRAME_DAMAGED', message: `pack ${entry.packId} offset ${entry.offset} (blob ${blob.slice(0, 16)}…): ${opened}`, pack: entry.packId, packOffset: entry.offset, blob });
      }
    }
  }
}

/** The packs whose data a --subset run reads: the first ceil(f × n) in the order of SHA-256(seed || pack id). */
function choosePacks(packIds: readonly string[], fraction: number | undefined, seed: string | undefined): Set<string> & { seed: string } {
  const chosenSeed = seed ?? randomBytes(8).toString('hex');
  const count = fraction === undefined ? packIds.length : Math.ceil(fraction * packIds.length);
  const order = packIds
    .map((id) => ({ id, key: createHash('sha256').update(chosenSeed).update(id).digest('hex') }))
    .sort((a, b) => a.key.localeCompare(b.key));
  return Object.assign(new Set(order.slice(0, count).map((p) => p.id)), { seed: chosenSeed });
}
