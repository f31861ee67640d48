/**
 * Verification records (boot tests, SPEC.md 9.2) whose backup is gone: a forget or prune killed between the
 * backup's record and its second sweep leaves them. verify warns (VERIFICATION_ORPHANED), gc names them in a
 * dry run and removes them, with the emptied `verifications/<id>/` folder, and nothing else; a prune that
 * finishes leaves no folder behind on versions 1 and 2. The records are committed through the library as a
 * boot test commits them (the VM is not what is tested here).
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { Repository } from '../dist/repo-format/repository.js';
import type { BootVerification } from '../dist/repo-format/verification-record.js';
import { continueUntilExit, expectRestoreIdentical, parseJson, runEngine, spawnEngine, sparseFile, stoppedItself, tempDir, writeRegion, type BackupJson } from './helpers.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-verification-gc-'));
});
afterAll(async () => cleanup());

function bootRecord(backup: string, started: Date): BootVerification {
  return {
    version: 1,
    kind: 'boot',
    backup,
    started: started.toISOString(),
    ended: new Date(started.getTime() + 4000).toISOString(),
    result: 'passed',
    reason: null,
    proofOfLifeMs: 3980,
    checks: { expect: 'agent', agentPing: true, filesystems: [{ mountpoint: '/', type: 'ext4', device: 'vda' }], console: null },
    accelerator: 'tcg',
    machine: 'q35',
    firmware: 'bios',
    memoryBytes: 256 * MiB,
    qemuVersion: '7.2.0',
    engineVersion: '0.1.0',
    hostname: 'test',
    consoleLogPath: null,
    attachments: [],
  };
}

/** Commits a boot test's record as `verify --boot` does: under the lock (1, 2) or a shared lease (3). */
async function commitBootRecord(repo: string, backup: string, started: Date): Promise<string> {
  const opened = await Repository.open(repo, { access: 'exclusive', command: 'verify', manyWriters: true });
  try {
    return await opened.commitVerification(bootRecord(backup, started));
  } finally {
    await opened.close();
  }
}

async function folderNames(path: string): Promise<string[]> {
  return (await readdir(path).catch(() => [] as string[])).sort();
}

interface GcJson {
  markers: { quarantine: string[]; protected: string[]; verifications: string[] };
  packs: { deleted: string[] };
}

async function backUpTwo(repo: string, tag: string): Promise<{ ids: [string, string]; images: [string, string] }> {
  const ids: string[] = [];
  const images: string[] = [];
  for (const name of ['gone', 'stays']) {
    const image = join(dir, `${tag}-${name}.img`);
    await sparseFile(image, 2 * MiB);
    await writeRegion(image, 0, 2 * MiB, 'random', `${tag}-${name}`);
    const made = await runEngine(['backup', '--repo', repo, '--source', image, '--name', name, '--json']);
    expect(made.code, made.stderr).toBe(0);
    ids.push(parseJson<BackupJson>(made.stdout).id);
    images.push(image);
  }
  return { ids: ids as [string, string], images: images as [string, string] };
}

