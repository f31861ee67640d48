/**
 * Crashes and contention: kill -9 at every step of the commit order and at random moments, two writers
 * at once, a full disk; then the fault campaign: kill -9 at every crash point of prune, gc and repair and
 * at random moments of gc and repair, flipped bits and truncations in packs and in the LevelDB files. After
 * each: verify passes, or says what is wrong and repair mends it; every committed backup restores byte
 * for byte; the next backup succeeds. The campaign counts faults injected, detected and backups lost, and
 * prints the counts in one line.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { access, copyFile, mkdir, open, readdir, stat, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { exitOf, filesIdentical, parseJson, runEngine, sh, spawnEngine, sparseFile, tempDir, writeRegion, type BackupJson } from './helpers.js';
import { generateImage, listQuarantine, scanPack, SeededRandom } from '../dist/engine/index.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;

/** The campaign's counts: every fault below adds to `injected`; `lost` counts committed backups that no longer restore. */
const campaign = { injected: 0, crashes: 0, damage: 0, detected: 0, repaired: 0, harmless: 0, lost: 0 };

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-crash-'));
});
afterAll(async () => {
  await cleanup();
  console.log(
    `fault campaign: ${campaign.injected} faults injected (${campaign.crashes} kill -9, ${campaign.damage} damage), ` +
      `${campaign.detected} detected by verify, ${campaign.repaired} repaired, ${campaign.harmless} damage faults harmless (verify found nothing and everything restored), ` +
      `${campaign.lost} backups lost`,
  );
});

async function backupIds(repo: string): Promise<string[]> {
  const result = await runEngine(['list', '--repo', repo, '--json']);
  expect(result.code).toBe(0);
  return parseJson<{ backups: { id: string }[] }>(result.stdout).backups.map((b) => b.id);
}

async function expectRestores(repo: string, id: string, image: string): Promise<void> {
  const target = join(dir, `restore-${id}-${Date.now()}`);
  const result = await runEngine(['restore', '--repo', repo, id, '--to', target]);
  expect(result.stderr).toBe('');
  expect(result.code).toBe(0);
  expect(await filesIdentical(image, target)).toBe(true);
  await sh('rm', ['-f', target]);
}

interface Garbage {
  tempFiles: string[];
  unindexedPacks: string[];
  unreferencedBlobs: number;
}

async function expectVerifies(repo: string): Promise<Garbage> {
  const result = await runEngine(['verify', '--repo', repo, '--read-data', '--json']);
  const report = parseJson<{ ok: boolean; problems: unknown[]; garbage: Garbage }>(result.stdout);
  expect(report.problems).toEqual([]);
  expect(result.code).toBe(0);
  return report.garbage;
}

describe('kill -9 during a backup', () => {
  let repo: string;
  let earlier: string;
  let earlierId: string;
  let big: string;

  beforeAll(async () => {
    repo = join(dir, 'repo-kill');
    await runEngine(['init', repo]);
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
      await expectRestores(repo, after.find((id) => !before.includes(id))!, big);
    } else {
      expect(after).toEqual(before);
    }
    await expectRestores(repo, earlierId, earlier);
    const next = await runEngine(['backup', '--repo', repo, '--source', big, '--json']);
    expect(next.code).toBe(0);
    await expectRestores(repo, parseJson<BackupJson>(next.stdout).id, big);
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
      for (const id of after.filter((x) => !before.includes(x))) await expectRestores(repo, id, image);
    }
    await expectRestores(repo, earlierId, earlier);
    const next = await runEngine(['backup', '--repo', repo, '--source', image, '--json']);
    expect(next.code).toBe(0);
    await expectRestores(repo, parseJson<BackupJson>(next.stdout).id, image);
  });
});

