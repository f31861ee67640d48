/** The options and argument parsers the commands share, and the input they load (passphrases, oVirt credentials). */
import { parseAsOf } from '../repo-format/v3/as-of.js';
import { Option } from 'commander';
import { InvalidArgumentError } from '../repo-format/errors.js';
import { displayText } from '../repo-format/display-text.js';
import { checkLocalPath } from '../repo-format/local-path.js';
import { formatBytes, parseSize } from '../engine/common/units.js';
import { printNotice } from './context.js';
import type { S3Settings } from '../repo-format/v3/location.js';

export interface GlobalOptions {
  debug?: boolean;
}


export function repoOption(): Option {
  return new Option('--repo <path>', 'repository: a folder, or s3://BUCKET/PREFIX (default: $ENGINE_REPO)').env('ENGINE_REPO');
}

export function requireRepo(repo: string | undefined): string {
  if (!repo) throw new InvalidArgumentError('no repository: give --repo PATH or set ENGINE_REPO');
  return repo;
}

/** Where an s3:// repository's store is, beside the URL (SPEC.md 20.2). Credentials never come from here. */
export interface S3Flags {
  endpoint?: string;
  region?: string;
  caFile?: string;
}

export function endpointOption(): Option {
  return new Option('--endpoint <url>', "S3: the store's URL, https://HOST[:PORT] (RGW, MinIO, Wasabi; path-style requests); default $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS");
}

export function regionOption(): Option {
  return new Option('--region <name>', "S3: the region (default $AWS_REGION, $AWS_DEFAULT_REGION, the profile's, us-east-1)");
}

export function caFileOption(): Option {
  return new Option('--ca-file <file>', "S3: PEM file of the CA that signed the store's certificate (a private CA), trusted instead of the system's").argParser(localPath('--ca-file'));
}

/** The S3 settings of the flags; credentials come from AWS_* variables or the shared credentials file only. */
export function s3Settings(flags: S3Flags): S3Settings {
  return { endpoint: flags.endpoint, region: flags.region, caFile: flags.caFile, onWarning: printNotice };
}

/** Credentials never come from the command line itself: a file, or the environment. */
export function ovirtCredentialsOption(): Option {
  return new Option('--ovirt-credentials <file>', 'file with the oVirt user on its first line and the password on its second (default: $ENGINE_OVIRT_USER and $ENGINE_OVIRT_PASSWORD)');
}

export async function loadCredentials(file: string | undefined): Promise<{ username: string; password: string }> {
  if (file) {
    const { readSecretFile } = await import('../engine/host/secret-file.js');
    const secret = await readSecretFile(file, `--ovirt-credentials ${file}`);
    for (const warning of secret.warnings) printNotice(warning);
    const [username, password] = secret.bytes.toString('utf8').split('\n');
    if (!username || password === undefined) throw new InvalidArgumentError(`${file}: expected the user on the first line and the password on the second`);
    return { username: username.trim(), password: password.replace(/\r$/, '') };
  }
  const username = process.env.ENGINE_OVIRT_USER;
  const password = process.env.ENGINE_OVIRT_PASSWORD;
  if (!username || password === undefined) throw new InvalidArgumentError('oVirt credentials: give --ovirt-credentials FILE or set ENGINE_OVIRT_USER and ENGINE_OVIRT_PASSWORD');
  return { username, password };
}

/** Plain http to oVirt only when the user says so: the flag, or ENGINE_OVIRT_INSECURE_HTTP=1 for a service configured by its environment. */
export function insecureHttpOption(): Option {
  return new Option('--insecure-http', 'with --ovirt: allow an http:// engine (the oVirt password and token cross the network in clear text)');
}

/** How to reach oVirt: the URL checked first (a bad one is said before credentials are asked for), then the credentials. */
export async function ovirtConnection(opts: { ovirt: string; ovirtCredentials?: string; caFile?: string; insecureHttp?: boolean }): Promise<{ url: string; credentials: { username: string; password: string }; caFile: string | undefined; insecureHttp: boolean }> {
  const insecureHttp = opts.insecureHttp === true || process.env.ENGINE_OVIRT_INSECURE_HTTP === '1';
  (await import('../engine/ovirt/url-policy.js')).checkEngineUrl(opts.ovirt, insecureHttp, '--ovirt');
  const credentials = await loadCredentials(opts.ovirtCredentials);
  // Read now under its option's name: an unreadable CA file is a usage error before anything runs.
  if (opts.caFile !== undefined) await (await import('../engine/ovirt/client.js')).readCaFile(opts.caFile, '--ca-file');
  return { url: opts.ovirt, credentials, caFile: opts.caFile, insecureHttp };
}

