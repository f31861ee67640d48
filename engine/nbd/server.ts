/**
 * An NBD server (fixed newstyle, structured replies, base:allocation, multi-conn) over any NbdExport.
 *
 * Per connection: the handshake (server-handshake.ts), then the transmission loop. Requests are read one
 * at a time and run concurrently up to MAX_IN_FLIGHT requests and IN_FLIGHT_BYTES of READ/WRITE payload
 * per connection; replies go out as they complete (the protocol allows any order). The loop stops reading
 * while either limit is reached or while the socket's send queue is over SEND_HIGH_WATER, and the socket
 * reader pauses the socket itself when unread bytes pile up: memory per connection is bounded (about
 * IN_FLIGHT_BYTES twice plus SEND_HIGH_WATER) whatever the client pipelines.
 *
 * Nothing a client sends is trusted: a bad request magic or a WRITE longer than the maximum request is a
 * hard disconnect (the stream cannot be resynchronised cheaply), other bad requests get an error reply
 * (EINVAL for unknown commands and flags, out-of-range reads and trims and oversized reads; ENOSPC for
 * writes past the end; EPERM for writes to a read-only export) and the connection carries on.
 *
 * With TLS credentials every connection must upgrade (NBD_OPT_STARTTLS) and authenticate before anything
 * else (server-handshake.ts). A Unix socket is created 0600 in a directory other users cannot change
 * (unix-socket.ts).
 *
 * Shutdown (the protocol's "Terminating the transmission phase": a server SHOULD service requests in
 * flight, erroring the rest with NBD_ESHUTDOWN): the listener closes at once; each connection keeps reading,
 * answers every request it had accepted, answers NBD_ESHUTDOWN to every request that arrives meanwhile, and
 * once nothing is in flight and the client has been quiet for QUIET_MS, sends its last replies, closes its
 * side and waits for the client to close (reading and dropping what still comes: closing with unread bytes
 * would reset the connection and could destroy replies the client has not read yet). A connection that
 * has not closed after SHUTDOWN_LIMIT_MS is destroyed.
 */
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import * as P from './protocol.js';
import { SocketReader } from './socket-reader.js';
import { ExportError, type NbdExport, type ReadPiece } from './export.js';
import { BASE_ALLOCATION_ID, HangUp, negotiate, type HandshakeContext, type Negotiated } from './server-handshake.js';
import type { NbdTlsCredentials } from './tls.js';
import { listenOnUnixSocket, type ListeningSocket } from './unix-socket.js';
import { decodeRequest, encodeChunkHeader, encodeSimpleReply, REQUEST_SIZE, type RequestHeader } from './wire.js';
import { encodeBlockStatus, encodeErrorChunk, encodeOffsetDataHead, encodeOffsetHole, type BlockStatusDescriptor } from './wire-chunks.js';

export const MAX_REQUEST_BYTES = 32 * 1024 * 1024;
const MAX_IN_FLIGHT = 16;
/**
 * Payload bytes (READ replies being built, WRITE data) in flight per connection. Without it 16 reads of
 * 32 MiB (512 MiB) could be built at once, and all of them queued on a socket whose client does not read.
 */
const IN_FLIGHT_BYTES = 64 * 1024 * 1024;
const SEND_HIGH_WATER = 8 * 1024 * 1024;
const RECEIVE_HIGH_WATER = 4 * 1024 * 1024;
/** At most this many block-status extents per reply; the client asks again for the rest. */
const MAX_EXTENTS = 64 * 1024;
const HANDSHAKE_TIMEOUT_MS = 30_000;
/** Shutdown: how long a client must have sent nothing (and have nothing in flight) before its connection is closed. */
const QUIET_MS = 100;
/** Shutdown: the longest the server waits for in-flight requests and for each client to close. */
const SHUTDOWN_LIMIT_MS = 5_000;

export interface NbdServerOptions {
  exports: NbdExport[];
  /** Preferred I/O size advertised with NBD_INFO_BLOCK_SIZE. */
  preferredBlockSize?: number;
  /** TLS credentials: every client must then start TLS and authenticate (FORCEDTLS). */
  tls?: NbdTlsCredentials | undefined;
  onLog?: (message: string) => void;
}

export type ListenAddress = { socket: string } | { port: number; host?: string };

const ALLOWED_FLAGS: Record<number, number> = {
  [P.CMD_READ]: P.CMD_FLAG_FUA,
  [P.CMD_WRITE]: P.CMD_FLAG_FUA,
  [P.CMD_FLUSH]: P.CMD_FLAG_FUA,
  [P.CMD_TRIM]: P.CMD_FLAG_FUA,
  [P.CMD_WRITE_ZEROES]: P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE,
  [P.CMD_BLOCK_STATUS]: P.CMD_FLAG_FUA | P.CMD_FLAG_REQ_ONE,
  [P.CMD_DISC]: 0,
};

