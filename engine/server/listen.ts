/**
 * Where `engine server` may listen, and with what protection (SPEC.md "The service API", "Listening").
 * The server starts jobs that read any disk and write any restore target its user can: whoever can talk to it
 * is an operator unless tokens say otherwise. So:
 *
 * - A Unix socket (0600: only the server's user, and root, can connect) or a loopback address is allowed as it
 *   is; on loopback without tokens every user of this host can start jobs, which is said on every start.
 * - Any other address needs TLS (a certificate and key) and a tokens file; without either it is refused
 *   unless `insecure`, and then the exposure is printed loudly on every start.
 *
 * The rule for loopback is engine serve's (serve/listen-policy.ts, isLoopback), from which this differs in
 * one way: serve's TCP always needs TLS, because it hands out plaintext disks with no other authentication;
 * this server authenticates every request with a token, so TLS on loopback is the operator's choice.
 */
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { isLoopback } from '../serve/listen-policy.js';

export interface ServerListenRequest {
  /** HOST:PORT, [IPv6]:PORT (default 127.0.0.1:8400 when no socket is given). */
  listen?: string | undefined;
  socket?: string | undefined;
  tls?: { cert: string; key: string } | undefined;
  tokens: boolean;
  insecure?: boolean | undefined;
}

export interface ServerListenPlan {
  address: { socket: string } | { host: string; port: number };
  tls: boolean;
  /** Who can reach the API without a token: nobody, this host's users, or the network. */
  exposure: 'private' | 'host' | 'network';
  /** What must be said on every start, given the port bound (the port 0 asked for is known then). */
  warnings: (port: number | null) => string[];
}

export const DEFAULT_LISTEN = '127.0.0.1:8400';

export function parseListen(text: string): { host: string; port: number } {
  const match = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(text);
  const port = match ? Number(match[3]) : NaN;
  if (!match || port > 65535) throw new InvalidArgumentError(`listen address ${JSON.stringify(text)}: give HOST:PORT, e.g. 127.0.0.1:8400 or [::1]:8400`, { listen: text });
  return { host: match[1] ?? match[2]!, port };
}

export function planServerListen(request: ServerListenRequest): ServerListenPlan {
  if (request.socket !== undefined && request.listen !== undefined) throw new InvalidArgumentError('give one of socket or listen, not both', { conflict: 'socket-and-port' });
  const tls = request.tls !== undefined;
  if (request.socket !== undefined) {
    if (tls) throw new InvalidArgumentError('TLS is for a TCP address: a Unix socket is private (0600) already', { conflict: 'tls-on-socket' });
    return { address: { socket: request.socket }, tls: false, exposure: 'private', warnings: () => [] };
  }
  const { host, port } = parseListen(request.listen ?? DEFAULT_LISTEN);
  const address = { host, port };
  const where = (bound: number | null): string => `${host} port ${bound ?? port}`;
  if (isLoopback(host)) {
    if (request.tokens) return { address, tls, exposure: 'private', warnings: () => [] };
    return { address, tls, exposure: 'host', warnings: (bound) => [`WARNING: no tokens file: every user of this host who can reach ${where(bound)} can start backups and restores`] };
  }
  const missing = [...(tls ? [] : ['TLS (a certificate and key)']), ...(request.tokens ? [] : ['a tokens file'])];
  if (missing.length === 0) return { address, tls, exposure: 'private', warnings: () => [] };
  if (!request.insecure) {
    throw new InvalidArgumentError(`listening on ${where(null)}, which is not a loopback address, needs ${missing.join(' and ')}`, { listen: `${host}:${port}`, missing });
  }
  return {
    address,
    tls,
    exposure: request.tokens ? 'private' : 'network',
    warnings: (bound) => [
      `WARNING: INSECURE: listening on ${where(bound)} WITHOUT ${missing.join(' AND ').toUpperCase()}: ${request.tokens ? 'TOKENS AND EVERYTHING ELSE CROSS THE NETWORK IN CLEAR TEXT' : 'ANYONE WHO CAN REACH THIS HOST CAN START BACKUPS AND RESTORES, READING AND WRITING ANY DISK THIS SERVER CAN'}`,
    ],
  };
}