/** The passphrase of an encrypted repository: never an argument (argv is visible to every user), a file or the environment. */
/** `--as-of TIME` (SPEC.md 20.5): read an S3 repository in a versioned bucket as it was then; parsed to ms since the epoch. */
export function asOfOption(): Option {
  return new Option('--as-of <time>', 'read the S3 repository as it was at this time (ISO 8601, e.g. 2026-12-07T12:00:00Z, or @SECONDS): each object at its newest version then, as a versioned bucket keeps them (Object Lock); read-only').argParser((value: string) => parseAsOf(value));
}

export function passwordFileOption(): Option {
  return new Option('--password-file <file>', 'file holding the passphrase of an encrypted repository (default: $ENGINE_PASSWORD_FILE, else $ENGINE_PASSWORD)');
}

/** The passphrase's bytes (engine/host/passphrase-source.ts: --password-file, $ENGINE_PASSWORD_FILE, $ENGINE_PASSWORD), or undefined. */
export async function loadPassphrase(file: string | undefined): Promise<Buffer | undefined> {
  const { resolvePassphrase } = await import('../engine/host/passphrase-source.js');
  const resolved = await resolvePassphrase({ file, fileLabel: '--password-file' });
  for (const warning of resolved.warnings) printNotice(warning);
  return resolved.passphrase;
}

/** A path option's parser: a URL is refused at parse time (exit 2), never taken for a relative path. */
export function localPath(flag: string): (value: string) => string {
  return (value) => {
    checkLocalPath(value, flag);
    return value;
  };
}

export function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}

/**
 * A whole number in decimal digits only, within bounds: "1e3", "0x10", "5.0", " 5", "+5" are refused
 * (Number() would take them all), and so is anything past `max`.
 */
export function integerParser(flag: string, min: number, max: number): (value: string) => number {
  return (value) => {
    const n = /^[0-9]{1,16}$/.test(value) ? Number(value) : Number.NaN;
    if (!Number.isSafeInteger(n) || n < min || n > max) throw new InvalidArgumentError(`${flag} ${displayText(value, 32)}: give a whole number from ${min} to ${max}, in digits`);
    return n;
  };
}

/** A size (1048576, 256K, 4GiB: parseSize) within bounds, in bytes. */
export function sizeArgument(flag: string, value: string, min: number, max: number): number {
  let bytes: number;
  try {
    bytes = parseSize(value);
  } catch (error) {
    throw new InvalidArgumentError(`${flag} ${(error as Error).message}`);
  }
  if (bytes < min || bytes > max) throw new InvalidArgumentError(`${flag} ${displayText(value, 32)}: give a size from ${formatBytes(min)} to ${formatBytes(max)}`);
  return bytes;
}

/**
 * Worker threads; what they do depends on the command. The default of backup, restore and verify: a job of at most
 * INLINE_MAX_BYTES (block-pool.ts) runs its blocks on the main thread, starting none.
 */
export const SMALL_JOB_WORKERS = 'one per core; none for a job of 16 MiB or less, which the main thread runs';
export function workersOption(work: string, byDefault = SMALL_JOB_WORKERS): Option {
  return new Option('--workers <n>', `worker threads that ${work} (default: ${byDefault})`).argParser(integerParser('--workers', 1, 64));
}

/** "10%", "10" or "12.5%" → 0.1 …; digits and one decimal point only; bounds (0, 100] or [0, 100]. */
export function percentOption(flags: string, description: string, allowZero: boolean): Option {
  const flag = flags.split(' ')[0]!;
  return new Option(flags, description).argParser((v) => {
    const digits = v.endsWith('%') ? v.slice(0, -1) : v;
    const n = /^[0-9]{1,3}(\.[0-9]{1,6})?$/.test(digits) ? Number(digits) : Number.NaN;
    if (!Number.isFinite(n) || n > 100 || n < 0 || (!allowZero && n === 0)) throw new InvalidArgumentError(`${flag} ${displayText(v, 32)}: give a percentage ${allowZero ? 'from 0' : 'above 0'} up to 100%, in digits (e.g. 10% or 12.5%)`);
    return n / 100;
  });
}

/** The chunk cache of serve and mount: up to 64 GiB (0: none). */
export const MAX_CACHE_BYTES = 64 * 1024 ** 3;

/** A retention count: bounded far above any real policy, so that a typo is caught rather than kept. */
export const MAX_KEEP = 1_000_000;

export function countOption(rule: string): Option {
  return new Option(`--keep-${rule} <n>`, `keep ${rule === 'last' ? 'the n newest backups' : `the newest backup of each of the n newest ${rule === 'daily' ? 'days' : rule.replace(/ly$/, 's')} that have one (UTC)`}`).argParser(integerParser(`--keep-${rule}`, 0, MAX_KEEP));
}