class RequestError extends Error {
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message);
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Waits for `until`, at most `ms`; the timer goes with it (a stopped server must not linger for it). */
async function within(until: Promise<unknown>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([until, new Promise<void>((resolve) => (timer = setTimeout(resolve, ms)))]);
  clearTimeout(timer);
}

/** A listen failure as one line a user can act on (the port is taken, the address is not this host's …). */
function listenError(error: NodeJS.ErrnoException, where: string): InvalidArgumentError {
  const why: Record<string, string> = {
    EADDRINUSE: 'the address is in use by another program',
    EADDRNOTAVAIL: 'the address is not one of this host\'s',
    EACCES: 'permission denied (ports below 1024 need root)',
  };
  return new InvalidArgumentError(`cannot listen on ${where}: ${why[error.code ?? ''] ?? error.code ?? error.message}`);
}

export class NbdServer {
  private readonly server: Server;
  private readonly connections = new Set<ServerConnection>();
  /** Each connection's run, which ends after the connection has left `connections`: close() waits for them. */
  private readonly runs = new Set<Promise<void>>();
  private closing = false;
  private unixSocket: ListeningSocket | undefined;
  private closed: Promise<void> | undefined;

  constructor(private readonly options: NbdServerOptions) {
    if (options.exports.length === 0) throw new InvalidArgumentError('an NBD server needs at least one export');
    this.server = createServer((socket) => this.accept(socket));
  }

  get exports(): readonly NbdExport[] {
    return this.options.exports;
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  /** The export a name selects; "" is the first export. */
  find(name: string): NbdExport | undefined {
    if (name === '') return this.options.exports[0];
    return this.options.exports.find((e) => e.name === name);
  }

  get tls(): NbdTlsCredentials | undefined {
    return this.options.tls;
  }

  /** Listens on a new Unix socket (0600, see unix-socket.ts) or a TCP port (127.0.0.1 unless `host`). */
  async listen(address: ListenAddress): Promise<{ socket?: string; port?: number; host?: string }> {
    if ('socket' in address) {
      this.unixSocket = await listenOnUnixSocket(this.server, address.socket, (m) => this.log(m));
    } else {
      const host = address.host ?? '127.0.0.1';
      await new Promise<void>((resolve, reject) => {
        const onError = (error: NodeJS.ErrnoException): void => reject(listenError(error, `${host} port ${address.port}`));
        this.server.once('error', onError);
        this.server.listen(address.port, host, () => {
          this.server.removeListener('error', onError);
          resolve();
        });
      });
    }
    this.server.on('error', (error) => this.log(`server error: ${error.message}`));
    if (this.unixSocket) return { socket: this.unixSocket.path };
    const info = this.server.address() as AddressInfo;
    return { port: info.port, host: info.address };
  }

  /**
   * Stops accepting at once; every connection answers the requests it had accepted and NBD_ESHUTDOWN to the
   * ones that arrive meanwhile, then closes (see the top of this file). Idempotent.
   */
  close(): Promise<void> {
    this.closed ??= (async () => {
      this.closing = true;
      const stopped = new Promise<void>((resolve) => this.server.close(() => resolve()));
      await this.unixSocket?.remove();
      await Promise.all([...this.connections].map((c) => c.shutdown()));
      // A connection's shutdown ends with its socket; its run ends (and leaves `connections`) a step later:
      // once close() resolves, no connection is left (a loaded machine showed one still counted).
      await Promise.allSettled([...this.runs]);
      await stopped;
    })();
    return this.closed;
  }

  log(message: string): void {
    this.options.onLog?.(message);
  }

  private accept(socket: Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    socket.setNoDelay(true);
    const connection = new ServerConnection(this, socket, this.options.preferredBlockSize ?? 4096, () => this.closing);
    this.connections.add(connection);
    const running: Promise<void> = connection.run().finally(() => {
      this.connections.delete(connection);
      this.runs.delete(running);
    });
    this.runs.add(running);
  }
}

class ServerConnection {
  private socket: Socket;
  private reader: SocketReader;
  /** The negotiation under way (its socket and reader change when the client starts TLS). */
  private handshake: HandshakeContext | undefined;
  private readonly inFlight = new Set<Promise<void>>();
  private inFlightBytes = 0;
  /**
   * The request loop waiting for a request to end (a slot, or payload bytes, to come free). One waiter woken
   * by whichever ends, not Promise.race over those in flight: that adds a reaction to every one of them at
   * each wait, and a request that waits long (a FLUSH behind a sync) gathers one per request read meanwhile.
   */
  private slotFreed: (() => void) | undefined;
  private closed = false;
  /** Replies are being gathered for one write (see write()). */
  private corked = false;
  private negotiated: Negotiated | undefined;
  /** When the last request arrived (shutdown waits for a quiet client). */
  private lastRequestAt = 0;
  private stopping: Promise<void> | undefined;
  private readonly ended: Promise<void>;
  private endedNow: () => void = () => undefined;

