/**
 * Where `engine serve` may listen, and with what protection (SPEC 16.1, "Security"). The served disks are
 * the backup's plaintext, decrypted for an encrypted repository: whoever connects reads them, and with
 * `writable` writes them. So:
 *
 * - By default: a Unix socket (0600, unix-socket.ts), at `socket` or, without one, at
 *   <run dir>/serve-<backup id>.sock (the run dir: $ENGINE_RUN_DIR, else /run/engine, created 0700).
 * - TCP (`port`) needs TLS with client authentication (`tls.certificates` DIR or `tls.pskFile` FILE), on
 *   any address. `insecure` serves TCP without TLS anyway: a warning on loopback (every local user can
 *   connect), a loud one on any other address (anyone who reaches it can), louder when writable.
 *
 * Messages name the request's fields; a refused combination carries `details.conflict` (ListenConflict),
 * which the CLI words as its options.
 *
 * Decided before the repository is opened: a refused address costs no lock and no registration.
 */
import { isIP } from 'node:net';
import { ensurePrivateDirectory } from '../../repo-format/file-modes.js';
import { join } from 'node:path';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { withRemedies } from '../errors.js';
import type { ListenAddress } from '../nbd/server.js';

/** Fields of a ListenRequest that do not go together. */
export type ListenConflict = 'tls-both' | 'socket-and-port' | 'host-without-port' | 'insecure-without-port' | 'insecure-with-tls';

export interface ListenRequest {
  /** A Unix socket path (default: <run dir>/serve-<id>.sock, see defaultSocketPath). */
  socket?: string | undefined;
  /** A TCP port (0: any free port) on `host` (default 127.0.0.1); needs `tls` unless `insecure`. */
  port?: number | undefined;
  host?: string | undefined;
  /** TLS with client authentication: a certificates directory (ca-cert.pem, server-cert.pem, server-key.pem) or a PSK keys file. */
  tls?: { certificates?: string | undefined; pskFile?: string | undefined } | undefined;
  /** TCP without TLS: anyone who can connect reads (and with `writable` writes) the disks. */
  insecure?: boolean | undefined;
  /** Guest writes go to a temporary copy-on-write overlay, discarded when the server stops. */
  writable?: boolean | undefined;
}

export interface ListenPlan {
  /** A TCP address or a socket path; `defaultSocket` when the path follows from the backup id. */
  address: ListenAddress | { defaultSocket: true };
  tls: boolean;
  /** Who can connect without credentials: nobody else (a socket or TLS), this host's users, or the network. */
  exposure: 'private' | 'host' | 'network';
  writable: boolean;
}

/** Addresses only this host can reach. */
export function isLoopback(host: string): boolean {
  if (host === 'localhost' || host === '::1' || host === '0:0:0:0:0:0:0:1') return true;
  if (isIP(host) === 4) return host.startsWith('127.');
  return /^::ffff:127\./i.test(host);
}

function tlsGiven(request: ListenRequest): boolean {
  return request.tls?.certificates !== undefined || request.tls?.pskFile !== undefined;
}

export function planListen(request: ListenRequest): ListenPlan {
  const tls = tlsGiven(request);
  const writable = request.writable === true;
  const conflict = (kind: ListenConflict, message: string): InvalidArgumentError => new InvalidArgumentError(message, { conflict: kind });
  if (request.tls?.certificates !== undefined && request.tls.pskFile !== undefined) throw conflict('tls-both', 'give one of tls.certificates or tls.pskFile, not both');
  if (request.socket !== undefined && request.port !== undefined) throw conflict('socket-and-port', 'give one of socket or port, not both');
  if (request.host !== undefined && request.port === undefined) throw conflict('host-without-port', 'host is the address of a TCP server: give port too');
  if (request.insecure && request.port === undefined) throw conflict('insecure-without-port', 'insecure is for a TCP server (port); a Unix socket is private (0600) already');
  if (request.insecure && tls) throw conflict('insecure-with-tls', 'insecure serves without TLS: leave it out with tls');
  if (request.port === undefined) {
    return { address: request.socket !== undefined ? { socket: request.socket } : { defaultSocket: true }, tls, exposure: 'private', writable };
  }
  const host = request.host ?? '127.0.0.1';
  const address = { port: request.port, host };
  if (tls) return { address, tls, exposure: 'private', writable };
  if (!request.insecure) {
    throw new InvalidArgumentError(`serving over TCP (${host} port ${request.port}) needs TLS with client authentication`, withRemedies({}, { kind: 'serve-securely' }));
  }
  return { address, tls, exposure: isLoopback(host) ? 'host' : 'network', writable };
}

/** What the user must be told once the server listens on `host` and `port` (the port 0 asked for is known then). */
export function exposureWarnings(plan: ListenPlan, host: string, port: number): string[] {
  const access = plan.writable ? 'read and WRITE' : 'read';
  if (plan.exposure === 'host') return [`WARNING: serving without TLS or authentication on ${host} port ${port}: every user of this host can ${access} the backup's disks`];
  if (plan.exposure === 'network') {
    return [
      `WARNING: serving WITHOUT TLS OR AUTHENTICATION on ${host} port ${port}: ANYONE WHO CAN REACH THIS HOST CAN ${access.toUpperCase()} THE BACKUP'S DISKS, in clear text on the network; serve with TLS and client authentication (certificates or pre-shared keys) instead`,
    ];
  }
  return [];
}

/** $ENGINE_RUN_DIR, else /run/engine: where default sockets (and mounts' state) live. */
export function runDirectory(): string {
  return process.env.ENGINE_RUN_DIR || '/run/engine';
}

/**
 * The default socket of a backup's server: <run dir>/serve-<first 16 hex of its id>.sock (short: a socket
 * path has at most 107 bytes), the run dir created private (0700) if missing.
 */
export async function defaultSocketPath(backupId: string): Promise<string> {
  const dir = runDirectory();
  await ensurePrivateDirectory(dir).catch((error: NodeJS.ErrnoException) => {
    throw new InvalidArgumentError(`cannot create ${dir} for the server's socket (${error.code ?? error.message})`, withRemedies({ path: dir }, { kind: 'socket-path', because: 'run-dir' }));
  });
  return join(dir, `serve-${backupId.slice(0, 16)}.sock`);
}
