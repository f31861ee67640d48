import { EngineError, type CodesOf, type StorageRemedy } from '../repo-format/errors.js';
import { displayText } from '../repo-format/display-text.js';

/** The engine layer's codes, added to the registry of repo-format/errors.ts (SPEC.md 14.3). */
declare module '../repo-format/errors.js' {
  interface ErrorCodes {
    ENGINE_DISK_NOT_FOUND: 'engine';
    ENGINE_SOURCE_UNREADABLE: 'engine';
    ENGINE_SOURCE_CHANGED: 'engine';
    ENGINE_TARGET_TOO_SMALL: 'engine';
    ENGINE_TARGET_UNWRITABLE: 'engine';
    ENGINE_TARGET_PROTECTED: 'engine';
    ENGINE_TARGET_IN_USE: 'engine';
    ENGINE_TARGET_HOLDS_DATA: 'engine';
    ENGINE_NBD_CONNECT: 'engine';
    ENGINE_NBD_PROTOCOL: 'engine';
    ENGINE_NBD_COMMAND: 'engine';
    ENGINE_TIMEOUT: 'engine';
    ENGINE_TOOL_FAILED: 'engine';
    ENGINE_OVIRT_FAULT: 'engine';
    ENGINE_OVIRT_AUTH: 'engine';
    ENGINE_OVIRT_CONNECT: 'engine';
    ENGINE_OVERLAY_FAILED: 'engine';
    ENGINE_QUIESCE_FAILED: 'engine';
    ENGINE_BLOCK_SIZE_MISMATCH: 'engine';
  }
}

export type EngineErrorCode = CodesOf<'engine'>;

/**
 * A way out of an engine error, in the API's terms (`details.remedies`; the message states the condition):
 * the storage layer's (repo-format/errors.ts) and the engine's. The CLI words each as its flags
 * (cli/error-wording.ts); SPEC.md, 14.3, lists them.
 */
export type Remedy =
  | StorageRemedy
  /** The same call with `option` set lifts the refusal; `to`: what it then does ("overwrite it"). */
  | { kind: 'override'; option: 'force'; to: string }
  /** Roll the target back instead (restore's rollback policy `compare`): only what differs is written. */
  | { kind: 'rollback' }
  /** Roll a qcow2 image back through an NBD export of it (an `nbd` target, with a rollback policy). */
  | { kind: 'rollback-through-nbd' }
  /** Compare every block instead of trusting a bitmap (rollback policy `compare`). */
  | { kind: 'compare-every-block' }
  /** Restore into a new qcow2 image (a `qcow2` target). */
  | { kind: 'new-image' }
  /** Name the disk to restore (the `disk` option); `into`: the target it goes to; `otherwise`: the other way. */
  | { kind: 'choose-disk'; into?: string; otherwise?: 'into-directory' | 'one-by-one' }
  /** Give the disks of a backup distinct names. */
  | { kind: 'name-disks' }
  /** Back the disk up as another kind: `raw` (read whole) or `image` (a qcow2 image, its dirty bitmaps). */
  | { kind: 'disk-kind'; use: 'raw' | 'image' }
  /** Unprotect the backup first. */
  | { kind: 'unprotect'; backup: string }
  /** oVirt: give the engine's CA certificate (`caFile`). */
  | { kind: 'ovirt-ca' }
  /** oVirt: give the engine's own https:// address. */
  | { kind: 'ovirt-address' }
  /** oVirt: give the credentials apart from the URL. */
  | { kind: 'ovirt-credentials' }
  /** oVirt: reach the engine over https (with its CA), or allow plain http (`insecureHttp`) on a trusted network. */
  | { kind: 'ovirt-https' }
  /** serve: TLS with client authentication (certificates or pre-shared keys), a Unix socket, or `insecure`. */
  | { kind: 'serve-securely' }
  /** serve: another socket path, because the one given is not a socket, is in use, or the run directory cannot be made. */
  | { kind: 'socket-path'; because: 'not-a-socket' | 'in-use' | 'run-dir' };

/** `details` carrying remedies, typed. */
export function withRemedies(details: Record<string, unknown>, ...remedies: Remedy[]): Record<string, unknown> {
  return { ...details, remedies };
}

/** `copy` between repositories of different block sizes (SPEC.md 22): refused before anything is written. */
export class BlockSizeMismatchError extends EngineError {
  constructor(from: string, fromBlockSize: number, to: string, toBlockSize: number) {
    super('ENGINE_BLOCK_SIZE_MISMATCH', `cannot copy from ${from} (block size ${fromBlockSize}) to ${to} (block size ${toBlockSize}): a copy keeps each block map as it is, so both repositories need the same block size (back up a restore of the backup instead)`, { from, fromBlockSize, to, toBlockSize });
  }
}

export class SourceUnreadableError extends EngineError {
  constructor(path: string, why: string) {
    super('ENGINE_SOURCE_UNREADABLE', `cannot read source ${path}: ${why}`, { path, why });
  }
}

export class SourceChangedError extends EngineError {
  constructor(path: string, why: string) {
    super('ENGINE_SOURCE_CHANGED', `source ${path} changed while it was read: ${why}; back up a stable snapshot of the disk`, { path, why });
  }
}

export class TargetTooSmallError extends EngineError {
  constructor(path: string, targetSize: number, diskSize: number) {
    super('ENGINE_TARGET_TOO_SMALL', `restore target ${path} holds ${targetSize} bytes, the disk needs ${diskSize}`, { path, targetSize, diskSize });
  }
}