  constructor(
    private readonly server: NbdServer,
    socket: Socket,
    private readonly preferredBlockSize: number,
    private readonly shuttingDown: () => boolean,
  ) {
    this.socket = socket;
    this.reader = this.readerFor(socket);
    this.ended = new Promise((resolve) => {
      this.endedNow = resolve;
    });
  }

  private readerFor(socket: Socket): SocketReader {
    socket.on('error', () => undefined); // the reader sees it as a close
    socket.on('close', () => {
      this.closed = true;
    });
    return new SocketReader(socket, (cause) => new HangUp(cause ? `the connection failed (${(cause as NodeJS.ErrnoException).code ?? cause.message})` : 'the client closed the connection'), RECEIVE_HIGH_WATER);
  }

  async run(): Promise<void> {
    try {
      const context: HandshakeContext = {
        socket: this.socket,
        reader: this.reader,
        tls: this.server.tls,
        readerFor: (socket) => this.readerFor(socket),
        find: (name) => this.server.find(name),
        exports: this.server.exports,
        blockSizes: { minimum: 1, preferred: this.preferredBlockSize, maximum: MAX_REQUEST_BYTES },
        transmissionFlags: (exp) => this.transmissionFlags(exp),
        shuttingDown: this.shuttingDown,
      };
      this.handshake = context;
      const timer = setTimeout(() => context.reader.fail(new HangUp('handshake timed out')), HANDSHAKE_TIMEOUT_MS);
      try {
        this.negotiated = await negotiate(context);
      } finally {
        clearTimeout(timer);
        this.socket = context.socket;
        this.reader = context.reader;
        this.handshake = undefined;
      }
      // Who reads the disks over the network is worth a line: one per connection, only with TLS.
      if (this.negotiated.peer) this.server.log(`export ${this.negotiated.export.name} opened by ${this.negotiated.peer}`);
      await this.transmission(this.negotiated);
    } catch (error) {
      if (!(error instanceof HangUp)) this.server.log(`connection error: ${(error as Error).message}`);
      else if (!/closed the connection|aborted|shutting down/.test(error.message)) this.server.log(`dropped a client: ${error.message}`);
    } finally {
      await Promise.allSettled(this.inFlight);
      await this.hangUp();
      this.endedNow();
    }
  }

  /**
   * Closes our side once the replies written so far are sent, reading and dropping whatever the client
   * still sends until it closes too (or SHUTDOWN_LIMIT_MS pass).
   */
  private async hangUp(): Promise<void> {
    const socket = this.socket;
    if (this.closed) return;
    const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
    this.reader.discard();
    socket.end();
    await within(closed, SHUTDOWN_LIMIT_MS);
    socket.destroy();
  }

  /**
   * Server shutdown: keep reading (requests in flight are serviced, new ones answered NBD_ESHUTDOWN by
   * handle()); when nothing is in flight and the client has been quiet for QUIET_MS, stop reading, which
   * ends run(): it hangs up. Resolves when the connection is closed, at the latest after SHUTDOWN_LIMIT_MS.
   */
  shutdown(): Promise<void> {
    this.stopping ??= (async () => {
      const limit = Date.now() + SHUTDOWN_LIMIT_MS;
      const done = (async () => {
        for (;;) {
          if (this.inFlight.size > 0) await Promise.allSettled(this.inFlight);
          const quiet = Date.now() - this.lastRequestAt;
          if (this.inFlight.size === 0 && (quiet >= QUIET_MS || this.negotiated === undefined)) break;
          await sleep(Math.max(1, QUIET_MS - quiet));
        }
        (this.handshake?.reader ?? this.reader).fail(new HangUp('server shutting down'));
        await this.ended;
      })();
      await within(done, Math.max(0, limit - Date.now()));
      if (!this.closed) {
        this.server.log('a client did not close within the shutdown limit: its connection was cut');
        this.socket.destroy();
        (this.handshake?.socket ?? this.socket).destroy();
      }
    })();
    return this.stopping;
  }

