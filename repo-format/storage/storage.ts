/**
 * The one door to a repository's bytes: every object of a repository (config, key file, packs, index
 * segments, records, leases) is written, read, listed and removed through a Storage. Backends: the local
 * folder and S3 (s3.ts); an in-memory one (memory.ts) for tests of what sits above. Decorators wrap any
 * backend with the same interface: retries (retry.ts), a concurrency limit (limit.ts), injected faults
 * (faults.ts). test/storage-conformance.test.ts holds every backend to this contract, failures included.
 *
 * Shaped after restic's backend (internal/backend/backend.go: Save/Load/Stat/List/Remove, Properties,
 * IsNotExist/IsPermanentError, decorators), with what this engine needs on top: create-if-absent for records
 * and leases, uploads straight from a local file (packs are built in a temporary file), ranged reads with
 * many in flight, listings that stream in bounded memory, and capabilities a many-writers protocol must
 * check before it relies on them.
 *
 * The contract (every backend, every decorator):
 * - Keys are relative to the storage's root: segments of [A-Za-z0-9._-] starting with a letter or digit,
 *   joined by "/" (checkKey). A key is written once by the engine's protocol; `put` replaces atomically
 *   (a reader sees the old object or the new one, whole, never a part), `put` with `ifAbsent` creates or
 *   fails with reason 'exists', and of any number of concurrent creators of one key exactly one succeeds
 *   when `properties.atomicCreate` is true.
 * - `get` without a range returns the whole object (at most `maxSize` bytes, else 'too-large'); with a
 *   range it returns exactly `length` bytes or fails: 'out-of-range' when the object is shorter than
 *   offset + length (an object cut behind the engine's back is never read as a short success).
 * - `list(prefix)` yields every object whose key starts with `prefix`, each exactly once, in ascending order
 *   of the keys' UTF-8 bytes, page by page: memory does not grow with the number of objects. `startAfter`
 *   resumes after a key (exclusive). Objects the engine did not write are yielded with their keys as
 *   they are, even keys outside the rule (a bucket is shared with other programs: the engine must be able
 *   to see that a prefix is not empty); the local folder is the exception, it yields only files whose
 *   names are keys (never its temporary files), as a folder's other files are found by its own checks.
 * - `delete` of an absent object succeeds (it is the outcome the caller wants).
 * - Failures are StorageError (storage-error.ts) with a reason; `transient` ones may be retried.
 * - An aborted signal ends the call promptly with an InterruptedError (ENGINE_INTERRUPTED); what it was doing is
 *   either done whole or not at all, as for any failure.
 * - `sweepAbandoned`, where a backend has it, removes only what its own interrupted writes left, never an
 *   object and never another program's file.
 * - `time`, where a backend has it, reads the store's own clock (S3: the Date header of an answer), for
 *   protocols that must bound the skew between hosts (leases). A backend without it (the local folder,
 *   memory) shares this host's clock: there is no skew to measure.
 */
import { InterruptedError, InvalidArgumentError } from '../errors.js';

export interface ObjectInfo {
  /** Relative to the storage's root. */
  key: string;
  size: number;
  /**
   * When the object was last written, in milliseconds since the epoch by the store's own clock (S3:
   * Last-Modified in a HEAD, LastModified in a listing, whole seconds; a folder: the file's mtime, set by the
   * host or file server that stores it). The many-writers protocol reads the store's clock from it to check
   * the local clock's skew (SPEC.md 19.6) and the age of objects gc may delete; backends set it in `stat`
   * and `list` when they can, and it is undefined when they cannot.
   */
  modified?: number | undefined;
}

export interface ByteRange {
  offset: number;
  /** At least 1. */
  length: number;
}

/**
 * What `put` uploads: bytes in memory, or a local file read as it is sent (packs: up to 32 MiB). `md5`, the
 * base64 MD5 of the file's bytes as its writer computed them while it wrote them (a pack: PackWriter), spares
 * a backend that checksums uploads (S3's Content-MD5) a second read of the file; the store then checks the
 * bytes it receives against what was written, the local file in between included. Backends that do not
 * checksum uploads ignore it.
 */
export type PutSource = Uint8Array | { file: string; md5?: string | undefined };

export interface CallOptions {
  /** Ends the call promptly (ENGINE_INTERRUPTED) when aborted. */
  signal?: AbortSignal | undefined;
  /**
   * S3 with versioning only (SPEC.md 20.5): get, stat or delete this version of the key rather than its
   * current one (a delete then removes that version for good, where S3's plain DELETE only adds a delete
   * marker). The engine passes it to S3 storages only: the folder and memory backends have no versions.
   */
  versionId?: string | undefined;
}

export interface PutOptions extends CallOptions {
  /** Create only: fail with reason 'exists' when the key holds an object (S3: If-None-Match: *). */
  ifAbsent?: boolean | undefined;
}

export interface GetOptions extends CallOptions {
  /** Only these bytes; exactly `length` of them or 'out-of-range'. */
  range?: ByteRange | undefined;
  /** A whole-object read refuses larger objects ('too-large'); default DEFAULT_MAX_GET_SIZE. */
  maxSize?: number | undefined;
  /**
   * With `range`: where the bytes may be placed (at least range.length bytes), so that a reader filling the
   * same buffer again and again allocates nothing per read. A backend may ignore it: the result is always
   * what was read, a view of `into` or not.
   */
  into?: Buffer | undefined;
}

export interface ListOptions extends CallOptions {
  /** Only keys after this one (exclusive). */
  startAfter?: string | undefined;
}

