/**
 * engine server (SPEC.md "The service API"), over real HTTP on 127.0.0.1, against a real format-3
 * repository: two backups at once on it, the events of a job in order ending with its result, a restore
 * compared byte for byte, the catalogue with its filters and chains, verify/prune/gc jobs, a cancelled backup
 * (nothing committed, no lease left), a client leaving an event stream mid-way, and the server killed -9
 * mid-job and started again (the job failed ENGINE_SERVER_RESTARTED, the repository usable). Every JSON
 * answer is checked against the checked-in OpenAPI document at the end.
 *
 * The slow source is nbdkit's pattern plugin behind its delay filter, one thread: 64 MiB of non-zero data,
 * each read answered after 300 ms, so a backup of it runs for many seconds without using the CPU.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { access, readdir, readFile } from 'node:fs/promises';
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { exitOf, filesIdentical, initRepository, runEngine, sh, tempDir, waitFor, writeRegion } from './helpers.js';
import { qcow2, qemuImgCompare, qemuIo, qemuNbd } from './qemu.js';
import { call, checkAnswers, jobEnd, openApiDocument, readEvents, recorded, startServer, writeConfig, type RunningServer } from './server-helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let repo: string;
let config: string;
let server: RunningServer;
let nbdkit: ChildProcess;
let slowUri: string;

type Job = Record<string, unknown> & { id: string; state: string; result: Record<string, unknown> | null; error: { code: string; message: string } | null; progress: { done: number } | null };

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-server-'));
  repo = join(dir, 'repo');
  await initRepository(repo);
  await writeRegion(join(dir, 'a.img'), 0, 16 * 1024 * 1024, 'random', 'a');
  await writeRegion(join(dir, 'b.img'), 0, 12 * 1024 * 1024, 'random', 'b');
  // Over 16 MiB: backed up through the worker pool (a job of 16 MiB or less runs on the main thread).
  await writeRegion(join(dir, 'c.img'), 0, 20 * 1024 * 1024, 'random', 'c');
  const socket = join(dir, 'slow.sock');
  nbdkit = spawn('nbdkit', ['-f', '--exit-with-parent', '-t', '1', '-U', socket, '--filter=delay', 'pattern', '64M', 'rdelay=300ms'], { stdio: 'ignore' });
  await waitFor('nbdkit listens', () => access(socket).then(() => true, () => false), { child: nbdkit });
  slowUri = `nbd+unix:///?socket=${socket}`;
  config = await writeConfig(dir, { stateDir: join(dir, 'state'), limits: { jobs: 4, queue: 8 }, repositories: { main: { location: repo, limits: { jobs: 2 } } } });
  server = await startServer(['--config', config, '--listen', '127.0.0.1:0']);
});

afterAll(async () => {
  await server?.stop();
  if (nbdkit && nbdkit.exitCode === null) nbdkit.kill('SIGTERM');
  await cleanup?.();
});

async function post(body: Record<string, unknown>): Promise<Job> {
  const answer = await call(server, 'POST', '/api/v1/jobs', body);
  expect(answer.status, answer.text).toBe(202);
  const job = answer.json as Job;
  expect(answer.headers.location).toBe(`/api/v1/jobs/${job.id}`);
  return job;
}

async function runningWithProgress(id: string): Promise<void> {
  await waitFor(`job ${id} reads`, async () => {
    const job = (await call(server, 'GET', `/api/v1/jobs/${id}`)).json as Job;
    if (['succeeded', 'failed', 'cancelled'].includes(job.state)) throw new Error(`job ${id} ended: ${JSON.stringify(job.error)}`);
    return job.state === 'running' && (job.progress?.done ?? 0) > 0;
  }, { everyMs: 50 });
}

async function backupIds(): Promise<string[]> {
  const answer = await call(server, 'GET', '/api/v1/repositories/main/backups');
  expect(answer.status).toBe(200);
  return (answer.json as { backups: { id: string }[] }).backups.map((b) => b.id);
}

async function leases(): Promise<string[]> {
  return readdir(join(repo, 'leases')).catch(() => []);
}

let first: Job;

describe('engine server: jobs', () => {
  test('two backups at once on one format-3 repository; the events of one in order, ending with its result; a cancelled one commits nothing and leaves no lease', async () => {
    const slow = await post({ kind: 'backup', repository: 'main', name: 'slow', disks: [{ kind: 'nbd', uri: slowUri }] });
    await runningWithProgress(slow.id);
    const quick = await post({ kind: 'backup', repository: 'main', disks: [{ kind: 'raw', path: join(dir, 'a.img') }] });
    const events = await readEvents(server, quick.id);
    // Numbered from 1 without a gap; queued, running, progress…, succeeded, and last `end` with the job.
    expect(events.map((e) => e.id)).toEqual(events.map((_, i) => i + 1));
    const types = events.map((e) => (e.type === 'state' ? `state:${String(e.data.state)}` : e.type));
    expect(types[0]).toBe('state:queued');
    expect(types[1]).toBe('state:running');
    expect(types.slice(-2)).toEqual(['state:succeeded', 'end']);
    expect(types.slice(2, -2).every((t) => t === 'progress')).toBe(true);
    const progress = events.filter((e) => e.type === 'progress').map((e) => e.data as { done: number; total: number });
    expect(progress.length).toBeGreaterThan(0);
    expect(progress.at(-1)).toMatchObject({ done: 16 * 1024 * 1024, total: 16 * 1024 * 1024 });
    for (let i = 1; i < progress.length; i++) expect(progress[i]!.done).toBeGreaterThanOrEqual(progress[i - 1]!.done);
    const ended = events.at(-1)!.data.job as Job;
    first = (await call(server, 'GET', `/api/v1/jobs/${quick.id}`)).json as Job;
    expect(ended).toEqual(first);
    expect(first.state).toBe('succeeded');
    // The result is `backup --json`'s object.
    expect(first.result).toMatchObject({ name: 'a.img', type: 'full', parent: null, boot: null, disks: [{ name: 'a.img', size: 16 * 1024 * 1024, bytesRead: 16 * 1024 * 1024, blocksTotal: 16 }] });

    // The slow backup ran all along: the two were running at once.
    expect(((await call(server, 'GET', `/api/v1/jobs/${slow.id}`)).json as Job).state).toBe('running');
    const cancel = await call(server, 'DELETE', `/api/v1/jobs/${slow.id}`);
    expect(cancel.status).toBe(202);
    const cancelled = (await jobEnd(server, slow.id)) as Job;
    expect(cancelled.state).toBe('cancelled');
    expect(cancelled.error?.code).toBe('ENGINE_INTERRUPTED');
    expect(cancelled.result).toBeNull();
    expect(await backupIds()).toEqual([first.result!.id]);
    expect(await leases()).toEqual([]);
    // Cancelling a finished job changes nothing.
    const again = await call(server, 'DELETE', `/api/v1/jobs/${slow.id}`);
    expect(again.status).toBe(202);
    expect((again.json as Job).state).toBe('cancelled');
  });

  test('a restore job writes the backup back byte for byte; its result is restore --json', async () => {
    const target = join(dir, 'restored.img');
    const job = await post({ kind: 'restore', repository: 'main', backup: String(first.result!.id).slice(0, 12), target: { kind: 'file', path: target } });
    const done = (await jobEnd(server, job.id)) as Job;
    expect(done.error).toBeNull();
    expect(done.result).toMatchObject({ backup: first.result!.id, createdDirectory: null, disks: [{ name: 'a.img', path: target, size: 16 * 1024 * 1024, created: true, rollback: null }] });
    expect(await filesIdentical(target, join(dir, 'a.img'))).toBe(true);
  });

  test('a qcow2 image backed up through its bitmaps, restored into a new qcow2 image and into an NBD export: the same guest bytes', async () => {
    const image = join(dir, 'c.qcow2');
    await sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', join(dir, 'c.img'), image]);
    const backedUp = (await jobEnd(server, (await post({ kind: 'backup', repository: 'main', name: 'qcow2', disks: [{ kind: 'image', path: image }] })).id)) as Job;
    expect(backedUp.error).toBeNull();
    expect(backedUp.result).toMatchObject({ name: 'qcow2', type: 'full', disks: [{ name: 'c.qcow2', size: 20 * 1024 * 1024 }] });
    const target = join(dir, 'restored.qcow2');
    const restored = (await jobEnd(server, (await post({ kind: 'restore', repository: 'main', backup: String(backedUp.result!.id), target: { kind: 'qcow2', path: target } })).id)) as Job;
    expect(restored.error).toBeNull();
    expect(await qemuImgCompare(target, 'qcow2', join(dir, 'c.img'), 'raw')).toBe(true);
    // And into an NBD export (qemu-nbd serving an empty image of the disk's size).
    const exported = join(dir, 'exported.qcow2');
    await qcow2(exported, '20M');
    const served = await qemuNbd(exported, dir, { readOnly: false });
    try {
      const viaNbd = (await jobEnd(server, (await post({ kind: 'restore', repository: 'main', backup: String(backedUp.result!.id), target: { kind: 'nbd', uri: served.uri } })).id)) as Job;
      expect(viaNbd.error).toBeNull();
      expect(viaNbd.result).toMatchObject({ disks: [{ name: 'c.qcow2', size: 20 * 1024 * 1024, created: false }] });
    } finally {
      await served.stop();
    }
    expect(await qemuImgCompare(exported, 'qcow2', join(dir, 'c.img'), 'raw')).toBe(true);
    // A second backup of the image is incremental (its bitmap): the chain has two links.
    await qemuIo(image, ['write -P 0x5a 1M 64k'], 'qcow2');
    const next = (await jobEnd(server, (await post({ kind: 'backup', repository: 'main', name: 'qcow2', disks: [{ kind: 'image', path: image }] })).id)) as Job;
    expect(next.result).toMatchObject({ type: 'incremental', parent: backedUp.result!.id });
    const shown = (await call(server, 'GET', `/api/v1/repositories/main/backups/${String(next.result!.id)}`)).json as { chain: unknown };
    expect(shown.chain).toEqual({ full: backedUp.result!.id, length: 2, ids: [backedUp.result!.id, next.result!.id] });
    // Resuming the event stream after event 2 (Last-Event-ID) gives the events from 3 on.
    const resumed = await readEvents(server, next.id, { headers: { 'last-event-id': '2' } });
    expect(resumed[0]!.id).toBe(3);
    expect(resumed.at(-1)!.type).toBe('end');
    // Forgotten again: the catalogue test below counts the backups of raw files.
    for (const id of [next.result!.id, backedUp.result!.id]) expect((await runEngine(['forget', '--repo', repo, String(id)])).code).toBe(0);
  });

  test('the catalogue: list with filters and chains, show by prefix, statistics', async () => {
    const second = (await jobEnd(server, (await post({ kind: 'backup', repository: 'main', name: 'b', disks: [{ kind: 'raw', path: join(dir, 'b.img'), name: 'disk0' }] })).id)) as Job;
    expect(second.state).toBe('succeeded');
    const all = (await call(server, 'GET', '/api/v1/repositories/main/backups')).json as { backups: Record<string, unknown>[]; damaged: unknown[]; next: string | null };
    expect(all.backups.map((b) => b.id)).toEqual([first.result!.id, second.result!.id]);
    expect(all.damaged).toEqual([]);
    expect(all.next).toBeNull();
    // Pages: one backup each, the second from the first's `next`, the last page's `next` null; a bad cursor or limit is 400.
    const page1 = (await call(server, 'GET', '/api/v1/repositories/main/backups?limit=1')).json as { backups: { id: string }[]; next: string | null };
    expect(page1.backups.map((b) => b.id)).toEqual([first.result!.id]);
    expect(page1.next).toMatch(/^[A-Za-z0-9_-]+$/);
    const page2 = (await call(server, 'GET', `/api/v1/repositories/main/backups?limit=1&after=${page1.next}`)).json as { backups: { id: string }[]; next: string | null };
    expect(page2).toMatchObject({ backups: [{ id: second.result!.id }], next: null });
    for (const bad of ['limit=0', 'limit=10001', 'limit=x', 'after=not-a-cursor', 'after=../../etc']) {
      const refused = await call(server, 'GET', `/api/v1/repositories/main/backups?${bad}`);
      expect([bad, refused.status, (refused.json as { error: { code: string } }).error.code]).toEqual([bad, 400, 'ENGINE_INVALID_ARGUMENT']);
    }
    expect(all.backups[0]).toMatchObject({ parent: null, consistency: { level: 'crash' }, boot: null, chain: { full: first.result!.id, length: 1, ids: [first.result!.id] } });
    const byName = (await call(server, 'GET', '/api/v1/repositories/main/backups?name=b')).json as { backups: { id: string }[] };
    expect(byName.backups.map((b) => b.id)).toEqual([second.result!.id]);
    const byDisk = (await call(server, 'GET', '/api/v1/repositories/main/backups?disk=a.img')).json as { backups: { id: string }[] };
    expect(byDisk.backups.map((b) => b.id)).toEqual([first.result!.id]);
    const since = String(second.result!.startTime);
    expect(((await call(server, 'GET', `/api/v1/repositories/main/backups?since=${since}`)).json as { backups: { id: string }[] }).backups.map((b) => b.id)).toEqual([second.result!.id]);
    expect(((await call(server, 'GET', `/api/v1/repositories/main/backups?until=${since}`)).json as { backups: { id: string }[] }).backups.map((b) => b.id)).toEqual([first.result!.id]);
    expect((await call(server, 'GET', '/api/v1/repositories/main/backups?since=yesterday')).status).toBe(400);
    const shown = await call(server, 'GET', `/api/v1/repositories/main/backups/${String(second.result!.id).slice(0, 10)}`);
    expect(shown.status).toBe(200);
    expect(shown.json).toEqual({ ...second.result, chain: { full: second.result!.id, length: 1, ids: [second.result!.id] } });
    expect((await call(server, 'GET', '/api/v1/repositories/main/backups/ffffffffffff')).status).toBe(404);
    const stats = (await call(server, 'GET', '/api/v1/repositories/main/stats')).json as Record<string, number>;
    expect(stats).toMatchObject({ repository: 'main', backups: 2, logicalBytes: 28 * 1024 * 1024, dataBytes: 28 * 1024 * 1024, readBytes: 28 * 1024 * 1024, newBytes: 28 * 1024 * 1024 });
    // Random data: nothing deduplicated, nothing compressed; the packs hold at least what the records say was stored.
    expect(stats.dedupeRatio).toBe(1);
    expect(stats.storedBytes).toBeGreaterThanOrEqual(stats.recordedStoredBytes!);
    // Growth per day: both backups on today's UTC day (or yesterday's and today's, across midnight), their records' bytes.
    const growth = (stats as unknown as { growth: { days: { day: string; backups: number; newBytes: number; storedBytes: number }[]; storedBytesPerDay: number } }).growth;
    const today = new Date().toISOString().slice(0, 10);
    expect(growth.days.at(-1)!.day).toBe(today);
    expect(growth.days.reduce((n, d) => n + d.backups, 0)).toBe(2);
    expect(growth.days.reduce((n, d) => n + d.newBytes, 0)).toBe(28 * 1024 * 1024);
    expect(growth.days.reduce((n, d) => n + d.storedBytes, 0)).toBe(stats.recordedStoredBytes);
    expect(growth.storedBytesPerDay).toBe(Math.round(stats.recordedStoredBytes! / 30));
    const repositories = (await call(server, 'GET', '/api/v1/repositories')).json;
    expect(repositories).toEqual({ repositories: [{ name: 'main', location: repo, encrypted: false, limits: { jobs: 2 }, jobs: { running: 0, queued: 0 } }] });
  });

  test('verify, prune and gc jobs: their results are the commands\' --json objects', async () => {
    const verify = (await jobEnd(server, (await post({ kind: 'verify', repository: 'main', readData: true })).id)) as Job;
    expect(verify.result).toMatchObject({ ok: true, readData: true, backups: 2, problems: [] });
    const prune = (await jobEnd(server, (await post({ kind: 'prune', repository: 'main', keep: { last: 1 }, dryRun: true })).id)) as Job;
    expect(prune.result).toMatchObject({ dryRun: true, policy: { last: 1 }, kept: 2, removed: 0 });
    const gc = (await jobEnd(server, (await post({ kind: 'gc', repository: 'main', dryRun: true })).id)) as Job;
    expect(gc.result).toMatchObject({ dryRun: true, backups: 2, notices: [] });
    const listed = (await call(server, 'GET', '/api/v1/jobs?state=succeeded&repository=main')).json as { jobs: Job[] };
    expect(listed.jobs.map((j) => j.kind)).toEqual(['backup', 'restore', 'backup', 'restore', 'restore', 'backup', 'backup', 'verify', 'prune', 'gc']);
  });

  test('a client that leaves an event stream mid-way: the job runs on, the server answers', async () => {
    const slow = await post({ kind: 'backup', repository: 'main', name: 'slow', disks: [{ kind: 'nbd', uri: slowUri }] });
    const seen = await readEvents(server, slow.id, { stopAfter: (e) => e.type === 'progress' });
    expect(seen.at(-1)!.type).toBe('progress');
    const later = (await call(server, 'GET', `/api/v1/jobs/${slow.id}`)).json as Job;
    expect(later.state).toBe('running');
    // A second reader gets the whole stream from the start, then the rest live.
    const reader = readEvents(server, slow.id);
    expect((await call(server, 'DELETE', `/api/v1/jobs/${slow.id}`)).status).toBe(202);
    const events = await reader;
    expect(events[0]).toMatchObject({ id: 1, type: 'state', data: { state: 'queued' } });
    expect(events.at(-1)).toMatchObject({ type: 'end', data: { job: { state: 'cancelled', error: { code: 'ENGINE_INTERRUPTED' } } } });
    expect(await leases()).toEqual([]);
  });

  test('the server killed -9 mid-job and started again: the job is failed ENGINE_SERVER_RESTARTED, the repository usable', async () => {
    const slow = await post({ kind: 'backup', repository: 'main', name: 'slow', disks: [{ kind: 'nbd', uri: slowUri }] });
    await runningWithProgress(slow.id);
    const before = await backupIds();
    server.child.kill('SIGKILL');
    await server.stop();
    server = await startServer(['--config', config, '--listen', '127.0.0.1:0']);
    const failed = (await call(server, 'GET', `/api/v1/jobs/${slow.id}`)).json as Job & { error: { details: Record<string, unknown> } };
    expect(failed.state).toBe('failed');
    expect(failed.error.code).toBe('ENGINE_SERVER_RESTARTED');
    expect(failed.error.details).toMatchObject({ job: slow.id, state: 'running' });
    expect(server.stderr()).toContain(`job ${slow.id} (backup on main) was running when the server stopped: marked failed, ENGINE_SERVER_RESTARTED`);
    // Its event stream, in this server: the state it was given, and the end.
    const events = await readEvents(server, slow.id);
    expect(events).toEqual([
      { id: 1, type: 'state', data: { state: 'failed' } },
      { id: 2, type: 'end', data: { job: failed } },
    ]);
    // Earlier jobs are still known, from the journal.
    expect(((await call(server, 'GET', `/api/v1/jobs/${first.id}`)).json as Job).result).toEqual(first.result);
    expect(await backupIds()).toEqual(before);
    const next = (await jobEnd(server, (await post({ kind: 'backup', repository: 'main', disks: [{ kind: 'raw', path: join(dir, 'b.img') }] })).id)) as Job;
    expect(next.state).toBe('succeeded');
    const verify = (await jobEnd(server, (await post({ kind: 'verify', repository: 'main' })).id)) as Job;
    expect(verify.result).toMatchObject({ ok: true, backups: 3, problems: [] });
    expect(await leases()).toEqual([]);
  });

  test('SIGTERM stops the server cleanly: a running job is cancelled as by SIGINT and journaled so, exit 0', async () => {
    const slow = await post({ kind: 'backup', repository: 'main', name: 'slow', disks: [{ kind: 'nbd', uri: slowUri }] });
    await runningWithProgress(slow.id);
    server.child.kill('SIGTERM');
    expect(await exitOf(server.child)).toEqual({ code: 0, signal: null });
    expect(await leases()).toEqual([]);
    server = await startServer(['--config', config, '--listen', '127.0.0.1:0']);
    const job = (await call(server, 'GET', `/api/v1/jobs/${slow.id}`)).json as Job;
    expect(job.state).toBe('cancelled');
    expect(job.error?.code).toBe('ENGINE_INTERRUPTED');
    expect(server.stderr()).not.toContain('ENGINE_SERVER_RESTARTED');
  });

  test('memory: twelve backups one after the other leave the server under 300 MiB (one worker pool and one arena of slots for them all)', async () => {
    for (let i = 0; i < 12; i++) {
      const job = (await jobEnd(server, (await post({ kind: 'backup', repository: 'main', disks: [{ kind: 'raw', path: join(dir, 'c.img') }] })).id)) as Job;
      expect(job.state).toBe('succeeded');
    }
    const status = await readFile(`/proc/${server.child.pid}/status`, 'utf8');
    const rss = Number(/^VmRSS:\s+(\d+) kB/m.exec(status)![1]) * 1024;
    // With a pool per job and no collection after each this measured 451 MiB (each job's SharedArrayBuffers stayed); the shared pool reuses one arena.
    expect(rss).toBeLessThan(300 * 1024 * 1024);
  });

  test('the OpenAPI document is served as checked in, and every JSON answer above matches it', async () => {
    const doc = await openApiDocument();
    const served = await call(server, 'GET', '/api/openapi.json');
    expect(served.json).toEqual(doc);
    const { unchecked, problems } = checkAnswers(doc, recorded);
    expect(unchecked).toEqual([]);
    expect(problems).toEqual([]);
    const covered = new Set(recorded.map((a) => `${a.method} ${a.path.replace(/\/[0-9a-f]{32}(?=\/|$)/, '/{id}').replace(/backups\/[0-9a-f]+$/, 'backups/{id}')} ${a.status}`));
    for (const expected of ['POST /api/v1/jobs 202', 'GET /api/v1/jobs 200', 'GET /api/v1/jobs/{id} 200', 'DELETE /api/v1/jobs/{id} 202', 'GET /api/v1/repositories 200', 'GET /api/v1/repositories/main/backups 200', 'GET /api/v1/repositories/main/backups/{id} 200', 'GET /api/v1/repositories/main/stats 200']) {
      expect(covered, expected).toContain(expected);
    }
  });
});
