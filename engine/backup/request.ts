/**
 * What a backup is asked to read, as typed objects: the disks (BackupFrom) and how their chains continue
 * (ChainPolicy). The CLI translates its flags into these (cli/commands/backup-request.ts); library callers
 * and the oVirt flows build them.
 */
import type { CbtProvision, ChainArgs, RequestedMode } from '../cbt/chain.js';
import type { QuiesceRequest } from '../cbt/guest-quiesce.js';

export type { QuiesceRequest } from '../cbt/guest-quiesce.js';

/** One disk of a backup, as the caller names it; `name` defaults to its file name (or NBD export name). */
export type BackupDisk =
  /** A raw image file or a block device, read whole (no changed-block tracking). */
  | { kind: 'raw'; path: string; name?: string | undefined }
  /** An NBD export (nbd://, nbd+unix://, nbds://…), read whole; its holes and zero extents are skipped. */
  | { kind: 'nbd'; uri: string; name?: string | undefined }
  /**
   * A qcow2 image of a stopped VM: incremental and differential backups from its dirty bitmaps, which the
   * engine manages; its chain follows the image's own bitmaps, not its file name.
   */
  | { kind: 'image'; path: string; name?: string | undefined };

/** What a backup reads. */
export type BackupFrom =
  /** The disks named, in this order. */
  | { kind: 'disks'; disks: readonly BackupDisk[] }
  /** Every disk of a running libvirt domain, named after its target (vda, sdb…), through checkpoints and a pull-mode backup. */
  | {
      kind: 'libvirt';
      domain: string;
      /** Freeze the guest's file systems through its QEMU guest agent around the checkpoint (SPEC.md 11.2); default: not (crash-consistent). */
      quiesce?: QuiesceRequest | undefined;
    }
  /**
   * Disks prepared by a flow of its own (e.g. oVirt's backup API), given what it needs to decide each disk's
   * chain. Its session is released after its last disk, finished after the commit, rolled back on failure. A
   * deferred disk is prepared (its source opened, its chain settled) right before it is read.
   */
  | { kind: 'provider'; provide: (args: ChainArgs) => Promise<CbtProvision> };

/**
 * How the chains continue. `auto` (the default): incremental where a valid chain exists, full otherwise;
 * `full`: every disk read whole, a new chain; `incremental`: the blocks changed since the previous backup;
 * `differential`: since the chain's full backup. Disks without changed-block tracking are read whole.
 */
export interface ChainPolicy {
  mode: RequestedMode;
}

/** A disk's source as given: its path or URI (what a default name and a message say). */
export function diskSpec(disk: BackupDisk): string {
  return disk.kind === 'nbd' ? disk.uri : disk.path;
}
