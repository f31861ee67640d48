/**
 * Every failure the engine reports on purpose is an EngineError with a stable `code`.
 * Callers (the CLI, backup vendors' scripts) match on `code`, never on the message.
 * The list of codes and the exit code each maps to is documented in SPEC.md, "Errors".
 */
import { displayText } from './display-text.js';

/**
 * The registry of codes, by the layer that owns each: this file lists the storage layer's (the repository,
 * its format and files, arguments, and ENGINE_INTERNAL for what no layer expected); engine/errors.ts adds
 * the engine's (sources, targets, NBD, tools, oVirt, interruption) to the same interface, so that a code is
 * declared where it is raised and the storage layer names none of the layers above it.
 */
export interface ErrorCodes {
  ENGINE_INVALID_ARGUMENT: 'storage';
  ENGINE_NOT_A_REPOSITORY: 'storage';
  ENGINE_REPOSITORY_EXISTS: 'storage';
  ENGINE_FORMAT_TOO_NEW: 'storage';
  ENGINE_FORMAT_UNSUPPORTED: 'storage';
  ENGINE_REPOSITORY_LOCKED: 'storage';
  ENGINE_CORRUPT_FRAME: 'storage';
  ENGINE_CORRUPT_PACK: 'storage';
  ENGINE_CORRUPT_METADATA: 'storage';
  ENGINE_MISSING_BLOB: 'storage';
  ENGINE_BACKUP_NOT_FOUND: 'storage';
  ENGINE_AMBIGUOUS_ID: 'storage';
  ENGINE_NO_SPACE: 'storage';
  ENGINE_WRONG_PASSPHRASE: 'storage';
  ENGINE_PASSPHRASE_REQUIRED: 'storage';
  ENGINE_NOT_ENCRYPTED: 'storage';
  ENGINE_READ_ONLY: 'storage';
  ENGINE_FILE_TOO_LARGE: 'storage';
  ENGINE_INTERRUPTED: 'storage';
  ENGINE_STORAGE: 'storage';
  ENGINE_STORAGE_NOT_FOUND: 'storage';
  ENGINE_STORAGE_NO_BUCKET: 'storage';
  ENGINE_STORAGE_AUTH: 'storage';
  ENGINE_STORAGE_DENIED: 'storage';
  ENGINE_STORAGE_UNAVAILABLE: 'storage';
  ENGINE_STORAGE_UNREACHABLE: 'storage';
  ENGINE_CLOCK_SKEW: 'storage';
  ENGINE_LEASE_LOST: 'storage';
  ENGINE_INTERNAL: 'storage';
}

/** Every code, of every layer the program includes (SPEC.md 14.3 lists them all). */
export type ErrorCode = keyof ErrorCodes;

/** The codes a layer owns. */
export type CodesOf<Layer extends string> = { [Code in ErrorCode]: ErrorCodes[Code] extends Layer ? Code : never }[ErrorCode];

export type StorageErrorCode = CodesOf<'storage'>;

/**
 * A way out of an error, in the API's terms: carried in `details.remedies`, while the message states only
 * the condition. Each front end words a remedy as its own (the CLI as its flags and commands:
 * cli/error-wording.ts); a message never tells a library caller to pass a command-line flag. These are the
 * storage layer's; the engine adds its own (engine/errors.ts, `Remedy`).
 */
export type StorageRemedy =
  /** Give the repository's passphrase. */
  | { kind: 'passphrase' }
  /**
   * unlock() (with `force` when the holder cannot be proven gone) removes `removes` (the lock, a
   * registration); `when`: the condition under which it is safe, if any.
   */
  | { kind: 'unlock'; repo: string; force: boolean; removes: string; when?: string }
  /** repair() (of the repository at `repo`, when it is worth naming) does what `does` says. */
  | { kind: 'repair'; repo?: string; does: string };

export class EngineError extends Error {
  readonly code: ErrorCode;
  readonly details: Readonly<Record<string, unknown>>;

  constructor(code: ErrorCode, message: string, details: Record<string, unknown> = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'EngineError';
    this.code = code;
    this.details = details;
  }

  toJSON(): { code: ErrorCode; message: string; details: Readonly<Record<string, unknown>> } {
    return { code: this.code, message: this.message, details: this.details };
  }
}

export class InvalidArgumentError extends EngineError {
  constructor(message: string, details: Record<string, unknown> = {}) {
    super('ENGINE_INVALID_ARGUMENT', message, details);
  }
}

export class NotARepositoryError extends EngineError {
  /** `hint`: what more is known (e.g. the packs are there), appended after a semicolon; `remedy`: what to do about it. */
  constructor(path: string, why: string, hint?: { condition: string; remedy: StorageRemedy }) {
    super('ENGINE_NOT_A_REPOSITORY', `${path} is not an engine repository: ${why}${hint ? `; ${hint.condition}` : ''}`, { path, why, ...(hint ? { remedies: [hint.remedy] } : {}) });
  }
}

