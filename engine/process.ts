/** Stopping a helper process the engine started (qemu-nbd, nbdfuse, a mount's server). */
import { isProcessAlive } from '../repo-format/process-alive.js';

async function waitGone(pid: number, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (isProcessAlive(pid)) {
    if (Date.now() > deadline) return false;
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  return true;
}

/**
 * SIGTERM, then wait until the process no longer runs; after `timeoutMs` SIGKILL and wait again. Throws
 * when even SIGKILL did not end it (a process stuck in the kernel), rather than pretend it is gone.
 */
export async function stopProcess(pid: number, timeoutMs = 5000): Promise<void> {
  if (!isProcessAlive(pid)) return;
  try {
    process.kill(pid, 'SIGTERM');
  } catch {
    return;
  }
  if (await waitGone(pid, timeoutMs)) return;
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    return;
  }
  if (!(await waitGone(pid, 5000))) throw new Error(`process ${pid} did not exit after SIGTERM and SIGKILL`);
}
