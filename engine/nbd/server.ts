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
 */
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { chmod, unlink } from 'node:fs/promises';
import { MUTABLE_FILE_MODE } from '../../repo-format/file-modes.js';
import * as P from './protocol.js';
import { SocketReader } from './socket-reader.js';
import { ExportError, type NbdExport, type ReadPiece } from './export.js';
import { BASE_ALLOCATION_ID, HangUp, negotiate, type Negotiated } from './server-handshake.js';
import { decodeRequest, encodeChunkHeader, encodeSimpleReply, REQUEST_SIZE, type RequestHeader } from './wire.js';

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

export interface NbdServerOptions {
  exports: NbdExport[];
  /** Preferred I/O size advertised with NBD_INFO_BLOCK_SIZE. */
  preferredBlockSize?: number;
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

export class NbdServer {
  private readonly server: Server;
  private readonly connections = new Set<ServerConnection>();
  private closing = false;
  private socketPath: string | undefined;

  constructor(private readonly options: NbdServerOptions) {
    if (options.exports.length === 0) throw new Error('an NBD server needs at least one export');
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

  async listen(address: ListenAddress): Promise<{ socket?: string; port?: number; host?: string }> {
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      if ('socket' in address) {
        // Owner-only from the first instant: the socket file is created inside listen() under the umask.
        const umask = process.umask(0o177);
        try {
          this.server.listen(address.socket, () => resolve());
        } finally {
          process.umask(umask);
        }
      } else this.server.listen(address.port, address.host ?? '127.0.0.1', () => resolve());
    });
    this.server.on('error', (error) => this.log(`server error: ${error.message}`));
    if ('socket' in address) {
      this.socketPath = address.socket;
      // Connecting to a Unix socket needs write permission on it: 0600 keeps other users out (SPEC.md, 2.1).
      await chmod(address.socket, MUTABLE_FILE_MODE);
      return { socket: address.socket };
    }
    const info = this.server.address() as AddressInfo;
    return { port: info.port, host: info.address };
  }

  /** Stops accepting, lets requests in flight finish (new ones get ESHUTDOWN), then closes every connection. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    const stopped = new Promise<void>((resolve) => this.server.close(() => resolve()));
    await Promise.all([...this.connections].map((c) => c.shutdown()));
    await stopped;
    if (this.socketPath) await unlink(this.socketPath).catch(() => undefined);
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
    void connection.run().finally(() => this.connections.delete(connection));
  }
}

class ServerConnection {
  private readonly reader: SocketReader;
  private readonly inFlight = new Set<Promise<void>>();
  private inFlightBytes = 0;
  private closed = false;
  private negotiated: Negotiated | undefined;

  constructor(
    private readonly server: NbdServer,
    private readonly socket: Socket,
    private readonly preferredBlockSize: number,
    private readonly shuttingDown: () => boolean,
  ) {
    this.reader = new SocketReader(socket, () => new HangUp('the client closed the connection'), RECEIVE_HIGH_WATER);
    socket.on('error', () => undefined); // the reader sees it as a close
    socket.on('close', () => {
      this.closed = true;
    });
  }

  async run(): Promise<void> {
    try {
      const timer = setTimeout(() => this.reader.fail(new HangUp('handshake timed out')), HANDSHAKE_TIMEOUT_MS);
      try {
        this.negotiated = await negotiate({
          socket: this.socket,
          reader: this.reader,
          find: (name) => this.server.find(name),
          exports: this.server.exports,
          blockSizes: { minimum: 1, preferred: this.preferredBlockSize, maximum: MAX_REQUEST_BYTES },
          transmissionFlags: (exp) => this.transmissionFlags(exp),
          shuttingDown: this.shuttingDown,
        });
      } finally {
        clearTimeout(timer);
      }
      await this.transmission(this.negotiated);
    } catch (error) {
      if (!(error instanceof HangUp)) this.server.log(`connection error: ${(error as Error).message}`);
      else if (!/closed the connection|aborted/.test(error.message)) this.server.log(`dropped a client: ${error.message}`);
    } finally {
      await Promise.allSettled(this.inFlight);
      this.socket.end();
      this.socket.destroySoon();
    }
  }

  /** Server shutdown: stop reading, let requests in flight answer, then close. */
  async shutdown(): Promise<void> {
    this.reader.fail(new HangUp('server shutting down'));
    await Promise.allSettled(this.inFlight);
    this.socket.destroy();
  }

