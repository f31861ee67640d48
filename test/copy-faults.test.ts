/**
 * `engine copy` under faults (SPEC.md 22.6): kill -9 at each crash point of the target's write path, then a
 * rerun that resumes (what a committed segment or index batch names is not sent again) and a third run that
 * copies nothing; SIGINT (exit 130, the target valid); a full target disk (ENGINE_NO_SPACE, nothing
 * committed, the source untouched); a source whose backup is forgotten and gc'd while the copy reads it (the
 * copy's lease holds gc back: the copy completes consistently); and the upload limit's byte accounting,
 * against a clock the test moves itself (no timing).
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { Repository } from '../dist/repo-format/repository.js';
import { copyBackups } from '../dist/engine/copy/copy.js';
import { UploadLimit } from '../dist/engine/copy/upload-limit.js';
import { collectOutput, continueUntilExit, exitOf, filesIdentical, parseJson, runEngine, signalUntilExit, spawnEngine, stoppedItself, tempDir, Tmpfs, writeRegion, type BackupJson } from './helpers.js';
import { copyOk, copyRun, recordsOf, type CopyJson } from './copy-support.js';

const MiB = 1024 * 1024;
let scratch: { path: string; cleanup: () => Promise<void> };
let source: string;
const images: string[] = [];
const ids: string[] = [];
/** What a clean copy of the source sends. */
let clean: CopyJson;

async function init(repo: string, args: string[] = []): Promise<void> {
  const r = await runEngine(['init', repo, '--block-size', '64K', ...args]);
  expect(r.code, r.stderr).toBe(0);
}

/** The target holds exactly the source's backups (by copiedFrom), each restoring to its image. */
async function expectComplete(target: string): Promise<void> {
  const { records } = await recordsOf(target);
  const bySource = new Map([...records.values()].map((r) => [r.copiedFrom!.backup, r.id]));
  expect([...bySource.keys()].sort()).toEqual([...ids].sort());
  for (const [i, id] of ids.entries()) {
    const out = join(scratch.path, `check-${id}.raw`);
    const r = await runEngine(['restore', '--repo', target, bySource.get(id)!, '--to', out]);
    expect(r.code, r.stderr).toBe(0);
    expect(await filesIdentical(out, images[i]!)).toBe(true);
    await rm(out);
  }
  const verify = await runEngine(['verify', '--repo', target]);
  expect(verify.code, verify.stdout + verify.stderr).toBe(0);
}

beforeAll(async () => {
  scratch = await tempDir('engine-copy-faults-');
  source = join(scratch.path, 'source');
  await init(source);
  // Two backups of one name sharing 3 of their 5 MiB.
  for (const [i, seed] of ['first', 'second'].entries()) {
    const image = join(scratch.path, `disk-${i}.img`);
    await writeRegion(image, 0, 3 * MiB, 'random', 'shared');
    await writeRegion(image, 3 * MiB, 2 * MiB, 'random', seed);
    images.push(image);
    const r = await runEngine(['backup', '--repo', source, '--source', image, '--name', 'disk', '--json']);
    expect(r.code, r.stderr).toBe(0);
    ids.push(parseJson<BackupJson>(r.stdout).id);
  }
  const target = join(scratch.path, 'clean');
  await init(target);
  clean = await copyOk(source, target, ['--all']);
  expect(clean.backupsCopied).toBe(2);
});

afterAll(async () => {
  await scratch?.cleanup();
});

