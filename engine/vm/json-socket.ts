/**
 * One JSON document per line over a Unix socket: what QMP and the QEMU guest agent both speak. Lines are
 * handed to `take` in order; a caller waits for the next line that `accept` takes, with a timeout, and
 * lines nobody waits for are kept (up to a bound) until someone does.
 */
import { createConnection, type Socket } from 'node:net';
import { TimeoutError } from '../errors.js';

/** Lines kept for a reader that has not asked yet: a guest that floods its channel costs at most this. */
const MAX_BUFFERED_LINES = 1000;
/** The longest line read: a fsinfo answer of a guest with many disks is a few KiB. */
const MAX_LINE_CHARS = 4 * 1024 * 1024;

export class JsonLineSocket {
  private partial = '';
  private readonly lines: string[] = [];
  private waiter: (() => void) | undefined;
  private ended: Error | undefined;

  private constructor(
    private readonly socket: Socket,
    readonly what: string,
  ) {
    // latin1: the agent's 0xFF delimiter stays one character; both protocols' JSON is ASCII-escaped.
    socket.setEncoding('latin1');
    socket.on('data', (text: string) => {
      this.partial += text;
      let end: number;
      while ((end = this.partial.indexOf('\n')) >= 0) {
        const line = this.partial.slice(0, end).replace(/\xff/g, '').trim();
        this.partial = this.partial.slice(end + 1);
        if (line !== '' && this.lines.length < MAX_BUFFERED_LINES) this.lines.push(line);
      }
      if (this.partial.length > MAX_LINE_CHARS) this.fail(new Error(`${what}: a line longer than ${MAX_LINE_CHARS} characters`));
      this.wake();
    });
    socket.on('error', (error) => this.fail(error));
    socket.on('close', () => this.fail(new Error(`${what}: the connection closed`)));
  }

  static connect(path: string, what: string, timeoutMs: number): Promise<JsonLineSocket> {
    return new Promise((resolve, reject) => {
      const socket = createConnection(path);
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new TimeoutError(`${what} (connecting to ${path})`, timeoutMs));
      }, timeoutMs);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        resolve(new JsonLineSocket(socket, what));
      });
      socket.once('error', (error) => {
        clearTimeout(timer);
        reject(error);
      });
    });
  }

  get closed(): boolean {
    return this.ended !== undefined;
  }

  write(text: string | Buffer): void {
    this.socket.write(text);
  }

  /** Drops the lines received so far (stale answers). */
  discard(): void {
    this.lines.length = 0;
  }

  /** The next line `accept` takes (lines it refuses are dropped), or a TimeoutError after `timeoutMs`. */
  async next(accept: (value: Record<string, unknown>) => boolean, timeoutMs: number): Promise<Record<string, unknown>> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      while (this.lines.length > 0) {
        const line = this.lines.shift()!;
        let value: unknown;
        try {
          value = JSON.parse(line);
        } catch {
          continue; // a guest's noise on its channel is not an answer
        }
        if (value !== null && typeof value === 'object' && !Array.isArray(value) && accept(value as Record<string, unknown>)) return value as Record<string, unknown>;
      }
      if (this.ended) throw this.ended;
      const left = deadline - Date.now();
      if (left <= 0) throw new TimeoutError(this.what, timeoutMs);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.waiter = undefined;
    }
  }

  close(): void {
    this.socket.destroy();
  }

  private fail(error: Error): void {
    this.ended ??= error;
    this.wake();
  }

  private wake(): void {
    const waiter = this.waiter;
    this.waiter = undefined;
    waiter?.();
  }
}
