/**
 * Crashes and contention: kill -9 at every step of the commit order and at random moments, two writers
 * at once, a full disk. After each: verify passes, earlier backups restore byte for byte, the next
 * backup succeeds.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { access, mkdir, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { exitOf, filesIdentical, parseJson, runEngine, sh, spawnEngine, sparseFile, tempDir, writeRegion, type BackupJson } from './helpers.js';
import { generateImage } from '../dist/engine/index.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-crash-'));
});
afterAll(async () => {
  await cleanup();
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
