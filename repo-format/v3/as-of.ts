/**
 * A point-in-time view of an S3 repository in a versioned bucket (SPEC.md 20.5, `--as-of TIME`): for each
 * key, the newest version written at or before TIME, or nothing when that is a delete marker (or there is
 * none). What an attacker with the engine's credentials did after TIME — deletes (delete markers),
 * overwrites (newer versions) — is not seen; the versions it hid are read by their version ids, which Object
 * Lock keeps for the retention. Read-only: put and delete are refused, nothing is ever written.
 *
 * The view is listed once, at open (ListObjectVersions over the prefix): it holds one small entry per key
 * in memory (the repository's objects, not its blocks: a key, a version id, a size, a time).
 */
import { StorageError } from '../storage/storage-error.js';
import {
  checkKey,
  checkPrefix,
  compareKeys,
  throwIfAborted,
  type CallOptions,
  type GetOptions,
  type ListOptions,
  type ObjectInfo,
  type PutSource,
  type Storage,
  type StorageProperties,
} from '../storage/storage.js';
import { s3BackendOf } from './location.js';
import { InvalidArgumentError } from '../errors.js';

interface Pinned {
  versionId: string;
  size: number;
  modified: number | undefined;
}

export class AsOfStorage implements Storage {
  readonly properties: StorageProperties;
  /** Sorted by UTF-8 bytes, as a listing is. */
  private readonly keys: string[];

  private constructor(
    private readonly inner: Storage,
    private readonly pinned: Map<string, Pinned>,
    /** The time the view shows, ms since the epoch. */
    readonly asOf: number,
  ) {
    this.keys = [...pinned.keys()].sort(compareKeys);
    this.properties = { ...inner.properties, location: `${inner.properties.location} (as of ${new Date(asOf).toISOString()})` };
  }

  /** Lists every version under the repository's root and pins, for each key, the one of `asOf`. */
  static async open(inner: Storage, asOf: number, signal?: AbortSignal): Promise<AsOfStorage> {
    const backend = s3BackendOf(inner);
    if (!backend) throw new InvalidArgumentError(`--as-of reads the versions of an S3 bucket: ${inner.properties.location} is not on S3`);
    const pinned = new Map<string, Pinned>();
    let current: string | undefined;
    let decided = false;
    for await (const version of backend.listVersions('', { signal })) {
      if (version.key !== current) {
        current = version.key;
        decided = false;
      }
      // Newest first within a key: the first one not after asOf is the key's state then.
      if (decided || version.modified === undefined || version.modified > asOf) continue;
      decided = true;
      if (!version.deleteMarker) pinned.set(version.key, { versionId: version.versionId, size: version.size, modified: version.modified });
    }
    return new AsOfStorage(inner, pinned, asOf);
  }

  private notFound(operation: string, key: string): StorageError {
    return new StorageError('not-found', `${this.properties.location}: ${operation} ${key}: no version of it existed then`, { location: this.properties.location, operation, key });
  }

  private readOnly(operation: string, key: string): StorageError {
    return new StorageError('denied', `${this.properties.location}: ${operation} ${key}: a point-in-time view (--as-of) is read-only`, { location: this.properties.location, operation, key });
  }

  async put(key: string, _source: PutSource): Promise<void> {
    checkKey(key);
    throw this.readOnly('put', key);
  }

  async delete(key: string): Promise<void> {
    checkKey(key);
    throw this.readOnly('delete', key);
  }

  async get(key: string, options: GetOptions = {}): Promise<Buffer> {
    checkKey(key);
    const pin = this.pinned.get(key);
    if (!pin) throw this.notFound('get', key);
    return this.inner.get(key, { ...options, versionId: pin.versionId });
  }

  async stat(key: string, _options: CallOptions = {}): Promise<ObjectInfo> {
    checkKey(key);
    const pin = this.pinned.get(key);
    if (!pin) throw this.notFound('stat', key);
    return { key, size: pin.size, modified: pin.modified };
  }

  async *list(prefix: string, options: ListOptions = {}): AsyncIterable<ObjectInfo> {
    checkPrefix(prefix);
    for (const key of this.keys) {
      if (!key.startsWith(prefix)) continue;
      if (options.startAfter !== undefined && compareKeys(key, options.startAfter) <= 0) continue;
      throwIfAborted(options.signal, this.properties.location, 'list', prefix);
      const pin = this.pinned.get(key)!;
      yield { key, size: pin.size, modified: pin.modified };
    }
  }

  async close(): Promise<void> {
    await this.inner.close();
  }
}

/** `--as-of TIME`: an ISO 8601 time (with a zone, or UTC when it has none) or @SECONDS since the epoch. */
export function parseAsOf(text: string): number {
  const trimmed = text.trim();
  const epoch = /^@(\d+)$/.exec(trimmed);
  const ms = epoch ? Number(epoch[1]) * 1000 : Date.parse(/[zZ]|[+-]\d\d:?\d\d$/.test(trimmed) || !/T|\d:\d/.test(trimmed) ? trimmed : `${trimmed}Z`);
  if (!Number.isFinite(ms)) throw new InvalidArgumentError(`--as-of ${JSON.stringify(text.slice(0, 80))}: not a time (give ISO 8601, e.g. 2026-12-07T12:00:00Z, or @SECONDS since the epoch)`);
  if (ms > Date.now() + 60_000) throw new InvalidArgumentError(`--as-of ${text}: that time is in the future`);
  return ms;
}
