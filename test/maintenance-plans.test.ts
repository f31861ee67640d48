/**
 * The decisions of gc, verify and repair that need no repository: gc's classification of packs (dead, to
 * rewrite, kept, unindexed) from index counts and a threshold, its two passes over the index, and what a
 * dry run reports; verify's matching of index entries with frames, its chunk problems and its seeded
 * subset; repair's index entries of good frames and its map of good places.
 */
import { describe, expect, test } from 'vitest';
import { classifyPacks, collectEntries, packFate, planTotals, tallyPacks, type PackPlan, type PackTally } from '../dist/engine/gc/plan.js';
import { namesFrame } from '../dist/engine/verify/packs.js';
import { headerProblem, placementProblem } from '../dist/engine/verify/index-check.js';
import { chunkProblems } from '../dist/engine/verify/backups.js';
import { choosePacks } from '../dist/engine/verify/data-check.js';
import { GoodPlaces } from '../dist/engine/repair/good-places.js';
import { goodEntries } from '../dist/engine/repair/check-packs.js';
import { FRAME_OVERHEAD, ID_SIZE, KIND_DATA, KIND_MAP_LEAF, MAX_FRAME_LENGTH, PACK_HEADER_SIZE } from '../dist/repo-format/constants.js';
import type { IndexEntry } from '../dist/repo-format/index-entry.js';
import type { ScannedFrame } from '../dist/repo-format/pack-file.js';
import type { ChunkReference } from '../dist/engine/catalogue/references.js';

const MiB = 1024 * 1024;
const packOf = (n: number): string => n.toString(16).padStart(32, '0');
const idOf = (n: number): Buffer => Buffer.alloc(ID_SIZE, n);

function entry(n: number, pack: number, length = 1000, offset = PACK_HEADER_SIZE): IndexEntry {
  return { id: idOf(n), packId: packOf(pack), offset, length, rawLength: length - FRAME_OVERHEAD, kind: KIND_DATA, flags: 0 };
}

async function* entries(list: IndexEntry[]): AsyncGenerator<IndexEntry> {
  yield* list;
}
const noTick = async (): Promise<void> => undefined;

describe('gc: the plan', () => {
  test('packFate: no entry unindexed, no live entry dead, live bytes under the threshold of its size less its header rewritten, else kept', () => {
    const size = 10 * MiB + PACK_HEADER_SIZE;
    expect(packFate(undefined, size, 0.5)).toBe('unindexed');
    expect(packFate({ live: 0, liveBytes: 0 }, size, 0.5)).toBe('dead');
    expect(packFate({ live: 0, liveBytes: 0 }, size, 0)).toBe('dead'); // dead whatever the threshold
    expect(packFate({ live: 3, liveBytes: 5 * MiB - 1 }, size, 0.5)).toBe('rewrite');
    expect(packFate({ live: 3, liveBytes: 5 * MiB }, size, 0.5)).toBe('kept'); // exactly at the threshold: kept
    expect(packFate({ live: 1, liveBytes: 1 }, size, 0)).toBe('kept'); // 0%: never rewrite
    expect(packFate({ live: 9, liveBytes: 10 * MiB }, size, 1)).toBe('kept'); // 100%: all live, nothing to gain
    expect(packFate({ live: 9, liveBytes: 10 * MiB - 1 }, size, 1)).toBe('rewrite');
  });

  test('classifyPacks sorts the packs, keeps their order, and counts the live entries of every indexed pack', () => {
    const size = 4 * MiB + PACK_HEADER_SIZE;
    const tallies = new Map<string, PackTally>([
      [packOf(1), { live: 0, liveBytes: 0 }],
      [packOf(2), { live: 2, liveBytes: 1 * MiB }],
      [packOf(3), { live: 7, liveBytes: 4 * MiB }],
      [packOf(5), { live: 1, liveBytes: 3 * MiB }],
      [packOf(9), { live: 4, liveBytes: MiB }], // entries naming a pack that is not there: not gc's business
    ]);
    const packs = [1, 2, 3, 4, 5, 6].map((n) => ({ packId: packOf(n), size }));
    const classes = classifyPacks(packs, tallies, 0.5);
    expect(classes.dead.map((p) => p.packId)).toEqual([packOf(1)]);
    expect(classes.rewrite.map((p) => p.packId)).toEqual([packOf(2)]);
    expect(classes.unindexed.map((p) => p.packId)).toEqual([packOf(4), packOf(6)]);
    expect(classes.liveChunks).toBe(2 + 7 + 1);
    for (const plan of [...classes.dead, ...classes.rewrite, ...classes.unindexed]) expect(plan).toMatchObject({ size, live: [], dead: [] });
  });

  test('the two passes: counts per pack first, then the entries of only the packs that go', async () => {
    const live = new Set([idOf(1), idOf(3)].map((id) => id.toString('hex')));
    const liveSet = { has: (id: Buffer) => live.has(id.toString('hex')) };
    const index = [entry(1, 1, 500), entry(2, 1, 700), entry(3, 2, 900), entry(4, 3, 100), entry(5, 3, 100)];
    const tallies = await tallyPacks(entries(index), liveSet, noTick);
    expect([...tallies]).toEqual([
      [packOf(1), { live: 1, liveBytes: 500 }],
      [packOf(2), { live: 1, liveBytes: 900 }],
      [packOf(3), { live: 0, liveBytes: 0 }],
    ]);
    const going: PackPlan[] = [
      { packId: packOf(1), size: 2000, live: [], dead: [] },
      { packId: packOf(3), size: 2000, live: [], dead: [] },
    ];
    await collectEntries(entries(index), liveSet, going, noTick);
    expect(going[0]!.live.map((e) => e.id[0])).toEqual([1]);
    expect(going[0]!.dead.map((e) => e.id[0])).toEqual([2]);
    expect(going[1]!.live).toEqual([]);
    expect(going[1]!.dead.map((e) => e.id[0])).toEqual([4, 5]);
  });

  test('the passes tick once per entry (where an interruption stops them); nothing going, no second pass', async () => {
    let ticks = 0;
    const tick = async (): Promise<void> => {
      ticks += 1;
    };
    await tallyPacks(entries([entry(1, 1), entry(2, 1)]), { has: () => false }, tick);
    expect(ticks).toBe(2);
    await collectEntries(entries([entry(1, 1), entry(2, 1)]), { has: () => false }, [], tick);
    expect(ticks).toBe(2);
  });

  test('planTotals: what a dry run says would be deleted, rewritten, moved and reclaimed', () => {
    const dead = { packId: packOf(1), size: 3000, live: [], dead: [entry(1, 1), entry(2, 1)] };
    const rewrite = { packId: packOf(2), size: 5000, live: [entry(3, 2, 800), entry(4, 2, 400)], dead: [entry(5, 2)] };
    const unindexed = { packId: packOf(3), size: 700, live: [], dead: [] };
    expect(planTotals({ dead: [dead], rewrite: [rewrite], unindexed: [unindexed] })).toEqual({
      deleted: [packOf(1), packOf(2), packOf(3)],
      rewritten: [packOf(2)],
      chunksRemoved: 3,
      chunksMoved: 2,
      bytesDeleted: 8700,
      bytesWritten: 1200,
    });
  });
});

