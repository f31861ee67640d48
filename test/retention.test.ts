/**
 * Retention: the policy on its own (restic's keep rules, UTC periods, reasons), then `engine prune`,
 * `protect` and `unprotect` through the CLI: removed backups are gone, the others restore byte for byte.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { applyRetention, isoWeek, type RetentionPolicy } from '../dist/engine/index.js';
import { decodeQuarantined, encodeQuarantined } from '../dist/repo-format/quarantine.js';
import { filesIdentical, parseJson, runEngine, sparseFile, tempDir, writeRegion, type BackupJson } from './helpers.js';

const MiB = 1024 * 1024;

interface B {
  id: string;
  name: string;
  startTime: string;
}

function backups(times: string[], name = 'vm'): B[] {
  return times.map((t, i) => ({ id: `${name}-${String(i).padStart(2, '0')}`, name, startTime: new Date(t).toISOString() }));
}

function kept(list: B[], policy: RetentionPolicy, protectedIds: string[] = []): Record<string, string[]> {
  const result: Record<string, string[]> = {};
  for (const d of applyRetention(list, policy, new Set(protectedIds))) if (d.keep) result[d.backup.id] = d.reasons;
  return result;
}

describe('retention policy', () => {
  test('ISO weeks: the Thursday decides the year', () => {
    expect(isoWeek(new Date('2021-01-03T12:00:00Z'))).toBe('2020-W53'); // a Sunday
    expect(isoWeek(new Date('2021-01-04T00:00:00Z'))).toBe('2021-W01'); // the Monday after
    expect(isoWeek(new Date('2024-12-30T00:00:00Z'))).toBe('2025-W01');
    expect(isoWeek(new Date('2026-06-15T23:59:59Z'))).toBe('2026-W25');
  });

  test('keep-last keeps the newest N of each name', () => {
    const list = [...backups(['2026-01-01T00:00Z', '2026-01-02T00:00Z', '2026-01-03T00:00Z']), ...backups(['2026-01-01T00:00Z', '2026-01-05T00:00Z'], 'other')];
    expect(kept(list, { last: 2 })).toEqual({ 'vm-02': ['last'], 'vm-01': ['last'], 'other-01': ['last'], 'other-00': ['last'] });
  });

  test('keep-daily keeps the newest backup of each of the N newest days, in UTC', () => {
    // 23:30 UTC and 00:30 UTC the next day are different days in UTC, whatever the local zone.
    const list = backups(['2026-03-01T08:00Z', '2026-03-01T20:00Z', '2026-03-01T23:30Z', '2026-03-02T00:30Z', '2026-03-02T09:00Z', '2026-03-04T09:00Z']);
    expect(kept(list, { daily: 2 })).toEqual({ 'vm-05': ['daily'], 'vm-04': ['daily'] });
    expect(kept(list, { daily: 3 })).toEqual({ 'vm-05': ['daily'], 'vm-04': ['daily'], 'vm-02': ['daily'] });
  });

  test('a backup kept by several rules carries every reason', () => {
    const list = backups(['2025-12-31T10:00Z', '2026-01-01T10:00Z', '2026-01-01T11:00Z']);
    expect(kept(list, { last: 1, hourly: 2, daily: 1, monthly: 2, yearly: 2 })).toEqual({
      'vm-02': ['last', 'hourly', 'daily', 'monthly', 'yearly'],
      'vm-01': ['hourly'],
      'vm-00': ['monthly', 'yearly'],
    });
  });

  test('weekly groups by ISO week; monthly by month', () => {
    const list = backups(['2026-01-05T10:00Z', '2026-01-07T10:00Z', '2026-01-12T10:00Z', '2026-02-01T10:00Z', '2026-02-02T10:00Z']);
    expect(kept(list, { weekly: 3 })).toEqual({ 'vm-04': ['weekly'], 'vm-03': ['weekly'], 'vm-02': ['weekly'] });
    expect(kept(list, { monthly: 1 })).toEqual({ 'vm-04': ['monthly'] });
  });

  test('a period rule that cannot fill its count keeps the oldest backup too', () => {
    const list = backups(['2026-05-01T08:00Z', '2026-05-01T09:00Z', '2026-05-01T10:00Z']);
    expect(kept(list, { daily: 7 })).toEqual({ 'vm-02': ['daily'], 'vm-00': ['oldest daily'] });
  });

  test('protected backups are always kept and still counted by the rules', () => {
    const list = backups(['2026-01-01T00:00Z', '2026-01-02T00:00Z', '2026-01-03T00:00Z', '2026-01-04T00:00Z']);
    expect(kept(list, { last: 1 }, ['vm-00', 'vm-03'])).toEqual({ 'vm-03': ['protected', 'last'], 'vm-00': ['protected'] });
  });
});

describe('quarantine record', () => {
  test('encode/decode round trip; bad records are refused', () => {
    const frame = { pack: 'ab'.repeat(16), offset: 5_000_000_000, blob: 'cd'.repeat(32), why: 'checksum mismatch', since: '2026-01-01T00:00:00.000Z' };
    expect(decodeQuarantined(encodeQuarantined(frame))).toEqual(frame);
    expect(decodeQuarantined(encodeQuarantined({ ...frame, blob: null }))).toEqual({ ...frame, blob: null });
    expect(decodeQuarantined(Buffer.from('{"pack": "zz", "offset": 1}'))).toBeUndefined();
    expect(decodeQuarantined(Buffer.from('{"pack": "' + 'ab'.repeat(16) + '", "offset": -1, "blob": null}'))).toBeUndefined();
    expect(decodeQuarantined(Buffer.from('not json'))).toBeUndefined();
  });
});

describe('engine prune, protect, unprotect', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  beforeAll(async () => {
    ({ path: dir, cleanup } = await tempDir('engine-retention-'));
  });
  afterAll(async () => {
    await cleanup();
  });

  test('removes what the policy does not keep; protected and kept backups restore byte for byte', async () => {
    const repo = join(dir, 'repo');
    expect((await runEngine(['init', repo])).code).toBe(0);
    const image = join(dir, 'vm.img');
    await sparseFile(image, 3 * MiB);
    const versions: { id: string; copy: string }[] = [];
    for (let i = 0; i < 4; i += 1) {
      await writeRegion(image, 0, 3 * MiB, 'random', `v${i}`);
      const made = await runEngine(['backup', '--repo', repo, '--source', image, '--name', 'vm', '--json']);
      expect(made.code).toBe(0);
      const copy = join(dir, `v${i}.img`);
      await writeRegion(copy, 0, 3 * MiB, 'random', `v${i}`);
      versions.push({ id: parseJson<BackupJson>(made.stdout).id, copy });
    }
    const other = await runEngine(['backup', '--repo', repo, '--source', image, '--name', 'other', '--json']);
    const otherId = parseJson<BackupJson>(other.stdout).id;

    const refused = await runEngine(['prune', '--repo', repo]);
    expect(refused.code).toBe(2);
    expect(refused.stderr).toContain('no --keep-* option given');

    const protect = await runEngine(['protect', '--repo', repo, versions[0]!.id.slice(0, 8), '--json']);
    expect(parseJson<{ backup: string; changed: boolean }>(protect.stdout)).toEqual({ backup: versions[0]!.id, protected: true, changed: true });
    expect(await readdir(join(repo, 'protected'))).toEqual([versions[0]!.id]);

    const dry = await runEngine(['prune', '--repo', repo, '--keep-last', '1', '--dry-run', '--json']);
    const dryReport = parseJson<{ dryRun: boolean; removed: number; backups: { id: string; keep: boolean; reasons: string[] }[] }>(dry.stdout);
    expect(dryReport.dryRun).toBe(true);
    expect(dryReport.removed).toBe(2);
    expect((await readdir(join(repo, 'backups'))).length).toBe(5); // a dry run removes nothing

    const pruned = await runEngine(['prune', '--repo', repo, '--keep-last', '1', '--json']);
    expect(pruned.code).toBe(0);
    const report = parseJson<{ kept: number; removed: number; backups: { id: string; keep: boolean; reasons: string[] }[] }>(pruned.stdout);
    expect(report.kept).toBe(3);
    expect(report.removed).toBe(2);
    expect(report.backups.filter((b) => b.keep).map((b) => [b.id, b.reasons])).toEqual([
      [otherId, ['last']],
      [versions[3]!.id, ['last']],
      [versions[0]!.id, ['protected']],
    ]);
    expect((await readdir(join(repo, 'backups'))).sort()).toEqual([otherId, versions[3]!.id, versions[0]!.id].sort());
    for (const v of [versions[0]!, versions[3]!]) {
      const target = join(dir, `restored-${v.id}`);
      expect((await runEngine(['restore', '--repo', repo, v.id, '--to', target])).code).toBe(0);
      expect(await filesIdentical(v.copy, target)).toBe(true);
    }
    expect((await runEngine(['verify', '--repo', repo])).code).toBe(0);

    const unprotect = await runEngine(['unprotect', '--repo', repo, versions[0]!.id]);
    expect(unprotect.stdout.trim()).toBe(`backup ${versions[0]!.id} is not protected`);
    const again = parseJson<{ removed: number; backups: { id: string; keep: boolean }[] }>((await runEngine(['prune', '--repo', repo, '--keep-last', '1', '--json'])).stdout);
    expect(again.removed).toBe(1);
    expect(again.backups.find((b) => !b.keep)!.id).toBe(versions[0]!.id);
  });
});
