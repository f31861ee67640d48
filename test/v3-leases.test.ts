/**
 * Leases (SPEC.md 19.5, 20.6) in one process, over the memory backend with a fake clock: exclusivity under
 * every interleaving a fast-check scheduler provokes among many acquirers; dead same-host holders broken at
 * once; other hosts' leases only after expiry plus twice the clock bound; the skew check against the store's
 * clock; a holder that is not refreshed in time, or whose lease is removed, stops with ENGINE_LEASE_LOST.
 * The lease records' codec: round trip and refusals. Real OS processes: v3-leases-processes.test.ts.
 */
import { describe, expect, test } from 'vitest';
import fc from 'fast-check';
import { MemoryStorage } from '../dist/repo-format/storage/memory.js';
import { DEFAULT_LEASE_TIMING, HeldLease, Leases, checkSkew, type LeaseContext } from '../dist/repo-format/v3/leases.js';
import { decodeLease, encodeLease, judgeLease, leaseKey, type Lease, type LeaseHolder } from '../dist/repo-format/v3/lease.js';
import { EngineError } from '../dist/repo-format/errors.js';
import { StorageError } from '../dist/repo-format/storage/storage-error.js';
import type { CallOptions, GetOptions, ListOptions, ObjectInfo, PutOptions, PutSource, Storage } from '../dist/repo-format/storage/storage.js';
import { FakeClock } from './v3-support/fake-clock.js';
import { ClockedStorage } from './v3-support/clocked-storage.js';

const T = DEFAULT_LEASE_TIMING.leaseMs;
const B = DEFAULT_LEASE_TIMING.skewBoundMs;

function holder(n: number, host = 'a'.repeat(32), boot = 'boot-1'): LeaseHolder {
  return { host, hostname: `host-${host.slice(0, 4)}`, boot, pid: 1000 + n, start: String(50 + n) };
}

/** Processes of the fake host: pid → alive. */
class FakeProcesses {
  readonly dead = new Set<number>();
  probe = (pid: number): 'alive' | 'dead' => (this.dead.has(pid) ? 'dead' : 'alive');
}

let ids = 0;
function context(storage: ClockedStorage, clock: FakeClock, who: LeaseHolder, processes: FakeProcesses, extra: Partial<LeaseContext> = {}): LeaseContext {
  return { storage, clock, holder: who, probe: processes.probe, newId: () => (ids++).toString(16).padStart(32, '0'), ...extra };
}

async function keysOf(storage: ClockedStorage): Promise<string[]> {
  const keys: string[] = [];
  for await (const info of storage.list('leases/')) keys.push(info.key);
  return keys;
}

async function codeOf(promise: Promise<unknown>): Promise<string> {
  try {
    await promise;
    return 'ok';
  } catch (error) {
    if (error instanceof EngineError) return error.code;
    throw error;
  }
}

function setup(storeOffsetMs = 0) {
  const clock = new FakeClock();
  // The store keeps true time: stepping this host's wall clock does not move it.
  const start = clock.wall() - clock.monotonic();
  const storage = new ClockedStorage(new MemoryStorage(), () => start + clock.monotonic() + storeOffsetMs);
  const processes = new FakeProcesses();
  return { clock, storage, processes };
}