describe('kill -9 at each crash point, then a rerun', () => {
  const points: [string, string[]][] = [
    ['pack-sealed', []],
    ['segment-written', []],
    ['before-record', []],
    ['record-written', []],
    ['index-written', ['--format', '1']],
  ];
  for (const [point, format] of points) {
    test(`${point}${format.length > 0 ? ' (format 1)' : ''}: the target stays valid, the rerun resumes and completes, a third run copies nothing`, async () => {
      const target = join(scratch.path, `crash-${point}`);
      await init(target, format);
      const crashed = await copyRun(source, target, ['--all'], { ENGINE_CRASH_AT: point });
      expect(crashed.code).toBe(137);
      const { records } = await recordsOf(target);
      // The record is the commit point: before it nothing, after it the first backup whole.
      expect(records.size).toBe(point === 'record-written' ? 1 : 0);
      const verify = await runEngine(['verify', '--repo', target]);
      expect(verify.code, verify.stdout + verify.stderr).toBe(0);
      const rerun = await copyOk(source, target, ['--all']);
      expect(rerun.backupsCopied + rerun.backupsSkipped).toBe(2);
      if (point === 'record-written') expect(rerun).toMatchObject({ backupsCopied: 1, backupsSkipped: 1 });
      // A durable segment (format 3) or index batch (format 1) names chunks the rerun then does not send.
      if (point === 'segment-written' || point === 'index-written') {
        expect(rerun.chunksSkipped).toBeGreaterThan(clean.chunksSkipped);
        expect(rerun.chunksSent).toBeLessThan(clean.chunksSent);
      }
      expect(rerun.chunksSent + rerun.chunksSkipped).toBeGreaterThan(0);
      await expectComplete(target);
      const third = await copyOk(source, target, ['--all']);
      expect(third).toMatchObject({ backupsCopied: 0, backupsSkipped: 2, chunksSent: 0, bytesSent: 0 });
    });
  }
});

describe('interruptions and faults', () => {
  test('SIGINT while packs are sent: exit 130, no record on the target, verify clean; the rerun completes', async () => {
    const target = join(scratch.path, 'sigint');
    await init(target);
    const child = spawnEngine(['copy', '--from', source, '--to', target, '--all'], { ENGINE_STOP_AT: 'pack-sealed' });
    const out = collectOutput(child);
    await stoppedItself(child);
    const exit = await signalUntilExit(child);
    expect([exit.code, out.stderr()]).toEqual([130, expect.stringContaining('copy was interrupted (SIGINT); no backup was committed on the target')]);
    expect((await recordsOf(target)).records.size).toBe(0);
    await copyOk(source, target, ['--all']);
    await expectComplete(target);
  });

  test('a full target disk: ENGINE_NO_SPACE in one line, nothing committed, the source untouched; after space is freed the rerun completes', async () => {
    const fs = await Tmpfs.mount(join('/tmp', `engine-copy-full-${process.pid}`), 16);
    try {
      const target = join(fs.path, 'target');
      await init(target);
      await fs.fill(2 * MiB);
      const r = await copyRun(source, target, ['--all']);
      expect(r.code, r.stdout).toBe(1);
      expect(parseJson<{ error: { code: string } }>(r.stdout).error.code).toBe('ENGINE_NO_SPACE');
      const text = await runEngine(['copy', '--from', source, '--to', target, '--all']);
      expect(text.stderr.trim().split('\n')).toEqual([expect.stringContaining('no space left')]);
      expect((await recordsOf(target)).records.size).toBe(0);
      const verifySource = await runEngine(['verify', '--repo', source, '--read-data']);
      expect(verifySource.code, verifySource.stdout).toBe(0);
      await fs.unfill();
      await copyOk(source, target, ['--all']);
      await expectComplete(target);
    } finally {
      await fs.unmount();
    }
  });

  test('the source changes under the copy: its backup forgotten and gc started meanwhile; gc waits for the copy, which completes consistently', async () => {
    const own = join(scratch.path, 'changing-source');
    await init(own);
    const r = await runEngine(['backup', '--repo', own, '--source', images[0]!, '--name', 'disk', '--json']);
    expect(r.code, r.stderr).toBe(0);
    const id = parseJson<BackupJson>(r.stdout).id;
    const target = join(scratch.path, 'changing-target');
    await init(target);
    const child = spawnEngine(['copy', '--from', own, '--to', target, '--all', '--json'], { ENGINE_STOP_AT: 'pack-sealed' });
    const out = collectOutput(child);
    await stoppedItself(child);
    const forgot = await runEngine(['forget', '--repo', own, id]);
    expect(forgot.code, forgot.stderr).toBe(0);
    const gc = spawnEngine(['gc', '--repo', own, '--json']);
    const gcOut = collectOutput(gc);
    // The copy stops again at its next sealed pack (the map pages'): let it run to its end.
    expect(await continueUntilExit(child), out.stderr()).toBe(0);
    expect(parseJson<CopyJson>(out.stdout()).backupsCopied).toBe(1);
    expect((await exitOf(gc)).code, gcOut.stderr()).toBe(0);
    // gc ran, after the copy let go of the source: it reclaimed the forgotten backup's chunks.
    expect(parseJson<{ backups: number; chunks: { removed: number } }>(gcOut.stdout())).toMatchObject({ backups: 0, chunks: { removed: expect.any(Number) } });
    expect(parseJson<{ chunks: { removed: number } }>(gcOut.stdout()).chunks.removed).toBeGreaterThan(0);
    const { records } = await recordsOf(target);
    const copied = [...records.values()][0]!;
    const restored = join(scratch.path, 'changing.raw');
    const rr = await runEngine(['restore', '--repo', target, copied.id, '--to', restored]);
    expect(rr.code, rr.stderr).toBe(0);
    expect(await filesIdentical(restored, images[0]!)).toBe(true);
  });
});

