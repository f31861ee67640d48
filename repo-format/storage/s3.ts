/**
 * The S3 backend: a repository under `prefix/` in a bucket of AWS S3 or of any store that speaks its API
 * (Ceph RADOS Gateway, MinIO, Wasabi), through our own SigV4 client over node:https (s3-client.ts; why not
 * the AWS SDK: README.md here).
 *
 * - put: one PUT with Content-MD5 (the store refuses a body that changed on the way: BadDigest); over plain
 *   http the payload's SHA-256 is signed too. Above `multipartThreshold` (64 MiB; packs are 32 MiB) a
 *   multipart upload, each part with its Content-MD5, aborted on failure, its size checked at the end.
 *   `ifAbsent` sends If-None-Match: * (RGW 16.2, AWS since 2024, MinIO: 412 when the key exists); objects
 *   created that way are at most `multipartThreshold`.
 * - get: a ranged GET answers exactly the bytes asked or fails (out-of-range when the object is shorter:
 *   Content-Range tells its size); a whole-object GET of an object stored by one PUT is checked against
 *   its ETag, the MD5 of its bytes (not for SSE-KMS/SSE-C objects, whose ETag is something else).
 * - stat and list give `modified` from Last-Modified / LastModified (the store's clock, whole seconds).
 * - stat: HEAD; a 404 without a body is told apart (missing object, missing bucket) by a HEAD of the bucket.
 * - list: ListObjectsV2, 1000 keys a page, one page in memory at a time, keys URL-encoded on the wire.
 * - delete: DELETE; S3 answers 204 for an absent key too.
 * Each call is one attempt: retries and the concurrency limit are decorators (openStorage wraps them).
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { stat as statFile } from 'node:fs/promises';
import { readBoundedFile } from '../bounded-read.js';
import { InvalidArgumentError, isErrnoException } from '../errors.js';
import { S3Client, MAX_XML_BODY, type RequestBody, type S3Answer } from './s3-client.js';
import { endpointFromEnvironment, resolveCredentials, resolveRegion, type Environment } from './s3-credentials.js';
import { s3Failure, type S3Context } from './s3-errors.js';
import { formatS3Url, parseS3Url, type S3Location } from './s3-url.js';
import {
  completeMultipartBody,
  MalformedXmlError,
  parseErrorDocument,
  parseListPage,
  parseObjectLockEnabled,
  parseRetention,
  parseUploadId,
  parseUploadsPage,
  parseVersioningStatus,
  parseVersionsPage,
  retentionBody,
  rootElement,
  type ObjectVersion,
} from './s3-xml.js';
import { EMPTY_SHA256, UNSIGNED_PAYLOAD, type Credentials } from './sigv4.js';
import { withRetriesAndLimit, type StackOptions } from './stack.js';
import type { RetryingStorage } from './retry.js';
import { StorageError } from './storage-error.js';
import {
  checkKey,
  checkPrefix,
  checkRange,
  DEFAULT_MAX_GET_SIZE,
  keyProblem,
  MAX_KEY_BYTES,
  type CallOptions,
  type GetOptions,
  type ListOptions,
  type ObjectInfo,
  type PutOptions,
  type PutSource,
  type Storage,
  type StorageProperties,
  type StoreTime,
} from './storage.js';

export interface S3StorageOptions {
  /** s3://bucket/prefix */
  url: string;
  /** The store's URL (https://rgw.example:7480); default AWS's regional endpoint. Also AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL. */
  endpoint?: string | undefined;
  /** Default: AWS_REGION, AWS_DEFAULT_REGION, the profile's region, us-east-1. */
  region?: string | undefined;
  /** Default: path-style whenever an endpoint is given (non-AWS stores), and for bucket names with dots. */
  pathStyle?: boolean | undefined;
  /** A PEM file of CA certificates to trust instead of the system's (a private CA). */
  caFile?: string | undefined;
  /** For library callers; the CLI never takes credentials as arguments (they come from the environment or ~/.aws). */
  credentials?: Credentials | undefined;
  /** Where credentials and the region are looked up; default process.env. */
  env?: Environment | undefined;
  /** Plain http to a host other than loopback sends data and the access key in clear: refused unless this is set. */
  allowInsecureHttp?: boolean | undefined;
  /** Connections kept open to the store; default 8. */
  connections?: number | undefined;
  /** Objects larger than this go up in parts; default 64 MiB. */
  multipartThreshold?: number | undefined;
  /** Default 16 MiB (S3: at least 5 MiB, at most 10,000 parts). */
  partSize?: number | undefined;
  /** A request whose connection moves no byte this long fails (transient); default 60 s. */
  idleTimeoutMs?: number | undefined;
  /** Objects (a listing) or uploads (a sweep) asked for per page; default 1000, S3's most (tests: a few, to page). */
  listPage?: number | undefined;
  /** Checks at once that the bucket exists and these credentials can list it (default true). */
  check?: boolean | undefined;
  /** Told what the user should hear but is not fatal (a credentials file open to others). */
  onWarning?: ((message: string) => void) | undefined;
  /** This host's clock as the requests are signed with it (default Date.now): for tests of clock skew. */
  now?: (() => number) | undefined;
  /**
   * A canned ACL every put carries (x-amz-acl): `bucket-owner-full-control` for a writer that is not the
   * bucket's owner (append-only credentials, SPEC.md 20.5), whose objects the owner's gc and prune must
   * then read and delete; stores without object ownership controls (Ceph RGW) give each object to its
   * writer otherwise. Default none.
   */
  cannedAcl?: 'bucket-owner-full-control' | undefined;
}

