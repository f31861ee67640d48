/**
 * Where a repository is: a folder, or `s3://bucket/prefix` (SPEC.md 20.2). Opens its Storage: the folder
 * backend (temporary files beside their targets: a version-3 folder has no tmp/), or the S3 backend with its
 * retries and concurrency limit (openS3Stack). The S3 settings that are not in the URL (endpoint, region,
 * CA file) come from their options or the standard AWS environment; credentials only from the environment
 * or the shared credentials file, never from here.
 */
import { resolve } from 'node:path';
import { InvalidArgumentError } from '../errors.js';
import { LocalStorage } from '../storage/local.js';
import { formatS3Url, isS3Url, parseS3Url } from '../storage/s3-url.js';
import type { Storage } from '../storage/storage.js';
import type { Environment } from '../storage/s3-credentials.js';
import type { S3Storage } from '../storage/s3.js';
import type { Credentials } from '../storage/sigv4.js';

/** The S3 backend under each stack openLocation made: Object Lock and versions are S3's alone (SPEC.md 20.5). */
const s3Backends = new WeakMap<Storage, S3Storage>();

/** The S3 backend of a storage openLocation opened, else undefined (a folder). */
export function s3BackendOf(storage: Storage): S3Storage | undefined {
  return s3Backends.get(storage);
}

export interface S3Settings {
  /** https://HOST[:PORT] of a non-AWS store (RGW, MinIO); default AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, AWS's regional endpoint. */
  endpoint?: string | undefined;
  region?: string | undefined;
  /** PEM file of the CA to trust instead of the system's; default $AWS_CA_BUNDLE. */
  caFile?: string | undefined;
  /** Default process.env. */
  env?: Environment | undefined;
  /** Warnings that are not fatal (a credentials file others can read). */
  onWarning?: ((message: string) => void) | undefined;
  /** Try the bucket and credentials at once (default true; init with --object-lock may create the bucket first). */
  check?: boolean | undefined;
  /** Keys given by the process that owns the location (a server's config): then nothing comes from `env`. */
  credentials?: Credentials | undefined;
  pathStyle?: boolean | undefined;
  /** The canned ACL of every put; default $ENGINE_S3_ACL. */
  cannedAcl?: 'bucket-owner-full-control' | undefined;
}

/**
 * S3 settings a process registered for a location (the server, for each s3:// repository of its config that
 * has its own: SPEC.md 23.x): every openLocation of that location takes them as its defaults, whichever
 * command or job opens it, and reads nothing from the environment. Keyed by the location as formatS3Url
 * writes it.
 */
const registered = new Map<string, S3Settings>();

export function registerS3Settings(where: string, settings: S3Settings): void {
  registered.set(formatS3Url(parseS3Url(where)), { ...settings, env: settings.env ?? {} });
}

/**
 * What this thread registered, for another thread of the process to register too (the server's shared block
 * workers read packs themselves, and a worker has its own copy of this module): plain data only.
 */
export function registeredS3Settings(): [string, S3Settings][] {
  return [...registered].map(([where, { onWarning: _onWarning, ...settings }]) => [where, settings]);
}

function registeredFor(where: string): S3Settings | undefined {
  if (registered.size === 0) return undefined;
  return registered.get(formatS3Url(parseS3Url(where)));
}

export type LocationKind = 'folder' | 's3';

export function locationKind(where: string): LocationKind {
  return isS3Url(where) ? 's3' : 'folder';
}

/** The Storage of the repository at `where`. On S3 the bucket and credentials are checked at once. */
export async function openLocation(where: string, s3: S3Settings = {}): Promise<Storage> {
  if (locationKind(where) === 'folder') return new LocalStorage(resolve(where));
  const own = registeredFor(where);
  if (own) s3 = { ...own, ...Object.fromEntries(Object.entries(s3).filter(([, value]) => value !== undefined)) };
  const env = s3.env ?? process.env;
  // AWS_CA_BUNDLE: the AWS tools' own variable for a private CA, for the commands that have no --ca-file of theirs.
  const caFile = s3.caFile ?? (env.AWS_CA_BUNDLE || undefined);
  // Loaded here, not at the top: a folder's commands do not pay for the S3 client (HTTP, XML, SigV4) at start-up.
  const { openS3Stack } = await import('../storage/s3.js');
  // ENGINE_S3_ACL: a writer that is not the bucket's owner (append-only credentials) gives the owner its objects.
  const acl = s3.cannedAcl ?? (env.ENGINE_S3_ACL || undefined);
  if (acl !== undefined && acl !== 'bucket-owner-full-control') throw new InvalidArgumentError(`ENGINE_S3_ACL=${acl.slice(0, 40)}: the one canned ACL the engine sends is bucket-owner-full-control`);
  const { storage, backend } = await openS3Stack({ url: where, endpoint: s3.endpoint, region: s3.region, caFile, env, onWarning: s3.onWarning, check: s3.check, cannedAcl: acl, credentials: s3.credentials, pathStyle: s3.pathStyle });
  s3Backends.set(storage, backend);
  return storage;
}
