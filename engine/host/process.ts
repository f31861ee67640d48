/** Stopping a helper process the engine started (qemu-nbd, nbdfuse, a mount's server). */
import { EngineError } from '../../repo-format/errors.js';
import { isProcessAlive, processIdentity } from '../../repo-format/process-alive.js';

export { processIdentity };

/** Whether `pid` still runs and, when `identity` is given, is still that process. */
function stillThere(pid: number, identity: string | undefined): boolean {
  if (!isProcessAlive(pid)) return false;
  return identity === undefined || processIdentity(pid) === identity;
}

async function waitGone(pid: number, identity: string | undefined, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (stillThere(pid, identity)) {
    if (Date.now() > deadline) return false;
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  return true;
}

/**
 * SIGTERM, then wait until the process no longer runs; after `timeoutMs` SIGKILL and wait again. Throws
 * when even SIGKILL did not end it (a process stuck in the kernel), rather than pretend it is gone. With
 * `identity` (from processIdentity when the process was started), a pid now held by another process counts
 * as gone and is left alone. Resolves true when it stopped a running process, false when there was none
 * (already gone, or a zombie waiting for its parent): callers report which.
 */
export async function stopProcess(pid: number, timeoutMs = 5000, identity?: string): Promise<boolean> {
  if (!stillThere(pid, identity)) return false;
  try {
    process.kill(pid, 'SIGTERM');
  } catch {
    return false;
  }
  if (await waitGone(pid, identity, timeoutMs)) return true;
  if (!stillThere(pid, identity)) return true;
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    return true;
  }
  if (!(await waitGone(pid, identity, 5000))) throw new EngineError('ENGINE_TIMEOUT', `process ${pid} did not exit after SIGTERM and SIGKILL (stuck in the kernel?)`, { pid });
  return true;
}
