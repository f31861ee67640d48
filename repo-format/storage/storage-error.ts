/**
 * Every failure of a storage backend is a StorageError with a `reason` from a closed list that code above
 * the storage matches on, and a stable error code (SPEC.md 14.3) that users and scripts match on. The reason
 * says what happened in terms any backend shares (an object that is not there, a denied request, a store
 * that is down); the message says it in the backend's own words (the S3 error code, the HTTP status, the
 * errno) on one line.
 *
 * The codes follow what the user does about it: fix the credentials (ENGINE_STORAGE_AUTH), the
 * permissions (ENGINE_STORAGE_DENIED), the bucket or endpoint (ENGINE_STORAGE_NO_BUCKET), the clock
 * (ENGINE_CLOCK_SKEW, shared with the lease protocol's own skew check), the network or TLS trust
 * (ENGINE_STORAGE_UNREACHABLE); wait for the store (ENGINE_STORAGE_UNAVAILABLE: what the retries could not
 * ride out); an object missing (ENGINE_STORAGE_NOT_FOUND: the repository layer turns the ones it expects
 * into its own codes, a missing pack into a damaged backup). The rest, which say the store or the data is
 * not what it should be, share ENGINE_STORAGE with `details.reason`.
 *
 * `transient` says whether the same call may succeed if repeated: the retry decorator (retry.ts) repeats
 * exactly those, and nothing else. A 4xx that means the request itself is wrong is never transient.
 */
import { EngineError, type ErrorCode } from '../errors.js';

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

/** The error code each reason is reported with. */
export const STORAGE_ERROR_CODES: Readonly<Record<StorageFailure, ErrorCode>> = {
  'not-found': 'ENGINE_STORAGE_NOT_FOUND',
  exists: 'ENGINE_STORAGE',
  denied: 'ENGINE_STORAGE_DENIED',
  auth: 'ENGINE_STORAGE_AUTH',
  'clock-skew': 'ENGINE_CLOCK_SKEW',
  'no-bucket': 'ENGINE_STORAGE_NO_BUCKET',
  unavailable: 'ENGINE_STORAGE_UNAVAILABLE',
  unreachable: 'ENGINE_STORAGE_UNREACHABLE',
  integrity: 'ENGINE_STORAGE',
  'out-of-range': 'ENGINE_STORAGE',
  'too-large': 'ENGINE_STORAGE',
  refused: 'ENGINE_STORAGE',
  protocol: 'ENGINE_STORAGE',
};

/** Reasons that are transient whatever the backend says (the others are when the backend says so). */
const ALWAYS_TRANSIENT: ReadonlySet<StorageFailure> = new Set(['unavailable']);

export class StorageError extends EngineError {
  readonly reason: StorageFailure;
  readonly transient: boolean;
  readonly storage: Readonly<StorageErrorDetails>;

  constructor(reason: StorageFailure, message: string, details: StorageErrorDetails, options: { transient?: boolean; cause?: unknown } = {}) {
    const { retryAfterMs: _retryAfter, ...shown } = details;
    const defined = Object.fromEntries(Object.entries(shown).filter(([, value]) => value !== undefined));
    super(STORAGE_ERROR_CODES[reason], message, { reason, ...defined }, options.cause === undefined ? undefined : { cause: options.cause });
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
