/**
 * Verification records: one JSON object per boot test of a backup, in `verifications/<backup id>/<name>`
 * (`<name>` = `<YYYYMMDDTHHMMSSZ>-<8 hex>`, the test's start and a random part, so names sort by time and
 * never collide), written once like a backup record (create-if-absent, sealed in an encrypted repository
 * with the key as authenticated data), removed only with their backup (prune, forget). See SPEC.md 9.2.
 */
import { randomBytes } from 'node:crypto';
import { CorruptMetadataError } from './errors.js';

export const VERIFICATIONS_PREFIX = 'verifications/';
/** A verification record is small; its console attachment is capped well below this. */
export const VERIFICATION_FILE_LIMIT = 1024 * 1024;
/** The most of a console log kept in a record (its end: where a boot failed). */
export const CONSOLE_ATTACHMENT_LIMIT = 64 * 1024;

export type BootResult = 'passed' | 'failed';

/** Stable codes of a failed boot test (SPEC.md 9.2). */
export const BOOT_FAILURE_CODES = ['BOOT_TIMEOUT', 'BOOT_NO_BOOTABLE_DISK', 'BOOT_KERNEL_PANIC', 'BOOT_VM_STOPPED', 'BOOT_NO_FILESYSTEM'] as const;
export type BootFailureCode = (typeof BOOT_FAILURE_CODES)[number];

export interface BootChecks {
  /** What proof of life was asked: the agent (`guest-ping` and `guest-get-fsinfo`) or a console line. */
  expect: 'agent' | 'console';
  /** The agent answered `guest-ping`; null when the agent was not what was asked. */
  agentPing: boolean | null;
  /** The mounted file systems `guest-get-fsinfo` listed (null when not asked, or never answered). */
  filesystems: { mountpoint: string; type: string; device: string }[] | null;
  /** The console regex and the first line that matched it (null: no match); null when not asked. */
  console: { regex: string; line: string | null } | null;
}

export interface BootVerification {
  version: 1;
  kind: 'boot';
  /** The backup booted (= the folder the record is in). */
  backup: string;
  started: string;
  ended: string;
  result: BootResult;
  /** Why it failed; null when it passed. */
  reason: { code: BootFailureCode; message: string } | null;
  /** Milliseconds from the VM's start to the proof of life; null when there was none. */
  proofOfLifeMs: number | null;
  checks: BootChecks;
  accelerator: 'kvm' | 'tcg';
  machine: string;
  firmware: 'bios' | 'uefi';
  memoryBytes: number;
  qemuVersion: string;
  engineVersion: string;
  hostname: string;
  /** Where the console log of a failed test was kept on the host that ran it; null when it passed. */
  consoleLogPath: string | null;
  /** `console` (text/plain): the end of the console log of a failed test, at most 64 KiB; empty when it passed. */
  attachments: { name: string; mediaType: string; data: string }[];
}

const NAME = /^(\d{8}T\d{6}Z)-([0-9a-f]{8})$/;
const BACKUP_ID = /^[0-9a-f]{32}$/;
const UTC_TIME = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$/;

/** A new record's name: its start time (UTC, to the second) and 4 random bytes. */
export function verificationName(started: Date): string {
  return `${started.toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z')}-${randomBytes(4).toString('hex')}`;
}

export function verificationKey(backupId: string, name: string): string {
  return `${VERIFICATIONS_PREFIX}${backupId}/${name}`;
}

/** The backup and name of a verification record's key; undefined for anything else there (a stray). */
export function verificationOfKey(key: string): { backup: string; name: string } | undefined {
  const parts = key.split('/');
  if (parts.length !== 3 || `${parts[0]}/` !== VERIFICATIONS_PREFIX || !BACKUP_ID.test(parts[1]!) || !NAME.test(parts[2]!)) return undefined;
  return { backup: parts[1]!, name: parts[2]! };
}

export function encodeVerification(record: BootVerification): Buffer {
  return Buffer.from(`${JSON.stringify(record, null, 2)}\n`);
}

function isCount(value: unknown): value is number {
  return typeof value === 'number' && Number.isSafeInteger(value) && value >= 0;
}

