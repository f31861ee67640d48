import type { StorageErrorCode } from '../repo-format/errors.js';
import type { EngineErrorCode } from '../engine/errors.js';
import type {} from '../engine/server/errors.js';

/** Documented in SPEC.md, "Exit codes". Stable: scripts depend on them. */
export const EXIT = {
  ok: 0,
  failed: 1,
  usage: 2,
  locked: 3,
  integrity: 4,
  notARepository: 5,
  passphrase: 6,
  interrupted: 130,
} as const;

type ExitCode = (typeof EXIT)[keyof typeof EXIT];

/** The exit code of each storage layer code (repo-format/errors.ts): every code has one, decided here. */
export const STORAGE_EXITS: Readonly<Record<StorageErrorCode, ExitCode>> = {
  ENGINE_INVALID_ARGUMENT: EXIT.usage,
  ENGINE_NOT_A_REPOSITORY: EXIT.notARepository,
  ENGINE_REPOSITORY_EXISTS: EXIT.failed,
  ENGINE_FORMAT_TOO_NEW: EXIT.notARepository,
  ENGINE_FORMAT_UNSUPPORTED: EXIT.notARepository,
  ENGINE_REPOSITORY_LOCKED: EXIT.locked,
  ENGINE_CORRUPT_FRAME: EXIT.integrity,
  ENGINE_CORRUPT_PACK: EXIT.integrity,
  ENGINE_CORRUPT_METADATA: EXIT.integrity,
  ENGINE_MISSING_BLOB: EXIT.integrity,
  ENGINE_BACKUP_NOT_FOUND: EXIT.failed,
  ENGINE_AMBIGUOUS_ID: EXIT.failed,
  ENGINE_NO_SPACE: EXIT.failed,
  ENGINE_WRONG_PASSPHRASE: EXIT.passphrase,
  ENGINE_PASSPHRASE_REQUIRED: EXIT.passphrase,
  ENGINE_NOT_ENCRYPTED: EXIT.passphrase,
  ENGINE_READ_ONLY: EXIT.failed,
  ENGINE_FILE_TOO_LARGE: EXIT.failed,
  ENGINE_INTERRUPTED: EXIT.interrupted,
  ENGINE_STORAGE: EXIT.failed,
  ENGINE_STORAGE_NOT_FOUND: EXIT.failed,
  ENGINE_STORAGE_NO_BUCKET: EXIT.failed,
  ENGINE_STORAGE_AUTH: EXIT.failed,
  ENGINE_STORAGE_DENIED: EXIT.failed,
  ENGINE_STORAGE_UNAVAILABLE: EXIT.failed,
  ENGINE_STORAGE_UNREACHABLE: EXIT.failed,
  ENGINE_CLOCK_SKEW: EXIT.failed,
  ENGINE_LEASE_LOST: EXIT.failed,
  ENGINE_INTERNAL: EXIT.failed,
};

/** The exit code of each engine layer code (engine/errors.ts). */
export const ENGINE_EXITS: Readonly<Record<EngineErrorCode, ExitCode>> = {
  ENGINE_DISK_NOT_FOUND: EXIT.failed,
  ENGINE_SOURCE_UNREADABLE: EXIT.failed,
  ENGINE_SOURCE_CHANGED: EXIT.failed,
  ENGINE_TARGET_TOO_SMALL: EXIT.failed,
  ENGINE_TARGET_UNWRITABLE: EXIT.failed,
  ENGINE_TARGET_PROTECTED: EXIT.failed,
  ENGINE_TARGET_IN_USE: EXIT.failed,
  ENGINE_TARGET_HOLDS_DATA: EXIT.failed,
  ENGINE_NBD_CONNECT: EXIT.failed,
  ENGINE_NBD_PROTOCOL: EXIT.failed,
  ENGINE_NBD_COMMAND: EXIT.failed,
  ENGINE_TIMEOUT: EXIT.failed,
  ENGINE_TOOL_FAILED: EXIT.failed,
  ENGINE_OVIRT_FAULT: EXIT.failed,
  ENGINE_OVIRT_AUTH: EXIT.failed,
  ENGINE_OVIRT_CONNECT: EXIT.failed,
  ENGINE_OVERLAY_FAILED: EXIT.failed,
  ENGINE_QUIESCE_FAILED: EXIT.failed,
  ENGINE_BLOCK_SIZE_MISMATCH: EXIT.usage,
  ENGINE_UNAUTHORIZED: EXIT.failed,
  ENGINE_FORBIDDEN: EXIT.failed,
  ENGINE_NOT_FOUND: EXIT.failed,
  ENGINE_BODY_TOO_LARGE: EXIT.failed,
  ENGINE_QUEUE_FULL: EXIT.failed,
  ENGINE_SERVER_RESTARTED: EXIT.failed,
  ENGINE_VM_BUSY: EXIT.failed,
  ENGINE_BOOT_TEST_FAILED: EXIT.integrity,
  ENGINE_VERIFY_FAILED: EXIT.integrity,
  ENGINE_SERVER_UNREACHABLE: EXIT.failed,
};

const EXITS: Readonly<Record<StorageErrorCode | EngineErrorCode, ExitCode>> = { ...STORAGE_EXITS, ...ENGINE_EXITS };

/** The exit code for an error's code, whichever layer owns it; no code (not an EngineError) is a failure. */
export function exitCodeFor(code: StorageErrorCode | EngineErrorCode | undefined): number {
  return (code === undefined ? undefined : EXITS[code]) ?? EXIT.failed;
}