export const S3_DEFAULTS = {
  connections: 8,
  multipartThreshold: 64 * 1024 * 1024,
  partSize: 16 * 1024 * 1024,
  idleTimeoutMs: 60_000,
  listPage: 1000,
} as const;

const MIN_PART_SIZE = 5 * 1024 * 1024;
const MAX_PARTS = 10_000;
/** S3's largest object. */
const MAX_OBJECT_SIZE = 5 * 1024 ** 4;
const MAX_CA_FILE_BYTES = 1024 * 1024;

function md5Base64(bytes: Uint8Array): string {
  return createHash('md5').update(bytes).digest('base64');
}

async function fileDigests(file: string, offset: number, length: number, sha256: boolean): Promise<{ md5: string; sha256: string | undefined }> {
  const md5 = createHash('md5');
  const sha = sha256 ? createHash('sha256') : undefined;
  if (length > 0) {
    for await (const chunk of createReadStream(file, { start: offset, end: offset + length - 1, highWaterMark: 4 * 1024 * 1024 })) {
      md5.update(chunk as Buffer);
      sha?.update(chunk as Buffer);
    }
  }
  return { md5: md5.digest('base64'), sha256: sha?.digest('hex') };
}

function isLoopback(hostname: string): boolean {
  const host = hostname.replace(/^\[|\]$/g, '');
  return host === 'localhost' || host === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host);
}

/** The store's base URL, checked: http(s) only, nothing secret in it, plain http only on loopback unless allowed. */
export function checkEndpoint(text: string, allowInsecureHttp: boolean): URL {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new InvalidArgumentError(`S3 endpoint ${JSON.stringify(text.slice(0, 200))} is not a URL (the form is https://HOST[:PORT])`);
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') throw new InvalidArgumentError(`S3 endpoint ${url.href}: only https:// (or http:// on this machine) is supported`);
  if (url.username || url.password) throw new InvalidArgumentError('S3 endpoint: credentials do not go in the URL; they come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws/credentials');
  if (url.search || url.hash) throw new InvalidArgumentError(`S3 endpoint ${url.origin}: a query or fragment has no meaning here`);
  if (url.protocol === 'http:' && !isLoopback(url.hostname) && !allowInsecureHttp) {
    throw new InvalidArgumentError(`S3 endpoint ${url.origin} is plain http to another host: the data and the access key would cross the network in clear; use https (with --ca-file for a private CA)`);
  }
  return url;
}

/** Opens an S3 storage: the options resolved and, unless `check: false`, the bucket and credentials tried. */
export async function openS3Storage(options: S3StorageOptions): Promise<S3Storage> {
  const location = parseS3Url(options.url);
  const shown = formatS3Url(location);
  const env = options.env ?? process.env;
  const region = options.region?.trim() || (await resolveRegion(env, shown));
  const endpointText = options.endpoint ?? endpointFromEnvironment(env);
  const endpoint = checkEndpoint(endpointText ?? `https://s3.${region}.amazonaws.com`, options.allowInsecureHttp === true);
  const pathStyle = options.pathStyle ?? (endpointText !== undefined || location.bucket.includes('.'));
  let credentials = options.credentials;
  if (!credentials) {
    const resolved = await resolveCredentials(env, shown);
    for (const warning of resolved.warnings) options.onWarning?.(warning);
    credentials = resolved.credentials;
  }
  let ca: Buffer | undefined;
  if (options.caFile) {
    ca = await readBoundedFile(options.caFile, MAX_CA_FILE_BYTES).catch((error: unknown) => {
      throw new InvalidArgumentError(`--ca-file ${options.caFile}: cannot be read (${isErrnoException(error) ? error.code : (error as Error).message})`);
    });
    if (!ca.toString('latin1').includes('-----BEGIN CERTIFICATE-----')) throw new InvalidArgumentError(`--ca-file ${options.caFile}: holds no PEM certificate`);
  }
  const partSize = options.partSize ?? S3_DEFAULTS.partSize;
  if (!Number.isSafeInteger(partSize) || partSize < MIN_PART_SIZE) throw new InvalidArgumentError(`S3 part size ${partSize}: at least ${MIN_PART_SIZE} bytes (S3's minimum)`);
  const listPage = options.listPage ?? S3_DEFAULTS.listPage;
  if (!Number.isSafeInteger(listPage) || listPage < 1 || listPage > S3_DEFAULTS.listPage) throw new InvalidArgumentError(`S3 listing page ${listPage}: 1 to ${S3_DEFAULTS.listPage}`);
  const storage = new S3Storage(location, {
    endpoint,
    pathStyle,
    region,
    credentials,
    ca,
    connections: options.connections ?? S3_DEFAULTS.connections,
    idleTimeoutMs: options.idleTimeoutMs ?? S3_DEFAULTS.idleTimeoutMs,
    multipartThreshold: options.multipartThreshold ?? S3_DEFAULTS.multipartThreshold,
    partSize,
    listPage,
    signPayload: endpoint.protocol === 'http:' && !isLoopback(endpoint.hostname),
    now: options.now,
    cannedAcl: options.cannedAcl,
  });
  if (options.check !== false) {
    try {
      await storage.check();
    } catch (error) {
      await storage.close();
      throw error;
    }
  }
  return storage;
}