export class RepositoryExistsError extends EngineError {
  /** `found`: an object already in the place (an S3 prefix), named in the message. */
  constructor(path: string, found?: string) {
    super(
      'ENGINE_REPOSITORY_EXISTS',
      found === undefined ? `${path} already holds a repository or other files; choose an empty or new directory` : `${path} already holds a repository or other objects (${displayText(found.slice(0, 200))}); choose an empty prefix`,
      { path, ...(found === undefined ? {} : { found: found.slice(0, 200) }) },
    );
  }
}

/**
 * A version-3 repository (many writers; every S3 repository) given to a command that does not work on that
 * format yet: refused before anything is read or written beyond the config.
 */
export class FormatUnsupportedError extends EngineError {
  constructor(path: string, command?: string) {
    super(
      'ENGINE_FORMAT_UNSUPPORTED',
      `repository ${path} has format version 3 (many writers), on which ${command === undefined ? 'this command' : `\`engine ${command}\``} does not work yet`,
      { path, version: 3, ...(command === undefined ? {} : { command }) },
    );
  }
}

export class FormatTooNewError extends EngineError {
  constructor(path: string, found: number, supported: number) {
    super(
      'ENGINE_FORMAT_TOO_NEW',
      `repository ${path} has format version ${found}; this engine reads versions up to ${supported}: upgrade the engine`,
      { path, found, supported },
    );
  }
}

export interface LockHolder {
  pid: number;
  hostname: string;
  since: string;
  command: string;
  /** Boot id and process start time of the holder (process-alive.ts); absent in files of older engines. */
  identity?: string;
}

/** What is known of a lock's holder, and the way out (lock.ts, lockedHint). */
export interface LockedHint {
  condition?: string | undefined;
  remedy?: StorageRemedy | undefined;
}

export class RepositoryLockedError extends EngineError {
  /** `hint`: what is known of the holder (lock.ts, lockedHint), appended after a semicolon, and the way out. */
  constructor(path: string, holder: LockHolder | undefined, hint?: LockedHint) {
    const who = holder
      ? `locked by pid ${holder.pid} on host ${holder.hostname} since ${holder.since} (${holder.command})`
      : 'locked by another process (its lock file could not be read)';
    super('ENGINE_REPOSITORY_LOCKED', `repository ${path} is ${who}${hint?.condition ? `; ${hint.condition}` : ''}`, { path, holder, ...(hint?.remedy ? { remedies: [hint.remedy] } : {}) });
  }
}

/**
 * This host's clock differs from the store's by more than the bound the lease protocol relies on (SPEC.md 19.6),
 * or the store tells no time to check it against. Nothing was written under a lease that could not be trusted.
 */
export class ClockSkewError extends EngineError {
  constructor(location: string, why: string, details: { skewMs?: number | undefined; boundMs: number }) {
    super('ENGINE_CLOCK_SKEW', `the clock of this host cannot be trusted against the store ${location}: ${why}; set the clock right (NTP) and run again`, { location, ...details });
  }
}

/**
 * A lease this process held is no longer proven (SPEC.md 19.5): it could not be refreshed before it expired,
 * or it was removed or replaced behind the holder's back. The work it protected stops before its next write.
 */
export class LeaseLostError extends EngineError {
  /** `consequence`: what the holder did about it (a writer: its uncommitted work is garbage; a reader: it stopped). */
  constructor(location: string, lease: string, why: string, consequence = 'what this run had not committed is left as garbage for gc') {
    super('ENGINE_LEASE_LOST', `the lease ${lease} on ${location} was lost: ${why}; ${consequence}`, { location, lease, why });
  }

  /** The same loss, saying what a holder other than a writer (a reader: restore, verify) did about it. */
  withConsequence(consequence: string): LeaseLostError {
    const { location, lease, why } = this.details as { location: string; lease: string; why: string };
    return new LeaseLostError(location, lease, why, consequence);
  }
}

/** A frame in a pack failed its checks: bad magic, impossible lengths, checksum or hash mismatch. */
export class CorruptFrameError extends EngineError {
  constructor(packId: string, offset: number, why: string, extra: Record<string, unknown> = {}) {
    super('ENGINE_CORRUPT_FRAME', `corrupt frame in pack ${packId} at offset ${offset}: ${why}`, { packId, offset, why, ...extra });
  }
}

export class CorruptPackError extends EngineError {
  /** `extra`: more details, e.g. `errno` when the pack cannot be opened or read. */
  constructor(packId: string, why: string, extra: Record<string, unknown> = {}) {
    super('ENGINE_CORRUPT_PACK', `pack ${packId} is damaged: ${why}`, { packId, why, ...extra });
  }
}

export class CorruptMetadataError extends EngineError {
  constructor(what: string, why: string) {
    super('ENGINE_CORRUPT_METADATA', `${what} is damaged: ${why}`, { what, why });
  }
}

export class MissingBlobError extends EngineError {
  constructor(id: string, what: string) {
    super('ENGINE_MISSING_BLOB', `${what} ${id} is not in the repository index`, { id, what });
  }
}

export class BackupNotFoundError extends EngineError {
  constructor(id: string) {
    super('ENGINE_BACKUP_NOT_FOUND', `no backup matches "${displayText(id, 64)}"`, { id });
  }
}

export class AmbiguousIdError extends EngineError {
  constructor(prefix: string, matches: string[]) {
    super('ENGINE_AMBIGUOUS_ID', `"${displayText(prefix, 64)}" matches ${matches.length} backups (${matches.slice(0, 4).join(', ')}…): give more characters`, {
      prefix,
      matches,
    });
  }
}

/** The passphrase does not unlock the repository's key file (or the key file was altered). */
export class WrongPassphraseError extends EngineError {
  constructor(path: string) {
    super('ENGINE_WRONG_PASSPHRASE', `wrong passphrase for repository ${path}: it does not unlock the repository's key file (or the key file was altered)`, { path });
  }
}

