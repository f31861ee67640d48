/**
 * gc's v3 commit plan (SPEC.md 19.8): for random repositories (blobs in one or two writers' segments, some
 * live, some copied by gc, unnamed packs old and young), the plan is cut short after every step in turn and
 * the store checked as a reader would find it: every live blob resolves to an entry in a pack that exists.
 * At the end: the old segments gone, only packs the new index names left (and the young unnamed ones). A
 * live blob no segment names refuses the plan before any step. The plan reads gc's working index on disk
 * (gc-index.ts); with a batch of 2 writes every scenario goes through it in many batches, and memory holds
 * no more than the batch (checked on a live set of 5000 blobs).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, test } from 'vitest';
import fc from 'fast-check';
import { initChecksum } from '../dist/repo-format/checksum.js';
import { MemoryStorage } from '../dist/repo-format/storage/memory.js';
import { decodeSegment, encodeSegment, parseSegmentKey, segmentKey, type Segment, type SegmentEntry } from '../dist/repo-format/v3/segment.js';
import { resolveIndex } from '../dist/repo-format/v3/segment-set.js';
import { applyGcStep, planGcCommit, type GcCommitPlan, type GcStep } from '../dist/repo-format/v3/gc-plan.js';
import { packKey } from '../dist/repo-format/store.js';
import { GcIndex } from '../dist/repo-format/v3/gc-index.js';

await initChecksum();
const GC_WRITER = 'c'.repeat(32);
const NOW = 10_000_000;
const AGE = 420_000;

function entryOf(blob: number, pack: string, slot: number): SegmentEntry {
  return { id: Buffer.alloc(32, blob), packId: pack, offset: 32 + slot * 200, length: 150, rawLength: 94, kind: 1, flags: 0 };
}

function packId(n: number): string {
  return n.toString(16).padStart(32, '0');
}

interface Scenario {
  segments: Segment[];
  packs: { packId: string; modified: number | undefined }[];
  live: Set<string>;
  moved: Map<string, SegmentEntry>;
}

/** Up to 12 blobs, each stored by one or two of three writers in their own packs; some live; some moved. */
const scenarioArb: fc.Arbitrary<Scenario> = fc
  .record({
    blobs: fc.array(fc.record({ writers: fc.subarray([0, 1, 2], { minLength: 1, maxLength: 2 }), live: fc.boolean(), moved: fc.boolean() }), { minLength: 1, maxLength: 12 }),
    unnamed: fc.array(fc.option(fc.integer({ min: 0, max: 2 * AGE }), { nil: undefined }), { maxLength: 3 }),
  })
  .map(({ blobs, unnamed }) => {
    const perWriter: SegmentEntry[][] = [[], [], []];
    const live = new Set<string>();
    const moved = new Map<string, SegmentEntry>();
    blobs.forEach((blob, i) => {
      const id = Buffer.alloc(32, i + 1).toString('hex');
      for (const w of blob.writers) perWriter[w]!.push(entryOf(i + 1, packId(0x100 + w * 16 + (i % 3)), i));
      if (blob.live) live.add(id);
      if (blob.live && blob.moved) moved.set(id, entryOf(i + 1, packId(0xf00), i));
    });
    const segments: Segment[] = perWriter
      .map((entries, w) => ({ name: { writer: String(w + 1).repeat(32), seq: 0 }, supersedes: [], entries }))
      .filter((segment) => segment.entries.length > 0);
    const packIds = new Set<string>();
    for (const segment of segments) for (const entry of segment.entries) packIds.add(entry.packId);
    const packs: Scenario['packs'] = [...packIds].map((id) => ({ packId: id, modified: NOW - 10 * AGE }));
    if (moved.size > 0) packs.push({ packId: packId(0xf00), modified: NOW - 1000 });
    unnamed.forEach((age, i) => packs.push({ packId: packId(0xa00 + i), modified: age === undefined ? undefined : NOW - age }));
    return { segments, packs, live, moved };
  });

async function storeOf(scenario: Scenario): Promise<MemoryStorage> {
  const storage = new MemoryStorage();
  for (const segment of scenario.segments) await storage.put(segmentKey(segment.name), encodeSegment(segment), { ifAbsent: true });
  for (const pack of scenario.packs) await storage.put(packKey(pack.packId), Buffer.from('pack'));
  return storage;
}

const scratch = await mkdtemp(join(tmpdir(), 'v3-gc-plan-'));
afterAll(() => rm(scratch, { recursive: true, force: true }));
let indexes = 0;

