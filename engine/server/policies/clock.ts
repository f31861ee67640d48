/**
 * The scheduler's clock: what time it is, and a sleep until a given instant that a signal ends early. The
 * real one sleeps in steps of at most a minute and looks at the wall clock again after each, so that a clock
 * set forward or a machine waking from suspend finds its due slots within a minute (timers count monotonic
 * time, slots are wall-clock times).
 *
 * Tests drive time without waiting: `FileClock`, for a server run as its own process (as the tests run it,
 * so that it can be killed -9): ENGINE_SERVER_TEST_CLOCK names the file (cli/commands/server.ts), which holds
 * an ISO time the test rewrites, looked at every 20 ms. In-process callers pass any Clock to startServer.
 */
import { readFile } from 'node:fs/promises';

export interface Clock {
  now(): number;
  /** Resolves when now() >= `at`, or when `signal` aborts (never rejects). */
  sleepUntil(at: number, signal: AbortSignal): Promise<void>;
}

const REAL_STEP_MS = 60_000;

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const done = (): void => {
      clearTimeout(timer);
      signal.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener('abort', done, { once: true });
  });
}

export const realClock: Clock = {
  now: () => Date.now(),
  async sleepUntil(at, signal) {
    while (!signal.aborted && Date.now() < at) await sleep(Math.min(REAL_STEP_MS, at - Date.now()), signal);
  },
};

/** The time written in a file (ISO 8601), for tests of a server process; a file that does not parse keeps the last time. */
export class FileClock implements Clock {
  private time: number;
  private constructor(
    private readonly file: string,
    time: number,
  ) {
    this.time = time;
  }

  static async open(file: string): Promise<FileClock> {
    const clock = new FileClock(file, Date.now());
    await clock.refresh();
    return clock;
  }

  private async refresh(): Promise<void> {
    const text = await readFile(this.file, 'utf8').catch(() => '');
    const time = Date.parse(text.trim());
    if (Number.isFinite(time)) this.time = time;
  }

  now(): number {
    return this.time;
  }

  async sleepUntil(at: number, signal: AbortSignal): Promise<void> {
    while (!signal.aborted) {
      await this.refresh();
      if (this.time >= at) return;
      await sleep(20, signal);
    }
  }
}