/**
 * The S3 backend as the engine uses it: retries (transient failures only) around a concurrency limit
 * (`connections`) around the store, the opening check retried like any call. `backend` is the store itself,
 * for its traffic counters.
 */
export async function openS3Stack(options: S3StorageOptions & StackOptions): Promise<{ storage: RetryingStorage; backend: S3Storage }> {
  const backend = await openS3Storage({ ...options, check: false });
  const storage = withRetriesAndLimit(backend, options);
  if (options.check !== false) {
    try {
      await storage.retry('check', '', undefined, () => backend.check());
    } catch (error) {
      await storage.close();
      throw error;
    }
  }
  return { storage, backend };
}

interface S3StorageSettings {
  endpoint: URL;
  pathStyle: boolean;
  region: string;
  credentials: Credentials;
  ca: Buffer | undefined;
  connections: number;
  idleTimeoutMs: number;
  multipartThreshold: number;
  partSize: number;
  listPage: number;
  /** Sign the body's SHA-256 (plain http to another host), else UNSIGNED-PAYLOAD. */
  signPayload: boolean;
  now?: (() => number) | undefined;
  cannedAcl?: string | undefined;
}

/** How the engine locks what it writes (SPEC.md 20.5): the mode and how long from each write. */
export interface ObjectLockWrite {
  mode: 'COMPLIANCE' | 'GOVERNANCE';
  retentionMs: number;
  /** Keys written without a lock (leases: rewritten every T/3, they protect nothing). */
  exempt?: ((key: string) => boolean) | undefined;
}

export class S3Storage implements Storage {
  readonly properties: StorageProperties;
  readonly client: S3Client;
  readonly bucket: string;
  private readonly root: string;
  /** Set once the repository's config says so (setObjectLock): every put then carries the lock headers. */
  private lock: ObjectLockWrite | undefined;

  constructor(
    location: S3Location,
    private readonly settings: S3StorageSettings,
  ) {
    this.bucket = location.bucket;
    this.root = location.prefix === '' ? '' : `${location.prefix}/`;
    const shown = formatS3Url(location);
    this.properties = {
      location: shown,
      // If-None-Match: * on PUT: AWS (since 2024-08), Ceph RGW (16.2 here, checked by the conformance suite), MinIO.
      atomicCreate: true,
      // AWS S3 is strongly consistent for lists since 2020-12; RGW updates its bucket index with the write.
      consistentListing: true,
      objectLock: true,
      connections: settings.connections,
      maxObjectSize: MAX_OBJECT_SIZE,
    };
    this.client = new S3Client({
      endpoint: settings.endpoint,
      pathStyle: settings.pathStyle,
      region: settings.region,
      credentials: settings.credentials,
      ca: settings.ca,
      connections: settings.connections,
      idleTimeoutMs: settings.idleTimeoutMs,
      location: shown,
      now: settings.now,
    });
  }

  private objectKey(key: string): string {
    const full = `${this.root}${key}`;
    if (Buffer.byteLength(full, 'utf8') > MAX_KEY_BYTES) throw new InvalidArgumentError(`storage key ${key.slice(0, 100)}… is longer than S3 allows with the prefix (${MAX_KEY_BYTES} bytes)`);
    return full;
  }

  private context(operation: string, key?: string): S3Context {
    return { location: this.properties.location, operation, key };
  }

  /**
   * From now on every put (but of the exempt keys) carries x-amz-object-lock-mode and
   * x-amz-object-lock-retain-until-date = this host's clock + the retention (SPEC.md 20.5); undefined stops it.
   * Locked PUTs need Content-MD5 (or an x-amz-checksum-*): every put here sends it anyway.
   */
  setObjectLock(lock: ObjectLockWrite | undefined): void {
    this.lock = lock;
  }

  get objectLockWrite(): ObjectLockWrite | undefined {
    return this.lock;
  }

