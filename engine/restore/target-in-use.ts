/**
 * Whether a restore target is in use by someone else, and whether it holds data. Safe by default: the
 * engine never writes to a device or file in use, and asks for --force before it overwrites a device
 * that holds a filesystem, a partition table or a volume signature.
 *
 * - A block device is opened with O_EXCL (without O_CREAT, Linux's exclusive open of a block device): the
 *   kernel refuses it (EBUSY) while the device or one of its partitions is mounted, or held by
 *   device-mapper (LVM, dm-crypt), md or swap, or opened exclusively by another program; the claim lasts
 *   until the engine closes it, so nothing can mount it meanwhile. The message says who holds it, from
 *   /proc/self/mountinfo, /proc/swaps and sysfs holders.
 * - A regular file has no such claim; it is in use when a loop device has it as its backing file, or a
 *   process holds a lock on it (qemu locks the images it has open: a running VM's disk, a qemu-nbd export).
 * - Signatures: `blkid -p` (util-linux's low-level probe, which knows every filesystem, partition table,
 *   RAID and volume signature).
 */
import { execFile } from 'node:child_process';
import { open, readdir, readFile, stat, type FileHandle } from 'node:fs/promises';
import type { BigIntStats } from 'node:fs';
import { constants } from 'node:fs';
import { join } from 'node:path';
import { isErrnoException } from '../../repo-format/errors.js';
import { TargetHoldsDataError, TargetInUseError, TargetUnwritableError } from '../errors.js';
import { deviceNumbers } from '../sources/device-size.js';

/** Opens a block device for writing, exclusively: refused while it is mounted or held (TargetInUseError). */
export async function openDeviceExclusively(path: string, rdev: bigint | number): Promise<FileHandle> {
  try {
    return await open(path, constants.O_RDWR | constants.O_EXCL);
  } catch (error) {
    if (isErrnoException(error) && error.code === 'EBUSY') throw new TargetInUseError(path, await whoHoldsDevice(rdev));
    throw new TargetUnwritableError(path, isErrnoException(error) ? error.message : String(error));
  }
}

/** The device and its partitions as "major:minor", with their kernel names. */
async function deviceAndPartitions(rdev: bigint | number): Promise<Map<string, string>> {
  const { major, minor } = deviceNumbers(rdev);
  const self = `${major}:${minor}`;
  const found = new Map<string, string>();
  const sys = `/sys/dev/block/${self}`;
  const name = (await readFile(join(sys, 'uevent'), 'utf8').catch(() => '')).match(/^DEVNAME=(.*)$/m)?.[1] ?? self;
  found.set(self, name);
  for (const entry of await readdir(sys).catch(() => [] as string[])) {
    const dev = await readFile(join(sys, entry, 'dev'), 'utf8').catch(() => undefined);
    const isPartition = await stat(join(sys, entry, 'partition')).then(() => true, () => false);
    if (dev && isPartition) found.set(dev.trim(), entry);
  }
  return found;
}

/** Who holds a block device: mounts, device-mapper/md holders, swap. For the refusal's message. */
export async function whoHoldsDevice(rdev: bigint | number): Promise<string> {
  const devices = await deviceAndPartitions(rdev);
  const uses: string[] = [];
  const mountinfo = await readFile('/proc/self/mountinfo', 'utf8').catch(() => '');
  for (const line of mountinfo.split('\n')) {
    const fields = line.split(' ');
    const name = devices.get(fields[2] ?? '');
    if (name !== undefined) uses.push(`${name} is mounted at ${(fields[4] ?? '?').replace(/\\040/g, ' ')}`);
  }
  for (const [dev, name] of devices) {
    for (const holder of await readdir(`/sys/dev/block/${dev}/holders`).catch(() => [] as string[])) {
      const dmName = (await readFile(`/sys/block/${holder}/dm/name`, 'utf8').catch(() => '')).trim();
      uses.push(`${name} is held by ${holder}${dmName ? ` (${dmName})` : ''}`);
    }
  }
  const swaps = (await readFile('/proc/swaps', 'utf8').catch(() => '')).split('\n').slice(1);
  for (const line of swaps) {
    const file = line.split(/\s+/)[0];
    if (!file) continue;
    const swap = await stat(file, { bigint: true }).catch(() => undefined);
    if (swap?.isBlockDevice()) {
      const { major, minor } = deviceNumbers(swap.rdev);
      const name = devices.get(`${major}:${minor}`);
      if (name !== undefined) uses.push(`${name} is in use as swap`);
    }
  }
  return uses.length > 0 ? uses.join('; ') : 'another program has it open exclusively';
}

