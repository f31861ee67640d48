/**
 * The restore command's flags as the engine's typed request (engine/restore/request.ts): the one place that
 * knows what --to, --to-qcow2, --only-changed, --since-bitmap and --force mean. Pure: a combination that
 * makes no sense is refused here, in the flags' own words (exit code 2), before anything is opened.
 */
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { checkLocalPath } from '../../repo-format/local-path.js';
import { isNbdUri } from '../../engine/nbd/uri.js';
import type { RestoreTarget, RollbackPolicy, WritePolicy } from '../../engine/restore/request.js';

export interface RestoreFlags {
  to?: string | undefined;
  toQcow2?: string | undefined;
  onlyChanged?: boolean | undefined;
  sinceBitmap?: string | undefined;
  force?: boolean | undefined;
}

export interface RestoreRequest {
  target: RestoreTarget;
  rollback: RollbackPolicy | undefined;
  write: WritePolicy;
}

export function restoreRequest(flags: RestoreFlags): RestoreRequest {
  if ((flags.to === undefined) === (flags.toQcow2 === undefined)) throw new InvalidArgumentError('give exactly one target: --to PATH|URI or --to-qcow2 FILE');
  if (flags.sinceBitmap !== undefined && !flags.onlyChanged) throw new InvalidArgumentError('--since-bitmap goes with --only-changed');
  if (flags.onlyChanged && flags.toQcow2 !== undefined) throw new InvalidArgumentError('--only-changed rolls back an existing target; --to-qcow2 creates a new one');
  if (flags.sinceBitmap !== undefined && !isNbdUri(flags.to ?? '')) {
    throw new InvalidArgumentError('--since-bitmap needs an NBD target (--to nbd+unix:///…?socket=… exporting the bitmap, e.g. qemu-nbd -B NAME)');
  }
  return { target: targetOf(flags), rollback: rollbackOf(flags), write: { force: flags.force === true } };
}

/** --to-qcow2 FILE, --to with an NBD URI, or --to PATH (what is there decides: file, device or directory). */
function targetOf(flags: RestoreFlags): RestoreTarget {
  if (flags.toQcow2 !== undefined) {
    checkLocalPath(flags.toQcow2, '--to-qcow2');
    return { kind: 'qcow2', path: flags.toQcow2 };
  }
  const to = flags.to!;
  if (isNbdUri(to)) return { kind: 'nbd', uri: to };
  checkLocalPath(to, '--to', 'nbd:// and nbd+unix:// URIs');
  return { kind: 'path', path: to };
}

function rollbackOf(flags: RestoreFlags): RollbackPolicy | undefined {
  if (!flags.onlyChanged) return undefined;
  return flags.sinceBitmap !== undefined ? { kind: 'bitmap', bitmap: flags.sinceBitmap } : { kind: 'compare' };
}

export interface OvirtRestoreFlags {
  newVm?: string | undefined;
  toVm?: string | undefined;
  disk?: string | undefined;
  appliance?: string | undefined;
  via?: string | undefined;
}

/** `restore --ovirt`: a new VM or an existing one, and how the disks are written. */
export function checkOvirtRestoreFlags(flags: OvirtRestoreFlags): void {
  if (flags.via !== 'transfer' && !flags.appliance) throw new InvalidArgumentError('--ovirt needs --appliance NAME (this backup appliance), or --via transfer');
  if ((flags.newVm === undefined) === (flags.toVm === undefined)) throw new InvalidArgumentError('restore to oVirt needs either --new-vm NAME or --to-vm NAME');
  if (flags.toVm !== undefined && flags.disk === undefined) throw new InvalidArgumentError('--to-vm restores one disk: name it with --disk');
}
