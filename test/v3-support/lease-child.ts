/**
 * One OS process of the lease tests (v3-leases-processes.test.ts), run by Node as it is (type stripping, so
 * erasable syntax only):
 *   lease-child.ts ROOT LOG CACHE KIND ROUNDS [die-holding]
 * CACHE is the host's cache directory: its host-id makes the process's host (two directories, two hosts).
 * Takes a KIND (shared | exclusive) lease on the folder repository ROOT ROUNDS times; while holding, appends
 * "enter"/"exit" lines to LOG (O_APPEND: one total order of events across processes). With die-holding it
 * takes the lease once, says so, and kills itself with SIGKILL while holding it.
 */
import { appendFileSync } from 'node:fs';
import { Leases } from '../../dist/repo-format/v3/leases.js';
import { systemClock } from '../../dist/repo-format/v3/clock.js';
import { hostIdOf, processProbe, thisProcess } from '../../dist/repo-format/v3/host.js';
import { stat } from 'node:fs/promises';
import { LocalStorage } from '../../dist/repo-format/storage/local.js';
import type { CallOptions, GetOptions, ListOptions, ObjectInfo, PutOptions, PutSource, Storage, StorageProperties } from '../../dist/repo-format/storage/storage.js';

/**
 * The local backend with `modified` from each file's mtime (what the lease protocol checks the clock against;
 * SPEC.md 19.6), until local.ts reports it itself.
 */
class MtimeStorage implements Storage {
  readonly inner: LocalStorage;

  constructor(root: string) {
    this.inner = new LocalStorage(root);
  }

  get properties(): StorageProperties {
    return this.inner.properties;
  }

  private async withTime(info: ObjectInfo): Promise<ObjectInfo> {
    try {
      return { ...info, modified: (await stat(this.inner.pathOf(info.key))).mtimeMs };
    } catch {
      return info;
    }
  }

  put(key: string, source: PutSource, options?: PutOptions): Promise<void> {
    return this.inner.put(key, source, options);
  }

  get(key: string, options?: GetOptions): Promise<Buffer> {
    return this.inner.get(key, options);
  }

  async stat(key: string, options?: CallOptions): Promise<ObjectInfo> {
    return this.withTime(await this.inner.stat(key, options));
  }

  async *list(prefix: string, options?: ListOptions): AsyncIterable<ObjectInfo> {
    for await (const info of this.inner.list(prefix, options)) yield await this.withTime(info);
  }

  delete(key: string, options?: CallOptions): Promise<void> {
    return this.inner.delete(key, options);
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}

const [root, log, cache, kind, roundsText, mode] = process.argv.slice(2);
if (!root || !log || !cache || (kind !== 'shared' && kind !== 'exclusive')) throw new Error('usage: lease-child ROOT LOG CACHE shared|exclusive ROUNDS [die-holding]');
const storage = new MtimeStorage(root);
const leases = new Leases({
  storage,
  clock: systemClock,
  holder: thisProcess(await hostIdOf(cache)),
  probe: processProbe,
  // By default leases far longer than the test: only release, or a dead process seen on this host, frees
  // one. LEASE_MS and SKEW_MS shorten them for the tests of expiry across hosts.
  timing: { leaseMs: Number(process.env.LEASE_MS ?? 600_000), skewBoundMs: Number(process.env.SKEW_MS ?? 60_000), pollMs: 20 },
  onBroken: (lease, state) => appendFileSync(log, `broken ${lease.kind} ${lease.pid} ${state} by ${process.pid}\n`),
});
const rounds = Number(roundsText ?? '1');
for (let round = 0; round < rounds; round++) {
  const held = kind === 'exclusive' ? await leases.acquireExclusive({ command: 'test', waitMs: 120_000 }) : await leases.acquireShared({ command: 'test', waitMs: 120_000 });
  held.assertHeld();
  appendFileSync(log, `enter ${kind} ${process.pid} ${round}\n`);
  if (mode === 'die-holding') process.kill(process.pid, 'SIGKILL');
  await new Promise((resolve) => setTimeout(resolve, Math.random() * 15));
  held.assertHeld();
  appendFileSync(log, `exit ${kind} ${process.pid} ${round}\n`);
  await held.release();
}
