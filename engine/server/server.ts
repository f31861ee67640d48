/**
 * `engine server`: one long-running process owning the repositories of its config, running jobs through the
 * engine's library API, and answering the service API (SPEC.md "The service API"):
 *
 *   GET    /api/openapi.json                           the OpenAPI 3.1 document (openapi.json, served as is)
 *   GET    /api/v1/jobs[?state=&repository=]           jobs in memory (the newest 200 finished ones, every live one)
 *   POST   /api/v1/jobs                                start a job (operator): 202 and the job, queued
 *   GET    /api/v1/jobs/{id}                           one job
 *   DELETE /api/v1/jobs/{id}                           cancel it (operator)
 *   GET    /api/v1/jobs/{id}/events                    Server-Sent Events: state, progress, log, end
 *   GET    /api/v1/repositories                        the repositories
 *   GET    /api/v1/repositories/{r}/backups            as `list --json`, filtered, with chains
 *   GET    /api/v1/repositories/{r}/backups/{id}       as `show --json`, with its chain
 *   GET    /api/v1/repositories/{r}/stats              stored vs logical bytes, ratios
 *   GET    /api/v1/policies[/{p}], /{p}/runs; POST /{p}/run   scheduled policies (policies/routes.ts)
 *   GET    /metrics                                    Prometheus text format (metrics.ts); without a token if the config says so
 *
 * Every request but the OpenAPI document needs a bearer token when the config names a tokens file.
 */
