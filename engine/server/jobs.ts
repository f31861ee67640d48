/**
 * The job queue: jobs run concurrently up to the global limit, their repository's and their source hosts'
 * (limits.perHost, source-hosts.ts), in the order they were posted (a job whose repository or host is at its
 * limit lets later jobs of other repositories and hosts pass); at most
 * `queue` wait, one more is refused (429). Each job has an AbortController: DELETE aborts it as SIGINT does a
 * CLI command. Every change of state is written to the journal (journal.ts) before it is announced.
 *
 * Events (SSE, server.ts): each job keeps its events in memory, numbered from 1: `state`, `progress` (at most
 * 4 a second), `log` and, last, `end` with the job's final record. A job's events are dropped with the job
 * when more than KEEP_FINISHED finished jobs are held in memory; its journal file stays.
 */
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { EngineError, InterruptedError } from '../../repo-format/errors.js';
import { unlock } from '../catalogue/unlock.js';
import { resolvePassphrase } from '../host/passphrase-source.js';
import type { RepositoryConfig, ServerConfig } from './config.js';
import { NotFoundError, QueueFullError, ServerRestartedError } from './errors.js';
import { errorJson } from './http.js';
import { FINAL_STATES, type JobError, type JobJournal, type JobProgress, type JobRecord, type JobState } from './journal.js';
import type { JobRequest } from './job-requests.js';
import { runJob } from './runners.js';
import { sourceHostsOf } from './source-hosts.js';
import { SharedBlockPool } from '../pipeline/shared-pool.js';

export interface JobEvent {
  id: number;
  type: 'state' | 'progress' | 'log' | 'end';
  data: Record<string, unknown>;
}

/** Finished jobs kept in memory with their events; older ones are served from the journal, without events. */
const KEEP_FINISHED = 200;
/** Events kept per job: a long job's progress and log beyond this keep the newest (the `end` always comes). */
const MAX_EVENTS = 2000;
const PROGRESS_EVERY_MS = 250;

interface LiveJob {
  record: JobRecord;
  request: JobRequest | undefined;
  controller: AbortController;
  events: JobEvent[];
  nextEvent: number;
  emitter: EventEmitter;
  lastProgressAt: number;
  /** Journal writes of this job, one after the other. */
  writes: Promise<void>;
  /** The source hosts it works against (source-hosts.ts), for limits.perHost. */
  hosts: string[];
}

export class JobManager {
  private readonly jobs = new Map<string, LiveJob>();
  private readonly queue: LiveJob[] = [];
  private readonly running = new Set<LiveJob>();
  /** Each running job's whole run (its end journaled and announced): what stop() waits for. */
  private readonly runs = new Set<Promise<void>>();
  private readonly passphrases = new Map<string, Buffer | undefined>();
  private stopping = false;
  /** Told each job's end as it is set on the record, before it is journaled (metrics.ts). */
  private readonly endListeners: ((record: JobRecord) => void)[] = [];
  /** One worker pool for every job (shared-pool.ts): W threads and one arena of slots, not a pool per job. */
  readonly pool: SharedBlockPool;

  private constructor(
    private readonly config: ServerConfig,
    private readonly journal: JobJournal,
    private readonly onLog: (message: string) => void,
    private readonly onEvent: ((job: string, event: JobEvent) => void) | undefined,
  ) {
    this.pool = new SharedBlockPool({ jobs: config.jobs });
  }

