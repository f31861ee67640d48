/**
 * Crashes and contention: kill -9 at every step of the commit order and at random moments, two writers
 * at once, a full disk; then the fault campaign: kill -9 at every crash point of prune, gc and repair and
 * at random moments of gc and repair, flipped bits and truncations in packs and in the LevelDB files (and
 * in an encrypted repository: a ciphertext byte changed with its checksum recomputed, flipped bits, a
 * cut); a full disk in the middle of gc, prune and repair; prune, gc, repair and serve racing each other.
 * After each: verify passes, or says what is wrong and repair mends it; every committed backup restores
 * byte for byte; the next backup succeeds. The campaign counts faults injected, detected and backups
 * lost, and prints the counts in one line.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { access, copyFile, mkdir, open, readdir, readFile, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { ChildProcess } from 'node:child_process';
import { exitOf, filesIdentical, parseJson, resumedJson, runEngine, sh, spawnEngine, sparseFile, stoppedItself, tempDir, Tmpfs, writeRegion, type BackupJson, type RunResult, expectRestoreIdentical, withoutProgress } from './helpers.js';
import { generateImage, KIND_DATA, listQuarantine, scanPack, SeededRandom } from '../dist/engine/index.js';
import { checksum64, initChecksum } from '../dist/repo-format/checksum.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;

/**
 * The campaign's counts: every fault below adds to `injected` and to one kind (kill -9, damage, a full
 * disk, a second process at work); `encrypted` counts those in an encrypted repository; `noSpace` the full
 * disks an operation failed on with ENGINE_NO_SPACE; `lost` committed backups that no longer restore.
 */
const campaign = { injected: 0, crashes: 0, damage: 0, fullDisk: 0, concurrent: 0, encrypted: 0, detected: 0, repaired: 0, harmless: 0, noSpace: 0, lost: 0 };

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-crash-'));
});
afterAll(async () => {
  await cleanup();
  console.log(
    `fault campaign: ${campaign.injected} faults injected (${campaign.crashes} kill -9, ${campaign.damage} damage, ${campaign.fullDisk} full disk, ` +
      `${campaign.concurrent} two processes at once; ${campaign.encrypted} in an encrypted repository), ` +
      `${campaign.detected} detected by verify, ${campaign.repaired} repaired, ${campaign.harmless} damage faults harmless (verify found nothing and everything restored), ` +
      `${campaign.noSpace} full disks reported as ENGINE_NO_SPACE, ${campaign.lost} backups lost`,
  );
});

async function backupIds(repo: string): Promise<string[]> {
  const result = await runEngine(['list', '--repo', repo, '--json']);
  expect(result.code).toBe(0);
  return parseJson<{ backups: { id: string }[] }>(result.stdout).backups.map((b) => b.id);
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
      await expectRestoreIdentical(repo, after.find((id) => !before.includes(id))!, big, { dir });
    } else {
      expect(after).toEqual(before);
    }
    await expectRestoreIdentical(repo, earlierId, earlier, { dir });
    const next = await runEngine(['backup', '--repo', repo, '--source', big, '--json']);
    expect(next.code).toBe(0);
    await expectRestoreIdentical(repo, parseJson<BackupJson>(next.stdout).id, big, { dir });
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
      for (const id of after.filter((x) => !before.includes(x))) await expectRestoreIdentical(repo, id, image, { dir });
    }
    await expectRestoreIdentical(repo, earlierId, earlier, { dir });
    const next = await runEngine(['backup', '--repo', repo, '--source', image, '--json']);
    expect(next.code).toBe(0);
    await expectRestoreIdentical(repo, parseJson<BackupJson>(next.stdout).id, image, { dir });
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
    campaign.injected += 1;
    campaign.concurrent += 1;
    expect(second.code).toBe(3);
    expect(second.stderr).toContain(`is locked by pid ${first.pid} on host`);
    expect((await firstExit).code).toBe(0);
    await expectRestoreIdentical(repo, parseJson<BackupJson>(stdout).id, image, { dir });
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
    campaign.injected += 1;
    campaign.fullDisk += 1;
    expect(full.code).toBe(1);
    expect(full.stderr).toMatch(/^engine: no space left on the device holding /);
    campaign.noSpace += 1;
    expect(await backupIds(repo)).toEqual([firstId]);
    expect(await readdir(join(repo, 'tmp'))).toEqual([]); // the unfinished pack was removed
    await expectVerifies(repo);
    await expectRestoreIdentical(repo, firstId, small, { dir });
    await writeRegion(small, MiB, MiB, 'random', 'small-changed');
    const next = await runEngine(['backup', '--repo', repo, '--source', small, '--json']);
    expect(withoutProgress(next.stderr)).toBe('');
    expect(next.code).toBe(0);
    await expectRestoreIdentical(repo, parseJson<BackupJson>(next.stdout).id, small, { dir });
  });
});