  private transmissionFlags(exp: NbdExport): number {
    let flags = P.TFLAG_HAS_FLAGS | P.TFLAG_CAN_MULTI_CONN;
    if (exp.writable) flags |= P.TFLAG_SEND_FLUSH | P.TFLAG_SEND_FUA | P.TFLAG_SEND_TRIM | P.TFLAG_SEND_WRITE_ZEROES;
    else flags |= P.TFLAG_READ_ONLY;
    return flags;
  }

  /** Resolves when the send queue drained, or the connection closed (nothing will drain it then). */
  private drained(): Promise<void> {
    return new Promise((resolve) => {
      const done = (): void => {
        this.socket.removeListener('drain', done);
        this.socket.removeListener('close', done);
        resolve();
      };
      this.socket.once('drain', done);
      this.socket.once('close', done);
    });
  }

  private async transmission(negotiated: Negotiated): Promise<void> {
    for (;;) {
      while (this.inFlight.size >= MAX_IN_FLIGHT) await this.requestEnded();
      if (this.socket.writableLength > SEND_HIGH_WATER && !this.closed) await this.drained();
      const request = decodeRequest(Buffer.from(await this.reader.read(REQUEST_SIZE)));
      this.lastRequestAt = Date.now();
      if (typeof request === 'string') throw new HangUp(request);
      if (request.type === P.CMD_DISC) return;
      if (request.type === P.CMD_WRITE && request.length > MAX_REQUEST_BYTES) throw new HangUp(`WRITE of ${request.length} bytes, more than the ${MAX_REQUEST_BYTES} advertised`);
      // What the request will hold in memory (a READ over the maximum is refused without reading).
      const bytes = request.type === P.CMD_WRITE || (request.type === P.CMD_READ && request.length <= MAX_REQUEST_BYTES) ? request.length : 0;
      while (this.inFlight.size > 0 && this.inFlightBytes + bytes > IN_FLIGHT_BYTES) await this.requestEnded();
      const payload = request.type === P.CMD_WRITE ? Buffer.from(await this.reader.read(request.length)) : undefined;
      this.inFlightBytes += bytes;
      const work = this.handle(negotiated, request, payload)
        .catch((error: unknown) => {
          this.server.log(`request failed: ${(error as Error).message}`);
        })
        .finally(() => {
          this.inFlightBytes -= bytes;
          this.inFlight.delete(work);
          const freed = this.slotFreed;
          this.slotFreed = undefined;
          freed?.();
        });
      this.inFlight.add(work);
    }
  }

  /** Resolves when the next request in flight ends. */
  private requestEnded(): Promise<void> {
    return new Promise((resolve) => (this.slotFreed = resolve));
  }

  private async handle(negotiated: Negotiated, request: RequestHeader, payload: Buffer | undefined): Promise<void> {
    const exp = negotiated.export;
    try {
      if (this.shuttingDown()) throw new RequestError(P.NBD_ESHUTDOWN, 'the server is shutting down');
      const allowed = ALLOWED_FLAGS[request.type];
      if (allowed === undefined) throw new RequestError(P.NBD_EINVAL, `unknown command ${request.type}`);
      if ((request.flags & ~allowed) !== 0) throw new RequestError(P.NBD_EINVAL, `flags 0x${request.flags.toString(16)} are not valid for command ${request.type}`);
      const end = request.offset + request.length;
      switch (request.type) {
        case P.CMD_READ: {
          if (request.length === 0 || request.length > MAX_REQUEST_BYTES) throw new RequestError(P.NBD_EINVAL, `read of ${request.length} bytes (1 to ${MAX_REQUEST_BYTES} allowed)`);
          if (end > exp.size) throw new RequestError(P.NBD_EINVAL, `read ${request.offset}+${request.length} runs past the end of the export (${exp.size} bytes)`);
          const pieces = await exp.read(request.offset, request.length);
          this.sendRead(negotiated, request, pieces);
          return;
        }
        case P.CMD_WRITE:
        case P.CMD_WRITE_ZEROES:
        case P.CMD_TRIM: {
          if (!exp.writable) throw new RequestError(P.NBD_EPERM, 'the export is read-only');
          // The protocol's error values: ENOSPC for writes past the end, EINVAL for a trim past it.
          if (end > exp.size) throw new RequestError(request.type === P.CMD_TRIM ? P.NBD_EINVAL : P.NBD_ENOSPC, `${request.type === P.CMD_TRIM ? 'trim' : 'write'} ${request.offset}+${request.length} runs past the end of the export (${exp.size} bytes)`);
          if (request.type === P.CMD_WRITE) await exp.write!(payload!, request.offset);
          else if (request.type === P.CMD_WRITE_ZEROES) await exp.writeZeroes!(request.offset, request.length);
          else await exp.trim!(request.offset, request.length);
          if ((request.flags & P.CMD_FLAG_FUA) !== 0) await exp.flush?.();
          this.sendOk(request);
          return;
        }
        case P.CMD_FLUSH:
          await exp.flush?.();
          this.sendOk(request);
          return;
        case P.CMD_BLOCK_STATUS: {
          if (!negotiated.baseAllocation) throw new RequestError(P.NBD_EINVAL, 'no metadata context was negotiated');
          if (request.length === 0 || end > exp.size) throw new RequestError(P.NBD_EINVAL, `block status ${request.offset}+${request.length} is outside the export (${exp.size} bytes)`);
          const extents = await exp.allocation(request.offset, request.length);
          this.sendBlockStatus(request, extents, (request.flags & P.CMD_FLAG_REQ_ONE) !== 0);
          return;
        }
      }
    } catch (error) {
      const errno = error instanceof RequestError || error instanceof ExportError ? error.errno : P.NBD_EIO;
      if (!(error instanceof RequestError)) this.server.log(`${exp.name}: request at offset ${request.offset}: ${(error as Error).message}`);
      this.sendError(negotiated, request, errno, (error as Error).message);
    }
  }

