/**
 * `GET /metrics`: the server's figures in the Prometheus text exposition format, version 0.0.4 (SPEC.md 23.2
 * "Metrics"). Names follow Prometheus's conventions: the `engine_` prefix, base units (`_seconds`, `_bytes`),
 * `_total` on counters, one HELP and one TYPE line per family.
 *
 * What is counted comes from three places:
 * - job ends (jobs.ts tells `jobEnded`): jobs by kind and result, their durations (a histogram), errors by
 *   code, and a backup's bytes read, new and stored. Counters start at zero with each server process, as
 *   Prometheus expects of counters (its rate() and increase() see the reset);
 * - the job queue, read at each scrape: jobs running and queued per repository;
 * - each repository's catalogue and pack listing (statsOf, catalogue.ts), cached: a scrape never opens a
 *   repository. The cache is refreshed when the server starts, after every job that changes a repository
 *   (backup, prune, gc; a verify or restore does not), and when a scrape finds it older than REFRESH_MS (the
 *   CLI or another server may have written meanwhile: that scrape answers with the old figures and the next
 *   one has the new). So a figure is at most REFRESH_MS plus one refresh old, or one refresh after a job of
 *   this server; `engine_repository_stats_timestamp_seconds` says when each was taken.
 *
 * Label cardinality is bounded: `kind` and `result` are fixed sets, `code` is the engine's fixed set of error
 * codes, `repository` the config's names. `name` (the backup's name: the VM) comes from the repository's
 * catalogue, which the server does not control, so at most MAX_NAMES names per repository are exported, the
 * most recently backed up ones; `engine_backup_names_omitted` counts the rest.
 */
import type { ServerResponse } from 'node:http';
import { setTimeout as delay } from 'node:timers/promises';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import type { RequestContext, Route } from './http.js';
import type { RepositoryConfig, ServerConfig } from './config.js';
import type { JobRecord } from './journal.js';
import { listBackups } from '../catalogue/catalogue.js';
import { statsOf } from './catalogue.js';

export const METRICS_CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8';

/** A repository's cached figures are refreshed at a scrape that finds them older than this. */
export const REFRESH_MS = 10 * 60 * 1000;
/** Backup names (VMs) per repository with their own `engine_backup_last_success_timestamp_seconds` series. */
export const MAX_NAMES = 1000;
/** How long close() waits for a refresh under way. */
const CLOSE_WAIT_MS = 1000;
/** Job durations: from a second to a day (a full backup of a large VM takes hours). */
export const DURATION_BUCKETS = [1, 5, 15, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400];

type Labels = Record<string, string>;

/** A label value as the format writes it: backslash, double quote and line feed escaped. */
export function escapeLabel(value: string): string {
  return value.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');
}

function labelText(labels: Labels): string {
  const entries = Object.entries(labels);
  return entries.length === 0 ? '' : `{${entries.map(([k, v]) => `${k}="${escapeLabel(v)}"`).join(',')}}`;
}

/** A sample value: integers as they are, others in the shortest form that reads back the same. */
function valueText(value: number): string {
  if (Number.isNaN(value)) return 'NaN';
  if (value === Infinity) return '+Inf';
  if (value === -Infinity) return '-Inf';
  return String(value);
}

/** Samples of one family, keyed by their label text (one series each). */
class Family {
  readonly samples = new Map<string, { labels: Labels; value: number }>();
  constructor(
    readonly name: string,
    readonly type: 'counter' | 'gauge',
    readonly help: string,
  ) {}
  add(labels: Labels, by: number): void {
    const key = labelText(labels);
    const sample = this.samples.get(key) ?? { labels, value: 0 };
    sample.value += by;
    this.samples.set(key, sample);
  }
  set(labels: Labels, value: number): void {
    this.samples.set(labelText(labels), { labels, value });
  }
}

class Histogram {
  readonly series = new Map<string, { labels: Labels; buckets: number[]; sum: number; count: number }>();
  constructor(
    readonly name: string,
    readonly help: string,
    readonly bounds: readonly number[],
  ) {}
  observe(labels: Labels, value: number): void {
    const key = labelText(labels);
    const series = this.series.get(key) ?? { labels, buckets: this.bounds.map(() => 0), sum: 0, count: 0 };
    this.bounds.forEach((bound, i) => {
      if (value <= bound) series.buckets[i]!++;
    });
    series.sum += value;
    series.count++;
    this.series.set(key, series);
  }
}

function header(lines: string[], name: string, type: string, help: string): void {
  lines.push(`# HELP ${name} ${help.replace(/\\/g, '\\\\').replace(/\n/g, '\\n')}`, `# TYPE ${name} ${type}`);
}

function writeFamily(lines: string[], family: Family): void {
  header(lines, family.name, family.type, family.help);
  for (const { labels, value } of family.samples.values()) lines.push(`${family.name}${labelText(labels)} ${valueText(value)}`);
}

