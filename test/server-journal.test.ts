/**
 * The jobs' journal of engine server (SPEC.md 22, "Journal"): each job one file, rewritten whole; at start
 * the finished jobs beyond the newest `keep` are removed, the unfinished never; temporary files a crash left
 * are removed, files that are not a job's are left alone.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { JobJournal, type JobRecord } from '../dist/engine/server/journal.js';
import { tempDir } from './helpers.js';

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
