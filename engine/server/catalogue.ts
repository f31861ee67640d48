/**
 * The catalogue as the API shows it: repositories, their backups (as `list --json` and `show --json`, SPEC.md
 * 14.2, plus each backup's `chain`), and cheap statistics. Each call opens the repository for reading, as the
 * CLI's list does: no lock, and a version-3 repository's reader needs no lease for records.
 */
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { Repository } from '../../repo-format/repository.js';
import type { BackupRecord } from '../../repo-format/backup-record.js';
import { describeBackup, latestBoots, type BootSummary } from '../catalogue/catalogue.js';
import { backupJson } from '../catalogue/json.js';
import type { RepositoryConfig } from './config.js';

export interface BackupFilter {
  name?: string | undefined;
  disk?: string | undefined;
  since?: string | undefined;
  until?: string | undefined;
  /** At most this many backups an answer (a page); `next` says where the following page starts. */
  limit?: number | undefined;
  /** A page's `next`: the answer holds the backups after the one it names, in the listing's order. */
  after?: { startTime: string; id: string } | undefined;
}

/**
 * Backups an answer holds by default and at most: a page of 1,000 is ~1.5 MiB of JSON; the whole of a catalogue
 * of 10,000 backups was 15 MiB, built in memory per request (bench/results/dashboard-*.md).
 */
export const PAGE_DEFAULT = 1000;
export const PAGE_MAX = 10_000;

/** A page's `next`: opaque to clients (base64url of the last backup's startTime and id), stable across prunes. */
function encodeCursor(record: BackupRecord): string {
  return Buffer.from(`${record.startTime} ${record.id}`, 'utf8').toString('base64url');
}

function decodeCursor(text: string): { startTime: string; id: string } {
  const decoded = /^[A-Za-z0-9_-]{1,200}$/.test(text) ? Buffer.from(text, 'base64url').toString('utf8') : '';
  const match = /^(\S{1,64}) ([0-9a-f]{32})$/.exec(decoded);
  if (!match) throw new InvalidArgumentError('after must be a `next` of an earlier answer', { field: 'after' });
  return { startTime: match[1]!, id: match[2]! };
}

/** `since` and `until`: RFC 3339 instants, compared with each backup's startTime; `since` inclusive, `until` exclusive. */
export function parseFilter(query: URLSearchParams): BackupFilter {
  const known = ['name', 'disk', 'since', 'until', 'limit', 'after'];
  for (const key of query.keys()) if (!known.includes(key)) throw new InvalidArgumentError(`unknown filter ${JSON.stringify(key.slice(0, 64))} (known: ${known.join(', ')})`, { field: key.slice(0, 64) });
  const instant = (key: 'since' | 'until'): string | undefined => {
    const value = query.get(key) ?? undefined;
    if (value === undefined) return undefined;
    if (!/^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:\d{2}))?$/.test(value) || Number.isNaN(Date.parse(value))) throw new InvalidArgumentError(`${key} must be a date or an RFC 3339 time (2026-12-07 or 2026-12-07T03:00:00Z)`, { field: key });
    return new Date(value).toISOString();
  };
  const limitText = query.get('limit');
  if (limitText !== null && (!/^\d{1,6}$/.test(limitText) || Number(limitText) < 1 || Number(limitText) > PAGE_MAX)) throw new InvalidArgumentError(`limit must be a whole number from 1 to ${PAGE_MAX}`, { field: 'limit' });
  const after = query.get('after');
  return {
    name: query.get('name') ?? undefined,
    disk: query.get('disk') ?? undefined,
    since: instant('since'),
    until: instant('until'),
    limit: limitText === null ? undefined : Number(limitText),
    after: after === null ? undefined : decodeCursor(after),
  };
}

/**
 * Where a backup's chain starts and how long it is: `full` the id of the full backup it depends on (itself
 * for a full one; null when a backup on the way is missing: a broken chain), `length` the backups from that
 * full backup to this one, both included, and `ids` them in that order.
 */
export function chainOf(record: BackupRecord, byId: ReadonlyMap<string, BackupRecord>): { full: string | null; length: number; ids: string[] } {
  const ids = [record.id];
  let at = record;
  while (at.parent !== null && ids.length <= byId.size) {
    const parent = byId.get(at.parent);
    if (!parent) return { full: null, length: ids.length, ids: ids.reverse() };
    ids.push(parent.id);
    at = parent;
  }
  return { full: at.id, length: ids.length, ids: ids.reverse() };
}