  private lockHeaders(key: string): Record<string, string> {
    const acl: Record<string, string> = this.settings.cannedAcl ? { 'x-amz-acl': this.settings.cannedAcl } : {};
    const lock = this.lock;
    if (!lock || lock.exempt?.(key)) return acl;
    const until = (this.settings.now ?? Date.now)() + lock.retentionMs;
    return { ...acl, 'x-amz-object-lock-mode': lock.mode, 'x-amz-object-lock-retain-until-date': new Date(until).toISOString() };
  }

  private versionQuery(options: CallOptions): [string, string][] | undefined {
    return options.versionId === undefined ? undefined : [['versionId', options.versionId]];
  }

  /**
   * Every version and delete marker under `prefix` (ListObjectVersions, a page at a time), by key and
   * newest first within a key; keys relative to the root. Keys outside the rule are yielded as they are.
   */
  async *listVersions(prefix: string, options: CallOptions = {}): AsyncIterable<ObjectVersion> {
    checkPrefix(prefix);
    const context = this.context('list versions', prefix || '(all)');
    let markers: { key: string; versionId: string | undefined } | undefined;
    for (;;) {
      const query: [string, string][] = [
        ['versions', ''],
        ['max-keys', String(this.settings.listPage)],
        ['prefix', `${this.root}${prefix}`],
        ['encoding-type', 'url'],
      ];
      if (markers) {
        query.push(['key-marker', markers.key]);
        if (markers.versionId) query.push(['version-id-marker', markers.versionId]);
      }
      const answer = await this.client.request({ method: 'GET', bucket: this.bucket, query, payloadHash: EMPTY_SHA256, response: { kind: 'text', maxSize: MAX_XML_BODY }, context, signal: options.signal });
      const page = this.xml(() => parseVersionsPage(answer.body.toString('utf8')), context);
      for (const version of page.versions) {
        if (!version.key.startsWith(this.root)) throw new StorageError('protocol', `${context.location}: list versions: the store listed ${version.key.slice(0, 200)}, outside the prefix asked`, { ...context });
        yield { ...version, key: version.key.slice(this.root.length) };
      }
      if (!page.truncated) return;
      markers = { key: page.nextKeyMarker!, versionId: page.nextVersionIdMarker };
    }
  }

  /** A version's Object Lock retention (GetObjectRetention), or undefined when it carries none. */
  async retention(key: string, options: CallOptions = {}): Promise<{ mode: string; until: number } | undefined> {
    checkKey(key);
    const context = this.context('get retention', key);
    try {
      const answer = await this.client.request({ method: 'GET', bucket: this.bucket, objectKey: this.objectKey(key), query: [['retention', ''], ...(this.versionQuery(options) ?? [])], payloadHash: EMPTY_SHA256, response: { kind: 'text', maxSize: MAX_XML_BODY }, context, signal: options.signal });
      return this.xml(() => parseRetention(answer.body.toString('utf8')), context);
    } catch (error) {
      if (error instanceof StorageError && error.reason === 'not-found' && error.storage.backendCode !== 'NoSuchKey' && error.storage.backendCode !== 'NoSuchVersion') return undefined;
      throw error;
    }
  }

  /** Sets a version's retention (PutObjectRetention, with its Content-MD5): S3 lets a locked date only grow. */
  async setRetention(key: string, mode: string, until: number, options: CallOptions = {}): Promise<void> {
    checkKey(key);
    const context = this.context('put retention', key);
    const xml = Buffer.from(retentionBody(mode, until), 'utf8');
    await this.client.request({
      method: 'PUT',
      bucket: this.bucket,
      objectKey: this.objectKey(key),
      query: [['retention', ''], ...(this.versionQuery(options) ?? [])],
      headers: { 'content-md5': md5Base64(xml), 'content-type': 'application/xml' },
      body: { bytes: xml },
      payloadHash: createHash('sha256').update(xml).digest('hex'),
      response: { kind: 'discard' },
      context,
      signal: options.signal,
    });
  }

  /** Whether the bucket has Object Lock enabled and its versioning status (Enabled, Suspended, or undefined). */
  async bucketProtection(options: CallOptions = {}): Promise<{ objectLock: boolean; versioning: string | undefined }> {
    const context = this.context('bucket settings');
    let objectLock = false;
    try {
      const answer = await this.client.request({ method: 'GET', bucket: this.bucket, query: [['object-lock', '']], payloadHash: EMPTY_SHA256, response: { kind: 'text', maxSize: MAX_XML_BODY }, context, signal: options.signal });
      objectLock = this.xml(() => parseObjectLockEnabled(answer.body.toString('utf8')), context);
    } catch (error) {
      if (!(error instanceof StorageError && error.reason === 'not-found' && error.storage.backendCode !== 'NoSuchBucket')) throw error;
    }
    const answer = await this.client.request({ method: 'GET', bucket: this.bucket, query: [['versioning', '']], payloadHash: EMPTY_SHA256, response: { kind: 'text', maxSize: MAX_XML_BODY }, context, signal: options.signal });
    return { objectLock, versioning: this.xml(() => parseVersioningStatus(answer.body.toString('utf8')), context) };
  }

