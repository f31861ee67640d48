/**
 * The fault campaign's shared pieces (test/crash-*.test.ts): a repository under the campaign (CampaignRepo),
 * the checks that follow a fault, and the counts every fault adds to.
 *
 * The campaign runs in several files so that they run in parallel; each file adds its counts to a directory
 * the global set-up provides (test/global-setup.ts), which sums them and prints the campaign's one line
 * when the run ends.
 */
import { expect, inject } from 'vitest';
import { copyFile, open, readdir, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { ChildProcess } from 'node:child_process';
import { parseJson, runEngine, sparseFile, spawnEngine, withoutProgress, writeRegion, type BackupJson, type RunResult } from './helpers.js';
import { listBackups, listQuarantine, prune, SeededRandom } from '../dist/engine/index.js';
import { inEnvironment, restoresIdentical, verifiesClean } from './library-calls.js';
import { noFaults } from './fault-campaign-counts.js';

const MiB = 1024 * 1024;

/** This file's counts (each test file runs in its own process). */
export const campaign = noFaults();

/** Adds this file's counts to the run's (call it in the file's afterAll); the global set-up prints the sum. */
export async function recordCampaign(file: string): Promise<void> {
  await writeFile(join(inject('campaignCountsDir'), `${file}.json`), JSON.stringify(campaign));
}

export interface Garbage {
  tempFiles: string[];
  unindexedPacks: string[];
  unreferencedBlobs: number;
}

export interface GcJson {
  packs: { deleted: string[]; rewritten: string[]; created: string[] };
  chunks: { removed: number; moved: number };
  backupsCommittedDuringGc: string[];
}

/** The ids of the repository's backups (list; a library call, test/library-calls.ts). */
export async function backupIds(repo: string): Promise<string[]> {
  return (await inEnvironment({}, () => listBackups(repo))).backups.map((b) => b.id);
}

/** verify --read-data: no problem; its garbage. */
export async function expectVerifies(repo: string): Promise<Garbage> {
  return (await verifiesClean(repo)).garbage;
}

/**
 * A repository under the campaign: every committed backup with the source it must restore to, and what
 * follows each fault. `scratch` holds its images and restores; `auth` opens an encrypted repository
 * (--password-file).
 */
export class CampaignRepo {
  /** Every committed backup and the file it must restore to. */
  readonly committed: { id: string; source: string; name: string }[] = [];

  constructor(
    readonly repo: string,
    readonly scratch: string,
    readonly random: SeededRandom,
    private readonly auth: string[] = [],
    /** The environment of every command (version 3: ENGINE_CACHE_DIR, and on S3 the AWS variables). */
    readonly env: Record<string, string> = {},
    /** A version-3 repository: its faults count as such. */
    readonly v3 = false,
  ) {}

  get encrypted(): boolean {
    return this.auth.length > 0;
  }

  /** The passphrase for library calls: the bytes of --password-file less one trailing newline, as the CLI reads them. */
  private async passphrase(): Promise<Buffer | undefined> {
    if (!this.encrypted) return undefined;
    const bytes = await readFile(this.auth[this.auth.indexOf('--password-file') + 1]!);
    return bytes.subarray(0, bytes.length - (bytes.at(-1) === 0x0a ? (bytes.at(-2) === 0x0d ? 2 : 1) : 0));
  }

  /** A library call (test/library-calls.ts) in the repository's environment, with its passphrase. */
  private async call<T>(what: (passphrase: Buffer | undefined) => Promise<T>): Promise<T> {
    const passphrase = await this.passphrase();
    return inEnvironment(this.env, () => what(passphrase));
  }

  /** prune --keep-last N. */
  async prunes(keepLast: number): Promise<void> {
    await this.call((passphrase) => prune({ repo: this.repo, passphrase, policy: { last: keepLast } }));
  }

  run(args: string[], options: { env?: Record<string, string> } = {}): Promise<RunResult> {
    return runEngine([...args, '--repo', this.repo, ...this.auth], { ...options, env: { ...this.env, ...options.env } });
  }

  spawn(args: string[], env: Record<string, string> = {}): ChildProcess {
    return spawnEngine([...args, '--repo', this.repo, ...this.auth], { ...this.env, ...env });
  }

  async backupOf(source: string, name: string): Promise<string> {
    const result = await this.run(['backup', '--source', source, '--name', name, '--json']);
    expect(withoutProgress(result.stderr)).toBe('');
    expect(result.code, result.stdout).toBe(0);
    const id = parseJson<BackupJson>(result.stdout).id;
    this.committed.push({ id, source, name });
    return id;
  }

  async randomImage(name: string, megabytes: number): Promise<string> {
    const path = join(this.scratch, `campaign-${name}.img`);
    await sparseFile(path, megabytes * MiB);
    await writeRegion(path, 0, megabytes * MiB, 'random', name);
    return path;
  }

  async ids(): Promise<string[]> {
    return (await this.call((passphrase) => listBackups(this.repo, { passphrase }))).backups.map((b) => b.id);
  }

  /** Forgets the committed backups that are no longer in the repository (pruned). */
  async forgetRemoved(): Promise<void> {
    const present = new Set(await this.ids());
    this.committed.splice(0, this.committed.length, ...this.committed.filter((c) => present.has(c.id)));
  }

  async verifies(): Promise<Garbage> {
    return (await verifiesClean(this.repo, this.env, await this.passphrase())).garbage;
  }

  /** Restores every committed backup and compares it with its source; counts and returns the losses. */
  async restoresAll(): Promise<number> {
    let lost = 0;
    for (const { id, source } of this.committed) {
      const target = join(this.scratch, `campaign-restore-${id}`);
      if (!(await restoresIdentical(this.repo, id, source, target, this.env, await this.passphrase()))) lost += 1;
      await rm(target, { force: true });
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
    // A process: its exit code says what verify found (4: a problem, whether a report's or an error's such as a
    // damaged index's), the detection the campaign counts.
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
    await this.prunes(2);
    await this.forgetRemoved();
  }

  count(kind: 'crashes' | 'damage' | 'fullDisk' | 'concurrent'): void {
    campaign.injected += 1;
    campaign[kind] += 1;
    if (this.encrypted) campaign.encrypted += 1;
    if (this.v3) campaign.v3 += 1;
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
    const part = join(this.scratch, `campaign-gc-${round}-part.img`);
    await copyFile(full, part);
    await truncate(part, 2 * MiB);
    await this.backupOf(part, 'gc');
    await this.prunes(1);
    await this.forgetRemoved();
  }
}