  /**
   * Replies written in one turn of the event loop leave in one `writev`: the socket is corked at the first
   * and uncorked once the loop has run what it had (setImmediate). A pipelining client (16 small requests
   * in flight) otherwise costs one system call per reply part, the header and the data of a READ apart.
   */
  private write(...parts: Buffer[]): void {
    if (this.closed) return;
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      const socket = this.socket;
      setImmediate(() => {
        this.corked = false;
        socket.uncork();
      });
    }
    for (const part of parts) this.socket.write(part);
  }

  private sendOk(request: RequestHeader): void {
    this.write(encodeSimpleReply(0, request.cookie));
  }

  private sendError(negotiated: Negotiated, request: RequestHeader, errno: number, message: string): void {
    if (!negotiated.structuredReplies) {
      this.write(encodeSimpleReply(errno, request.cookie));
      return;
    }
    const body = encodeErrorChunk({ errno, message: message.slice(0, 1024) });
    this.write(encodeChunkHeader({ flags: P.REPLY_FLAG_DONE, type: P.REPLY_TYPE_ERROR, cookie: request.cookie, length: body.length }), body);
  }

  private sendRead(negotiated: Negotiated, request: RequestHeader, pieces: ReadPiece[]): void {
    if (!negotiated.structuredReplies) {
      const parts = [encodeSimpleReply(0, request.cookie)];
      for (const piece of pieces) parts.push('data' in piece ? piece.data : Buffer.alloc(piece.length));
      this.write(...parts);
      return;
    }
    const parts: Buffer[] = [];
    pieces.forEach((piece, i) => {
      const flags = i === pieces.length - 1 ? P.REPLY_FLAG_DONE : 0;
      if ('data' in piece) {
        const head = encodeOffsetDataHead(piece.offset);
        parts.push(encodeChunkHeader({ flags, type: P.REPLY_TYPE_OFFSET_DATA, cookie: request.cookie, length: head.length + piece.data.length }), head, piece.data);
      } else {
        const hole = encodeOffsetHole({ offset: piece.offset, length: piece.length });
        parts.push(encodeChunkHeader({ flags, type: P.REPLY_TYPE_OFFSET_HOLE, cookie: request.cookie, length: hole.length }), hole);
      }
    });
    this.write(...parts);
  }

  private sendBlockStatus(request: RequestHeader, extents: { length: number; flags: number }[], onlyOne: boolean): void {
    const kept: BlockStatusDescriptor[] = [];
    let covered = 0;
    for (const extent of extents) {
      if (covered >= request.length || kept.length >= (onlyOne ? 1 : MAX_EXTENTS)) break;
      const length = Math.min(extent.length, request.length - covered);
      if (length <= 0) break;
      kept.push({ length, flags: extent.flags });
      covered += length;
    }
    if (kept.length === 0) kept.push({ length: request.length, flags: 0 });
    const body = encodeBlockStatus({ contextId: BASE_ALLOCATION_ID, descriptors: kept });
    this.write(encodeChunkHeader({ flags: P.REPLY_FLAG_DONE, type: P.REPLY_TYPE_BLOCK_STATUS, cookie: request.cookie, length: body.length }), body);
  }
}

