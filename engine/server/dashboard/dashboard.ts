/**
 * The web dashboard of `engine server` (SPEC.md 23, "The dashboard"): server-rendered pages (page.ts) at `/`,
 * a login form and browser sessions (sessions.ts), two forms that start a backup or a restore through the same
 * job queue as `POST /api/v1/jobs`, and three static files (a stylesheet, a small ES module that follows
 * running jobs' event streams, and the bench chart of the checkout). No framework and no build step: the page
 * is complete without script, the module only makes progress live.
 *
 *   GET  /                  the dashboard (a login first when the server has a tokens file)
 *   GET  /login, POST /login   the token form; a session cookie
 *   POST /logout            ends the session
 *   POST /ui/jobs           a form's backup or restore (operator, CSRF token)
 *   GET  /assets/…          dashboard.css, dashboard.js, bench-chart.svg
 *   GET  /favicon.ico       204: there is none
 *
 * Every page is sent with a Content-Security-Policy that allows only this server's own scripts, styles and
 * images (no inline script or style, no other origin), and is never cached.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { readFile, stat } from 'node:fs/promises';
import { InvalidArgumentError } from '../../../repo-format/errors.js';
import { PACKAGE_ROOT } from '../../version.js';
import { requireRole, tokenHash, type Principal, type TokenStore } from '../auth.js';
import { catalogueOf, statsOf } from '../catalogue.js';
import type { ServerConfig } from '../config.js';
import { ForbiddenError } from '../errors.js';
import { errorJson, readBody } from '../http.js';
import type { JobManager } from '../jobs.js';
import { parseJobRequest } from '../job-requests.js';
import type { Markup } from './html.js';
import { dashboardPage, loginPage, messagePage, type BenchView, type PolicyView, type RepositoryView } from './page.js';
import { changesState, checkOrigin, csrfMatches, Sessions } from './sessions.js';

export const CONTENT_SECURITY_POLICY = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const PAGE_HEADERS = {
  'content-security-policy': CONTENT_SECURITY_POLICY,
  'x-content-type-options': 'nosniff',
  // Not no-referrer: with it Chromium sends `Origin: null` on the page's own form posts, which checkOrigin refuses.
  'referrer-policy': 'same-origin',
  'x-frame-options': 'DENY',
  'cache-control': 'no-store',
};

/** A form is a few hundred bytes. */
const MAX_FORM_BYTES = 16 * 1024;

const ASSETS: Record<string, { file: URL; type: string }> = {
  '/assets/dashboard.css': { file: new URL('engine/server/dashboard/assets/dashboard.css', PACKAGE_ROOT), type: 'text/css; charset=utf-8' },
  '/assets/dashboard.js': { file: new URL('engine/server/dashboard/assets/dashboard.js', PACKAGE_ROOT), type: 'text/javascript; charset=utf-8' },
  '/assets/bench-chart.svg': { file: new URL('bench/results/suite-latest.svg', PACKAGE_ROOT), type: 'image/svg+xml' },
};
const BENCH_JSON = new URL('bench/results/suite-latest.json', PACKAGE_ROOT);

export interface Dashboard {
  /** Answers the dashboard's own paths; false for any other (the API's). */
  serve(req: IncomingMessage, res: ServerResponse, url: URL): Promise<boolean>;
  /**
   * Who a request of the API is when it comes from the dashboard's page: its session (the cookie), with the
   * CSRF header checked on a state-changing request; undefined when it has a bearer header or no session.
   * Any state-changing request without a bearer header from a page of another origin is refused.
   */
  principalOf(req: IncomingMessage): Promise<Principal | undefined>;
}

