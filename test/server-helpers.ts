/**
 * What the service API's tests share: an `engine server` started as its own process (as a user runs it), a
 * small HTTP client over TCP, TLS or a Unix socket that records every answer, a Server-Sent Events reader,
 * and a checker of answers against the checked-in OpenAPI document (the subset of JSON Schema it uses).
 */
import { request as httpRequest, type IncomingMessage } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { ChildProcess } from 'node:child_process';
import { collectOutput, exitOf, spawnEngine, waitFor } from './helpers.js';

export interface RunningServer {
  child: ChildProcess;
  url: string;
  socket: string | null;
  stderr: () => string;
  stop(): Promise<void>;
}

export async function writeConfig(dir: string, config: Record<string, unknown>): Promise<string> {
  const path = join(dir, 'server.json');
  await writeFile(path, JSON.stringify(config, null, 2));
  return path;
}

/** `engine server --json ARGS`, once it listens (its one JSON document on stdout). */
export async function startServer(args: string[], env: Record<string, string> = {}): Promise<RunningServer> {
  const child = spawnEngine(['server', '--json', ...args], env);
  const output = collectOutput(child);
  await waitFor('the server listens', () => output.stdout().trim().endsWith('}'), { child, output: output.stderr });
  const started = JSON.parse(output.stdout()) as { url: string; socket: string | null };
  return {
    child,
    url: started.url,
    socket: started.socket,
    stderr: output.stderr,
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      await exitOf(child);
    },
  };
}

export interface Answer {
  status: number;
  headers: IncomingMessage['headers'];
  text: string;
  json: unknown;
}

export interface Recorded {
  method: string;
  path: string;
  status: number;
  json: unknown;
}

/** Every JSON answer the tests received, to be checked against the OpenAPI document. */
export const recorded: Recorded[] = [];

export interface ClientOptions {
  token?: string | undefined;
  ca?: Buffer | undefined;
}

/** One request; the body as JSON (or as given when a string or Buffer). */
export function call(server: { url: string; socket: string | null }, method: string, path: string, body?: unknown, options: ClientOptions & { headers?: Record<string, string>; chunked?: boolean } = {}): Promise<Answer> {
  const payload = body === undefined ? undefined : typeof body === 'string' || Buffer.isBuffer(body) ? Buffer.from(body) : Buffer.from(JSON.stringify(body));
  const headers: Record<string, string> = { ...(payload ? { 'content-type': 'application/json', ...(options.chunked ? {} : { 'content-length': String(payload.length) }) } : {}), ...(options.token ? { authorization: `Bearer ${options.token}` } : {}), ...options.headers };
  return new Promise((resolve, reject) => {
    const onResponse = (res: IncomingMessage): void => {
      const chunks: Buffer[] = [];
      res.on('data', (chunk: Buffer) => chunks.push(chunk));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let json: unknown = undefined;
        if (/json/.test(res.headers['content-type'] ?? '')) json = JSON.parse(text);
        if (json !== undefined) recorded.push({ method, path: path.split('?')[0]!, status: res.statusCode!, json });
        resolve({ status: res.statusCode!, headers: res.headers, text, json });
      });
      res.on('error', reject);
    };
    const url = server.socket === null ? new URL(path, server.url) : undefined;
    const common = { method, headers, path: url ? `${url.pathname}${url.search}` : path };
    const req =
      server.socket !== null
        ? httpRequest({ ...common, socketPath: server.socket }, onResponse)
        : url!.protocol === 'https:'
          ? httpsRequest({ ...common, host: url!.hostname, port: url!.port, ca: options.ca, servername: 'localhost' }, onResponse)
          : httpRequest({ ...common, host: url!.hostname, port: url!.port }, onResponse);
    req.on('error', reject);
    if (payload && options.chunked) {
      // Transfer-Encoding: chunked, no Content-Length: the server learns the size only as it reads.
      req.write(payload.subarray(0, 1024));
      req.end(payload.subarray(1024));
    } else req.end(payload);
  });
}

export interface SseEvent {
  id: number;
  type: string;
  data: Record<string, unknown>;
}

/**
 * The events of a job until the stream ends, or until `stopAfter` says so (then the client goes away
 * mid-stream: the connection is destroyed).
 */
