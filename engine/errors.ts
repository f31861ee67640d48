import { EngineError, type CodesOf } from '../repo-format/errors.js';
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
    ENGINE_INTERRUPTED: 'engine';
    ENGINE_NBD_CONNECT: 'engine';
    ENGINE_NBD_PROTOCOL: 'engine';
    ENGINE_NBD_COMMAND: 'engine';
    ENGINE_TIMEOUT: 'engine';
    ENGINE_TOOL_FAILED: 'engine';
    ENGINE_OVIRT_FAULT: 'engine';
    ENGINE_OVIRT_AUTH: 'engine';
    ENGINE_OVIRT_CONNECT: 'engine';
  }
}

export type EngineErrorCode = CodesOf<'engine'>;

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

export class DiskNotFoundError extends EngineError {
  constructor(backupId: string, disk: string, available: string[]) {
    super('ENGINE_DISK_NOT_FOUND', `backup ${backupId} has no disk "${displayText(disk, 64)}" (it has: ${available.map((name) => displayText(name, 64)).join(', ')})`, { backupId, disk, available });
  }
}

/**
 * SIGINT/SIGTERM (or a caller's abort) stopped an operation. `state` says what it left: by default nothing
 * of it was committed; a restore says what became of its target, prune how many backups it removed.
 */
export class InterruptedError extends EngineError {
  constructor(what: string, state = 'nothing of it was committed', signal?: string) {
    super('ENGINE_INTERRUPTED', `${what} was interrupted${signal ? ` (${signal})` : ''}; ${state}`, { what, state, ...(signal ? { signal } : {}) });
  }
}

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

/** A target that holds data the user did not say to overwrite (a filesystem signature, an existing file); --force does. */
export class TargetHoldsDataError extends EngineError {
  constructor(path: string, what: string) {
    super('ENGINE_TARGET_HOLDS_DATA', `refusing to overwrite ${path}: it holds ${what}; give --force to overwrite it`, { path, what });
  }
}
