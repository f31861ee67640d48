/**
 * One NBD connection: the handshake (client-handshake.ts), then the transmission phase with many requests
 * in flight, matched to replies by cookie. Every reply is read through the wire.ts / wire-chunks.ts
 * decoders, and no length the server sends is trusted before it is checked against the request.
 *
 * Anything the server sends that the protocol does not allow (bad magic, unknown cookie, a chunk outside
 * the request, a read reply that does not cover the request, a close mid-reply) fails the connection and
 * every request on it with NbdProtocolError: never a hang, never a silently wrong read. Each request also
 * has a timeout. Every error names the URI (a connection reset included), never a bare errno.
 *
 * A reply of NBD_ESHUTDOWN
 * (the server is stopping) makes the connection disconnect softly once its other requests are answered.
 */
import { connect as netConnect, type Socket } from 'node:net';
import { displayText } from '../../repo-format/display-text.js';
import { EngineError, InvalidArgumentError } from '../../repo-format/errors.js';
import { NbdCommandError, NbdConnectError, NbdProtocolError, TimeoutError } from '../errors.js';
import { handshake, MESSAGE_CHARACTERS, readerFor, type ExportInfo, type Link } from './client-handshake.js';
import * as P from './protocol.js';
import { lentReads, type SocketReader } from './socket-reader.js';
import type { NbdClientTls } from './tls.js';
import type { NbdUri } from './uri.js';
import { CHUNK_HEADER_SIZE, decodeChunkHeader, decodeSimpleReply, encodeRequest, SIMPLE_REPLY_SIZE, type ChunkHeader } from './wire.js';
import {
  blockStatusSize,
  decodeBlockStatus,
  decodeErrorChunk,
  decodeOffsetDataHead,
  decodeOffsetHole,
  ERROR_HEAD_SIZE,
  isBlockStatusSize,
  OFFSET_DATA_HEAD_SIZE,
  OFFSET_HOLE_SIZE,
} from './wire-chunks.js';

export type { ExportInfo } from './client-handshake.js';

export interface BlockStatusExtent {
  offset: number;
  length: number;
  flags: number;
}

export interface ConnectOptions {
  metaContexts?: string[];
  timeoutMs?: number | undefined;
  /** TLS credentials: required for an nbds:// URI (NbdClient loads them once for all its connections). */
  tls?: NbdClientTls | undefined;
}

interface Pending {
  command: string;
  offset: number;
  length: number;
  target?: Buffer;
  covered: number;
  extents?: BlockStatusExtent[];
  contextId?: number;
  error?: { errno: string; message: string };
  resolve: (extents?: BlockStatusExtent[]) => void;
  reject: (error: Error) => void;
  timer: NodeJS.Timeout;
}

const DEFAULT_TIMEOUT_MS = 60_000;
/** The most descriptors one BLOCK_STATUS chunk may carry (8 MiB of them): more is a protocol error, unread. */
const MAX_DESCRIPTORS = 1024 * 1024;
/** An error chunk: its head, a message of at most MAX_STRING bytes, and room for ERROR_OFFSET's offset. */
const MAX_ERROR_CHUNK = ERROR_HEAD_SIZE + P.MAX_STRING + 8;
/** The magic that tells a simple reply from a structured reply chunk. */
const MAGIC_SIZE = 4;

export class NbdConnection {
  private readonly pending = new Map<bigint, Pending>();
  private readonly drainWaiters: (() => void)[] = [];
  private nextCookie = 1n;
  private failure: Error | undefined;
  private closing = false;

  private constructor(
    private readonly uri: NbdUri,
    private readonly socket: Socket,
    private readonly reader: SocketReader,
    readonly info: ExportInfo,
    private readonly timeoutMs: number,
  ) {
    void this.replyLoop();
  }

  static async connect(uri: NbdUri, options: ConnectOptions = {}): Promise<NbdConnection> {
    const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    if (uri.tls && !options.tls) throw new NbdConnectError(uri.text, 'TLS credentials were not loaded for this nbds:// URI');
    const socket = await openSocket(uri, timeoutMs);
    const link: Link = { socket, reader: readerFor(uri, socket) };
    const timer = setTimeout(() => link.reader.fail(new TimeoutError(`NBD handshake with ${uri.text}`, timeoutMs)), timeoutMs);
    try {
      const info = await handshake(uri, link, options.metaContexts ?? [], options.tls);
      return new NbdConnection(uri, link.socket, link.reader, info, timeoutMs);
    } catch (error) {
      link.socket.destroy();
      throw error;
    } finally {
      clearTimeout(timer);
    }
  }

