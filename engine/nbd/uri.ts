/**
 * Standard NBD URIs (the NBD URI specification, as libnbd and qemu accept them):
 *   nbd://host[:port]/export                 TCP, port 10809 by default
 *   nbd+unix:///export?socket=PATH           Unix domain socket
 *   nbds://…, nbds+unix://…                  the same over TLS (NBD_OPT_STARTTLS), which is then required:
 *                                            a server that refuses it is refused
 * TLS parameters, as libnbd names them: `tls-certificates=DIR` (ca-cert.pem, client-cert.pem,
 * client-key.pem), or `tls-psk-file=FILE` (username:hexkey lines) with the username from `tls-username=`
 * or the URI's user (nbds://alice@host/), else the file's first; `tls-hostname=` names the host the server certificate must be
 * for (default: the URI's host; none on a Unix socket). Without either file the server is checked
 * against the system's CAs and no client certificate is offered.
 */
import { InvalidArgumentError } from '../../repo-format/errors.js';

export type NbdAddress = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

export interface NbdUriTls {
  certificates?: string | undefined;
  pskFile?: string | undefined;
  username?: string | undefined;
  hostname?: string | undefined;
}

export interface NbdUri {
  address: NbdAddress;
  exportName: string;
  /** The URI as given, less any password: what messages name. */
  text: string;
  /** Present for nbds:// and nbds+unix://: TLS is required. */
  tls?: NbdUriTls | undefined;
}

const USAGE = 'nbd[s]://host[:port]/export or nbd[s]+unix:///export?socket=PATH';
const TLS_PARAMETERS = ['tls-certificates', 'tls-psk-file', 'tls-username', 'tls-hostname', 'tls-verify-peer'];

export function isNbdUri(text: string): boolean {
  return /^nbds?(\+unix)?:\/\//.test(text);
}

/** The URI for messages: a password in it (which NBD never uses) is not repeated. */
function displayed(url: URL, text: string): string {
  if (url.password === '') return text;
  const copy = new URL(url.href);
  copy.password = '';
  return copy.href;
}

function tlsOf(url: URL, text: string, secure: boolean): NbdUriTls | undefined {
  const given = TLS_PARAMETERS.filter((name) => url.searchParams.has(name));
  if (!secure) {
    if (given.length > 0) throw new InvalidArgumentError(`${text}: ${given.join(', ')} need an nbds:// or nbds+unix:// URI`);
    return undefined;
  }
  if (url.searchParams.has('tls-verify-peer') && url.searchParams.get('tls-verify-peer') !== 'true') {
    throw new InvalidArgumentError(`${text}: tls-verify-peer=false is not supported: the server is always verified`);
  }
  const tls: NbdUriTls = {
    certificates: url.searchParams.get('tls-certificates') ?? undefined,
    pskFile: url.searchParams.get('tls-psk-file') ?? undefined,
    username: url.searchParams.get('tls-username') ?? (url.username ? decodeURIComponent(url.username) : undefined),
    hostname: url.searchParams.get('tls-hostname') ?? undefined,
  };
  if (tls.certificates !== undefined && tls.pskFile !== undefined) throw new InvalidArgumentError(`${text}: give tls-certificates or tls-psk-file, not both`);
  return tls;
}

export function parseNbdUri(text: string): NbdUri {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new InvalidArgumentError(`"${text}" is not an NBD URI (${USAGE})`);
  }
  const shown = displayed(url, text);
  const exportName = decodeURIComponent(url.pathname.replace(/^\//, ''));
  const secure = url.protocol === 'nbds:' || url.protocol === 'nbds+unix:';
  if (url.protocol === 'nbd:' || url.protocol === 'nbds:') {
    if (!url.hostname) throw new InvalidArgumentError(`${shown}: an ${url.protocol}// URI needs a host`);
    const port = url.port ? Number(url.port) : 10809;
    const host = url.hostname.replace(/^\[|\]$/g, '');
    const tls = tlsOf(url, shown, secure);
    if (tls) tls.hostname ??= host;
    return { address: { kind: 'tcp', host, port }, exportName, text: shown, tls };
  }
  if (url.protocol === 'nbd+unix:' || url.protocol === 'nbds+unix:') {
    const socket = url.searchParams.get('socket');
    if (!socket) throw new InvalidArgumentError(`${shown}: an ${url.protocol}// URI needs ?socket=PATH`);
    if (url.hostname) throw new InvalidArgumentError(`${shown}: an ${url.protocol}// URI has no host (${url.protocol}///export?socket=PATH)`);
    return { address: { kind: 'unix', path: socket }, exportName, text: shown, tls: tlsOf(url, shown, secure) };
  }
  throw new InvalidArgumentError(`"${shown}" is not an NBD URI (${USAGE})`);
}
