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
 *   "limits": { "jobs": 2, "queue": 64 },           // jobs running at once in all (default 2); jobs waiting at most
 *   "repositories": {
 *     "main": { "location": "/srv/backup/main", "passwordFile": "/etc/engine/main.pass", "limits": { "jobs": 2 } }
 *   },
 *   "policies": { "nightly": { "vms": …, "repository": "main", "schedule": "30 1 * * *", … } }   // policies/config.ts
 * }
 */
import { readFile } from 'node:fs/promises';
import { dirname, isAbsolute, resolve } from 'node:path';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { isS3Url } from '../../repo-format/storage/s3-url.js';
import { parsePolicies, type Policy } from './policies/config.js';

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
  /** Scheduled policies (policies/config.ts, SPEC.md 23.1); empty without a `policies` block. */
  policies: Map<string, Policy>;
}

/** Repository names appear in URLs: letters, digits, '.', '_', '-', not starting with '.', at most 64. */
export const REPOSITORY_NAME = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$/;

/**
 * Jobs at once by default: each backup's pipeline holds ~100 MiB (its worker pool's slots, the workers' lz4
 * buffers). Measured, 8 backups of 64 MiB on 2 cores: 2 at a time peak RSS 234 MiB, 4 at a time 337 MiB,
 * 8 at a time 872 MiB (bench/results/server-7e2acb1.md); 2 keeps the server under the engine's 300 MiB and
 * finished first (7.5 s against 8.1 s and 10.8 s): the work is CPU-bound. More is the operator's choice.
 */
const DEFAULT_JOBS = 2;
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
  const top = object(file, raw, 'the top level', ['stateDir', 'tokensFile', 'limits', 'repositories', 'policies']);
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
    policies: parsePolicies(file, top.policies, new Set(repositories.keys())),
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