export interface StorageProperties {
  /** Where, for messages: s3://bucket/prefix, or the folder's path. */
  location: string;
  /** `put` with `ifAbsent` is atomic: of concurrent creators of a key exactly one succeeds. */
  atomicCreate: boolean;
  /** A listing started after a put or delete completed reflects it (read-after-write for lists). */
  consistentListing: boolean;
  /** Objects can be made immutable until a date (S3 Object Lock, SPEC.md 20.5): the backend can write them so. */
  objectLock: boolean;
  /** How many operations this backend serves well at once (the concurrency limit's default). */
  connections: number;
  /** The largest object `put` can store. */
  maxObjectSize: number;
}

/** The store's clock against this host's, read from one answer. */
export interface StoreTime {
  /** The store's time (ms since the epoch) when it answered; S3's Date header has a resolution of 1 s. */
  storeMs: number;
  /** This host's time (ms since the epoch) halfway through the request. */
  localMs: number;
  /**
   * How far the true difference may be from `localMs - storeMs`: half the round trip plus the store's
   * resolution. A skew check passes only when |localMs - storeMs| + uncertaintyMs is within its bound.
   */
  uncertaintyMs: number;
}

export interface Storage {
  readonly properties: StorageProperties;
  /** The store's clock; absent when the store shares this host's clock (see the contract above). */
  time?(options?: CallOptions): Promise<StoreTime>;
  put(key: string, source: PutSource, options?: PutOptions): Promise<void>;
  get(key: string, options?: GetOptions): Promise<Buffer>;
  stat(key: string, options?: CallOptions): Promise<ObjectInfo>;
  list(prefix: string, options?: ListOptions): AsyncIterable<ObjectInfo>;
  delete(key: string, options?: CallOptions): Promise<void>;
  /**
   * Removes what writes of this storage that never finished left behind where no listing shows it (a
   * folder: temporary files beside their targets; S3: incomplete multipart uploads under the root), begun
   * before `olderThan` (ms since the epoch, by the store's clock, as `ObjectInfo.modified`); returns how many.
   * Absent where a backend leaves nothing of the kind (memory). The caller picks `olderThan` so that no
   * writer still running can own what goes (SPEC.md 19.8); even one that did would only see its put fail.
   */
  sweepAbandoned?(olderThan: number, options?: CallOptions): Promise<number>;
  /** Releases connections and handles; the storage is not used afterwards. */
  close(): Promise<void>;
}

/** A whole-object read without `maxSize` refuses objects larger than this: a pack (32 MiB) and ample room. */
export const DEFAULT_MAX_GET_SIZE = 256 * 1024 * 1024;

/** S3's limit for a key, in UTF-8 bytes (the root prefix counts too). */
export const MAX_KEY_BYTES = 1024;

const SEGMENT = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;

/** Why `key` is not a valid storage key, or undefined when it is. */
export function keyProblem(key: string): string | undefined {
  if (typeof key !== 'string' || key.length === 0) return 'a key is not empty';
  if (Buffer.byteLength(key, 'utf8') > MAX_KEY_BYTES) return `a key holds at most ${MAX_KEY_BYTES} bytes`;
  for (const segment of key.split('/')) {
    if (!SEGMENT.test(segment)) return 'a key is made of segments of letters, digits, ".", "_" and "-", each starting with a letter or digit, joined by "/"';
  }
  return undefined;
}

/** Throws InvalidArgumentError (a caller's bug, never retried) for a key outside the rule. */
export function checkKey(key: string): void {
  const problem = keyProblem(key);
  if (problem) throw new InvalidArgumentError(`invalid storage key ${JSON.stringify(key.slice(0, 200))}: ${problem}`, { key: key.slice(0, 200) });
}

/** A listing prefix: empty (everything), or a key or the start of one. */
export function checkPrefix(prefix: string): void {
  if (prefix === '') return;
  const trimmed = prefix.endsWith('/') ? prefix.slice(0, -1) : prefix;
  // The last segment may be cut anywhere after its first character ("packs/a" lists packs/a0…/…).
  const problem = keyProblem(trimmed);
  if (problem) throw new InvalidArgumentError(`invalid storage prefix ${JSON.stringify(prefix.slice(0, 200))}: ${problem}`, { prefix: prefix.slice(0, 200) });
}

/** Offsets and lengths are safe integers (never bitwise-mangled); a range asks for at least one byte. */
export function checkRange(range: ByteRange): void {
  if (!Number.isSafeInteger(range.offset) || range.offset < 0 || !Number.isSafeInteger(range.length) || range.length < 1) {
    throw new InvalidArgumentError(`invalid byte range: offset ${range.offset}, length ${range.length} (offset >= 0, length >= 1, integers)`, { ...range });
  }
}

/**
 * The error an aborted call ends with: an InterruptedError, so that the operation around the call knows it
 * for an interruption (and says it as its own: "backup was interrupted (SIGINT); …"), not as a failure.
 */
export function interruptedError(location: string, operation: string, key?: string): InterruptedError {
  return new InterruptedError(`storage ${operation}${key ? ` of ${key}` : ''} at ${location}`, null, undefined, { location, operation, key });
}

/** Throws the interruption at once when the signal has already fired. */
export function throwIfAborted(signal: AbortSignal | undefined, location: string, operation: string, key?: string): void {
  if (signal?.aborted) throw interruptedError(location, operation, key);
}

/** Compares two keys by their UTF-8 bytes (S3's listing order), which for ASCII keys is string order. */
export function compareKeys(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8'));
}