export function createDashboard(options: { config: ServerConfig; jobs: JobManager; tokens: TokenStore; tls: boolean; now?: () => number; policies?: () => PolicyView[] }): Dashboard {
  const { config, jobs, tokens, tls } = options;
  const now = options.now ?? Date.now;
  const sessions = new Sessions(tokens, tls, now);

  const send = (res: ServerResponse, status: number, page: Markup, headers: Record<string, string> = {}): void => {
    const body = page.text;
    res.writeHead(status, { 'content-type': 'text/html; charset=utf-8', 'content-length': Buffer.byteLength(body), ...PAGE_HEADERS, ...headers });
    res.end(body);
  };
  const redirect = (res: ServerResponse, location: string, headers: Record<string, string> = {}): void => {
    res.writeHead(303, { location, 'content-length': 0, ...PAGE_HEADERS, ...headers });
    res.end();
  };

  const pageFor = async (principal: Principal, csrf: string, url: URL): Promise<Markup> => {
    const repositories = await Promise.all(
      [...config.repositories.values()].map(async (repo): Promise<RepositoryView> => {
        const passphrase = jobs.passphrase(repo.name);
        try {
          const [catalogue, stats] = await Promise.all([catalogueOf(repo, passphrase), statsOf(repo, passphrase)]);
          return { name: repo.name, location: repo.location, catalogue, stats, error: undefined };
        } catch (error) {
          const { code, message } = errorJson(error);
          return { name: repo.name, location: repo.location, catalogue: undefined, stats: undefined, error: { code, message } };
        }
      }),
    );
    const vmPage = Number(url.searchParams.get('vmPage') ?? 0);
    const started = url.searchParams.get('started');
    return dashboardPage({
      principal,
      csrf,
      repositories,
      jobs: jobs.list(),
      bench: await benchView(),
      now: now(),
      vmPage: Number.isSafeInteger(vmPage) && vmPage >= 0 ? vmPage : 0,
      notice: started !== null && /^[0-9a-f]{32}$/.test(started) ? `Job ${started.slice(0, 8)} started: its progress is below.` : undefined,
      policies: options.policies?.() ?? [],
    });
  };

  const serve = async (req: IncomingMessage, res: ServerResponse, url: URL): Promise<boolean> => {
    const path = url.pathname;
    const method = req.method ?? 'GET';
    const asset = ASSETS[path];
    if (asset && (method === 'GET' || method === 'HEAD')) {
      const body = await readFile(asset.file).catch(() => undefined);
      if (!body) {
        send(res, 404, messagePage('Not found', `${path} is not in this installation`));
        return true;
      }
      res.writeHead(200, { 'content-type': asset.type, 'content-length': body.length, ...PAGE_HEADERS, 'cache-control': 'no-cache' });
      res.end(method === 'HEAD' ? undefined : body);
      return true;
    }
    if (path === '/favicon.ico') {
      // Browsers ask for it unasked: no icon, and no 401 or 404 in the console for it.
      res.writeHead(204, { ...PAGE_HEADERS, 'cache-control': 'max-age=86400' });
      res.end();
      return true;
    }
    if (path === '/' && (method === 'GET' || method === 'HEAD')) {
      let current = await sessions.current(req);
      if (!current && !tokens.required) {
        // No tokens file: every local user is the `local` operator; the session is only for its CSRF token.
        const { session, setCookie } = sessions.open('local');
        current = { session, principal: { role: 'operator', label: 'local' } };
        send(res, 200, await pageFor(current.principal, session.csrf, url), { 'set-cookie': setCookie });
        return true;
      }
      if (!current) {
        redirect(res, '/login');
        return true;
      }
      send(res, 200, await pageFor(current.principal, current.session.csrf, url));
      return true;
    }
    if (path === '/login' && method === 'GET') {
      send(res, 200, loginPage(undefined));
      return true;
    }
    if (path === '/login' && method === 'POST') {
      checkOrigin(req, tls);
      const form = await readForm(req);
      const token = form.get('token') ?? '';
      const hash = tokenHash(token.trim());
      const principal = tokens.required ? await tokens.byHash(hash) : { role: 'operator' as const, label: 'local' };
      if (!principal) {
        send(res, 401, loginPage('That token is not known to this server.'));
        return true;
      }
      const { setCookie } = sessions.open(tokens.required ? hash : 'local');
      redirect(res, '/', { 'set-cookie': setCookie });
      return true;
    }
    if (path === '/logout' && method === 'POST') {
      checkOrigin(req, tls);
      const current = await sessions.current(req);
      const form = await readForm(req);
      if (current && !csrfMatches(current.session, form.get('csrf') ?? undefined)) throw new ForbiddenError('the form is not one of this session (its CSRF token does not match)');
      redirect(res, '/login', { 'set-cookie': sessions.close(req) });
      return true;
    }
    if (path === '/ui/jobs' && method === 'POST') {
      checkOrigin(req, tls);
      const current = await sessions.current(req);
      if (!current) {
        redirect(res, '/login');
        return true;
      }
      const form = await readForm(req);
      if (!csrfMatches(current.session, form.get('csrf') ?? undefined)) throw new ForbiddenError('the form is not one of this session (its CSRF token does not match)');
      requireRole(current.principal, 'operator', 'starting a job');
      try {
        const job = await jobs.submit(parseJobRequest(jobRequestOf(form)), current.principal.label);
        redirect(res, `/?started=${job.id}#jobs`);
      } catch (error) {
        const { code, message } = errorJson(error);
        send(res, 400, messagePage('The job was not started', `${code}: ${message}`));
      }
      return true;
    }
    return false;
  };

  const principalOf = async (req: IncomingMessage): Promise<Principal | undefined> => {
    const changing = changesState(req.method);
    if (req.headers.authorization !== undefined) return undefined;
    if (changing) checkOrigin(req, tls);
    const current = await sessions.current(req);
    if (!current) return undefined;
    if (changing) {
      const header = req.headers['x-csrf-token'];
      if (!csrfMatches(current.session, typeof header === 'string' ? header : undefined)) throw new ForbiddenError('a request with the dashboard session cookie must carry its CSRF token (X-CSRF-Token)');
    }
    return current.principal;
  };

  return { serve, principalOf };
}

