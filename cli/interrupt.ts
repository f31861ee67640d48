/**
 * SIGINT and SIGTERM for every long command: one AbortSignal per process, which the engine checks inside
 * its loops (engine/host/interrupt.ts) and answers by cleaning up (lock, registrations, temporary files, a new
 * restore target) and failing with ENGINE_INTERRUPTED: one line, exit code 130.
 *
 * A second signal does not skip that clean-up: it says that clean-up is under way and what a third signal
 * would leave behind. Only a third exits at once, saying so (the lock of a dead process is stale, and the
 * next command that needs it removes it; a version-3 lease of a dead process likewise).
 *
 * Every notice names what this process really holds at that moment (repo-format/held.ts): the lock of
 * versions 1 and 2, the lease of version 3. None is written after the command's last line (settleInterrupt).
 */
import { EXIT } from './exit-codes.js';
import { heldGuards } from '../repo-format/held.js';

/**
 * After the first signal, say so if the operation has not stopped within this time. For the tests only, like
 * ENGINE_CRASH_AT: ENGINE_TEST_SLOW_STOP_MS sets another (the notice's own tests wait for it to be due).
 */
const SLOW_STOP_MS = ((): number => {
  const ms = Number(process.env.ENGINE_TEST_SLOW_STOP_MS);
  return Number.isSafeInteger(ms) && ms > 0 ? ms : 2000;
})();

let controller: AbortController | undefined;
let slowStopNotice: NodeJS.Timeout | undefined;
/** The command's outcome (its result, or its error line) is written: nothing may follow it on stderr. */
let settled = false;

/** "the lock", "the lease", "the lock and the lease": what this process holds now, for a notice. */
function heldNow(): string[] {
  return heldGuards().map((guard) => `the ${guard}`);
}

/**
 * Called before the command's last line is written (main.ts): the slow-stop notice is cancelled and later
 * signals say nothing, so that the final line ("… was interrupted (SIGINT); …") is always the last one, also
 * on a machine so loaded that the clean-up outlasts the notice's delay.
 */
export function settleInterrupt(): void {
  settled = true;
  clearTimeout(slowStopNotice);
  slowStopNotice = undefined;
}

export function interruptSignal(options: { json: () => boolean }): AbortSignal {
  if (controller) return controller.signal;
  const aborting = new AbortController();
  controller = aborting;
  let received = 0;
  const say = (message: string): void => {
    if (!options.json() && !settled) process.stderr.write(`engine: ${message}\n`);
  };
  const onSignal = (signal: NodeJS.Signals): void => {
    received += 1;
    // The outcome is written and all that is left is the process's exit: nothing to clean up, nothing to say.
    if (settled) {
      if (received >= 3) process.exit(typeof process.exitCode === 'number' ? process.exitCode : EXIT.interrupted);
      return;
    }
    if (received === 1) {
      aborting.abort(signal);
      slowStopNotice = setTimeout(() => {
        slowStopNotice = undefined;
        const held = heldNow();
        say(`${signal}: stopping; ${held.length > 0 ? `releasing ${held.join(' and ')} and ` : ''}removing what this run created`);
      }, SLOW_STOP_MS).unref();
    } else if (received === 2) {
      say(`second signal (${signal}): still cleaning up (${[...heldNow(), 'temporary files', 'a partly written target'].join(', ')}); a third signal exits at once and leaves them`);
    } else {
      const held = heldNow();
      if (options.json()) {
        process.stdout.write(`${JSON.stringify({ error: { code: 'ENGINE_INTERRUPTED', message: `interrupted (${signal}) without clean-up`, details: { signal, cleanedUp: false } } }, null, 2)}\n`);
      }
      const guards = heldGuards();
      const remains = guards.includes('lease')
        ? `${held.join(' and ')} and temporary files may remain (a lease of a dead process is removed by the next command on this host, and expires for the others)`
        : guards.includes('lock')
          ? 'the repository lock and temporary files may remain (the next command removes a stale lock)'
          : 'temporary files may remain';
      say(`${signal}: exiting without clean-up: ${remains}`);
      process.exit(EXIT.interrupted);
    }
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  return aborting.signal;
}