/** gc's working index of the scenario's store (its segments read from it), with its live set and copies. */
async function indexOf(scenario: Scenario, batch?: number, liveOnly = false): Promise<GcIndex> {
  const index = await GcIndex.create(join(scratch, `index-${indexes++}`), { batch });
  // As gc does (liveOnly): mark first, then read only the entries of the ids marked.
  if (liveOnly) for (const id of scenario.live) index.addLive(Buffer.from(id, 'hex'));
  const { damaged } = await index.readSegments(await storeOf(scenario), { liveOnly });
  expect(damaged).toEqual([]);
  if (!liveOnly) for (const id of scenario.live) index.addLive(Buffer.from(id, 'hex'));
  for (const [id, copy] of scenario.moved) index.addMoved(Buffer.from(id, 'hex'), copy);
  return index;
}

interface Planned {
  plan: GcCommitPlan;
  steps: GcStep[];
}

async function planOf(scenario: Scenario, limits?: { entries: number; superseded: number }, batch?: number, liveOnly = false): Promise<Planned> {
  const index = await indexOf(scenario, batch, liveOnly);
  try {
    const plan = await planGcCommit({ index, packs: scenario.packs, writer: GC_WRITER, firstSeq: 0, storeNow: NOW, minUnnamedAgeMs: AGE, limits });
    const steps: GcStep[] = [];
    if (!plan.refused) for await (const step of plan.steps()) steps.push(step);
    if (!plan.refused) expect(steps.length).toBe(plan.stepCount);
    return { plan, steps };
  } finally {
    await index.close();
  }
}

/** What a reader finds: the index of the segments present, and the packs present. */
async function readerView(storage: MemoryStorage): Promise<{ index: ReturnType<typeof resolveIndex>; packs: Set<string>; segments: string[] }> {
  const segments: Segment[] = [];
  const keys: string[] = [];
  for await (const info of storage.list('index/')) {
    if (!parseSegmentKey(info.key)) continue;
    const segment = decodeSegment(await storage.get(info.key), info.key);
    if (typeof segment === 'string') throw new Error(segment);
    segments.push(segment);
    keys.push(info.key);
  }
  const packs = new Set<string>();
  for await (const info of storage.list('packs/')) packs.add(info.key.split('/')[2]!);
  return { index: resolveIndex(segments), packs, segments: keys };
}

async function applyFirst(storage: MemoryStorage, steps: readonly GcStep[], count: number): Promise<void> {
  for (const step of steps.slice(0, count)) await applyGcStep(step, { storage, assertHeld: () => undefined });
}

