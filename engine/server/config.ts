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
 *   "limits": { "jobs": 4, "queue": 64,             // jobs running at once in all (default 4); jobs waiting at most
 *               "perHost": 1 },                      // jobs reading or writing one source host at once (default: no limit)
 *   "metrics": { "anonymous": false },              // GET /metrics without a token (default false: a read token)
 *   "repositories": {
 *     "main": { "location": "/srv/backup/main", "passwordFile": "/etc/engine/main.pass", "limits": { "jobs": 2 } },
 *     "offsite": { "location": "s3://bucket/prefix", "s3": { "endpoint": "https://rgw.example:7480",
 *                  "region": "us-east-1", "pathStyle": true, "acl": "bucket-owner-full-control",
 *                  "credentialsFile": "/etc/engine/offsite.aws", "profile": "default", "caFile": "/etc/engine/ca.pem" } }
 *   },
 *   "policies": { "nightly": { "vms": …, "repository": "main", "schedule": "30 1 * * *", … } }   // policies/config.ts
 * }
 *
 * A repository with an `s3` block takes all its S3 settings from it (s3-settings.ts), nothing from the
 * server's environment: two repositories can live on two stores with two users' keys. One without keeps the
 * CLI's rules (the AWS variables and files of the server's environment).
 */
import { readFile } from 'node:fs/promises';
import { dirname, isAbsolute, resolve } from 'node:path';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { formatS3Url, isS3Url, parseS3Url } from '../../repo-format/storage/s3-url.js';
import { parsePolicies, type Policy } from './policies/config.js';

export interface RepositoryConfig {
  name: string;
  /** A folder (absolute after loading) or s3://BUCKET/PREFIX. */
  location: string;
  passwordFile: string | undefined;
  /** Jobs on this repository running at once. */
  jobs: number;
  /** Its own S3 settings (an s3:// location only); undefined: the server's environment, as the CLI. */
  s3: RepositoryS3Config | undefined;
}

/** An s3:// repository's store and keys, from the server's config (the keys from a file it names). */
export interface RepositoryS3Config {
  endpoint: string | undefined;
  region: string;
  pathStyle: boolean | undefined;
  acl: 'bucket-owner-full-control' | undefined;
  /** An AWS shared credentials file (INI: aws_access_key_id, aws_secret_access_key, aws_session_token?). */
  credentialsFile: string;
  /** Its section; default `default`. */
  profile: string;
  caFile: string | undefined;
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
  /** Jobs reading or writing one source host (an NBD server, a libvirt or oVirt host) at once; undefined: no limit (source-hosts.ts). */
  perHost: number | undefined;
  /** GET /metrics: answered without a token (for a scraper that cannot send one); default false. */
  metricsAnonymous: boolean;
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
  const top = object(file, raw, 'the top level', ['stateDir', 'tokensFile', 'limits', 'repositories', 'policies', 'metrics']);
  const limits = top.limits === undefined ? {} : object(file, top.limits, 'limits', ['jobs', 'queue', 'perHost']);
  const jobs = count(file, limits.jobs, 'limits.jobs', DEFAULT_JOBS, 256);
  const repositories = new Map<string, RepositoryConfig>();
  const given = top.repositories ?? {};
  if (typeof given !== 'object' || given === null || Array.isArray(given)) fail(file, 'repositories must be an object: name -> { location, passwordFile?, limits? }');
  const repos = given as Json;
  for (const [name, value] of Object.entries(repos)) {
    if (!REPOSITORY_NAME.test(name)) fail(file, `repository name ${JSON.stringify(name)}: use letters, digits, '.', '_' and '-', at most 64, not starting with '.'`);
    const where = `repositories.${name}`;
    const repo = object(file, value, where, ['location', 'passwordFile', 'limits', 's3']);
    if (typeof repo.location !== 'string' || repo.location === '') fail(file, `${where}.location must be a folder or s3://BUCKET/PREFIX`);
    const location = isS3Url(repo.location) ? repo.location : path(file, repo.location, `${where}.location`);
    const repoLimits = repo.limits === undefined ? {} : object(file, repo.limits, `${where}.limits`, ['jobs']);
    repositories.set(name, {
      name,
      location,
      passwordFile: repo.passwordFile === undefined ? undefined : path(file, repo.passwordFile, `${where}.passwordFile`),
      jobs: count(file, repoLimits.jobs, `${where}.limits.jobs`, jobs, 256),
      s3: repo.s3 === undefined ? undefined : s3Config(file, repo.s3, `${where}.s3`, location),
    });
  }
  if (repositories.size === 0) fail(file, 'no repositories: name at least one under "repositories"');
  // S3 settings are the location's (s3-settings.ts): one location, one set of them.
  const byLocation = new Map<string, string>();
  for (const repo of repositories.values()) {
    if (!isS3Url(repo.location)) continue;
    const key = formatS3Url(parseS3Url(repo.location));
    const other = byLocation.get(key);
    if (other !== undefined && (repo.s3 !== undefined || repositories.get(other)!.s3 !== undefined)) fail(file, `repositories ${other} and ${repo.name} are both at ${key}: S3 settings belong to a location, give it one name`);
    byLocation.set(key, repo.name);
  }
  if (top.stateDir === undefined) fail(file, 'stateDir is required: where the jobs journal is kept');
  return {
    stateDir: path(file, top.stateDir, 'stateDir'),
    tokensFile: top.tokensFile === undefined ? undefined : path(file, top.tokensFile, 'tokensFile'),
    jobs,
    queue: count(file, limits.queue, 'limits.queue', DEFAULT_QUEUE, 100_000),
    repositories,
    policies: parsePolicies(file, top.policies, new Set(repositories.keys())),
    perHost: limits.perHost === undefined ? undefined : count(file, limits.perHost, 'limits.perHost', 1, 256),
    metricsAnonymous: metricsConfig(file, top.metrics).anonymous,
  };
}

