/**
 * NBD over TLS (the NBD protocol, "TLS support"): an in-session upgrade after NBD_OPT_STARTTLS, with the
 * credentials laid out as qemu, nbdkit and libnbd lay them out, so that one set of files serves them all:
 *
 *   X.509, a directory:   ca-cert.pem, and server-cert.pem + server-key.pem (a server) or client-cert.pem +
 *                         client-key.pem (a client); ca-crl.pem when present. The peer must present a
 *                         certificate signed by ca-cert.pem: the server always asks clients for theirs.
 *   PSK, a keys file:     one `username:hexkey` per line (qemu's tls-creds-psk, nbdkit's --tls-psk,
 *                         libnbd's tls-psk-file); the username is the TLS PSK identity.
 *
 * Either way TLS here is authentication as well as encryption: there is no anonymous mode. TLS 1.2 is the
 * minimum (the protocol's "TLS versions"); TLS 1.3 is used when both ends have it.
 */
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { isIP, type Socket } from 'node:net';
import { connect as tlsConnect, createServer as createTlsServer, DEFAULT_CIPHERS, type TLSSocket } from 'node:tls';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { describeTlsError } from '../host/tls-errors.js';
import { readSecretFile } from '../host/secret-file.js';

/**
 * Credentials of a TLS endpoint: X.509 files from a directory (a client's own certificate is optional), or
 * a PSK keys file.
 */
export type NbdTlsCredentials =
  | { kind: 'x509'; source: string; ca: Buffer; cert?: Buffer | undefined; key?: Buffer | undefined; crl?: Buffer | undefined }
  | { kind: 'psk'; source: string; keys: ReadonlyMap<string, Buffer> };

/** What a client uses: the credentials (or the system's CAs and no certificate of its own), and for PSK the identity it presents. */
export interface NbdClientTls {
  credentials: NbdTlsCredentials | { kind: 'system'; source: string };
  /** PSK: the username to present (libnbd's tls-username; default: the first entry of the keys file). */
  username?: string | undefined;
  /** X.509: the name the server's certificate must carry (default: the host of a TCP URI; none on a Unix socket). */
  hostname?: string | undefined;
}

/** Largest keys or PEM file read: a credentials file is a few KiB; /dev/zero must not fill the memory. */
const MAX_CREDENTIAL_FILE = 1024 * 1024;
/** PSK cipher suites for TLS 1.2 peers, with forward secrecy first (TLS 1.3 suites need no listing). */
const PSK_CIPHERS = ['ECDHE-PSK-CHACHA20-POLY1305', 'DHE-PSK-AES256-GCM-SHA384', 'DHE-PSK-AES128-GCM-SHA256', 'PSK-AES256-GCM-SHA384', 'PSK-AES128-GCM-SHA256'].join(':');
const HANDSHAKE_TIMEOUT_MS = 30_000;

async function readCredentialFile(path: string, what: string, onWarning?: (message: string) => void, secret = false): Promise<Buffer> {
  // One bounded reader for every secret file (secret-file.ts): size, devices and loose modes alike. A secret
  // others can read is a secret others have: said, not refused (qemu and nbdkit accept it too).
  const { bytes, warnings } = await readSecretFile(path, `${what}: ${path}`, { maxBytes: MAX_CREDENTIAL_FILE, secret });
  for (const warning of warnings) onWarning?.(warning);
  return bytes;
}

/** Parses a PSK keys file: `username:hexkey` per line; blank lines ignored; at least one key. */
export function parsePskKeys(text: string, source: string): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  text.split('\n').forEach((raw, index) => {
    const line = raw.replace(/\r$/, '');
    if (line.trim() === '') return;
    const colon = line.indexOf(':');
    const username = colon < 0 ? '' : line.slice(0, colon);
    const hex = colon < 0 ? '' : line.slice(colon + 1).trim();
    const where = `${source} line ${index + 1}`;
    if (username === '' || !/^[\x21-\x7e]+$/.test(username)) throw new InvalidArgumentError(`${where}: expected username:hexkey`);
    if (!/^([0-9a-fA-F]{2})+$/.test(hex)) throw new InvalidArgumentError(`${where}: the key of ${username} is not an even number of hex digits`);
    if (hex.length < 32) throw new InvalidArgumentError(`${where}: the key of ${username} has ${hex.length / 2} bytes; use at least 16 (psktool -u ${username} -p FILE makes 32)`);
    if (keys.has(username)) throw new InvalidArgumentError(`${where}: ${username} is listed twice`);
    keys.set(username, Buffer.from(hex, 'hex'));
  });
  if (keys.size === 0) throw new InvalidArgumentError(`${source}: no username:hexkey line`);
  return keys;
}

/**
 * Loads TLS credentials: an X.509 directory (`role` picks server-* or client-* files) or a PSK keys file.
 * Every problem is a one-line usage error naming the file.
 */
