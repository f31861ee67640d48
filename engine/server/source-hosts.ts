/**
 * The source hosts a job works against, for `limits.perHost` (SPEC.md 23.3): a hypervisor or NBD server
 * serves a few streams well and many badly, so the server runs at most N jobs on one host at once and
 * queues the rest, whatever repository they write to.
 *
 * - NBD URIs (a backup's disks, a restore's target): nbd://HOST → HOST as written, lower case; a Unix
 *   socket (nbd+unix) is this machine, `local`;
 * - files, devices and qcow2 images, as backup disks or restore targets: `local`;
 * - a libvirt domain: the host of the libvirt URI virsh uses (LIBVIRT_DEFAULT_URI of the server's
 *   environment: qemu+ssh://HOST/system → HOST); none, or one without a host (qemu:///system): `local`;
 * - an oVirt VM: the engine URL's host.
 * A job that reads disks on two hosts takes a slot on each. verify, prune and gc read only the repository:
 * no host, no per-host limit.
 */
import { parseNbdUri } from '../nbd/uri.js';
import type { JobRequest } from './job-requests.js';

export const LOCAL_HOST = 'local';

function hostOfUrl(text: string): string {
  try {
    const host = new URL(text).hostname.replace(/^\[|\]$/g, '').toLowerCase();
    return host === '' ? LOCAL_HOST : host;
  } catch {
    return LOCAL_HOST;
  }
}

function hostOfNbd(uri: string): string {
  const parsed = parseNbdUri(uri);
  return parsed.address.kind === 'unix' ? LOCAL_HOST : parsed.address.host.toLowerCase();
}

export function sourceHostsOf(request: JobRequest, env: Readonly<Record<string, string | undefined>> = process.env): string[] {
  const hosts = new Set<string>();
  if (request.kind === 'backup') {
    const from = request.from;
    if (from.kind === 'disks') for (const disk of from.disks) hosts.add(disk.kind === 'nbd' ? hostOfNbd(disk.uri) : LOCAL_HOST);
    else if (from.kind === 'libvirt') hosts.add(env.LIBVIRT_DEFAULT_URI ? hostOfUrl(env.LIBVIRT_DEFAULT_URI) : LOCAL_HOST);
    else if (from.kind === 'ovirt') hosts.add(hostOfUrl(from.ovirt.url));
  } else if (request.kind === 'restore') {
    const target = request.target;
    if (target.kind === 'ovirt') hosts.add(hostOfUrl(target.ovirt.url));
    else hosts.add(target.kind === 'nbd' ? hostOfNbd(target.uri) : target.kind === 'libvirt' && env.LIBVIRT_DEFAULT_URI ? hostOfUrl(env.LIBVIRT_DEFAULT_URI) : LOCAL_HOST);
  }
  return [...hosts];
}
