/**
 * A Storage decorator for tests: stamps each object's `modified` with a store clock the test controls (the
 * memory backend keeps no times), and may pass every operation through a gate first (a fast-check scheduler
 * deciding the interleaving of concurrent callers).
 */
import type { CallOptions, GetOptions, ListOptions, ObjectInfo, PutOptions, PutSource, Storage, StorageProperties } from '../../dist/repo-format/storage/storage.js';

export class ClockedStorage implements Storage {
  private readonly times = new Map<string, number>();
  /** When false, stat and list report no modification times (a backend that cannot tell). */
  reportTimes = true;

  constructor(
    private readonly inner: Storage,
    private readonly storeNow: () => number,
    private readonly gate: (what: string) => Promise<void> = async () => undefined,
  ) {}

  get properties(): StorageProperties {
    return this.inner.properties;
  }

  async put(key: string, source: PutSource, options?: PutOptions): Promise<void> {
    await this.gate(`put ${key}`);
    await this.inner.put(key, source, options);
    this.times.set(key, Math.floor(this.storeNow() / 1000) * 1000);
  }

  async get(key: string, options?: GetOptions): Promise<Buffer> {
    await this.gate(`get ${key}`);
    return this.inner.get(key, options);
  }

  async stat(key: string, options?: CallOptions): Promise<ObjectInfo> {
    await this.gate(`stat ${key}`);
    const info = await this.inner.stat(key, options);
    return { ...info, modified: this.reportTimes ? this.times.get(key) : undefined };
  }

  async *list(prefix: string, options?: ListOptions): AsyncIterable<ObjectInfo> {
    await this.gate(`list ${prefix}`);
    // A listing is one request here: its page is taken at once, as one S3 page is.
    const page: ObjectInfo[] = [];
    for await (const info of this.inner.list(prefix, options)) page.push({ ...info, modified: this.reportTimes ? this.times.get(info.key) : undefined });
    yield* page;
  }

  async delete(key: string, options?: CallOptions): Promise<void> {
    await this.gate(`delete ${key}`);
    await this.inner.delete(key, options);
    this.times.delete(key);
  }

  async close(): Promise<void> {
    await this.inner.close();
  }
}
