/**
 * ovirt-imageio as the simulator serves it: a daemon (the host's imageio, `transfer_url`, port 54322 on a
 * real host) and a proxy (the engine host's imageio, `proxy_url`, port 54323), both reading and writing
 * the same tickets. Each ticket is a qemu-nbd export reached through the engine's own NBD client.
 *
 * Behaviour and its sources (oVirt/ovirt-imageio @ 0eb617cd4d9d7c457c6420dd5267d361b2c6e442; see
 * BEHAVIOUR.md for the whole table):
 * - A request for a ticket that does not exist, or no longer does, is 403 (`auth.authorize` raising
 *   AuthorizationError; ovirt_imageio/_internal/handlers/images.py, extents.py).
 * - OPTIONS answers what the ticket allows: `Allow: OPTIONS,GET` and features [checksum, extents] for a
 *   read ticket, `OPTIONS,GET,PUT,PATCH` and [checksum, extents, flush, zero] for a write ticket, with
 *   max_readers/max_writers (handlers/images.py `options`, BASE_FEATURES/ALL_FEATURES).
 * - GET with a Range answers 206 with `Content-Range: bytes first-last/<ticket size>`; a range past the
 *   ticket's size is 416 (handlers/images.py `get`, validate.allowed_range).
 * - /extents?context=zero|dirty; dirty on a ticket without dirty support is 404 "Ticket does not support
 *   dirty extents" (handlers/extents.py).
 * - PUT needs Content-Length, writes at Content-Range's first byte, flushes unless `flush=n`; PATCH
 *   {"op": "zero"|"flush"} (handlers/images.py `put`, `patch`). A write the storage refuses (a block
 *   volume that is full) fails the request (500).
 * - A ticket is active while an operation runs; its idle time counts from the end of the last operation,
 *   OPTIONS included (ovirt_imageio/_internal/auth.py `active`, `idle_time`, `touch`). The engine reads
 *   that to cancel idle transfers (ovirt-engine TransferDiskImageCommand `stopTransferIfNecessary`).
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import { NbdClient } from '../../engine/nbd/client.js';

export interface ImageioTicket {
  id: string;
  transferId: string;
  /** ['read'] for a download, ['write'] for an upload ("write" implies read: auth.py `may`). */
  ops: ('read' | 'write')[];
  size: number;
  /** The qemu-nbd export behind the ticket. */
  socket: string;
  /** The dirty bitmap of an incremental backup disk (the ticket's `dirty` flag). */
  dirtyBitmap: string | undefined;
  /** Operations running now, and when the last one ended (ms since epoch). */
  ongoing: number;
  accessTime: number;
  /** Test knob: each GET of this ticket waits this long before it is served. */
  readDelayMs: number;
}

export interface ImageioService {
  /** The daemon's base URL (the host) and the proxy's (the engine host). */
  daemonUrl: string;
  proxyUrl: string;
  tickets: Map<string, ImageioTicket>;
  add(ticket: Omit<ImageioTicket, 'ongoing' | 'accessTime' | 'readDelayMs'>): ImageioTicket;
  remove(id: string): Promise<void>;
  /** Idle time of a ticket in ms: 0 while an operation runs. */
  idleMs(id: string): number;
  /** The host's imageio stops answering (its port closed): only the proxy is left. */
  stopDaemon(): Promise<void>;
  close(): Promise<void>;
}

async function readBody(req: IncomingMessage): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

function text(res: ServerResponse, status: number, message: string): void {
  res.writeHead(status, { 'Content-Type': 'text/plain', 'Content-Length': String(Buffer.byteLength(message)) });
  res.end(message);
}

