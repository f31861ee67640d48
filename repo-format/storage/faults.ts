/**
 * Injected faults (restic's mock and dryrun backends, and its fault-injecting tests): a decorator that
 * makes chosen calls fail, before they reach the backend (the request was lost) or after the backend did
 * its work (the answer was lost). For tests of whatever sits above a Storage, on any backend: the local
 * folder, memory, or S3 (where test/s3-fault-proxy.ts breaks the wire itself).
 */
import { StorageError, type StorageFailure } from './storage-error.js';
import type { CallOptions, GetOptions, ListOptions, ObjectInfo, PutOptions, PutSource, Storage, StoreTime } from './storage.js';

export type StorageOperation = 'put' | 'get' | 'stat' | 'list' | 'delete';

export interface FaultCall {
  operation: StorageOperation;
  key: string;
}

export interface FaultRule {
  /** Which calls (default: all). */
  operation?: StorageOperation | StorageOperation[];
  /** Keys (a list: its prefix) starting with this string, or matching this pattern (default: all). */
  key?: string | RegExp;
  /** Matching calls let through before the rule starts failing (default 0). */
  skip?: number;
  /** Matching calls that fail, after which the rule is spent (default: every one). */
  times?: number;
  /** Chance that a matching call (past `skip`) fails, drawn from the storage's `random` (default 1). */
  probability?: number;
  /** 'before' (default): the backend never sees the call; 'after': it does the work, then the call fails. */
  when?: 'before' | 'after';
  /** A listing fails after yielding this many objects (default 0). */
  afterItems?: number;
  /** The error (default: a transient 'unavailable'). */
  error?: (call: FaultCall) => Error;
}

interface ActiveRule extends FaultRule {
  seen: number;
  failed: number;
}

/** A transient failure as a store would give it: what the retry decorator must ride out. */
export function injectedFailure(reason: StorageFailure = 'unavailable', transient = reason === 'unavailable'): (call: FaultCall) => StorageError {
  return (call) => new StorageError(reason, `injected fault: ${call.operation} ${call.key} failed (${reason})`, { location: 'fault-injection', key: call.key, operation: call.operation, backendCode: 'INJECTED' }, { transient });
}

export class FaultInjectingStorage implements Storage {
  private rules: ActiveRule[] = [];
  /** Every fault injected so far, in order. */
  readonly injected: (FaultCall & { when: 'before' | 'after' })[] = [];
  readonly time?: (options?: CallOptions) => Promise<StoreTime>;
  readonly sweepAbandoned?: (olderThan: number, options?: CallOptions) => Promise<number>;

  constructor(
    readonly inner: Storage,
    rules: FaultRule[] = [],
    /** For `probability`: a seeded generator makes a run repeatable. */
    private readonly random: () => number = Math.random,
  ) {
    for (const rule of rules) this.addRule(rule);
    const time = inner.time?.bind(inner);
    if (time) this.time = time;
    const sweep = inner.sweepAbandoned?.bind(inner);
    if (sweep) this.sweepAbandoned = sweep;
  }

  get properties(): Storage['properties'] {
    return this.inner.properties;
  }

  addRule(rule: FaultRule): void {
    this.rules.push({ ...rule, seen: 0, failed: 0 });
  }

  clearRules(): void {
    this.rules = [];
  }

  /** The rule that fails this call, if any (counting the call against every rule it matches). */
  private match(call: FaultCall): ActiveRule | undefined {
    let chosen: ActiveRule | undefined;
    for (const rule of this.rules) {
      const operations = rule.operation === undefined ? undefined : Array.isArray(rule.operation) ? rule.operation : [rule.operation];
      if (operations && !operations.includes(call.operation)) continue;
      if (rule.key !== undefined && !(typeof rule.key === 'string' ? call.key.startsWith(rule.key) : rule.key.test(call.key))) continue;
      rule.seen += 1;
      if (chosen || rule.seen <= (rule.skip ?? 0) || rule.failed >= (rule.times ?? Infinity)) continue;
      if (rule.probability !== undefined && this.random() >= rule.probability) continue;
      rule.failed += 1;
      chosen = rule;
    }
    return chosen;
  }

  private async call<T>(operation: StorageOperation, key: string, run: () => Promise<T>): Promise<T> {
    const rule = this.match({ operation, key });
    if (!rule) return run();
    const when = rule.when ?? 'before';
    if (when === 'after') await run();
    this.injected.push({ operation, key, when });
    throw (rule.error ?? injectedFailure())({ operation, key });
  }

  put(key: string, source: PutSource, options?: PutOptions): Promise<void> {
    return this.call('put', key, () => this.inner.put(key, source, options));
  }

  get(key: string, options?: GetOptions): Promise<Buffer> {
    return this.call('get', key, () => this.inner.get(key, options));
  }

  stat(key: string, options?: CallOptions): Promise<ObjectInfo> {
    return this.call('stat', key, () => this.inner.stat(key, options));
  }

  delete(key: string, options?: CallOptions): Promise<void> {
    return this.call('delete', key, () => this.inner.delete(key, options));
  }

  async *list(prefix: string, options?: ListOptions): AsyncIterable<ObjectInfo> {
    const rule = this.match({ operation: 'list', key: prefix });
    let yielded = 0;
    for await (const info of this.inner.list(prefix, options)) {
      if (rule && yielded >= (rule.afterItems ?? 0)) break;
      yielded += 1;
      yield info;
    }
    if (rule) {
      this.injected.push({ operation: 'list', key: prefix, when: 'before' });
      throw (rule.error ?? injectedFailure())({ operation: 'list', key: prefix });
    }
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
