/**
 * The JSON shapes of backups and restores (SPEC.md 14.2, "JSON output"): one contract for the CLI's --json
 * and the service API's results and catalogue (engine/server/), so both say the same thing in the same words.
 */
import type { BackupRecord, Consistency, DiskRecord } from '../../repo-format/backup-record.js';
import type { BootSummary } from './catalogue.js';
import type { RestoreResult } from '../restore/restore.js';

export function diskJson(disk: DiskRecord): Record<string, unknown> {
  return {
    name: disk.name,
    size: disk.size,
    source: disk.source,
    mode: disk.mode,
    modeReason: disk.modeReason,
    parent: disk.parent,
    checkpoint: disk.cbt?.checkpoint ?? null,
    ...disk.stats,
  };
}

/** A backup as `backup`, `list` and `show` print it in JSON; `boot`: its latest boot test (SPEC.md 9.2), null for none. */
export function backupJson(record: BackupRecord, boot: BootSummary | null = null): Record<string, unknown> {
  return {
    id: record.id,
    name: record.name,
    type: record.type,
    parent: record.parent,
    startTime: record.startTime,
    endTime: record.endTime,
    hostname: record.hostname,
    engineVersion: record.engineVersion,
    blockSize: record.blockSize,
    disks: record.disks.map(diskJson),
    attachments: record.attachments.map((a) => ({ name: a.name, mediaType: a.mediaType, bytes: Buffer.byteLength(a.data) })),
    consistency: consistencyOf(record),
    copiedFrom: record.copiedFrom ?? null,
    boot,
  };
}

/** The record's consistency; a record of an older engine has none: crash, not recorded (SPEC.md 9). */
export function consistencyOf(record: BackupRecord): Consistency {
  return record.consistency ?? NOT_RECORDED;
}

const NOT_RECORDED: Consistency = { level: 'crash', method: 'not recorded', freezeMs: null, reason: null };

export function restoreJson(result: RestoreResult): Record<string, unknown> {
  return { backup: result.backup.id, createdDirectory: result.createdDirectory, disks: result.disks.map((d) => ({ ...d, rollback: d.rollback ?? null })) };
}