function writeHistogram(lines: string[], histogram: Histogram): void {
  header(lines, histogram.name, 'histogram', histogram.help);
  for (const { labels, buckets, sum, count } of histogram.series.values()) {
    histogram.bounds.forEach((bound, i) => lines.push(`${histogram.name}_bucket${labelText({ ...labels, le: valueText(bound) })} ${buckets[i]}`));
    lines.push(`${histogram.name}_bucket${labelText({ ...labels, le: '+Inf' })} ${count}`);
    lines.push(`${histogram.name}_sum${labelText(labels)} ${valueText(sum)}`);
    lines.push(`${histogram.name}_count${labelText(labels)} ${count}`);
  }
}

interface RepositoryFigures {
  /** When the figures were taken (ms since the epoch). */
  at: number;
  stats: Record<string, unknown>;
  /** Newest end time (ms) of each backup name, the MAX_NAMES most recent. */
  lastBackup: Map<string, number>;
  omitted: number;
}

export interface JobCounts {
  counts(repository?: string): { running: number; queued: number };
}

/** Jobs that change what a repository holds: its cached figures are taken again after each. */
const WRITING_KINDS: readonly string[] = ['backup', 'prune', 'gc'];

export class ServerMetrics {
  private readonly jobsTotal = new Family('engine_jobs_total', 'counter', 'Jobs that ended, by kind and result (succeeded, failed, cancelled).');
  private readonly durations = new Histogram('engine_job_duration_seconds', 'How long jobs ran, from start to end (jobs cancelled before they started are not observed).', DURATION_BUCKETS);
  private readonly errors = new Family('engine_job_errors_total', 'counter', 'Jobs that failed, by kind and error code (SPEC.md 14.3).');
  private readonly apiErrors = new Family('engine_api_errors_total', 'counter', 'API requests answered with an error, by error code.');
  private readonly readBytes = new Family('engine_backup_read_bytes_total', 'counter', 'Bytes backups read from their sources.');
  private readonly newBytes = new Family('engine_backup_new_bytes_total', 'counter', 'Bytes of data backups found new (not in the repository yet), before compression.');
  private readonly storedBytes = new Family('engine_backup_stored_bytes_total', 'counter', 'Bytes backups added to the repository, compressed and encrypted.');
  private readonly figures = new Map<string, RepositoryFigures>();
  private readonly refreshing = new Map<string, Promise<void>>();
  private readonly again = new Set<string>();
  private readonly startedAt = Date.now();
  private closed = false;

  constructor(
    private readonly config: ServerConfig,
    private readonly passphrase: (repository: string) => Buffer | undefined,
    private readonly onLog: (message: string) => void,
    private readonly now: () => number = Date.now,
  ) {}

  /** Takes every repository's figures (in the background: the server answers meanwhile). */
  start(): void {
    for (const name of this.config.repositories.keys()) this.refresh(name);
  }

  /** Waits for the refreshes under way (tests, and close). */
  async settled(): Promise<void> {
    while (this.refreshing.size > 0) await Promise.all(this.refreshing.values());
  }

  /** No refresh after this; one under way is waited for a second at most (the server stops within a second, as the CLI does). */
  async close(): Promise<void> {
    this.closed = true;
    await Promise.race([this.settled(), delay(CLOSE_WAIT_MS, undefined, { ref: false })]);
  }

  jobEnded(record: JobRecord): void {
    const result = record.state;
    this.jobsTotal.add({ kind: record.kind, result }, 1);
    if (record.startedAt !== null && record.endedAt !== null) this.durations.observe({ kind: record.kind, result }, Math.max(0, Date.parse(record.endedAt) - Date.parse(record.startedAt)) / 1000);
    if (result === 'failed' && record.error) this.errors.add({ kind: record.kind, code: record.error.code }, 1);
    if (record.kind === 'backup' && result === 'succeeded' && record.result) {
      const repository = { repository: record.repository };
      for (const disk of (record.result.disks as Record<string, unknown>[] | undefined) ?? []) {
        this.readBytes.add(repository, Number(disk.bytesRead ?? 0));
        this.newBytes.add(repository, Number(disk.bytesNew ?? 0));
        this.storedBytes.add(repository, Number(disk.bytesStored ?? 0));
      }
    }
    // A job that may have run (a failed backup leaves packs until gc) changes the repository.
    if (WRITING_KINDS.includes(record.kind) && record.startedAt !== null) this.refresh(record.repository);
    // A copy writes to its target, another repository of the config (request.to).
    const to = record.request.to;
    if (record.kind === 'copy' && record.startedAt !== null && typeof to === 'string' && this.config.repositories.has(to)) this.refresh(to);
  }

  apiError(code: string): void {
    this.apiErrors.add({ code }, 1);
  }