  private transmissionFlags(exp: NbdExport): number {
    let flags = P.TFLAG_HAS_FLAGS | P.TFLAG_CAN_MULTI_CONN;
    if (exp.writable) flags |= P.TFLAG_SEND_FLUSH | P.TFLAG_SEND_FUA | P.TFLAG_SEND_TRIM | P.TFLAG_SEND_WRITE_ZEROES;
    else flags |= P.TFLAG_READ_ONLY;
    return flags;
  }

  private async transmission(negotiated: Negotiated): Promise<void> {
    for (;;) {
      while (this.inFlight.size >= MAX_IN_FLIGHT) await Promise.race(this.inFlight);
      if (this.socket.writableLength > SEND_HIGH_WATER) await new Promise((resolve) => this.socket.once('drain', resolve));
      const request = decodeRequest(Buffer.from(await this.reader.read(REQUEST_SIZE)));
      if (typeof request === 'string') throw new HangUp(request);
      if (request.type === P.CMD_DISC) return;
      if (request.type === P.CMD_WRITE && request.length > MAX_REQUEST_BYTES) throw new HangUp(`WRITE of ${request.length} bytes, more than the ${MAX_REQUEST_BYTES} advertised`);
      // What the request will hold in memory (a READ over the maximum is refused without reading).
      const bytes = request.type === P.CMD_WRITE || (request.type === P.CMD_READ && request.length <= MAX_REQUEST_BYTES) ? request.length : 0;
      while (this.inFlight.size > 0 && this.inFlightBytes + bytes > IN_FLIGHT_BYTES) await Promise.race(this.inFlight);
      const payload = request.type === P.CMD_WRITE ? Buffer.from(await this.reader.read(request.length)) : undefined;
      this.inFlightBytes += bytes;
      const work = this.handle(negotiated, request, payload)
        .catch((error: unknown) => {
          this.server.log(`request failed: ${(error as Error).message}`);
        })
        .finally(() => {
          this.inFlightBytes -= bytes;
          this.inFlight.delete(work);
        });
      this.inFlight.add(work);
    }
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

  private write(...parts: Buffer[]): void {
    if (this.closed) return;
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
    const text = Buffer.from(message.slice(0, 1024), 'utf8').subarray(0, P.MAX_STRING);
    const body = Buffer.allocUnsafe(6 + text.length);
    body.writeUInt32BE(errno, 0);
    body.writeUInt16BE(text.length, 4);
    text.copy(body, 6);
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
      const at = Buffer.allocUnsafe(8);
      at.writeBigUInt64BE(BigInt(piece.offset), 0);
      if ('data' in piece) {
        parts.push(encodeChunkHeader({ flags, type: P.REPLY_TYPE_OFFSET_DATA, cookie: request.cookie, length: 8 + piece.data.length }), at, piece.data);
      } else {
        const hole = Buffer.allocUnsafe(12);
        at.copy(hole, 0);
        hole.writeUInt32BE(piece.length, 8);
        parts.push(encodeChunkHeader({ flags, type: P.REPLY_TYPE_OFFSET_HOLE, cookie: request.cookie, length: 12 }), hole);
      }
    });
    this.write(...parts);
  }

  private sendBlockStatus(request: RequestHeader, extents: { length: number; flags: number }[], onlyOne: boolean): void {
    const kept: { length: number; flags: number }[] = [];
    let covered = 0;
    for (const extent of extents) {
      if (covered >= request.length || kept.length >= (onlyOne ? 1 : MAX_EXTENTS)) break;
      const length = Math.min(extent.length, request.length - covered);
      if (length <= 0) break;
      kept.push({ length, flags: extent.flags });
      covered += length;
    }
    if (kept.length === 0) kept.push({ length: request.length, flags: 0 });
    const body = Buffer.allocUnsafe(4 + 8 * kept.length);
    body.writeUInt32BE(BASE_ALLOCATION_ID, 0);
    kept.forEach((extent, i) => {
      body.writeUInt32BE(extent.length, 4 + 8 * i);
      body.writeUInt32BE(extent.flags, 8 + 8 * i);
    });
    this.write(encodeChunkHeader({ flags: P.REPLY_FLAG_DONE, type: P.REPLY_TYPE_BLOCK_STATUS, cookie: request.cookie, length: body.length }), body);
  }
}

