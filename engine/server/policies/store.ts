/**
 * What the scheduler keeps on disk, under <stateDir>/policies/<policy>/:
 *
 *   state.json        {lastSlot, since}: the last slot whose runs were started, and when the policy was
 *                     first seen (slots before it are not the policy's to catch up)
 *   runs/<id>.json    one run (a VM of a slot): written when it starts, at each job, and when it ends
 *
 * Each file is rewritten whole (temporary file, fsync, rename, directory fsync): a kill -9 leaves the
 * previous or the new version, never half. The order makes a restart exact: a run's record is written
 * before state.json names its slot, so a slot named there has its runs on disk (finished, or `running`
 * ones that the restart marks failed and runs again), and a slot not named there was not started.
 *
 * Bounded: the newest KEEP_RUNS finished runs of a policy are kept; older ones are removed at start and as
 * new ones are written. A run not finished is never removed.
 */
import { mkdir, open, readdir, readFile, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { JobError } from '../journal.js';

export type RunState = 'running' | 'succeeded' | 'failed' | 'skipped';
export type RunTrigger = 'schedule' | 'catch-up' | 'resume' | 'manual';

export interface RunJob {
  step: 'backup' | 'prune' | 'verify' | 'boot' | 'copy';
  id: string;
  state: string;
  error: JobError | null;
}

/** A run of a policy for one VM and one slot, as `GET /policies/{p}/runs` shows it. */
export interface RunRecord {
  id: string;
  policy: string;
  vm: string;
  /** The slot (ISO 8601, UTC) the run is for; a manual run's is the time it was asked for. */
  slot: string;
  trigger: RunTrigger;
  /** Slots missed while the server was down, this run standing for all of them (catch-up); else 0. */
  missedSlots: number;
  level: 'auto' | 'full' | 'incremental' | 'differential';
  state: RunState;
  startedAt: string;
  endedAt: string | null;
  jobs: RunJob[];
  /** The backup the run made (its id), once made. */
  backup: string | null;
  error: JobError | null;
  /** The run this one runs again (a run the server was killed in). */
  resumes: string | null;
}

export const FINAL_RUN_STATES: readonly RunState[] = ['succeeded', 'failed', 'skipped'];
export const RUN_ID = /^[0-9a-f]{32}$/;
/** Finished runs kept per policy, on disk and in memory (~1 KiB each). */
export const KEEP_RUNS = 1000;

export interface PolicyState {
  lastSlot: string | null;
  since: string;
}

async function writeDurably(dir: string, name: string, value: unknown): Promise<void> {
  const temp = join(dir, `.${name}.tmp`);
  const handle = await open(temp, 'w', 0o600);
  try {
    await handle.writeFile(`${JSON.stringify(value)}\n`);
    await handle.sync();
  } finally {
    await handle.close();
  }
  await rename(temp, join(dir, name));
  const d = await open(dir, 'r');
  try {
    await d.sync();
  } finally {
    await d.close();
  }
}

export class PolicyStore {
  private runs: RunRecord[] = [];
  /** Writes of each run, one after the other. */
  private readonly writes = new Map<string, Promise<void>>();

  private constructor(
    private readonly dir: string,
    private readonly keep: number,
  ) {}

  static async open(stateDir: string, policy: string, keep = KEEP_RUNS): Promise<PolicyStore> {
    const dir = join(stateDir, 'policies', policy);
    await mkdir(join(dir, 'runs'), { recursive: true, mode: 0o700 });
    const store = new PolicyStore(dir, keep);
    await store.load();
    return store;
  }

  private async load(): Promise<void> {
    const runsDir = join(this.dir, 'runs');
    for (const name of await readdir(runsDir)) {
      const id = name.replace(/\.json$/, '');
      if (!RUN_ID.test(id) || name !== `${id}.json`) {
        if (name.startsWith('.') && name.endsWith('.tmp')) await rm(join(runsDir, name), { force: true });
        continue;
      }
      try {
        this.runs.push(JSON.parse(await readFile(join(runsDir, name), 'utf8')) as RunRecord);
      } catch {
        // Unreachable through rename: a file edited by hand is not a run of ours.
      }
    }
    this.runs.sort((a, b) => (a.startedAt < b.startedAt ? -1 : a.startedAt > b.startedAt ? 1 : a.id < b.id ? -1 : 1));
    await this.dropOld();
  }

  private async dropOld(): Promise<void> {
    const finished = this.runs.filter((r) => FINAL_RUN_STATES.includes(r.state));
    const old = new Set(finished.slice(0, Math.max(0, finished.length - this.keep)));
    if (old.size === 0) return;
    this.runs = this.runs.filter((r) => !old.has(r));
    for (const run of old) await rm(join(this.dir, 'runs', `${run.id}.json`), { force: true });
  }

  async state(): Promise<PolicyState | undefined> {
    const text = await readFile(join(this.dir, 'state.json'), 'utf8').catch(() => undefined);
    if (text === undefined) return undefined;
    try {
      return JSON.parse(text) as PolicyState;
    } catch {
      return undefined;
    }
  }

  setState(state: PolicyState): Promise<void> {
    return writeDurably(this.dir, 'state.json', state);
  }

  /** Every run held, oldest first (the live objects: the scheduler updates them, then calls save). */
  all(): readonly RunRecord[] {
    return this.runs;
  }

  /** Writes a run now, after its earlier writes; a new run is added (and the oldest finished ones dropped once it ends). */
  save(run: RunRecord): Promise<void> {
    if (!this.runs.includes(run)) this.runs.push(run);
    const snapshot = structuredClone(run);
    const previous = this.writes.get(run.id) ?? Promise.resolve();
    const write = previous.catch(() => undefined).then(async () => {
      await writeDurably(join(this.dir, 'runs'), `${run.id}.json`, snapshot);
      if (FINAL_RUN_STATES.includes(snapshot.state)) {
        this.writes.delete(run.id);
        await this.dropOld();
      }
    });
    this.writes.set(run.id, write);
    return write;
  }
}