export class TargetUnwritableError extends EngineError {
  constructor(path: string, why: string) {
    super('ENGINE_TARGET_UNWRITABLE', `cannot write restore target ${path}: ${why}`, { path, why });
  }
}

/**
 * The overlay file of a writable export (`serve --writable`) could not be written or synced; `errno`: the
 * system's code, when it gave one (the failure is its `cause`). The guest is answered EIO (ENOSPC apart).
 */
export class OverlayFailedError extends EngineError {
  constructor(message: string, errno?: string, options?: { cause?: unknown }) {
    super('ENGINE_OVERLAY_FAILED', message, errno === undefined ? {} : { errno }, options);
  }
}

/**
 * `backup --quiesce=required` could not establish file-system consistency (no guest agent, an agent that does
 * not answer, a freeze, thaw or pre-freeze hook that failed, a freeze that outlasted its timeout); the backup
 * failed before its record, and the checkpoint it may have created is deleted. `try` falls back instead.
 */
export class QuiesceFailedError extends EngineError {
  constructor(domain: string, why: string) {
    super('ENGINE_QUIESCE_FAILED', `cannot quiesce domain ${domain}: ${why}`, { domain, why });
  }
}

export class DiskNotFoundError extends EngineError {
  constructor(backupId: string, disk: string, available: string[]) {
    super('ENGINE_DISK_NOT_FOUND', `backup ${backupId} has no disk "${displayText(disk, 64)}" (it has: ${available.map((name) => displayText(name, 64)).join(', ')})`, { backupId, disk, available });
  }
}

/** Raised by the storage layer too (an aborted storage call): owned there, named here for the engine's callers. */
export { InterruptedError } from '../repo-format/errors.js';

/** A chunk that fails its checks during restore, named by backup, disk and offset as well as pack and offset. */
export class CorruptChunkError extends EngineError {
  constructor(where: { backupId: string; disk: string; diskOffset: number; packId: string; packOffset: number; chunk: string }, why: string) {
    super(
      'ENGINE_CORRUPT_FRAME',
      `backup ${where.backupId}, disk ${where.disk}, offset ${where.diskOffset}: chunk ${where.chunk.slice(0, 16)}… in pack ${where.packId} at offset ${where.packOffset} is damaged: ${why}`,
      { ...where, why },
    );
  }
}

/** Could not connect, or the server refused the export or an option we need. */
export class NbdConnectError extends EngineError {
  constructor(uri: string, why: string) {
    super('ENGINE_NBD_CONNECT', `NBD ${uri}: ${why}`, { uri, why });
  }
}

/** The server broke the protocol (bad magic, impossible lengths, unknown cookie, short reply, early close). */
export class NbdProtocolError extends EngineError {
  constructor(uri: string, why: string) {
    super('ENGINE_NBD_PROTOCOL', `NBD ${uri}: protocol error: ${why}`, { uri, why });
  }
}

/** The server answered a command with an error. */
export class NbdCommandError extends EngineError {
  constructor(uri: string, command: string, offset: number, length: number, errno: string, message = '') {
    super('ENGINE_NBD_COMMAND', `NBD ${uri}: ${command} of ${length} bytes at offset ${offset} failed: ${errno}${message ? ` (${message})` : ''}`, {
      uri,
      command,
      offset,
      length,
      errno,
    });
  }
}

export class TimeoutError extends EngineError {
  constructor(what: string, ms: number) {
    super('ENGINE_TIMEOUT', `${what} did not answer within ${ms / 1000} s`, { what, ms });
  }
}

/** The oVirt engine answered with a fault (or an error status). */
export class OvirtFaultError extends EngineError {
  constructor(request: string, status: number, reason: string, detail: string) {
    super('ENGINE_OVIRT_FAULT', `oVirt ${request}: HTTP ${status}: ${reason}${detail ? ` (${detail})` : ''}`, { request, status, reason, detail });
  }

  get status(): number {
    return this.details.status as number;
  }
}

export class OvirtAuthError extends EngineError {
  constructor(url: string, why: string) {
    super('ENGINE_OVIRT_AUTH', `oVirt ${url}: login failed: ${why}`, { url, why });
  }
}

/**
 * A target the engine never writes: inside a repository (any repository: packs, records, index), or, unless
 * forced, the very source a backup being restored was read from.
 */
export class TargetProtectedError extends EngineError {
  constructor(path: string, why: string, details: Record<string, unknown> = {}) {
    super('ENGINE_TARGET_PROTECTED', `refusing to write ${path}: ${why}`, { path, why, ...details });
  }
}

/** A target another user holds: a mounted or claimed block device, a file behind a loop device or locked by qemu. */
export class TargetInUseError extends EngineError {
  constructor(path: string, why: string) {
    super('ENGINE_TARGET_IN_USE', `refusing to write ${path}: it is in use (${why})`, { path, why });
  }
}

/** A target that holds data the caller did not say to overwrite (a filesystem signature, an existing file); `force` does. */
export class TargetHoldsDataError extends EngineError {
  constructor(path: string, what: string) {
    super('ENGINE_TARGET_HOLDS_DATA', `refusing to overwrite ${path}: it holds ${what}`, withRemedies({ path, what }, { kind: 'override', option: 'force', to: 'overwrite it' }));
  }
}