  get inFlight(): number {
    return this.pending.size;
  }

  /** Reads target.length bytes at `offset` into `target`. Holes in structured replies become zeros. */
  async read(target: Buffer, offset: number): Promise<void> {
    await this.request(P.CMD_READ, 'READ', offset, target.length, { target });
  }

  async write(data: Buffer, offset: number): Promise<void> {
    await this.request(P.CMD_WRITE, 'WRITE', offset, data.length, { payload: data });
  }

  async writeZeroes(offset: number, length: number, options: { noHole?: boolean } = {}): Promise<void> {
    await this.request(P.CMD_WRITE_ZEROES, 'WRITE_ZEROES', offset, length, { flags: options.noHole ? P.CMD_FLAG_NO_HOLE : 0 });
  }

  async trim(offset: number, length: number): Promise<void> {
    await this.request(P.CMD_TRIM, 'TRIM', offset, length, {});
  }

  async flush(): Promise<void> {
    await this.request(P.CMD_FLUSH, 'FLUSH', 0, 0, {});
  }

  /** Block status of one negotiated context over [offset, offset + length): at least one extent. */
  async blockStatus(context: string, offset: number, length: number): Promise<BlockStatusExtent[]> {
    const id = this.info.contexts.get(context);
    if (id === undefined) throw new NbdConnectError(this.uri.text, `metadata context ${context} was not negotiated`);
    const extents = await this.request(P.CMD_BLOCK_STATUS, `BLOCK_STATUS ${context}`, offset, length, { contextId: id });
    return extents ?? [];
  }

  /**
   * Releases the connection without waiting on the server, as after a failure or an interruption: with
   * nothing in flight, the clean disconnect (close()); else the requests in flight fail at once and the
   * socket is destroyed, with no NBD_CMD_DISC (the protocol allows it only with nothing in flight). Waiting
   * for their replies instead held a SIGINT'd backup until a stalled server answered (nbdkit delay-read=20:
   * 15 s), or until each request's timeout.
   */
  async dispose(): Promise<void> {
    // The same code as a request sent after close() (the connection is this client's to end, not broken by
    // the server): the requests' waiters have already been given up on, so their error only settles them.
    if (this.pending.size > 0) this.fail(this.protocol(`connection closed by this client with ${this.pending.size} requests unanswered`));
    await this.close();
  }

  /** Clean disconnect: NBD_CMD_DISC after the requests in flight, then close. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    if (!this.failure) {
      if (this.pending.size > 0) await new Promise<void>((resolve) => this.drainWaiters.push(resolve));
    }
    if (!this.failure) {
      const header = this.header(0, P.CMD_DISC, this.nextCookie++, 0, 0);
      await new Promise<void>((resolve) => this.socket.end(header, () => resolve()));
    }
    this.socket.destroy();
  }

  private header(flags: number, type: number, cookie: bigint, offset: number, length: number): Buffer {
    return encodeRequest({ flags, type, cookie, offset, length });
  }

  private request(
    type: number,
    command: string,
    offset: number,
    length: number,
    options: { target?: Buffer; payload?: Buffer; flags?: number; contextId?: number },
  ): Promise<BlockStatusExtent[] | undefined> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.closing) return Promise.reject(new NbdProtocolError(this.uri.text, 'connection is closing'));
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isInteger(length) || length < 0 || length > 0xffffffff) {
      return Promise.reject(new InvalidArgumentError(`bad NBD request range ${offset}+${length}`));
    }
    const cookie = this.nextCookie++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => this.fail(new TimeoutError(`NBD ${command} at offset ${offset} on ${this.uri.text}`, this.timeoutMs)), this.timeoutMs);
      const entry: Pending = { command, offset, length, covered: 0, resolve, reject, timer };
      if (options.target) entry.target = options.target;
      if (type === P.CMD_BLOCK_STATUS) {
        entry.extents = [];
        entry.contextId = options.contextId ?? 0;
      }
      this.pending.set(cookie, entry);
      const header = this.header(options.flags ?? 0, type, cookie, offset, length);
      if (options.payload) {
        // Header and payload go out as one segment without copying the payload (1 MiB per WRITE): the caller
        // keeps the buffer untouched until this request settles, which is after the server has read it.
        this.socket.cork();
        this.socket.write(header);
        this.socket.write(options.payload);
        process.nextTick(() => this.socket.uncork());
      } else {
        this.socket.write(header);
      }
    });
  }

  private settle(cookie: bigint, entry: Pending, error?: Error): void {
    clearTimeout(entry.timer);
    this.pending.delete(cookie);
    if (error) entry.reject(error);
    else entry.resolve(entry.extents);
    if (this.pending.size === 0) for (const wake of this.drainWaiters.splice(0)) wake();
  }

  /** Fails the connection and every request in flight. */
  private fail(error: Error): void {
    if (this.failure) return;
    this.failure = error;
    this.reader.fail(error);
    this.socket.destroy();
    for (const [cookie, entry] of this.pending) this.settle(cookie, entry, error);
  }