/** Why a regular file is in use (a loop device's backing file, a lock held on it), or undefined. */
export async function whoUsesFile(file: BigIntStats): Promise<string | undefined> {
  const uses: string[] = [];
  for (const name of await readdir('/sys/block').catch(() => [] as string[])) {
    if (!name.startsWith('loop')) continue;
    const backing = (await readFile(`/sys/block/${name}/loop/backing_file`, 'utf8').catch(() => '')).trim().replace(/ \(deleted\)$/, '');
    if (!backing) continue;
    const backed = await stat(backing, { bigint: true }).catch(() => undefined);
    if (backed && backed.dev === file.dev && backed.ino === file.ino) uses.push(`/dev/${name} uses it as its backing file`);
  }
  // /proc/locks: "1: OFDLCK ADVISORY READ -1 fd:01:1234 100 101"; the device is major:minor in hex.
  const { major, minor } = deviceNumbers(file.dev);
  const locks = await readFile('/proc/locks', 'utf8').catch(() => '');
  const holders = new Set<string>();
  for (const line of locks.split('\n')) {
    const fields = line.trim().split(/\s+/);
    const where = fields.find((f) => /^[0-9a-f]+:[0-9a-f]+:\d+$/.test(f));
    if (!where) continue;
    const [maj, min, ino] = where.split(':');
    if (parseInt(maj!, 16) !== major || parseInt(min!, 16) !== minor || BigInt(ino!) !== file.ino) continue;
    const pid = Number(fields[4]);
    const comm = pid > 0 ? (await readFile(`/proc/${pid}/comm`, 'utf8').catch(() => '')).trim() : '';
    holders.add(pid > 0 ? `process ${pid}${comm ? ` (${comm})` : ''}` : 'a process');
  }
  if (holders.size > 0) uses.push(`${[...holders].join(', ')} holds a lock on it (qemu locks the images it has open)`);
  return uses.length > 0 ? uses.join('; ') : undefined;
}

/** What `blkid -p` says of a device or image: its values (TYPE, UUID, PTTYPE, PTUUID, LABEL …), none, or why it could not say. */
export type Signature = { values: Map<string, string> } | { none: true } | { unknown: string };

export async function probeSignature(path: string): Promise<Signature> {
  const { code, stdout, stderr } = await new Promise<{ code: number | string; stdout: string; stderr: string }>((resolve) => {
    execFile('blkid', ['-p', '-o', 'export', '--', path], { timeout: 30_000 }, (error, out, err) => {
      const failure = error as (NodeJS.ErrnoException & { code?: number | string }) | null;
      resolve({ code: failure ? (failure.code ?? 1) : 0, stdout: out, stderr: err });
    });
  });
  if (code === 2) return { none: true };
  if (code === 'ENOENT') return { unknown: 'data the engine cannot rule out (blkid, from util-linux, is not installed to check for a filesystem)' };
  if (code === 8) return { unknown: 'several conflicting signatures (blkid -p reports an ambivalent probe)' };
  if (code !== 0) return { unknown: `data the engine cannot rule out (blkid -p failed: ${(stderr || String(code)).trim()})` };
  return { values: new Map(stdout.split('\n').filter((l) => l.includes('=')).map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)] as const)) };
}

/** "an ext4 filesystem (UUID …)", "a dos partition table (…)": for messages. */
export function describeSignature(signature: Signature): string | undefined {
  if ('none' in signature) return undefined;
  if ('unknown' in signature) return signature.unknown;
  const values = signature.values;
  const label = values.get('LABEL');
  const uuid = values.get('UUID') ?? values.get('PTUUID');
  const extra = [uuid ? `UUID ${uuid}` : '', label ? `label ${label}` : ''].filter(Boolean).join(', ');
  const article = (word: string): string => (/^[aeiox]/i.test(word) ? 'an' : 'a');
  const type = values.get('TYPE');
  const suffix = extra ? ` (${extra})` : '';
  if (type) return `${article(type)} ${type} ${/_member$|^swap$|^crypto_/.test(type) ? 'signature' : 'filesystem'}${suffix}`;
  const table = values.get('PTTYPE');
  if (table) return `a ${table} partition table${suffix}`;
  return `a signature blkid reports (${[...values.keys()].join(', ')})`;
}

/**
 * Whether two probes show the same disk, at another point in its life: the same filesystem UUID or the
 * same partition-table UUID. What a rollback onto its own disk finds.
 */
export function sameDisk(a: Signature, b: Signature): boolean {
  if (!('values' in a) || !('values' in b)) return false;
  return ['UUID', 'PTUUID'].some((key) => a.values.get(key) !== undefined && a.values.get(key) === b.values.get(key));
}

/**
 * Refuses a block device that holds a signature (TargetHoldsDataError), unless `expected` (what the restore
 * point itself holds there) shows it is the same disk.
 */
export async function refuseDeviceWithData(path: string, expected?: () => Promise<Signature>): Promise<void> {
  const found = await probeSignature(path);
  const what = describeSignature(found);
  if (what === undefined) return;
  if (expected && sameDisk(found, await expected())) return;
  throw new TargetHoldsDataError(path, what);
}
