/**
 * Time, as the lease protocol needs it, behind one interface so that tests can drive it (a fake clock is
 * only ever injected; production code takes systemClock):
 *
 * - `wall()`: milliseconds since the epoch, the clock written into leases and compared across hosts
 *   (checked against the store's clock, SPEC.md 19.6);
 * - `monotonic()`: milliseconds that never go back nor jump with the wall clock: how long this process has
 *   held a lease without refreshing it (a wall clock stepped by NTP or an operator cannot extend that);
 * - `sleep()`: waits, ending early (ENGINE_INTERRUPTED) when the signal fires.
 */
import { EngineError } from '../errors.js';

export interface Clock {
  wall(): number;
  monotonic(): number;
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

function interrupted(): EngineError {
  return new EngineError('ENGINE_INTERRUPTED', 'interrupted while waiting for a lease', {});
}

export const systemClock: Clock = {
  wall: () => Date.now(),
  monotonic: () => performance.now(),
  sleep: (ms, signal) =>
    new Promise<void>((resolve, reject) => {
      if (signal?.aborted) return reject(interrupted());
      const onAbort = (): void => {
        clearTimeout(timer);
        reject(interrupted());
      };
      const timer = setTimeout(() => {
        signal?.removeEventListener('abort', onAbort);
        resolve();
      }, ms);
      signal?.addEventListener('abort', onAbort, { once: true });
    }),
};