/**
 * A repository under the campaign: every committed backup with the source it must restore to, and what
 * follows each fault. `auth` opens an encrypted repository (--password-file).
 */
class CampaignRepo {
  /** Every committed backup and the file it must restore to. */
  readonly committed: { id: string; source: string; name: string }[] = [];

  constructor(
    readonly repo: string,
    readonly random: SeededRandom,
    private readonly auth: string[] = [],
  ) {}

  get encrypted(): boolean {
    return this.auth.length > 0;
  }

  run(args: string[], options: { env?: Record<string, string> } = {}): Promise<RunResult> {
    return runEngine([...args, '--repo', this.repo, ...this.auth], options);
  }

  spawn(args: string[], env: Record<string, string> = {}): ChildProcess {
    return spawnEngine([...args, '--repo', this.repo, ...this.auth], env);
  }

  async backupOf(source: string, name: string): Promise<string> {
    const result = await this.run(['backup', '--source', source, '--name', name, '--json']);
    expect(withoutProgress(result.stderr)).toBe('');
    expect(result.code).toBe(0);
    const id = parseJson<BackupJson>(result.stdout).id;
    this.committed.push({ id, source, name });
    return id;
  }

  async randomImage(name: string, megabytes: number): Promise<string> {
    const path = join(dir, `campaign-${name}.img`);
    await sparseFile(path, megabytes * MiB);
    await writeRegion(path, 0, megabytes * MiB, 'random', name);
    return path;
  }

  async ids(): Promise<string[]> {
    const result = await this.run(['list', '--json']);
    expect(result.code).toBe(0);
    return parseJson<{ backups: { id: string }[] }>(result.stdout).backups.map((b) => b.id);
  }

  /** Forgets the committed backups that are no longer in the repository (pruned). */
  async forgetRemoved(): Promise<void> {
    const present = new Set(await this.ids());
    this.committed.splice(0, this.committed.length, ...this.committed.filter((c) => present.has(c.id)));
  }

  async verifies(): Promise<Garbage> {
    const result = await this.run(['verify', '--read-data', '--json']);
    const report = parseJson<{ ok: boolean; problems: unknown[]; garbage: Garbage }>(result.stdout);
    expect(report.problems).toEqual([]);
    expect(result.code).toBe(0);
    return report.garbage;
  }

  /** Restores every committed backup and compares it with its source; counts and returns the losses. */
  async restoresAll(): Promise<number> {
    let lost = 0;
    for (const { id, source } of this.committed) {
      const target = join(dir, `campaign-restore-${id}`);
      const result = await this.run(['restore', id, '--to', target]);
      if (result.code !== 0 || !(await filesIdentical(source, target))) lost += 1;
      await sh('rm', ['-f', target]);
    }
    campaign.lost += lost;
    expect(lost).toBe(0);
    return lost;
  }

  /**
   * What every fault is followed by: verify (detected when it exits 4), repair when it did, the next
   * backup of every source (which heals what repair set aside), every committed backup restored and
   * compared, a clean verify.
   */
  async afterFault(kind: 'crash' | 'damage', mustDetect = false): Promise<void> {
    this.count(kind === 'crash' ? 'crashes' : 'damage');
    const first = await this.run(['verify', '--read-data', '--json']);
    expect([0, 4]).toContain(first.code);
    const heal = new Set<string>();
    if (first.code === 4) {
      campaign.detected += 1;
      const repaired = await this.run(['repair', '--json']);
      expect([0, 4]).toContain(repaired.code);
      campaign.repaired += 1;
      // The sources still hold their blocks: backing up again those of damaged backups stores good copies.
      for (const d of parseJson<{ damaged: { backup: string }[] }>(repaired.stdout).damaged) heal.add(d.backup);
    } else {
      expect(mustDetect).toBe(false);
      if (kind === 'damage') campaign.harmless += 1;
    }
    const again = new Map(this.committed.filter((c) => heal.has(c.id)).map((c) => [c.source, c.name]));
    again.set(this.committed[0]!.source, this.committed[0]!.name); // the next backup, whatever happened
    for (const [source, name] of again) await this.backupOf(source, name);
    await this.restoresAll();
    await this.verifies();
    // Keep the repository small: two backups of each name are enough to go on with.
    expect((await this.run(['prune', '--keep-last', '2'])).code).toBe(0);
    await this.forgetRemoved();
  }