  /**
   * The journal read back: jobs a previous server left queued or running are failed ENGINE_SERVER_RESTARTED,
   * after the repository's own recovery ran (unlock: locks and registrations of dead processes; version 3's
   * leases of a dead writer are taken over by the next writer as for the CLI, 19.5).
   */
  static async start(config: ServerConfig, journal: JobJournal, onLog: (message: string) => void, onEvent?: (job: string, event: JobEvent) => void): Promise<JobManager> {
    const manager = new JobManager(config, journal, onLog, onEvent);
    for (const repo of config.repositories.values()) {
      // Only the file the config names: the server's own $ENGINE_PASSWORD is no repository's passphrase.
      const resolved = await resolvePassphrase({ file: repo.passwordFile, fileLabel: `repositories.${repo.name}.passwordFile`, env: {} });
      for (const warning of resolved.warnings) onLog(warning);
      manager.passphrases.set(repo.name, resolved.passphrase);
    }
    const records = await journal.load();
    const interrupted = records.filter((r) => !FINAL_STATES.includes(r.state));
    const recovered = new Map<string, Record<string, unknown>>();
    for (const name of new Set(interrupted.map((r) => r.repository))) {
      const repo = config.repositories.get(name);
      if (!repo) continue;
      try {
        const report = await unlock({ repo: repo.location });
        recovered.set(name, { locked: report.locked, removed: [...(report.lock?.removed ? ['lock'] : []), ...report.registrations.filter((r) => r.removed).map((r) => r.file)] });
      } catch (error) {
        recovered.set(name, { error: errorJson(error) });
      }
    }
    for (const record of records.slice(-KEEP_FINISHED)) manager.remember(record, undefined);
    for (const record of interrupted) {
      const live = manager.jobs.get(record.id) ?? manager.remember(record, undefined);
      const was = record.state;
      const error = errorJson(new ServerRestartedError(record.id, was));
      error.details.recovery = recovered.get(record.repository) ?? null;
      await manager.finish(live, 'failed', null, error);
      onLog(`job ${record.id} (${record.kind} on ${record.repository}) was ${was} when the server stopped: marked failed, ENGINE_SERVER_RESTARTED`);
    }
    return manager;
  }

  private remember(record: JobRecord, request: JobRequest | undefined): LiveJob {
    const live: LiveJob = { record, request, controller: new AbortController(), events: [], nextEvent: 1, emitter: new EventEmitter(), lastProgressAt: 0, writes: Promise.resolve(), hosts: request ? sourceHostsOf(request) : [] };
    live.emitter.setMaxListeners(0);
    this.jobs.set(record.id, live);
    return live;
  }

  private forgetOldJobs(): void {
    const finished = [...this.jobs.values()].filter((j) => FINAL_STATES.includes(j.record.state));
    for (const job of finished.slice(0, Math.max(0, finished.length - KEEP_FINISHED))) this.jobs.delete(job.record.id);
  }

  private event(job: LiveJob, type: JobEvent['type'], data: Record<string, unknown>): void {
    const event: JobEvent = { id: job.nextEvent++, type, data };
    job.events.push(event);
    if (job.events.length > MAX_EVENTS) job.events.splice(0, job.events.length - MAX_EVENTS);
    this.onEvent?.(job.record.id, event);
    job.emitter.emit('event', event);
  }

  /** Writes the job's record now, after its earlier writes (one that failed does not stop the later ones). */
  private persist(job: LiveJob): Promise<void> {
    const snapshot = { ...job.record };
    job.writes = job.writes.catch(() => undefined).then(() => this.journal.write(snapshot));
    return job.writes;
  }

  private async setState(job: LiveJob, state: JobState): Promise<void> {
    job.record.state = state;
    if (state === 'running') job.record.startedAt = new Date().toISOString();
    await this.persist(job);
    this.event(job, 'state', { state });
  }

  private async finish(job: LiveJob, state: 'succeeded' | 'failed' | 'cancelled', result: Record<string, unknown> | null, error: JobError | null): Promise<void> {
    Object.assign(job.record, { state, result, error, endedAt: new Date().toISOString() });
    // Told at once, with the record: whoever reads the job ended (GET /jobs/{id}) finds it counted too.
    for (const listener of this.endListeners) {
      try {
        listener(job.record);
      } catch (e) {
        this.onLog(`job ${job.record.id}: a listener of its end failed: ${(e as Error).message}`);
      }
    }
    try {
      await this.persist(job);
    } finally {
      // Announced even when the journal cannot be written (a full disk): followers and stop() wait for `end`.
      this.event(job, 'state', { state });
      this.event(job, 'end', { job: job.record });
      job.emitter.emit('end');
      this.forgetOldJobs();
    }
  }

