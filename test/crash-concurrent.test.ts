/**
 * Two processes at once (part of the fault campaign, test/fault-campaign.ts): two writers, prune racing a
 * backup, prune between gc's phases, repair, prune and gc while a server serves a backup. The second
 * process waits its turn (exit 3, the holder named) or works beside the first without harm; every
 * committed backup restores byte for byte.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { access, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { exitOf, filesIdentical, parseJson, resumedJson, runEngine, sh, sparseFile, spawnEngine, stoppedItself, tempDir, writeRegion, type BackupJson, expectRestoreIdentical, waitFor } from './helpers.js';
import { campaign, CampaignRepo, recordCampaign, type GcJson } from './fault-campaign.js';
import { generateImage, SeededRandom } from '../dist/engine/index.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-crash-concurrent-'));
});
afterAll(async () => {
  await recordCampaign('crash-concurrent');
  await cleanup();
});

describe('two writers at once', () => {
  test('the second is refused with the first one named; the first completes', async () => {
    const repo = join(dir, 'repo-two');
    // Format 1: one writer at a time, the second exits 3 (format 3 takes both: v3-backup, v3-concurrency).
    await runEngine(['init', repo, '--format', '1']);
    const image = join(dir, 'two.img');
    await generateImage(image, 512 * MiB, 'two-writers');
    const first = spawnEngine(['backup', '--repo', repo, '--source', image, '--workers', '1', '--json']);
    let stdout = '';
    first.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    const firstExit = exitOf(first);
    // The first holds the lock before the second starts (a fixed 2-s budget let a loaded machine start the
    // second first): its lock, however long its start takes.
    await waitFor('the first backup holds the lock', () => access(join(repo, 'lock')).then(() => true, () => false), { child: first, everyMs: 10 });
    const second = await runEngine(['backup', '--repo', repo, '--source', image]);
    campaign.injected += 1;
    campaign.concurrent += 1;
    expect(second.code).toBe(3);
    expect(second.stderr).toContain(`is locked by pid ${first.pid} on host`);
    expect((await firstExit).code).toBe(0);
    await expectRestoreIdentical(repo, parseJson<BackupJson>(stdout).id, image, { dir });
  });
});

describe('two processes at once: prune, gc, repair and serve', () => {
  let c: CampaignRepo;

  beforeAll(async () => {
    c = new CampaignRepo(join(dir, 'repo-concurrent'), dir, new SeededRandom('concurrent'));
    // Format 1: the lock and the readers/ and writers/ registrations (format 3: v3-readers, v3-gc).
    expect((await runEngine(['init', c.repo, '--format', '1'])).code).toBe(0);
  });

  async function imageOf(name: string, regions: [number, string][]): Promise<string> {
    const path = join(dir, `concurrent-${name}.img`);
    await sparseFile(path, regions.reduce((sum, [n]) => sum + n * MiB, 0));
    let at = 0;
    for (const [n, seed] of regions) {
      await writeRegion(path, at * MiB, n * MiB, 'random', seed);
      at += n;
    }
    return path;
  }

  test('prune while a backup runs, and a backup while prune runs: the second waits its turn (exit 3, holder named); both then succeed', async () => {
    for (let i = 0; i < 2; i += 1) await c.backupOf(await imageOf(`p${i}`, [[2, `p${i}`]]), 'p');
    const source = await imageOf('p2', [[3, 'p2']]);
    let child = c.spawn(['backup', '--source', source, '--name', 'p', '--json'], { ENGINE_STOP_AT: 'before-record' });
    await stoppedItself(child);
    const refused = await c.run(['prune', '--keep-last', '1']);
    c.count('concurrent');
    expect(refused.code).toBe(3);
    expect(refused.stderr).toContain(`is locked by pid ${child.pid} on host`);
    expect(refused.stderr).toContain('(backup)');
    const made = await resumedJson<BackupJson>(child);
    expect(made.code).toBe(0);
    c.committed.push({ id: made.json.id, source, name: 'p' });

    child = c.spawn(['prune', '--keep-last', '1', '--json'], { ENGINE_STOP_AT: 'prune-record-removed' });
    await stoppedItself(child);
    const waiting = await c.run(['backup', '--source', source, '--name', 'p']);
    c.count('concurrent');
    expect(waiting.code).toBe(3);
    expect(waiting.stderr).toContain('(prune)');
    child.kill('SIGCONT');
    await stoppedItself(child); // after the second removal
    const pruned = await resumedJson<{ removed: number }>(child);
    expect(pruned.code).toBe(0);
    expect(pruned.json.removed).toBe(2);
    await c.forgetRemoved();
    await c.backupOf(source, 'p');
    await c.restoresAll();
    await c.verifies();
  });

  test('prune between gc phases removes a backup gc marked live: gc commits, deletes only what it found dead, and the next gc reclaims the rest', async () => {
    const a = await imageOf('ga', [[4, 'g-shared'], [6, 'ga']]);
    const b = await imageOf('gb', [[4, 'g-shared'], [6, 'gb']]);
    const last = await imageOf('gc', [[4, 'g-shared'], [6, 'gc']]);
    for (const image of [a, b, last]) await c.backupOf(image, 'g');
    expect((await c.run(['gc'])).code).toBe(0); // what the test before left
    expect((await c.run(['prune', '--keep-last', '2'])).code).toBe(0); // a's backup goes: its own 6 chunks and its map are dead
    await c.forgetRemoved();
    const withB = c.committed.find((x) => x.source === b)!.id;

    let child = c.spawn(['gc', '--json'], { ENGINE_STOP_AT: 'gc-marked' });
    await stoppedItself(child);
    const pruned = await c.run(['prune', '--keep-last', '1', '--json']); // gc holds no lock while it copies
    c.count('concurrent');
    expect(pruned.code).toBe(0);
    expect(parseJson<{ backups: { id: string; keep: boolean }[] }>(pruned.stdout).backups.filter((x) => !x.keep).map((x) => x.id)).toContain(withB);
    await c.forgetRemoved();
    let gc = await resumedJson<GcJson>(child);
    expect(gc.code).toBe(0);
    expect(gc.json.backupsCommittedDuringGc).toEqual([]);
    // a's data pack: 4 of 10 chunks live, rewritten; its map pack dead. b's pack stays: gc marked it live.
    expect(gc.json.packs.rewritten.length).toBe(1);
    expect(gc.json.packs.deleted.length).toBe(2);
    const leftover = await c.verifies();
    expect(leftover.unreferencedBlobs).toBe(6 + 1); // b's own chunks and its map page, now garbage
    await c.restoresAll();

    // gc in its commit phase holds the lock: prune waits its turn.
    child = c.spawn(['gc', '--json'], { ENGINE_STOP_AT: 'gc-published' });
    await stoppedItself(child);
    const waiting = await c.run(['prune', '--keep-last', '1']);
    c.count('concurrent');
    expect(waiting.code).toBe(3);
    expect(waiting.stderr).toContain('(gc)');
    gc = await resumedJson<GcJson>(child);
    expect(gc.code).toBe(0);
    expect(gc.json.chunks.removed).toBe(6 + 1);
    expect((await c.verifies()).unreferencedBlobs).toBe(0);
    await c.restoresAll();
  });

  test('repair while a serve is registered, then the served backup pruned and gc run: the server keeps serving the same bytes, gc defers deletions', async () => {
    const source = await imageOf('served', [[5, 'served']]);
    const id = await c.backupOf(source, 'served');
    const socket = join(dir, 'concurrent-serve.sock');
    const server = c.spawn(['serve', id, '--socket', socket, '--json']);
    let out = '';
    server.stdout!.on('data', (chunk: Buffer) => (out += chunk.toString()));
    let served: { readerToken: string; exports: { uri: string }[] } | undefined;
    for (let i = 0; !served && server.exitCode === null; i += 1) {
      await new Promise((resolve) => setTimeout(resolve, 50));
      try {
        served = JSON.parse(out) as typeof served;
      } catch {
        // not all printed yet
      }
    }
    const readsBack = async (): Promise<boolean> => {
      const copy = join(dir, 'concurrent-served.raw');
      await sh('nbdcopy', [served!.exports[0]!.uri, copy]);
      const same = await filesIdentical(source, copy);
      await sh('rm', ['-f', copy]);
      return same;
    };
    let deferred: string[] = [];
    try {
      expect(served).toBeDefined();
      const repaired = await c.run(['repair', '--json']);
      c.count('concurrent');
      expect(repaired.code).toBe(0);
      expect(parseJson<{ quarantined: unknown[] }>(repaired.stdout).quarantined).toEqual([]);
      expect(await readdir(join(c.repo, 'readers'))).toEqual([`${served!.readerToken}.json`]);
      expect(await readsBack()).toBe(true);
      // The served backup itself is pruned and collected while the server reads it: deletions wait.
      await c.backupOf(await imageOf('served-next', [[2, 'served-next']]), 'served');
      expect((await c.run(['prune', '--keep-last', '1'])).code).toBe(0);
      await c.forgetRemoved();
      expect(c.committed.some((x) => x.id === id)).toBe(false);
      const gc = parseJson<{ packs: { deleted: string[]; deferred: string[] }; readers: number }>((await c.run(['gc', '--json'])).stdout);
      c.count('concurrent');
      expect(gc.readers).toBe(1);
      expect(gc.packs.deleted).toEqual([]);
      expect(gc.packs.deferred.length).toBe(2); // the served backup's data and map packs
      deferred = gc.packs.deferred;
      expect(await readsBack()).toBe(true);
    } finally {
      server.kill('SIGTERM');
      await exitOf(server);
    }
    expect(await readdir(join(c.repo, 'readers'))).toEqual([]);
    const later = parseJson<{ packs: { deleted: string[] } }>((await c.run(['gc', '--json'])).stdout);
    expect(later.packs.deleted.sort()).toEqual(deferred.sort());
    await c.verifies();
    await c.restoresAll();
  });
});
