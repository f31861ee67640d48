/**
 * The reader registry: processes that read packs without holding the repository lock (an `engine serve`
 * exporting a backup for hours, a mount) say so in `readers/<token>.json`. They resolved their chunk
 * locations under the lock and then let it go, so that nightly backups are not blocked; in exchange,
 * whatever deletes or rewrites packs (gc) must keep every pack alive while a live reader is registered.
 *
 * Registration is a file created whole (temp, fsync, link) and removed on release. A registration whose
 * holder is a dead process on this host is stale and may be removed by anyone; a registration from
 * another host is never considered stale (its pid means nothing here), the same rule as the lock.
 */
import { mkdir, readdir, readFile, unlink } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { LAYOUT } from './constants.js';
import { writeFileDurably } from './durable-file.js';
import { isStale } from './lock.js';

export interface ReaderRegistration {
  pid: number;
  hostname: string;
  since: string;
  command: string;
  token: string;
  /** The backups whose chunks this reader may read. */
  backupIds: string[];
}

export interface RegisteredReader {
  readonly registration: ReaderRegistration;
  /** The registration file, for a last-moment synchronous removal at process exit. */
  readonly path: string;
  release(): Promise<void>;
}

function registryDir(root: string): string {
  return join(root, LAYOUT.readers);
}

export async function registerReader(root: string, command: string, backupIds: string[]): Promise<RegisteredReader> {
  const registration: ReaderRegistration = {
    pid: process.pid,
    hostname: hostname(),
    since: new Date().toISOString(),
    command,
    token: randomBytes(8).toString('hex'),
    backupIds: [...backupIds],
  };
  // Repositories made before the registry existed have no readers/ yet.
  await mkdir(registryDir(root), { recursive: true });
  const path = join(registryDir(root), `${registration.token}.json`);
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

function parseRegistration(text: string): ReaderRegistration | undefined {
  try {
    const value = JSON.parse(text) as Partial<ReaderRegistration>;
    if (typeof value.pid !== 'number' || typeof value.hostname !== 'string' || typeof value.since !== 'string' || typeof value.token !== 'string') return undefined;
    const backupIds = Array.isArray(value.backupIds) ? value.backupIds.filter((id): id is string => typeof id === 'string') : [];
    return { pid: value.pid, hostname: value.hostname, since: value.since, command: String(value.command ?? 'unknown'), token: value.token, backupIds };
  } catch {
    return undefined;
  }
}

/**
 * Every registration, live or stale. An unreadable file counts as live (unknown holder): gc must then
 * keep packs, which is the safe mistake.
 */
export async function listReaders(root: string): Promise<{ live: (ReaderRegistration | { unreadable: string })[]; stale: ReaderRegistration[] }> {
  const names = await readdir(registryDir(root)).catch(() => [] as string[]);
  const live: (ReaderRegistration | { unreadable: string })[] = [];
  const stale: ReaderRegistration[] = [];
  for (const name of names.filter((n) => n.endsWith('.json')).sort()) {
    const text = await readFile(join(registryDir(root), name), 'utf8').catch(() => undefined);
    if (text === undefined) continue; // released between readdir and read
    const registration = parseRegistration(text);
    if (!registration) live.push({ unreadable: name });
    else if (isStale(registration)) stale.push(registration);
    else live.push(registration);
  }
  return { live, stale };
}

/** Removes registrations of dead processes on this host; returns how many. */
export async function removeStaleReaders(root: string): Promise<number> {
  const { stale } = await listReaders(root);
  for (const registration of stale) await unlink(join(registryDir(root), `${registration.token}.json`)).catch(() => undefined);
  return stale.length;
}
