/**
 * Where S3 credentials and the region come from: the standard AWS places, in the AWS CLI's and SDKs'
 * order, and nowhere else (never the command line, where `ps` and shell histories show them):
 *   1. AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN);
 *   2. the shared credentials file, AWS_SHARED_CREDENTIALS_FILE or ~/.aws/credentials, section
 *      [AWS_PROFILE] (default: [default]).
 * The region: AWS_REGION, AWS_DEFAULT_REGION, `region` of the profile in AWS_CONFIG_FILE or ~/.aws/config
 * ([default], or [profile NAME]), else us-east-1. The endpoint: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL.
 * Not supported: instance metadata (IMDS), SSO, web identity and credential_process; a profile that names
 * them is refused with a message that says so.
 */
import { stat } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { FileTooLargeToReadError, readBoundedFile } from '../bounded-read.js';
import { GROUP_OTHER_BITS, formatMode } from '../file-modes.js';
import { isErrnoException } from '../errors.js';
import { StorageError } from './storage-error.js';
import type { Credentials } from './sigv4.js';

/** A credentials or config file holds at most this much: a few profiles are a few hundred bytes. */
const MAX_AWS_FILE_BYTES = 1024 * 1024;

export type Environment = Readonly<Record<string, string | undefined>>;

export interface ResolvedCredentials {
  credentials: Credentials;
  /** Where they came from, for messages (never the secret). */
  source: string;
  /** Said to the user, not fatal: a credentials file other users can read. */
  warnings: string[];
}

/** An INI file as the AWS tools read it: [section] lines, key = value lines, # and ; comments. */
export function parseIni(text: string): Map<string, Map<string, string>> {
  const sections = new Map<string, Map<string, string>>();
  let current: Map<string, string> | undefined;
  for (const raw of text.split(/\r?\n/)) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#') || line.startsWith(';')) continue;
    const section = /^\[\s*([^\]]+?)\s*\]$/.exec(line);
    if (section) {
      current = sections.get(section[1]!) ?? new Map<string, string>();
      sections.set(section[1]!, current);
      continue;
    }
    const pair = /^([^=]+?)\s*=\s*(.*)$/.exec(line);
    if (pair && current) current.set(pair[1]!.toLowerCase(), pair[2]!.replace(/\s+[#;].*$/, '').trim());
  }
  return sections;
}

function authFailure(location: string, message: string): StorageError {
  return new StorageError('auth', `${location}: ${message}`, { location, operation: 'credentials' });
}

async function readAwsFile(path: string, location: string): Promise<{ text: string; mode: number } | undefined> {
  try {
    const [bytes, stats] = await Promise.all([readBoundedFile(path, MAX_AWS_FILE_BYTES), stat(path)]);
    return { text: bytes.toString('utf8'), mode: stats.mode };
  } catch (error) {
    if (isErrnoException(error) && error.code === 'ENOENT') return undefined;
    if (error instanceof FileTooLargeToReadError) throw authFailure(location, `${path} holds ${error.size} bytes: not an AWS credentials or config file`);
    throw authFailure(location, `${path} cannot be read (${isErrnoException(error) ? error.code : String(error)})`);
  }
}

function profileName(env: Environment): string {
  return env.AWS_PROFILE?.trim() || 'default';
}

/** The profile's section of the config file: [default], or [profile NAME]. */
async function configProfile(env: Environment, location: string): Promise<Map<string, string> | undefined> {
  const path = env.AWS_CONFIG_FILE || join(env.HOME || homedir(), '.aws', 'config');
  const file = await readAwsFile(path, location);
  if (!file) return undefined;
  const sections = parseIni(file.text);
  const name = profileName(env);
  return name === 'default' ? (sections.get('default') ?? sections.get('profile default')) : sections.get(`profile ${name}`);
}

export async function resolveCredentials(env: Environment, location: string): Promise<ResolvedCredentials> {
  const id = env.AWS_ACCESS_KEY_ID?.trim();
  const secret = env.AWS_SECRET_ACCESS_KEY?.trim();
  if (id || secret) {
    if (!id || !secret) throw authFailure(location, `${id ? 'AWS_ACCESS_KEY_ID' : 'AWS_SECRET_ACCESS_KEY'} is set but ${id ? 'AWS_SECRET_ACCESS_KEY' : 'AWS_ACCESS_KEY_ID'} is not: set both`);
    const token = env.AWS_SESSION_TOKEN?.trim();
    return { credentials: { accessKeyId: id, secretAccessKey: secret, sessionToken: token || undefined }, source: 'the environment (AWS_ACCESS_KEY_ID)', warnings: [] };
  }
  const path = env.AWS_SHARED_CREDENTIALS_FILE || join(env.HOME || homedir(), '.aws', 'credentials');
  const name = profileName(env);
  const file = await readAwsFile(path, location);
  const section = file ? parseIni(file.text).get(name) : undefined;
  const fromFile = section?.get('aws_access_key_id');
  const secretFromFile = section?.get('aws_secret_access_key');
  if (file && section && fromFile && secretFromFile) {
    const warnings = (file.mode & GROUP_OTHER_BITS) !== 0 ? [`S3 credentials file ${path} is open to other users (mode ${formatMode(file.mode)}): make it private, chmod 600 ${path}`] : [];
    return { credentials: { accessKeyId: fromFile, secretAccessKey: secretFromFile, sessionToken: section.get('aws_session_token') || undefined }, source: `${path} [${name}]`, warnings };
  }
  const config = await configProfile(env, location);
  const unsupported = ['sso_start_url', 'sso_session', 'role_arn', 'web_identity_token_file', 'credential_process'].find((key) => config?.has(key));
  if (unsupported) throw authFailure(location, `profile ${name} takes its credentials from ${unsupported}, which this engine does not support: give an access key in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or in ${path}`);
  if (file && section) throw authFailure(location, `${path} [${name}] has no aws_access_key_id and aws_secret_access_key`);
  throw authFailure(location, `no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or put them in ${path} under [${name}] (AWS_PROFILE chooses another profile)`);
}

export async function resolveRegion(env: Environment, location: string): Promise<string> {
  const fromEnv = env.AWS_REGION?.trim() || env.AWS_DEFAULT_REGION?.trim();
  if (fromEnv) return fromEnv;
  return (await configProfile(env, location))?.get('region') || 'us-east-1';
}

export function endpointFromEnvironment(env: Environment): string | undefined {
  return env.AWS_ENDPOINT_URL_S3?.trim() || env.AWS_ENDPOINT_URL?.trim() || undefined;
}
