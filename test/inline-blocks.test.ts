/**
 * A small job runs its blocks on the main thread and starts no worker (block-pool.ts, runsInline); a larger one,
 * and every job under ENGINE_TEST_BLOCK_WORKERS=pool, in the worker pool. The two must be interchangeable: a backup
 * made by one is deduplicated whole by the other (the same block ids), each restores what the other backed up byte
 * for byte, and verify --read-data names the same damaged frame whichever runs it. Plain and encrypted repositories.
 * Which one ran is seen from outside: strace notes the name Node gives each thread it starts, a Worker's "WorkerThread".
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { INLINE_MAX_BYTES } from '../dist/engine/pipeline/block-pool.js';
import { backUp, countingWorkers, damageFirstDataFrame, expectRestoreIdentical, parseJson, runEngine, sh, sparseFile, tempDir, withoutProgress, writeRegion, type BackupJson } from './helpers.js';

const MiB = 1024 * 1024;
const PASSWORD = { ENGINE_PASSWORD: 'inline blocks' };
let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-inline-'));
});
afterAll(async () => {
  await cleanup();
});

/**
 * 7 MiB + 4097 bytes of every kind of content, well under INLINE_MAX_BYTES: blocks of random data, text and a repeated
 * pattern, a zero block, a random block and a short last block (7 blocks of data, 1 zero).
 */
async function image(name: string): Promise<string> {
  const path = join(dir, name);
  await sparseFile(path, 7 * MiB + 4097);
  await writeRegion(path, 0, 2 * MiB, 'random', name);
  await writeRegion(path, 2 * MiB, 2 * MiB, 'text', name);
  await writeRegion(path, 4 * MiB, MiB, 'repeat', name);
  await writeRegion(path, 6 * MiB, MiB + 4097, 'random', `${name}-tail`);
  return path;
}

/** `engine backup --repo REPO ARGS --json`, which must succeed: its record, and how many block workers it started. */
async function backUpCountingWorkers(repo: string, args: string[], env: Record<string, string>): Promise<{ record: BackupJson; workers: number }> {
  const { stdout, stderr, workers } = await countingWorkers(['backup', '--repo', repo, ...args, '--json'], env, dir);
  expect(withoutProgress(stderr)).toBe('');
  return { record: parseJson<BackupJson>(stdout), workers };
}

interface VerifyJson {
  ok: boolean;
  problems: { code: string; pack?: string; packOffset?: number }[];
}

for (const encrypted of [false, true]) {
  describe(encrypted ? 'encrypted repository' : 'plain repository', () => {
    const base = encrypted ? PASSWORD : {};
    const pool = { ...base, ENGINE_TEST_BLOCK_WORKERS: 'pool' };

    test('the main thread and the worker pool make the same blocks, read each other\'s, and find the same damage', async () => {
      expect(8 * MiB).toBeLessThan(INLINE_MAX_BYTES);
      const repo = join(dir, encrypted ? 'repo-encrypted' : 'repo-plain');
      expect((await runEngine(['init', repo, ...(encrypted ? ['--encrypt'] : [])], { env: base })).code).toBe(0);
      const first = await image(encrypted ? 'e1.img' : 'p1.img');
      const second = await image(encrypted ? 'e2.img' : 'p2.img');

      // The pool's blocks, then the same disk on the main thread: every data block is already there.
      const { record: byPool, workers: poolWorkers } = await backUpCountingWorkers(repo, ['--source', first, '--name', 'first'], pool);
      expect(poolWorkers).toBeGreaterThan(0);
      expect(byPool.disks[0]!.blocksNew).toBe(7);
      const again = await backUp(repo, ['--source', first, '--name', 'first', '--full'], { env: base, quiet: true });
      expect(again.disks[0]!).toMatchObject({ blocksNew: 0, blocksDeduplicated: 7, blocksZero: 1 });
      // And the other way round.
      const { record: inline, workers: inlineWorkers } = await backUpCountingWorkers(repo, ['--source', second, '--name', 'second'], base);
      expect(inlineWorkers).toBe(0);
      // Its random blocks are new (its text and pattern blocks are the first disk's).
      expect(inline.disks[0]!).toMatchObject({ blocksNew: 5, blocksDeduplicated: 2, blocksZero: 1 });
      const byPoolAgain = await backUp(repo, ['--source', second, '--name', 'second', '--full'], { env: pool, quiet: true });
      expect(byPoolAgain.disks[0]!).toMatchObject({ blocksNew: 0, blocksDeduplicated: 7, blocksZero: 1 });

      // Each restores what the other sealed.
      await expectRestoreIdentical(repo, byPool.id, first, { dir, env: base });
      await expectRestoreIdentical(repo, inline.id, second, { dir, env: pool });

      const verify = async (env: Record<string, string>): Promise<{ code: number; report: VerifyJson }> => {
        const result = await runEngine(['verify', '--repo', repo, '--read-data', '--json'], { env });
        return { code: result.code, report: parseJson<VerifyJson>(result.stdout) };
      };
      expect(await verify(base)).toMatchObject({ code: 0, report: { ok: true, problems: [] } });
      expect(await verify(pool)).toMatchObject({ code: 0, report: { ok: true, problems: [] } });

      // A flipped payload byte in the first data frame found: both name that frame, and only it.
      const damaged = await damageFirstDataFrame(repo, encrypted);
      for (const env of [base, pool]) {
        const { code, report } = await verify(env);
        expect(code).toBe(4);
        expect(report.problems.filter((p) => p.code === 'FRAME_DAMAGED')).toEqual([expect.objectContaining({ pack: damaged.pack, packOffset: damaged.offset })]);
      }

      // repair checks the packs as verify does: on the main thread for a repository this small, in the pool under
      // ENGINE_TEST_BLOCK_WORKERS=pool. Each, on a copy of its own (and a host cache of its own), sets aside that
      // frame and only it, and rebuilds the same index. Its worker threads are counted by ENGINE_TEST_CPU_LOG
      // (bin/engine.js), as repair exits non-zero here (a backup still needs the damaged block).
      const repairs = [];
      for (const [name, env] of [['inline', base], ['pool', pool]] as const) {
        const copy = join(dir, `${encrypted ? 'e' : 'p'}-repair-${name}`);
        await sh('cp', ['-a', repo, copy]);
        const log = join(dir, `${encrypted ? 'e' : 'p'}-repair-${name}.jsonl`);
        const result = await runEngine(['repair', '--repo', copy, '--json'], { env: { ...env, ENGINE_CACHE_DIR: join(dir, `cache-${name}`), ENGINE_TEST_CPU_LOG: log } });
        const report = parseJson<{ index: { packs: number; blobs: number }; quarantined: { pack: string; offset: number }[] }>(result.stdout);
        const lines = (await readFile(log, 'utf8')).trim().split('\n').map((line) => JSON.parse(line) as { argv: string[]; workers: number });
        expect(lines).toHaveLength(1);
        expect(lines[0]!.argv[0]).toBe('repair');
        repairs.push({ code: result.code, workers: lines[0]!.workers, index: report.index, quarantined: report.quarantined.map((q) => [q.pack, q.offset]) });
      }
      expect(repairs[0]!.workers).toBe(0);
      expect(repairs[1]!.workers).toBeGreaterThan(0);
      expect(repairs[0]!.quarantined).toEqual([[damaged.pack, damaged.offset]]);
      expect({ ...repairs[1]!, workers: 0 }).toEqual(repairs[0]);
    });
  });
}
