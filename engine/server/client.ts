/**
 * A client of the service API for `engine --server URL …` (SPEC.md 23.5, "engine --server"): posts one job,
 * follows its Server-Sent Events to the end and returns the job's final record. The URL is http(s)://HOST:PORT
 * or the path of the server's Unix socket. The token travels in the Authorization header; it is read from a
 * file or ENGINE_SERVER_TOKEN by the caller, never taken as an argument (`ps` would show it).
 *
 * Cancelling (the signal: the CLI's SIGINT) sends `DELETE /jobs/{id}` once and follows on to the job's end,
 * so the command ends as the local one would: `cancelled`, nothing committed half. A stream that breaks before
 * `end` is taken up again with Last-Event-ID, a few times; then ENGINE_SERVER_UNREACHABLE.
 */
import { request as httpRequest, type IncomingMessage, type RequestOptions } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { EngineError, InvalidArgumentError, type ErrorCode } from '../../repo-format/errors.js';
import { ServerUnreachableError } from './errors.js';
import type { JobProgress, JobRecord } from './journal.js';

export interface ServerTarget {
  /** http://HOST:PORT, https://HOST:PORT, or a Unix socket's absolute path. */
  url: string;
  token: string | undefined;
}

export interface FollowOptions {
  signal?: AbortSignal | undefined;
  onProgress?: ((progress: JobProgress) => void) | undefined;
  onLog?: ((message: string) => void) | undefined;
}

/** Times a broken event stream is taken up again before the job is given up on. */
const RESUMES = 5;
const RESUME_WAIT_MS = 500;

function endpoint(target: ServerTarget, method: string, path: string, headers: Record<string, string>): { options: RequestOptions; secure: boolean } {
  const common = { method, path, headers: { ...headers, ...(target.token ? { authorization: `Bearer ${target.token}` } : {}) } };
  if (target.url.startsWith('/')) return { options: { ...common, socketPath: target.url }, secure: false };
  let url: URL;
  try {
    url = new URL(target.url);
  } catch {
    throw new InvalidArgumentError(`--server ${JSON.stringify(target.url.slice(0, 200))}: give http://HOST:PORT, https://HOST:PORT or the path of the server's Unix socket`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new InvalidArgumentError(`--server ${url.href}: only http://, https:// or a socket path`);
  if (url.username || url.password || url.search || url.hash || (url.pathname !== '/' && url.pathname !== '')) throw new InvalidArgumentError(`--server ${url.origin}: the URL is the server's origin only (no credentials, path or query; the token comes from a file or ENGINE_SERVER_TOKEN)`);
  return { options: { ...common, host: url.hostname.replace(/^\[|\]$/g, ''), port: url.port || (url.protocol === 'https:' ? 443 : 80) }, secure: url.protocol === 'https:' };
}

function unreachable(target: ServerTarget, error: unknown): EngineError {
  return new ServerUnreachableError(target.url, (error as NodeJS.ErrnoException).code ?? (error as Error).message);
}

/** The error of an error answer: the server's code, message and details, as if raised here. */
function answerError(status: number, text: string): EngineError {
  try {
    const body = JSON.parse(text) as { error?: { code?: string; message?: string; details?: Record<string, unknown> } };
    if (body.error?.code && body.error.message) return new EngineError(body.error.code as ErrorCode, body.error.message, body.error.details ?? {});
  } catch {
    // not the API's error shape: said below
  }
  return new EngineError('ENGINE_INTERNAL', `the server answered HTTP ${status}: ${text.slice(0, 200).replace(/\s+/g, ' ')}`, { status });
}

function send(target: ServerTarget, method: string, path: string, body?: unknown): Promise<unknown> {
  const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
  const { options, secure } = endpoint(target, method, path, payload ? { 'content-type': 'application/json', 'content-length': String(payload.length) } : {});
  return new Promise((resolve, reject) => {
    const req = (secure ? httpsRequest : httpRequest)(options, (res: IncomingMessage) => {
      const chunks: Buffer[] = [];
      res.on('data', (chunk: Buffer) => chunks.push(chunk));
      res.on('error', (error) => reject(unreachable(target, error)));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        if ((res.statusCode ?? 500) >= 400) return reject(answerError(res.statusCode ?? 500, text));
        try {
          resolve(JSON.parse(text));
        } catch {
          reject(new EngineError('ENGINE_INTERNAL', `the server's answer to ${method} ${path} is not JSON`));
        }
      });
    });
    req.on('error', (error) => reject(unreachable(target, error)));
    req.end(payload);
  });
}