import { createServer as createHttpServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { readFile } from 'node:fs/promises';
import type { Socket } from 'node:net';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { listenOnUnixSocket, type ListeningSocket } from '../nbd/unix-socket.js';
import { TokenStore, requireRole } from './auth.js';
import { backupOf, backupsOf, parseFilter, statsOf } from './catalogue.js';
import { loadConfig, REPOSITORY_NAME, type RepositoryConfig, type ServerConfig } from './config.js';
import { NotFoundError } from './errors.js';
import { errorJson, matchRoute, readJsonBody, sendError, sendJson, type RequestContext, type Route } from './http.js';
import { JobJournal, JOB_ID } from './journal.js';
import { JobManager, type JobEvent } from './jobs.js';
import { parseJobRequest } from './job-requests.js';
import { planServerListen } from './listen.js';
import { openApiDocument } from './openapi.js';
import { realClock, type Clock } from './policies/clock.js';
import { policyRoutes } from './policies/routes.js';
import { Scheduler } from './policies/scheduler.js';
import { metricsRoute, sendMetrics, ServerMetrics } from './metrics.js';
import { applyS3Settings } from './s3-settings.js';
import { createDashboard } from './dashboard/dashboard.js';

export interface ServerOptions {
  config: string;
  listen?: string | undefined;
  socket?: string | undefined;
  tls?: { cert: string; key: string } | undefined;
  insecure?: boolean | undefined;
  /** The server's log: job ends, refused TLS handshakes, recovered jobs (stderr in the CLI). */
  onLog?: ((message: string) => void) | undefined;
  /** The policies' clock (tests drive it; policies/clock.ts): default the real one. */
  clock?: Clock | undefined;
  /** Each job event as it is emitted, before any client has it (bench/server.ts times the SSE stream with it). */
  onJobEvent?: ((job: string, event: JobEvent) => void) | undefined;
}

export interface ServerHandle {
  /** `http://HOST:PORT`, `https://…`, or the socket's path. */
  url: string;
  host: string | null;
  port: number | null;
  socket: string | null;
  tls: boolean;
  warnings: string[];
  /** Stops: no new connections, jobs cancelled as by SIGINT and awaited, the socket removed. */
  close(): Promise<void>;
}

const SSE_HEARTBEAT_MS = 15_000;

export async function startServer(options: ServerOptions): Promise<ServerHandle> {
  const log = options.onLog ?? (() => undefined);
  const config = await loadConfig(options.config);
  const tokens = await TokenStore.open(config.tokensFile);
  const plan = planServerListen({ listen: options.listen, socket: options.socket, tls: options.tls, tokens: tokens.required, insecure: options.insecure });
  const tls = options.tls === undefined ? undefined : { cert: await readPem(options.tls.cert, 'certificate'), key: await readPem(options.tls.key, 'key') };
  await applyS3Settings(config, log);
  const journal = await JobJournal.open(config.stateDir);
  const jobs = await JobManager.start(config, journal, log, options.onJobEvent);
  const scheduler = await Scheduler.start(config, jobs, options.clock ?? realClock, log);
  const openSse = new Set<ServerResponse>();
  const metrics = new ServerMetrics(config, (name) => jobs.passphrase(name), log);
  jobs.onJobEnd((record) => metrics.jobEnded(record));
  metrics.start();
  const routes = [...buildRoutes(config, jobs, openSse), ...policyRoutes(scheduler), metricsRoute(metrics, jobs)];
  const dashboard = createDashboard({ config, jobs, tokens, tls: tls !== undefined, policies: () => scheduler.list() });

  const handler = (req: IncomingMessage, res: ServerResponse): void => {
    void answer(req, res).catch((error: unknown) => {
      metrics.apiError(errorJson(error).code);
      sendError(res, error);
    });
  };
  const answer = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const url = new URL(req.url ?? '/', 'http://server');
    if (url.pathname === '/api/openapi.json' && req.method === 'GET') {
      sendJson(res, 200, await openApiDocument());
      return;
    }
    if (url.pathname === '/metrics' && config.metricsAnonymous && (req.method === 'GET' || req.method === 'HEAD') && url.search === '') {
      sendMetrics(res, metrics.render(jobs));
      return;
    }
    // The web dashboard's pages, login and assets (dashboard/); its page calls the API with its session cookie.
    if (await dashboard.serve(req, res, url)) return;
    // Who asks, before what is asked is looked at: without a token even a path that does not exist is 401.
    const principal =
      (await dashboard.principalOf(req)) ??
      (await tokens.authenticate(req.headers.authorization).catch((error: unknown) => {
        res.setHeader('www-authenticate', 'Bearer realm="engine"');
        throw error;
      }));
    const { route, params } = matchRoute(routes, req.method ?? 'GET', url.pathname);
    requireRole(principal, route.role, `${route.method} ${url.pathname}`);
    await route.handle({ req, res, params, query: url.searchParams, principal });
  };

  const server: Server = tls ? createHttpsServer({ ...tls, minVersion: 'TLSv1.2' }, handler) : createHttpServer(handler);
  // A body over the limit is answered 413 and the connection closed; the rest is never read.
  server.requestTimeout = 60_000;
  server.headersTimeout = 30_000;
  server.on('tlsClientError', (error: Error, socket: Socket) => {
    log(`refused a TLS connection from ${socket.remoteAddress ?? 'a client'}: ${error.message}`);
    socket.destroy();
  });
  server.on('clientError', (_error: Error, socket: Socket) => {
    if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n{"error":{"code":"ENGINE_INVALID_ARGUMENT","message":"not an HTTP request this server can read","details":{}}}\n');
    else socket.destroy();
  });

  let socket: ListeningSocket | undefined;
  let address: { host: string | null; port: number | null; socket: string | null };
  if ('socket' in plan.address) {
    socket = await listenOnUnixSocket(server, plan.address.socket, log);
    address = { host: null, port: null, socket: socket.path };
  } else {
    const { host, port } = plan.address;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => {
        server.off('error', reject);
        resolve();
      });
    });
    const bound = server.address();
    address = { host, port: typeof bound === 'object' && bound !== null ? bound.port : port, socket: null };
  }
  const warnings = plan.warnings(address.port);
  for (const warning of warnings) log(warning);
  let closing: Promise<void> | undefined;
  return {
    url: address.socket ?? `${tls ? 'https' : 'http'}://${address.host!.includes(':') ? `[${address.host}]` : address.host}:${address.port}`,
    ...address,
    tls: tls !== undefined,
    warnings,
    close: () =>
      (closing ??= (async () => {
        const closed = new Promise<void>((resolve) => server.close(() => resolve()));
        await scheduler.stop();
        await jobs.stop();
        await scheduler.settled();
        await metrics.close();
        for (const res of openSse) res.end();
        server.closeAllConnections();
        await closed;
        await socket?.remove();
      })()),
  };
}

async function readPem(path: string, what: string): Promise<Buffer> {
  return readFile(path).catch((error: NodeJS.ErrnoException) => {
    throw new InvalidArgumentError(`cannot read the TLS ${what} ${path}: ${error.code ?? error.message}`, { path });
  });
}

function repositoryOf(config: ServerConfig, name: string): RepositoryConfig {
  const repo = REPOSITORY_NAME.test(name) ? config.repositories.get(name) : undefined;
  if (!repo) throw new NotFoundError(`no repository named ${JSON.stringify(name.slice(0, 64))} in this server's config`, { repository: name.slice(0, 64) });
  return repo;
}

function jobIdOf(id: string): string {
  if (!JOB_ID.test(id)) throw new NotFoundError(`no job ${JSON.stringify(id.slice(0, 64))}: job ids are 32 hex digits`, { job: id.slice(0, 64) });
  return id;
}

function noQuery(query: URLSearchParams, allowed: readonly string[] = []): void {
  for (const key of query.keys()) if (!allowed.includes(key)) throw new InvalidArgumentError(`unknown query parameter ${JSON.stringify(key.slice(0, 64))}${allowed.length > 0 ? ` (known: ${allowed.join(', ')})` : ''}`, { field: key.slice(0, 64) });
}

