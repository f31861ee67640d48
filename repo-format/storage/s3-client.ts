/**
 * One signed S3 request over node:http or node:https, and its answer checked: the status sorted into a
 * StorageError (s3-errors.ts), the body read into exactly the bytes its Content-Length announced (a body
 * cut short is a transient failure, never a short success; more than announced is a protocol error), at
 * most the size the caller allows. The connection pool keeps `connections` sockets alive; a request whose
 * connection moves no byte for `idleTimeoutMs` is given up (transient, like restic's watchdog). Upload
 * bodies come from memory or straight from a local file, read as they are sent.
 *
 * Why our own client rather than the AWS SDK: repo-format/storage/README.md (measured).
 */
import { Agent as HttpAgent, request as httpRequest, type IncomingHttpHeaders, type IncomingMessage } from 'node:http';
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https';
import { createHash, type Hash } from 'node:crypto';
import { open } from 'node:fs/promises';
import { isIP } from 'node:net';
import { isErrnoException } from '../errors.js';
import { networkFailure, s3Failure, type S3Context } from './s3-errors.js';
import { parseErrorDocument } from './s3-xml.js';
import { amzDate, sign, uriEncode, uriEncodePath, type Credentials } from './sigv4.js';
import { StorageError } from './storage-error.js';
import { interruptedError } from './storage.js';

/** Error answers and XML documents are small; anything larger is not S3 speaking. */
const MAX_ERROR_BODY = 64 * 1024;
export const MAX_XML_BODY = 16 * 1024 * 1024;

export interface S3ClientOptions {
  /** The store's base URL: scheme, host, port, and a base path if it lives under one. */
  endpoint: URL;
  /** Path-style addressing (https://host/bucket/key), as non-AWS stores want; else bucket.host. */
  pathStyle: boolean;
  region: string;
  credentials: Credentials;
  /** PEM CA certificates to trust instead of the system's (a private CA). */
  ca?: Buffer | undefined;
  connections: number;
  idleTimeoutMs: number;
  /** For messages: s3://bucket/prefix. */
  location: string;
  /** This host's clock, ms since the epoch (default Date.now): tests move it to provoke RequestTimeTooSkewed. */
  now?: (() => number) | undefined;
}

export type RequestBody = { bytes: Uint8Array } | { file: string; offset: number; length: number };

/** `md5`: the body's MD5 is computed as it arrives (S3Answer.md5), not in one pass over 32 MiB at the end. */
/** `into`: the body is placed there when it fits (S3Answer.body is then a view of it), not in a new buffer. */
export type ResponseMode = { kind: 'discard' } | { kind: 'text'; maxSize: number } | { kind: 'bytes'; maxSize: number; md5?: boolean; into?: Buffer | undefined };

export interface S3Request {
  method: 'GET' | 'PUT' | 'HEAD' | 'DELETE' | 'POST';
  bucket: string;
  /** The object's key in the bucket (root prefix included); none for bucket-level requests. */
  objectKey?: string | undefined;
  query?: [string, string][] | undefined;
  /** Extra headers, lower-case names; signed. */
  headers?: Record<string, string> | undefined;
  body?: RequestBody | undefined;
  /** Hex SHA-256 of the body, or UNSIGNED-PAYLOAD. */
  payloadHash: string;
  response: ResponseMode;
  context: S3Context;
  signal?: AbortSignal | undefined;
}

export interface S3Answer {
  status: number;
  headers: IncomingHttpHeaders;
  body: Buffer;
  /** Hex MD5 of the body, when the response mode asked for it. */
  md5?: string | undefined;
}

function bodyLength(body: RequestBody | undefined): number {
  if (!body) return 0;
  return 'bytes' in body ? body.bytes.byteLength : body.length;
}

/** Retry-After in seconds or as a date, in milliseconds (capped at a minute); undefined without one. */
function retryAfter(headers: IncomingHttpHeaders): number | undefined {
  const value = headers['retry-after'];
  if (typeof value !== 'string') return undefined;
  const seconds = /^\d+$/.test(value.trim()) ? Number(value) : (Date.parse(value) - Date.now()) / 1000;
  return Number.isFinite(seconds) && seconds > 0 ? Math.min(seconds * 1000, 60_000) : undefined;
}

