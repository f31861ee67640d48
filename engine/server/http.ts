/**
 * The HTTP side of the service API: a small router, JSON bodies read under a limit, and errors as one JSON
 * shape, `{"error": {"code", "message", "details"}}` with a one-line message (SPEC.md 14.3's codes). Nothing
 * here knows jobs or repositories.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { EngineError, InvalidArgumentError, type ErrorCode } from '../../repo-format/errors.js';
import { BodyTooLargeError, NotFoundError } from './errors.js';
import type { Principal } from './auth.js';

/** Job requests are a few hundred bytes; 64 KiB leaves room for many disks and refuses a flood. */
export const MAX_BODY_BYTES = 64 * 1024;

export interface RequestContext {
  req: IncomingMessage;
  res: ServerResponse;
  params: Record<string, string>;
  query: URLSearchParams;
  principal: Principal;
}

export interface Route {
  method: 'GET' | 'POST' | 'DELETE';
  /** Segments; ':name' matches one segment of the form `pattern`'s group `name`. */
  path: RegExp;
  /** Whether a `read` token may call it. */
  role: 'read' | 'operator';
  handle(context: RequestContext): Promise<void>;
}

const STATUS: Partial<Record<ErrorCode, number>> = {
  ENGINE_INVALID_ARGUMENT: 400,
  ENGINE_UNAUTHORIZED: 401,
  ENGINE_FORBIDDEN: 403,
  ENGINE_NOT_FOUND: 404,
  ENGINE_BACKUP_NOT_FOUND: 404,
  ENGINE_DISK_NOT_FOUND: 404,
  ENGINE_AMBIGUOUS_ID: 409,
  ENGINE_REPOSITORY_LOCKED: 409,
  ENGINE_BODY_TOO_LARGE: 413,
  ENGINE_QUEUE_FULL: 429,
  ENGINE_NOT_A_REPOSITORY: 502,
  ENGINE_WRONG_PASSPHRASE: 502,
  ENGINE_PASSPHRASE_REQUIRED: 502,
};

export function statusOf(code: ErrorCode): number {
  return STATUS[code] ?? 500;
}

/** The JSON error of anything thrown: an EngineError keeps its code; anything else is ENGINE_INTERNAL. */
export function errorJson(error: unknown): { code: ErrorCode; message: string; details: Record<string, unknown> } {
  const engineError = error instanceof EngineError ? error : undefined;
  const message = (error instanceof Error ? error.message : String(error)).replace(/\s*\n\s*/g, ' ').trim();
  return { code: engineError?.code ?? 'ENGINE_INTERNAL', message, details: { ...(engineError?.details ?? {}) } };
}

export function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  // Compact: a page of 1,000 backups is a third smaller than indented (pipe it through jq to read it).
  const text = `${JSON.stringify(body)}\n`;
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text), 'cache-control': 'no-store', ...headers });
  res.end(text);
}

export function sendError(res: ServerResponse, error: unknown, headers: Record<string, string> = {}): void {
  const json = errorJson(error);
  if (res.headersSent) {
    res.destroy();
    return;
  }
  // A body over the limit: the rest is never read, so the connection cannot carry another request.
  const close: Record<string, string> = json.code === 'ENGINE_BODY_TOO_LARGE' ? { connection: 'close' } : {};
  sendJson(res, error instanceof MethodNotAllowedError ? 405 : statusOf(json.code), { error: json }, { ...headers, ...close });
}

/**
 * The request's JSON body, at most `limit` bytes: a larger Content-Length is refused before a byte is read,
 * a body that grows past it (chunked) when it does; either way the connection is closed after the answer,
 * so the rest is never read.
 */
/** A request's body as UTF-8 text, at most `limit` bytes: refused by its Content-Length, or as it grows past it. */
export async function readBody(req: IncomingMessage, limit: number): Promise<string> {
  const declared = Number(req.headers['content-length'] ?? NaN);
  if (declared > limit) throw new BodyTooLargeError(limit);
  const chunks: Buffer[] = [];
  let length = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    length += chunk.length;
    if (length > limit) throw new BodyTooLargeError(limit);
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

export async function readJsonBody(req: IncomingMessage, limit = MAX_BODY_BYTES): Promise<unknown> {
  const type = req.headers['content-type'];
  if (type !== undefined && !/^application\/json\s*(;|$)/i.test(type)) throw new InvalidArgumentError(`the request body must be application/json, not ${type}`);
  const text = await readBody(req, limit);
  if (text.trim() === '') throw new InvalidArgumentError('the request needs a JSON body');
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new InvalidArgumentError(`the request body is not JSON: ${(error as Error).message}`);
  }
}

/** The route for a method and path, and its parameters; 404 for no path, 405 for a path without that method. */
export function matchRoute(routes: readonly Route[], method: string, pathname: string): { route: Route; params: Record<string, string> } {
  let pathMatched = false;
  for (const route of routes) {
    const match = route.path.exec(pathname);
    if (!match) continue;
    pathMatched = true;
    if (route.method === method || (method === 'HEAD' && route.method === 'GET')) return { route, params: { ...(match.groups ?? {}) } };
  }
  if (pathMatched) throw new MethodNotAllowedError(method, pathname);
  throw new NotFoundError(`no such resource: ${pathname.slice(0, 200)}`, { path: pathname.slice(0, 200) });
}

export class MethodNotAllowedError extends InvalidArgumentError {
  constructor(method: string, path: string) {
    super(`${method.slice(0, 16)} is not allowed on ${path.slice(0, 200)}`, { method: method.slice(0, 16), status: 405 });
  }
}
