/**
 * SIGINT and SIGTERM for every long command: one AbortSignal per process, which the engine checks inside
 * its loops (engine/host/interrupt.ts) and answers by cleaning up (lock, registrations, temporary files, a new
 * restore target) and failing with ENGINE_INTERRUPTED: one line, exit code 130.
 *
 * A second signal does not skip that clean-up: it says that clean-up is under way and what a third signal
 * would leave behind. Only a third exits at once, saying so (the lock of a dead process is stale, and the
 * next command that needs it removes it).
 */
import { EXIT } from './exit-codes.js';

/** After the first signal, say so if the operation has not stopped within this time. */
const SLOW_STOP_MS = 2000;

let controller: AbortController | undefined;

export function interruptSignal(options: { json: () => boolean }): AbortSignal {
  if (controller) return controller.signal;
  const aborting = new AbortController();
  controller = aborting;
  let received = 0;
  const say = (message: string): void => {
    if (!options.json()) process.stderr.write(`engine: ${message}\n`);
  };
  const onSignal = (signal: NodeJS.Signals): void => {
    received += 1;
    if (received === 1) {
      aborting.abort(signal);
      setTimeout(() => say(`${signal}: stopping; releasing the lock and removing what this run created`), SLOW_STOP_MS).unref();
    } else if (received === 2) {
      say(`second signal (${signal}): still cleaning up (the lock, temporary files, a partly written target); a third signal exits at once and leaves them`);
    } else {
      if (options.json()) {
        process.stdout.write(`${JSON.stringify({ error: { code: 'ENGINE_INTERRUPTED', message: `interrupted (${signal}) without clean-up`, details: { signal, cleanedUp: false } } }, null, 2)}\n`);
      }
      say(`${signal}: exiting without clean-up: the repository lock and temporary files may remain (the next command removes a stale lock)`);
      process.exit(EXIT.interrupted);
    }
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  return aborting.signal;
}