describe('format 3 on a folder', () => {
  test('a boot test committing beside a forget killed after the record: verify warns, gc --dry-run names, gc removes the orphan and its folder, nothing else', async () => {
    const repo = join(dir, 'repo-3');
    expect((await runEngine(['init', '--format', '3', repo])).code).toBe(0);
    const { ids: [gone, stays], images } = await backUpTwo(repo, 'v3');
    await commitBootRecord(repo, gone, new Date('2026-12-07T09:00:00Z'));
    const staysKey = await commitBootRecord(repo, stays, new Date('2026-12-07T09:30:00Z'));

    // forget takes the gone backup's records, stops before its record; a boot test commits meanwhile (a shared
    // lease, the backup still there); then forget deletes the record and is killed before its second sweep.
    const forget = spawnEngine(['forget', '--repo', repo, gone], { ENGINE_STOP_AT: 'backup-verifications-swept', ENGINE_CRASH_AT: 'backup-record-deleted' });
    await stoppedItself(forget);
    expect(await folderNames(join(repo, 'verifications', gone))).toEqual([]);
    const orphan = await commitBootRecord(repo, gone, new Date('2026-12-07T10:00:00Z'));
    expect(await continueUntilExit(forget)).toBe(-1); // killed by its own SIGKILL: no exit code
    expect(forget.signalCode).toBe('SIGKILL');
    expect(await folderNames(join(repo, 'verifications', gone))).toEqual([orphan.split('/')[2]]);

    const verified = await runEngine(['verify', '--repo', repo, '--json']);
    expect(verified.code, verified.stderr).toBe(0);
    const warnings = parseJson<{ warnings: { code: string; path?: string }[] }>(verified.stdout).warnings.filter((w) => w.code === 'VERIFICATION_ORPHANED');
    expect(warnings.map((w) => w.path)).toEqual([orphan]);

    const dry = await runEngine(['gc', '--repo', repo, '--dry-run', '--json']);
    expect(dry.code, dry.stderr).toBe(0);
    expect(parseJson<GcJson>(dry.stdout).markers.verifications).toEqual([orphan]);
    expect(await folderNames(join(repo, 'verifications', gone))).toHaveLength(1);

    const collected = await runEngine(['gc', '--repo', repo, '--json']);
    expect(collected.code, collected.stderr).toBe(0);
    expect(parseJson<GcJson>(collected.stdout).markers.verifications).toEqual([orphan]);
    expect(await folderNames(join(repo, 'verifications'))).toEqual([stays]);
    expect(await folderNames(join(repo, 'verifications', stays))).toEqual([staysKey.split('/')[2]]);
    const again = await runEngine(['gc', '--repo', repo, '--json']);
    expect(parseJson<GcJson>(again.stdout).markers.verifications).toEqual([]);
    const clean = await runEngine(['verify', '--repo', repo, '--json']);
    expect(parseJson<{ warnings: { code: string }[]; verifications: number }>(clean.stdout)).toMatchObject({ warnings: [], verifications: 1 });
    await expectRestoreIdentical(repo, stays, images[1], { dir });

    // A forget that finishes takes its records; under a shared lease it leaves their empty folder to gc.
    const forgotten = await runEngine(['forget', '--repo', repo, stays]);
    expect(forgotten.code, forgotten.stderr).toBe(0);
    expect(await folderNames(join(repo, 'verifications'))).toEqual([stays]);
    expect(await folderNames(join(repo, 'verifications', stays))).toEqual([]);
    const last = await runEngine(['gc', '--repo', repo, '--json']);
    expect(last.code, last.stderr).toBe(0);
    expect(parseJson<GcJson>(last.stdout).markers.verifications).toEqual([]);
    expect(await folderNames(join(repo, 'verifications'))).toEqual([]);
  });
});

describe('format 1', () => {
  test('forget and prune take the records and their folder under the lock; gc has no orphan to remove', async () => {
    const repo = join(dir, 'repo-1');
    expect((await runEngine(['init', '--format', '1', repo])).code).toBe(0);
    const { ids: [first, second], images } = await backUpTwo(repo, 'v1');
    await commitBootRecord(repo, first, new Date('2026-12-07T09:00:00Z'));
    await commitBootRecord(repo, first, new Date('2026-12-07T10:00:00Z'));
    const secondKey = await commitBootRecord(repo, second, new Date('2026-12-07T09:30:00Z'));
    expect(await folderNames(join(repo, 'verifications'))).toEqual([first, second].sort());

    const forgotten = await runEngine(['forget', '--repo', repo, first]);
    expect(forgotten.code, forgotten.stderr).toBe(0);
    expect(await folderNames(join(repo, 'verifications'))).toEqual([second]);
    expect(await folderNames(join(repo, 'verifications', second))).toEqual([secondKey.split('/')[2]]);
    const collected = await runEngine(['gc', '--repo', repo, '--json']);
    expect(collected.code, collected.stderr).toBe(0);
    expect(parseJson<GcJson>(collected.stdout).markers.verifications).toEqual([]);
    await expectRestoreIdentical(repo, second, images[1], { dir });

    // A newer backup of the same name: prune --keep-last 1 removes the older one, its record and its folder.
    const newer = await runEngine(['backup', '--repo', repo, '--source', images[1], '--name', 'stays', '--json']);
    expect(newer.code, newer.stderr).toBe(0);
    const pruned = await runEngine(['prune', '--repo', repo, '--keep-last', '1', '--json']);
    expect(pruned.code, pruned.stderr).toBe(0);
    const plan = parseJson<{ removed: number; backups: { id: string; keep: boolean }[] }>(pruned.stdout);
    expect([plan.removed, plan.backups.filter((b) => !b.keep).map((b) => b.id)]).toEqual([1, [second]]);
    expect(await folderNames(join(repo, 'verifications'))).toEqual([]);
    await expectRestoreIdentical(repo, parseJson<BackupJson>(newer.stdout).id, images[1], { dir });
  });
});
