/**
 * Backup records: one JSON file per backup in backups/<id>, written once (durable-file.ts, exclusive)
 * as the last step of a backup. Its presence is what makes a backup exist. See SPEC.md, "Backup record".
 */
import { ID_SIZE, MAX_DISK_SIZE } from './constants.js';
import { CorruptMetadataError } from './errors.js';
import { displayText, storedDiskNameProblem } from './names.js';
import { mapDepth, type MapRoot } from './block-map.js';
import { blockCount } from './disk-geometry.js';

export type BackupType = 'full' | 'incremental' | 'differential';

export interface DiskStats {
  /** Bytes read from the source for this disk. */
  bytesRead: number;
  /** Raw bytes of chunks that were not in the repository before this backup. */
  bytesNew: number;
  /** Bytes this disk's new chunks added to pack files (compressed payload plus frame overhead). */
  bytesStored: number;
  blocksTotal: number;
  blocksZero: number;
  blocksNew: number;
  blocksDeduplicated: number;
  /** Blocks not read: clean according to changed-block tracking, taken from the parent's map. */
  blocksUnchanged: number;
  durationMs: number;
}

/** Changed-block tracking state of a disk after a backup (SPEC.md, "Chains"). */
export interface DiskCbt {
  /** The checkpoint (dirty bitmap) this backup started: writes after this backup are recorded in it. */
  checkpoint: string;
  /** The checkpoint the dirty blocks were read against (null for a full read). */
  base: string | null;
  /** The full backup that started this chain, and its checkpoint (what a differential reads against). */
  chainFull: string;
  chainCheckpoint: string;
  /** Bytes per bitmap bit. */
  granularity: number;
  /** Clean blocks re-read and found identical to the parent (the CBT audit); 0 for a full read. */
  audited: number;
}

export interface DiskRecord {
  name: string;
  size: number;
  /** `realPath`: a local source's absolute path, symlinks resolved (recorded since restore compares targets with it). */
  source: { kind: string; path: string; realPath?: string };
  /** What was done for this disk, whatever was asked. */
  mode: BackupType;
  /** Why a full read happened when an incremental or differential was asked; null otherwise. */
  modeReason: string | null;
  /** The backup whose map gave this disk's unchanged blocks; null for a full read. */
  parent: string | null;
  cbt: DiskCbt | null;
  map: { root: string; depth: number; blocks: number };
  stats: DiskStats;
}

/** A document kept with a backup (e.g. the VM's configuration, to recreate it on restore). */
export interface RecordAttachment {
  name: string;
  mediaType: string;
  data: string;
}

/**
 * How consistent the guest's disks were at the backup's point in time (SPEC.md 9), and how that was established.
 * `filesystem`: the guest's file systems were frozen (its agent's fsfreeze) around the point in time;
 * `application`: also the applications, through hooks or the guest's own freeze hooks (VSS); `crash`: as after
 * a power cut. A record without it (older engines) is `crash`, not recorded.
 */
export interface Consistency {
  level: 'application' | 'filesystem' | 'crash';
  /** How it was established, e.g. "qemu-guest-agent fsfreeze", "no quiesce asked". */
  method: string;
  /** How long the guest's file systems were frozen, in milliseconds; null when they were not. */
  freezeMs: number | null;
  /** Why a quiesce asked as `try` fell back to crash consistency; null otherwise. */
  reason: string | null;
}

/** What a backup that froze nothing records. */
export const NO_QUIESCE: Consistency = { level: 'crash', method: 'no quiesce asked', freezeMs: null, reason: null };

export interface BackupRecord {
  version: 1;
  id: string;
  name: string;
  type: BackupType;
  parent: string | null;
  startTime: string;
  endTime: string;
  hostname: string;
  engineVersion: string;
  blockSize: number;
  disks: DiskRecord[];
  attachments: RecordAttachment[];
  /** Absent in records of older engines (read as crash consistency, not recorded). */
  consistency?: Consistency;
  /** Set by `engine copy` (SPEC.md 9, 22): the backup this record is a copy of; absent in every other record. */
  copiedFrom?: CopiedFrom;
}

