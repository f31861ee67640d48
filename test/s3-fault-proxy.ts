/**
 * A small HTTP proxy on 127.0.0.1 in front of a real S3 endpoint (the tests' RGW) that breaks the wire on
 * purpose, by rule: 503 SlowDown answers, connections reset while the request body comes in or while the
 * answer's body goes out, answers cut short with a clean close, bytes flipped on the way in or out, answers
 * lost after the store did the work, and slow answers (a stall before the answer, or in the middle of its
 * body). Everything else passes through byte for byte, the Host header included (SigV4 signs it, so a
 * client signs for the proxy's address and the store checks the same).
 *
 * Rules are matched in order; each counts the requests it matched and fails those its `skip`, `times` and
 * `probability` (from a seeded generator: a run is repeatable) select. Counts of what was injected let a test
 * assert that the faults really happened.
 */
import { createServer, request, Agent, type IncomingMessage, type ServerResponse } from 'node:http';
import type { Socket } from 'node:net';

export type FaultAction =
  /** 503 SlowDown, after reading the request (the store never sees it). */
  | { kind: 'slowdown'; status?: number; code?: string }
  /** RST after this many bytes of the request body have arrived (the store never sees the request). */
  | { kind: 'reset-request'; afterBytes: number }
  /** The request goes through; RST after this many bytes of the answer's body. */
  | { kind: 'reset-response'; afterBytes: number }
  /** The request goes through; a clean close (FIN) after this many bytes of a longer announced body. */
  | { kind: 'truncate-response'; afterBytes: number }
  /** The request goes through and the store does the work; the client gets an RST instead of the answer. */
  | { kind: 'lose-response' }
  /** One byte of the request body flipped at this offset (the store should refuse it: Content-MD5). */
  | { kind: 'corrupt-request'; atByte: number }
  /** One byte of the answer's body flipped at this offset. */
  | { kind: 'corrupt-response'; atByte: number }
  /** Waits this long before forwarding (a slow store), or after sending this many body bytes (a stall). */
  | { kind: 'delay'; ms: number; afterBytes?: number }
  /** The request goes through; the answer's Date and Last-Modified are moved by this much: a store whose clock is off. */
  | { kind: 'shift-time'; ms: number };

export interface FaultRule {
  /** Which requests: method and a pattern over "/bucket/key?query" (default: all). */
  method?: string;
  path?: RegExp;
  skip?: number;
  times?: number;
  /** Chance that a matching request is failed (default 1). */
  probability?: number;
  action: FaultAction;
}

interface ActiveRule extends FaultRule {
  seen: number;
  failed: number;
}

export interface FaultProxy {
  /** http://127.0.0.1:PORT */
  readonly endpoint: string;
  addRule(rule: FaultRule): void;
  clearRules(): void;
  /** Faults that took effect so far, by kind (a fault at a byte position counts once a body reached it). */
  readonly injected: Record<string, number>;
  /** Requests seen so far. */
  readonly requests: { count: number };
  /** The longest answer body sent on so far, in bytes (a test that reads several frames in one GET shows it). */
  readonly answers: { largest: number };
  close(): Promise<void>;
}