describe('two writers at once', () => {
  test('the second is refused with the first one named; the first completes', async () => {
    const repo = join(dir, 'repo-two');
    await runEngine(['init', repo]);
    const image = join(dir, 'two.img');
    await generateImage(image, 512 * MiB, 'two-writers');
    const first = spawnEngine(['backup', '--repo', repo, '--source', image, '--workers', '1', '--json']);
    let stdout = '';
    first.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    const firstExit = exitOf(first);
    for (let i = 0; i < 200; i += 1) {
      if (await access(join(repo, 'lock')).then(() => true, () => false)) break;
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    const second = await runEngine(['backup', '--repo', repo, '--source', image]);
    expect(second.code).toBe(3);
    expect(second.stderr).toContain(`is locked by pid ${first.pid} on host`);
    expect((await firstExit).code).toBe(0);
    await expectRestores(repo, parseJson<BackupJson>(stdout).id, image);
  });
});

describe('a full disk', () => {
  const mountPoint = join('/tmp', `engine-full-${process.pid}`);

  afterAll(async () => {
    await sh('umount', [mountPoint]).catch(() => undefined);
    await sh('rmdir', [mountPoint]).catch(() => undefined);
  });

  test('the backup fails, the repository stays consistent, the next backup succeeds', async () => {
    await mkdir(mountPoint, { recursive: true });
    await sh('mount', ['-t', 'tmpfs', '-o', 'size=48m', 'tmpfs', mountPoint]);
    const repo = join(mountPoint, 'repo');
    expect((await runEngine(['init', repo])).code).toBe(0);
    const small = join(dir, 'small.img');
    await sparseFile(small, 4 * MiB);
    await writeRegion(small, 0, 4 * MiB, 'random', 'small');
    const first = await runEngine(['backup', '--repo', repo, '--source', small, '--json']);
    expect(first.code).toBe(0);
    const firstId = parseJson<BackupJson>(first.stdout).id;
    const large = join(dir, 'large.img');
    await sparseFile(large, 96 * MiB);
    await writeRegion(large, 0, 96 * MiB, 'random', 'large');
    const full = await runEngine(['backup', '--repo', repo, '--source', large]);
    expect(full.code).toBe(1);
    expect(full.stderr).toMatch(/^engine: no space left on the device holding /);
    expect(await backupIds(repo)).toEqual([firstId]);
    expect(await readdir(join(repo, 'tmp'))).toEqual([]); // the unfinished pack was removed
    await expectVerifies(repo);
    await expectRestores(repo, firstId, small);
    await writeRegion(small, MiB, MiB, 'random', 'small-changed');
    const next = await runEngine(['backup', '--repo', repo, '--source', small, '--json']);
    expect(next.stderr).toBe('');
    expect(next.code).toBe(0);
    await expectRestores(repo, parseJson<BackupJson>(next.stdout).id, small);
  });
});

describe('fault campaign', () => {
  let repo: string;
  /** Every committed backup and a copy of what it must restore to. */
  const committed: { id: string; source: string; name: string }[] = [];
  const random = new SeededRandom('fault-campaign');

  async function backupOf(source: string, name: string): Promise<string> {
    const result = await runEngine(['backup', '--repo', repo, '--source', source, '--name', name, '--json']);
    expect(result.stderr).toBe('');
    expect(result.code).toBe(0);
    const id = parseJson<BackupJson>(result.stdout).id;
    committed.push({ id, source, name });
    return id;
  }

  async function randomImage(name: string, megabytes: number): Promise<string> {
    const path = join(dir, `campaign-${name}.img`);
    await sparseFile(path, megabytes * MiB);
    await writeRegion(path, 0, megabytes * MiB, 'random', name);
    return path;
  }

  /**
   * What every fault is followed by: verify (detected when it exits 4), repair when it did, the next
   * backup of every source (which heals what repair set aside), every committed backup restored and
   * compared, a clean verify.
   */
  async function afterFault(kind: 'crash' | 'damage', mustDetect = false): Promise<void> {
    campaign.injected += 1;
    campaign[kind === 'crash' ? 'crashes' : 'damage'] += 1;
    const first = await runEngine(['verify', '--repo', repo, '--read-data', '--json']);
    expect([0, 4]).toContain(first.code);
    const heal = new Set<string>();
    if (first.code === 4) {
      campaign.detected += 1;
      const repaired = await runEngine(['repair', '--repo', repo, '--json']);
      expect([0, 4]).toContain(repaired.code);
      campaign.repaired += 1;
      // The sources still hold their blocks: backing up again those of damaged backups stores good copies.
      for (const d of parseJson<{ damaged: { backup: string }[] }>(repaired.stdout).damaged) heal.add(d.backup);
    } else {
      expect(mustDetect).toBe(false);
      if (kind === 'damage') campaign.harmless += 1;
    }
    const again = new Map(committed.filter((c) => heal.has(c.id)).map((c) => [c.source, c.name]));
    again.set(committed[0]!.source, committed[0]!.name); // the next backup, whatever happened
    for (const [source, name] of again) await backupOf(source, name);
    let lost = 0;
    for (const { id, source } of committed) {
      const target = join(dir, `campaign-restore-${id}`);
      const result = await runEngine(['restore', '--repo', repo, id, '--to', target]);
      if (result.code !== 0 || !(await filesIdentical(source, target))) lost += 1;
      await sh('rm', ['-f', target]);
    }
    campaign.lost += lost;
    expect(lost).toBe(0);
    await expectVerifies(repo);
    // Keep the repository small: two backups of each name are enough to go on with.
    const pruned = await runEngine(['prune', '--repo', repo, '--keep-last', '2', '--json']);
    const removed = new Set(parseJson<{ backups: { id: string; keep: boolean }[] }>(pruned.stdout).backups.filter((b) => !b.keep).map((b) => b.id));
    committed.splice(0, committed.length, ...committed.filter((c) => !removed.has(c.id)));
  }

  /** Packs with no quarantined frame: damage there is new, so verify must see it. */
  async function undamagedPacks(): Promise<string[]> {
    const quarantined = new Set([...(await listQuarantine(repo)).values()].map((q) => q.pack));
    return (await packFiles()).filter((path) => !quarantined.has(path.split('/').pop()!));
  }

  async function packFiles(): Promise<string[]> {
    const files: string[] = [];
    for (const sub of await readdir(join(repo, 'packs'))) for (const name of await readdir(join(repo, 'packs', sub))) files.push(join(repo, 'packs', sub, name));
    return files.sort();
  }

  async function flipBit(path: string, at: number): Promise<void> {
    const handle = await open(path, 'r+');
    const byte = Buffer.alloc(1);
    await handle.read(byte, 0, 1, at);
    byte[0] = byte[0]! ^ (1 << random.below(8));
    await handle.write(byte, 0, 1, at);
    await handle.close();
  }

  /** Garbage for gc to work on: a pruned backup whose data pack is 40% live (rewritten) and whose map pack is dead. */
  async function gcWork(round: string): Promise<void> {
    const full = await randomImage(`gc-${round}`, 5);
    await backupOf(full, 'gc');
    const part = join(dir, `campaign-gc-${round}-part.img`);
    await copyFile(full, part);
    await truncate(part, 2 * MiB);
    await backupOf(part, 'gc');
    const pruned = await runEngine(['prune', '--repo', repo, '--keep-last', '1', '--json']);
    expect(pruned.code).toBe(0);
    const removed = parseJson<{ backups: { id: string; keep: boolean }[] }>(pruned.stdout).backups.filter((b) => !b.keep).map((b) => b.id);
    committed.splice(0, committed.length, ...committed.filter((c) => !removed.includes(c.id)));
  }

  beforeAll(async () => {
    repo = join(dir, 'repo-campaign');
    await runEngine(['init', repo]);
    await backupOf(await randomImage('a', 4), 'campaign-a');
    await backupOf(await randomImage('b', 3), 'campaign-b');
  });

  test.each(['gc-marked', 'gc-copied', 'gc-published', 'gc-indexed', 'gc-pack-deleted'])('kill -9 in gc at %s', async (point) => {
    await gcWork(point);
    const crashed = await runEngine(['gc', '--repo', repo], { env: { ENGINE_CRASH_AT: point } });
    expect(crashed.code).toBe(137);
    await afterFault('crash');
    const finished = await runEngine(['gc', '--repo', repo, '--json']);
    expect(finished.code).toBe(0);
    await expectVerifies(repo);
  });

  test('kill -9 in prune, between two record removals', async () => {
    await gcWork('prune-a');
    const keepers = committed.length;
    const extra = await randomImage('prune-extra', 2);
    for (let i = 0; i < 3; i += 1) await backupOf(extra, 'prune-extra');
    const crashed = await runEngine(['prune', '--repo', repo, '--keep-last', '1'], { env: { ENGINE_CRASH_AT: 'prune-record-removed' } });
    expect(crashed.code).toBe(137);
    // One record is gone, the rest intact; which one depends on the order, so drop whichever vanished.
    const present = new Set(await backupIds(repo));
    committed.splice(0, committed.length, ...committed.filter((c) => present.has(c.id)));
    expect(committed.length).toBe(keepers + 2);
    await afterFault('crash');
  });

  test.each(['repair-quarantined', 'repair-index-swapped'])('kill -9 in repair at %s, with a damaged chunk to set aside', async (point) => {
    // A data frame's payload in the largest pack (a chunk backups reference), a different frame each time.
    const packs = await undamagedPacks();
    const sizes = await Promise.all(packs.map(async (p) => (await stat(p)).size));
    const pack = packs[sizes.indexOf(Math.max(...sizes))]!;
    const frames = (await scanPack(repo, pack.split('/').pop()!)).frames;
    await flipBit(pack, frames[0]!.offset + 48 + random.below(1000));
    const crashed = await runEngine(['repair', '--repo', repo], { env: { ENGINE_CRASH_AT: point } });
    expect(crashed.code).toBe(137);
    campaign.injected += 1; // the flip; afterFault counts the kill
    campaign.damage += 1;
    await afterFault('crash', true);
  });

  test('kill -9 at random moments of gc and repair', async () => {
    for (let round = 0; round < 2; round += 1) {
      await gcWork(`random-${round}`);
      const command = round % 2 === 0 ? 'gc' : 'repair';
      const child = spawnEngine([command, '--repo', repo]);
      await new Promise((resolve) => setTimeout(resolve, 60 + random.below(500)));
      child.kill('SIGKILL');
      await exitOf(child);
      await afterFault('crash');
    }
  });

  test('flipped bits in packs: each detected, repaired, healed by the next backup', async () => {
    for (let round = 0; round < 4; round += 1) {
      const packs = await undamagedPacks();
      const pack = packs[random.below(packs.length)]!;
      await flipBit(pack, random.below((await stat(pack)).size));
      await afterFault('damage', true);
    }
  });

  test('truncated packs: detected, repaired, healed', async () => {
    for (let round = 0; round < 2; round += 1) {
      const packs = await undamagedPacks();
      const pack = packs[random.below(packs.length)]!;
      await truncate(pack, random.below((await stat(pack)).size));
      await afterFault('damage', true);
    }
  });

  test('flipped bits and truncations in the index files (.ldb, .log, MANIFEST, CURRENT)', async () => {
    for (const pattern of [/\.ldb$/, /\.log$/, /^MANIFEST-/, /^CURRENT$/]) {
      const names = (await readdir(join(repo, 'index'))).filter((n) => pattern.test(n));
      if (names.length === 0) {
        // Make sure the file kind exists: every exclusive open turns the log into a table.
        await runEngine(['verify', '--repo', repo]);
        continue;
      }
      const file = join(repo, 'index', names[random.below(names.length)]!);
      const size = (await stat(file)).size;
      if (size === 0) continue;
      if (random.below(2) === 0) await flipBit(file, random.below(size));
      else await truncate(file, random.below(size));
      await afterFault('damage');
    }
  });
});
