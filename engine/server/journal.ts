/**
 * The jobs' journal: one JSON file per job under <stateDir>/jobs/, rewritten whole (temporary file, fsync,
 * rename, directory fsync) at each change of state: queued, running, then succeeded, failed or cancelled
 * with the result or the error. A server killed -9 leaves each job's last state on disk; the next start reads
 * them all, and a job still `queued` or `running` there is one the server did not finish (jobs.ts marks it
 * failed, ENGINE_SERVER_RESTARTED, after the repository's own recovery ran).
 */
import { mkdir, open, readdir, readFile, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { ensurePrivateDirectory } from '../../repo-format/file-modes.js';

export type JobState = 'queued' | 'running' | 'succeeded' | 'failed' | 'cancelled';
export const FINAL_STATES: readonly JobState[] = ['succeeded', 'failed', 'cancelled'];

export interface JobError {
  code: string;
  message: string;
  details: Record<string, unknown>;
}

export interface JobProgress {
  /** What is being done: "backup vda (1/2)", "restore vda", a verify phase. */
  phase: string;
  done: number;
  total: number;
  unit: 'bytes' | 'items';
}

/** A job as the API shows it (`GET /api/v1/jobs/{id}`) and as the journal keeps it. */
export interface JobRecord {
  id: string;
  kind: 'backup' | 'restore' | 'verify' | 'prune' | 'gc' | 'copy' | 'boot';
  repository: string;
  state: JobState;
  /** The request as posted (validated; it holds no secrets: those come from files named in the config). */
  request: Record<string, unknown>;
  createdAt: string;
  startedAt: string | null;
  endedAt: string | null;
  /** Who started it: the label of its token. */
  startedBy: string;
  progress: JobProgress | null;
  /** The CLI's --json object of the same command (SPEC.md 14.2), once succeeded. */
  result: Record<string, unknown> | null;
  error: JobError | null;
}

/** Job ids: 32 hex digits, random; what the API's paths accept and nothing else (no traversal). */
export const JOB_ID = /^[0-9a-f]{32}$/;

/** Finished jobs the journal keeps: a file each (~1-3 KiB); older ones are removed when the server starts. */
export const KEEP_FINISHED_JOBS = 10_000;

export class JobJournal {
  private constructor(
    private readonly dir: string,
    private readonly keep: number,
  ) {}

  static async open(stateDir: string, options: { keep?: number } = {}): Promise<JobJournal> {
    await ensurePrivateDirectory(stateDir);
    const dir = join(stateDir, 'jobs');
    await mkdir(dir, { recursive: true, mode: 0o700 });
    return new JobJournal(dir, options.keep ?? KEEP_FINISHED_JOBS);
  }

  /**
   * Every job the journal holds, oldest first, after removing the files of finished jobs beyond the newest
   * `keep` (a server that runs for years must not fill its disk nor read millions of files at start); a job
   * not finished is never removed. A file that does not parse (a crash cannot cut one: it is renamed whole) is skipped.
   */
  async load(): Promise<JobRecord[]> {
    const jobs = await this.readAll();
    const finished = jobs.filter((job) => FINAL_STATES.includes(job.state));
    const old = new Set(finished.slice(0, Math.max(0, finished.length - this.keep)));
    for (const job of old) await rm(join(this.dir, `${job.id}.json`), { force: true });
    return jobs.filter((job) => !old.has(job));
  }

  private async readAll(): Promise<JobRecord[]> {
    const jobs: JobRecord[] = [];
    for (const name of await readdir(this.dir)) {
      const id = name.replace(/\.json$/, '');
      if (!JOB_ID.test(id) || name !== `${id}.json`) {
        if (name.startsWith('.') && name.endsWith('.tmp')) await rm(join(this.dir, name), { force: true });
        continue;
      }
      try {
        jobs.push(JSON.parse(await readFile(join(this.dir, name), 'utf8')) as JobRecord);
      } catch {
        // Unreachable through rename; a file edited by hand: not a job of ours.
      }
    }
    return jobs.sort((a, b) => (a.createdAt < b.createdAt ? -1 : a.createdAt > b.createdAt ? 1 : 0));
  }

  async write(job: JobRecord): Promise<void> {
    const path = join(this.dir, `${job.id}.json`);
    const temp = join(this.dir, `.${job.id}.tmp`);
    const handle = await open(temp, 'w', 0o600);
    try {
      await handle.writeFile(`${JSON.stringify(job)}\n`);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await rename(temp, path);
    const dir = await open(this.dir, 'r');
    try {
      await dir.sync();
    } finally {
      await dir.close();
    }
  }
}