  count(kind: 'crashes' | 'damage' | 'fullDisk' | 'concurrent'): void {
    campaign.injected += 1;
    campaign[kind] += 1;
    if (this.encrypted) campaign.encrypted += 1;
  }

  /** Packs with no quarantined frame: damage there is new, so verify must see it. */
  async undamagedPacks(): Promise<string[]> {
    const quarantined = new Set([...(await listQuarantine(this.repo)).values()].map((q) => q.pack));
    return (await this.packFiles()).filter((path) => !quarantined.has(path.split('/').pop()!));
  }

  async packFiles(): Promise<string[]> {
    const files: string[] = [];
    for (const sub of await readdir(join(this.repo, 'packs'))) for (const name of await readdir(join(this.repo, 'packs', sub))) files.push(join(this.repo, 'packs', sub, name));
    return files.sort();
  }

  async flipBit(path: string, at: number): Promise<void> {
    const handle = await open(path, 'r+');
    const byte = Buffer.alloc(1);
    await handle.read(byte, 0, 1, at);
    byte[0] = byte[0]! ^ (1 << this.random.below(8));
    await handle.write(byte, 0, 1, at);
    await handle.close();
  }

  /** Garbage for gc to work on: a pruned backup whose data pack is 40% live (rewritten) and whose map pack is dead. */
  async gcWork(round: string): Promise<void> {
    const full = await this.randomImage(`gc-${round}`, 5);
    await this.backupOf(full, 'gc');
    const part = join(dir, `campaign-gc-${round}-part.img`);
    await copyFile(full, part);
    await truncate(part, 2 * MiB);
    await this.backupOf(part, 'gc');
    expect((await this.run(['prune', '--keep-last', '1'])).code).toBe(0);
    await this.forgetRemoved();
  }
}