/** An encrypted repository was opened without a passphrase. */
export class PassphraseRequiredError extends EngineError {
  constructor(path: string) {
    super('ENGINE_PASSPHRASE_REQUIRED', `repository ${path} is encrypted, and no passphrase was given`, { path, remedies: [{ kind: 'passphrase' } satisfies StorageRemedy] });
  }
}

/**
 * A passphrase was given for a repository whose config names no encryption, by a caller about to write
 * (backup). Writing would put plaintext where the caller expects ciphertext: the repository may have been
 * made plain by mistake, or an attacker may have rewritten an encrypted repository's config.
 */
export class NotEncryptedError extends EngineError {
  constructor(path: string) {
    super(
      'ENGINE_NOT_ENCRYPTED',
      `a passphrase was given, but repository ${path} is not encrypted (its config names no encryption): backup refuses to write plaintext where encryption is expected. Give no passphrase for a plain repository; if this one was created encrypted, its config was altered`,
      { path },
    );
  }
}

export class NoSpaceError extends EngineError {
  /** `hint`: what frees space or gets around it, appended after a semicolon. */
  constructor(path: string, cause: unknown, hint?: string) {
    super('ENGINE_NO_SPACE', `no space left on the device holding ${path}${hint ? `; ${hint}` : ''}`, { path }, { cause });
  }
}

/**
 * A file would grow past the largest file its filesystem allows, or the process's file size limit
 * (EFBIG): not a full disk. Freeing space does not help; another filesystem (or a raised limit) does.
 */
export class FileTooLargeError extends EngineError {
  constructor(path: string, cause: unknown) {
    super(
      'ENGINE_FILE_TOO_LARGE',
      `${path} would be larger than its filesystem allows for one file (or than this process's file size limit, ulimit -f): EFBIG; use a filesystem with larger files (xfs, ext4 with 4 KiB blocks holds 16 TiB) or raise the limit`,
      { path },
      { cause },
    );
  }
}

/**
 * The repository cannot be written (a read-only filesystem or mount, or files this user may not write)
 * and the command must write. Readers (restore, verify, list, show, serve, mount) work without writing.
 */
export class ReadOnlyRepositoryError extends EngineError {
  constructor(path: string, command: string, errno: string) {
    super(
      'ENGINE_READ_ONLY',
      `repository ${path} cannot be written (${errno === 'EROFS' ? 'read-only filesystem' : 'no write permission'}: ${errno}), and ${command} must write to it; restore, verify, list, show, serve and mount work on a read-only repository`,
      { path, command, errno },
    );
  }
}

export function isErrnoException(error: unknown): error is NodeJS.ErrnoException {
  return error instanceof Error && typeof (error as NodeJS.ErrnoException).code === 'string';
}

/**
 * Turns ENOSPC / EDQUOT into NoSpaceError so every caller reports a full disk the same way, and EFBIG (a
 * file larger than its filesystem or the process allows, which freeing space does not cure) into
 * FileTooLargeError.
 */
export function classifyWriteError(error: unknown, path: string): unknown {
  if (isErrnoException(error) && (error.code === 'ENOSPC' || error.code === 'EDQUOT')) {
    return new NoSpaceError(path, error);
  }
  if (isErrnoException(error) && error.code === 'EFBIG') return new FileTooLargeError(path, error);
  // LevelDB reports a full disk as an IO error whose text carries strerror(ENOSPC).
  const text = error instanceof Error ? `${error.message} ${String((error as { cause?: unknown }).cause ?? '')}` : '';
  if (text.includes('No space left on device')) return new NoSpaceError(path, error);
  return error;
}

/**
 * SIGINT/SIGTERM (or a caller's abort) stopped an operation. `state` says what it left: by default nothing
 * of it was committed; a restore says what became of its target, prune how many backups it removed; null
 * for one call that has no state of its own to tell (a storage call: the operation around it says).
 */
export class InterruptedError extends EngineError {
  constructor(what: string, state: string | null = 'nothing of it was committed', signal?: string, details: Record<string, unknown> = {}) {
    super('ENGINE_INTERRUPTED', `${what} was interrupted${signal ? ` (${signal})` : ''}${state === null ? '' : `; ${state}`}`, {
      what,
      ...(state === null ? {} : { state }),
      ...(signal ? { signal } : {}),
      ...details,
    });
  }
}
