/**
 * kill -9 during a backup, at every step of the commit order and at random moments (part of the fault
 * campaign, test/fault-campaign.ts). After each: verify passes and lists what the crash left as garbage;
 * only a crash after the record is durable leaves a backup, which restores byte for byte; every earlier
 * backup restores; the next backup succeeds.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { exitOf, parseJson, runEngine, sparseFile, spawnEngine, tempDir, writeRegion, type BackupJson } from './helpers.js';
import { backupIds, campaign, expectVerifies, recordCampaign } from './fault-campaign.js';
import { restoresIdentical } from './library-calls.js';
import { generateImage } from '../dist/engine/index.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-crash-backup-'));
});
afterAll(async () => {
  await recordCampaign('crash-backup');
  await cleanup();
});

/**
 * Restored and compared (cmp) through a call of the library in this process (test/library-calls.ts), and
 * nothing said: no notice (what the CLI prints on stderr of its own accord, a broken lock, a rebuilt index).
 */
async function expectRestoreIdentical(repo: string, id: string, expected: string): Promise<void> {
  const target = join(dir, `restore-${id.slice(0, 8)}.raw`);
  const notices: string[] = [];
  expect([await restoresIdentical(repo, id, expected, target, {}, undefined, notices), notices], `restore of ${id}`).toEqual([true, []]);
  await rm(target, { force: true });
}

describe('kill -9 during a backup', () => {
  let repo: string;
  let earlier: string;
  let earlierId: string;
  let big: string;

  beforeAll(async () => {
    repo = join(dir, 'repo-kill');
    // Format 1: the commit order of section 10 (format 3, 19.7: crash-v3).
    await runEngine(['init', repo, '--format', '1']);
    earlier = join(dir, 'earlier.img');
    await generateImage(earlier, 24 * MiB + 17, 'crash-earlier');
    const result = await runEngine(['backup', '--repo', repo, '--source', earlier, '--json']);
    earlierId = parseJson<BackupJson>(result.stdout).id;
    // 80 MiB of new data: more than two 32 MiB packs, so every step of the commit order is reached.
    big = join(dir, 'big.img');
    await sparseFile(big, 80 * MiB);
  });

  test.each(['pack-written', 'pack-sealed', 'index-written', 'before-record', 'record-written'])('at %s', async (point) => {
    // New content each time, or deduplication would leave no pack to write and no point to reach.
    await writeRegion(big, 0, 80 * MiB, 'random', `crash-${point}`);
    const before = await backupIds(repo);
    const crashed = await runEngine(['backup', '--repo', repo, '--source', big], { env: { ENGINE_CRASH_AT: point } });
    expect(crashed.code).toBe(137); // killed by SIGKILL, as kill -9 would
    campaign.injected += 1;
    campaign.crashes += 1;
    const garbage = await expectVerifies(repo);
    // What each crash leaves is listed by verify as garbage (SPEC.md, section 10).
    if (point === 'pack-written') expect(garbage.tempFiles.length).toBeGreaterThan(0);
    if (point === 'pack-sealed') expect(garbage.unindexedPacks.length).toBeGreaterThan(0);
    if (point === 'index-written' || point === 'before-record') expect(garbage.unreferencedBlobs).toBeGreaterThan(0);
    const after = await backupIds(repo);
    // Only a crash after the record is durable leaves a (complete) backup behind.
    if (point === 'record-written') {
      expect(after.length).toBe(before.length + 1);
      await expectRestoreIdentical(repo, after.find((id) => !before.includes(id))!, big);
    } else {
      expect(after).toEqual(before);
    }
    await expectRestoreIdentical(repo, earlierId, earlier);
    const next = await runEngine(['backup', '--repo', repo, '--source', big, '--json']);
    expect(next.code).toBe(0);
    await expectRestoreIdentical(repo, parseJson<BackupJson>(next.stdout).id, big);
  });

  test('at random moments', async () => {
    const image = join(dir, 'random-kill.img');
    await generateImage(image, 256 * MiB, 'crash-random');
    for (const delay of [150, 400, 700, 1000, 1400]) {
      const before = await backupIds(repo);
      const child = spawnEngine(['backup', '--repo', repo, '--source', image, '--workers', '1']);
      await new Promise((resolve) => setTimeout(resolve, delay));
      child.kill('SIGKILL');
      await exitOf(child);
      campaign.injected += 1;
      campaign.crashes += 1;
      await expectVerifies(repo);
      const after = await backupIds(repo);
      expect(after.length - before.length).toBeLessThanOrEqual(1);
      for (const id of after.filter((x) => !before.includes(x))) await expectRestoreIdentical(repo, id, image);
    }
    await expectRestoreIdentical(repo, earlierId, earlier);
    const next = await runEngine(['backup', '--repo', repo, '--source', image, '--json']);
    expect(next.code).toBe(0);
    await expectRestoreIdentical(repo, parseJson<BackupJson>(next.stdout).id, image);
  });
});