describe('fault campaign', () => {
  let c: CampaignRepo;

  beforeAll(async () => {
    c = new CampaignRepo(join(dir, 'repo-campaign'), new SeededRandom('fault-campaign'));
    await runEngine(['init', c.repo]);
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

describe('fault campaign, encrypted repository', () => {
  let c: CampaignRepo;

  beforeAll(async () => {
    await initChecksum();
    const passwordFile = join(dir, 'campaign-password');
    await writeFile(passwordFile, 'campaign passphrase\n');
    c = new CampaignRepo(join(dir, 'repo-campaign-encrypted'), new SeededRandom('fault-campaign-encrypted'), ['--password-file', passwordFile]);
    expect((await runEngine(['init', c.repo, '--encrypt', '--password-file', passwordFile])).code).toBe(0);
    await c.backupOf(await c.randomImage('enc-a', 4), 'enc-a');
    await c.backupOf(await c.randomImage('enc-b', 3), 'enc-b');
  });

  test('a ciphertext byte changed and the checksum recomputed: only the GCM tag tells; verify names it, repair sets it aside, the next backup heals it', async () => {
    const packs = await c.undamagedPacks();
    let target: { path: string; pack: string; offset: number; length: number } | undefined;
    for (const path of packs) {
      const pack = path.split('/').pop()!;
      const frame = (await scanPack(c.repo, pack, true)).frames.find((f) => f.header.kind === KIND_DATA);
      if (frame) target = { path, pack, offset: frame.offset, length: frame.length };
    }
    expect(target).toBeDefined();
    const { path, pack, offset, length } = target!;
    const bytes = await readFile(path);
    const frame = bytes.subarray(offset, offset + length);
    frame[48 + 12 + c.random.below(length - 48 - 12 - 16 - 8)]! ^= 0x20; // inside the ciphertext: after the nonce, before tag and checksum
    frame.writeBigUInt64LE(checksum64(frame.subarray(0, length - 8)), length - 8);
    await writeFile(path, bytes);
    c.count('damage');

    const verified = await c.run(['verify', '--read-data', '--json']);
    expect(verified.code).toBe(4);
    const problems = parseJson<{ problems: { code: string; message: string; pack?: string; packOffset?: number; backup?: string }[] }>(verified.stdout).problems;
    expect(problems.filter((p) => p.code === 'FRAME_DAMAGED')).toEqual([expect.objectContaining({ pack, packOffset: offset, message: expect.stringContaining('authentication failed (AES-256-GCM tag)') })]);
    const hurt = problems.filter((p) => p.code === 'CHUNK_DAMAGED').map((p) => p.backup!);
    expect(hurt.length).toBeGreaterThan(0);
    campaign.detected += 1;

    const repaired = await c.run(['repair', '--json']);
    expect(repaired.code).toBe(4);
    const report = parseJson<{ quarantined: { pack: string; offset: number; why: string }[]; damaged: { backup: string }[] }>(repaired.stdout);
    expect(report.quarantined).toEqual([expect.objectContaining({ pack, offset, why: expect.stringContaining('authentication failed (AES-256-GCM tag)') })]);
    expect([...new Set(report.damaged.map((d) => d.backup))].sort()).toEqual([...new Set(hurt)].sort());
    campaign.repaired += 1;
    // The next backup of the damaged backup's source stores a good copy; the damaged backup restores again.
    for (const id of new Set(hurt)) {
      const damaged = c.committed.find((b) => b.id === id)!;
      await c.backupOf(damaged.source, damaged.name);
    }
    await c.restoresAll();
    await c.verifies();
  });

  test('flipped bits and a cut in packs of an encrypted repository: detected, repaired, healed', async () => {
    for (let round = 0; round < 3; round += 1) {
      const packs = await c.undamagedPacks();
      const pack = packs[c.random.below(packs.length)]!;
      if (round < 2) await c.flipBit(pack, c.random.below((await stat(pack)).size));
      else await truncate(pack, c.random.below((await stat(pack)).size));
      await c.afterFault('damage', true);
    }
  });
});

interface GcJson {
  packs: { deleted: string[]; rewritten: string[]; created: string[] };
  chunks: { removed: number; moved: number };
  backupsCommittedDuringGc: string[];
}

describe('a full disk during gc, prune and repair', () => {
  let fs: Tmpfs;
  let c: CampaignRepo;

  beforeAll(async () => {
    fs = await Tmpfs.mount(join('/tmp', `engine-full-maintenance-${process.pid}`), 64);
    c = new CampaignRepo(join(fs.path, 'repo'), new SeededRandom('full-disk'));
    expect((await runEngine(['init', c.repo])).code).toBe(0);
  });
  afterAll(async () => {
    await fs?.unmount();
  });

  /** An operation that met a full disk failed with ENGINE_NO_SPACE (exit 1) and said so in its JSON. */
  function expectNoSpace(code: number | null, stdout: string): void {
    expect(code).toBe(1);
    expect(parseJson<{ error: { code: string } }>(stdout).error.code).toBe('ENGINE_NO_SPACE');
    campaign.noSpace += 1;
  }

  /** After the space is freed: no lock, no temp file, no registration left; verify clean; everything restores. */
  async function afterFullDisk(): Promise<void> {
    await fs.unfill();
    expect(await access(join(c.repo, 'lock')).then(() => true, () => false)).toBe(false);
    expect(await readdir(join(c.repo, 'tmp'))).toEqual([]);
    expect(await readdir(join(c.repo, 'writers')).catch(() => [])).toEqual([]);
    const garbage = await c.verifies();
    expect(garbage.tempFiles).toEqual([]);
    await c.restoresAll();
  }

  /** Two backups of 12 MiB sharing 4, the older pruned: its data pack is a third live (rewritten), its map pack dead. */
  async function garbage(round: string): Promise<void> {
    const image = join(dir, `full-${round}.img`);
    await sparseFile(image, 12 * MiB);
    await writeRegion(image, 0, 4 * MiB, 'random', 'full-shared');
    await writeRegion(image, 4 * MiB, 8 * MiB, 'random', `full-${round}`);
    await c.backupOf(image, 'vm');
    expect((await c.run(['prune', '--keep-last', '1'])).code).toBe(0);
    await c.forgetRemoved();
  }

  test('gc: the disk fills while it copies (it deletes the dead, rewrites nothing), then when it comes back for the lock (the reserve takes it); nothing is lost', async () => {
    await garbage('g1');
    await garbage('g2');
    const packs = (await c.packFiles()).length;

    // Full in phase 2: the copy of the live chunks (4 MiB) meets 2.5 MiB of free space. The pack to
    // rewrite stays (kept, saying why); the dead map pack still goes.
    let child = c.spawn(['gc', '--json'], { ENGINE_STOP_AT: 'gc-marked' });
    await stoppedItself(child);
    await fs.fill(2.5 * MiB);
    let resumed = await resumedJson<GcJson & { packs: { kept: { pack: string; why: string }[] } }>(child);
    c.count('fullDisk');
    expect(resumed.code).toBe(0);
    expect(resumed.json.packs.rewritten).toEqual([]);
    expect(resumed.json.packs.kept.map((k) => k.why)).toEqual([expect.stringMatching(/^not rewritten: no space left for its \d+ live bytes; the next gc rewrites it with the room this one frees$/)]);
    expect(resumed.json.packs.deleted.length).toBe(1);
    expect((await c.packFiles()).length).toBe(packs - 1);
    await afterFullDisk();

    // Full when phase 3 needs the lock again: it takes it in the space reserve and commits the rewrite.
    child = c.spawn(['gc', '--json'], { ENGINE_STOP_AT: 'gc-copied' });
    await stoppedItself(child);
    expect((await readdir(join(c.repo, 'tmp'))).length).toBe(1);
    await fs.fill(0);
    resumed = await resumedJson(child);
    c.count('fullDisk');
    expect(resumed.code).toBe(0);
    expect(resumed.json.packs.rewritten.length).toBe(1);
    expect(resumed.json.packs.deleted.length).toBe(1);
    expect(resumed.json.chunks.moved).toBe(4);
    expect((await stat(join(c.repo, 'reserve'))).size).toBeGreaterThan(0);
    await afterFullDisk();

    const finished = await c.run(['gc', '--json']);
    expect(finished.code).toBe(0);
    const report = parseJson<GcJson>(finished.stdout);
    expect(report.packs.rewritten).toEqual([]);
    expect(report.packs.deleted).toEqual([]);
    expect((await c.verifies()).unreferencedBlobs).toBe(0);
    await c.restoresAll();
  });

  test('prune: on a full disk it removes through the space reserve; without one it refuses before removing anything; a disk that fills mid-way does not stop it', async () => {
    const image = join(dir, 'full-prune.img');
    await sparseFile(image, MiB);
    const three = async (round: string): Promise<void> => {
      for (let i = 0; i < 3; i += 1) {
        await writeRegion(image, 0, MiB, 'random', `full-prune-${round}-${i}`);
        const copy = join(dir, `full-prune-${round}-${i}.img`);
        await copyFile(image, copy);
        await c.backupOf(copy, `prune-${round}`);
      }
    };
    // With the reserve: a disk full to the last byte does not stop it.
    await three('reserve');
    await fs.fill(0);
    const pruned = await c.run(['prune', '--keep-last', '1', '--json']);
    c.count('fullDisk');
    expect(pruned.code).toBe(0);
    expect(parseJson<{ removed: number }>(pruned.stdout).removed).toBe(2);
    await c.forgetRemoved();
    await afterFullDisk();

    // Without a reserve (used up, or an older repository): no room for the lock, then room for the lock
    // but not for the index's new MANIFEST; it refuses before removing anything, naming what to do.
    await three('none');
    const before = await c.ids();
    for (const leave of [0, 4096]) {
      await rm(join(c.repo, 'reserve'), { force: true });
      await fs.fill(leave);
      const refused = await c.run(['prune', '--keep-last', '1', '--json']);
      c.count('fullDisk');
      expectNoSpace(refused.code, refused.stdout);
      const message = parseJson<{ error: { message: string } }>(refused.stdout).error.message;
      expect(message).toContain(leave === 0 ? `${c.repo}` : `${c.repo}/index`);
      if (leave === 0) expect(message).toContain('no space is set aside to take the lock with');
      expect(await c.ids()).toEqual(before);
      await afterFullDisk();
    }

    // Filled right after the first of two removals: the second removal still goes through.
    const child = c.spawn(['prune', '--keep-last', '1', '--json'], { ENGINE_STOP_AT: 'prune-record-removed' });
    await stoppedItself(child);
    await fs.fill(0);
    child.kill('SIGCONT');
    // Stops again after the second removal.
    await stoppedItself(child);
    const { code, json } = await resumedJson<{ removed: number }>(child);
    c.count('fullDisk');
    expect(code).toBe(0);
    expect(json.removed).toBe(2);
    await c.forgetRemoved();
    expect((await c.ids()).length).toBe(before.length - 2);
    await afterFullDisk();
  });

  test('repair: at every amount of free space it either finishes or fails with ENGINE_NO_SPACE, leaving the damage where verify finds it', async () => {
    const packs = await c.undamagedPacks();
    let damaged: string | undefined;
    for (const path of packs) {
      const frame = (await scanPack(c.repo, path.split('/').pop()!)).frames.find((f) => f.header.kind === KIND_DATA);
      if (!frame || damaged) continue;
      await c.flipBit(path, frame.offset + 48 + 700);
      damaged = path.split('/').pop()!;
    }
    expect(damaged).toBeDefined();
    c.count('damage');
    const failedAt = new Set<string>();
    let repaired: RunResult | undefined;
    for (const leave of [0, 4096, 16384, 24576, 32768, 65536, 262144]) {
      // Without the space reserve (12.6), which would let it finish at once: where does it fail?
      await rm(join(c.repo, 'reserve'), { force: true });
      await fs.fill(leave);
      const result = await c.run(['repair', '--json']);
      c.count('fullDisk');
      // Finished: exit 4 while a backup references the damaged chunk, 0 when none does (the flipped frame
      // may belong to a blob only garbage refers to; which pack holds what depends on random pack ids).
      if (result.code === 4 || result.code === 0) {
        const damagedRefs = parseJson<{ damaged: unknown[] }>(result.stdout).damaged.length;
        expect(result.code === 4).toBe(damagedRefs > 0);
        repaired = result;
        break;
      }
      expectNoSpace(result.code, result.stdout);
      const path = parseJson<{ error: { details: { path: string } } }>(result.stdout).error.details.path;
      failedAt.add(path.slice(c.repo.length + 1).replace(/\.[0-9a-f]+$/, ''));
      await fs.unfill();
      expect(await readdir(join(c.repo, 'tmp'))).toEqual([]);
      // Nothing was set aside or replaced: verify still names the damage exactly.
      const verified = await c.run(['verify', '--read-data', '--json']);
      expect(verified.code).toBe(4);
      const problems = parseJson<{ problems: { code: string; pack?: string }[] }>(verified.stdout).problems;
      expect(problems.filter((p) => p.code === 'FRAME_DAMAGED').map((p) => p.pack)).toEqual([damaged]);
    }
    campaign.detected += 1;
    // Before it had the room to finish it failed at several points: its lock, the new index it builds, the
    // old index it reads (opening LevelDB writes); nowhere else.
    expect(failedAt.has('lock')).toBe(true);
    expect(failedAt.has('tmp/index-repair')).toBe(true);
    for (const place of failedAt) expect(['lock', 'tmp/index-repair', 'index']).toContain(place);
    expect(repaired).toBeDefined();
    campaign.repaired += 1;
    expect(parseJson<{ quarantined: { pack: string }[] }>(repaired!.stdout).quarantined.map((q) => q.pack)).toEqual([damaged]);
    await fs.unfill();
    for (const d of new Set(parseJson<{ damaged: { backup: string }[] }>(repaired!.stdout).damaged.map((x) => x.backup))) {
      const hurt = c.committed.find((b) => b.id === d)!;
      await c.backupOf(hurt.source, hurt.name);
    }
    await afterFullDisk();
    // And the next backup succeeds.
    await c.backupOf(c.committed[0]!.source, c.committed[0]!.name);
  });
});

describe('two processes at once: prune, gc, repair and serve', () => {
  let c: CampaignRepo;

  beforeAll(async () => {
    c = new CampaignRepo(join(dir, 'repo-concurrent'), new SeededRandom('concurrent'));
    expect((await runEngine(['init', c.repo])).code).toBe(0);
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
    for (let i = 0; i < 400 && !served; i += 1) {
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
