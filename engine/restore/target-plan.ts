/**
 * Which disk of a backup goes where, decided before anything is written: one disk to a path, or every
 * disk into a directory (one file per disk, named after it). Every local path is checked first
 * (write-guard.ts): never inside a repository, never over the backup's own source unless forced; and an
 * existing file of a directory restore is overwritten only with --force (a same-named file there is
 * somebody's data, not a target the user named).
 */
import { rmdir, stat } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { ensurePrivateDirectory } from '../../repo-format/file-modes.js';
import { diskFileName, nameMatches } from '../../repo-format/names.js';
import type { BackupRecord, DiskRecord } from '../../repo-format/backup-record.js';
import { DiskNotFoundError, TargetHoldsDataError } from '../errors.js';
import { refuseBackupSource, refuseInsideRepository } from '../host/write-guard.js';

export interface PlannedTarget {
  disk: DiskRecord;
  path: string;
}

export interface TargetPlan {
  targets: PlannedTarget[];
  /** The directory this restore created for the disks (`--to NEW` of a backup with several disks), or null. */
  createdDirectory: string | null;
  /** The outermost directory mkdir created for it (the same, or a parent that did not exist either). */
  createdFrom?: string | undefined;
}

export interface PlanOptions {
  repo: string;
  disk?: string | undefined;
  to: string;
  force: boolean;
  rollback: boolean;
}

async function kindOf(path: string): Promise<'directory' | 'other' | 'missing'> {
  return stat(path).then(
    (s) => (s.isDirectory() ? 'directory' : 'other'),
    () => 'missing',
  );
}

function findDisk(record: BackupRecord, name: string): DiskRecord {
  const found = record.disks.find((d) => nameMatches(d.name, name));
  if (!found) throw new DiskNotFoundError(record.id, name, record.disks.map((d) => d.name));
  return found;
}

/** One target per disk for a single-target kind (NBD export, new qcow2): the backup must name one disk. */
export function singleDisk(record: BackupRecord, disk: string | undefined, what: string): DiskRecord[] {
  if (disk !== undefined) return [findDisk(record, disk)];
  if (record.disks.length !== 1) throw new InvalidArgumentError(`backup ${record.id} has ${record.disks.length} disks: name the one to restore into ${what} with --disk`);
  return [record.disks[0]!];
}

/** Checks a path this restore would write (repository, source); for local paths only. */
export async function guardPath(path: string, record: BackupRecord, options: { repo: string; force: boolean; rollback: boolean }): Promise<void> {
  await refuseInsideRepository(path, 'restore target', options.repo);
  await refuseBackupSource(path, record, { force: options.force, rollback: options.rollback });
}

/** Plans a restore to local paths; creates the directory of a multi-disk restore to a new path (reported). */
export async function planLocalTargets(record: BackupRecord, options: PlanOptions): Promise<TargetPlan> {
  const to = options.to;
  const toKind = await kindOf(to);
  let targets: PlannedTarget[];
  let intoDirectory: boolean;
  if (options.disk !== undefined) {
    const disk = findDisk(record, options.disk);
    intoDirectory = toKind === 'directory';
    targets = [{ disk, path: intoDirectory ? join(to, diskFileName(disk.name)) : to }];
  } else if (record.disks.length === 1 && toKind !== 'directory') {
    intoDirectory = false;
    targets = [{ disk: record.disks[0]!, path: to }];
  } else {
    if (record.disks.length > 1 && toKind === 'other') {
      throw new InvalidArgumentError(`backup ${record.id} has ${record.disks.length} disks: name one with --disk, or restore them all into a directory`);
    }
    intoDirectory = true;
    // One file per disk, named after it (for a name older engines allowed, its safe form: names.ts).
    const files = record.disks.map((d) => diskFileName(d.name));
    if (new Set(files).size !== files.length) throw new InvalidArgumentError(`backup ${record.id}: two disks would be restored to the same file name; restore them one by one with --disk NAME --to FILE`);
    targets = record.disks.map((d, i) => ({ disk: d, path: join(to, files[i]!) }));
  }
  await refuseInsideRepository(to, 'restore target', options.repo);
  for (const { path } of targets) {
    await guardPath(path, record, options);
    // A same-named file in a directory is somebody's data, not a target the user named (a rollback of
    // such a file is what --only-changed asks for).
    if (intoDirectory && !options.force && !options.rollback && (await kindOf(path)) !== 'missing') {
      throw new TargetHoldsDataError(path, `a file of the same name as disk ${targets.find((t) => t.path === path)!.disk.name} (restoring into directory ${to})`);
    }
  }
  if (intoDirectory && toKind === 'missing') {
    if (options.rollback) throw new InvalidArgumentError(`--only-changed rolls back existing targets; directory ${to} does not exist`);
    const createdFrom = await ensurePrivateDirectory(to);
    return { targets, createdDirectory: resolve(to), createdFrom };
  }
  return { targets, createdDirectory: null };
}

/** Removes the directories a failed restore created, if nothing else was put in them meanwhile. */
export async function removeCreatedDirectory(plan: TargetPlan): Promise<void> {
  if (plan.createdDirectory === null) return;
  const outermost = resolve(plan.createdFrom ?? plan.createdDirectory);
  for (let dir = plan.createdDirectory; dir.startsWith(outermost); dir = dirname(dir)) {
    if (!(await rmdir(dir).then(() => true, () => false)) || dir === outermost) return;
  }
}
