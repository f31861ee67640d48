/**
 * Which accelerator a throw-away VM runs under: one rule for every VM the engine starts (`verify --boot`, the
 * file-restore appliance). `auto` (the default): KVM when /dev/kvm opens read-write, and the same VM again
 * under TCG when KVM fails (QEMU exits saying so, or KVM stops the guest with an internal error). Both were
 * seen on the machines this was built on, where /dev/kvm opens but nested KVM cannot run a guest: `-cpu host`
 * aborts at once ("failed to set MSR 0x10a"), the default CPU model either stops with "KVM internal error"
 * (the tests' Debian guest) or runs without ever booting (the appliance's kernel). `kvm` or `tcg` forces one:
 * `$ENGINE_ACCEL`, or a command's own option (`verify --boot --accel`), which wins.
 */
import { open } from 'node:fs/promises';
import { EngineError, InvalidArgumentError } from '../../repo-format/errors.js';

export type AcceleratorChoice = 'auto' | 'kvm' | 'tcg';

/** KVM failed to run the guest: the host's KVM, not what the VM was started for, failed. */
export class KvmFailedError extends EngineError {
  constructor(detail: string) {
    super('ENGINE_TOOL_FAILED', `KVM could not run the VM (${detail}; a nested or limited KVM cannot run this guest)`, { tool: 'qemu' });
  }
}

/** The choice in force: the command's option, else $ENGINE_ACCEL, else `auto`. */
export function acceleratorChoice(option?: AcceleratorChoice | undefined, env: NodeJS.ProcessEnv = process.env): AcceleratorChoice {
  if (option !== undefined) return option;
  const value = env.ENGINE_ACCEL;
  if (value === undefined || value === '') return 'auto';
  if (value === 'auto' || value === 'kvm' || value === 'tcg') return value;
  throw new InvalidArgumentError(`ENGINE_ACCEL=${value}: give auto, kvm or tcg`);
}

/** Whether KVM can be used by this process: /dev/kvm opens read-write (exists is not enough: a container may see it without the right to use it). */
export async function kvmUsable(): Promise<boolean> {
  const handle = await open('/dev/kvm', 'r+').catch(() => undefined);
  await handle?.close();
  return handle !== undefined;
}

/**
 * Runs `attempt` under the first accelerator of the choice, and again under TCG when `auto` tried KVM and
 * KVM failed (`attempt` threw KvmFailedError; it has cleaned up after itself). A forced `kvm` that fails is
 * that error.
 */
export async function withAccelerator<T>(choice: AcceleratorChoice, attempt: (accelerator: 'kvm' | 'tcg') => Promise<T>, onRetry?: (error: KvmFailedError) => void): Promise<T> {
  const order: ('kvm' | 'tcg')[] = choice === 'auto' ? ((await kvmUsable()) ? ['kvm', 'tcg'] : ['tcg']) : [choice];
  for (const [i, accelerator] of order.entries()) {
    try {
      return await attempt(accelerator);
    } catch (error) {
      if (!(error instanceof KvmFailedError) || i === order.length - 1) throw error;
      onRetry?.(error);
    }
  }
  throw new Error('withAccelerator: no accelerator to try');
}