interface StreamEnd {
  job: JobRecord | undefined;
  lastId: number;
}

/** One event stream, from after `lastId` until `end` (the job) or until it breaks (no job). */
function stream(target: ServerTarget, id: string, lastId: number, options: FollowOptions): Promise<StreamEnd> {
  const { options: request, secure } = endpoint(target, 'GET', `/api/v1/jobs/${id}/events`, { accept: 'text/event-stream', ...(lastId > 0 ? { 'last-event-id': String(lastId) } : {}) });
  return new Promise((resolve, reject) => {
    let last = lastId;
    let job: JobRecord | undefined;
    const req = (secure ? httpsRequest : httpRequest)(request, (res: IncomingMessage) => {
      if (res.statusCode !== 200) {
        const chunks: Buffer[] = [];
        res.on('data', (chunk: Buffer) => chunks.push(chunk));
        res.on('end', () => reject(answerError(res.statusCode ?? 500, Buffer.concat(chunks).toString('utf8'))));
        return;
      }
      let buffer = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => {
        buffer += chunk;
        for (let end = buffer.indexOf('\n\n'); end >= 0; end = buffer.indexOf('\n\n')) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const fields = new Map<string, string>();
          for (const line of block.split('\n')) {
            if (line.startsWith(':')) continue;
            const colon = line.indexOf(': ');
            if (colon > 0) fields.set(line.slice(0, colon), line.slice(colon + 2));
          }
          if (!fields.has('data')) continue;
          last = Number(fields.get('id') ?? last);
          const data = JSON.parse(fields.get('data')!) as Record<string, unknown>;
          const type = fields.get('event');
          if (type === 'progress') options.onProgress?.(data as unknown as JobProgress);
          else if (type === 'log') options.onLog?.(String(data.message));
          else if (type === 'end') job = data.job as JobRecord;
        }
      });
      res.on('end', () => resolve({ job, lastId: last }));
      res.on('error', () => resolve({ job, lastId: last }));
    });
    req.on('error', (error) => (last === lastId ? reject(unreachable(target, error)) : resolve({ job, lastId: last })));
    req.end();
  });
}

/** Posts the job and follows it to its end; the job's final record (succeeded, failed or cancelled). */
export async function runServerJob(target: ServerTarget, body: Record<string, unknown>, options: FollowOptions = {}): Promise<JobRecord> {
  const posted = (await send(target, 'POST', '/api/v1/jobs', body)) as JobRecord;
  let cancelling: Promise<unknown> | undefined;
  const cancel = (): void => {
    cancelling ??= send(target, 'DELETE', `/api/v1/jobs/${posted.id}`).catch(() => undefined);
  };
  if (options.signal?.aborted) cancel();
  options.signal?.addEventListener('abort', cancel, { once: true });
  try {
    let lastId = 0;
    for (let attempt = 0; ; attempt++) {
      let end: StreamEnd;
      try {
        end = await stream(target, posted.id, lastId, options);
      } catch (error) {
        if (!(error instanceof ServerUnreachableError) || attempt >= RESUMES) throw error;
        end = { job: undefined, lastId };
      }
      if (end.job) return end.job;
      if (attempt >= RESUMES) throw new ServerUnreachableError(target.url, `the event stream of job ${posted.id} broke ${RESUMES + 1} times before its end`);
      lastId = end.lastId;
      await new Promise((resolve) => setTimeout(resolve, RESUME_WAIT_MS));
    }
  } finally {
    options.signal?.removeEventListener('abort', cancel);
    await cancelling;
  }
}
