/**
 * Interruption of long operations. The CLI turns SIGINT/SIGTERM into an AbortSignal (cli/interrupt.ts);
 * every long loop of the engine holds an Interruption and calls `tick()` once per item it works on (a
 * block, a pack, an index entry). A tick is two comparisons in the common case; it throws
 * InterruptedError once the signal has fired, and every TURN_MS it lets the event loop run.
 *
 * Why the second part: a loop whose awaits all resolve at once (a walk over the holes of a sparse NBD
 * export, zero runs of a map, pages already cached) runs on microtasks only, and Node delivers signals,
 * timers and I/O only between macrotasks. Such a loop would otherwise hold off SIGINT until it ends (a
 * 64 TiB thin disk: minutes). Throwing unwinds through the operation's `finally` blocks, which release the
 * lock and registrations and remove temporary files: interruption is one more failure, cleaned up like any.
 */
import { InterruptedError } from '../errors.js';

/** The longest stretch a loop may run without letting the event loop turn (signals, I/O, timers). */
const TURN_MS = 50;

/** What tick() returns when there is nothing to wait for: no promise is made per call in hot loops. */
const NOTHING_TO_WAIT_FOR: Promise<void> = Promise.resolve();

/** The signal's name when the CLI aborted on one ('SIGINT', 'SIGTERM'), for messages. */
export function signalName(signal: AbortSignal | undefined): string | undefined {
  const reason: unknown = signal?.reason;
  return typeof reason === 'string' && /^SIG[A-Z]+$/.test(reason) ? reason : undefined;
}

export class Interruption {
  private lastTurn = performance.now();

  /**
   * `what`: the operation, as the message names it ("restore", "verify"). `state`: what the operation has
   * left, said in the message (default: nothing of it was committed); asked only when it is thrown.
   */
  constructor(
    readonly signal: AbortSignal | undefined,
    private readonly what: string,
    private readonly state?: () => string,
  ) {}

  get aborted(): boolean {
    return this.signal?.aborted === true;
  }

  /** Throws InterruptedError if the signal has fired. */
  check(): void {
    if (this.signal?.aborted) throw this.error();
  }

  /** The error this interruption throws, with the operation's state as it is now. */
  error(state?: string): InterruptedError {
    return new InterruptedError(this.what, state ?? this.state?.(), signalName(this.signal));
  }

  /**
   * Waits for `work`, or throws InterruptedError as soon as the signal fires, whichever comes first: for
   * one await that may take long by itself (the extents of a thin disk's holes, merged over thousands of
   * NBD requests before the first one is answered). What `work` does goes on; its outcome is ignored.
   */
  async race<T>(work: Promise<T>): Promise<T> {
    // Before the check: work abandoned by an interruption may still fail (an NBD request failed when its
    // connection is disposed), and must not become an unhandled rejection.
    work.catch(() => undefined);
    this.check();
    const signal = this.signal;
    if (!signal) return work;
    let onAbort: (() => void) | undefined;
    const aborted = new Promise<never>((_, reject) => {
      onAbort = () => reject(this.error());
      signal.addEventListener('abort', onAbort, { once: true });
    });
    try {
      return await Promise.race([work, aborted]);
    } finally {
      signal.removeEventListener('abort', onAbort!);
    }
  }

  /** check(), and lets the event loop turn when the loop has run for TURN_MS without it. */
  tick(): Promise<void> {
    this.check();
    if (performance.now() - this.lastTurn < TURN_MS) return NOTHING_TO_WAIT_FOR;
    return this.turn();
  }

  private async turn(): Promise<void> {
    await new Promise<void>((resolve) => setImmediate(resolve));
    this.lastTurn = performance.now();
    this.check();
  }
}
