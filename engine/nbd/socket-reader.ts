/**
 * Exact-length reads from a socket, for a parser that knows how many bytes it needs next. Chunks are
 * queued as they arrive; `read(n)` resolves with exactly n bytes (a zero-copy view when one chunk holds
 * them), `readInto` copies straight into the caller's buffer. A close before the bytes arrive rejects.
 *
 * With `highWaterMark`, the socket is paused while that many bytes wait unread (a server must not buffer
 * whatever a client pipelines), and resumed when they are consumed or a read needs more.
 *
 * `closedError` makes the error a read fails with when the peer goes (`cause` is the socket's error, e.g.
 * ECONNRESET): the owner's error, naming what the connection was to, never a bare errno.
 */
import type { Socket } from 'node:net';

export class SocketReader {
  private readonly chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: { bytes: number; resolve: () => void; reject: (error: Error) => void } | undefined;
  private ended: Error | undefined;

  private paused = false;
  private discarding = false;
  private readonly onData = (chunk: Buffer): void => this.take(chunk);
  private readonly onEnd: () => void;
  private readonly onError: (error: Error) => void;

  constructor(
    private readonly socket: Socket,
    private readonly closedError: (cause?: Error) => Error,
    private readonly highWaterMark = Infinity,
  ) {
    const end = (error?: Error): void => {
      this.ended ??= this.closedError(error);
      this.wake();
    };
    this.onEnd = () => end();
    this.onError = (error) => end(error);
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', this.onEnd);
    socket.on('error', this.onError);
  }

  /** Bytes received and not read yet. */
  get bufferedBytes(): number {
    return this.buffered;
  }

  /**
   * Stops listening to the socket (it is about to be handed to TLS, which reads it from now on). Refused
   * while bytes wait unread: they would belong to neither side.
   */
  detach(): void {
    if (this.buffered > 0) throw new Error(`${this.buffered} bytes arrived before the TLS handshake`);
    // Nothing buffered means not paused either (consume resumes below the high-water mark).
    this.socket.removeListener('data', this.onData);
    this.socket.removeListener('end', this.onEnd);
    this.socket.removeListener('close', this.onEnd);
    this.socket.removeListener('error', this.onError);
  }

  /**
   * From now on drops what arrives, unread (and what waits): a server that hangs up keeps reading until the
   * client closes, since closing a socket with unread bytes sends a reset, which can destroy replies the
   * client has not read yet.
   */
  discard(): void {
    this.discarding = true;
    this.chunks.length = 0;
    this.buffered = 0;
    this.fail(new Error('the reader was discarded'));
    if (this.paused) {
      this.paused = false;
      this.socket.resume();
    }
  }

  private take(chunk: Buffer): void {
    if (this.discarding) return;
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    this.wake();
    if (this.buffered >= this.highWaterMark && !this.paused && !(this.waiter && this.waiter.bytes > this.buffered)) {
      this.paused = true;
      this.socket.pause();
    }
  }

  /** Fails the reader (and the read waiting on it) with `error`. */
  fail(error: Error): void {
    this.ended ??= error;
    this.wake();
  }

  async read(bytes: number): Promise<Buffer> {
    if (bytes === 0) return Buffer.alloc(0);
    await this.await(bytes);
    const first = this.chunks[0]!;
    if (first.length >= bytes) {
      const out = first.subarray(0, bytes);
      this.consume(bytes);
      return out;
    }
    const out = Buffer.allocUnsafe(bytes);
    this.copyOut(out, 0, bytes);
    return out;
  }

  /** The next `bytes` bytes, left unread: the next read returns them too. */
  async peek(bytes: number): Promise<Buffer> {
    if (bytes === 0) return Buffer.alloc(0);
    await this.await(bytes);
    const first = this.chunks[0]!;
    if (first.length >= bytes) return first.subarray(0, bytes);
    const out = Buffer.allocUnsafe(bytes);
    let done = 0;
    for (const chunk of this.chunks) {
      if (done === bytes) break;
      const n = Math.min(chunk.length, bytes - done);
      chunk.copy(out, done, 0, n);
      done += n;
    }
    return out;
  }

  async readInto(target: Buffer, at: number, bytes: number): Promise<void> {
    await this.await(bytes);
    this.copyOut(target, at, bytes);
  }

  async skip(bytes: number): Promise<void> {
    await this.await(bytes);
    this.consume(bytes);
  }

  private copyOut(target: Buffer, at: number, bytes: number): void {
    let done = 0;
    while (done < bytes) {
      const first = this.chunks[0]!;
      const n = Math.min(first.length, bytes - done);
      first.copy(target, at + done, 0, n);
      done += n;
      this.consume(n);
    }
  }

  private consume(bytes: number): void {
    let left = bytes;
    while (left > 0) {
      const first = this.chunks[0]!;
      if (first.length <= left) {
        this.chunks.shift();
        left -= first.length;
      } else {
        this.chunks[0] = first.subarray(left);
        left = 0;
      }
    }
    this.buffered -= bytes;
    this.resumeIf(0);
  }

  private resumeIf(needed: number): void {
    if (this.paused && (this.buffered < this.highWaterMark || needed > this.buffered)) {
      this.paused = false;
      this.socket.resume();
    }
  }

  private await(bytes: number): Promise<void> {
    if (this.buffered >= bytes) return Promise.resolve();
    if (this.ended) return Promise.reject(this.ended);
    if (this.waiter) return Promise.reject(new Error('SocketReader allows one read at a time'));
    return new Promise((resolve, reject) => {
      this.waiter = { bytes, resolve, reject };
      this.resumeIf(bytes);
    });
  }

  private wake(): void {
    const waiter = this.waiter;
    if (!waiter) return;
    if (this.buffered >= waiter.bytes) {
      this.waiter = undefined;
      waiter.resolve();
    } else if (this.ended) {
      this.waiter = undefined;
      waiter.reject(this.ended);
    }
  }
}
