/**
 * Which disk of a backup goes where, and how its blocks are written, decided before anything is written:
 *
 *   planTargets     pure: the request (target, disk, rollback) and what is at the target path → a TargetPlan
 *   guardTargets    every local path checked (write-guard.ts): never inside a repository, never over the
 *                   backup's own source unless forced or rolled back
 *   checkExisting   pure: a same-named file in the directory restored into is somebody's data (only `force`
 *                   overwrites it); a rollback needs targets that exist
 *   createDirectory a directory target that does not exist yet (reported; removed again if the restore fails)
 */
import { rmdir, stat } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { ensurePrivateDirectory } from '../../repo-format/file-modes.js';
import { diskFileName, nameMatches } from '../../repo-format/names.js';
import type { BackupRecord, DiskRecord } from '../../repo-format/backup-record.js';
import { DiskNotFoundError, TargetHoldsDataError, TargetUnwritableError, withRemedies } from '../errors.js';
import { refuseBackupSource, refuseInsideRepository } from '../host/write-guard.js';
import { targetName, type LocalTarget, type RestoreTarget, type RollbackPolicy } from './request.js';
import type { TargetWriter } from './target-writer.js';

/** What is at a local path, as far as planning is concerned. */
export type PathKind = 'missing' | 'directory' | 'file' | 'device' | 'other';

/** What is at the paths a plan looks at (the target path, and the disks' files in a directory target). */
export type PathFacts = (path: string) => PathKind;

/** How a planned target is opened. */
export type Opening =
  /** A local file or block device; `blank`: known to read as zeros, nothing on it to protect. */
  | { kind: 'local'; path: string; blank: boolean }
  | { kind: 'nbd'; uri: string }
  | { kind: 'qcow2'; path: string }
  | { kind: 'custom'; describe: string; open: (disk: DiskRecord) => Promise<TargetWriter> };

export interface PlannedTarget {
  disk: DiskRecord;
  opening: Opening;
  /** What is at a local target's path before the restore ('missing' for the other kinds). */
  existing: PathKind;
}

/** How the blocks are written: all of them, or a rollback of an existing target. */
export type WriteMode = { kind: 'all' } | RollbackPolicy;

export interface TargetPlan {
  targets: PlannedTarget[];
  write: WriteMode;
  force: boolean;
  /** The directory the disks go into (a directory target), `create` when this restore makes it; else null. */
  directory: { path: string; create: boolean } | null;
}

export interface PlanRequest {
  target: RestoreTarget;
  /** The disk to restore; omitted: the backup's only disk, or every disk into a directory. */
  disk?: string | undefined;
  rollback?: RollbackPolicy | undefined;
  force: boolean;
}

function findDisk(record: BackupRecord, name: string): DiskRecord {
  const found = record.disks.find((d) => nameMatches(d.name, name));
  if (!found) throw new DiskNotFoundError(record.id, name, record.disks.map((d) => d.name));
  return found;
}

/** The one disk a single-disk target takes: the one named, or the backup's only disk. */
function singleDisk(record: BackupRecord, disk: string | undefined, into: string): DiskRecord {
  if (disk !== undefined) return findDisk(record, disk);
  if (record.disks.length !== 1) throw new InvalidArgumentError(`backup ${record.id} has ${record.disks.length} disks`, withRemedies({ backup: record.id }, { kind: 'choose-disk', into }));
  return record.disks[0]!;
}

/** Rollback policies a target cannot take, refused before anything is opened. */
export function checkPolicies(target: RestoreTarget, rollback: RollbackPolicy | undefined): void {
  if (rollback === undefined) return;
  if (target.kind === 'qcow2') throw new InvalidArgumentError('a rollback writes over an existing target; a qcow2 target is a new image');
  if (rollback.kind === 'bitmap' && target.kind !== 'nbd') {
    throw new InvalidArgumentError(`a rollback through dirty bitmap ${rollback.bitmap} needs an NBD target exporting it (e.g. qemu-nbd -B ${rollback.bitmap})`);
  }
}

/** Plans a restore: pure, from the request and `facts` (what is at the local paths). */
export function planTargets(record: BackupRecord, request: PlanRequest, facts: PathFacts): TargetPlan {
  checkPolicies(request.target, request.rollback);
  const base = { write: request.rollback ?? { kind: 'all' as const }, force: request.force };
  const target = request.target;
  const single = (opening: Opening): TargetPlan => ({ ...base, targets: [{ disk: singleDisk(record, request.disk, targetName(target)), opening, existing: 'missing' }], directory: null });
  switch (target.kind) {
    case 'nbd':
      return single({ kind: 'nbd', uri: target.uri });
    case 'qcow2':
      return single({ kind: 'qcow2', path: target.path });
    case 'custom': {
      const disks = record.disks.filter((d) => request.disk === undefined || nameMatches(d.name, request.disk));
      if (disks.length === 0) throw new DiskNotFoundError(record.id, request.disk ?? '', record.disks.map((d) => d.name));
      return { ...base, targets: disks.map((disk) => ({ disk, opening: { kind: 'custom', describe: target.describe, open: target.open }, existing: 'missing' })), directory: null };
    }
    default:
      return { ...base, ...planLocal(record, target, request.disk, facts) };
  }
}