  private protocol(why: string): NbdProtocolError {
    return new NbdProtocolError(this.uri.text, why);
  }

  /** A decoder's verdict: the value, or the connection fails with what is wrong. */
  private decoded<T>(value: T | string): T {
    if (typeof value === 'string') throw this.protocol(value);
    return value;
  }

  private async replyLoop(): Promise<void> {
    try {
      for (;;) {
        const magic = (await this.reader.peek(MAGIC_SIZE)).readUInt32BE(0);
        if (magic === P.SIMPLE_REPLY_MAGIC) await this.simpleReply();
        else if (magic === P.STRUCTURED_REPLY_MAGIC) await this.structuredChunk();
        else throw this.protocol(`bad reply magic 0x${magic.toString(16)}`);
      }
    } catch (error) {
      if (this.closing && this.pending.size === 0) return;
      // Whatever went wrong reading a reply, the caller sees one error naming the URI.
      this.fail(error instanceof EngineError ? error : this.protocol((error as Error).message));
    }
  }

  private take(cookie: bigint): Pending {
    const entry = this.pending.get(cookie);
    if (!entry) throw this.protocol(`reply for unknown cookie ${cookie}`);
    return entry;
  }

  private async simpleReply(): Promise<void> {
    const { errno, cookie } = this.decoded(decodeSimpleReply(await this.reader.read(SIMPLE_REPLY_SIZE)));
    const entry = this.take(cookie);
    if (errno !== 0) {
      this.settle(cookie, entry, new NbdCommandError(this.uri.text, entry.command, entry.offset, entry.length, P.ERRNO_NAMES[errno] ?? `error ${errno}`));
      if (errno === P.NBD_ESHUTDOWN) void this.close();
      return;
    }
    if (entry.extents) throw this.protocol('simple reply to BLOCK_STATUS');
    // With structured replies a READ MUST NOT be answered with a simple reply (NBD protocol, "Structured
    // reply chunk message"): its data has no length of its own, so the stream could not be trusted after it.
    if (entry.target && this.info.structuredReplies) throw this.protocol('simple reply with data to READ, though structured replies were negotiated');
    if (entry.target) await this.reader.readInto(entry.target, 0, entry.length);
    this.settle(cookie, entry);
  }

  /** One chunk of a structured reply: its header, then its payload by type; the request settles with DONE. */
  private async structuredChunk(): Promise<void> {
    const header = this.decoded(decodeChunkHeader(await this.reader.read(CHUNK_HEADER_SIZE)));
    const entry = this.take(header.cookie);
    if ((header.type & P.REPLY_TYPE_ERROR_BIT) !== 0) await this.errorChunk(entry, header);
    else if (header.type === P.REPLY_TYPE_OFFSET_DATA) await this.dataChunk(entry, header);
    else if (header.type === P.REPLY_TYPE_OFFSET_HOLE) await this.holeChunk(entry, header);
    else if (header.type === P.REPLY_TYPE_BLOCK_STATUS) await this.blockStatusChunk(entry, header);
    else if (header.type === P.REPLY_TYPE_NONE) this.noneChunk(header);
    else throw this.protocol(`unknown structured reply type ${header.type}`);
    this.doneIf(header.flags, header.cookie, entry);
  }

  /** An error (the first one counts): the request fails with it once the reply is done; its text escaped. */
  private async errorChunk(entry: Pending, header: ChunkHeader): Promise<void> {
    if (header.length < ERROR_HEAD_SIZE || header.length > MAX_ERROR_CHUNK) throw this.protocol(`error chunk of ${header.length} bytes`);
    const { errno, message } = this.decoded(decodeErrorChunk(await this.reader.read(header.length)));
    entry.error ??= { errno: P.ERRNO_NAMES[errno] ?? `error ${errno}`, message: displayText(message, MESSAGE_CHARACTERS) };
  }

