/**
 * The server's configuration file (JSON): the repositories it owns, by name, and the job limits. Secrets are
 * never in it: a repository's passphrase is named by the file that holds it (`passwordFile`), S3 credentials
 * come from the standard AWS places of the server's environment (repo-format/storage/s3-credentials.ts), and
 * the bearer tokens live hashed in their own file (`tokensFile`, auth.ts). Relative paths are relative to the
 * config file. Unknown fields are refused: a typo ("passwrdFile") must not silently mean "no passphrase".
 *
 * {
 *   "stateDir": "/var/lib/engine-server",          // the jobs' journal (journal.ts); created 0700
 *   "tokensFile": "/etc/engine/tokens",             // optional: bearer tokens (auth.ts)
 *   "limits": { "jobs": 4, "queue": 64 },           // jobs running at once in all (default 4); jobs waiting at most
 *   "repositories": {
 *     "main": { "location": "/srv/backup/main", "passwordFile": "/etc/engine/main.pass", "limits": { "jobs": 2 } }
 *   }
 * }
 */
import { readFile } from 'node:fs/promises';
import { dirname, isAbsolute, resolve } from 'node:path';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { isS3Url } from '../../repo-format/storage/s3-url.js';

export interface RepositoryConfig {
  name: string;
  /** A folder (absolute after loading) or s3://BUCKET/PREFIX. */
  location: string;
  passwordFile: string | undefined;
  /** Jobs on this repository running at once. */
  jobs: number;
}

export interface ServerConfig {
  stateDir: string;
  tokensFile: string | undefined;
  /** Jobs running at once, all repositories together. */
  jobs: number;
  /** Jobs waiting for a slot at most; one more is refused (429). */
  queue: number;
  repositories: Map<string, RepositoryConfig>;
}

/** Repository names appear in URLs: letters, digits, '.', '_', '-', not starting with '.', at most 64. */
export const REPOSITORY_NAME = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$/;

/**
 * Jobs at once by default. With a worker pool per job each running backup held ~100 MiB and 2 was the most under
 * the engine's 300 MiB (bench/results/server-7e2acb1.md). All jobs now share one pool and one arena of slots
 * (engine/pipeline/shared-pool.ts: 2 × 64 MiB up to 8 jobs), so concurrency costs little memory: 8 backups of 64 MiB
 * on 2 cores peaked at 262 MiB with 2 at a time, 265 MiB with 4, 265 MiB with 8, and took 7.6, 6.5 and 6.5-7.0 s
 * (bench/results/server-cf9f32a.md). 4: a small job starts beside two big ones instead of queueing behind them,
 * with room under 300 MiB for what a big job holds on the main thread (not measured at 4 big ones). More is the
 * operator's choice; beyond 8 the arena grows by 16 MiB a job.
 */
const DEFAULT_JOBS = 4;
const DEFAULT_QUEUE = 64;
const MAX_CONFIG_BYTES = 1024 * 1024;

type Json = Record<string, unknown>;

function fail(file: string, message: string): never {
  throw new InvalidArgumentError(`server config ${file}: ${message}`, { path: file });
}

function object(file: string, value: unknown, where: string, allowed: readonly string[]): Json {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) fail(file, `${where} must be an object`);
  const unknown = Object.keys(value).filter((k) => !allowed.includes(k));
  if (unknown.length > 0) fail(file, `${where} has unknown field ${JSON.stringify(unknown[0])} (known: ${allowed.join(', ')})`);
  return value as Json;
}

function count(file: string, value: unknown, where: string, fallback: number, max: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1 || value > max) fail(file, `${where} must be an integer from 1 to ${max}`);
  return value;
}

function path(file: string, value: unknown, where: string): string {
  if (typeof value !== 'string' || value === '') fail(file, `${where} must be a path`);
  return isAbsolute(value) ? value : resolve(dirname(file), value);
}

export function parseConfig(file: string, text: string): ServerConfig {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (error) {
    fail(file, `not JSON (${(error as Error).message})`);
  }
  const top = object(file, raw, 'the top level', ['stateDir', 'tokensFile', 'limits', 'repositories']);
  const limits = top.limits === undefined ? {} : object(file, top.limits, 'limits', ['jobs', 'queue']);
  const jobs = count(file, limits.jobs, 'limits.jobs', DEFAULT_JOBS, 256);
  const repositories = new Map<string, RepositoryConfig>();
  const given = top.repositories ?? {};
  if (typeof given !== 'object' || given === null || Array.isArray(given)) fail(file, 'repositories must be an object: name -> { location, passwordFile?, limits? }');
  const repos = given as Json;
  for (const [name, value] of Object.entries(repos)) {
    if (!REPOSITORY_NAME.test(name)) fail(file, `repository name ${JSON.stringify(name)}: use letters, digits, '.', '_' and '-', at most 64, not starting with '.'`);
    const where = `repositories.${name}`;
    const repo = object(file, value, where, ['location', 'passwordFile', 'limits']);
    if (typeof repo.location !== 'string' || repo.location === '') fail(file, `${where}.location must be a folder or s3://BUCKET/PREFIX`);
    const location = isS3Url(repo.location) ? repo.location : path(file, repo.location, `${where}.location`);
    const repoLimits = repo.limits === undefined ? {} : object(file, repo.limits, `${where}.limits`, ['jobs']);
    repositories.set(name, {
      name,
      location,
      passwordFile: repo.passwordFile === undefined ? undefined : path(file, repo.passwordFile, `${where}.passwordFile`),
      jobs: count(file, repoLimits.jobs, `${where}.limits.jobs`, jobs, 256),
    });
  }
  if (repositories.size === 0) fail(file, 'no repositories: name at least one under "repositories"');
  if (top.stateDir === undefined) fail(file, 'stateDir is required: where the jobs journal is kept');
  return {
    stateDir: path(file, top.stateDir, 'stateDir'),
    tokensFile: top.tokensFile === undefined ? undefined : path(file, top.tokensFile, 'tokensFile'),
    jobs,
    queue: count(file, limits.queue, 'limits.queue', DEFAULT_QUEUE, 100_000),
    repositories,
  };
}

export async function loadConfig(file: string): Promise<ServerConfig> {
  const absolute = resolve(file);
  let text: string;
  try {
    const bytes = await readFile(absolute);
    if (bytes.length > MAX_CONFIG_BYTES) fail(absolute, `larger than ${MAX_CONFIG_BYTES} bytes`);
    text = bytes.toString('utf8');
  } catch (error) {
    if (error instanceof InvalidArgumentError) throw error;
    fail(absolute, `cannot read it (${(error as NodeJS.ErrnoException).code ?? (error as Error).message})`);
  }
  return parseConfig(absolute, text);
}
