/**
 * What the copy tests share: `engine copy --json` through the CLI, records read through the public API, and
 * the check that a copy's record means what its source's does (SPEC.md 22.5).
 */
import { expect } from 'vitest';
import { Repository } from '../dist/repo-format/repository.js';
import type { BackupRecord } from '../dist/repo-format/backup-record.js';
import { parseJson, runEngine, type RunResult } from './helpers.js';

export interface CopyJson {
  backups: { source: string; target: string; name: string; status: 'copied' | 'skipped' }[];
  backupsCopied: number;
  backupsSkipped: number;
  chunksSent: number;
  chunksSkipped: number;
  pagesSent: number;
  bytesRead: number;
  bytesSent: number;
  limit: { rate: number; bytesTaken: number; waitedMs: number } | null;
}

/** `engine copy --from FROM --to TO ARGS --json`, which must succeed; its report. */
export async function copyOk(from: string, to: string, args: string[], env: Record<string, string> = {}): Promise<CopyJson> {
  const r = await runEngine(['copy', '--from', from, '--to', to, ...args, '--json'], { env });
  expect(r.code, r.stderr).toBe(0);
  return parseJson<CopyJson>(r.stdout);
}

export function copyRun(from: string, to: string, args: string[], env: Record<string, string> = {}): Promise<RunResult> {
  return runEngine(['copy', '--from', from, '--to', to, ...args, '--json'], { env });
}

/** Every record of a repository, by id (read through the engine's own reader: encrypted ones opened). */
export async function recordsOf(repo: string, passphrase?: string): Promise<{ id: string; records: Map<string, BackupRecord> }> {
  const opened = await Repository.open(repo, { access: 'read', passphrase: passphrase === undefined ? undefined : Buffer.from(passphrase), manyWriters: true, onNotice: () => undefined });
  try {
    const { backups, damaged } = await opened.listBackups();
    expect(damaged).toEqual([]);
    return { id: opened.config.id, records: new Map(backups.map((b: BackupRecord) => [b.id, b])) };
  } finally {
    await opened.close();
  }
}

/**
 * The copy means what the source means: every field as the source has it but its id, the backup ids it names
 * (mapped through `idMap`, source → target), the map roots (equal when `sameIds`: both repositories name
 * blobs alike), and `copiedFrom`, which names the source backup.
 */
export function expectSameMeaning(source: BackupRecord, copy: BackupRecord, sourceRepository: string, idMap: ReadonlyMap<string, string>, sameIds: boolean): void {
  const map = (id: string | null): string | null => (id === null ? null : id === source.id ? copy.id : (idMap.get(id) ?? id));
  expect(copy.copiedFrom).toEqual(source.copiedFrom ?? { repository: sourceRepository, backup: source.id });
  const { id: _s, parent: sp, disks: sd, copiedFrom: _o, ...sourceRest } = source;
  const { id: _c, parent: cp, disks: cd, copiedFrom: _f, ...copyRest } = copy;
  expect(copyRest).toEqual(sourceRest);
  expect(cp).toBe(map(sp));
  expect(cd).toHaveLength(sd.length);
  sd.forEach((disk, i) => {
    const c = cd[i]!;
    expect({ ...c, map: { ...c.map, root: '' }, parent: null, cbt: c.cbt && { ...c.cbt, chainFull: '' } }).toEqual({ ...disk, map: { ...disk.map, root: '' }, parent: null, cbt: disk.cbt && { ...disk.cbt, chainFull: '' } });
    expect(c.parent).toBe(map(disk.parent));
    if (disk.cbt) expect(c.cbt!.chainFull).toBe(map(disk.cbt.chainFull));
    if (sameIds) expect(c.map.root).toBe(disk.map.root);
  });
}