export class S3Client {
  private readonly agent: HttpAgent | HttpsAgent;
  private readonly tls: boolean;
  /** How many bytes moved, both ways: for tests and benchmarks. */
  readonly traffic = { requests: 0, sent: 0, received: 0 };

  constructor(readonly options: S3ClientOptions) {
    this.tls = options.endpoint.protocol === 'https:';
    const agentOptions = { keepAlive: true, maxSockets: options.connections, maxFreeSockets: options.connections, scheduling: 'lifo' as const };
    this.agent = this.tls ? new HttpsAgent({ ...agentOptions, ca: options.ca }) : new HttpAgent(agentOptions);
  }

  get secure(): boolean {
    return this.tls;
  }

  /** Host header and path of a request, path-style or virtual-hosted. */
  private target(bucket: string, objectKey: string | undefined): { hostname: string; host: string; path: string } {
    const base = this.options.endpoint;
    const basePath = base.pathname.replace(/\/+$/, '');
    const keyPath = objectKey === undefined ? '' : `/${uriEncodePath(objectKey)}`;
    if (this.options.pathStyle) {
      return { hostname: base.hostname, host: base.host, path: `${basePath}/${uriEncodePath(bucket)}${keyPath || (objectKey === undefined ? '' : '/')}` };
    }
    return { hostname: `${bucket}.${base.hostname}`, host: `${bucket}.${base.host}`, path: `${basePath}${keyPath || '/'}` };
  }