/** A small seeded generator (mulberry32): the same faults in the same places on every run. */
function seeded(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

function slowDownBody(code: string): string {
  return `<?xml version="1.0" encoding="UTF-8"?><Error><Code>${code}</Code><Message>Please reduce your request rate. (injected by the test fault proxy)</Message></Error>`;
}

export async function startFaultProxy(target: string, options: { seed?: number } = {}): Promise<FaultProxy> {
  const upstream = new URL(target);
  const agent = new Agent({ keepAlive: true, maxSockets: 64 });
  const random = seeded(options.seed ?? 1);
  let rules: ActiveRule[] = [];
  const injected: Record<string, number> = {};
  const requests = { count: 0 };
  const answers = { largest: 0 };
  const sockets = new Set<Socket>();

  const choose = (req: IncomingMessage): FaultAction | undefined => {
    for (const rule of rules) {
      if (rule.method && rule.method !== req.method) continue;
      if (rule.path && !rule.path.test(req.url ?? '')) continue;
      rule.seen += 1;
      if (rule.seen <= (rule.skip ?? 0) || rule.failed >= (rule.times ?? Infinity)) continue;
      if (rule.probability !== undefined && random() >= rule.probability) continue;
      rule.failed += 1;
      // A fault that acts at a byte position counts only once it reached that byte (applied, below): a test
      // whose bodies are shorter than the fault's position then sees the fault did not happen, not a pass.
      if (!positional(rule.action)) count(rule.action);
      return rule.action;
    }
    return undefined;
  };

  const count = (action: FaultAction): void => {
    injected[action.kind] = (injected[action.kind] ?? 0) + 1;
  };

  const reset = (socket: Socket): void => {
    socket.resetAndDestroy();
  };

  /** Faults that act at a byte position of a body: counted in `injected` when they reach it, not when chosen. */
  const positional = (action: FaultAction): boolean =>
    (action.kind === 'reset-request' && action.afterBytes > 0) ||
    action.kind === 'reset-response' ||
    action.kind === 'truncate-response' ||
    action.kind === 'corrupt-request' ||
    action.kind === 'corrupt-response' ||
    (action.kind === 'delay' && action.afterBytes !== undefined);

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    requests.count += 1;
    const action = choose(req);
    const clientSocket = req.socket;

    if (action?.kind === 'slowdown') {
      req.resume();
      await new Promise((resolve) => req.once('end', resolve));
      const body = slowDownBody(action.code ?? 'SlowDown');
      res.writeHead(action.status ?? 503, { 'content-type': 'application/xml', 'content-length': Buffer.byteLength(body) });
      res.end(body);
      return;
    }
    if (action?.kind === 'reset-request') {
      // The store never sees this request: RST once the body has passed the given size (or at its end).
      if (action.afterBytes === 0) return reset(clientSocket);
      let arrived = 0;
      let applied = false;
      const apply = (): void => {
        if (!applied) count(action);
        applied = true;
        reset(clientSocket);
      };
      req.on('data', (chunk: Buffer) => {
        arrived += chunk.length;
        if (arrived > action.afterBytes) apply();
      });
      req.on('end', apply);
      return;
    }
    if (action?.kind === 'delay' && action.afterBytes === undefined) await sleep(action.ms);

    const forward = request({
      protocol: upstream.protocol,
      hostname: upstream.hostname,
      port: upstream.port,
      method: req.method,
      path: req.url,
      headers: req.headers,
      agent,
    });
    forward.on('error', () => reset(clientSocket));

    // The request body, with its faults.
    let received = 0;
    req.on('data', (chunk: Buffer) => {
      if (action?.kind === 'corrupt-request' && action.atByte >= received && action.atByte < received + chunk.length) {
        chunk = Buffer.from(chunk);
        chunk[action.atByte - received] ^= 0xff;
        count(action);
      }
      received += chunk.length;
      if (!forward.write(chunk)) {
        req.pause();
        forward.once('drain', () => req.resume());
      }
    });
    req.on('end', () => forward.end());

    forward.on('response', (answer) => {
      if (action?.kind === 'lose-response') {
        answer.resume();
        answer.once('end', () => reset(clientSocket));
        return;
      }
      let headers = answer.rawHeaders;
      if (action?.kind === 'shift-time') {
        const shift = action.ms;
        headers = headers.map((value, i) => (i % 2 === 1 && /^(date|last-modified)$/i.test(headers[i - 1]!) ? new Date(Date.parse(value) + shift).toUTCString() : value));
      }
      res.writeHead(answer.statusCode ?? 502, headers);
      let sent = 0;
      let stopped = false;
      answer.on('data', (chunk: Buffer) => {
        if (stopped) return;
        const end = sent + chunk.length;
        if ((action?.kind === 'reset-response' || action?.kind === 'truncate-response') && end > action.afterBytes) {
          const keep = chunk.subarray(0, Math.max(0, action.afterBytes - sent));
          count(action);
          stopped = true;
          answer.destroy();
          res.write(keep, () => {
            if (action.kind === 'reset-response') reset(clientSocket);
            else clientSocket.end();
          });
          return;
        }
        answers.largest = Math.max(answers.largest, end);
        if (action?.kind === 'corrupt-response' && action.atByte >= sent && action.atByte < end) {
          chunk = Buffer.from(chunk);
          chunk[action.atByte - sent] ^= 0xff;
          count(action);
        }
        if (action?.kind === 'delay' && action.afterBytes !== undefined && sent <= action.afterBytes && end > action.afterBytes) {
          const split = action.afterBytes - sent;
          count(action);
          res.write(chunk.subarray(0, split));
          answer.pause();
          setTimeout(() => {
            if (!res.destroyed) res.write(chunk.subarray(split));
            answer.resume();
          }, action.ms);
          sent = end;
          return;
        }
        sent = end;
        if (!res.write(chunk)) {
          answer.pause();
          res.once('drain', () => answer.resume());
        }
      });
      answer.on('end', () => {
        if (!stopped) res.end();
      });
    });
  };

  const server = createServer((req, res) => {
    handle(req, res).catch(() => reset(req.socket));
  });
  server.on('connection', (socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });
  server.keepAliveTimeout = 30_000;
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  if (!address || typeof address === 'string') throw new Error('the fault proxy has no port');

  return {
    endpoint: `http://127.0.0.1:${address.port}`,
    addRule: (rule) => rules.push({ ...rule, seen: 0, failed: 0 }),
    clearRules: () => {
      rules = [];
    },
    injected,
    requests,
    answers,
    close: async () => {
      for (const socket of sockets) socket.destroy();
      agent.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