export function readEvents(server: { url: string; socket: string | null }, jobId: string, options: ClientOptions & { stopAfter?: (event: SseEvent) => boolean; headers?: Record<string, string> } = {}): Promise<SseEvent[]> {
  return new Promise((resolve, reject) => {
    const events: SseEvent[] = [];
    const path = `/api/v1/jobs/${jobId}/events`;
    const url = server.socket === null ? new URL(path, server.url) : undefined;
    const headers = { ...(options.token ? { authorization: `Bearer ${options.token}` } : {}), ...options.headers };
    const req = (server.socket !== null ? httpRequest({ path, socketPath: server.socket, headers }) : httpRequest({ host: url!.hostname, port: url!.port, path, headers })).on('error', reject);
    req.on('response', (res) => {
      if (res.statusCode !== 200) return reject(new Error(`events: status ${res.statusCode}`));
      let buffer = '';
      res.on('data', (chunk: Buffer) => {
        buffer += chunk.toString('utf8');
        for (let end = buffer.indexOf('\n\n'); end >= 0; end = buffer.indexOf('\n\n')) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          if (block.startsWith(':')) continue;
          const field = (name: string): string => (block.split('\n').find((l) => l.startsWith(`${name}: `)) ?? '').slice(name.length + 2);
          const event = { id: Number(field('id')), type: field('event'), data: JSON.parse(field('data')) as Record<string, unknown> };
          events.push(event);
          if (options.stopAfter?.(event)) {
            req.destroy();
            return resolve(events);
          }
        }
      });
      res.on('end', () => resolve(events));
      res.on('error', reject);
    });
    req.end();
  });
}

/** Waits until the job reaches a final state; its record. */
export async function jobEnd(server: { url: string; socket: string | null }, id: string, options: ClientOptions = {}): Promise<Record<string, unknown> & { state: string }> {
  let job: Record<string, unknown> & { state: string } = { state: 'queued' };
  await waitFor(`job ${id} ends`, async () => {
    job = (await call(server, 'GET', `/api/v1/jobs/${id}`, undefined, options)).json as typeof job;
    return ['succeeded', 'failed', 'cancelled'].includes(job.state);
  }, { everyMs: 100 });
  return job;
}

// ---- OpenAPI: the subset of JSON Schema the document uses ----

type Schema = Record<string, unknown>;

export async function openApiDocument(): Promise<Schema> {
  return JSON.parse(await readFile(fileURLToPath(new URL('../engine/server/openapi.json', import.meta.url)), 'utf8')) as Schema;
}

function typeOf(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'array';
  if (typeof value === 'number') return Number.isInteger(value) ? 'integer' : 'number';
  return typeof value;
}