  /** Creates the bucket (CreateBucket), with Object Lock enabled (and so versioning) when asked. */
  async createBucket(options: CallOptions & { objectLock?: boolean } = {}): Promise<void> {
    const context = this.context('create bucket');
    const region = this.settings.region;
    const xml = region === 'us-east-1' ? undefined : Buffer.from(`<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><LocationConstraint>${region}</LocationConstraint></CreateBucketConfiguration>`, 'utf8');
    await this.client.request({
      method: 'PUT',
      bucket: this.bucket,
      headers: { ...(options.objectLock ? { 'x-amz-bucket-object-lock-enabled': 'true' } : {}), ...(xml ? { 'content-type': 'application/xml' } : {}) },
      body: xml ? { bytes: xml } : undefined,
      payloadHash: xml ? createHash('sha256').update(xml).digest('hex') : EMPTY_SHA256,
      response: { kind: 'discard' },
      context,
      signal: options.signal,
    });
  }

  /** A one-key listing of the repository's prefix: the cheapest request that proves bucket and credentials. */
  private probe(operation: string, signal: AbortSignal | undefined): Promise<S3Answer> {
    return this.client.request({
      method: 'GET',
      bucket: this.bucket,
      query: [['list-type', '2'], ['max-keys', '1'], ['prefix', this.root]],
      payloadHash: EMPTY_SHA256,
      response: { kind: 'text', maxSize: MAX_XML_BODY },
      context: this.context(operation),
      signal,
    });
  }

  /** The bucket exists and these credentials may list the repository's prefix. */
  async check(options: CallOptions = {}): Promise<void> {
    await this.probe('check', options.signal);
  }

  /** The store's clock from the Date header of a probe. */
  async time(options: CallOptions = {}): Promise<StoreTime> {
    const now = this.settings.now ?? Date.now;
    const sent = now();
    const answer = await this.probe('time', options.signal);
    const received = now();
    const storeMs = typeof answer.headers.date === 'string' ? Date.parse(answer.headers.date) : NaN;
    if (!Number.isFinite(storeMs)) throw new StorageError('protocol', `${this.properties.location}: time: the answer's Date header is ${JSON.stringify(answer.headers.date ?? null)}`, { ...this.context('time'), status: answer.status });
    // The Date header is truncated to the second: the store's true time lies in [storeMs, storeMs + 1000).
    return { storeMs: storeMs + 500, localMs: (sent + received) / 2, uncertaintyMs: (received - sent) / 2 + 500 };
  }

  async put(key: string, source: PutSource, options: PutOptions = {}): Promise<void> {
    checkKey(key);
    const objectKey = this.objectKey(key);
    const context = this.context('put', key);
    const size = source instanceof Uint8Array ? source.byteLength : await fileSize(source.file, context);
    if (size > this.properties.maxObjectSize) throw new InvalidArgumentError(`${this.properties.location}: ${key} would hold ${size} bytes, more than S3 stores in one object`);
    if (size > this.settings.multipartThreshold) {
      if (options.ifAbsent) throw new InvalidArgumentError(`${this.properties.location}: create-if-absent is for objects up to ${this.settings.multipartThreshold} bytes; ${key} holds ${size}`);
      return this.putMultipart(objectKey, source, size, context, options.signal, this.lockHeaders(key));
    }
    const body: RequestBody = source instanceof Uint8Array ? { bytes: source } : { file: source.file, offset: 0, length: size };
    // The writer's MD5 of the file spares reading it twice (once to hash, once to send): measured in README.md.
    const digests = !(source instanceof Uint8Array) && source.md5 !== undefined && !this.settings.signPayload ? { md5: source.md5, payloadHash: UNSIGNED_PAYLOAD } : await this.digests(body);
    await this.client.request({
      method: 'PUT',
      bucket: this.bucket,
      objectKey,
      headers: { 'content-md5': digests.md5, 'content-type': 'application/octet-stream', ...(options.ifAbsent ? { 'if-none-match': '*' } : {}), ...this.lockHeaders(key) },
      body,
      payloadHash: digests.payloadHash,
      response: { kind: 'discard' },
      context,
      signal: options.signal,
    });
  }

  /**
   * Content-MD5 always (the store refuses a body that changed on the way). The payload's SHA-256 is signed
   * too only on plain http to another host (allowInsecureHttp), where someone on the path could change the
   * body and its MD5 together; over TLS, or on this machine, it would only cost a second hash here and a
   * third in the store (measured: README.md).
   */
  private async digests(body: RequestBody): Promise<{ md5: string; payloadHash: string }> {
    const signPayload = this.settings.signPayload;
    if ('bytes' in body) {
      return { md5: md5Base64(body.bytes), payloadHash: signPayload ? createHash('sha256').update(body.bytes).digest('hex') : UNSIGNED_PAYLOAD };
    }
    const digests = await fileDigests(body.file, body.offset, body.length, signPayload);
    return { md5: digests.md5, payloadHash: digests.sha256 ?? UNSIGNED_PAYLOAD };
  }