  /** Queues a job (429 when the queue is full) and starts what the limits allow; the job as queued. */
  async submit(request: JobRequest, startedBy: string): Promise<JobRecord> {
    if (!this.config.repositories.has(request.repository)) throw new NotFoundError(`no repository named ${JSON.stringify(request.repository)} in this server's config`, { repository: request.repository });
    if (this.queue.length >= this.config.queue) throw new QueueFullError(this.queue.length);
    const record: JobRecord = {
      id: randomBytes(16).toString('hex'),
      kind: request.kind,
      repository: request.repository,
      state: 'queued',
      request: requestJson(request),
      createdAt: new Date().toISOString(),
      startedAt: null,
      endedAt: null,
      startedBy,
      progress: null,
      result: null,
      error: null,
    };
    const job = this.remember(record, request);
    // Journaled before it can run: a job the journal cannot hold is refused, not run unrecorded.
    await this.persist(job).catch((error: unknown) => {
      this.jobs.delete(record.id);
      throw error;
    });
    // Stopped while it was being journaled (a policy's step): cancelled, as the queue's other jobs were.
    if (this.stopping) {
      await this.finish(job, 'cancelled', null, errorJson(new InterruptedError('the job', 'the server stopped before it started: nothing was done')));
      return { ...job.record };
    }
    this.queue.push(job);
    this.event(job, 'state', { state: 'queued' });
    this.schedule();
    return { ...record };
  }

  private runningOn(repo: string): number {
    let n = 0;
    for (const job of this.running) if (job.record.repository === repo) n++;
    return n;
  }

  /** Whether one of the job's source hosts has limits.perHost jobs running already. */
  private hostBusy(job: LiveJob): boolean {
    const limit = this.config.perHost;
    if (limit === undefined) return false;
    return job.hosts.some((host) => [...this.running].filter((other) => other.hosts.includes(host)).length >= limit);
  }

  /** Calls `listener` with each job's record when it ends (succeeded, failed, cancelled). */
  onJobEnd(listener: (record: JobRecord) => void): void {
    this.endListeners.push(listener);
  }

  private schedule(): void {
    if (this.stopping) return;
    for (let i = 0; i < this.queue.length && this.running.size < this.config.jobs; ) {
      const job = this.queue[i]!;
      const repo = this.config.repositories.get(job.record.repository)!;
      if (this.runningOn(repo.name) >= repo.jobs || this.hostBusy(job)) {
        i++;
        continue;
      }
      this.queue.splice(i, 1);
      this.running.add(job);
      const run = this.execute(job, repo).finally(() => this.runs.delete(run));
      this.runs.add(run);
    }
  }

  private async execute(job: LiveJob, repo: RepositoryConfig): Promise<void> {
    let outcome: { state: 'succeeded' | 'failed' | 'cancelled'; result: Record<string, unknown> | null; error: JobError | null };
    try {
      await this.setState(job, 'running');
      const result = await runJob(job.request!, {
        repo: repo.location,
        passphrase: this.passphrases.get(repo.name),
        signal: job.controller.signal,
        onProgress: (progress) => this.progress(job, progress),
        onLog: (message) => this.event(job, 'log', { message }),
        repository: (name) => {
          const other = this.config.repositories.get(name);
          return other === undefined ? undefined : { location: other.location, passphrase: this.passphrases.get(name) };
        },
        sharedPool: this.pool,
      });
      outcome = { state: 'succeeded', result, error: null };
    } catch (error) {
      const cancelled = job.controller.signal.aborted && error instanceof EngineError && error.code === 'ENGINE_INTERRUPTED';
      outcome = { state: cancelled ? 'cancelled' : 'failed', result: null, error: errorJson(error) };
    }
    try {
      // One end, whatever the journal says: a write that fails is logged, the end announced all the same (finish).
      await this.finish(job, outcome.state, outcome.result, outcome.error).catch((e: unknown) => this.onLog(`job ${job.record.id}: cannot write its end to the journal: ${(e as Error).message}`));
    } finally {
      this.running.delete(job);
      this.schedule();
    }
  }