/**
 * Where a copied backup came from: the repository id (config `id`) and backup id of the backup as first
 * made. A copy of a copy keeps the original's, so that the identity is one whatever path the copies took.
 */
export interface CopiedFrom {
  repository: string;
  backup: string;
}

function copiedFromProblem(value: unknown): string | undefined {
  if (typeof value !== 'object' || value === null) return 'copiedFrom is not an object';
  const c = value as Record<string, unknown>;
  if (!isText(c.repository) || !/^[0-9a-f]{32}$/.test(c.repository)) return 'copiedFrom has no valid repository id';
  if (!isText(c.backup) || !/^[0-9a-f]{32}$/.test(c.backup)) return 'copiedFrom has no valid backup id';
  return undefined;
}

export function mapRootOf(disk: DiskRecord): MapRoot {
  return { root: Buffer.from(disk.map.root, 'hex'), depth: disk.map.depth, blocks: disk.map.blocks };
}

export function encodeBackupRecord(record: BackupRecord): Buffer {
  return Buffer.from(`${JSON.stringify(record, null, 2)}\n`, 'utf8');
}


const isCount = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
const isText = (v: unknown): v is string => typeof v === 'string';
/** `YYYY-MM-DDTHH:MM:SS[.fraction]Z`, a real instant: what toISOString writes (SPEC.md, section 9). */
const isUtcTime = (v: string): boolean => /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$/.test(v) && !Number.isNaN(Date.parse(v));

function checkDisk(disk: unknown, blockSize: number): string | undefined {
  if (typeof disk !== 'object' || disk === null) return 'a disk entry is not an object';
  const d = disk as Record<string, unknown>;
  if (!isText(d.name)) return 'a disk has no name';
  // The reader's rule (names.ts): what older engines wrote is read, whatever the writer's rule says now.
  const nameProblem = storedDiskNameProblem(d.name);
  if (nameProblem) return `disk name "${displayText(d.name, 64)}" is not allowed: ${nameProblem}`;
  if (!isCount(d.size)) return `disk ${d.name} has no valid size`;
  const source = d.source as Record<string, unknown> | undefined;
  if (!source || !isText(source.kind) || !isText(source.path)) return `disk ${d.name} has no source`;
  const map = d.map as Record<string, unknown> | undefined;
  if (!map || !isText(map.root) || map.root.length !== ID_SIZE * 2 || !/^[0-9a-f]+$/.test(map.root)) return `disk ${d.name} has no valid map root`;
  if (!isCount(map.depth) || !isCount(map.blocks)) return `disk ${d.name} has no valid map shape`;
  // Bounds before anything is planned from the size: no reader sizes work or memory past what a disk can be.
  if (d.size > MAX_DISK_SIZE) return `disk ${d.name} has ${d.size} bytes, more than the ${MAX_DISK_SIZE} (1 PiB) a disk may have`;
  if (map.blocks !== blockCount(d.size, blockSize)) return `disk ${d.name}: ${map.blocks} map blocks do not cover ${d.size} bytes`;
  if (map.depth !== mapDepth(map.blocks)) return `disk ${d.name}: a map of ${map.blocks} blocks has depth ${mapDepth(map.blocks)}, not ${map.depth}`;
  if (map.blocks === 0 && !/^0+$/.test(map.root)) return `disk ${d.name}: an empty disk's map root must be the zero id`;
  if (d.mode !== 'full' && d.mode !== 'incremental' && d.mode !== 'differential') return `disk ${d.name} has no valid mode`;
  if (d.modeReason !== null && !isText(d.modeReason)) return `disk ${d.name} has an invalid mode reason`;
  if (d.parent !== null && !(isText(d.parent) && /^[0-9a-f]{32}$/.test(d.parent))) return `disk ${d.name} has an invalid parent`;
  if ((d.mode === 'full') !== (d.parent === null)) return `disk ${d.name}: a ${d.mode} read ${d.parent === null ? 'without' : 'with'} a parent`;
  if (d.cbt !== null) {
    const c = d.cbt as Record<string, unknown> | undefined;
    if (!c || !isText(c.checkpoint) || !(c.base === null || isText(c.base)) || !isText(c.chainFull) || !isText(c.chainCheckpoint) || !isCount(c.granularity) || !isCount(c.audited)) {
      return `disk ${d.name} has invalid changed-block tracking state`;
    }
  }
  const stats = d.stats as Record<string, unknown> | undefined;
  if (!stats) return `disk ${d.name} has no statistics`;
  for (const key of ['bytesRead', 'bytesNew', 'bytesStored', 'blocksTotal', 'blocksZero', 'blocksNew', 'blocksDeduplicated', 'blocksUnchanged', 'durationMs']) {
    if (!isCount(stats[key])) return `disk ${d.name} statistic ${key} is not a count`;
  }
  return undefined;
}