function buildRoutes(config: ServerConfig, jobs: JobManager, openSse: Set<ServerResponse>): Route[] {
  const segment = '([^/]+)';
  const path = (pattern: string): RegExp => new RegExp(`^${pattern.replace(/\{(\w+)\}/g, (_, name: string) => `(?<${name}>${segment.slice(1, -1)})`)}/?$`);
  return [
    {
      method: 'GET',
      path: path('/api/v1/jobs'),
      role: 'read',
      handle: async ({ res, query }: RequestContext) => {
        noQuery(query, ['state', 'repository']);
        sendJson(res, 200, { jobs: jobs.list({ state: query.get('state') ?? undefined, repository: query.get('repository') ?? undefined }) });
      },
    },
    {
      method: 'POST',
      path: path('/api/v1/jobs'),
      role: 'operator',
      handle: async ({ req, res, query, principal }: RequestContext) => {
        noQuery(query);
        const request = parseJobRequest(await readJsonBody(req));
        repositoryOf(config, request.repository);
        if (request.kind === 'copy') repositoryOf(config, request.to);
        const job = await jobs.submit(request, principal.label);
        sendJson(res, 202, job, { location: `/api/v1/jobs/${job.id}` });
      },
    },
    {
      method: 'GET',
      path: path('/api/v1/jobs/{id}'),
      role: 'read',
      handle: async ({ res, params, query }: RequestContext) => {
        noQuery(query);
        sendJson(res, 200, jobs.get(jobIdOf(params.id!)));
      },
    },
    {
      method: 'DELETE',
      path: path('/api/v1/jobs/{id}'),
      role: 'operator',
      handle: async ({ res, params, query }: RequestContext) => {
        noQuery(query);
        sendJson(res, 202, await jobs.cancel(jobIdOf(params.id!)));
      },
    },
    {
      method: 'GET',
      path: path('/api/v1/jobs/{id}/events'),
      role: 'read',
      handle: async ({ req, res, params, query }: RequestContext) => {
        noQuery(query);
        const id = jobIdOf(params.id!);
        jobs.get(id);
        const after = Number(req.headers['last-event-id'] ?? 0);
        streamEvents(res, openSse, (listener, onEnd) => jobs.subscribe(id, Number.isSafeInteger(after) ? after : 0, listener, onEnd));
      },
    },
    {
      method: 'GET',
      path: path('/api/v1/repositories'),
      role: 'read',
      handle: async ({ res, query }: RequestContext) => {
        noQuery(query);
        sendJson(res, 200, {
          repositories: [...config.repositories.values()].map((r) => ({ name: r.name, location: r.location, encrypted: r.passwordFile !== undefined, limits: { jobs: r.jobs }, jobs: jobs.counts(r.name) })),
        });
      },
    },
    {
      method: 'GET',
      path: path('/api/v1/repositories/{repository}/backups'),
      role: 'read',
      handle: async ({ res, params, query }: RequestContext) => {
        const repo = repositoryOf(config, params.repository!);
        sendJson(res, 200, await backupsOf(repo, jobs.passphrase(repo.name), parseFilter(query)));
      },
    },
    {
      method: 'GET',
      path: path('/api/v1/repositories/{repository}/backups/{id}'),
      role: 'read',
      handle: async ({ res, params, query }: RequestContext) => {
        noQuery(query);
        const repo = repositoryOf(config, params.repository!);
        sendJson(res, 200, await backupOf(repo, jobs.passphrase(repo.name), params.id!));
      },
    },
    {
      method: 'GET',
      path: path('/api/v1/repositories/{repository}/stats'),
      role: 'read',
      handle: async ({ res, params, query }: RequestContext) => {
        noQuery(query);
        const repo = repositoryOf(config, params.repository!);
        sendJson(res, 200, await statsOf(repo, jobs.passphrase(repo.name)));
      },
    },
  ];
}

/**
 * Server-Sent Events: each event as `id`, `event` and one `data` line of JSON; a comment every 15 s keeps
 * proxies from closing an idle stream. A client that goes away mid-stream unsubscribes (the job runs on);
 * the stream ends after the `end` event.
 */
function streamEvents(res: ServerResponse, open: Set<ServerResponse>, subscribe: (listener: (event: JobEvent) => void, onEnd: () => void) => () => void): void {
  res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-store', connection: 'keep-alive', 'x-accel-buffering': 'no' });
  res.flushHeaders();
  open.add(res);
  let unsubscribe = (): void => undefined;
  const heartbeat = setInterval(() => res.write(': keep-alive\n\n'), SSE_HEARTBEAT_MS);
  heartbeat.unref();
  const end = (): void => {
    clearInterval(heartbeat);
    unsubscribe();
    open.delete(res);
    if (!res.writableEnded) res.end();
  };
  res.on('close', end);
  unsubscribe = subscribe(
    (event) => {
      if (!res.writableEnded) res.write(`id: ${event.id}\nevent: ${event.type}\ndata: ${JSON.stringify(event.data)}\n\n`);
    },
    () => setImmediate(end),
  );
}