describe('verify: entries and frames', () => {
  const frame: ScannedFrame = { offset: 4096, length: 1056, header: { kind: KIND_DATA, flags: 0, rawLength: 1000, storedLength: 1000, id: idOf(7) } };
  const location = { packId: packOf(1), offset: 4096, length: 1056, rawLength: 1000, kind: KIND_DATA, flags: 0 };

  test('namesFrame: an entry names a frame only if every field agrees', () => {
    expect(namesFrame(location, packOf(1), frame)).toBe(true);
    expect(namesFrame(undefined, packOf(1), frame)).toBe(false);
    for (const wrong of [{ packId: packOf(2) }, { offset: 4097 }, { length: 1057 }, { rawLength: 999 }, { kind: KIND_MAP_LEAF }, { flags: 1 }]) {
      expect(namesFrame({ ...location, ...wrong }, packOf(1), frame)).toBe(false);
    }
  });

  test('placementProblem: lengths no frame can have, and entries that run past their pack, before anything is read', () => {
    const e = { ...location, id: idOf(7) };
    expect(placementProblem(e, 5152)).toBeUndefined();
    expect(placementProblem({ ...e, length: FRAME_OVERHEAD - 1 }, 1e9)).toBe(`gives an impossible frame length ${FRAME_OVERHEAD - 1}`);
    expect(placementProblem({ ...e, length: MAX_FRAME_LENGTH + 1 }, 1e12)).toBe(`gives an impossible frame length ${MAX_FRAME_LENGTH + 1}`);
    expect(placementProblem(e, 5151)).toBe(`runs past the end of pack ${packOf(1)}`);
  });

  test('headerProblem: another blob, no frame, or a frame that disagrees with the entry', () => {
    const e = { ...location, id: idOf(7) };
    expect(headerProblem(e, frame.header)).toBeUndefined();
    expect(headerProblem(e, 'bad frame magic')).toBe(`does not point at that blob in pack ${packOf(1)}`);
    expect(headerProblem(e, { ...frame.header, id: idOf(8) })).toBe(`does not point at that blob in pack ${packOf(1)}`);
    expect(headerProblem(e, { ...frame.header, rawLength: 999, storedLength: 999 })).toBe(`disagrees with its frame in pack ${packOf(1)} (length, raw length, kind or flags)`);
    expect(headerProblem(e, { ...frame.header, kind: KIND_MAP_LEAF })).toMatch(/^disagrees with its frame/);
  });
});

