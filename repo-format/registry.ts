/**
 * Registrations of processes that work on the repository without holding its lock: one file per process
 * in a registry directory (`readers/`, `writers/`), created whole (temp, fsync, link) and removed when the
 * process is done. A registration whose holder is provably gone (lock.ts: a dead pid, a reused pid, an
 * earlier boot) is stale and may be removed by anyone; one from another host is never stale (its pid
 * means nothing here), the rule of the lock.
 */
import { readdir, unlink } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { LAYOUT, SMALL_FILE_LIMIT } from './constants.js';
import { readBoundedFile } from './bounded-read.js';
import { isErrnoException } from './errors.js';
import { writeFileDurably } from './durable-file.js';
import { isStale } from './lock.js';
import { ensurePrivateDirectory } from './file-modes.js';
import { processIdentity } from './process-alive.js';

export interface Registration {
  pid: number;
  hostname: string;
  since: string;
  command: string;
  token: string;
  /** The backups this process works on (readers: whose chunks it may read). */
  backupIds: string[];
  /** Boot id and start time of the process (process-alive.ts); absent in registrations of older engines. */
  identity?: string;
}

export interface Registered {
  readonly registration: Registration;
  /** The registration file, for a last-moment synchronous removal at process exit. */
  readonly path: string;
  release(): Promise<void>;
}

export type RegistryDir = typeof LAYOUT.readers | typeof LAYOUT.writers;

export async function register(root: string, dir: RegistryDir, command: string, backupIds: string[]): Promise<Registered> {
  const registration: Registration = {
    pid: process.pid,
    hostname: hostname(),
    since: new Date().toISOString(),
    command,
    token: randomBytes(8).toString('hex'),
    backupIds: [...backupIds],
  };
  const identity = processIdentity(process.pid);
  if (identity !== undefined) registration.identity = identity;
  // Repositories made before a registry existed do not have its directory yet, and copies made by tools that
  // keep no empty directory (git, some sync tools) lack tmp/ too.
  for (const needed of [dir, LAYOUT.tmp]) await ensurePrivateDirectory(join(root, needed));
  const path = join(root, dir, `${registration.token}.json`);
  await writeFileDurably(path, Buffer.from(JSON.stringify(registration)), { exclusive: true, tempDir: join(root, LAYOUT.tmp) });
  let released = false;
  return {
    registration,
    path,
    release: async () => {
      if (released) return;
      released = true;
      await unlink(path).catch(() => undefined);
    },
  };
}

export function parseRegistration(text: string): Registration | undefined {
  try {
    const value = JSON.parse(text) as Partial<Registration>;
    if (typeof value.pid !== 'number' || typeof value.hostname !== 'string' || typeof value.since !== 'string' || typeof value.token !== 'string') return undefined;
    const backupIds = Array.isArray(value.backupIds) ? value.backupIds.filter((id): id is string => typeof id === 'string') : [];
    const registration: Registration = { pid: value.pid, hostname: value.hostname, since: value.since, command: String(value.command ?? 'unknown'), token: value.token, backupIds };
    if (typeof value.identity === 'string') registration.identity = value.identity;
    return registration;
  } catch {
    return undefined;
  }
}

/**
 * Every registration, live or stale. An unreadable file (damaged, too large, or whose token is not its
 * file name) counts as live (unknown holder): the safe mistake. Registrations are removed by the name
 * they were found under, never by a name their content gives.
 */
export async function listRegistrations(root: string, dir: RegistryDir): Promise<{ live: (Registration | { unreadable: string })[]; stale: Registration[] }> {
  const names = await readdir(join(root, dir)).catch(() => [] as string[]);
  const live: (Registration | { unreadable: string })[] = [];
  const stale: Registration[] = [];
  for (const name of names.filter((n) => n.endsWith('.json')).sort()) {
    let text: string;
    try {
      text = (await readBoundedFile(join(root, dir, name), SMALL_FILE_LIMIT)).toString('utf8');
    } catch (error) {
      if (isErrnoException(error) && error.code === 'ENOENT') continue; // released between readdir and read
      live.push({ unreadable: name });
      continue;
    }
    const registration = parseRegistration(text);
    if (!registration || `${registration.token}.json` !== name) live.push({ unreadable: name });
    else if (isStale(registration)) stale.push(registration);
    else live.push(registration);
  }
  return { live, stale };
}

/** Removes registrations of dead processes on this host; returns how many. */
export async function removeStaleRegistrations(root: string, dir: RegistryDir): Promise<number> {
  const { stale } = await listRegistrations(root, dir);
  for (const registration of stale) await removeRegistration(root, dir, registration.token);
  return stale.length;
}

/** Removes one registration file, by its token (checked to be one: never a path). */
export async function removeRegistration(root: string, dir: RegistryDir, token: string): Promise<void> {
  if (!/^[0-9a-f]{16}$/.test(token)) return;
  await unlink(join(root, dir, `${token}.json`)).catch(() => undefined);
}
