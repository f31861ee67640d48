/**
 * gc's v3 commit plan (SPEC.md 19.8): for random repositories (blobs in one or two writers' segments, some
 * live, some copied by gc, unnamed packs old and young), the plan is cut short after every step in turn and
 * the store checked as a reader would find it: every live blob resolves to an entry in a pack that exists.
 * At the end: the old segments gone, only packs the new index names left (and the young unnamed ones). A
 * live blob no segment names refuses the plan before any step.
 */
import { describe, expect, test } from 'vitest';
import fc from 'fast-check';
import { initChecksum } from '../dist/repo-format/checksum.js';
import { MemoryStorage } from '../dist/repo-format/storage/memory.js';
import { decodeSegment, encodeSegment, parseSegmentKey, segmentKey, type Segment, type SegmentEntry } from '../dist/repo-format/v3/segment.js';
import { resolveIndex } from '../dist/repo-format/v3/segment-set.js';
import { applyGcStep, packKey, planGcCommit, type GcCommitInput, type GcStep } from '../dist/repo-format/v3/gc-plan.js';

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

function inputOf(scenario: Scenario, limits?: { entries: number; superseded: number }): GcCommitInput {
  return { segments: scenario.segments, live: scenario.live, moved: scenario.moved, packs: scenario.packs, writer: GC_WRITER, firstSeq: 0, storeNow: NOW, minUnnamedAgeMs: AGE, limits };
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
  for (const limits of [undefined, { entries: 2, superseded: 1 }]) {
    test(`a crash after any step leaves every live blob readable${limits ? ' (index split into several segments)' : ''}`, async () => {
      await fc.assert(
        fc.asyncProperty(scenarioArb, async (scenario) => {
          const plan = planGcCommit(inputOf(scenario, limits));
          expect(plan.refused).toBe(false);
          if (plan.refused) return;
          for (let crashAt = 0; crashAt <= plan.steps.length; crashAt++) {
            const storage = await storeOf(scenario);
            await applyFirst(storage, plan.steps, crashAt);
            const view = await readerView(storage);
            for (const id of scenario.live) {
              const found = view.index.get(id);
              expect(found, `live blob ${id.slice(0, 4)} after ${crashAt} steps`).toBeDefined();
              expect(view.packs.has(found!.entry.packId), `pack of live blob ${id.slice(0, 4)} after ${crashAt} steps`).toBe(true);
            }
          }
          // Completed: only gc's segments; every pack left is named, or an unnamed one too young or of unknown age.
          const storage = await storeOf(scenario);
          await applyFirst(storage, plan.steps, plan.steps.length);
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

  test('the order: new index first, then the switch, then old segments, then packs', () => {
    const scenario: Scenario = {
      segments: [{ name: { writer: '1'.repeat(32), seq: 0 }, supersedes: [], entries: [entryOf(1, packId(0x101), 0), entryOf(2, packId(0x102), 1)] }],
      packs: [{ packId: packId(0x101), modified: 0 }, { packId: packId(0x102), modified: 0 }, { packId: packId(0xf00), modified: NOW }],
      live: new Set([Buffer.alloc(32, 1).toString('hex')]),
      moved: new Map([[Buffer.alloc(32, 1).toString('hex'), entryOf(1, packId(0xf00), 0)]]),
    };
    const plan = planGcCommit(inputOf(scenario));
    if (plan.refused) throw new Error('refused');
    expect(plan.steps.map((s) => s.kind)).toEqual(['write-switch', 'delete-segment', 'delete-pack', 'delete-pack']);
    expect(plan.steps.filter((s) => s.kind === 'delete-pack').map((s) => (s as { packId: string }).packId)).toEqual([packId(0x101), packId(0x102)]);
  });

  test('a live blob that no segment names and gc did not copy refuses the plan before any step', () => {
    const scenario: Scenario = {
      segments: [{ name: { writer: '1'.repeat(32), seq: 0 }, supersedes: [], entries: [entryOf(1, packId(0x101), 0)] }],
      packs: [{ packId: packId(0x101), modified: 0 }],
      live: new Set([Buffer.alloc(32, 1).toString('hex'), Buffer.alloc(32, 9).toString('hex')]),
      moved: new Map(),
    };
    expect(planGcCommit(inputOf(scenario))).toEqual({ refused: true, unnamedLive: [Buffer.alloc(32, 9).toString('hex')] });
  });

  test('every step checks the exclusive lease first', async () => {
    const storage = new MemoryStorage();
    const step: GcStep = { kind: 'delete-pack', packId: packId(1), why: 'unnamed' };
    await storage.put(packKey(packId(1)), Buffer.from('pack'));
    await expect(applyGcStep(step, { storage, assertHeld: () => { throw new Error('lease lost'); } })).rejects.toThrow('lease lost');
    expect((await storage.stat(packKey(packId(1)))).size).toBe(4);
  });
});