describe('verify: chunk problems', () => {
  const hex = idOf(7).toString('hex');
  const reference: ChunkReference = { backup: 'b1', disk: 'sda', offset: 65536, length: 1000, id: idOf(7), location: { packId: packOf(1), offset: 4096, length: 1056, rawLength: 1000, kind: KIND_DATA, flags: 0 } };
  const none = { lostWith: undefined, damagedBlobs: new Map(), quarantinedBlobs: new Map() };
  const prefix = `backup b1, disk sda, offset 65536: chunk ${hex.slice(0, 16)}…`;

  test('an indexed chunk of the block length, known to no damage: nothing', () => {
    expect(chunkProblems(reference, none)).toEqual([]);
  });

  test('each kind of damage, named with the backup, disk and offset', () => {
    expect(chunkProblems(reference, { ...none, lostWith: packOf(9) })).toEqual([
      { code: 'CHUNK_DAMAGED', message: `${prefix} is lost: its pack ${packOf(9)} is missing`, backup: 'b1', disk: 'sda', offset: 65536, blob: hex, pack: packOf(9) },
    ]);
    expect(chunkProblems({ ...reference, length: 4096 }, none)).toEqual([
      { code: 'CHUNK_DAMAGED', message: `${prefix} holds 1000 bytes, the block needs 4096`, backup: 'b1', disk: 'sda', offset: 65536, blob: hex, pack: packOf(1), packOffset: 4096 },
    ]);
    expect(chunkProblems({ ...reference, length: 512 }, none)[0]!.message).toBe(`${prefix} holds 1000 bytes, the block needs 512`); // a last, short block
    expect(chunkProblems({ ...reference, location: undefined }, none)).toEqual([{ code: 'CHUNK_MISSING', message: `${prefix} is missing`, backup: 'b1', disk: 'sda', offset: 65536, blob: hex }]);
    const quarantined = new Map([[hex, { pack: packOf(2), offset: 32, blob: hex, why: 'checksum mismatch', since: '2026-01-01T00:00:00.000Z' }]]);
    expect(chunkProblems({ ...reference, location: undefined }, { ...none, quarantinedBlobs: quarantined })[0]).toMatchObject({ code: 'CHUNK_DAMAGED', pack: packOf(2), packOffset: 32 });
    const damaged = new Map([[hex, { code: 'FRAME_DAMAGED', message: 'checksum mismatch', pack: packOf(1) }]]);
    expect(chunkProblems(reference, { ...none, damagedBlobs: damaged })).toEqual([
      { code: 'CHUNK_DAMAGED', message: `${prefix} is damaged (checksum mismatch)`, backup: 'b1', disk: 'sda', offset: 65536, blob: hex, pack: packOf(1) },
    ]);
  });
});

describe('verify: the --subset choice', () => {
  const packs = Array.from({ length: 40 }, (_, i) => packOf(i + 1));

  test('ceil(f × n) packs, the same for the same seed, another for another seed; all of them without a fraction', () => {
    const a = choosePacks(packs, 0.1, 'seed-a');
    expect(a.seed).toBe('seed-a');
    expect(a.packs.size).toBe(4);
    for (const p of a.packs) expect(packs).toContain(p);
    expect([...choosePacks(packs, 0.1, 'seed-a').packs]).toEqual([...a.packs]);
    expect([...choosePacks(packs, 0.1, 'seed-b').packs]).not.toEqual([...a.packs]);
    expect(choosePacks(packs, 0.01, 'x').packs.size).toBe(1); // never zero packs for a positive fraction
    expect(choosePacks(packs, undefined, 'x').packs.size).toBe(40);
  });

  test('a larger fraction with the same seed reads a superset: the order is fixed by the seed', () => {
    const small = choosePacks(packs, 0.1, 's');
    const large = choosePacks(packs, 0.5, 's');
    for (const p of small.packs) expect(large.packs.has(p)).toBe(true);
  });

  test('no seed: a random one, reported', () => {
    const { seed } = choosePacks(packs, 0.5, undefined);
    expect(seed).toMatch(/^[0-9a-f]{16}$/);
  });
});

describe('repair: good frames', () => {
  const frames: ScannedFrame[] = [32, 1088, 5000].map((offset, i) => ({ offset, length: 1056, header: { kind: KIND_DATA, flags: 0, rawLength: 1000, storedLength: 1000, id: idOf(i + 1) } }));

  test('goodEntries: an entry per good frame, but for places an earlier repair set aside', () => {
    const already = new Map([[`${packOf(1)}-1088`, {}]]);
    expect(goodEntries(packOf(1), frames, already)).toEqual([
      { id: idOf(1), packId: packOf(1), offset: 32, length: 1056, rawLength: 1000, kind: KIND_DATA, flags: 0 },
      { id: idOf(3), packId: packOf(1), offset: 5000, length: 1056, rawLength: 1000, kind: KIND_DATA, flags: 0 },
    ]);
  });

  test('GoodPlaces: exactly the offsets added, per pack, offsets past 2^32 included', () => {
    const places = new GoodPlaces();
    const far = 2 ** 32 + 32;
    places.addPack(packOf(1), [32, 1088, 5000, far]);
    places.addPack(packOf(2), []);
    for (const offset of [32, 1088, 5000, far]) expect(places.has(packOf(1), offset)).toBe(true);
    for (const offset of [0, 33, 1087, 4999, 5001, 32 + 2 ** 32 - 1, far + 1]) expect(places.has(packOf(1), offset)).toBe(false);
    expect(places.has(packOf(2), 32)).toBe(false);
    expect(places.has(packOf(3), 32)).toBe(false);
  });
});
