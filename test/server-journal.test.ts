/**
 * The jobs' journal of engine server (SPEC.md 23, "Journal"): each job one file, rewritten whole; at start
 * the finished jobs beyond the newest `keep` are removed, the unfinished never; temporary files a crash left
 * are removed, files that are not a job's are left alone.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readdir, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { JobJournal, type JobRecord } from '../dist/engine/server/journal.js';
import { initRepository, tempDir, Tmpfs, waitFor } from './helpers.js';
import { createServer } from 'node:net';

let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-server-journal-'));
});
afterAll(async () => cleanup?.());

function job(n: number, state: JobRecord['state']): JobRecord {
  return {
    id: n.toString(16).padStart(32, '0'),
    kind: 'gc',
    repository: 'main',
    state,
    request: { kind: 'gc', repository: 'main' },
    createdAt: new Date(Date.UTC(2026, 11, 7, 0, 0, n)).toISOString(),
    startedAt: null,
    endedAt: null,
    startedBy: 'test',
    progress: null,
    result: null,
    error: null,
  };
}

describe('engine server: the jobs journal', () => {
  test('keeps the newest finished jobs and every unfinished one; a crash\'s temporary file goes, a stranger stays', async () => {
    const journal = await JobJournal.open(join(dir, 'state'), { keep: 3 });
    expect((await stat(join(dir, 'state'))).mode & 0o777).toBe(0o700);
    const states: JobRecord['state'][] = ['succeeded', 'running', 'failed', 'cancelled', 'queued', 'succeeded', 'succeeded'];
    for (const [n, state] of states.entries()) await journal.write(job(n + 1, state));
    await writeFile(join(dir, 'state', 'jobs', `.${job(9, 'queued').id}.tmp`), '{"cut');
    await writeFile(join(dir, 'state', 'jobs', 'README'), 'not a job');
    const loaded = await journal.load();
    // Finished: 1, 3, 4, 6, 7 -> the newest three (4, 6, 7) stay; 2 (running) and 5 (queued) always stay.
    expect(loaded.map((j) => [parseInt(j.id, 16), j.state])).toEqual([
      [2, 'running'],
      [4, 'cancelled'],
      [5, 'queued'],
      [6, 'succeeded'],
      [7, 'succeeded'],
    ]);
    expect((await readdir(join(dir, 'state', 'jobs'))).sort()).toEqual(['README', ...[2, 4, 5, 6, 7].map((n) => `${job(n, 'queued').id}.json`)].sort());
    // Rewritten whole: the last write is what is read back; 5 finished now, four are: the oldest (4) goes.
    await journal.write({ ...job(5, 'failed'), error: { code: 'ENGINE_SERVER_RESTARTED', message: 'x', details: {} } });
    const again = await journal.load();
    expect(again.map((j) => parseInt(j.id, 16))).toEqual([2, 5, 6, 7]);
    expect(again[1]).toMatchObject({ state: 'failed', error: { code: 'ENGINE_SERVER_RESTARTED' } });
  });
});

describe('engine server: a journal on a full disk', () => {
  test('a job the journal cannot hold (a full disk) is refused, not run; a job whose end cannot be written still ends, once, for its followers and for stop()', async () => {
    const { JobManager } = await import('../dist/engine/server/jobs.js');
    const { parseConfig } = await import('../dist/engine/server/config.js');
    const { parseJobRequest } = await import('../dist/engine/server/job-requests.js');
    const repo = join(dir, 'repo');
    await initRepository(repo);
    const disk = await Tmpfs.mount(join(dir, 'state-tmpfs'), 1);
    try {
      const config = parseConfig(join(dir, 'server.json'), JSON.stringify({ stateDir: disk.path, repositories: { main: { location: repo } } }));
      const logged: string[] = [];
      const manager = await JobManager.start(config, await JobJournal.open(disk.path), (m: string) => logged.push(m));
      await disk.fill();
      await expect(manager.submit(parseJobRequest({ kind: 'gc', repository: 'main', dryRun: true }), 'test')).rejects.toMatchObject({ code: 'ENOSPC' });
      expect(manager.list()).toEqual([]);
      await disk.unfill();
      // A backup from an NBD server that accepts and never answers: the job runs until it is cancelled.
      const silent = createServer(() => undefined);
      const socket = join(dir, 'silent.sock');
      await new Promise<void>((resolve) => silent.listen(socket, resolve));
      const job = await manager.submit(parseJobRequest({ kind: 'backup', repository: 'main', disks: [{ kind: 'nbd', uri: `nbd+unix:///?socket=${socket}` }] }), 'test');
      await waitFor('the job runs', () => manager.get(job.id).state === 'running');
      // The journal's folder goes: the job's end cannot be written.
      await rm(join(disk.path, 'jobs'), { recursive: true });
      const ended = new Promise<{ type: string }[]>((resolve) => {
        const events: { type: string }[] = [];
        manager.subscribe(job.id, 0, (event: { type: string }) => events.push(event), () => resolve(events));
      });
      await manager.cancel(job.id);
      const events = await ended;
      silent.close();
      // One end, last, announced although not journaled; the failure said in the log.
      expect(events.filter((e) => e.type === 'end').length).toBe(1);
      expect(events.at(-1)!.type).toBe('end');
      expect(manager.get(job.id)).toMatchObject({ state: 'cancelled', error: { code: 'ENGINE_INTERRUPTED' } });
      await waitFor('the failed write is logged', () => logged.length > 0);
      expect(logged).toEqual([expect.stringMatching(new RegExp(`^job ${job.id}: cannot write its end to the journal: ENOENT`))]);
      await manager.stop();
    } finally {
      await disk.unmount();
    }
  });
});
