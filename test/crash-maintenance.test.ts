/**
 * The fault campaign's kill points in maintenance (test/fault-campaign.ts): kill -9 at every crash point
 * of gc, prune and repair, and at random moments of gc and repair. After each: verify passes, or says what
 * is wrong and repair mends it; every committed backup restores byte for byte; the next backup succeeds.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { exitOf, runEngine, tempDir } from './helpers.js';
import { CampaignRepo, recordCampaign } from './fault-campaign.js';
import { scanPack, SeededRandom } from '../dist/engine/index.js';

let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-crash-maintenance-'));
});
afterAll(async () => {
  await recordCampaign('crash-maintenance');
  await cleanup();
});

describe('fault campaign: kill -9 in gc, prune and repair', () => {
  let c: CampaignRepo;

  beforeAll(async () => {
    c = new CampaignRepo(join(dir, 'repo-campaign'), dir, new SeededRandom('fault-campaign'));
    // Format 1: gc's phases under the lock, the reserve, tmp/ (format 3: crash-v3).
    await runEngine(['init', c.repo, '--format', '1']);
    await c.backupOf(await c.randomImage('a', 4), 'campaign-a');
    await c.backupOf(await c.randomImage('b', 3), 'campaign-b');
  });

  test.each(['gc-marked', 'gc-copied', 'gc-published', 'gc-indexed', 'gc-pack-deleted'])('kill -9 in gc at %s', async (point) => {
    await c.gcWork(point);
    const crashed = await c.run(['gc'], { env: { ENGINE_CRASH_AT: point } });
    expect(crashed.code).toBe(137);
    await c.afterFault('crash');
    const finished = await c.run(['gc', '--json']);
    expect(finished.code).toBe(0);
    await c.verifies();
  });

  test('kill -9 in prune, between two record removals', async () => {
    await c.gcWork('prune-a');
    const keepers = c.committed.length;
    const extra = await c.randomImage('prune-extra', 2);
    for (let i = 0; i < 3; i += 1) await c.backupOf(extra, 'prune-extra');
    const crashed = await c.run(['prune', '--keep-last', '1'], { env: { ENGINE_CRASH_AT: 'prune-record-removed' } });
    expect(crashed.code).toBe(137);
    // One record is gone, the rest intact; which one depends on the order, so drop whichever vanished.
    await c.forgetRemoved();
    expect(c.committed.length).toBe(keepers + 2);
    await c.afterFault('crash');
  });

  test.each(['repair-quarantined', 'repair-index-swapped'])('kill -9 in repair at %s, with a damaged chunk to set aside', async (point) => {
    // A data frame's payload in the largest pack (a chunk backups reference), a different frame each time.
    const packs = await c.undamagedPacks();
    const sizes = await Promise.all(packs.map(async (p) => (await stat(p)).size));
    const pack = packs[sizes.indexOf(Math.max(...sizes))]!;
    const frames = (await scanPack(c.repo, pack.split('/').pop()!)).frames;
    await c.flipBit(pack, frames[0]!.offset + 48 + c.random.below(1000));
    const crashed = await c.run(['repair'], { env: { ENGINE_CRASH_AT: point } });
    expect(crashed.code).toBe(137);
    c.count('damage'); // the flip; afterFault counts the kill
    await c.afterFault('crash', true);
  });

  test('kill -9 at random moments of gc and repair', async () => {
    for (let round = 0; round < 2; round += 1) {
      await c.gcWork(`random-${round}`);
      const child = c.spawn([round % 2 === 0 ? 'gc' : 'repair']);
      await new Promise((resolve) => setTimeout(resolve, 60 + c.random.below(500)));
      child.kill('SIGKILL');
      await exitOf(child);
      await c.afterFault('crash');
    }
  });
});