describe('--limit-upload', () => {
  /** A clock that moves only when the limit sleeps: every figure below is a count of bytes. */
  const virtualClock = (): { t: number; now: () => number; sleep: (ms: number) => Promise<void>; sleeps: number } => {
    const clock = { t: 0, sleeps: 0, now: () => clock.t, sleep: (ms: number) => ((clock.t += ms), (clock.sleeps += 1), Promise.resolve()) };
    return clock;
  };

  test('the bucket: every byte counted; waits exactly what the rate needs (no burst at the start, one second of it at most later)', async () => {
    const clock = virtualClock();
    const limit = new UploadLimit(1000, clock);
    for (const n of [300, 700, 2500, 1, 499]) await limit.take(n);
    expect(limit.bytesTaken).toBe(4000);
    // 4000 bytes at 1000 B/s from an empty bucket: 4 s of the clock, and each wait rounded up to a whole ms.
    expect(clock.t).toBeGreaterThanOrEqual(4000);
    expect(clock.t).toBeLessThanOrEqual(4000 + clock.sleeps);
    // Idle time fills the bucket up to one second of the rate, not more.
    clock.t += 60_000;
    const before = clock.t;
    await limit.take(1000);
    expect(clock.t).toBe(before);
    await limit.take(500);
    expect(clock.t - before).toBeGreaterThanOrEqual(500);
  });

  test('a copy counts every byte it sends through the limit: the frames the target indexes, exactly', async () => {
    const target = join(scratch.path, 'limited');
    await init(target);
    const clock = virtualClock();
    const report = await copyBackups({ from: source, to: target, selection: { kind: 'all' }, limitUpload: 256 * 1024, clock });
    expect(report.backupsCopied).toBe(2);
    expect(report.limit!.bytesTaken).toBe(report.bytesSent);
    const repo = await Repository.open(target, { access: 'exclusive', command: 'verify', manyWriters: true, onNotice: () => undefined });
    let indexed = 0;
    try {
      for await (const entry of repo.blobs()) indexed += entry.length;
    } finally {
      await repo.close();
    }
    expect(report.bytesSent).toBe(indexed);
    expect(clock.t).toBeGreaterThanOrEqual((report.bytesSent * 1000) / (256 * 1024));
    expect(clock.t).toBeLessThanOrEqual((report.bytesSent * 1000) / (256 * 1024) + clock.sleeps);
    await expectComplete(target);
  });
});