function matches(record: BackupRecord, filter: BackupFilter): boolean {
  if (filter.name !== undefined && record.name !== filter.name) return false;
  if (filter.disk !== undefined && !record.disks.some((d) => d.name === filter.disk)) return false;
  const start = new Date(record.startTime).toISOString();
  if (filter.since !== undefined && start < filter.since) return false;
  if (filter.until !== undefined && start >= filter.until) return false;
  return true;
}

/**
 * The records of one repository, kept between requests: a record is written once, whole, and never changed
 * (SPEC.md 9; record recovery only puts back the same bytes where a record was lost), so each request lists
 * the record names (one listing of backups/, the repository's own listBackupIds) and reads only the records it
 * has not read before; a name gone from the listing (prune) is dropped. A record that could not be read is not
 * kept: it is read again next time. Boot-test results are read whole each time (verification records are few,
 * one per boot test). Without it a catalogue of 10,000 backups read 10,000 files per request
 * (bench/results/dashboard-*.md).
 */
/** (startTime, id) by code points, as the pages' cursors compare them (never by locale: the order must be one). */
function compareListing(a: BackupRecord, b: BackupRecord): number {
  if (a.startTime !== b.startTime) return a.startTime < b.startTime ? -1 : 1;
  return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
}

class RecordCache {
  private readonly records = new Map<string, BackupRecord>();
  private sorted: BackupRecord[] = [];
  private refreshing: Promise<Catalogue> | undefined;

  constructor(private readonly location: string) {}

  /** One refresh at a time: requests that arrive during one share it. */
  load(passphrase: Buffer | undefined): Promise<Catalogue> {
    this.refreshing ??= this.refresh(passphrase).finally(() => (this.refreshing = undefined));
    return this.refreshing;
  }

  private async refresh(passphrase: Buffer | undefined): Promise<Catalogue> {
    const repo = await Repository.open(this.location, { access: 'read', passphrase, manyWriters: true });
    try {
      const ids = await repo.listBackupIds();
      const listed = new Set(ids);
      let changed = false;
      for (const id of this.records.keys()) {
        if (listed.has(id)) continue;
        this.records.delete(id);
        changed = true;
      }
      const damaged: { id: string; message: string }[] = [];
      for (const id of ids) {
        if (this.records.has(id)) continue;
        try {
          this.records.set(id, await repo.readBackup(id));
          changed = true;
        } catch (error) {
          damaged.push({ id, message: (error as Error).message });
        }
      }
      if (changed) this.sorted = [...this.records.values()].sort((a, b) => compareListing(a, b));
      return { backups: this.sorted, damaged, boots: await latestBoots(repo) };
    } finally {
      await repo.close();
    }
  }
}

export interface Catalogue {
  /** Oldest first (by startTime, then id), as `list`; shared between requests: never modify. */
  backups: readonly BackupRecord[];
  damaged: { id: string; message: string }[];
  boots: Record<string, BootSummary>;
}

const caches = new Map<string, RecordCache>();

/** The repository's backups, damaged records and boot tests, as `list` reads them, through the cache. */
export function catalogueOf(repo: RepositoryConfig, passphrase: Buffer | undefined): Promise<Catalogue> {
  let cache = caches.get(repo.location);
  if (!cache) caches.set(repo.location, (cache = new RecordCache(repo.location)));
  return cache.load(passphrase);
}

export async function backupsOf(repo: RepositoryConfig, passphrase: Buffer | undefined, filter: BackupFilter): Promise<Record<string, unknown>> {
  const { backups, damaged, boots } = await catalogueOf(repo, passphrase);
  const byId = new Map(backups.map((b) => [b.id, b]));
  const limit = filter.limit ?? PAGE_DEFAULT;
  const after = filter.after;
  const page: BackupRecord[] = [];
  let more = false;
  // The listing's order is (startTime, id) ascending: a page starts after the cursor's place in it.
  for (const b of backups) {
    if (after !== undefined && (b.startTime < after.startTime || (b.startTime === after.startTime && b.id <= after.id))) continue;
    if (!matches(b, filter)) continue;
    if (page.length === limit) {
      more = true;
      break;
    }
    page.push(b);
  }
  return {
    backups: page.map((b) => ({ ...backupJson(b, boots[b.id] ?? null), chain: chainOf(b, byId) })),
    damaged,
    next: more ? encodeCursor(page.at(-1)!) : null,
  };
}