/** Problems of `value` against `schema` (empty: valid). Supports $ref, oneOf, type, enum, required, properties, additionalProperties, items, min/max(Items), exclusiveMinimum, pattern. */
export function validate(doc: Schema, schema: Schema, value: unknown, at = '$'): string[] {
  if (typeof schema.$ref === 'string') {
    const target = schema.$ref.replace(/^#\//, '').split('/').reduce<unknown>((node, key) => (node as Schema)[key], doc) as Schema | undefined;
    if (!target) return [`${at}: unresolved ${schema.$ref}`];
    return validate(doc, target, value, at);
  }
  const problems: string[] = [];
  const known = new Set(['$ref', 'oneOf', 'type', 'enum', 'required', 'properties', 'additionalProperties', 'items', 'minimum', 'maximum', 'exclusiveMinimum', 'pattern', 'minItems', 'maxItems', 'description', 'title', 'format']);
  for (const key of Object.keys(schema)) if (!known.has(key)) problems.push(`${at}: the checker does not know "${key}"`);
  if (Array.isArray(schema.oneOf)) {
    const passing = (schema.oneOf as Schema[]).filter((s) => validate(doc, s, value, at).length === 0).length;
    if (passing !== 1) problems.push(`${at}: matches ${passing} of oneOf's ${(schema.oneOf as Schema[]).length} schemas`);
  }
  if (schema.type !== undefined) {
    const types = Array.isArray(schema.type) ? (schema.type as string[]) : [schema.type as string];
    const actual = typeOf(value);
    if (!types.includes(actual) && !(actual === 'integer' && types.includes('number'))) return [...problems, `${at}: ${actual}, not ${types.join(' or ')}`];
  }
  if (Array.isArray(schema.enum) && !schema.enum.includes(value)) problems.push(`${at}: ${JSON.stringify(value)} not in ${JSON.stringify(schema.enum)}`);
  if (typeof value === 'number') {
    if (typeof schema.minimum === 'number' && value < schema.minimum) problems.push(`${at}: ${value} < ${schema.minimum}`);
    if (typeof schema.maximum === 'number' && value > schema.maximum) problems.push(`${at}: ${value} > ${schema.maximum}`);
    if (typeof schema.exclusiveMinimum === 'number' && value <= schema.exclusiveMinimum) problems.push(`${at}: ${value} <= ${schema.exclusiveMinimum}`);
  }
  if (typeof value === 'string' && typeof schema.pattern === 'string' && !new RegExp(schema.pattern, 'u').test(value)) problems.push(`${at}: ${JSON.stringify(value)} does not match ${schema.pattern}`);
  if (Array.isArray(value)) {
    if (typeof schema.minItems === 'number' && value.length < schema.minItems) problems.push(`${at}: fewer than ${schema.minItems} items`);
    if (typeof schema.maxItems === 'number' && value.length > schema.maxItems) problems.push(`${at}: more than ${schema.maxItems} items`);
    if (schema.items) value.forEach((item, i) => problems.push(...validate(doc, schema.items as Schema, item, `${at}[${i}]`)));
  }
  if (typeOf(value) === 'object') {
    const object = value as Record<string, unknown>;
    for (const key of (schema.required as string[] | undefined) ?? []) if (!(key in object)) problems.push(`${at}: lacks ${key}`);
    const properties = (schema.properties as Record<string, Schema> | undefined) ?? {};
    for (const [key, item] of Object.entries(object)) {
      if (properties[key]) problems.push(...validate(doc, properties[key], item, `${at}.${key}`));
      else if (schema.additionalProperties === false) problems.push(`${at}: unexpected field ${key}`);
      else if (typeof schema.additionalProperties === 'object') problems.push(...validate(doc, schema.additionalProperties as Schema, item, `${at}.${key}`));
    }
  }
  return problems;
}

/** The schema of an answer: the document's path template matching `path`, its method, its status. */
/**
 * Every recorded JSON answer against the OpenAPI document: those the document has no schema for (`unchecked`,
 * by method, path and status) and every way the others break their schema (`problems`).
 */
export function checkAnswers(doc: Schema, answers: readonly { method: string; path: string; status: number; json: unknown }[]): { unchecked: string[]; problems: string[] } {
  const unchecked: string[] = [];
  const problems: string[] = [];
  for (const answer of answers) {
    const schema = answerSchema(doc, answer.method, answer.path, answer.status);
    if (!schema) unchecked.push(`${answer.method} ${answer.path} ${answer.status}`);
    else problems.push(...validate(doc, schema, answer.json).map((p) => `${answer.method} ${answer.path} ${answer.status}: ${p}`));
  }
  return { unchecked, problems };
}

export function answerSchema(doc: Schema, method: string, path: string, status: number): Schema | undefined {
  const paths = doc.paths as Record<string, Record<string, Schema>>;
  for (const [template, item] of Object.entries(paths)) {
    const pattern = new RegExp(`^${template.replace(/\{\w+\}/g, '[^/]+')}/?$`);
    if (!pattern.test(path)) continue;
    const operation = item[method.toLowerCase()] as Schema | undefined;
    const responses = operation?.responses as Record<string, Schema> | undefined;
    const response = responses?.[String(status)];
    const schema = ((response?.content as Record<string, Schema> | undefined)?.['application/json'] as Schema | undefined)?.schema as Schema | undefined;
    if (schema || status < 400) return schema;
  }
  // An error on a path or method the API does not have (404, 405) is an error body all the same.
  return status >= 400 ? { $ref: '#/components/schemas/ErrorBody' } : undefined;
}