  /** Data for a READ, checked to lie inside the request before a byte of it is read. */
  private async dataChunk(entry: Pending, header: ChunkHeader): Promise<void> {
    if (!entry.target) throw this.protocol(`data chunk in reply to ${entry.command}`);
    if (header.length < OFFSET_DATA_HEAD_SIZE) throw this.protocol(`data chunk of ${header.length} bytes`);
    const { offset } = this.decoded(decodeOffsetDataHead(await this.reader.read(OFFSET_DATA_HEAD_SIZE)));
    const dataLength = header.length - OFFSET_DATA_HEAD_SIZE;
    this.checkRange(entry, offset, dataLength);
    await this.reader.readInto(entry.target, offset - entry.offset, dataLength);
    entry.covered += dataLength;
  }

  /** A hole in a READ: zeros, inside the request. */
  private async holeChunk(entry: Pending, header: ChunkHeader): Promise<void> {
    if (!entry.target) throw this.protocol(`hole chunk in reply to ${entry.command}`);
    if (header.length !== OFFSET_HOLE_SIZE) throw this.protocol(`hole chunk of ${header.length} bytes`);
    const hole = this.decoded(decodeOffsetHole(await this.reader.read(OFFSET_HOLE_SIZE)));
    this.checkRange(entry, hole.offset, hole.length);
    entry.target.fill(0, hole.offset - entry.offset, hole.offset - entry.offset + hole.length);
    entry.covered += hole.length;
  }

  /** Extents of one context (the server sends one chunk per negotiated context: the one asked for is kept). */
  private async blockStatusChunk(entry: Pending, header: ChunkHeader): Promise<void> {
    if (!entry.extents) throw this.protocol(`block status chunk in reply to ${entry.command}`);
    if (!isBlockStatusSize(header.length) || header.length > blockStatusSize(MAX_DESCRIPTORS)) throw this.protocol(`block status chunk of ${header.length} bytes`);
    const status = this.decoded(decodeBlockStatus(await this.reader.read(header.length)));
    if (status.contextId !== entry.contextId) return;
    if (entry.extents.length > 0) throw this.protocol('two block status chunks for one context');
    let at = entry.offset;
    for (const { length, flags } of status.descriptors) {
      // The last extent may run past the request; never past the export.
      if (at + length > this.info.size) throw this.protocol('block status extent runs past the end of the export');
      entry.extents.push({ offset: at, length, flags });
      at += length;
    }
  }

  private noneChunk(header: ChunkHeader): void {
    if (header.length !== 0) throw this.protocol(`NONE chunk of ${header.length} bytes`);
    if ((header.flags & P.REPLY_FLAG_DONE) === 0) throw this.protocol('NONE chunk without the DONE flag');
  }

  private doneIf(flags: number, cookie: bigint, entry: Pending): void {
    if ((flags & P.REPLY_FLAG_DONE) === 0) return;
    if (entry.error) {
      this.settle(cookie, entry, new NbdCommandError(this.uri.text, entry.command, entry.offset, entry.length, entry.error.errno, entry.error.message));
      // The protocol: a client that receives NBD_ESHUTDOWN MUST initiate a soft disconnect.
      if (entry.error.errno === P.ERRNO_NAMES[P.NBD_ESHUTDOWN]) void this.close();
    } else if (entry.target && entry.covered !== entry.length) {
      throw this.protocol(`read reply covered ${entry.covered} of ${entry.length} bytes`);
    } else if (entry.extents && entry.extents.length === 0) {
      throw this.protocol('block status reply without extents');
    } else {
      this.settle(cookie, entry);
    }
  }

  private checkRange(entry: Pending, at: number, length: number): void {
    if (at < entry.offset || at + length > entry.offset + entry.length || entry.covered + length > entry.length) {
      throw this.protocol(`chunk ${at}+${length} lies outside the request ${entry.offset}+${entry.length}`);
    }
  }
}

async function openSocket(uri: NbdUri, timeoutMs: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    // Plain connections read into one kept buffer (socket-reader.ts lentReads); TLS reads the socket itself.
    const lent = uri.tls ? undefined : lentReads();
    const onread = lent ? { onread: lent.onread } : {};
    const socket = uri.address.kind === 'unix' ? netConnect({ path: uri.address.path, ...onread }) : netConnect({ port: uri.address.port, host: uri.address.host, ...onread });
    lent?.lend(socket);
    socket.setNoDelay(true);
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new TimeoutError(`connecting to ${uri.text}`, timeoutMs));
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.removeAllListeners('error');
      socket.on('error', () => undefined); // the reader reports it
      resolve(socket);
    });
    socket.once('error', (error: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(new NbdConnectError(uri.text, `cannot connect (${error.code ?? error.message})`));
    });
  });
}