  request(call: S3Request): Promise<S3Answer> {
    const { context, signal } = call;
    if (signal?.aborted) return Promise.reject(interruptedError(context.location, context.operation, context.key));
    const target = this.target(call.bucket, call.objectKey);
    const query = call.query ?? [];
    const length = bodyLength(call.body);
    const now = new Date((this.options.now ?? Date.now)());
    const signed: Record<string, string> = {
      host: target.host,
      'x-amz-date': amzDate(now),
      'x-amz-content-sha256': call.payloadHash,
      ...(this.options.credentials.sessionToken ? { 'x-amz-security-token': this.options.credentials.sessionToken } : {}),
      ...call.headers,
    };
    const { authorization } = sign({ method: call.method, path: target.path, query, headers: signed, payloadHash: call.payloadHash, region: this.options.region, date: now }, this.options.credentials);
    const search = query.length === 0 ? '' : `?${query.map(([name, value]) => `${uriEncode(name)}=${uriEncode(value)}`).join('&')}`;
    const headers: Record<string, string> = { ...signed, authorization };
    if (call.body !== undefined || call.method === 'PUT' || call.method === 'POST') headers['content-length'] = String(length);
    const requester = this.tls ? httpsRequest : httpRequest;
    this.traffic.requests += 1;

    return new Promise<S3Answer>((resolve, reject) => {
      let settled = false;
      let response: IncomingMessage | undefined;
      const finish = (error: unknown, answer?: S3Answer): void => {
        if (settled) return;
        settled = true;
        signal?.removeEventListener('abort', onAbort);
        if (error !== undefined) {
          // A connection whose answer was read to its end goes back to the pool; any other is closed.
          if (!response?.complete) req.destroy();
          reject(error);
        } else resolve(answer!);
      };
      const onAbort = (): void => finish(interruptedError(context.location, context.operation, context.key));
      const fail = (error: unknown): void => finish(error instanceof StorageError || (error instanceof Error && 'code' in error && (error as { code?: unknown }).code === 'ENGINE_INTERRUPTED') ? error : networkFailure(context, error));

      const req = requester({
        protocol: this.options.endpoint.protocol,
        hostname: target.hostname,
        port: this.options.endpoint.port || undefined,
        // SNI names a host, never an address (RFC 6066); the certificate is checked against either.
        servername: this.tls && isIP(target.hostname.replace(/^\[|\]$/g, '')) === 0 ? target.hostname : undefined,
        method: call.method,
        path: `${target.path}${search}`,
        headers,
        agent: this.agent,
      });
      signal?.addEventListener('abort', onAbort, { once: true });
      req.setTimeout(this.options.idleTimeoutMs, () => {
        fail(Object.assign(new Error(`no byte moved for ${this.options.idleTimeoutMs / 1000} s`), { code: 'S3_IDLE_TIMEOUT' }));
      });
      req.on('error', fail);
      req.on('response', (res) => {
        response = res;
        const status = res.statusCode ?? 0;
        res.on('error', fail);
        if (status >= 300) {
          readBody(res, MAX_ERROR_BODY, undefined, undefined, undefined, (error, body) => {
            if (error && !(error instanceof TooLarge)) return fail(error);
            const document = body ? parseErrorDocument(body.toString('utf8')) : undefined;
            finish(s3Failure(context, status, document, retryAfter(res.headers)));
          });
          return;
        }
        if (call.method === 'HEAD' || call.response.kind === 'discard') {
          readBody(res, MAX_ERROR_BODY, undefined, undefined, undefined, (error) => (error && !(error instanceof TooLarge) ? fail(error) : finish(undefined, { status, headers: res.headers, body: Buffer.alloc(0) })));
          return;
        }
        const maxSize = call.response.maxSize;
        const declared = res.headers['content-length'] === undefined ? undefined : Number(res.headers['content-length']);
        if (declared !== undefined && !(Number.isSafeInteger(declared) && declared >= 0)) {
          return finish(new StorageError('protocol', `${context.location}: ${context.operation} ${context.key ?? ''}: the answer's Content-Length is ${JSON.stringify(res.headers['content-length'])}`, { ...context, status }));
        }
        if (declared !== undefined && declared > maxSize) {
          return finish(new StorageError('too-large', `${context.location}: ${context.operation} ${context.key ?? ''}: the answer holds ${declared} bytes, more than the ${maxSize} expected`, { ...context, status }));
        }
        const md5 = call.response.kind === 'bytes' && call.response.md5 ? createHash('md5') : undefined;
        const into = call.response.kind === 'bytes' && declared !== undefined && call.response.into !== undefined && call.response.into.length >= declared ? call.response.into.subarray(0, declared) : undefined;
        readBody(res, maxSize, declared, md5, into, (error, body) => {
          if (error instanceof TooLarge) return finish(new StorageError('too-large', `${context.location}: ${context.operation} ${context.key ?? ''}: the answer holds more than the ${maxSize} bytes expected`, { ...context, status }));
          if (error instanceof Overlong) return finish(new StorageError('protocol', `${context.location}: ${context.operation} ${context.key ?? ''}: the answer holds more bytes than its Content-Length (${declared})`, { ...context, status }));
          if (error) return fail(error);
          this.traffic.received += body!.length;
          finish(undefined, { status, headers: res.headers, body: body!, md5: md5?.digest('hex') });
        });
      });
      void sendBody(req, call.body).then(
        (sent) => {
          this.traffic.sent += sent;
        },
        (error: unknown) => {
          // The local source failed (a file that vanished or shrank): not the store's fault, not retried.
          if (error instanceof SourceChanged) {
            finish(new StorageError('refused', `${context.location}: ${context.operation} ${context.key ?? ''}: the file to upload ${error.message}`, { ...context }, { transient: false, cause: error }));
          } else if (isErrnoException(error) && (error.syscall === 'open' || error.syscall === 'read')) {
            finish(new StorageError('refused', `${context.location}: ${context.operation} ${context.key ?? ''}: the file to upload cannot be read (${error.code})`, { ...context }, { transient: false, cause: error }));
          } else fail(error);
        },
      );
    });
  }

  close(): void {
    this.agent.destroy();
  }
}

class TooLarge extends Error {}
class Overlong extends Error {}
class SourceChanged extends Error {}

/**
 * Reads a body into one buffer: exactly `declared` bytes when the answer announced its length (fewer, when
 * the connection ends, is an S3_BODY_CUT network failure), else up to `limit`.
 */