  private async putMultipart(objectKey: string, source: PutSource, size: number, context: S3Context, signal: AbortSignal | undefined, lockHeaders: Record<string, string>): Promise<void> {
    const partSize = Math.max(this.settings.partSize, Math.ceil(size / MAX_PARTS));
    const started = await this.client.request({
      method: 'POST',
      bucket: this.bucket,
      objectKey,
      query: [['uploads', '']],
      headers: { 'content-type': 'application/octet-stream', ...lockHeaders },
      payloadHash: EMPTY_SHA256,
      response: { kind: 'text', maxSize: MAX_XML_BODY },
      context: { ...context, operation: 'put (start multipart)' },
      signal,
    });
    const uploadId = this.xml(() => parseUploadId(started.body.toString('utf8')), context);
    try {
      const parts: { number: number; etag: string }[] = [];
      for (let offset = 0, number = 1; offset < size; offset += partSize, number += 1) {
        const length = Math.min(partSize, size - offset);
        const body: RequestBody = source instanceof Uint8Array ? { bytes: source.subarray(offset, offset + length) } : { file: source.file, offset, length };
        const digests = await this.digests(body);
        const answer = await this.client.request({
          method: 'PUT',
          bucket: this.bucket,
          objectKey,
          query: [['partNumber', String(number)], ['uploadId', uploadId]],
          headers: { 'content-md5': digests.md5 },
          body,
          payloadHash: digests.payloadHash,
          response: { kind: 'discard' },
          context: { ...context, operation: `put (part ${number})` },
          signal,
        });
        const etag = answer.headers.etag;
        if (typeof etag !== 'string' || etag === '') throw new StorageError('protocol', `${context.location}: put ${context.key}: part ${number} was stored without an ETag`, { ...context });
        parts.push({ number, etag });
      }
      const xml = Buffer.from(completeMultipartBody(parts), 'utf8');
      const completed = await this.client.request({
        method: 'POST',
        bucket: this.bucket,
        objectKey,
        query: [['uploadId', uploadId]],
        headers: { 'content-md5': md5Base64(xml), 'content-type': 'application/xml' },
        body: { bytes: xml },
        payloadHash: createHash('sha256').update(xml).digest('hex'),
        response: { kind: 'text', maxSize: MAX_XML_BODY },
        context: { ...context, operation: 'put (complete multipart)' },
        signal,
      });
      // S3 may answer 200 and put the failure in the body.
      const text = completed.body.toString('utf8');
      if (rootElement(text) === 'Error') throw s3Failure({ ...context, operation: 'put (complete multipart)' }, 200, parseErrorDocument(text));
      // Ceph RGW may answer an empty ETag here: the size is what is checked.
      const stored = await this.stat(context.key!, { signal });
      if (stored.size !== size) throw new StorageError('integrity', `${context.location}: put ${context.key}: the store holds ${stored.size} bytes after the multipart upload of ${size}`, { ...context }, { transient: true });
    } catch (error) {
      // Parts of an upload that is neither completed nor aborted are billed and invisible: abort it (best
      // effort; a store's lifecycle rule for incomplete uploads is the safety net).
      await this.client
        .request({ method: 'DELETE', bucket: this.bucket, objectKey, query: [['uploadId', uploadId]], payloadHash: EMPTY_SHA256, response: { kind: 'discard' }, context: { ...context, operation: 'put (abort multipart)' } })
        .catch(() => undefined);
      throw error;
    }
  }

  private xml<T>(parse: () => T, context: S3Context): T {
    try {
      return parse();
    } catch (error) {
      if (error instanceof MalformedXmlError) throw new StorageError('protocol', `${context.location}: ${context.operation}${context.key ? ` ${context.key}` : ''}: ${error.message}`, { ...context });
      throw error;
    }
  }

  async get(key: string, options: GetOptions = {}): Promise<Buffer> {
    checkKey(key);
    if (options.range) checkRange(options.range);
    const objectKey = this.objectKey(key);
    const context = this.context('get', key);
    const range = options.range;
    const answer = await this.client.request({
      method: 'GET',
      bucket: this.bucket,
      objectKey,
      query: this.versionQuery(options),
      headers: range ? { range: `bytes=${range.offset}-${range.offset + range.length - 1}` } : {},
      payloadHash: EMPTY_SHA256,
      response: { kind: 'bytes', maxSize: range ? range.length : (options.maxSize ?? DEFAULT_MAX_GET_SIZE), md5: !range, into: range ? options.into : undefined },
      context,
      signal: options.signal,
    });
    if (range) return this.checkRange(answer, range, context);
    if (answer.status !== 200) throw new StorageError('protocol', `${context.location}: get ${key}: HTTP ${answer.status} to a whole-object GET`, { ...context, status: answer.status });
    checkEtag(answer, context);
    return answer.body;
  }