  private progress(job: LiveJob, progress: JobProgress): void {
    job.record.progress = progress;
    const now = Date.now();
    if (now - job.lastProgressAt < PROGRESS_EVERY_MS && progress.done < progress.total) return;
    job.lastProgressAt = now;
    this.event(job, 'progress', { ...progress });
  }

  /** The passphrase of a repository of the config (from its passwordFile, read once at start). */
  passphrase(repository: string): Buffer | undefined {
    return this.passphrases.get(repository);
  }

  list(filter: { state?: string | undefined; repository?: string | undefined } = {}): JobRecord[] {
    return [...this.jobs.values()].map((j) => j.record).filter((r) => (filter.state === undefined || r.state === filter.state) && (filter.repository === undefined || r.repository === filter.repository));
  }

  get(id: string): JobRecord {
    return this.live(id).record;
  }

  private live(id: string): LiveJob {
    const job = this.jobs.get(id);
    if (!job) throw new NotFoundError(`no job ${id} (or an old one, no longer kept in memory: see the journal)`, { job: id });
    return job;
  }

  /** Cancels a job: a queued one at once, a running one through its signal (it ends `cancelled` when the engine has stopped). A finished job is left as it is. */
  async cancel(id: string): Promise<JobRecord> {
    const job = this.live(id);
    const at = this.queue.indexOf(job);
    if (at >= 0) {
      this.queue.splice(at, 1);
      await this.finish(job, 'cancelled', null, errorJson(new InterruptedError('the job', 'cancelled before it started: nothing was done')));
    } else if (job.record.state === 'running') {
      job.controller.abort();
    }
    return { ...job.record };
  }

  /** The job's events after `after` (Last-Event-ID), then each new one until `end`; a job from the journal has only its `end`. */
  subscribe(id: string, after: number, listener: (event: JobEvent) => void, onEnd: () => void): () => void {
    const job = this.live(id);
    if (job.events.length === 0 && FINAL_STATES.includes(job.record.state)) this.event(job, 'end', { job: job.record });
    for (const event of job.events) if (event.id > after) listener(event);
    if (FINAL_STATES.includes(job.record.state)) {
      onEnd();
      return () => undefined;
    }
    const onEvent = (event: JobEvent): void => listener(event);
    job.emitter.on('event', onEvent);
    job.emitter.once('end', onEnd);
    return () => {
      job.emitter.off('event', onEvent);
      job.emitter.off('end', onEnd);
    };
  }

  counts(repository?: string): { running: number; queued: number } {
    const on = (j: LiveJob): boolean => repository === undefined || j.record.repository === repository;
    return { running: [...this.running].filter(on).length, queued: this.queue.filter(on).length };
  }

  /** Stops: queued jobs cancelled, running ones aborted and awaited (each stops within a second, as a CLI command on SIGINT). */
  async stop(): Promise<void> {
    this.stopping = true;
    for (const job of this.queue.splice(0)) await this.finish(job, 'cancelled', null, errorJson(new InterruptedError('the job', 'the server stopped before it started: nothing was done')));
    for (const job of this.running) job.controller.abort();
    await Promise.all(this.runs);
    await this.pool.close();
  }
}

/** The request as the API shows it back: the parsed form, without functions (a provider has none here). */
function requestJson(request: JobRequest): Record<string, unknown> {
  return JSON.parse(JSON.stringify(request)) as Record<string, unknown>;
}
