/** Shapes and prints results. The JSON shapes are a contract (SPEC.md, "CLI JSON output"). */
import { NO_QUIESCE, type BackupRecord, type Consistency } from '../repo-format/backup-record.js';
import { consistencyOf } from '../engine/catalogue/json.js';

export { backupJson, diskJson, restoreJson } from '../engine/catalogue/json.js';
import { configCompression, type RepositoryConfig } from '../repo-format/config.js';
import { compressionName } from '../repo-format/compression.js';
import type { RestoreResult } from '../engine/restore/restore.js';
import type { VerifyReport } from '../engine/verify/verify.js';
import type { BootSummary } from '../engine/catalogue/catalogue.js';
import type { BootVerification } from '../repo-format/verification-record.js';
import type { ServeHandle } from '../engine/serve/serve.js';
import type { MountResult, VmMountResult } from '../engine/mount/mount.js';
import type { PruneReport } from '../engine/retention/prune.js';
import type { GcReport } from '../engine/gc/gc.js';
import type { RepairReport } from '../engine/repair/repair.js';
import type { ProtectResult } from '../engine/catalogue/protect.js';
import { formatBytes } from '../engine/common/units.js';
import { jsonForTerminal, terminalLine } from './terminal.js';

function consistencyLine(c: Consistency): string {
  return `${c.level} (${c.method}${c.freezeMs !== null ? `, frozen ${c.freezeMs} ms` : ''})${c.reason ? `: ${c.reason}` : ''}`;
}

export function printJson(value: unknown): void {
  process.stdout.write(`${jsonForTerminal(JSON.stringify(value, null, 2))}\n`);
}

/** "1 block", "2 blocks": a count with its noun, singular when it is one. */
export function count(n: number, noun: string, plural = `${noun}s`): string {
  return `${n} ${n === 1 ? noun : plural}`;
}

/** A record's time for a person: RFC 3339 in UTC, to the second, with its zone ("2026-12-06T09:31:02Z"). */
export function formatTime(iso: string): string {
  return /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$/.test(iso) ? `${iso.slice(0, 19)}Z` : iso;
}

/** Rows as aligned columns, two spaces apart, without trailing blanks. */
function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => (r[c] ?? '').length)));
  return rows.map((r) => r.map((cell, c) => cell.padEnd(widths[c]!)).join('  ').trimEnd()).join('\n');
}

