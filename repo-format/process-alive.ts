/**
 * Whether a process still runs. `kill(pid, 0)` alone says yes for a zombie: a daemon that exited (qemu-nbd
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
