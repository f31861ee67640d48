/**
 * Standard NBD URIs (the NBD URI specification, as libnbd and qemu accept them):
 *   nbd://host[:port]/export            TCP, port 10809 by default
 *   nbd+unix:///export?socket=PATH      Unix domain socket
 * TLS (nbds, nbds+unix) is not supported yet and is refused with a clear error.
 */
import { InvalidArgumentError } from '../../repo-format/errors.js';

export type NbdAddress = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

export interface NbdUri {
  address: NbdAddress;
  exportName: string;
  text: string;
}

export function isNbdUri(text: string): boolean {
  return /^nbds?(\+unix)?:\/\//.test(text);
}

export function parseNbdUri(text: string): NbdUri {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new InvalidArgumentError(`"${text}" is not an NBD URI (nbd://host[:port]/export or nbd+unix:///export?socket=PATH)`);
  }
  const exportName = decodeURIComponent(url.pathname.replace(/^\//, ''));
  if (url.protocol === 'nbds:' || url.protocol === 'nbds+unix:') throw new InvalidArgumentError(`${text}: NBD over TLS is not supported yet`);
  if (url.protocol === 'nbd:') {
    if (!url.hostname) throw new InvalidArgumentError(`${text}: an nbd:// URI needs a host`);
    const port = url.port ? Number(url.port) : 10809;
    return { address: { kind: 'tcp', host: url.hostname.replace(/^\[|\]$/g, ''), port }, exportName, text };
  }
  if (url.protocol === 'nbd+unix:') {
    const socket = url.searchParams.get('socket');
    if (!socket) throw new InvalidArgumentError(`${text}: an nbd+unix:// URI needs ?socket=PATH`);
    if (url.hostname) throw new InvalidArgumentError(`${text}: an nbd+unix:// URI has no host (nbd+unix:///export?socket=PATH)`);
    return { address: { kind: 'unix', path: socket }, exportName, text };
  }
  throw new InvalidArgumentError(`"${text}" is not an NBD URI (nbd://host[:port]/export or nbd+unix:///export?socket=PATH)`);
}
