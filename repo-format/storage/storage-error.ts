/**
 * Every failure of a storage backend is a StorageError: code ENGINE_STORAGE, and a `reason` from a closed
 * list that callers match on (SPEC.md 14.3). The reason says what happened in terms any backend shares
 * (an object that is not there, a denied request, a store that is down); the message says it in the
 * backend's own words (the S3 error code, the HTTP status, the errno) on one line.
 *
 * `transient` says whether the same call may succeed if repeated: the retry decorator (retry.ts) repeats
 * exactly those, and nothing else. A 4xx that means the request itself is wrong is never transient.
 */
import { EngineError } from '../errors.js';

export type StorageFailure =
  /** The object does not exist. */
  | 'not-found'
  /** A create-if-absent found the key taken (S3: 412 PreconditionFailed to If-None-Match: *). */
  | 'exists'
  /** The store refused the operation to these credentials (S3: AccessDenied). */
  | 'denied'
  /** The credentials are missing, unknown or wrong (S3: InvalidAccessKeyId, SignatureDoesNotMatch, ExpiredToken). */
  | 'auth'
  /** The local clock and the store's differ by more than the store accepts (S3: RequestTimeTooSkewed, 15 min). */
  | 'clock-skew'
  /** The bucket (S3) or the root folder (local) does not exist. */
  | 'no-bucket'
  /** The store is busy, down or the connection broke (5xx, SlowDown, resets, timeouts): transient. */
  | 'unavailable'
  /** The store cannot be reached or trusted: unknown host, TLS certificate not trusted. */
  | 'unreachable'
  /** Bytes failed a checksum: an upload the store refused (BadDigest), a download whose MD5 differs. */
  | 'integrity'
  /** A ranged read reaches past the object's end: the object is shorter than its reader expects. */
  | 'out-of-range'
  /** A whole-object read of an object larger than the caller allows. */
  | 'too-large'
  /** The store refused the request as invalid or unsupported (a 4xx that means a bug, 501, a wrong region). */
  | 'refused'
  /** The store answered something that is not S3 (malformed XML, a status or length that cannot be). */
  | 'protocol';

export interface StorageErrorDetails {
  /** Where: s3://bucket/prefix, or a folder. */
  location: string;
  /** The key the operation was about, relative to the location. */
  key?: string | undefined;
  /** put, get, stat, list, delete … */
  operation?: string | undefined;
  /** HTTP status, S3 error code, errno: the backend's own words, for logs and scripts. */
  status?: number | undefined;
  backendCode?: string | undefined;
  /** Set by the retry decorator when it gave up. */
  attempts?: number | undefined;
  /** The store asked for this pause (Retry-After), in milliseconds. */
  retryAfterMs?: number | undefined;
}

/** Reasons that are transient whatever the backend says (the others are when the backend says so). */
const ALWAYS_TRANSIENT: ReadonlySet<StorageFailure> = new Set(['unavailable']);

export class StorageError extends EngineError {
  readonly reason: StorageFailure;
  readonly transient: boolean;
  readonly storage: Readonly<StorageErrorDetails>;

  constructor(reason: StorageFailure, message: string, details: StorageErrorDetails, options: { transient?: boolean; cause?: unknown } = {}) {
    const { retryAfterMs: _retryAfter, ...shown } = details;
    const defined = Object.fromEntries(Object.entries(shown).filter(([, value]) => value !== undefined));
    super('ENGINE_STORAGE', message, { reason, ...defined }, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'StorageError';
    this.reason = reason;
    this.transient = options.transient ?? ALWAYS_TRANSIENT.has(reason);
    this.storage = details;
  }
}

export function isStorageError(error: unknown, reason?: StorageFailure): error is StorageError {
  return error instanceof StorageError && (reason === undefined || error.reason === reason);
}

export function isTransient(error: unknown): boolean {
  return error instanceof StorageError && error.transient;
}