/** Whether a local target takes the disks into a directory, by its kind and what is at its path. */
function intoDirectory(record: BackupRecord, target: LocalTarget, disk: string | undefined, found: PathKind): boolean {
  const refuse = (why: string): never => {
    throw new TargetUnwritableError(target.path, why);
  };
  switch (target.kind) {
    case 'directory':
      if (found !== 'directory' && found !== 'missing') refuse('it exists and is not a directory');
      return true;
    case 'file':
      if (found !== 'file' && found !== 'missing') refuse(`it is ${found === 'device' ? 'a block device' : found === 'directory' ? 'a directory' : 'neither a file nor missing'}, not a file`);
      return false;
    case 'device':
      if (found === 'missing') refuse('it does not exist, and a device target is never created');
      if (found !== 'device' && found !== 'file') refuse('it is neither a block device nor a file standing for one');
      return false;
    default:
      if (disk !== undefined) return found === 'directory';
      if (record.disks.length === 1 && found !== 'directory') return false;
      if (record.disks.length > 1 && found !== 'missing' && found !== 'directory') {
        throw new InvalidArgumentError(`backup ${record.id} has ${record.disks.length} disks`, withRemedies({ backup: record.id }, { kind: 'choose-disk', otherwise: 'into-directory' }));
      }
      return true;
  }
}

/** A local target: one file or device, or one file per disk in a directory. */
function planLocal(record: BackupRecord, target: LocalTarget, disk: string | undefined, facts: PathFacts): Pick<TargetPlan, 'targets' | 'directory'> {
  const found = facts(target.path);
  const blank = target.kind === 'device' && target.blank === true;
  if (!intoDirectory(record, target, disk, found)) {
    return { targets: [{ disk: singleDisk(record, disk, target.path), opening: { kind: 'local', path: target.path, blank }, existing: found }], directory: null };
  }
  const disks = disk !== undefined ? [findDisk(record, disk)] : record.disks;
  // One file per disk, named after it (for a name older engines allowed, its safe form: names.ts).
  const files = disks.map((d) => diskFileName(d.name));
  if (new Set(files).size !== files.length) {
    throw new InvalidArgumentError(`backup ${record.id}: two disks would be restored to the same file name`, withRemedies({ backup: record.id }, { kind: 'choose-disk', otherwise: 'one-by-one' }));
  }
  const targets = disks.map((d, i): PlannedTarget => {
    const path = join(target.path, files[i]!);
    return { disk: d, opening: { kind: 'local', path, blank: false }, existing: facts(path) };
  });
  return { targets, directory: { path: resolve(target.path), create: found === 'missing' } };
}

/** Refuses what no restore writes (write-guard.ts): a path inside a repository, the backup's own source unless forced. */
export async function guardTargets(plan: TargetPlan, record: BackupRecord, target: RestoreTarget, repository: string): Promise<void> {
  if (target.kind === 'qcow2') return refuseInsideRepository(target.path, 'restore target', repository);
  if (target.kind === 'nbd' || target.kind === 'custom') return;
  await refuseInsideRepository(target.path, 'restore target', repository);
  for (const { opening } of plan.targets) {
    if (opening.kind !== 'local') continue;
    await refuseInsideRepository(opening.path, 'restore target', repository);
    // A target the caller just created (a blank device: oVirt's new disks) is not the source it may share a
    // path with (a new disk with the original's id appears under the same /dev/disk/by-id name).
    await refuseBackupSource(opening.path, record, { force: plan.force || opening.blank, rollback: plan.write.kind !== 'all' });
  }
}

/**
 * What is already there, judged once the paths are known to be writable at all: a same-named file in the
 * directory restored into is somebody's data, not a target the caller named (a rollback of it is what a
 * rollback is for); a rollback writes over existing targets only.
 */
export function checkExisting(plan: TargetPlan): void {
  const rollback = plan.write.kind !== 'all';
  if (rollback && plan.directory?.create) throw new InvalidArgumentError(`a rollback writes over existing targets; directory ${plan.directory.path} does not exist`);
  for (const { disk, opening, existing } of plan.targets) {
    if (opening.kind !== 'local') continue;
    if (rollback && existing === 'missing') throw new InvalidArgumentError(`a rollback writes over an existing target; ${opening.path} does not exist`);
    if (plan.directory !== null && !plan.force && !rollback && existing !== 'missing') {
      throw new TargetHoldsDataError(opening.path, `a file of the same name as disk ${disk.name} (restoring into directory ${plan.directory.path})`);
    }
  }
}

/** What is at `path`; a path that cannot be looked at counts as missing (opening it then says why). */
async function kindOf(path: string): Promise<PathKind> {
  return stat(path).then(
    (s) => (s.isDirectory() ? 'directory' : s.isFile() ? 'file' : s.isBlockDevice() ? 'device' : 'other'),
    () => 'missing',
  );
}

/** The facts a plan of `target` needs: its path, and each disk's file under it. */
export async function gatherFacts(record: BackupRecord, target: RestoreTarget): Promise<PathFacts> {
  const kinds = new Map<string, PathKind>();
  if (target.kind === 'path' || target.kind === 'file' || target.kind === 'device' || target.kind === 'directory') {
    kinds.set(target.path, await kindOf(target.path));
    for (const disk of record.disks) {
      const path = join(target.path, diskFileName(disk.name));
      kinds.set(path, await kindOf(path));
    }
  }
  return (path) => kinds.get(path) ?? 'missing';
}

/** A directory this restore created: the outermost directory mkdir made for it, for removeCreatedDirectory. */
export interface CreatedDirectory {
  path: string;
  from: string | undefined;
}

export async function createDirectory(plan: TargetPlan): Promise<CreatedDirectory | null> {
  if (!plan.directory?.create) return null;
  return { path: plan.directory.path, from: await ensurePrivateDirectory(plan.directory.path) };
}

/** Removes the directories a failed restore created, if nothing else was put in them meanwhile. */
export async function removeCreatedDirectory(created: CreatedDirectory): Promise<void> {
  const outermost = resolve(created.from ?? created.path);
  for (let dir = created.path; dir.startsWith(outermost); dir = dirname(dir)) {
    if (!(await rmdir(dir).then(() => true, () => false)) || dir === outermost) return;
  }
}
