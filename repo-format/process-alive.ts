/**
 * Whether a process still runs, and whether it is still the process that wrote a lock or a registration.
 * `kill(pid, 0)` alone says yes for a zombie: a daemon that exited (qemu-nbd
 * after `--fork`) stays a zombie until its new parent reaps it, which in a container can take seconds. A
 * zombie holds no locks and no files, so for every purpose here it is gone.
 */
import { readFileSync } from 'node:fs';
import { isErrnoException } from './errors.js';

/**
 * The fields of /proc/<pid>/stat after "pid (comm)": [state, ppid, …]. comm may contain spaces and
 * parentheses, so the split is at the last ")". Undefined when the process is gone or there is no /proc.
 */
export function procStatFields(pid: number): string[] | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  } catch {
    return undefined;
  }
}

export function isProcessAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (error) {
    // EPERM: it exists, owned by someone else.
    return !(isErrnoException(error) && error.code === 'ESRCH');
  }
  const fields = procStatFields(pid);
  return fields === undefined || fields[0] !== 'Z'; // no /proc: trust kill()
}

/** This boot of the host (the kernel's random boot id), or undefined where /proc cannot tell. */
export function bootId(): string | undefined {
  try {
    return readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return undefined;
  }
}

/**
 * Who runs under `pid` now: the boot id and the process's start time (field 22 of /proc/<pid>/stat, in
 * clock ticks since boot), as "<boot id>:<ticks>". A pid recorded in a file outlives its process (kill -9,
 * a crash, a reboot) and is reused by the kernel; the same pid with another identity is another process.
 * No wall clock is involved, so a clock step cannot fake or hide a change. Undefined when the process is
 * gone or /proc cannot tell.
 */
export function processIdentity(pid: number): string | undefined {
  const startTime = procStatFields(pid)?.[19];
  const boot = bootId();
  if (startTime === undefined || boot === undefined) return undefined;
  return `${boot}:${startTime}`;
}

/**
 * What can be known about the process that wrote a lock or a registration (`identity` from
 * processIdentity when it wrote it; absent in files of older engines):
 *
 * - `dead`: on this host, and its pid runs no process, or runs another one (identity differs: a reused
 *   pid), or the file is from an earlier boot (every process of that boot is gone);
 * - `alive`: on this host and still that very process (identity matches);
 * - `unverified`: on this host, a live process holds the pid, and no identity was recorded to tell whether
 *   it is the writer (files of older engines: taken as alive, the safe mistake);
 * - `other-host`: written on another host: its pid means nothing here.
 */
export type HolderLiveness = 'dead' | 'alive' | 'unverified' | 'other-host';

export function holderLiveness(holder: { pid: number; hostname: string; identity?: string | undefined }, thisHost: string): HolderLiveness {
  if (holder.hostname !== thisHost) return 'other-host';
  if (holder.identity !== undefined) {
    const boot = bootId();
    const recordedBoot = holder.identity.slice(0, holder.identity.lastIndexOf(':'));
    if (boot !== undefined && recordedBoot !== boot) return 'dead';
  }
  if (holder.pid === process.pid) return holder.identity === undefined || holder.identity === processIdentity(process.pid) ? 'alive' : 'dead';
  if (!isProcessAlive(holder.pid)) return 'dead';
  if (holder.identity === undefined) return 'unverified';
  const now = processIdentity(holder.pid);
  if (now === undefined) return 'unverified';
  return now === holder.identity ? 'alive' : 'dead';
}
