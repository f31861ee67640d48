/**
 * Starting and stopping the thaw watchdog (thaw-watchdog.ts), for libvirt's and oVirt's quiesce alike.
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import type { ThawOrders } from './thaw-watchdog.js';

export interface ThawWatchdog {
  /** performance.now() when it was started: its deadline counts from here, before the freeze. */
  startedAt: number;
  /**
   * The engine's own thaw succeeded: ends the watchdog (SIGUSR2), if the pid is still that watchdog's, and waits
   * (up to 5 s) until it has ended, so that the engine's command ends with nothing of its quiesce still running.
   */
  stop: () => Promise<void>;
}

/** How long stop() waits for the watchdog to end, and how often it looks. */
const STOP_WAIT_MS = 5000;
const STOP_POLL_MS = 10;

/**
 * The start time of process `pid` (/proc/PID/stat field 22, clock ticks since boot); undefined when it is gone or
 * has ended (a zombie, state Z, until its parent, this process, reaps it).
 */
function startTime(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // After the command's "(…)", which may hold spaces: field 3 (the state) onwards.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return fields[0] === 'Z' ? undefined : fields[19];
  } catch {
    return undefined;
  }
}

/**
 * Starts the watchdog before the freeze: `node thaw-watchdog.js engine-thaw-watchdog LABEL`, detached, in its own
 * session, its orders on stdin. LABEL (the domain, the VM's id) names it in `ps`; nothing secret is on its argv.
 */
export async function startThawWatchdog(orders: ThawOrders): Promise<ThawWatchdog> {
  const startedAt = performance.now();
  const script = fileURLToPath(new URL('./thaw-watchdog.js', import.meta.url));
  const label = 'libvirt' in orders ? orders.libvirt : orders.vm;
  const child = spawn(process.execPath, [script, 'engine-thaw-watchdog', label], { detached: true, stdio: ['pipe', 'ignore', 'ignore'] });
  await new Promise<void>((resolve, reject) => {
    child.once('spawn', resolve);
    child.once('error', reject);
  });
  const pid = child.pid!;
  // Read now, while it cannot have exited (its orders are not written yet): a later stop signals this process
  // only, never another that was given its pid after it ended.
  const started = startTime(pid);
  child.stdin!.end(JSON.stringify(orders));
  child.unref();
  return {
    startedAt,
    stop: async () => {
      if (started === undefined || startTime(pid) !== started) return;
      try {
        process.kill(pid, 'SIGUSR2');
      } catch {
        // Gone in between: it thawed (the engine was slower than its timeout).
        return;
      }
      for (let waited = 0; waited < STOP_WAIT_MS && startTime(pid) === started; waited += STOP_POLL_MS) {
        await new Promise((resolve) => setTimeout(resolve, STOP_POLL_MS));
      }
    },
  };
}