export async function backupOf(repo: RepositoryConfig, passphrase: Buffer | undefined, id: string): Promise<Record<string, unknown>> {
  if (!/^[0-9a-f]{1,64}$/.test(id)) throw new InvalidArgumentError('a backup id is hex digits (or a prefix of them)', { field: 'id' });
  const { record, boot } = await describeBackup(repo.location, id, { passphrase });
  const { backups } = await catalogueOf(repo, passphrase);
  return { ...backupJson(record, boot), chain: chainOf(record, new Map(backups.map((b) => [b.id, b]))) };
}

/**
 * Statistics from the records and one listing of the packs (no pack is read):
 * - `logicalBytes`: the disks' sizes summed over every backup (what restoring every restore point would write);
 * - `dataBytes`: the same without the all-zero blocks (exact in blocks; a disk's last partial block counted whole);
 * - `newBytes`, `recordedStoredBytes`: the backups' own bytesNew and bytesStored summed (exact for what each
 *   backup added when it ran; data of backups since removed is not counted, nor is what gc later moved);
 * - `storedBytes`, `packs`: the pack objects as listed now (exact);
 * - `dedupeRatio` = dataBytes / newBytes and `compressionRatio` = newBytes / recordedStoredBytes: estimates,
 *   as good as the records are current (after a prune and before its gc, newBytes undercounts what is stored).
 */
export async function statsOf(repo: RepositoryConfig, passphrase: Buffer | undefined): Promise<Record<string, unknown>> {
  const { backups } = await catalogueOf(repo, passphrase);
  let logicalBytes = 0;
  let dataBytes = 0;
  let newBytes = 0;
  let recordedStoredBytes = 0;
  let readBytes = 0;
  const days = new Map<string, GrowthDay>();
  for (const b of backups) {
    const day = new Date(b.startTime).toISOString().slice(0, 10);
    let growth = days.get(day);
    if (!growth) days.set(day, (growth = { day, backups: 0, newBytes: 0, storedBytes: 0 }));
    growth.backups += 1;
    for (const d of b.disks) {
      logicalBytes += d.size;
      dataBytes += Math.max(0, d.size - d.stats.blocksZero * b.blockSize);
      newBytes += d.stats.bytesNew;
      recordedStoredBytes += d.stats.bytesStored;
      readBytes += d.stats.bytesRead;
      growth.newBytes += d.stats.bytesNew;
      growth.storedBytes += d.stats.bytesStored;
    }
  }
  let storedBytes = 0;
  let packs = 0;
  const opened = await Repository.open(repo.location, { access: 'read', passphrase, manyWriters: true });
  try {
    for (const pack of await opened.listPacks()) {
      storedBytes += pack.size;
      packs++;
    }
  } finally {
    await opened.close();
  }
  const ratio = (a: number, b: number): number | null => (b > 0 ? Math.round((a / b) * 1000) / 1000 : null);
  return {
    repository: repo.name,
    backups: backups.length,
    logicalBytes,
    dataBytes,
    readBytes,
    newBytes,
    recordedStoredBytes,
    storedBytes,
    packs,
    dedupeRatio: ratio(dataBytes, newBytes),
    compressionRatio: ratio(newBytes, recordedStoredBytes),
    growth: growthOf(days, Date.now()),
    estimated: ['dedupeRatio', 'compressionRatio', 'dataBytes', 'growth'],
  };
}

interface GrowthDay {
  /** A UTC day, YYYY-MM-DD, of the backups' startTime. */
  day: string;
  backups: number;
  /** What the day's backups found new, and stored (after compression), as their records say. */
  newBytes: number;
  storedBytes: number;
}

/** Days of growth the stats list: the newest, up to the day of the request. */
export const GROWTH_DAYS = 30;

/**
 * Growth per day over the last GROWTH_DAYS UTC days (today included): each day that has backups, oldest first,
 * and the stored bytes a day on average over those days, days without backups counting as none. From the records
 * (what each backup added when it ran): a backup since pruned no longer counts, nor does what gc later reclaimed.
 */
function growthOf(days: ReadonlyMap<string, GrowthDay>, now: number): { days: GrowthDay[]; storedBytesPerDay: number } {
  const first = new Date(now - (GROWTH_DAYS - 1) * 86_400_000).toISOString().slice(0, 10);
  const recent = [...days.values()].filter((d) => d.day >= first).sort((a, b) => (a.day < b.day ? -1 : 1));
  const stored = recent.reduce((sum, d) => sum + d.storedBytes, 0);
  return { days: recent, storedBytesPerDay: Math.round(stored / GROWTH_DAYS) };
}