function consistencyProblem(value: unknown): string | undefined {
  if (typeof value !== 'object' || value === null) return 'consistency is not an object';
  const c = value as Record<string, unknown>;
  if (c.level !== 'application' && c.level !== 'filesystem' && c.level !== 'crash') return `unknown consistency level ${String(c.level)}`;
  if (!isText(c.method)) return 'consistency has no method';
  if (c.freezeMs !== null && !isCount(c.freezeMs)) return 'consistency freezeMs is neither null nor a count';
  if (c.reason !== null && !isText(c.reason)) return 'consistency reason is neither null nor text';
  return undefined;
}

export function decodeBackupRecord(bytes: Buffer, where: string): BackupRecord {
  let value: unknown;
  try {
    value = JSON.parse(bytes.toString('utf8'));
  } catch {
    throw new CorruptMetadataError(where, 'not valid JSON');
  }
  const fail = (why: string): never => {
    throw new CorruptMetadataError(where, why);
  };
  if (typeof value !== 'object' || value === null) return fail('not an object');
  const r = value as Record<string, unknown>;
  if (r.version !== 1) fail(`unknown record version ${String(r.version)}`);
  if (!isText(r.id) || !/^[0-9a-f]{32}$/.test(r.id)) fail('no valid id');
  if (!isText(r.name)) fail('no name');
  if (r.type !== 'full' && r.type !== 'incremental' && r.type !== 'differential') fail(`unknown type ${String(r.type)}`);
  if (r.parent !== null && !(isText(r.parent) && /^[0-9a-f]{32}$/.test(r.parent))) fail('parent is neither null nor an id');
  for (const key of ['startTime', 'endTime', 'hostname', 'engineVersion']) if (!isText(r[key])) fail(`no ${key}`);
  for (const key of ['startTime', 'endTime']) if (!isUtcTime(r[key] as string)) fail(`${key} is not an ISO 8601 UTC time`);
  if (!isCount(r.blockSize) || r.blockSize === 0) fail('no block size');
  if (!Array.isArray(r.disks) || r.disks.length === 0) fail('no disk list');
  if (!Array.isArray(r.attachments)) fail('no attachment list');
  for (const a of r.attachments as unknown[]) {
    const x = a as Record<string, unknown> | null;
    if (!x || !isText(x.name) || x.name.length === 0 || !isText(x.mediaType) || !isText(x.data)) fail('an attachment lacks a name, media type or data');
  }
  if (r.consistency !== undefined) {
    const problem = consistencyProblem(r.consistency);
    if (problem) fail(problem);
  }
  if (r.copiedFrom !== undefined) {
    const problem = copiedFromProblem(r.copiedFrom);
    if (problem) fail(problem);
  }
  const names = new Set<string>();
  for (const disk of r.disks as unknown[]) {
    const problem = checkDisk(disk, r.blockSize as number);
    if (problem) fail(problem);
    const name = (disk as DiskRecord).name;
    if (names.has(name)) fail(`two disks are named ${JSON.stringify(name)}`);
    names.add(name);
  }
  return value as BackupRecord;
}
