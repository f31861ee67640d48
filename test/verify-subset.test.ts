/**
 * `verify --read-data --subset P% [--seed S]`: the packs read are exactly the first ceil(P% × packs) in
 * the order of SHA-256(seed ‖ pack id) (SPEC.md, section 14); the choice is reproducible from the seed
 * verify reports; damage in a pack outside the subset goes unseen (its frame chain is intact), damage in
 * a pack inside it is named per frame and per backup, disk and offset.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readdir, stat } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { damageFirstDataFrame, parseJson, runEngine, sparseFile, tempDir, writeRegion, type BackupJson } from './helpers.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;
let repo: string;
/** Every pack of the repository and its size. */
const packs = new Map<string, number>();
const backups: string[] = [];

interface VerifyJson {
  ok: boolean;
  readData: boolean;
  packs: number;
  bytesChecked: number;
  subset: { percent: number; seed: string; packs: number } | null;
  problems: { code: string; pack?: string; packOffset?: number; backup?: string; disk?: string; offset?: number }[];
}

async function verifyJson(args: string[]): Promise<{ code: number; report: VerifyJson }> {
  const result = await runEngine(['verify', '--repo', repo, '--read-data', '--json', ...args]);
  return { code: result.code, report: parseJson<VerifyJson>(result.stdout) };
}

/** The selection rule, computed here independently of the engine. */
function chosen(seed: string, percent: number): string[] {
  const ids = [...packs.keys()];
  const count = Math.ceil((percent / 100) * ids.length);
  return ids
    .map((id) => ({ id, key: createHash('sha256').update(seed).update(id).digest('hex') }))
    .sort((a, b) => (a.key < b.key ? -1 : 1))
    .slice(0, count)
    .map((p) => p.id);
}

const bytesOf = (ids: string[]): number => ids.reduce((sum, id) => sum + packs.get(id)!, 0);

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-subset-'));
  repo = join(dir, 'repo');
  expect((await runEngine(['init', repo])).code).toBe(0);
  // Five backups of different content: a data pack and a map pack each, ten packs.
  for (let i = 0; i < 5; i += 1) {
    const image = join(dir, `disk-${i}.img`);
    await sparseFile(image, 2 * MiB);
    await writeRegion(image, 0, 2 * MiB, 'random', `subset-${i}`);
    const made = await runEngine(['backup', '--repo', repo, '--source', image, '--name', `vm${i}`, '--json']);
    expect(made.code).toBe(0);
    backups.push(parseJson<BackupJson>(made.stdout).id);
  }
  for (const sub of await readdir(join(repo, 'packs'))) {
    for (const id of await readdir(join(repo, 'packs', sub))) packs.set(id, (await stat(join(repo, 'packs', sub, id))).size);
  }
  expect(packs.size).toBe(10);
});
afterAll(async () => {
  await cleanup();
});

describe('verify --subset', () => {
  test('reads exactly the packs the seed chooses, reports the seed, and repeats the choice', async () => {
    const { code, report } = await verifyJson(['--subset', '25%', '--seed', 'monday']);
    expect(code).toBe(0);
    expect(report.subset).toEqual({ percent: 25, seed: 'monday', packs: 3 }); // ceil(2.5)
    expect(report.packs).toBe(10);
    expect(report.bytesChecked).toBe(bytesOf(chosen('monday', 25)));
    // Another seed chooses other packs (for this repository: checked, not assumed).
    expect(chosen('tuesday', 25)).not.toEqual(chosen('monday', 25));
    expect((await verifyJson(['--subset', '25%', '--seed', 'tuesday'])).report.bytesChecked).toBe(bytesOf(chosen('tuesday', 25)));

    // Without --seed a random seed is drawn and reported; given back, it reads the same packs.
    const drawn = (await verifyJson(['--subset', '50%'])).report;
    expect(drawn.subset!.seed).toMatch(/^[0-9a-f]{16}$/);
    expect(drawn.subset!.packs).toBe(5);
    expect(drawn.bytesChecked).toBe(bytesOf(chosen(drawn.subset!.seed, 50)));
    const again = (await verifyJson(['--subset', '50%', '--seed', drawn.subset!.seed])).report;
    expect(again.subset).toEqual(drawn.subset);
    expect(again.bytesChecked).toBe(drawn.bytesChecked);

    const all = (await verifyJson(['--subset', '100%', '--seed', 'x'])).report;
    expect(all.subset).toEqual({ percent: 100, seed: 'x', packs: 10 });
    expect(all.bytesChecked).toBe(bytesOf([...packs.keys()]));
    const whole = (await verifyJson([])).report;
    expect(whole.subset).toBeNull();
    expect(whole.bytesChecked).toBe(all.bytesChecked);

    const usage = await runEngine(['verify', '--repo', repo, '--subset', '10%']);
    expect(usage.code).toBe(2);
    expect(usage.stderr).toContain('give --read-data too');
    expect((await runEngine(['verify', '--repo', repo, '--read-data', '--subset', '0%'])).code).toBe(2);
  });

  test('a damaged chunk is found exactly when its pack is in the subset', async () => {
    // The first data frame (block 0 of its disk) of a data pack: flip a payload byte (the frame chain still parses).
    const damaged = await damageFirstDataFrame(repo);
    const { pack } = damaged;
    // Seeds that put the damaged pack outside and inside a 20% subset (two packs of ten).
    const seeds = Array.from({ length: 200 }, (_, i) => `seed-${i}`);
    const outside = seeds.find((s) => !chosen(s, 20).includes(pack))!;
    const inside = seeds.find((s) => chosen(s, 20).includes(pack))!;

    const missed = await verifyJson(['--subset', '20%', '--seed', outside]);
    expect(missed.report.problems).toEqual([]);
    expect(missed.code).toBe(0);
    expect(missed.report.bytesChecked).toBe(bytesOf(chosen(outside, 20)));

    const found = await verifyJson(['--subset', '20%', '--seed', inside]);
    expect(found.code).toBe(4);
    const frames = found.report.problems.filter((p) => p.code === 'FRAME_DAMAGED');
    expect(frames).toEqual([expect.objectContaining({ pack, packOffset: damaged.offset })]);
    const chunks = found.report.problems.filter((p) => p.code === 'CHUNK_DAMAGED');
    expect(chunks.length).toBe(1);
    expect(backups).toContain(chunks[0]!.backup);
    expect(chunks[0]).toMatchObject({ disk: expect.any(String), offset: 0, pack });
    expect(found.report.problems.length).toBe(2);
  });
});
