/**
 * A lease (SPEC.md 19.5): the v3 lock. An object `leases/<id>.json` that says who holds the repository, how
 * (shared, exclusive-pending, exclusive) and until when. Unlike v1/v2's `lock` file it needs no shared file
 * system and no pid to be checked: a holder keeps it alive by rewriting it before it expires, and a holder
 * on another host is judged by its expiry alone, with the clock bound (19.6) as the margin. On the holder's
 * own host (same host id and boot), a dead process is seen at once (boot id and process start time, as the
 * v1/v2 lock), so its lease is broken without waiting.
 *
 * This module is the record and the judgement, both pure; leases.ts is the protocol.
 */
import { displayText } from '../display-text.js';

export const LEASE_PREFIX = 'leases/';
export const LEASE_VERSION = 1;
/** A lease object larger than this is damaged: never read whole. */
export const LEASE_MAX_SIZE = 16 * 1024;

export type LeaseKind = 'shared' | 'exclusive-pending' | 'exclusive';
const KINDS: readonly LeaseKind[] = ['shared', 'exclusive-pending', 'exclusive'];

/** The process and host that hold a lease. */
export interface LeaseHolder {
  /** 32 hex: the host's id, drawn once and kept in the host's cache directory (host.ts). */
  host: string;
  /** For people: the host's name. Never used to decide anything. */
  hostname: string;
  /** The kernel's boot id, '' where there is none. */
  boot: string;
  pid: number;
  /** The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), '' where unknown. */
  start: string;
}

export interface Lease extends LeaseHolder {
  version: number;
  /** 32 hex, random per acquisition; the object is leases/<id>.json. */
  id: string;
  kind: LeaseKind;
  /** What holds it: backup, restore, gc … */
  command: string;
  /** ISO 8601 UTC, the holder's clock: when it was first written. */
  since: string;
  /** ISO 8601 UTC, the holder's clock: the holder stops using the lease before then unless it refreshed it. */
  expires: string;
}

export function leaseKey(id: string): string {
  return `${LEASE_PREFIX}${id}.json`;
}

/** The lease id a key names, or undefined for a key that is not a lease's (a stray: ignored, never deleted). */
export function leaseIdOfKey(key: string): string | undefined {
  const match = /^leases\/([0-9a-f]{32})\.json$/.exec(key);
  return match ? match[1] : undefined;
}

export function encodeLease(lease: Lease): Buffer {
  const { version, id, kind, host, hostname, boot, pid, start, command, since, expires } = lease;
  return Buffer.from(`${JSON.stringify({ version, id, kind, host, hostname, boot, pid, start, command, since, expires })}\n`, 'utf8');
}

const ISO = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$/;
const HEX32 = /^[0-9a-f]{32}$/;

/** The lease `bytes` hold (stored under `key`), or why they are not one. */
export function decodeLease(bytes: Buffer, key: string): Lease | string {
  if (bytes.length > LEASE_MAX_SIZE) return `${bytes.length} bytes, more than a lease`;
  let value: unknown;
  try {
    value = JSON.parse(bytes.toString('utf8'));
  } catch {
    return 'not JSON';
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return 'not a JSON object';
  const v = value as Record<string, unknown>;
  if (v.version !== LEASE_VERSION) return `unknown lease version ${displayText(String(v.version), 16)}`;
  if (typeof v.id !== 'string' || !HEX32.test(v.id)) return 'id is not 32 hex';
  if (leaseKey(v.id) !== key) return `it names itself ${v.id}, not the lease of its key`;
  if (typeof v.kind !== 'string' || !KINDS.includes(v.kind as LeaseKind)) return 'unknown kind';
  if (typeof v.host !== 'string' || !HEX32.test(v.host)) return 'host is not 32 hex';
  for (const field of ['hostname', 'boot', 'start', 'command'] as const) {
    if (typeof v[field] !== 'string' || (v[field] as string).length > 1024) return `${field} is not a string`;
  }
  if (typeof v.pid !== 'number' || !Number.isSafeInteger(v.pid) || v.pid < 0) return 'pid is not a whole number';
  for (const field of ['since', 'expires'] as const) {
    if (typeof v[field] !== 'string' || !ISO.test(v[field] as string) || Number.isNaN(Date.parse(v[field] as string))) return `${field} is not an ISO 8601 UTC time`;
  }
  return {
    version: LEASE_VERSION,
    id: v.id,
    kind: v.kind as LeaseKind,
    host: v.host,
    hostname: v.hostname as string,
    boot: v.boot as string,
    pid: v.pid,
    start: v.start as string,
    command: v.command as string,
    since: v.since as string,
    expires: v.expires as string,
  };
}

/** Whether the process of a same-host, same-boot lease still runs (process-alive.ts in production). */
export type ProcessProbe = (pid: number, start: string) => 'alive' | 'dead' | 'unknown';

export interface Observer {
  /** The observing host's id and boot. */
  host: string;
  boot: string;
  /** The observer's wall clock now (ms since the epoch). */
  now: number;
  /** The clock bound B (SPEC.md 19.6): each host's clock is within B of the store's. */
  skewBoundMs: number;
}

/**
 * - `live`: the holder may be working under it;
 * - `expired`: its holder has stopped using it (it stops by `expires` on its own clock, and any two clocks
 *   differ by at most 2B, so `expires + 2B` on the observer's clock is past `expires` on the holder's);
 * - `dead`: on this host and boot, and its process is gone or is another one; or of an earlier boot of
 *   this host.
 * Expired and dead leases are broken (deleted) by whoever finds them.
 */
export type LeaseState = 'live' | 'expired' | 'dead';

export function judgeLease(lease: Lease, observer: Observer, probe: ProcessProbe): LeaseState {
  if (lease.host === observer.host && lease.boot !== '' && observer.boot !== '') {
    if (lease.boot !== observer.boot) return 'dead';
    if (probe(lease.pid, lease.start) === 'dead') return 'dead';
  }
  return observer.now <= Date.parse(lease.expires) + 2 * observer.skewBoundMs ? 'live' : 'expired';
}