  /** A 206 must carry exactly the bytes asked; a shorter object is 'out-of-range' with its size. */
  private checkRange(answer: S3Answer, range: { offset: number; length: number }, context: S3Context): Buffer {
    const last = range.offset + range.length - 1;
    const header = answer.headers['content-range'];
    const parsed = typeof header === 'string' ? /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(header.trim()) : null;
    if (answer.status === 200) {
      // The store ignored the Range header and sent the whole object: acceptable only if it is exactly the range.
      if (range.offset === 0 && answer.body.length === range.length) return answer.body;
      if (answer.body.length < range.offset + range.length) throw outOfRange(context, range, answer.body.length);
      throw new StorageError('protocol', `${context.location}: get ${context.key}: the store ignored the byte range`, { ...context, status: 200 });
    }
    if (answer.status !== 206 || !parsed) throw new StorageError('protocol', `${context.location}: get ${context.key}: HTTP ${answer.status} with Content-Range ${JSON.stringify(header)} to a ranged GET`, { ...context, status: answer.status });
    const [start, end, total] = [Number(parsed[1]), Number(parsed[2]), parsed[3] === '*' ? NaN : Number(parsed[3])];
    if (start !== range.offset) throw new StorageError('protocol', `${context.location}: get ${context.key}: asked for bytes from ${range.offset}, the store sent from ${start}`, { ...context, status: 206 });
    if (end < last) throw outOfRange(context, range, Number.isFinite(total) ? total : end + 1);
    if (end !== last || answer.body.length !== range.length) throw new StorageError('protocol', `${context.location}: get ${context.key}: asked for bytes ${range.offset}-${last}, the store sent ${start}-${end}`, { ...context, status: 206 });
    return answer.body;
  }

  async stat(key: string, options: CallOptions = {}): Promise<ObjectInfo> {
    checkKey(key);
    const context = this.context('stat', key);
    try {
      const answer = await this.client.request({ method: 'HEAD', bucket: this.bucket, objectKey: this.objectKey(key), query: this.versionQuery(options), payloadHash: EMPTY_SHA256, response: { kind: 'discard' }, context, signal: options.signal });
      const size = Number(answer.headers['content-length']);
      if (!Number.isSafeInteger(size) || size < 0) throw new StorageError('protocol', `${context.location}: stat ${key}: the answer's Content-Length is ${JSON.stringify(answer.headers['content-length'])}`, { ...context });
      const lastModified = typeof answer.headers['last-modified'] === 'string' ? Date.parse(answer.headers['last-modified']) : NaN;
      return { key, size, modified: Number.isFinite(lastModified) ? lastModified : undefined };
    } catch (error) {
      // A HEAD answer has no body, so a 404 does not say whether the object or the bucket is missing.
      if (error instanceof StorageError && error.reason === 'not-found' && error.storage.backendCode === undefined) await this.bucketExists(context, options.signal);
      throw error;
    }
  }

  /** Throws 'no-bucket' (or what the store says) when the bucket is gone; returns when it exists. */
  private async bucketExists(context: S3Context, signal: AbortSignal | undefined): Promise<void> {
    try {
      await this.client.request({ method: 'HEAD', bucket: this.bucket, payloadHash: EMPTY_SHA256, response: { kind: 'discard' }, context: { ...context, operation: `${context.operation} (bucket)` }, signal });
    } catch (error) {
      if (error instanceof StorageError && error.storage.status === 404) {
        throw new StorageError('no-bucket', `${context.location}: ${context.operation} ${context.key ?? ''}: HTTP 404: the bucket ${this.bucket} does not exist; create the bucket first, or check its name, the endpoint and the region`, { ...error.storage, key: context.key, operation: context.operation });
      }
      throw error;
    }
  }

  async *list(prefix: string, options: ListOptions = {}): AsyncIterable<ObjectInfo> {
    checkPrefix(prefix);
    const context = this.context('list', prefix || '(all)');
    let token: string | undefined;
    for (;;) {
      const query: [string, string][] = [
        ['list-type', '2'],
        ['max-keys', String(this.settings.listPage)],
        ['prefix', `${this.root}${prefix}`],
        ['encoding-type', 'url'],
      ];
      if (token) query.push(['continuation-token', token]);
      else if (options.startAfter !== undefined) query.push(['start-after', `${this.root}${options.startAfter}`]);
      const answer = await this.client.request({ method: 'GET', bucket: this.bucket, query, payloadHash: EMPTY_SHA256, response: { kind: 'text', maxSize: MAX_XML_BODY }, context, signal: options.signal });
      const page = this.xml(() => parseListPage(answer.body.toString('utf8')), context);
      for (const object of page.objects) {
        if (!object.key.startsWith(this.root)) throw new StorageError('protocol', `${context.location}: list: the store listed ${object.key.slice(0, 200)}, outside the prefix asked`, { ...context });
        yield { key: object.key.slice(this.root.length), size: object.size, modified: object.modified };
      }
      if (!page.truncated) return;
      token = page.nextToken;
    }
  }

