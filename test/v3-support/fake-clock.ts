/**
 * A clock the test moves (injected into the lease protocol as its Clock; production code takes systemClock).
 * `wall` and `monotonic` move together unless `stepWall` steps the wall clock alone, as NTP or an operator
 * would. Sleepers wake when `advance` passes their deadline; in `auto` mode a sleep moves time itself (for
 * runs where a scheduler, not the test, decides what happens next).
 */
import type { Clock } from '../../dist/repo-format/v3/clock.js';

export class FakeClock implements Clock {
  private mono = 1_000_000;
  private wallOffset = Date.UTC(2026, 11, 6, 12, 0, 0) - 1_000_000;
  private sleepers: { until: number; resolve: () => void; reject: (error: unknown) => void }[] = [];

  constructor(private readonly auto: ((ms: number) => Promise<void>) | undefined = undefined) {}

  wall(): number {
    return this.mono + this.wallOffset;
  }

  monotonic(): number {
    return this.mono;
  }

  stepWall(ms: number): void {
    this.wallOffset += ms;
  }

  async sleep(ms: number, signal?: AbortSignal): Promise<void> {
    if (signal?.aborted) throw new Error('aborted');
    if (this.auto) {
      this.mono += ms;
      await this.auto(ms);
      return;
    }
    await new Promise<void>((resolve, reject) => {
      const sleeper = { until: this.mono + ms, resolve, reject };
      this.sleepers.push(sleeper);
      signal?.addEventListener('abort', () => {
        this.sleepers = this.sleepers.filter((s) => s !== sleeper);
        reject(new Error('aborted'));
      }, { once: true });
    });
  }

  /** Moves time on by `ms`, waking each sleeper whose deadline passes, in order, letting each run to its next wait. */
  async advance(ms: number): Promise<void> {
    const target = this.mono + ms;
    await settle();
    for (;;) {
      this.sleepers.sort((a, b) => a.until - b.until);
      const next = this.sleepers[0];
      if (!next || next.until > target) break;
      this.sleepers.shift();
      this.mono = Math.max(this.mono, next.until);
      next.resolve();
      await settle();
    }
    this.mono = target;
    await settle();
  }
}

/** Lets every task that is not waiting for the clock run until it is (nothing here waits for real I/O). */
async function settle(): Promise<void> {
  for (let i = 0; i < 30; i++) await new Promise((resolve) => setImmediate(resolve));
}