describe('lease records', () => {
  const lease: Lease = {
    version: 1, id: 'f'.repeat(32), kind: 'exclusive-pending', ...holder(1), command: 'gc',
    since: '2026-12-06T12:00:00.000Z', expires: '2026-12-06T12:05:00.000Z',
  };

  test('round trip; a lease under another key, or with a bad field, is refused with a reason', () => {
    expect(decodeLease(encodeLease(lease), leaseKey(lease.id))).toEqual(lease);
    expect(decodeLease(encodeLease(lease), leaseKey('e'.repeat(32)))).toMatch(/names itself/);
    for (const [field, value] of [['kind', 'exclusive-ish'], ['pid', -1], ['expires', 'tomorrow'], ['host', 'xyz'], ['version', 2], ['command', 7]] as const) {
      expect(typeof decodeLease(Buffer.from(JSON.stringify({ ...lease, [field]: value })), leaseKey(lease.id))).toBe('string');
    }
    expect(decodeLease(Buffer.alloc(20000, 32), leaseKey(lease.id))).toMatch(/more than a lease/);
  });

  test('random bytes are refused with a reason, never a throw', () => {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 300 }), (bytes) => {
      expect(typeof decodeLease(Buffer.from(bytes), leaseKey(lease.id))).toBe('string');
    }), { numRuns: 300 });
  });

  test('judgement: other host by expiry + 2B; same host and boot by the process; an earlier boot is dead', () => {
    const expires = Date.parse(lease.expires);
    const probeAlive = () => 'alive' as const;
    const other = { host: 'b'.repeat(32), boot: 'boot-9', skewBoundMs: B };
    expect(judgeLease(lease, { ...other, now: expires + 2 * B }, probeAlive)).toBe('live');
    expect(judgeLease(lease, { ...other, now: expires + 2 * B + 1 }, probeAlive)).toBe('expired');
    const same = { host: lease.host, boot: lease.boot, skewBoundMs: B, now: expires - 1000 };
    expect(judgeLease(lease, same, probeAlive)).toBe('live');
    expect(judgeLease(lease, same, () => 'dead')).toBe('dead');
    expect(judgeLease(lease, { ...same, boot: 'boot-2' }, probeAlive)).toBe('dead');
  });
});

describe('acquiring', () => {
  test('shared leases coexist; an exclusive acquirer waits for them, then holds alone', async () => {
    const { clock, storage, processes } = setup();
    const a = await new Leases(context(storage, clock, holder(1), processes)).acquireShared({ command: 'backup' });
    const b = await new Leases(context(storage, clock, holder(2), processes)).acquireShared({ command: 'restore' });
    expect(await codeOf(new Leases(context(storage, clock, holder(3), processes)).acquireExclusive({ command: 'gc' }))).toBe('ENGINE_REPOSITORY_LOCKED');
    // Nothing left behind by the refusal: the two shared leases only.
    expect((await keysOf(storage))).toEqual([a.key, b.key].sort());
    await a.release();
    await b.release();
    const x = await new Leases(context(storage, clock, holder(3), processes)).acquireExclusive({ command: 'gc' });
    expect(x.kind).toBe('exclusive');
    expect(await codeOf(new Leases(context(storage, clock, holder(4), processes)).acquireShared({ command: 'backup' }))).toBe('ENGINE_REPOSITORY_LOCKED');
    await x.release();
    expect(await keysOf(storage)).toEqual([]);
  });

  test('writer preference: a pending exclusive lease holds new shared acquirers back, for at most its wait', async () => {
    const { clock, storage, processes } = setup();
    const backup = await new Leases(context(storage, clock, holder(1), processes)).acquireShared({ command: 'backup' });
    const gc = codeOf(new Leases(context(storage, clock, holder(2), processes)).acquireExclusive({ command: 'gc', waitMs: 60_000 }));
    await clock.advance(1); // gc has written its pending lease and sleeps
    const late = new Leases(context(storage, clock, holder(3), processes)).acquireShared({ command: 'backup', waitMs: 10 * 60_000 });
    await clock.advance(10_000);
    let lateDone = false;
    void late.then(() => (lateDone = true), () => (lateDone = true));
    await clock.advance(10_000);
    expect(lateDone).toBe(false); // held back by the pending gc
    await clock.advance(60_000); // gc gives up: its preference is bounded by its wait
    expect(await gc).toBe('ENGINE_REPOSITORY_LOCKED');
    await clock.advance(10_000);
    const lateLease = await late;
    expect(lateLease.kind).toBe('shared');
    await backup.release();
    await lateLease.release();
  });

  test('a dead holder on this host is broken at once, without waiting for its expiry', async () => {
    const { clock, storage, processes } = setup();
    const crashed = await new Leases(context(storage, clock, holder(1), processes)).acquireExclusive({ command: 'gc' });
    processes.dead.add(holder(1).pid);
    const broken: string[] = [];
    const next = await new Leases(context(storage, clock, holder(2), processes, { onBroken: (l, s) => broken.push(`${l.id}:${s}`) })).acquireExclusive({ command: 'gc' });
    expect(broken).toEqual([`${crashed.id}:dead`]);
    await next.release();
  });

  test("another host's lease is broken only after its expiry plus twice the clock bound", async () => {
    const { clock, storage, processes } = setup();
    const remote = await new Leases(context(storage, clock, holder(1, 'b'.repeat(32), 'boot-b'), processes)).acquireShared({ command: 'backup' });
    processes.dead.add(holder(1).pid); // a pid on another host means nothing here
    const local = new Leases(context(storage, clock, holder(2), processes));
    expect(await codeOf(local.acquireExclusive({ command: 'gc' }))).toBe('ENGINE_REPOSITORY_LOCKED');
    await clock.advance(T + 2 * B);
    expect(await codeOf(local.acquireExclusive({ command: 'gc' }))).toBe('ENGINE_REPOSITORY_LOCKED');
    await clock.advance(1000);
    const x = await local.acquireExclusive({ command: 'gc' });
    expect(x.kind).toBe('exclusive');
    // The remote holder, had it survived, stopped long before: its own monotonic deadline passed.
    expect(() => remote.assertHeld()).toThrow(/was lost/);
    await x.release();
  });

  test('two pending exclusive acquirers: the one with the smaller id wins, the other backs off', async () => {
    const { clock, storage, processes } = setup();
    const shared = await new Leases(context(storage, clock, holder(1), processes)).acquireShared({ command: 'backup' });
    const results: string[] = [];
    const first = new Leases(context(storage, clock, holder(2), processes)).acquireExclusive({ command: 'gc', waitMs: 3_600_000 }).then((l) => (results.push('first'), l));
    const second = new Leases(context(storage, clock, holder(3), processes)).acquireExclusive({ command: 'repair', waitMs: 3_600_000 }).then((l) => (results.push('second'), l));
    await clock.advance(30_000);
    expect(results).toEqual([]);
    await shared.release();
    for (let i = 0; i < 20 && results.length === 0; i++) await clock.advance(5_000);
    expect(results.length).toBe(1);
    const winner = results[0] === 'first' ? await first : await second;
    await winner.release();
    for (let i = 0; i < 20 && results.length === 1; i++) await clock.advance(5_000);
    expect(results.length).toBe(2);
    await (results[1] === 'first' ? await first : await second).release();
  });
});

