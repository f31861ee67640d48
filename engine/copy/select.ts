/**
 * Which backups of the source a copy takes (SPEC.md 22.1): all, those of a name, the newest N (of a name),
 * or ids; then every ancestor still in the source (the parents of the record and of each disk, the
 * chain's full), so that chains stay chains on the target. Parents come first.
 */
import type { BackupRecord } from '../../repo-format/backup-record.js';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import type { Repository } from '../../repo-format/repository.js';
import { displayText } from '../../repo-format/display-text.js';

export type Selection =
  | { kind: 'all' }
  /** The backups of one name; `latest`: only its newest N. */
  | { kind: 'name'; name: string; latest?: number | undefined }
  /** The newest N backups, whatever their names. */
  | { kind: 'latest'; count: number }
  /** Ids or unique prefixes. */
  | { kind: 'ids'; ids: string[] };

export interface Selected {
  /** What to copy, parents before children. */
  records: BackupRecord[];
  /** How many of them were asked for (the rest are ancestors added). */
  asked: number;
  /** Damaged records of the source left out of `all`, `name` and `latest`, with why. */
  damaged: { id: string; message: string }[];
}

const byTime = (a: BackupRecord, b: BackupRecord): number => (a.startTime < b.startTime ? -1 : a.startTime > b.startTime ? 1 : a.id < b.id ? -1 : a.id > b.id ? 1 : 0);

/** The ids a record builds on: its parent, each disk's parent and chain full (when not itself). */
export function ancestorIds(record: BackupRecord): string[] {
  const ids = new Set<string>();
  if (record.parent !== null) ids.add(record.parent);
  for (const disk of record.disks) {
    if (disk.parent !== null) ids.add(disk.parent);
    if (disk.cbt && disk.cbt.chainFull !== record.id && /^[0-9a-f]{32}$/.test(disk.cbt.chainFull)) ids.add(disk.cbt.chainFull);
  }
  return [...ids];
}

export async function selectBackups(source: Repository, selection: Selection): Promise<Selected> {
  const { backups, damaged } = await source.listBackups();
  const all = [...backups].sort(byTime);
  let chosen: BackupRecord[];
  switch (selection.kind) {
    case 'all':
      chosen = all;
      break;
    case 'name': {
      const named = all.filter((r) => r.name === selection.name);
      if (named.length === 0) throw new InvalidArgumentError(`the source holds no backup named "${displayText(selection.name, 64)}"`);
      chosen = selection.latest === undefined ? named : named.slice(-selection.latest);
      break;
    }
    case 'latest':
      chosen = all.slice(-selection.count);
      break;
    case 'ids': {
      chosen = [];
      // A damaged record asked for by id fails here (readBackup), said with its id: it cannot be copied.
      for (const id of selection.ids) chosen.push(await source.readBackup(await source.findBackupId(id)));
      break;
    }
  }
  const asked = new Set(chosen.map((r) => r.id)).size;
  const byId = new Map(all.map((r) => [r.id, r]));
  const wanted = new Map<string, BackupRecord>();
  const add = (record: BackupRecord): void => {
    if (wanted.has(record.id)) return;
    wanted.set(record.id, record);
    // An ancestor pruned from the source is simply not there: every map is complete, the copy restores alone.
    for (const id of ancestorIds(record)) {
      const parent = byId.get(id);
      if (parent) add(parent);
    }
  };
  for (const record of chosen) add(record);
  return { records: parentsFirst([...wanted.values()]), asked, damaged: damaged.map((d) => ({ id: d.id, message: d.error.message })) };
}

/** Oldest first, and every ancestor before what builds on it whatever the clocks said (a depth-first walk). */
function parentsFirst(records: BackupRecord[]): BackupRecord[] {
  const byId = new Map(records.map((r) => [r.id, r]));
  const done = new Set<string>();
  const order: BackupRecord[] = [];
  const visit = (record: BackupRecord, path: Set<string>): void => {
    if (done.has(record.id) || path.has(record.id)) return;
    path.add(record.id);
    for (const id of ancestorIds(record)) {
      const parent = byId.get(id);
      if (parent) visit(parent, path);
    }
    done.add(record.id);
    order.push(record);
  };
  for (const record of [...records].sort(byTime)) visit(record, new Set());
  return order;
}
