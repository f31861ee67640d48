/**
 * A local target's writes, gathered into runs: while one run is being written, the writes that arrive wait;
 * the next call takes the waiting write of lowest offset and every waiting write that continues it without a
 * gap (at most RUN_BYTES, IOV_MAX buffers) and writes them with one pwritev. Restored blocks come back from
 * the workers a few at a time and nearly in order, so the disk gets a few large sequential writes instead of
 * one per block, and the workers keep opening the next chunks into free slots meanwhile (the slots bound
 * what waits here). One run at a time: writes to one file serialise on its inode lock anyway (buffered, and
 * O_DIRECT writes that allocate), and contending threads only cost system time. Two O_DIRECT runs at once
 * (so that the next waits in the kernel while one is written) were measured and not kept: 3 interleaved
 * pairs of a cold restore of the 3 GiB /usr image (load 25-34), one at a time 32.5/19.0/24.9 s wall and
 * 1.51/1.08/0.97 system CPU-s, two at once 27.7/32.4/30.7 s and 1.46/1.55/1.51.
 */

/** At most this many bytes in one write call: a quarter of the pool's 32 MiB of slots, so the workers keep the rest. */
export const RUN_BYTES = 8 * 1024 * 1024;
/** Linux's IOV_MAX: the most buffers one pwritev takes. */
const MAX_BUFFERS = 1024;

interface Waiting {
  data: Buffer;
  offset: number;
  resolve: () => void;
  reject: (error: unknown) => void;
}

export class RunWriter {
  private waiting: Waiting[] = [];
  private active: Promise<void> | undefined;

  /** `writeRun` writes the buffers one after another from `offset`, all of them, or throws. */
  constructor(private readonly writeRun: (buffers: Buffer[], offset: number) => Promise<void>) {}

  /** Resolves once `data` is written (with the run it joined); a failed run fails every write in it. */
  write(data: Buffer, offset: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.waiting.push({ data, offset, resolve, reject });
      this.next();
    });
  }

  /** Resolves once nothing is waiting or being written. */
  async idle(): Promise<void> {
    while (this.active) await this.active;
  }

  private next(): void {
    if (this.active || this.waiting.length === 0) return;
    const run = this.takeRun();
    this.active = this.writeRun(
      run.map((w) => w.data),
      run[0]!.offset,
    )
      .then(
        () => run.forEach((w) => w.resolve()),
        (error: unknown) => run.forEach((w) => w.reject(error)),
      )
      .finally(() => {
        this.active = undefined;
        this.next();
      });
  }

  /** The waiting write of lowest offset and those that continue it, removed from the waiting list. */
  private takeRun(): Waiting[] {
    this.waiting.sort((a, b) => a.offset - b.offset);
    const first = this.waiting[0]!;
    let end = first.offset + first.data.length;
    let bytes = first.data.length;
    let count = 1;
    for (; count < this.waiting.length && count < MAX_BUFFERS; count += 1) {
      const next = this.waiting[count]!;
      if (next.offset !== end || bytes + next.data.length > RUN_BYTES) break;
      end += next.data.length;
      bytes += next.data.length;
    }
    return this.waiting.splice(0, count);
  }
}
