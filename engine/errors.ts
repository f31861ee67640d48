import { EngineError } from '../repo-format/errors.js';

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
    super('ENGINE_DISK_NOT_FOUND', `backup ${backupId} has no disk "${disk}" (it has: ${available.join(', ')})`, { backupId, disk, available });
  }
}

export class InterruptedError extends EngineError {
  constructor(what: string) {
    super('ENGINE_INTERRUPTED', `${what} was interrupted; nothing of it was committed`, { what });
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
