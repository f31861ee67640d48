/**
 * An oVirt engine simulator: real HTTP, the documented element names, status codes and async states
 * (../shared/reference/ovirt-rest-api.md). No oVirt engine can run here; this is the one simulated part of
 * the test set-up, and everything under it (disks, snapshots, bitmaps) is meant to be real qcow2 files.
 *
 * This first part covers the protocol: SSO tokens (with forced expiry), the API root, VMs (list, search by
 * name, get), fault XML, Correlation-Id echo, a request log for assertions, and fault injection (409s).
 * Runnable on its own: `npm run ovirt-sim` (see main.ts).
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { randomUUID } from 'node:crypto';
import type { AddressInfo } from 'node:net';

export interface SimVm {
  id: string;
  name: string;
  status: 'up' | 'down' | 'paused';
}

export interface SimRequest {
  method: string;
  path: string;
  headers: IncomingMessage['headers'];
  status: number;
}

export interface SimOptions {
  username?: string;
  password?: string;
  port?: number;
}

export interface OvirtSim {
  url: string;
  vms: Map<string, SimVm>;
  requests: SimRequest[];
  /** Fault injection. */
  faults: {
    /** The next `count` requests matching method and path answer 409 with an oVirt conflict fault. */
    conflict(method: string, path: RegExp, count: number): void;
    /** Every token issued so far stops working (as after the engine's token lifetime). */
    expireTokens(): void;
  };
  addVm(name: string, status?: SimVm['status']): SimVm;
  stop(): Promise<void>;
}

function xmlEscape(text: string): string {
  return text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

export function faultXml(reason: string, detail: string): string {
  return `<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<fault>\n    <detail>${xmlEscape(detail)}</detail>\n    <reason>${xmlEscape(reason)}</reason>\n</fault>\n`;
}

function vmXml(vm: SimVm): string {
  return `<vm href="/ovirt-engine/api/vms/${vm.id}" id="${vm.id}"><name>${xmlEscape(vm.name)}</name><status>${vm.status}</status><link href="/ovirt-engine/api/vms/${vm.id}/snapshots" rel="snapshots"/><link href="/ovirt-engine/api/vms/${vm.id}/diskattachments" rel="diskattachments"/></vm>`;
}

async function readBody(req: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

export async function startOvirtSim(options: SimOptions = {}): Promise<OvirtSim> {
  const username = options.username ?? 'admin@internal';
  const password = options.password ?? 'secret';
  const tokens = new Set<string>();
  const vms = new Map<string, SimVm>();
  const requests: SimRequest[] = [];
  const conflicts: { method: string; path: RegExp; left: number }[] = [];

  const send = (req: IncomingMessage, res: ServerResponse, status: number, body: string, type = 'application/xml'): void => {
    const correlation = req.headers['correlation-id'];
    res.writeHead(status, {
      'Content-Type': type,
      ...(typeof correlation === 'string' ? { 'Correlation-Id': correlation.replace(/[^0-9a-zA-Z_-]/g, '') } : {}),
    });
    res.end(body);
    requests.push({ method: req.method ?? '', path: req.url ?? '', headers: req.headers, status });
  };

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const url = new URL(req.url ?? '/', 'http://sim');
    const method = req.method ?? 'GET';
    if (url.pathname === '/ovirt-engine/sso/oauth/token' && method === 'POST') {
      const form = new URLSearchParams(await readBody(req));
      if (form.get('grant_type') !== 'password' || form.get('scope') !== 'ovirt-app-api') {
        return send(req, res, 400, JSON.stringify({ error: 'invalid_request', error_description: 'grant_type=password and scope=ovirt-app-api are required' }), 'application/json');
      }
      if (form.get('username') !== username || form.get('password') !== password) {
        return send(req, res, 400, JSON.stringify({ error: 'access_denied', error_description: 'Cannot authenticate user: Invalid credentials' }), 'application/json');
      }
      const token = randomUUID();
      tokens.add(token);
      return send(req, res, 200, JSON.stringify({ access_token: token, token_type: 'bearer', scope: 'ovirt-app-api', exp: String(Date.now() + 3_600_000) }), 'application/json');
    }
    if (!url.pathname.startsWith('/ovirt-engine/api')) return send(req, res, 404, faultXml('Not Found', url.pathname));
    const auth = req.headers.authorization ?? '';
    if (!auth.startsWith('Bearer ') || !tokens.has(auth.slice(7))) {
      res.setHeader('WWW-Authenticate', 'Bearer');
      return send(req, res, 401, '', 'text/html');
    }
    const version = req.headers.version;
    if (version !== undefined && version !== '4') return send(req, res, 400, faultXml('Operation Failed', `Version ${String(version)} is not supported`));
    const path = url.pathname.slice('/ovirt-engine/api'.length).replace(/\/$/, '');
    const conflict = conflicts.find((c) => c.method === method && c.path.test(path) && c.left > 0);
    if (conflict) {
      conflict.left -= 1;
      return send(req, res, 409, faultXml('Operation Failed', '[Cannot perform action. Related operation is currently in progress. Please try again later.]'));
    }
    if (path === '' && method === 'GET') {
      return send(req, res, 200, '<api><product_info><name>oVirt Engine</name><vendor>ovirt.org</vendor><version><build>0</build><full_version>4.5.5-sim</full_version><major>4</major><minor>5</minor><revision>5</revision></version></product_info></api>');
    }
    if (path === '/vms' && method === 'GET') {
      const search = url.searchParams.get('search');
      const nameMatch = search ? /^name=(.+)$/.exec(search) : null;
      const list = [...vms.values()].filter((vm) => !nameMatch || vm.name === nameMatch[1]);
      return send(req, res, 200, `<vms>${list.map(vmXml).join('')}</vms>`);
    }
    const vmMatch = /^\/vms\/([^/]+)$/.exec(path);
    if (vmMatch && method === 'GET') {
      const vm = vms.get(vmMatch[1]!);
      if (!vm) return send(req, res, 404, faultXml('Operation Failed', `Entity not found: ${vmMatch[1]}`));
      return send(req, res, 200, vmXml(vm));
    }
    return send(req, res, 404, faultXml('Not Found', `${method} ${url.pathname}`));
  };

  const server: Server = createServer((req, res) => {
    handle(req, res).catch((error: unknown) => send(req, res, 500, faultXml('Internal Server Error', String(error))));
  });
  await new Promise<void>((resolve) => server.listen(options.port ?? 0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    vms,
    requests,
    faults: {
      conflict: (method, path, count) => conflicts.push({ method, path, left: count }),
      expireTokens: () => tokens.clear(),
    },
    addVm(name, status = 'up') {
      const vm: SimVm = { id: randomUUID(), name, status };
      vms.set(vm.id, vm);
      return vm;
    },
    stop: () => new Promise((resolve) => server.close(() => resolve())),
  };
}
