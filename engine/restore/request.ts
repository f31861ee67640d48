/**
 * What a restore is asked to do, as typed objects: where the disks go (RestoreTarget), whether an existing
 * target is rolled back rather than overwritten (RollbackPolicy), and what may be overwritten (WritePolicy).
 * The CLI translates its flags into these (cli/commands/restore-request.ts); library callers build them.
 */
import type { DiskRecord } from '../../repo-format/backup-record.js';
import type { TargetWriter } from './target-writer.js';

export type RestoreTarget =
  /**
   * Whatever is at `path` decides: a new sparse file, an existing file or block device, or a directory
   * (every disk into it, or the one named); a new path of a backup with several disks becomes a directory.
   */
  | { kind: 'path'; path: string }
  /** A regular file: created sparse when missing, overwritten when it exists; never a block device or a directory. */
  | { kind: 'file'; path: string }
  /**
   * An existing disk overwritten in place: a block device (or an existing file standing for one, such as a
   * FUSE export); never created. `blank`: the caller has just created it, so it reads as zeros (zero blocks
   * are skipped) and holds nothing to protect (neither data nor the backup's source is looked for on it).
   */
  | { kind: 'device'; path: string; blank?: boolean | undefined }
  /** One file per disk (or for the one named) in this directory, named after the disk; created when missing. */
  | { kind: 'directory'; path: string }
  /** An existing NBD export (nbd://, nbd+unix://, nbds://…), at least as large as the disk. */
  | { kind: 'nbd'; uri: string }
  /** A new qcow2 image, created at the disk's size and written through the engine's qemu-nbd; never overwritten. */
  | { kind: 'qcow2'; path: string }
  /** A target of the caller's own (e.g. an oVirt imageio upload), opened per disk; `describe` names it in messages. */
  | { kind: 'custom'; describe: string; open: (disk: DiskRecord) => Promise<TargetWriter> };

/**
 * A rollback writes over an existing target only what differs from the restore point. `compare`: every
 * block of the target is read back and hashed, and the blocks that differ are written. `bitmap`: an NBD
 * target exports this dirty bitmap, the checkpoint of a backup of this disk; the dirty blocks and the blocks
 * that changed between that backup and the restore point are written, nothing is read.
 */
export type RollbackPolicy = { kind: 'compare' } | { kind: 'bitmap'; bitmap: string };

/** What a restore may overwrite. */
export interface WritePolicy {
  /**
   * Overwrite what holds data: a block device with a filesystem, partition table or volume signature, a
   * same-named file in the directory restored into, the backup's own source.
   */
  force?: boolean | undefined;
}

/** The kinds of target that are paths on this host. */
export type LocalTarget = Extract<RestoreTarget, { kind: 'path' | 'file' | 'device' | 'directory' }>;

export function isLocalTarget(target: RestoreTarget): target is LocalTarget {
  return target.kind === 'path' || target.kind === 'file' || target.kind === 'device' || target.kind === 'directory';
}

/** The target's path or URI, for messages. */
export function targetName(target: RestoreTarget): string {
  if (target.kind === 'nbd') return target.uri;
  if (target.kind === 'custom') return target.describe;
  return target.path;
}
