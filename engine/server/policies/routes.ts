/**
 * The policies' endpoints (SPEC.md 23.1):
 *
 *   GET    /api/v1/policies                       every policy of the config, with its last and next slot
 *   GET    /api/v1/policies/{p}                   one
 *   GET    /api/v1/policies/{p}/runs[?state=&vm=&limit=]   its runs, newest first (default 100, at most 1000)
 *   POST   /api/v1/policies/{p}/run               run it now (operator): 202 and the runs started
 */
import { InvalidArgumentError } from '../../../repo-format/errors.js';
import { sendJson, type RequestContext, type Route } from '../http.js';
import type { Scheduler } from './scheduler.js';
import { KEEP_RUNS } from './store.js';

const RUN_STATES = ['running', 'succeeded', 'failed', 'skipped'];

function onlyQuery(query: URLSearchParams, allowed: readonly string[]): void {
  for (const key of query.keys()) if (!allowed.includes(key)) throw new InvalidArgumentError(`unknown query parameter ${JSON.stringify(key.slice(0, 64))}${allowed.length > 0 ? ` (known: ${allowed.join(', ')})` : ''}`, { field: key.slice(0, 64) });
}

export function policyRoutes(scheduler: Scheduler): Route[] {
  const path = (pattern: string): RegExp => new RegExp(`^${pattern.replace(/\{(\w+)\}/g, (_, name: string) => `(?<${name}>[^/]+)`)}/?$`);
  return [
    {
      method: 'GET',
      path: path('/api/v1/policies'),
      role: 'read',
      handle: async ({ res, query }: RequestContext) => {
        onlyQuery(query, []);
        sendJson(res, 200, { policies: scheduler.list() });
      },
    },
    {
      method: 'GET',
      path: path('/api/v1/policies/{policy}'),
      role: 'read',
      handle: async ({ res, params, query }: RequestContext) => {
        onlyQuery(query, []);
        sendJson(res, 200, scheduler.get(params.policy!));
      },
    },
    {
      method: 'GET',
      path: path('/api/v1/policies/{policy}/runs'),
      role: 'read',
      handle: async ({ res, params, query }: RequestContext) => {
        onlyQuery(query, ['state', 'vm', 'limit']);
        const state = query.get('state') ?? undefined;
        if (state !== undefined && !RUN_STATES.includes(state)) throw new InvalidArgumentError(`state must be one of ${RUN_STATES.join(', ')}`, { field: 'state' });
        const limitText = query.get('limit');
        const limit = limitText === null ? 100 : Number(limitText);
        if (!Number.isInteger(limit) || limit < 1 || limit > KEEP_RUNS || !/^\d+$/.test(limitText ?? '1')) throw new InvalidArgumentError(`limit must be an integer from 1 to ${KEEP_RUNS}`, { field: 'limit' });
        sendJson(res, 200, { runs: scheduler.runs(params.policy!, { state, vm: query.get('vm') ?? undefined, limit }) });
      },
    },
    {
      method: 'POST',
      path: path('/api/v1/policies/{policy}/run'),
      role: 'operator',
      handle: async ({ res, params, query }: RequestContext) => {
        onlyQuery(query, []);
        sendJson(res, 202, { runs: await scheduler.runNow(params.policy!) });
      },
    },
  ];
}
