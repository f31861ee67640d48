/**
 * Whether a process still runs. `kill(pid, 0)` alone says yes for a zombie: a daemon that exited (qemu-nbd
 * after `--fork`) stays a zombie until its new parent reaps it, which in a container can take seconds. A
 * zombie holds no locks and no files, so for every purpose here it is gone.
 */
import { readFileSync } from 'node:fs';
import { isErrnoException } from './errors.js';

export function isProcessAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (error) {
    // EPERM: it exists, owned by someone else.
    return !(isErrnoException(error) && error.code === 'ESRCH');
  }
  try {
    // /proc/<pid>/stat: "pid (comm) state ..."; comm may contain spaces and parentheses, so split at the last ")".
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return true; // no /proc: trust kill()
  }
}