/** Append-only credentials (SPEC.md 20.5): everything passes but delete, which the store denies. */
class NoDelete implements Storage {
  constructor(private readonly inner: Storage) {}
  get properties() {
    return this.inner.properties;
  }
  put(key: string, source: PutSource, options?: PutOptions): Promise<void> {
    return this.inner.put(key, source, options);
  }
  get(key: string, options?: GetOptions): Promise<Buffer> {
    return this.inner.get(key, options);
  }
  stat(key: string, options?: CallOptions): Promise<ObjectInfo> {
    return this.inner.stat(key, options);
  }
  list(prefix: string, options?: ListOptions): AsyncIterable<ObjectInfo> {
    return this.inner.list(prefix, options);
  }
  async delete(key: string): Promise<void> {
    throw new StorageError('denied', `delete ${key}: HTTP 403 AccessDenied`, { location: 'memory', operation: 'delete', key, backendCode: 'AccessDenied' });
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

describe('append-only credentials', () => {
  test('a lease that cannot be deleted is retired in place: expired for every observer at once, never blocking; one with delete rights breaks it', async () => {
    const { clock, storage, processes } = setup();
    const appendOnly = new NoDelete(storage) as unknown as ClockedStorage;
    const elsewhere = holder(1, 'b'.repeat(32), 'boot-b');
    const first = await new Leases(context(appendOnly, clock, elsewhere, processes)).acquireShared({ command: 'backup' });
    await first.release();
    const [left] = await keysOf(storage);
    expect(left).toBe(first.key);
    const retired = decodeLease(await storage.get(left!), left!) as Lease;
    expect(Date.parse(retired.expires)).toBe(clock.wall() - 4 * B - 1000);
    // Judged expired at once even by a host whose clock is 2B behind this one's.
    expect(judgeLease(retired, { host: 'c'.repeat(32), boot: 'boot-c', now: clock.wall() - 2 * B, skewBoundMs: B }, processes.probe)).toBe('expired');
    // Another append-only backup goes on past it (it cannot remove it either), and retires its own.
    const second = await new Leases(context(appendOnly, clock, holder(2, 'b'.repeat(32), 'boot-b'), processes)).acquireShared({ command: 'backup' });
    await second.release();
    expect(await keysOf(storage)).toEqual([first.key, second.key].sort());
    // gc with the owner's credentials holds alone at once (no wait), breaking both as expired.
    const broken: string[] = [];
    const gc = await new Leases(context(storage, clock, holder(3), processes, { onBroken: (l, state) => broken.push(`${l.id}:${state}`) })).acquireExclusive({ command: 'gc' });
    expect(broken.sort()).toEqual([`${first.id}:expired`, `${second.id}:expired`].sort());
    await gc.release();
    expect(await keysOf(storage)).toEqual([]);
  });
});

describe('refusals', () => {
  test('one gc at a time: a second shared lease with the same command and `alone` is refused at once, a backup is not', async () => {
    const { clock, storage, processes } = setup();
    const gc = await new Leases(context(storage, clock, holder(1), processes)).acquireShared({ command: 'gc', alone: true });
    const backup = await new Leases(context(storage, clock, holder(2), processes)).acquireShared({ command: 'backup', alone: false });
    const second = new Leases(context(storage, clock, holder(3), processes)).acquireShared({ command: 'gc', alone: true, waitMs: 60_000 });
    await expect(second).rejects.toMatchObject({ code: 'ENGINE_REPOSITORY_LOCKED', details: { holder: { pid: holder(1).pid } } });
    expect((await keysOf(storage)).sort()).toEqual([gc.key, backup.key].sort());
    await gc.release();
    await backup.release();
  });

  test('waiting in vain names the holder and the way out (unlock --force, once its holder has stopped)', async () => {
    const { clock, storage, processes } = setup();
    const held = await new Leases(context(storage, clock, holder(1, 'b'.repeat(32), 'boot-b'), processes)).acquireExclusive({ command: 'gc' });
    const refusal = new Leases(context(storage, clock, holder(2), processes)).acquireShared({ command: 'backup' });
    await expect(refusal).rejects.toMatchObject({ code: 'ENGINE_REPOSITORY_LOCKED', details: { remedies: [{ kind: 'unlock', force: true, removes: `the lease ${held.key}` }] } });
    // An unreadable lease counts as held, of any kind, and says so.
    await storage.put('leases/' + 'e'.repeat(32) + '.json', Buffer.from('not json'));
    await held.release();
    await expect(new Leases(context(storage, clock, holder(2), processes)).acquireShared({ command: 'backup' })).rejects.toThrow(/cannot be read \(not JSON\)/);
  });

  test('a store whose listings may miss completed writes is refused: write-then-look would not be safe on it', () => {
    const { clock, processes } = setup();
    const memory = new MemoryStorage();
    Object.assign(memory.properties, { consistentListing: false });
    const storage = new ClockedStorage(memory, () => clock.wall());
    expect(() => new Leases(context(storage, clock, holder(1), processes))).toThrow(expect.objectContaining({ code: 'ENGINE_STORAGE', message: expect.stringMatching(/leases cannot be trusted/) }));
  });

  test('a lease written whose check then fails (the stat lost) is deleted again', async () => {
    const { clock, processes } = setup();
    let failStat = true;
    const storage = new ClockedStorage(new MemoryStorage(), () => clock.wall(), async (what) => {
      if (failStat && what.startsWith('stat')) throw new Error('connection reset');
    });
    await expect(new Leases(context(storage, clock, holder(1), processes)).acquireExclusive({ command: 'gc' })).rejects.toThrow('connection reset');
    failStat = false;
    expect(await keysOf(storage)).toEqual([]);
  });
});

describe('unlock', () => {
  test('removes dead and expired leases; keeps live and unreadable ones unless forced', async () => {
    const { clock, storage, processes } = setup();
    const live = await new Leases(context(storage, clock, holder(3), processes)).acquireShared({ command: 'restore' });
    live.keepAlive();
    const dead = await new Leases(context(storage, clock, holder(1), processes)).acquireShared({ command: 'backup' });
    processes.dead.add(holder(1).pid);
    const remote = await new Leases(context(storage, clock, holder(2, 'b'.repeat(32), 'boot-b'), processes)).acquireShared({ command: 'backup' });
    await clock.advance(T + 2 * B + 1000);
    const unreadable = 'leases/' + 'e'.repeat(32) + '.json';
    await storage.put(unreadable, Buffer.from('{"version": 1'));
    const unlocker = new Leases(context(storage, clock, holder(4), processes));
    const first = await unlocker.unlock({ force: false });
    expect(first.map((u) => [u.key, u.state, u.removed])).toEqual([
      [dead.key, 'dead', true],
      [remote.key, 'expired', true],
      [live.key, 'live', false],
      [unreadable, 'unreadable', false],
    ].sort((a, b) => ((a[0] as string) < (b[0] as string) ? -1 : 1)));
    const forced = await unlocker.unlock({ force: true });
    expect(forced.map((u) => u.removed)).toEqual([true, true]);
    expect(await keysOf(storage)).toEqual([]);
    // The holder of the forced lease finds out at its next refresh.
    await clock.advance(T / 3 + 1);
    expect(live.lost.aborted).toBe(true);
    expect(() => live.assertHeld()).toThrow(/removed by another process/);
  });
});

describe('holding', () => {
  test('keepAlive refreshes every T/3; a holder not refreshed within T − B stops', async () => {
    const { clock, storage, processes } = setup();
    const held = await new Leases(context(storage, clock, holder(1), processes)).acquireShared({ command: 'backup' });
    held.keepAlive();
    await clock.advance(3 * T);
    held.assertHeld();
    const expires = Date.parse(JSON.parse((await storage.get(held.key)).toString()).expires);
    expect(expires).toBeGreaterThan(clock.wall());
    await held.release();
    const idle = await new Leases(context(storage, clock, holder(2), processes)).acquireShared({ command: 'backup' });
    await clock.advance(T - B - 1);
    idle.assertHeld();
    await clock.advance(1);
    expect(() => idle.assertHeld()).toThrow(expect.objectContaining({ code: 'ENGINE_LEASE_LOST' }));
    expect(idle.lost.aborted).toBe(true);
  });

  test('a lease removed behind its holder is lost at the next refresh, and the holder is told', async () => {
    const { clock, storage, processes } = setup();
    const held = await new Leases(context(storage, clock, holder(1), processes)).acquireShared({ command: 'backup' });
    held.keepAlive();
    await storage.delete(held.key); // unlock --force, or a store that lost it
    await clock.advance(T / 3 + 1);
    expect(held.lost.aborted).toBe(true);
    expect(() => held.assertHeld()).toThrow(/removed by another process/);
    expect(await keysOf(storage)).toEqual([]); // not written again
    await held.release();
  });

  test('a store that fails refreshes until the validity ends loses the lease', async () => {
    const { clock, processes } = setup();
    let failing = false;
    const storage = new ClockedStorage(new MemoryStorage(), () => clock.wall(), async (what) => {
      if (failing && what.startsWith('get')) throw Object.assign(new Error('503'), {});
    });
    const held = await new Leases(context(storage, clock, holder(1), processes)).acquireShared({ command: 'backup' });
    held.keepAlive();
    failing = true;
    await clock.advance(T - B - 1);
    expect(held.lost.aborted).toBe(false);
    await clock.advance(DEFAULT_LEASE_TIMING.pollMs * 2);
    expect(held.lost.aborted).toBe(true);
    expect(() => held.assertHeld()).toThrow(/could not be refreshed/);
  });
});

describe('clock skew against the store (SPEC.md 19.6)', () => {
  test('within the bound works; beyond it, ENGINE_CLOCK_SKEW and no lease is left', async () => {
    for (const [offset, expected] of [[B - 2000, 'ok'], [-(B - 2000), 'ok'], [B + 2000, 'ENGINE_CLOCK_SKEW'], [-(B + 2000), 'ENGINE_CLOCK_SKEW']] as const) {
      const { clock, storage, processes } = setup(offset);
      const attempt = new Leases(context(storage, clock, holder(1), processes)).acquireShared({ command: 'backup' });
      expect(await codeOf(attempt)).toBe(expected);
      expect((await keysOf(storage)).length).toBe(expected === 'ok' ? 1 : 0);
    }
  });

  test('a wall clock stepped while holding is caught at the next refresh', async () => {
    const { clock, storage, processes } = setup();
    const held = await new Leases(context(storage, clock, holder(1), processes)).acquireShared({ command: 'backup' });
    clock.stepWall(5 * 60_000);
    expect(await codeOf(held.refresh())).toBe('ENGINE_CLOCK_SKEW');
    expect(held.lost.aborted).toBe(true);
  });

  test('a store that tells no time: refused, since the bound cannot be checked', async () => {
    const { clock, storage, processes } = setup();
    storage.reportTimes = false;
    expect(await codeOf(new Leases(context(storage, clock, holder(1), processes)).acquireShared({ command: 'backup' }))).toBe('ENGINE_CLOCK_SKEW');
  });

  test('the measurement allows for the store time resolution and the request time, nothing more', () => {
    expect(checkSkew(10_000, 10_500, 10_000, 1000)).toBeUndefined();
    expect(checkSkew(12_001, 12_100, 10_000, 1000)?.why).toMatch(/ahead/);
    expect(checkSkew(8_000, 8_999, 10_000, 1000)?.why).toMatch(/behind/);
    expect(checkSkew(8_000, 8_999, undefined, 1000)?.why).toMatch(/no modification time/);
    expect(checkSkew(8_000, 9_000, 10_000, 1000)).toBeUndefined();
  });
});

describe('exclusivity under provoked interleavings', () => {
  test('no exclusive holder ever overlaps another holder, whatever order the store serves requests in', async () => {
    await fc.assert(
      fc.asyncProperty(fc.scheduler(), fc.array(fc.constantFrom('shared', 'exclusive'), { minLength: 2, maxLength: 6 }), fc.array(fc.boolean(), { minLength: 6, maxLength: 6 }), async (s, kinds, deadFlags) => {
        const clock = new FakeClock(async () => { await s.schedule(Promise.resolve(), 'sleep'); });
        const storage = new ClockedStorage(new MemoryStorage(), () => clock.wall(), async (what) => { await s.schedule(Promise.resolve(), what); });
        const processes = new FakeProcesses();
        let shared = 0;
        let exclusive = 0;
        const violations: string[] = [];
        const run = async (kind: string, n: number): Promise<void> => {
          // Different hosts for odd n: their leases are judged by expiry alone.
          const who = holder(n, n % 2 ? 'b'.repeat(32) : 'a'.repeat(32), n % 2 ? 'boot-b' : 'boot-a');
          const leases = new Leases({ storage, clock, holder: who, probe: processes.probe, timing: { leaseMs: 3_600_000, skewBoundMs: 60_000, pollMs: 10 } });
          let held: HeldLease;
          try {
            held = kind === 'exclusive' ? await leases.acquireExclusive({ command: 'gc', waitMs: 2000 }) : await leases.acquireShared({ command: 'backup', waitMs: 2000 });
          } catch (error) {
            if (error instanceof EngineError && error.code === 'ENGINE_REPOSITORY_LOCKED') return;
            throw error;
          }
          if (kind === 'exclusive') {
            if (shared > 0 || exclusive > 0) violations.push(`exclusive ${n} entered beside ${shared} shared, ${exclusive} exclusive`);
            exclusive++;
          } else {
            if (exclusive > 0) violations.push(`shared ${n} entered beside an exclusive holder`);
            shared++;
          }
          await s.schedule(Promise.resolve(), `work ${n}`);
          if (kind === 'exclusive') exclusive--;
          else shared--;
          // A holder that dies keeps its lease object: same-host ones are broken at once, others wait out the expiry.
          if (deadFlags[n] && n % 2 === 0) processes.dead.add(who.pid);
          else await held.release();
        };
        await s.waitFor(Promise.all(kinds.map((kind, n) => run(kind, n))));
        expect(violations).toEqual([]);
      }),
      { numRuns: 150 },
    );
  });

  test('with short leases that expire: no holder acts while its lease could be judged expired by another', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.scheduler(),
        fc.array(fc.record({ kind: fc.constantFrom('shared', 'exclusive'), steps: fc.integer({ min: 1, max: 12 }), remote: fc.boolean(), refreshes: fc.boolean(), skew: fc.constantFrom(-0.9, 0, 0.9) }), { minLength: 2, maxLength: 5 }),
        async (s, plans) => {
          // Time moves whenever anyone sleeps, in steps of a few seconds. The store keeps true time; each
          // other host's wall clock is off by up to 0.9 B, ahead or behind (within the bound, so allowed).
          const clock = new FakeClock(async () => { await s.schedule(Promise.resolve(), 'sleep'); });
          const storage = new ClockedStorage(new MemoryStorage(), () => clock.wall(), async (what) => { await s.schedule(Promise.resolve(), what); });
          const processes = new FakeProcesses();
          const timing = { leaseMs: 6_000, skewBoundMs: 1_400, pollMs: 500 };
          // Events in the order they happen (one thread): a holder's interval runs from its acquisition to its last act.
          let tick = 0;
          const intervals: { n: number; kind: string; from: number; to: number; at: number[] }[] = [];
          const run = async (plan: (typeof plans)[number], n: number): Promise<void> => {
            const who = holder(n, plan.remote ? String(n + 1).repeat(32) : 'a'.repeat(32), plan.remote ? `boot-${n}` : 'boot-a');
            const offset = plan.remote ? plan.skew * timing.skewBoundMs : 0;
            const hostClock = { wall: () => clock.wall() + offset, monotonic: () => clock.monotonic(), sleep: (ms: number, signal?: AbortSignal) => clock.sleep(ms, signal) };
            const leases = new Leases({ storage, clock: hostClock, holder: who, probe: processes.probe, timing });
            let held: HeldLease;
            try {
              held = plan.kind === 'exclusive' ? await leases.acquireExclusive({ command: 'gc', waitMs: 60_000 }) : await leases.acquireShared({ command: 'backup', waitMs: 60_000 });
            } catch (error) {
              if (error instanceof EngineError && error.code === 'ENGINE_REPOSITORY_LOCKED') return;
              throw error;
            }
            const interval = { n, kind: plan.kind, from: tick++, to: tick, at: [clock.monotonic()] };
            intervals.push(interval);
            for (let step = 0; step < plan.steps; step++) {
              // Work between acts takes time (1 s: an unrefreshed lease runs out after a few acts).
              await clock.sleep(1_000);
              if (plan.refreshes) await held.refresh().catch(() => undefined);
              try {
                held.assertHeld();
              } catch {
                return; // it stops, leaving its lease behind like a dead process
              }
              interval.to = tick++;
              interval.at.push(clock.monotonic());
            }
            await held.release();
          };
          await s.waitFor(Promise.all(plans.map((plan, n) => run(plan, n))));
          for (const a of intervals) {
            for (const b of intervals) {
              if (a.n >= b.n || (a.kind === 'shared' && b.kind === 'shared')) continue;
              const overlap = a.from < b.to && b.from < a.to;
              expect(overlap, `${a.kind} ${a.n} [${a.from}, ${a.to}] at ${a.at} and ${b.kind} ${b.n} [${b.from}, ${b.to}] at ${b.at}`).toBe(false);
            }
          }
        },
      ),
      { numRuns: 300 },
    );
  });
});
