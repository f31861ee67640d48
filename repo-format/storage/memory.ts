/**
 * A Storage held in this process's memory (restic's mem backend): the contract with nothing in the way, for
 * tests of what sits above the storage (decorators, and later the repository) and as the reference the
 * conformance suite checks itself against. Not for data anyone keeps.
 */
import { readFile } from 'node:fs/promises';
import { StorageError } from './storage-error.js';
import {
  checkKey,
  checkPrefix,
  checkRange,
  compareKeys,
  DEFAULT_MAX_GET_SIZE,
  throwIfAborted,
  type CallOptions,
  type GetOptions,
  type ListOptions,
  type ObjectInfo,
  type PutOptions,
  type PutSource,
  type Storage,
  type StorageProperties,
} from './storage.js';

/** Keys per listing page: a listing copies one page at a time, as a remote backend would. */
const PAGE = 1000;

export class MemoryStorage implements Storage {
  readonly properties: StorageProperties;
  private readonly objects = new Map<string, Buffer>();
  /** When each object was last written (this process's clock: memory shares the host's). */
  private readonly modified = new Map<string, number>();

  constructor(name = 'memory') {
    this.properties = {
      location: `memory:${name}`,
      atomicCreate: true,
      consistentListing: true,
      objectLock: false,
      connections: 64,
      maxObjectSize: 2 ** 31,
    };
  }

  private fail(reason: 'not-found' | 'exists' | 'out-of-range' | 'too-large', operation: string, key: string, message: string): StorageError {
    return new StorageError(reason, `${this.properties.location}: ${operation} ${key}: ${message}`, { location: this.properties.location, key, operation });
  }

  async put(key: string, source: PutSource, options: PutOptions = {}): Promise<void> {
    checkKey(key);
    throwIfAborted(options.signal, this.properties.location, 'put', key);
    const bytes = source instanceof Uint8Array ? Buffer.from(source) : await readFile(source.file);
    throwIfAborted(options.signal, this.properties.location, 'put', key);
    if (options.ifAbsent && this.objects.has(key)) throw this.fail('exists', 'put', key, 'the key already holds an object');
    this.objects.set(key, bytes);
    this.modified.set(key, Date.now());
  }

  async get(key: string, options: GetOptions = {}): Promise<Buffer> {
    checkKey(key);
    if (options.range) checkRange(options.range);
    throwIfAborted(options.signal, this.properties.location, 'get', key);
    const object = this.objects.get(key);
    if (!object) throw this.fail('not-found', 'get', key, 'no such object');
    if (!options.range) {
      const maxSize = options.maxSize ?? DEFAULT_MAX_GET_SIZE;
      if (object.length > maxSize) throw this.fail('too-large', 'get', key, `the object holds ${object.length} bytes, more than the ${maxSize} expected`);
      return Buffer.from(object);
    }
    const { offset, length } = options.range;
    if (offset + length > object.length) throw this.fail('out-of-range', 'get', key, `bytes ${offset}..${offset + length - 1} asked, the object holds ${object.length}`);
    return Buffer.from(object.subarray(offset, offset + length));
  }

  async stat(key: string, options: CallOptions = {}): Promise<ObjectInfo> {
    checkKey(key);
    throwIfAborted(options.signal, this.properties.location, 'stat', key);
    const object = this.objects.get(key);
    if (!object) throw this.fail('not-found', 'stat', key, 'no such object');
    return { key, size: object.length, modified: this.modified.get(key) };
  }

  async *list(prefix: string, options: ListOptions = {}): AsyncIterable<ObjectInfo> {
    checkPrefix(prefix);
    let after = options.startAfter;
    for (;;) {
      throwIfAborted(options.signal, this.properties.location, 'list', prefix);
      const page = [...this.objects.keys()]
        .filter((key) => key.startsWith(prefix) && (after === undefined || compareKeys(key, after) > 0))
        .sort(compareKeys)
        .slice(0, PAGE);
      for (const key of page) {
        const object = this.objects.get(key);
        if (object) yield { key, size: object.length, modified: this.modified.get(key) };
      }
      if (page.length < PAGE) return;
      after = page[page.length - 1];
    }
  }

  async delete(key: string, options: CallOptions = {}): Promise<void> {
    checkKey(key);
    throwIfAborted(options.signal, this.properties.location, 'delete', key);
    this.objects.delete(key);
    this.modified.delete(key);
  }

  /**
   * Stores bytes under any key, the rule unchecked: an object another program wrote, or one changed behind
   * the engine's back (tests of what meets such objects).
   */
  putForeign(key: string, bytes: Uint8Array): void {
    this.objects.set(key, Buffer.from(bytes));
    this.modified.set(key, Date.now());
  }

  async close(): Promise<void> {}
}
