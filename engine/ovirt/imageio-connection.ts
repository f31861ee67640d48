/**
 * Reaching ovirt-imageio for one image transfer. A transfer has two URLs: `transfer_url`, the imageio
 * daemon on the host (port 54322), and `proxy_url`, the imageio proxy on the engine host (port 54323). The
 * host is faster (no extra hop) but often unreachable from a backup server outside the hypervisors'
 * network; ovirt-imageio's own client tries `transfer_url` and falls back to `proxy_url` when it cannot
 * connect (ovirt-imageio client/_api.py `_open_http`). The engine does the same, and never falls back to a
 * plain-http proxy from an https transfer URL.
 *
 * `OPTIONS` says what the ticket allows (ovirt-imageio handlers/images.py `options`): `Allow` lists the
 * methods (a download ticket: OPTIONS,GET), the JSON body the features (extents, zero, flush) and
 * max_readers / max_writers. Old daemons answer 405, old proxies 204: no features then.
 */
import { Agent as HttpAgent, request as httpRequest } from 'node:http';
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https';
import { SourceUnreadableError, TargetUnwritableError } from '../errors.js';
import { collectBody, HTTP_BODY_LIMIT } from '../host/http-body.js';
import { decodeOptions } from './imageio-json.js';
import { displayText } from '../../repo-format/display-text.js';

export interface ImageioUrls {
  transferUrl: string | undefined;
  proxyUrl: string | undefined;
}

export interface ImageioEndpoint {
  url: URL;
  /** Methods the ticket allows (empty when OPTIONS is not supported). */
  allow: string[];
  features: string[];
  maxReaders: number;
  maxWriters: number;
  /** True when transfer_url could not be reached and proxy_url is used. */
  viaProxy: boolean;
}

export interface ImageioAnswer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
}

export type ImageioAgent = HttpAgent | HttpsAgent;

export function imageioAgent(url: URL, maxSockets: number, ca: Buffer | undefined): ImageioAgent {
  return url.protocol === 'https:' ? new HttpsAgent({ keepAlive: true, maxSockets, ca }) : new HttpAgent({ keepAlive: true, maxSockets });
}

/**
 * One request to imageio; rejects with the socket's error (its `code` kept) when there is no answer. The answer
 * holds at most `limit` bytes (a range read: the range and some slack; otherwise HTTP_BODY_LIMIT): a larger one
 * is cut off and rejected, never held.
 */
export function imageioRequest(
  url: URL,
  agent: ImageioAgent,
  request: { method: string; path: string; headers?: Record<string, string>; body?: Buffer; timeoutMs?: number; limit?: number },
): Promise<ImageioAnswer> {
  const requester = url.protocol === 'https:' ? httpsRequest : httpRequest;
  const timeoutMs = request.timeoutMs ?? 120_000;
  return new Promise((resolve, reject) => {
    const req = requester(
      {
        protocol: url.protocol,
        host: url.hostname,
        port: url.port,
        path: request.path,
        method: request.method,
        headers: { ...request.headers, ...(request.body !== undefined ? { 'Content-Length': String(request.body.length) } : {}) },
        agent,
        timeout: timeoutMs,
      },
      (res) => collectBody(res, request.limit ?? HTTP_BODY_LIMIT, (body) => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }), reject),
    );
    req.on('timeout', () => req.destroy(Object.assign(new Error(`imageio ${request.method} ${request.path} timed out after ${timeoutMs / 1000} s`), { code: 'ETIMEDOUT' })));
    req.on('error', reject);
    req.end(request.body);
  });
}

/** The start of an error answer's body, as imageio's own words in a message: escaped, at most 200 characters. */
export function answerText(body: Buffer): string {
  return displayText(body.subarray(0, 4096).toString('utf8'), 200);
}

/** Errors that mean "this address cannot be reached or trusted", where the other URL may work. */
function unreachable(error: unknown): boolean {
  const code = (error as NodeJS.ErrnoException).code ?? '';
  return (
    ['ECONNREFUSED', 'EHOSTUNREACH', 'ENETUNREACH', 'ETIMEDOUT', 'ENOTFOUND', 'EAI_AGAIN', 'ECONNRESET'].includes(code) ||
    code.startsWith('ERR_TLS') ||
    code.startsWith('ERR_SSL') ||
    /CERT|SELF_SIGNED|UNABLE_TO_VERIFY/.test(code)
  );
}

/** Builds the error of a failed transfer: unreadable for a download, unwritable for an upload. */
type Failure = (url: string, why: string) => Error;
export const downloadFailure: Failure = (url, why) => new SourceUnreadableError(url, why);
export const uploadFailure: Failure = (url, why) => new TargetUnwritableError(url, why);

async function probe(url: URL, ca: Buffer | undefined, viaProxy: boolean, fail: Failure): Promise<ImageioEndpoint> {
  const agent = imageioAgent(url, 1, ca);
  try {
    const answer = await imageioRequest(url, agent, { method: 'OPTIONS', path: url.pathname, timeoutMs: 30_000 });
    if (answer.status === 405 || answer.status === 204) return { url, allow: [], features: [], maxReaders: 1, maxWriters: 1, viaProxy };
    if (answer.status !== 200) throw fail(url.href, `imageio OPTIONS answered HTTP ${answer.status}: ${answerText(answer.body)}`);
    const options = decodeOptions(answer.body);
    if (typeof options === 'string') throw fail(url.href, options);
    const allow = typeof answer.headers.allow === 'string' ? answer.headers.allow.split(',').map((m) => m.trim().toUpperCase()) : [];
    return { url, allow, ...options, viaProxy };
  } finally {
    agent.destroy();
  }
}

/**
 * The address to use for a transfer: `transfer_url` if it answers, else `proxy_url` (same scheme or
 * stronger). A failure of both names both.
 */
export async function openImageio(urls: ImageioUrls, ca: Buffer | undefined, fail: Failure): Promise<ImageioEndpoint> {
  const primary = urls.transferUrl ?? urls.proxyUrl;
  if (!primary) throw fail('imageio', 'the image transfer has neither transfer_url nor proxy_url');
  try {
    return await probe(new URL(primary), ca, primary !== urls.transferUrl, fail);
  } catch (error) {
    const fallback = urls.transferUrl !== undefined && urls.proxyUrl !== undefined && urls.proxyUrl !== urls.transferUrl ? new URL(urls.proxyUrl) : undefined;
    if (!fallback || !unreachable(error)) throw known(error) ? error : fail(primary, (error as Error).message);
    if (new URL(primary).protocol === 'https:' && fallback.protocol !== 'https:') {
      throw fail(primary, `${(error as Error).message}; proxy_url ${fallback.href} is not https, not used`);
    }
    try {
      return await probe(fallback, ca, true, fail);
    } catch (second) {
      throw fail(primary, `${(error as Error).message}; proxy_url ${fallback.href}: ${(second as Error).message}`);
    }
  }
}

function known(error: unknown): boolean {
  return error instanceof SourceUnreadableError || error instanceof TargetUnwritableError;
}
