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
import type { OnReadOpts, Socket } from 'node:net';

/**
 * A socket opened with `onread` (net.connect): Node reads into one buffer of the caller's, reused for every read,
 * instead of a new 64 KiB Buffer per read. A backup from NBD reads GBs through its sockets: those Buffers were
 * garbage by the GB on the main thread, external memory that V8 collects only after tens of MiB have piled up
 * (issue 15: the main thread's arrayBuffers swung by ~40 MiB; peak RSS crossed 300 MiB on the 3 GiB real image).
 * The reader copies a reply's payload from that buffer straight into its target; only what no read waits for
 * (headers, the start of the next reply) is copied into a Buffer of its own. Not for TLS (tls.connect reads
 * the socket itself).
 */
interface Lender {
  take: ((data: Buffer) => void) | undefined;
  early: Buffer[];
}
const lenders = new WeakMap<Socket, Lender>();
/** The buffer Node reads a connection's bytes into: as large as a read request, so one read can fill it. */
const LENT_BUFFER_BYTES = 256 * 1024;

/** `onread` options for net.connect, and `lend(socket)` to call on the socket they made, before its reader is. */
export function lentReads(): { onread: OnReadOpts; lend: (socket: Socket) => void } {
  const lender: Lender = { take: undefined, early: [] };
  const onread: OnReadOpts = {
    buffer: Buffer.allocUnsafe(LENT_BUFFER_BYTES),
    callback: (bytes: number, buffer: Uint8Array) => {
      const data = Buffer.from(buffer.buffer, buffer.byteOffset, bytes);
      if (lender.take) lender.take(data);
      // Arrived before the reader was made: kept as a copy (the buffer is read into again).
      else lender.early.push(Buffer.from(data));
      // true: keep reading (false would pause the socket; SocketReader pauses it itself when it must).
      return true;
    },
  };
  return { onread, lend: (socket) => lenders.set(socket, lender) };
}

export class SocketReader {
  private readonly chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: { bytes: number; resolve: () => void; reject: (error: Error) => void } | undefined;
  /** A readInto of a lent socket waiting for the rest of its bytes, which are copied in as they arrive. */
  private into: { target: Buffer; at: number; left: number; resolve: () => void; reject: (error: Error) => void } | undefined;
  private readonly lender: Lender | undefined;
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
    this.lender = lenders.get(socket);
    if (this.lender) {
      this.lender.take = (data) => this.takeLent(data);
      for (const chunk of this.lender.early.splice(0)) this.take(chunk);
    } else socket.on('data', this.onData);
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
    if (this.lender) this.lender.take = undefined;
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

  /** Bytes of a lent socket, valid only during this call: into the waiting target, the rest copied. */
  private takeLent(data: Buffer): void {
    if (this.discarding) return;
    const into = this.into;
    let used = 0;
    if (into) {
      used = Math.min(into.left, data.length);
      data.copy(into.target, into.at, 0, used);
      into.at += used;
      into.left -= used;
      if (into.left === 0) {
        this.into = undefined;
        into.resolve();
      }
    }
    if (used < data.length) this.take(Buffer.from(data.subarray(used)));
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
    if (!this.lender || this.buffered >= bytes) {
      await this.await(bytes);
      this.copyOut(target, at, bytes);
      return;
    }
    // A lent socket: what is buffered now, then the rest straight from the socket's buffer as it arrives.
    const first = this.buffered;
    this.copyOut(target, at, first);
    if (this.ended) throw this.ended;
    if (this.waiter || this.into) throw new Error('SocketReader allows one read at a time');
    await new Promise<void>((resolve, reject) => {
      this.into = { target, at: at + first, left: bytes - first, resolve, reject };
      this.resumeIf(bytes - first);
    });
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
    const into = this.into;
    if (into && this.ended) {
      this.into = undefined;
      into.reject(this.ended);
    }
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