export async function startImageio(options: { tls?: { key: string; cert: string } | undefined }): Promise<ImageioService> {
  const tickets = new Map<string, ImageioTicket>();
  const clients = new Map<string, Promise<NbdClient>>();
  const nbdFor = (t: ImageioTicket): Promise<NbdClient> => {
    let client = clients.get(t.id);
    if (!client) {
      client = NbdClient.connect(`nbd+unix:///?socket=${t.socket}`, { metaContexts: ['base:allocation', ...(t.dirtyBitmap ? [`qemu:dirty-bitmap:${t.dirtyBitmap}`] : [])] });
      clients.set(t.id, client);
    }
    return client;
  };

  const serve = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const url = new URL(req.url ?? '/', 'http://imageio');
    const match = /^\/images\/([^/]+)(\/extents)?$/.exec(url.pathname);
    const ticket = match ? tickets.get(match[1]!) : undefined;
    if (!match || !ticket) {
      res.setHeader('Connection', 'close');
      return text(res, 403, `You are not allowed to access this resource: No such ticket ${match?.[1] ?? ''}`);
    }
    const may = (op: 'read' | 'write'): boolean => (op === 'read' ? ticket.ops.includes('read') || ticket.ops.includes('write') : ticket.ops.includes(op));
    if (req.method === 'OPTIONS') {
      ticket.accessTime = Date.now(); // "Accessing ticket options considered as client activity."
      const allow = ['OPTIONS', ...(may('read') ? ['GET'] : []), ...(may('write') ? ['PUT', 'PATCH'] : [])];
      const features = may('write') ? ['checksum', 'extents', 'flush', 'zero'] : ['checksum', 'extents'];
      const body = JSON.stringify({ features, max_readers: 8, max_writers: 8 });
      res.writeHead(200, { Allow: allow.join(','), 'Content-Type': 'application/json', 'Content-Length': String(Buffer.byteLength(body)) });
      return void res.end(body);
    }
    const needed = req.method === 'PUT' || req.method === 'PATCH' ? 'write' : 'read';
    if (!may(needed)) {
      res.setHeader('Connection', 'close');
      return text(res, 403, `You are not allowed to access this resource: Ticket ${ticket.id} forbids ${needed}`);
    }
    ticket.ongoing += 1;
    try {
      if (req.method === 'GET' && ticket.readDelayMs > 0 && !match[2]) {
        // A slow disk; a ticket removed meanwhile (the transfer cancelled) ends the wait, as imageio's
        // operations stop when their ticket is cancelled (auth.py Ticket.cancel).
        const until = Date.now() + ticket.readDelayMs;
        while (Date.now() < until && tickets.get(ticket.id) === ticket) await new Promise((resolve) => setTimeout(resolve, Math.min(50, until - Date.now())));
        if (tickets.get(ticket.id) !== ticket) return text(res, 403, `No such ticket: ${ticket.id}`);
      }
      const client = await nbdFor(ticket);
      if (req.method === 'PUT') {
        if (req.headers['content-length'] === undefined) return text(res, 400, 'Content-Length header is required');
        const body = await readBody(req);
        const start = Number(/^bytes (\d+)-/.exec(String(req.headers['content-range'] ?? ''))?.[1] ?? 0);
        if (start + body.length > ticket.size) return text(res, 416, 'Requested range out of allowed range');
        await client.write(body, start);
        if (url.searchParams.get('flush') !== 'n') await client.flush();
        res.writeHead(200, { 'Content-Length': '0' });
        return void res.end();
      }
      if (req.method === 'PATCH') {
        const op = JSON.parse((await readBody(req)).toString('utf8')) as { op?: string; offset?: number; size?: number; flush?: boolean };
        if (op.op === 'zero') {
          await client.writeZeroes(op.offset ?? 0, op.size ?? 0);
          if (op.flush) await client.flush();
        } else if (op.op === 'flush') {
          await client.flush();
        } else {
          return text(res, 400, `Invalid value for 'op': ${String(op.op)}`);
        }
        res.writeHead(200, { 'Content-Length': '0' });
        return void res.end();
      }
      if (req.method !== 'GET') return text(res, 405, `Method ${req.method} not allowed`);
      if (match[2]) {
        const context = url.searchParams.get('context') ?? 'zero';
        if (context !== 'zero' && context !== 'dirty') return text(res, 400, `Invalid value for 'context': ${context}`);
        if (context === 'dirty' && !ticket.dirtyBitmap) return text(res, 404, 'Ticket does not support dirty extents');
        const extents: Record<string, number | boolean>[] = [];
        if (context === 'zero') {
          for await (const e of client.blockStatus('base:allocation')) extents.push({ start: e.offset, length: e.length, zero: (e.flags & 2) !== 0, hole: false });
        } else {
          for await (const e of client.blockStatus(`qemu:dirty-bitmap:${ticket.dirtyBitmap}`)) extents.push({ start: e.offset, length: e.length, dirty: (e.flags & 1) !== 0, zero: false });
        }
        const body = JSON.stringify(extents);
        res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': String(Buffer.byteLength(body)) });
        return void res.end(body);
      }
      const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
      const first = range ? Number(range[1]) : 0;
      const last = range && range[2] !== '' ? Number(range[2]) : ticket.size - 1;
      if (first > last || last >= ticket.size) return text(res, 416, 'Requested range out of allowed range');
      const data = Buffer.alloc(last - first + 1);
      await client.read(data, first);
      res.writeHead(range ? 206 : 200, {
        'Content-Type': 'application/octet-stream',
        'Content-Length': String(data.length),
        'Content-Disposition': 'attachment',
        ...(range ? { 'Content-Range': `bytes ${first}-${last}/${ticket.size}` } : {}),
      });
      res.end(data);
    } finally {
      ticket.ongoing -= 1;
      ticket.accessTime = Date.now();
    }
  };
  const onRequest = (req: IncomingMessage, res: ServerResponse): void => {
    serve(req, res).catch((error: unknown) => {
      if (!res.headersSent) text(res, 500, `Internal server error: ${(error as Error).message}`);
      else res.destroy();
    });
  };
  const listen = async (): Promise<{ server: Server; url: string }> => {
    const server = options.tls ? createHttpsServer({ key: options.tls.key, cert: options.tls.cert }, onRequest) : createServer(onRequest);
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return { server, url: `${options.tls ? 'https' : 'http'}://127.0.0.1:${(server.address() as AddressInfo).port}` };
  };
  const daemon = await listen();
  const proxy = await listen();
  const closeServer = (server: Server): Promise<void> =>
    new Promise((resolve) => {
      server.closeAllConnections();
      server.close(() => resolve());
    });
  let daemonOpen = true;

  const remove = async (id: string): Promise<void> => {
    tickets.delete(id);
    const client = clients.get(id);
    clients.delete(id);
    await client?.then((c) => c.close(), () => undefined);
  };
  return {
    daemonUrl: daemon.url,
    proxyUrl: proxy.url,
    tickets,
    add(t) {
      const ticket: ImageioTicket = { ...t, ongoing: 0, accessTime: Date.now(), readDelayMs: 0 };
      tickets.set(ticket.id, ticket);
      return ticket;
    },
    remove,
    idleMs(id) {
      const t = tickets.get(id);
      if (!t || t.ongoing > 0) return 0;
      return Date.now() - t.accessTime;
    },
    async stopDaemon() {
      if (!daemonOpen) return;
      daemonOpen = false;
      await closeServer(daemon.server);
    },
    async close() {
      for (const id of [...tickets.keys()]) await remove(id);
      if (daemonOpen) await closeServer(daemon.server);
      daemonOpen = false;
      await closeServer(proxy.server);
    },
  };
}