  /** Takes a repository's figures again; one refresh at a time per repository, one more queued behind it. */
  refresh(name: string): void {
    if (this.closed) return;
    if (this.refreshing.has(name)) {
      this.again.add(name);
      return;
    }
    const repo = this.config.repositories.get(name);
    if (!repo) return;
    const run = this.take(repo)
      .catch((error: unknown) => this.onLog(`metrics: cannot read repository ${name}'s figures: ${(error as Error).message}`))
      .finally(() => {
        this.refreshing.delete(name);
        if (this.again.delete(name)) this.refresh(name);
      });
    this.refreshing.set(name, run);
  }

  private async take(repo: RepositoryConfig): Promise<void> {
    const at = this.now();
    const passphrase = this.passphrase(repo.name);
    const stats = await statsOf(repo, passphrase);
    const { backups } = await listBackups(repo.location, { passphrase });
    const newest = new Map<string, number>();
    for (const b of backups) newest.set(b.name, Math.max(newest.get(b.name) ?? 0, Date.parse(b.endTime)));
    const ordered = [...newest.entries()].sort((a, b) => b[1] - a[1]);
    this.figures.set(repo.name, { at, stats, lastBackup: new Map(ordered.slice(0, MAX_NAMES)), omitted: Math.max(0, ordered.length - MAX_NAMES) });
  }

  /** The exposition text; a repository whose figures are older than REFRESH_MS is refreshed for the next scrape. */
  render(jobs: JobCounts): string {
    const now = this.now();
    for (const name of this.config.repositories.keys()) {
      const taken = this.figures.get(name);
      if (!this.refreshing.has(name) && (taken === undefined || now - taken.at > REFRESH_MS)) this.refresh(name);
    }
    const lines: string[] = [];
    const gauge = (name: string, help: string): Family => new Family(name, 'gauge', help);
    const running = gauge('engine_jobs_running', 'Jobs running now, by repository.');
    const queued = gauge('engine_jobs_queued', 'Jobs waiting for a slot now, by repository.');
    for (const name of this.config.repositories.keys()) {
      const counts = jobs.counts(name);
      running.set({ repository: name }, counts.running);
      queued.set({ repository: name }, counts.queued);
    }
    const repoGauges = {
      storedBytes: gauge('engine_repository_stored_bytes', 'Bytes of the repository\'s packs as last listed.'),
      packs: gauge('engine_repository_packs', 'Packs in the repository as last listed.'),
      backups: gauge('engine_repository_backups', 'Backups (restore points) in the repository\'s catalogue.'),
      logicalBytes: gauge('engine_repository_logical_bytes', 'The disks\' sizes summed over every backup: what restoring every restore point would write.'),
    };
    const takenAt = gauge('engine_repository_stats_timestamp_seconds', 'When the repository\'s figures (stored bytes, packs, backups, last backups) were taken, in seconds since the epoch.');
    const lastSuccess = gauge('engine_backup_last_success_timestamp_seconds', `When each backup name (VM) last had a backup committed, as the repository's catalogue says, in seconds since the epoch; the ${MAX_NAMES} most recent names per repository.`);
    const omitted = gauge('engine_backup_names_omitted', `Backup names of the repository beyond the ${MAX_NAMES} most recent, without a series of their own.`);
    for (const [name, figures] of this.figures) {
      const repository = { repository: name };
      for (const [key, family] of Object.entries(repoGauges)) family.set(repository, Number(figures.stats[key] ?? 0));
      takenAt.set(repository, figures.at / 1000);
      for (const [backupName, end] of figures.lastBackup) lastSuccess.set({ repository: name, name: backupName }, end / 1000);
      omitted.set(repository, figures.omitted);
    }
    const up = gauge('engine_server_start_time_seconds', 'When this server process started, in seconds since the epoch.');
    up.set({}, this.startedAt / 1000);
    const rss = gauge('engine_server_resident_memory_bytes', 'The server process\'s resident set size.');
    rss.set({}, process.memoryUsage.rss());
    for (const family of [this.jobsTotal, this.errors, this.apiErrors, this.readBytes, this.newBytes, this.storedBytes]) writeFamily(lines, family);
    writeHistogram(lines, this.durations);
    for (const family of [running, queued, ...Object.values(repoGauges), takenAt, lastSuccess, omitted, up, rss]) writeFamily(lines, family);
    return `${lines.join('\n')}\n`;
  }
}

export function sendMetrics(res: ServerResponse, text: string): void {
  res.writeHead(200, { 'content-type': METRICS_CONTENT_TYPE, 'content-length': Buffer.byteLength(text), 'cache-control': 'no-store' });
  res.end(text);
}

/** `GET /metrics` for a token of role read (config.metricsAnonymous answers it before authentication: server.ts). */
export function metricsRoute(metrics: ServerMetrics, jobs: JobCounts): Route {
  return {
    method: 'GET',
    path: /^\/metrics$/,
    role: 'read',
    handle: async ({ res, query }: RequestContext) => {
      for (const key of query.keys()) throw new InvalidArgumentError(`unknown query parameter ${JSON.stringify(key.slice(0, 64))}: /metrics takes none`, { field: key.slice(0, 64) });
      sendMetrics(res, metrics.render(jobs));
    },
  };
}