function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(1)} s`;
}

export function printBackup(record: BackupRecord): void {
  const lines = [`backup ${record.id} (${record.type}) "${record.name}" committed`];
  if (record.consistency && record.consistency.method !== NO_QUIESCE.method) lines.push(`  consistency: ${consistencyLine(record.consistency)}`);
  for (const disk of record.disks) {
    const s = disk.stats;
    const rate = s.durationMs > 0 ? `${formatBytes((s.bytesRead / s.durationMs) * 1000)}/s` : '-';
    lines.push(
      `  ${disk.name}: ${disk.mode}${disk.modeReason ? ` (${disk.modeReason})` : ''}, ${formatBytes(disk.size)}, read ${formatBytes(s.bytesRead)} in ${seconds(s.durationMs)} (${rate}); ` +
        `${count(s.blocksNew, 'new block')} (${formatBytes(s.bytesNew)} → ${formatBytes(s.bytesStored)} stored), ` +
        `${s.blocksDeduplicated} deduplicated, ${s.blocksZero} zero, ${s.blocksUnchanged} unchanged`,
    );
  }
  process.stdout.write(`${lines.join('\n')}\n`);
}

/** A backup's latest boot test in a few words: `passed 5.1 s`, `failed BOOT_TIMEOUT`, or `-` (never tested). */
function bootCell(boot: BootSummary | undefined): string {
  if (!boot) return '-';
  return boot.result === 'passed' ? `passed ${seconds(boot.proofOfLifeMs ?? 0)}` : `failed ${boot.reason?.code ?? ''}`;
}

export function printList(backups: BackupRecord[], damaged: { id: string; message: string }[], boots: Record<string, BootSummary> = {}): void {
  const rows = [['ID', 'TIME', 'TYPE', 'CONSISTENCY', 'PARENT', 'CHECKPOINT', 'NAME', 'DISKS', 'SIZE', 'READ', 'NEW', 'BOOT']];
  for (const b of backups) {
    const size = b.disks.reduce((sum, d) => sum + d.size, 0);
    const read = b.disks.reduce((sum, d) => sum + d.stats.bytesRead, 0);
    const added = b.disks.reduce((sum, d) => sum + d.stats.bytesStored, 0);
    const checkpoints = [...new Set(b.disks.map((d) => d.cbt?.checkpoint).filter((c) => c !== undefined))];
    const checkpoint = checkpoints.length === 0 ? '-' : checkpoints.length === 1 ? checkpoints[0]!.slice(0, 28) : `${checkpoints.length} checkpoints`;
    rows.push([b.id.slice(0, 12), formatTime(b.startTime), b.type, consistencyOf(b).level, b.parent?.slice(0, 12) ?? '-', checkpoint, b.name, String(b.disks.length), formatBytes(size), formatBytes(read), formatBytes(added), bootCell(boots[b.id])]);
  }
  process.stdout.write(`${table(rows)}\n`);
  for (const d of damaged) process.stdout.write(`DAMAGED ${d.id}: ${d.message}\n`);
}

export function printShow(record: BackupRecord, boot: BootSummary | null = null): void {
  const lines = [
    `id:        ${record.id}`,
    `name:      ${record.name}`,
    `type:      ${record.type}`,
    `parent:    ${record.parent ?? '-'}`,
    `started:   ${formatTime(record.startTime)}`,
    `finished:  ${formatTime(record.endTime)}`,
    `host:      ${record.hostname} (engine ${record.engineVersion})`,
    `blocksize: ${formatBytes(record.blockSize)}`,
    `consistency: ${consistencyLine(consistencyOf(record))}`,
    ...(record.copiedFrom ? [`copied from: backup ${record.copiedFrom.backup} of repository ${record.copiedFrom.repository}`] : []),
  ];
  for (const disk of record.disks) {
    const s = disk.stats;
    lines.push(
      `disk ${disk.name}: ${formatBytes(disk.size)} (${disk.size} bytes) from ${disk.source.kind} ${disk.source.path}`,
      `  mode: ${disk.mode}${disk.modeReason ? ` (full read: ${disk.modeReason})` : ''}${disk.parent ? `, unchanged blocks from ${disk.parent}` : ''}`,
      ...(disk.cbt ? [`  checkpoint: ${disk.cbt.checkpoint}${disk.cbt.base ? `, read against ${disk.cbt.base}` : ''}; chain full ${disk.cbt.chainFull}`] : []),
      `  blocks: ${s.blocksTotal} total, ${s.blocksNew} new, ${s.blocksDeduplicated} deduplicated, ${s.blocksZero} zero, ${s.blocksUnchanged} unchanged`,
      `  bytes: ${s.bytesRead} read, ${s.bytesNew} new, ${s.bytesStored} stored; ${seconds(s.durationMs)}`,
    );
  }
  if (boot) {
    lines.push(
      boot.result === 'passed'
        ? `boot test: passed ${formatTime(boot.started)} (proof of life after ${seconds(boot.proofOfLifeMs ?? 0)}, ${boot.accelerator.toUpperCase()})`
        : `boot test: FAILED ${formatTime(boot.started)}: ${boot.reason?.code ?? ''}: ${boot.reason?.message ?? ''}${boot.consoleLogPath ? `; console log: ${boot.consoleLogPath}` : ''}`,
    );
  } else lines.push('boot test: never (engine verify --boot)');
  process.stdout.write(`${lines.join('\n')}\n`);
}

/** One boot test's result (`verify --boot`). */
export function printBootVerification(result: BootVerification & { key: string }): void {
  const how = `${result.machine}, ${result.firmware}, ${result.accelerator.toUpperCase()}, ${formatBytes(result.memoryBytes)}, QEMU ${result.qemuVersion}`;
  const what =
    result.checks.expect === 'agent'
      ? `the guest agent answered guest-ping${result.checks.filesystems && result.checks.filesystems.length > 0 ? ` and listed ${result.checks.filesystems.map((f) => `${f.mountpoint} (${f.type} on ${f.device})`).join(', ')}` : ''}`
      : `console line ${JSON.stringify(result.checks.console?.line ?? '')} matched ${JSON.stringify(result.checks.console?.regex ?? '')}`;
  const lines =
    result.result === 'passed'
      ? [`backup ${result.backup} boots: ${what} ${seconds(result.proofOfLifeMs ?? 0)} after the VM started (${how})`]
      : [`backup ${result.backup} did NOT boot: ${result.reason?.code ?? ''}: ${result.reason?.message ?? ''} (${how})`, ...(result.consoleLogPath ? [`console log: ${result.consoleLogPath}`] : [])];
  lines.push(`recorded as ${result.key}; every write of the VM was discarded`);
  process.stdout.write(`${lines.join('\n')}\n`);
}

export function printInit(path: string, config: RepositoryConfig): void {
  process.stdout.write(`created repository ${config.id} at ${path} (block size ${formatBytes(config.blockSize)}, compression ${compressionName(configCompression(config))}, format ${config.version}${config.encryption ? `, encrypted: ${config.encryption.cipher}, key file ${config.encryption.keyFile}` : ''})\n`);
}

export function printRestore(result: RestoreResult): void {
  if (result.createdDirectory !== null) process.stdout.write(`created directory ${result.createdDirectory} for the ${result.disks.length} disks of backup ${result.backup.id}\n`);
  for (const d of result.disks) {
    const compared = d.blocksCompared > 0 ? `; ${count(d.blocksCompared, 'block')} compared` : '';
    const rollback = d.rollback ? `; bitmap ${d.rollback.bitmap} (checkpoint of ${d.rollback.baseBackup}): ${count(d.rollback.blocksDirty, 'dirty block')}, ${d.rollback.blocksChangedSinceBase} changed between the backups` : '';
    process.stdout.write(`restored disk ${d.name} of backup ${result.backup.id} to ${d.path} (${formatBytes(d.size)}, ${count(d.blocksWritten, 'block')} / ${formatBytes(d.bytesWritten)} written${compared}${rollback})\n`);
  }
}

export function printVerify(report: VerifyReport): void {
  const lines = [
    `checked ${count(report.backups, 'backup')}${report.verifications > 0 ? ` (${count(report.verifications, 'boot test record')})` : ''}, ${count(report.packs, 'pack')}, ${count(report.blobs, 'blob')}${report.readData ? `, read ${formatBytes(report.bytesChecked)}` : ' (structure only; --read-data re-reads every chunk)'}`,
  ];
  if (report.subset) lines.push(`read the data of ${report.subset.packs} of ${report.packs} packs (${report.subset.percent}%, seed ${report.subset.seed})`);
  if (report.quarantined.length > 0) lines.push(`quarantined: ${count(report.quarantined.length, 'damaged frame')} set aside by repair`);
  for (const p of report.problems) lines.push(`ERROR ${p.code}: ${p.message}`);
  for (const w of report.warnings) lines.push(`WARNING ${w.code}: ${w.message}`);
  const g = report.garbage;
  if (g.unreferencedBlobs > 0) lines.push(`garbage: ${count(g.unreferencedBlobs, 'unreferenced blob')} (${formatBytes(g.unreferencedBytes)}), reclaimable by a later gc`);
  if (g.unindexedPacks.length > 0) lines.push(`garbage: ${count(g.unindexedPacks.length, 'pack')} no index entry names (${formatBytes(g.unindexedBytes)}), left by an interrupted writer`);
  if (g.tempFiles.length > 0) lines.push(`garbage: ${count(g.tempFiles.length, 'temporary file')} in tmp/ left by an interrupted writer (${g.tempFiles.slice(0, 3).join(', ')})`);
  lines.push(report.ok ? 'no problems found' : `${count(report.problems.length, 'problem')} found`);
  process.stdout.write(`${lines.join('\n')}\n`);
}

export function serveJson(handle: ServeHandle): Record<string, unknown> {
  return {
    backup: handle.backup.id,
    socket: handle.address.socket ?? null,
    host: handle.address.host ?? null,
    port: handle.address.port ?? null,
    tls: handle.tls,
    warnings: handle.warnings,
    writable: handle.writable,
    readerToken: handle.readerToken,
    lease: handle.lease,
    tableBytes: handle.tableBytes,
    pid: process.pid,
    exports: handle.exports,
  };
}

export function printServe(handle: ServeHandle): void {
  const access = handle.tls ? `, TLS with ${handle.tls === 'psk' ? 'pre-shared keys' : 'client certificates'}` : '';
  const lines = [`serving backup ${handle.backup.id}${handle.writable ? ' (writable overlay' : ' (read-only'}${access}); stop with Ctrl-C or SIGTERM`];
  for (const e of handle.exports) lines.push(`  ${e.name}: ${formatBytes(e.size)} at ${e.uri}${e.missingChunks > 0 ? ` (${count(e.missingChunks, 'chunk')} missing: EIO)` : ''}`);
  process.stdout.write(`${lines.join('\n')}\n`);
}

export function printMount(result: MountResult): void {
  const lines = [`mounted backup ${result.backup} under ${result.dir} (read-only); engine umount ${result.dir} undoes it`];
  for (const d of result.disks) lines.push(`  disk ${d.name}: ${formatBytes(d.size)}, partition table: ${d.partitionTable}, image file ${d.image}`);
  for (const f of result.filesystems) {
    const what = `${f.disk}${f.partition === null ? '' : ` partition ${f.partition}`}`;
    lines.push(f.path ? `  ${what}: ${f.type} at ${f.path}` : `  ${what}: not mounted (${f.reason})`);
  }
  process.stdout.write(`${lines.join('\n')}\n`);
}

export function printVmMount(result: VmMountResult): void {
  const lines = [`mounted backup ${result.backup} under ${result.dir} (read-only, through the file-restore appliance VM); engine umount ${result.dir} undoes it`];
  for (const v of result.volumes) lines.push(`  ${v.name}: ${v.type}, ${v.state}${v.detail ? ` (${v.detail})` : ''}`);
  // LVM names and details come from the guest's disks.
  process.stdout.write(`${lines.map((line) => terminalLine(line)).join('\n')}\n`);
}

export function printPrune(report: PruneReport): void {
  const lines: string[] = [];
  if (report.backups.length > 0) {
    const rows = report.backups.map((b) => [b.keep ? 'keep' : report.dryRun ? 'would remove' : 'remove', b.id.slice(0, 12), formatTime(b.startTime), b.name, b.keep ? `(${b.reasons.join(', ')})` : '']);
    lines.push(table(rows));
  }
  for (const d of report.damaged) lines.push(`DAMAGED ${d.id}: ${d.message} (left alone)`);
  for (const l of report.locked ?? []) lines.push(`kept: the record of ${l.id.slice(0, 12)} stays a version of the bucket, locked until ${l.until ?? '(no lock)'} (--as-of reads it); gc removes it after`);
  lines.push(`${report.kept} kept, ${report.removed} ${report.dryRun ? 'would be removed (dry run)' : 'removed'}${report.removed > 0 && !report.dryRun ? `; engine gc reclaims ${report.removed === 1 ? 'its' : 'their'} space` : ''}`);
  process.stdout.write(`${lines.join('\n')}\n`);
}

export function printProtect(result: ProtectResult): void {
  const state = result.protected ? 'protected' : 'not protected';
  process.stdout.write(`backup ${result.backup} is ${state}${result.changed ? '' : ' (it already was)'}\n`);
}

export function printGc(report: GcReport): void {
  const p = report.packs;
  const b = report.bytes;
  // Rewriting can write more than it deletes (old packs kept for a reader or a backup that ran meanwhile): say so, not "reclaimed -184 B".
  const balance =
    b.reclaimed >= 0
      ? `${report.dryRun ? 'would reclaim' : 'reclaimed'} ${formatBytes(b.reclaimed)}`
      : `${report.dryRun ? 'would reclaim nothing' : 'reclaimed nothing'}: ${formatBytes(-b.reclaimed)} more written than deleted`;
  const lines = [
    `${report.dryRun ? 'would delete' : 'deleted'} ${p.deleted.length} of ${count(p.before, 'pack')} (${p.rewritten.length} rewritten into ${report.dryRun ? 'new packs' : `${p.created.length} new`}), ${count(report.chunks.removed, 'unreferenced blob')} removed, ${report.chunks.moved} moved`,
    `${balance} (${formatBytes(b.deleted)} deleted, ${formatBytes(b.written)} written)`,
  ];
  if (report.segments) lines.push(`index: ${count(report.segments.written, 'segment')} written, ${count(report.segments.deleted, 'superseded segment')} deleted (of ${report.segments.before})`);
  if (report.abandoned) lines.push(`removed ${report.abandoned} abandoned temporary file(s) or upload(s) of interrupted writers`);
  const o = report.objectLock;
  if (o) {
    lines.push(`object lock: ${count(o.extended, 'lock')} extended, ${count(o.expired.length, 'object')} found unlocked (OBJECT_LOCK_EXPIRED, locked again), ${count(o.purged, 'hidden version or delete marker')} removed for good${o.locked.versions > 0 ? `, ${count(o.locked.versions, 'hidden version')} kept: locked until ${o.locked.until ?? '?'}` : ''}`);
  }
  if (report.backupsCommittedDuringGc.length > 0) lines.push(`${count(report.backupsCommittedDuringGc.length, 'backup')} committed during gc ${report.backupsCommittedDuringGc.length === 1 ? 'was' : 'were'} marked too`);
  for (const k of p.kept) lines.push(`kept pack ${k.pack}: ${k.why}`);
  if (p.deferred.length > 0) lines.push(`deferred: ${count(p.deferred.length, 'pack')} ${p.deferred.length === 1 ? 'stays' : 'stay'} until no reader is registered (${report.readers} now); a later gc deletes ${p.deferred.length === 1 ? 'it' : 'them'}`);
  const m = report.markers;
  if (m.quarantine.length + m.protected.length + m.verifications.length > 0) {
    lines.push(`${report.dryRun ? 'would remove' : 'removed'} ${count(m.quarantine.length, 'quarantine record')} of packs that are gone, ${count(m.protected.length, 'protection marker')} and ${count(m.verifications.length, 'boot-test record')} of backups that are gone`);
  }
  process.stdout.write(`${lines.join('\n')}\n`);
}

function repositoryIdSource(source: NonNullable<RepairReport['configRebuilt']>['sources']['id']): string {
  if (source === 'index') return 'from the index';
  if (source === 'config version') return 'the whole config from its newest earlier version in the bucket';
  return 'new: the index was lost too; the next backup of each qcow2 or libvirt chain is full';
}

/** A retention in the largest of d, h, m, s that divides it (`--object-lock`'s own units). */
function formatRetention(ms: number): string {
  for (const [unit, size] of [['d', 86_400_000], ['h', 3_600_000], ['m', 60_000]] as const) if (ms % size === 0) return `${ms / size}${unit}`;
  return `${Math.round(ms / 1000)}s`;
}

function objectLockSource(c: NonNullable<RepairReport['configRebuilt']>): string {
  if (!c.objectLock) return c.sources.objectLock === 'none' ? ', no Object Lock (none found)' : '';
  const how = c.sources.objectLock === 'retention' ? 'read back from the objects\' retention' : 'from the earlier config';
  return `, Object Lock ${c.objectLock.mode} for ${formatRetention(c.objectLock.retentionMs)} (${how})`;
}

export function printRepair(report: RepairReport): void {
  const c = report.configRebuilt;
  const lines = [
    ...(c
      ? [
          `rebuilt the config (it was ${c.why === 'missing' ? 'missing' : `damaged: ${c.why}`}${c.keptAs ? `; kept as ${c.keptAs}` : ''}): repository id ${c.id} (${repositoryIdSource(c.sources.id)}), block size ${formatBytes(c.blockSize)} (from the ${c.sources.blockSize}), format ${c.version}${c.encrypted ? ', encrypted' : ''}${objectLockSource(c)}`,
        ]
      : []),
    `index rebuilt from ${count(report.index.packs, 'pack')}, ${count(report.index.blobs, 'blob')} (the old index was ${report.previousIndex}); read ${count(report.framesChecked, 'frame')}, ${formatBytes(report.bytesChecked)}`,
  ];
  for (const q of report.quarantined) lines.push(`quarantined: pack ${q.pack} offset ${q.offset}${q.blob ? ` (blob ${q.blob.slice(0, 16)}…)` : ''}: ${q.why}`);
  if (report.tempFilesRemoved > 0) lines.push(`removed ${count(report.tempFilesRemoved, 'temporary file')}`);
  for (const r of report.recordsRestored) lines.push(`restored backup record ${r.backup} from its copy in the index (the file was damaged: ${r.was})`);
  for (const d of report.damaged) lines.push(`DAMAGED ${d.code}: ${d.message}`);
  lines.push(report.ok ? 'every backup restores' : `${count(report.damaged.length, 'damaged reference')} ${report.damaged.length === 1 ? 'remains' : 'remain'}`);
  process.stdout.write(`${lines.join('\n')}\n`);
}