function readBody(res: IncomingMessage, limit: number, declared: number | undefined, hash: Hash | undefined, into: Buffer | undefined, done: (error: Error | undefined, body?: Buffer) => void): void {
  let buffer = into ?? (declared !== undefined ? Buffer.allocUnsafe(declared) : undefined);
  const chunks: Buffer[] = [];
  let length = 0;
  let over = false;
  res.on('data', (chunk: Buffer) => {
    if (over) return;
    if (buffer) {
      if (length + chunk.length > buffer.length) {
        over = true;
        res.destroy();
        return done(new Overlong());
      }
      chunk.copy(buffer, length);
    } else {
      if (length + chunk.length > limit) {
        over = true;
        res.destroy();
        return done(new TooLarge());
      }
      chunks.push(chunk);
    }
    hash?.update(chunk);
    length += chunk.length;
  });
  res.on('end', () => {
    if (over) return;
    if (buffer && length < buffer.length) {
      return done(Object.assign(new Error(`the answer ended after ${length} of ${buffer.length} bytes`), { code: 'S3_BODY_CUT' }));
    }
    buffer ??= Buffer.concat(chunks, length);
    done(undefined, buffer);
  });
  res.on('aborted', () => {
    if (!over) done(Object.assign(new Error(`the connection closed after ${length}${buffer ? ` of ${buffer.length}` : ''} bytes`), { code: 'S3_BODY_CUT' }));
  });
}

/** The size of each read of a file being uploaded. */
const SEND_CHUNK = 1024 * 1024;

/** Waits for 'drain' or 'close', whichever comes first, and leaves no listener behind (one wait per MiB sent). */
function drainedOrClosed(req: import('node:http').ClientRequest): Promise<void> {
  return new Promise((resolve) => {
    const done = (): void => {
      req.off('drain', done);
      req.off('close', done);
      resolve();
    };
    req.on('drain', done);
    req.on('close', done);
  });
}

/** Writes the body, respecting back-pressure; a file is read as it is sent and must still hold its bytes. */
async function sendBody(req: import('node:http').ClientRequest, body: RequestBody | undefined): Promise<number> {
  if (!body) {
    req.end();
    return 0;
  }
  if ('bytes' in body) {
    req.end(body.bytes);
    return body.bytes.byteLength;
  }
  if (body.length === 0) {
    req.end();
    return 0;
  }
  // Two buffers, reused: one is read into while the other's bytes are on their way (a fresh 4 MiB buffer
  // per read, as a read stream makes them, is 32 MiB of garbage a pack for the collector).
  const handle = await open(body.file, 'r');
  const buffers = [Buffer.allocUnsafe(SEND_CHUNK), Buffer.allocUnsafe(SEND_CHUNK)];
  const leaving: (Promise<void> | undefined)[] = [undefined, undefined];
  const closed = new Promise<void>((resolve) => req.once('close', resolve));
  let sent = 0;
  try {
    for (let turn = 0; sent < body.length; turn = 1 - turn) {
      // A buffer is read into again only once the socket has taken its last bytes (or the request ended).
      if (leaving[turn]) await Promise.race([leaving[turn], closed]);
      if (req.destroyed) return sent;
      const buffer = buffers[turn]!;
      const { bytesRead } = await handle.read(buffer, 0, Math.min(SEND_CHUNK, body.length - sent), body.offset + sent);
      if (bytesRead === 0) break;
      if (req.destroyed) return sent;
      leaving[turn] = new Promise<void>((resolve) => req.write(buffer.subarray(0, bytesRead), () => resolve()));
      sent += bytesRead;
      if (req.writableNeedDrain) await drainedOrClosed(req);
    }
    // Both buffers out of the socket's hands before they go back to the garbage collector.
    await Promise.race([Promise.all(leaving), closed]);
  } finally {
    await handle.close();
  }
  if (req.destroyed) return sent;
  if (sent !== body.length) {
    req.destroy();
    throw new SourceChanged(`${body.file} holds ${sent} bytes from offset ${body.offset}, ${body.length} were expected: it changed while it was uploaded`);
  }
  req.end();
  return sent;
}