function isString(value: unknown): value is string {
  return typeof value === 'string';
}

/** Parses and checks a verification record (SPEC.md 9.2); a record that breaks a rule is damaged. */
export function decodeVerification(bytes: Buffer, key: string): BootVerification {
  const where = `verification record ${key}`;
  const fail = (why: string): never => {
    throw new CorruptMetadataError(where, why);
  };
  let value: unknown;
  try {
    value = JSON.parse(bytes.toString('utf8'));
  } catch {
    fail('not JSON');
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) fail('not a JSON object');
  const r = value as Record<string, unknown>;
  const named = verificationOfKey(key);
  if (r.version !== 1) fail(`version ${JSON.stringify(r.version)} is not 1`);
  if (r.kind !== 'boot') fail(`kind ${JSON.stringify(r.kind)} is not "boot"`);
  if (!isString(r.backup) || !BACKUP_ID.test(r.backup)) fail('backup is not a backup id');
  if (named && named.backup !== r.backup) fail(`it names backup ${String(r.backup)}, but lies in the folder of ${named.backup}`);
  for (const field of ['started', 'ended']) if (!isString(r[field]) || !UTC_TIME.test(r[field]) || Number.isNaN(Date.parse(r[field]))) fail(`${field} is not an ISO 8601 UTC time`);
  if (r.result !== 'passed' && r.result !== 'failed') fail('result is not "passed" or "failed"');
  const reason = r.reason as Record<string, unknown> | null;
  if (r.result === 'passed' && reason !== null) fail('a passed test with a reason');
  if (r.result === 'failed' && (reason === null || typeof reason !== 'object' || !(BOOT_FAILURE_CODES as readonly unknown[]).includes(reason.code) || !isString(reason.message))) fail('a failed test without a reason of a known code');
  if (r.proofOfLifeMs !== null && !isCount(r.proofOfLifeMs)) fail('proofOfLifeMs is not an integer or null');
  if ((r.result === 'passed') !== (r.proofOfLifeMs !== null)) fail('proofOfLifeMs is given exactly when the test passed');
  const checks = r.checks as Record<string, unknown> | null;
  if (checks === null || typeof checks !== 'object' || (checks.expect !== 'agent' && checks.expect !== 'console')) fail('checks.expect is not "agent" or "console"');
  if (checks!.agentPing !== null && typeof checks!.agentPing !== 'boolean') fail('checks.agentPing is not a boolean or null');
  const filesystems = checks!.filesystems;
  if (filesystems !== null && (!Array.isArray(filesystems) || !filesystems.every((f: unknown) => f !== null && typeof f === 'object' && isString((f as Record<string, unknown>).mountpoint) && isString((f as Record<string, unknown>).type) && isString((f as Record<string, unknown>).device)))) fail('checks.filesystems is not a list of {mountpoint, type, device} or null');
  const consoleCheck = checks!.console as Record<string, unknown> | null;
  if (consoleCheck !== null && (typeof consoleCheck !== 'object' || !isString(consoleCheck.regex) || (consoleCheck.line !== null && !isString(consoleCheck.line)))) fail('checks.console is not {regex, line} or null');
  if (r.accelerator !== 'kvm' && r.accelerator !== 'tcg') fail('accelerator is not "kvm" or "tcg"');
  if (r.firmware !== 'bios' && r.firmware !== 'uefi') fail('firmware is not "bios" or "uefi"');
  for (const field of ['machine', 'qemuVersion', 'engineVersion', 'hostname']) if (!isString(r[field])) fail(`${field} is not a string`);
  if (!isCount(r.memoryBytes)) fail('memoryBytes is not an integer');
  if (r.consoleLogPath !== null && !isString(r.consoleLogPath)) fail('consoleLogPath is not a string or null');
  const attachments = r.attachments;
  if (!Array.isArray(attachments) || !attachments.every((a: unknown) => a !== null && typeof a === 'object' && isString((a as Record<string, unknown>).name) && (a as Record<string, unknown>).name !== '' && isString((a as Record<string, unknown>).mediaType) && isString((a as Record<string, unknown>).data))) fail('attachments is not a list of {name, mediaType, data}');
  return r as unknown as BootVerification;
}