/** A form's fields (application/x-www-form-urlencoded), at most MAX_FORM_BYTES. */
async function readForm(req: IncomingMessage): Promise<URLSearchParams> {
  const type = req.headers['content-type'] ?? '';
  if (!/^application\/x-www-form-urlencoded\s*(;|$)/i.test(type)) throw new InvalidArgumentError('a form is application/x-www-form-urlencoded');
  return new URLSearchParams(await readBody(req, MAX_FORM_BYTES));
}

/** The API's job request a form describes; parseJobRequest checks it as it checks a posted one. */
function jobRequestOf(form: URLSearchParams): Record<string, unknown> {
  const value = (key: string): string | undefined => {
    const v = form.get(key)?.trim();
    return v === undefined || v === '' ? undefined : v;
  };
  const kind = value('kind');
  if (kind === 'backup') {
    const diskKind = value('diskKind') ?? 'image';
    const disk = value('disk');
    return {
      kind,
      repository: value('repository'),
      ...(value('name') === undefined ? {} : { name: value('name') }),
      mode: value('mode') ?? 'auto',
      disks: [diskKind === 'nbd' ? { kind: 'nbd', uri: disk } : { kind: diskKind, path: disk }],
    };
  }
  if (kind === 'restore') {
    const [repository, backup] = (value('backup') ?? '').split('/');
    const targetKind = value('targetKind') ?? 'file';
    const target = value('target');
    return { kind, repository, backup, target: targetKind === 'nbd' ? { kind: 'nbd', uri: target } : { kind: targetKind, path: target }, force: form.get('force') === 'yes' };
  }
  throw new InvalidArgumentError('the form starts a backup or a restore');
}

/** The newest bench results of the checkout (bench/results/suite-latest.*), or why there are none. */
async function benchView(): Promise<BenchView> {
  const svg = await stat(ASSETS['/assets/bench-chart.svg']!.file).catch(() => undefined);
  if (!svg) return { chart: undefined, caption: 'No bench results: this installation has no bench/results/suite-latest.svg (a checkout makes it with npm run bench; an installed package carries none).' };
  const meta = await readFile(BENCH_JSON, 'utf8')
    .then((text) => JSON.parse(text) as { machine?: string; load?: { start?: string; end?: string } })
    .catch(() => undefined);
  const parts = [`bench/results/suite-latest.svg, written ${svg.mtime.toISOString().slice(0, 16).replace('T', ' ')} UTC`];
  if (meta?.machine) parts.push(`on ${meta.machine}`);
  if (meta?.load?.start) parts.push(`load average at start ${meta.load.start}`);
  return { chart: '/assets/bench-chart.svg', caption: `${parts.join(', ')}. MB/s of disk size; higher is better.` };
}