describe('gc commit plan', () => {
  for (const [limits, batch, liveOnly] of [[undefined, undefined, false], [{ entries: 2, superseded: 1 }, 2, false], [undefined, undefined, true], [{ entries: 2, superseded: 1 }, 2, true]] as const) {
    test(`a crash after any step leaves every live blob readable${limits ? ' (index split into several segments, the working index written 2 entries at a time)' : ''}${liveOnly ? ', the segments read for the live ids only' : ''}`, async () => {
      await fc.assert(
        fc.asyncProperty(scenarioArb, async (scenario) => {
          const { plan, steps } = await planOf(scenario, limits, batch, liveOnly);
          expect(plan.refused).toBe(false);
          if (plan.refused) return;
          // The same plan, step for step, as from a working index holding every entry.
          if (liveOnly) expect(steps).toEqual((await planOf(scenario, limits, batch)).steps);
          for (let crashAt = 0; crashAt <= steps.length; crashAt++) {
            const storage = await storeOf(scenario);
            await applyFirst(storage, steps, crashAt);
            const view = await readerView(storage);
            for (const id of scenario.live) {
              const found = view.index.get(id);
              expect(found, `live blob ${id.slice(0, 4)} after ${crashAt} steps`).toBeDefined();
              expect(view.packs.has(found!.entry.packId), `pack of live blob ${id.slice(0, 4)} after ${crashAt} steps`).toBe(true);
            }
          }
          // Completed: only gc's segments; every pack left is named, or an unnamed one too young or of unknown age.
          const storage = await storeOf(scenario);
          await applyFirst(storage, steps, steps.length);
          const view = await readerView(storage);
          expect(view.segments.every((key) => parseSegmentKey(key)!.writer === GC_WRITER)).toBe(true);
          expect([...view.index.keys()].sort()).toEqual([...scenario.live].sort());
          const named = new Set([...view.index.values()].map((r) => r.entry.packId));
          const keptUnnamed = new Set(plan.kept.map((k) => k.packId));
          for (const pack of view.packs) expect(named.has(pack) || keptUnnamed.has(pack)).toBe(true);
          for (const kept of plan.kept) {
            const pack = scenario.packs.find((p) => p.packId === kept.packId)!;
            expect(pack.modified === undefined || NOW - pack.modified < AGE).toBe(true);
          }
          for (const [id, copy] of scenario.moved) expect(view.index.get(id)?.entry.packId).toBe(copy.packId);
        }),
        { numRuns: 60 },
      );
    });
  }

  test('the order: new index first, then the switch, then old segments, then packs', async () => {
    const scenario: Scenario = {
      segments: [{ name: { writer: '1'.repeat(32), seq: 0 }, supersedes: [], entries: [entryOf(1, packId(0x101), 0), entryOf(2, packId(0x102), 1)] }],
      packs: [{ packId: packId(0x101), modified: 0 }, { packId: packId(0x102), modified: 0 }, { packId: packId(0xf00), modified: NOW }],
      live: new Set([Buffer.alloc(32, 1).toString('hex')]),
      moved: new Map([[Buffer.alloc(32, 1).toString('hex'), entryOf(1, packId(0xf00), 0)]]),
    };
    const { plan, steps } = await planOf(scenario);
    if (plan.refused) throw new Error('refused');
    expect(steps.map((s) => s.kind)).toEqual(['write-switch', 'delete-segment', 'delete-pack', 'delete-pack']);
    expect(steps.filter((s) => s.kind === 'delete-pack').map((s) => (s as { packId: string }).packId)).toEqual([packId(0x101), packId(0x102)]);
  });

  test('a live blob that no segment names and gc did not copy refuses the plan before any step', async () => {
    const scenario: Scenario = {
      segments: [{ name: { writer: '1'.repeat(32), seq: 0 }, supersedes: [], entries: [entryOf(1, packId(0x101), 0)] }],
      packs: [{ packId: packId(0x101), modified: 0 }],
      live: new Set([Buffer.alloc(32, 1).toString('hex'), Buffer.alloc(32, 9).toString('hex')]),
      moved: new Map(),
    };
    expect((await planOf(scenario)).plan).toEqual({ refused: true, unnamedLive: [Buffer.alloc(32, 9).toString('hex')], unnamedCount: 1 });
  });

  test('the working index on disk: a live set 300 times its batch is planned exactly, memory never holding more than two batches', async () => {
    // 3000 live blobs of 4000, in three writers' overlapping segments (the first by key wins), some copied.
    const segments: Segment[] = [0, 1, 2].map((w) => ({ name: { writer: String(w + 1).repeat(32), seq: 0 }, supersedes: [], entries: [] }));
    const idOf = (n: number): Buffer => {
      const id = Buffer.alloc(32);
      id.writeUInt32BE(n, 0);
      return id;
    };
    const live = new Set<string>();
    const moved = new Map<string, SegmentEntry>();
    const expected = new Map<string, string>();
    for (let n = 0; n < 4000; n++) {
      const writers = n % 3 === 0 ? [0, 2] : [n % 3];
      for (const w of writers) segments[w]!.entries.push({ ...entryOf(1, packId(0x100 + w * 16 + (n % 5)), n), id: idOf(n) });
      const id = idOf(n).toString('hex');
      if (n % 4 === 0) continue;
      live.add(id);
      if (n % 7 === 0) moved.set(id, { ...entryOf(1, packId(0xf00), n), id: idOf(n) });
      expected.set(id, n % 7 === 0 ? packId(0xf00) : packId(0x100 + writers[0]! * 16 + (n % 5)));
    }
    const packs = [...new Set(segments.flatMap((s) => s.entries.map((e) => e.packId))), packId(0xf00)].map((id) => ({ packId: id, modified: NOW - 10 * AGE }));
    const scenario: Scenario = { segments, packs, live, moved };
    const index = await GcIndex.create(join(scratch, `index-${indexes++}`), { batch: 10 });
    try {
      expect((await index.readSegments(await storeOf(scenario))).damaged).toEqual([]);
      // As mark() does: each id handed over synchronously, the writes settled at every tick.
      for (const id of live) {
        index.addLive(Buffer.from(id, 'hex'));
        await index.settle();
      }
      for (const [id, copy] of moved) {
        index.addMoved(Buffer.from(id, 'hex'), copy);
        await index.settle();
      }
      const plan = await planGcCommit({ index, packs, writer: GC_WRITER, firstSeq: 0, storeNow: NOW, minUnnamedAgeMs: AGE, limits: { entries: 1000, superseded: 65536 } });
      if (plan.refused) throw new Error('refused');
      expect(plan.entries).toBe(3000);
      const written: SegmentEntry[] = [];
      const kinds: string[] = [];
      for await (const step of plan.steps()) {
        kinds.push(step.kind);
        if (step.kind === 'write-entries' || step.kind === 'write-switch') written.push(...step.segment.entries);
      }
      expect(kinds.slice(0, 4)).toEqual(['write-entries', 'write-entries', 'write-entries', 'write-switch']);
      expect(kinds.length).toBe(plan.stepCount);
      // Exactly one entry per live blob, ascending by id, at its copy or in the winning segment's pack.
      expect(written.map((e) => e.id.toString('hex'))).toEqual([...live].sort());
      for (const entry of written) expect(entry.packId).toBe(expected.get(entry.id.toString('hex')));
      expect(index.effectiveEntries).toBe(4000 + Math.ceil(4000 / 3));
      expect(index.peakHeld).toBeLessThanOrEqual(20);
    } finally {
      await index.close();
    }
  });

  test('a read for the live ids only writes their entries (not the garbage), plans exactly as a full read, and refuses to plan once more blobs are marked live after it', async () => {
    // 4000 blobs in two writers' overlapping segments, 40 of them live (a repository that is mostly garbage).
    const segments: Segment[] = [0, 1].map((w) => ({ name: { writer: String(w + 1).repeat(32), seq: 0 }, supersedes: [], entries: [] }));
    const idOf = (n: number): Buffer => {
      const id = Buffer.alloc(32);
      id.writeUInt32BE(n, 0);
      id.writeUInt32BE(n * 7919, 4);
      return id;
    };
    const live = new Set<string>();
    for (let n = 0; n < 4000; n++) {
      for (const w of n % 2 === 0 ? [0, 1] : [n % 2]) segments[w]!.entries.push({ ...entryOf(1, packId(0x100 + w * 16 + (n % 5)), n), id: idOf(n) });
      if (n % 100 === 7) live.add(idOf(n).toString('hex'));
    }
    const packs = [...new Set(segments.flatMap((s) => s.entries.map((e) => e.packId)))].map((id) => ({ packId: id, modified: NOW - 10 * AGE }));
    const scenario: Scenario = { segments, packs, live, moved: new Map() };
    const stepsOf = async (index: GcIndex): Promise<GcStep[]> => {
      const plan = await planGcCommit({ index, packs, writer: GC_WRITER, firstSeq: 0, storeNow: NOW, minUnnamedAgeMs: AGE, limits: { entries: 16, superseded: 65536 } });
      if (plan.refused) throw new Error('refused');
      const steps: GcStep[] = [];
      for await (const step of plan.steps()) steps.push(step);
      return steps;
    };
    const full = await indexOf(scenario, 10);
    const partial = await indexOf(scenario, 10, true);
    try {
      expect(full.entriesWritten).toBe(6000);
      // The filter may let a few others through (false positives), never drop a live one.
      expect(partial.entriesWritten).toBeGreaterThanOrEqual(40);
      expect(partial.entriesWritten).toBeLessThan(80);
      expect(partial.effectiveEntries).toBe(full.effectiveEntries);
      expect([...partial.namedPacks].sort()).toEqual([...full.namedPacks].sort());
      const steps = await stepsOf(partial);
      expect(steps).toEqual(await stepsOf(full));
      expect(steps.flatMap((s) => (s.kind === 'write-entries' || s.kind === 'write-switch' ? s.segment.entries.map((e) => e.id.toString('hex')) : []))).toEqual([...live].sort());
      // A blob marked after the read: its entries may have been passed over, so the index says so rather than call it unnamed.
      partial.addLive(idOf(8));
      await expect(stepsOf(partial)).rejects.toThrow('read the segments again');
      expect((await partial.readSegments(await storeOf(scenario), { liveOnly: true })).damaged).toEqual([]);
      const again = await stepsOf(partial);
      expect(again.flatMap((s) => (s.kind === 'write-entries' || s.kind === 'write-switch' ? s.segment.entries.map((e) => e.id.toString('hex')) : []))).toEqual([...live, idOf(8).toString('hex')].sort());
    } finally {
      await full.close();
      await partial.close();
    }
  });

  test('every step checks the exclusive lease first', async () => {
    const storage = new MemoryStorage();
    const step: GcStep = { kind: 'delete-pack', packId: packId(1), why: 'unnamed' };
    await storage.put(packKey(packId(1)), Buffer.from('pack'));
    await expect(applyGcStep(step, { storage, assertHeld: () => { throw new Error('lease lost'); } })).rejects.toThrow('lease lost');
    expect((await storage.stat(packKey(packId(1)))).size).toBe(4);
  });
});