  async delete(key: string, options: CallOptions = {}): Promise<void> {
    checkKey(key);
    const context = this.context('delete', key);
    try {
      await this.client.request({ method: 'DELETE', bucket: this.bucket, objectKey: this.objectKey(key), query: this.versionQuery(options), payloadHash: EMPTY_SHA256, response: { kind: 'discard' }, context, signal: options.signal });
    } catch (error) {
      // S3 answers 204 for an absent key; a store that says 404 NoSuchKey means the same outcome.
      if (error instanceof StorageError && error.reason === 'not-found' && error.storage.backendCode === 'NoSuchKey') return;
      throw error;
    }
  }

  /**
   * Aborts the multipart uploads under the repository's prefix (keys that are storage keys) initiated
   * before `olderThan` by the store's clock (Initiated): a writer killed during putMultipart leaves its
   * parts billed and in no listing of objects. Listed page by page (ListMultipartUploads, at most 1000 an
   * answer), the abortions done after each page; an upload gone meanwhile (NoSuchUpload) was ended by its
   * writer or another sweep. Returns how many were aborted.
   */
  async sweepAbandoned(olderThan: number, options: CallOptions = {}): Promise<number> {
    const context = this.context('sweep (multipart uploads)');
    let removed = 0;
    let markers: { key: string; uploadId: string | undefined } | undefined;
    for (;;) {
      const query: [string, string][] = [
        ['uploads', ''],
        ['max-uploads', String(this.settings.listPage)],
        ['prefix', this.root],
        ['encoding-type', 'url'],
      ];
      if (markers) {
        query.push(['key-marker', markers.key]);
        if (markers.uploadId) query.push(['upload-id-marker', markers.uploadId]);
      }
      const answer = await this.client.request({ method: 'GET', bucket: this.bucket, query, payloadHash: EMPTY_SHA256, response: { kind: 'text', maxSize: MAX_XML_BODY }, context, signal: options.signal });
      const page = this.xml(() => parseUploadsPage(answer.body.toString('utf8')), context);
      for (const upload of page.uploads) {
        if (!upload.key.startsWith(this.root) || keyProblem(upload.key.slice(this.root.length)) !== undefined) continue;
        if (upload.initiated === undefined || upload.initiated >= olderThan) continue;
        const key = upload.key.slice(this.root.length);
        try {
          await this.client.request({ method: 'DELETE', bucket: this.bucket, objectKey: upload.key, query: [['uploadId', upload.uploadId]], payloadHash: EMPTY_SHA256, response: { kind: 'discard' }, context: { ...context, operation: 'sweep (abort multipart)', key }, signal: options.signal });
          removed += 1;
        } catch (error) {
          if (error instanceof StorageError && error.storage.backendCode === 'NoSuchUpload') continue;
          throw error;
        }
      }
      if (!page.truncated) return removed;
      markers = { key: page.nextKeyMarker!, uploadId: page.nextUploadIdMarker };
    }
  }

  async close(): Promise<void> {
    this.client.close();
  }
}

function outOfRange(context: S3Context, range: { offset: number; length: number }, size: number): StorageError {
  return new StorageError('out-of-range', `${context.location}: get ${context.key}: bytes ${range.offset}..${range.offset + range.length - 1} asked, the object holds ${size}`, { ...context, status: 416 });
}

/** The ETag of an object stored by one PUT without SSE-KMS/SSE-C is the MD5 of its bytes: checked. */
function checkEtag(answer: S3Answer, context: S3Context): void {
  const etag = typeof answer.headers.etag === 'string' ? answer.headers.etag.replace(/"/g, '').trim().toLowerCase() : '';
  if (!/^[0-9a-f]{32}$/.test(etag)) return;
  const sse = answer.headers['x-amz-server-side-encryption'];
  if ((typeof sse === 'string' && sse.startsWith('aws:kms')) || answer.headers['x-amz-server-side-encryption-customer-algorithm'] !== undefined) return;
  const md5 = answer.md5 ?? createHash('md5').update(answer.body).digest('hex');
  if (md5 !== etag) {
    throw new StorageError('integrity', `${context.location}: get ${context.key}: the bytes read have MD5 ${md5}, the store's ETag says ${etag}`, { ...context, status: answer.status }, { transient: true });
  }
}

async function fileSize(file: string, context: S3Context): Promise<number> {
  try {
    const stats = await statFile(file);
    if (!stats.isFile()) throw new InvalidArgumentError(`${context.location}: put ${context.key}: ${file} is not a regular file`);
    return stats.size;
  } catch (error) {
    if (error instanceof InvalidArgumentError) throw error;
    throw new StorageError('refused', `${context.location}: put ${context.key}: the file to upload, ${file}, cannot be read (${isErrnoException(error) ? error.code : String(error)})`, { ...context }, { cause: error });
  }
}
