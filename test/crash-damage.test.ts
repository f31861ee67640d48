/**
 * The fault campaign's damage (test/fault-campaign.ts): flipped bits and truncations in packs and in the
 * LevelDB files of the index. After each: verify says what is wrong (damage in a pack always), repair mends
 * it, the next backup heals what repair set aside; every committed backup restores byte for byte.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readdir, stat, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { runEngine, tempDir } from './helpers.js';
import { CampaignRepo, recordCampaign } from './fault-campaign.js';
import { SeededRandom } from '../dist/engine/index.js';

let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-crash-damage-'));
});
afterAll(async () => {
  await recordCampaign('crash-damage');
  await cleanup();
});

describe('fault campaign: damage', () => {
  let c: CampaignRepo;

  beforeAll(async () => {
    c = new CampaignRepo(join(dir, 'repo-campaign'), dir, new SeededRandom('fault-campaign-damage'));
    // Format 1: its LevelDB index files and lock are among what is damaged (format 3: v3-repair, crash-v3).
    await runEngine(['init', c.repo, '--format', '1']);
    await c.backupOf(await c.randomImage('a', 4), 'campaign-a');
    await c.backupOf(await c.randomImage('b', 3), 'campaign-b');
    // Packs of every kind to damage: the backups' own data and map packs, and packs gc rewrote.
    for (const round of ['d1', 'd2']) {
      await c.gcWork(round);
      expect((await c.run(['gc'])).code).toBe(0);
    }
  });

  test('flipped bits in packs: each detected, repaired, healed by the next backup', async () => {
    for (let round = 0; round < 4; round += 1) {
      const packs = await c.undamagedPacks();
      const pack = packs[c.random.below(packs.length)]!;
      await c.flipBit(pack, c.random.below((await stat(pack)).size));
      await c.afterFault('damage', true);
    }
  });

  test('truncated packs: detected, repaired, healed', async () => {
    for (let round = 0; round < 2; round += 1) {
      const packs = await c.undamagedPacks();
      const pack = packs[c.random.below(packs.length)]!;
      await truncate(pack, c.random.below((await stat(pack)).size));
      await c.afterFault('damage', true);
    }
  });

  test('flipped bits and truncations in the index files (.ldb, .log, MANIFEST, CURRENT)', async () => {
    for (const pattern of [/\.ldb$/, /\.log$/, /^MANIFEST-/, /^CURRENT$/]) {
      const names = (await readdir(join(c.repo, 'index'))).filter((n) => pattern.test(n));
      if (names.length === 0) {
        // Make sure the file kind exists: every exclusive open turns the log into a table.
        await c.run(['verify']);
        continue;
      }
      const file = join(c.repo, 'index', names[c.random.below(names.length)]!);
      const size = (await stat(file)).size;
      if (size === 0) continue;
      if (c.random.below(2) === 0) await c.flipBit(file, c.random.below(size));
      else await truncate(file, c.random.below(size));
      await c.afterFault('damage');
    }
  });
});
