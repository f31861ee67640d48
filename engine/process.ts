/** Stopping a helper process the engine started (qemu-nbd, nbdfuse): SIGTERM, then wait until it is gone. */
import { isProcessAlive } from '../repo-format/process-alive.js';

/** Sends SIGTERM and waits (up to `timeoutMs`, then SIGKILL) until the process no longer runs. */
export async function stopProcess(pid: number, timeoutMs = 5000): Promise<void> {
  try {
    process.kill(pid, 'SIGTERM');
  } catch {
    return;
  }
  const deadline = Date.now() + timeoutMs;
  while (isProcessAlive(pid)) {
    if (Date.now() > deadline) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        return;
      }
    }
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}