function metricsConfig(file: string, value: unknown): { anonymous: boolean } {
  if (value === undefined) return { anonymous: false };
  const metrics = object(file, value, 'metrics', ['anonymous']);
  if (metrics.anonymous !== undefined && typeof metrics.anonymous !== 'boolean') fail(file, 'metrics.anonymous must be true or false');
  return { anonymous: metrics.anonymous === true };
}

/** A repository's `s3` block: keys only from a file (never inline: a config is read by more eyes than a secret should be). */
function s3Config(file: string, value: unknown, where: string, location: string): RepositoryS3Config {
  if (!isS3Url(location)) fail(file, `${where}: only an s3:// location has S3 settings`);
  const s3 = object(file, value, where, ['endpoint', 'region', 'pathStyle', 'acl', 'credentialsFile', 'profile', 'caFile']);
  const optionalText = (key: string): string | undefined => {
    const given = s3[key];
    if (given === undefined) return undefined;
    if (typeof given !== 'string' || given.trim() === '') fail(file, `${where}.${key} must be a non-empty string`);
    return given.trim();
  };
  if (s3.credentialsFile === undefined) fail(file, `${where}.credentialsFile is required: an AWS credentials file (aws_access_key_id, aws_secret_access_key), never keys in this config`);
  if (s3.pathStyle !== undefined && typeof s3.pathStyle !== 'boolean') fail(file, `${where}.pathStyle must be true or false`);
  const acl = optionalText('acl');
  if (acl !== undefined && acl !== 'bucket-owner-full-control') fail(file, `${where}.acl: the one canned ACL the engine sends is bucket-owner-full-control`);
  return {
    endpoint: optionalText('endpoint'),
    region: optionalText('region') ?? 'us-east-1',
    pathStyle: s3.pathStyle as boolean | undefined,
    acl,
    credentialsFile: path(file, s3.credentialsFile, `${where}.credentialsFile`),
    profile: optionalText('profile') ?? 'default',
    caFile: s3.caFile === undefined ? undefined : path(file, s3.caFile, `${where}.caFile`),
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