export async function loadTlsCredentials(
  source: { certificates?: string | undefined; pskFile?: string | undefined },
  role: 'server' | 'client',
  onWarning?: (message: string) => void,
): Promise<NbdTlsCredentials> {
  if ((source.certificates === undefined) === (source.pskFile === undefined)) throw new InvalidArgumentError('TLS needs exactly one of a certificates directory or a PSK keys file');
  if (source.pskFile !== undefined) {
    const text = await readCredentialFile(source.pskFile, 'TLS PSK keys file', onWarning, true);
    return { kind: 'psk', source: source.pskFile, keys: parsePskKeys(text.toString('utf8'), source.pskFile) };
  }
  const dir = source.certificates!;
  const info = await stat(dir).catch(() => undefined);
  if (!info?.isDirectory()) throw new InvalidArgumentError(`TLS certificates: ${dir} is not a directory (it holds ca-cert.pem, ${role}-cert.pem and ${role}-key.pem)`);
  const what = `TLS certificates in ${dir}`;
  const present = (name: string): Promise<boolean> => stat(join(dir, name)).then(() => true, () => false);
  const ca = await readCredentialFile(join(dir, 'ca-cert.pem'), what);
  // A server always has its own certificate; a client offers one when the directory holds it.
  const own = role === 'server' || (await present('client-cert.pem')) || (await present('client-key.pem'));
  const cert = own ? await readCredentialFile(join(dir, `${role}-cert.pem`), what) : undefined;
  const key = own ? await readCredentialFile(join(dir, `${role}-key.pem`), what, onWarning, true) : undefined;
  const crl = (await present('ca-crl.pem')) ? await readCredentialFile(join(dir, 'ca-crl.pem'), what) : undefined;
  return { kind: 'x509', source: dir, ca, cert, key, crl };
}

/** A TLS connection a server accepted, and who the client proved to be. */
export interface AcceptedTls {
  socket: TLSSocket;
  /** "certificate CN=…" or "PSK identity …", and the TLS version: for the server's log. */
  peer: string;
}

/**
 * The server side of the upgrade, on a socket whose NBD_OPT_STARTTLS was just acknowledged. Resolves once
 * the client is authenticated (a certificate signed by the CA, or a known PSK identity with its key);
 * rejects with the reason otherwise (the caller hangs up: the protocol allows nothing else).
 */
export function acceptTls(socket: Socket, credentials: NbdTlsCredentials): Promise<AcceptedTls> {
  if (credentials.kind === 'x509' && (!credentials.cert || !credentials.key)) return Promise.reject(new Error('a TLS server needs its certificate and key'));
  let identity: { name: string; known: boolean } | undefined;
  // A tls.Server that never listens does the verification Node does only for its own connections
  // (rejectUnauthorized with requestCert); one per upgrade, so its events belong to this socket alone.
  const server =
    credentials.kind === 'x509'
      ? createTlsServer({ ca: credentials.ca, cert: credentials.cert, key: credentials.key, crl: credentials.crl, requestCert: true, rejectUnauthorized: true, handshakeTimeout: HANDSHAKE_TIMEOUT_MS })
      : createTlsServer({
          ciphers: `${PSK_CIPHERS}:${DEFAULT_CIPHERS}`,
          dhparam: 'auto',
          handshakeTimeout: HANDSHAKE_TIMEOUT_MS,
          pskCallback: (_socket, name) => {
            const key = credentials.keys.get(name);
            identity = { name, known: key !== undefined };
            return key ?? null;
          },
        });
  return new Promise((resolve, reject) => {
    server.once('secureConnection', (secure: TLSSocket) => {
      const who = credentials.kind === 'x509' ? `certificate CN=${String(secure.getPeerCertificate().subject?.CN ?? '?')}` : `PSK identity ${JSON.stringify(identity?.name ?? '?')}`;
      resolve({ socket: secure, peer: `${who}, ${secure.getProtocol() ?? 'TLS'}` });
    });
    server.once('tlsClientError', (error: Error, secure: TLSSocket) => {
      socket.destroy();
      // A certificate that fails verification ends the connection after the handshake (TLS 1.3): the error is
      // then a bare hang-up, the reason in authorizationError.
      const refused = typeof secure?.authorizationError === 'string' ? Object.assign(new Error(secure.authorizationError), { code: secure.authorizationError }) : undefined;
      const why = identity && !identity.known ? `unknown PSK identity ${JSON.stringify(identity.name)}` : describeTlsError(refused ?? error);
      reject(new Error(`TLS handshake failed: ${why}`));
    });
    server.emit('connection', socket);
  });
}

/** The client side: TLS over `socket` after the server acknowledged NBD_OPT_STARTTLS; verifies the server. */
export function startTls(socket: Socket, tls: NbdClientTls): Promise<TLSSocket> {
  const { credentials } = tls;
  return new Promise((resolve, reject) => {
    let secure: TLSSocket;
    // The certificate must be for the host named (SNI only carries names, so an address goes in `host`);
    // on a Unix socket there is no host: the chain alone is checked.
    const identity = tls.hostname === undefined ? { checkServerIdentity: () => undefined } : isIP(tls.hostname) ? { host: tls.hostname } : { servername: tls.hostname };
    if (credentials.kind === 'system') {
      secure = tlsConnect({ socket, ...identity });
    } else if (credentials.kind === 'x509') {
      secure = tlsConnect({
        socket,
        ca: credentials.ca,
        cert: credentials.cert,
        key: credentials.key,
        crl: credentials.crl,
        ...identity,
      });
    } else {
      const username = tls.username ?? credentials.keys.keys().next().value!;
      const key = credentials.keys.get(username);
      if (!key) {
        reject(new InvalidArgumentError(`${credentials.source} has no key for TLS username ${username}`));
        return;
      }
      secure = tlsConnect({ socket, ciphers: `${PSK_CIPHERS}:${DEFAULT_CIPHERS}`, checkServerIdentity: () => undefined, pskCallback: () => ({ identity: username, psk: key }) });
    }
    const timer = setTimeout(() => secure.destroy(new Error(`no TLS handshake within ${HANDSHAKE_TIMEOUT_MS / 1000} s`)), HANDSHAKE_TIMEOUT_MS);
    secure.once('secureConnect', () => {
      clearTimeout(timer);
      secure.removeAllListeners('error');
      resolve(secure);
    });
    secure.once('error', (error: Error) => {
      clearTimeout(timer);
      secure.destroy();
      reject(new Error(`TLS handshake failed: ${describeTlsError(error)}`));
    });
  });
}
