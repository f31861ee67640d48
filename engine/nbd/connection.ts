/**
 * One NBD connection: fixed newstyle handshake (structured replies, meta contexts, NBD_OPT_GO with block
 * size info; contexts the server does not have are simply absent from `info.contexts`), then the transmission phase with many requests in flight, matched to replies by cookie.
 *
 * Anything the server sends that the protocol does not allow (bad magic, unknown cookie, a chunk outside
 * the request, a read reply that does not cover the request, a close mid-reply) fails the connection and
 * every request on it with NbdProtocolError: never a hang, never a silently wrong read. Each request also
 * has a timeout. Every error names the URI (a connection reset included), never a bare errno.
 *
 * For an nbds:// URI, NBD_OPT_STARTTLS is the first option (the protocol's advice against downgrades) and
 * a server that does not acknowledge it is refused: nothing is sent in clear. A reply of NBD_ESHUTDOWN
 * (the server is stopping) makes the connection disconnect softly once its other requests are answered.
 */
import { connect as netConnect, type Socket } from 'node:net';
import { EngineError } from '../../repo-format/errors.js';
import { NbdCommandError, NbdConnectError, NbdProtocolError, TimeoutError } from '../errors.js';
import * as P from './protocol.js';
import { SocketReader } from './socket-reader.js';
import { startTls, type NbdClientTls } from './tls.js';
import type { NbdUri } from './uri.js';
import { encodeLengthPrefixed as lengthPrefixed, encodeOptionHeader, encodeRequest } from './wire.js';

export interface ExportInfo {
  size: number;
  flags: number;
  minBlockSize: number;
  preferredBlockSize: number;
  maxBlockSize: number;
  /** Negotiated metadata contexts: name → id. */
  contexts: Map<string, number>;
  structuredReplies: boolean;
}

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

function u64(buffer: Buffer, at: number): number {
  const value = buffer.readBigUInt64BE(at);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw new RangeError(`64-bit value ${value} is too large`);
  return Number(value);
}

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
      if (error instanceof RangeError) throw new NbdProtocolError(uri.text, error.message);
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
      return Promise.reject(new RangeError(`bad NBD request range ${offset}+${length}`));
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

  private async replyLoop(): Promise<void> {
    try {
      for (;;) {
        const magicBytes = await this.reader.read(4);
        const magic = magicBytes.readUInt32BE(0);
        if (magic === P.SIMPLE_REPLY_MAGIC) await this.simpleReply();
        else if (magic === P.STRUCTURED_REPLY_MAGIC) await this.structuredChunk();
        else throw this.protocol(`bad reply magic 0x${magic.toString(16)}`);
      }
    } catch (error) {
      if (this.closing && this.pending.size === 0) return;
      this.fail(error instanceof RangeError ? this.protocol(error.message) : (error as Error));
    }
  }

  private take(cookie: bigint): Pending {
    const entry = this.pending.get(cookie);
    if (!entry) throw this.protocol(`reply for unknown cookie ${cookie}`);
    return entry;
  }

  private async simpleReply(): Promise<void> {
    const rest = Buffer.from(await this.reader.read(12));
    const errno = rest.readUInt32BE(0);
    const cookie = rest.readBigUInt64BE(4);
    const entry = this.take(cookie);
    if (errno !== 0) {
      this.settle(cookie, entry, new NbdCommandError(this.uri.text, entry.command, entry.offset, entry.length, P.ERRNO_NAMES[errno] ?? `error ${errno}`));
      if (errno === P.NBD_ESHUTDOWN) void this.close();
      return;
    }
    if (entry.extents) throw this.protocol('simple reply to BLOCK_STATUS');
    if (entry.target) await this.reader.readInto(entry.target, 0, entry.length);
    this.settle(cookie, entry);
  }

  private async structuredChunk(): Promise<void> {
    const header = Buffer.from(await this.reader.read(16));
    const flags = header.readUInt16BE(0);
    const type = header.readUInt16BE(2);
    const cookie = header.readBigUInt64BE(4);
    const length = header.readUInt32BE(12);
    const entry = this.take(cookie);
    if ((type & P.REPLY_TYPE_ERROR_BIT) !== 0) {
      if (length < 6 || length > 6 + P.MAX_STRING + 8) throw this.protocol(`error chunk of ${length} bytes`);
      const payload = Buffer.from(await this.reader.read(length));
      const errno = payload.readUInt32BE(0);
      const messageLength = payload.readUInt16BE(4);
      if (6 + messageLength > length) throw this.protocol('error chunk message runs past the chunk');
      entry.error ??= { errno: P.ERRNO_NAMES[errno] ?? `error ${errno}`, message: payload.toString('utf8', 6, 6 + messageLength) };
    } else if (type === P.REPLY_TYPE_OFFSET_DATA) {
      if (!entry.target) throw this.protocol(`data chunk in reply to ${entry.command}`);
      if (length < 8) throw this.protocol(`data chunk of ${length} bytes`);
      const at = u64(await this.reader.read(8), 0);
      const dataLength = length - 8;
      this.checkRange(entry, at, dataLength);
      await this.reader.readInto(entry.target, at - entry.offset, dataLength);
      entry.covered += dataLength;
    } else if (type === P.REPLY_TYPE_OFFSET_HOLE) {
      if (!entry.target) throw this.protocol(`hole chunk in reply to ${entry.command}`);
      if (length !== 12) throw this.protocol(`hole chunk of ${length} bytes`);
      const payload = await this.reader.read(12);
      const at = u64(payload, 0);
      const holeLength = payload.readUInt32BE(8);
      this.checkRange(entry, at, holeLength);
      entry.target.fill(0, at - entry.offset, at - entry.offset + holeLength);
      entry.covered += holeLength;
    } else if (type === P.REPLY_TYPE_BLOCK_STATUS) {
      if (!entry.extents) throw this.protocol(`block status chunk in reply to ${entry.command}`);
      if (length < 12 || (length - 4) % 8 !== 0 || length > 4 + 8 * 1024 * 1024) throw this.protocol(`block status chunk of ${length} bytes`);
      const payload = Buffer.from(await this.reader.read(length));
      // One chunk per negotiated context: keep the one asked for.
      if (payload.readUInt32BE(0) !== entry.contextId) return this.doneIf(flags, cookie, entry);
      if (entry.extents.length > 0) throw this.protocol('two block status chunks for one context');
      let at = entry.offset;
      for (let i = 4; i < length; i += 8) {
        const extentLength = payload.readUInt32BE(i);
        const extentFlags = payload.readUInt32BE(i + 4);
        if (extentLength === 0) throw this.protocol('block status extent of length 0');
        // The last extent may run past the request; never past the export.
        if (at + extentLength > this.info.size) throw this.protocol('block status extent runs past the end of the export');
        entry.extents.push({ offset: at, length: extentLength, flags: extentFlags });
        at += extentLength;
      }
    } else if (type === P.REPLY_TYPE_NONE) {
      if (length !== 0) throw this.protocol(`NONE chunk of ${length} bytes`);
      if ((flags & P.REPLY_FLAG_DONE) === 0) throw this.protocol('NONE chunk without the DONE flag');
    } else {
      throw this.protocol(`unknown structured reply type ${type}`);
    }
    this.doneIf(flags, cookie, entry);
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

/** The socket and its reader; both replaced when the connection switches to TLS. */
interface Link {
  socket: Socket;
  reader: SocketReader;
}

function readerFor(uri: NbdUri, socket: Socket): SocketReader {
  return new SocketReader(socket, (cause) => {
    if (!cause) return new NbdProtocolError(uri.text, 'the server closed the connection');
    return new NbdProtocolError(uri.text, `the connection was lost (${(cause as NodeJS.ErrnoException).code ?? cause.message})`);
  });
}

async function openSocket(uri: NbdUri, timeoutMs: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = uri.address.kind === 'unix' ? netConnect(uri.address.path) : netConnect(uri.address.port, uri.address.host);
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

function optionHeader(option: number, length: number): Buffer {
  return encodeOptionHeader({ option, length });
}

interface OptionReply {
  type: number;
  data: Buffer;
}

async function optionReply(uri: NbdUri, reader: SocketReader, option: number): Promise<OptionReply> {
  const header = Buffer.from(await reader.read(20));
  if (header.readBigUInt64BE(0) !== P.OPTION_REPLY_MAGIC) throw new NbdProtocolError(uri.text, 'bad option reply magic');
  if (header.readUInt32BE(8) !== option) throw new NbdProtocolError(uri.text, `reply to option ${header.readUInt32BE(8)}, expected ${option}`);
  const type = header.readUInt32BE(12);
  const length = header.readUInt32BE(16);
  if (length > P.MAX_OPTION_REPLY) throw new NbdProtocolError(uri.text, `option reply of ${length} bytes`);
  return { type, data: Buffer.from(await reader.read(length)) };
}

function replyError(type: number, data: Buffer): string {
  const name = P.REP_ERRORS[type] ?? `option error 0x${type.toString(16)}`;
  return data.length > 0 ? `${name}: ${data.toString('utf8')}` : name;
}

/**
 * NBD_OPT_STARTTLS, then the TLS handshake over the same socket: the server must acknowledge, or the
 * connection ends (an nbds:// URI means TLS or nothing: the protocol's "downgrade attacks").
 */
async function upgrade(uri: NbdUri, link: Link, tls: NbdClientTls): Promise<void> {
  link.socket.write(optionHeader(P.OPT_STARTTLS, 0));
  const reply = await optionReply(uri, link.reader, P.OPT_STARTTLS);
  if (reply.type !== P.REP_ACK) {
    throw new NbdConnectError(uri.text, `the server does not offer TLS (${replyError(reply.type, reply.data)}); an nbds:// URI never falls back to plain text`);
  }
  try {
    link.reader.detach();
  } catch (error) {
    throw new NbdProtocolError(uri.text, (error as Error).message);
  }
  const secure = await startTls(link.socket, tls).catch((error: unknown) => {
    if (error instanceof EngineError) throw error; // a credentials problem, already named
    throw new NbdConnectError(uri.text, (error as Error).message);
  });
  secure.setNoDelay(true);
  secure.on('error', () => undefined); // the reader reports it
  link.socket = secure;
  link.reader = readerFor(uri, secure);
}

async function handshake(uri: NbdUri, link: Link, metaContexts: string[], tls: NbdClientTls | undefined): Promise<ExportInfo> {
  const greeting = Buffer.from(await link.reader.read(18));
  if (greeting.readBigUInt64BE(0) !== P.NBDMAGIC) throw new NbdConnectError(uri.text, 'not an NBD server (bad greeting magic)');
  if (greeting.readBigUInt64BE(8) !== P.IHAVEOPT) throw new NbdConnectError(uri.text, 'the server speaks oldstyle NBD, which is not supported');
  const serverFlags = greeting.readUInt16BE(16);
  if ((serverFlags & P.FLAG_FIXED_NEWSTYLE) === 0) throw new NbdConnectError(uri.text, 'the server does not support fixed newstyle negotiation');
  const clientFlags = Buffer.allocUnsafe(4);
  clientFlags.writeUInt32BE(P.FLAG_FIXED_NEWSTYLE | (serverFlags & P.FLAG_NO_ZEROES), 0);
  link.socket.write(clientFlags);
  if (tls) await upgrade(uri, link, tls);
  const { socket, reader } = link;

  // Structured replies: needed for block status and for holes in reads.
  socket.write(optionHeader(P.OPT_STRUCTURED_REPLY, 0));
  const structured = await optionReply(uri, reader, P.OPT_STRUCTURED_REPLY).catch((error: unknown) => {
    // With TLS 1.3 a server checks our certificate after we think the handshake is done: its refusal is a close.
    if (tls && error instanceof NbdProtocolError) throw new NbdConnectError(uri.text, `the server ended the connection right after the TLS handshake: it does not accept our credentials (${tls.credentials.source})`);
    throw error;
  });
  if (structured.type === P.REP_ERR_TLS_REQD) throw new NbdConnectError(uri.text, 'the server requires TLS: connect with an nbds:// URI and its credentials (tls-certificates=DIR or tls-psk-file=FILE)');
  const structuredReplies = structured.type === P.REP_ACK;
  if (!structuredReplies && (structured.type & P.REP_ERROR_BIT) === 0) throw new NbdProtocolError(uri.text, `unexpected reply ${structured.type} to STRUCTURED_REPLY`);

  const contexts = new Map<string, number>();
  if (metaContexts.length > 0) {
    if (!structuredReplies) return goAndInfo(uri, socket, reader, contexts, structuredReplies);
    const count = Buffer.allocUnsafe(4);
    count.writeUInt32BE(metaContexts.length, 0);
    const body = Buffer.concat([lengthPrefixed(uri.exportName), count, ...metaContexts.map(lengthPrefixed)]);
    socket.write(Buffer.concat([optionHeader(P.OPT_SET_META_CONTEXT, body.length), body]));
    for (;;) {
      const reply = await optionReply(uri, reader, P.OPT_SET_META_CONTEXT);
      if (reply.type === P.REP_ACK) break;
      if (reply.type === P.REP_META_CONTEXT) {
        if (reply.data.length < 5) throw new NbdProtocolError(uri.text, 'short META_CONTEXT reply');
        contexts.set(reply.data.toString('utf8', 4), reply.data.readUInt32BE(0));
      } else if ((reply.type & P.REP_ERROR_BIT) !== 0) {
        throw new NbdConnectError(uri.text, `SET_META_CONTEXT refused: ${replyError(reply.type, reply.data)}`);
      } else {
        throw new NbdProtocolError(uri.text, `unexpected reply ${reply.type} to SET_META_CONTEXT`);
      }
    }
  }

  return goAndInfo(uri, socket, reader, contexts, structuredReplies);
}

/** NBD_OPT_GO, asking for block size constraints as well as size and flags. */
async function goAndInfo(uri: NbdUri, socket: Socket, reader: SocketReader, contexts: Map<string, number>, structuredReplies: boolean): Promise<ExportInfo> {
  const name = lengthPrefixed(uri.exportName);
  const go = Buffer.concat([name, Buffer.from([0, 1, 0, P.INFO_BLOCK_SIZE])]);
  socket.write(Buffer.concat([optionHeader(P.OPT_GO, go.length), go]));
  const info: ExportInfo = { size: -1, flags: 0, minBlockSize: 1, preferredBlockSize: 4096, maxBlockSize: 32 * 1024 * 1024, contexts, structuredReplies };
  for (;;) {
    const reply = await optionReply(uri, reader, P.OPT_GO);
    if (reply.type === P.REP_ACK) break;
    if ((reply.type & P.REP_ERROR_BIT) !== 0) throw new NbdConnectError(uri.text, `export "${uri.exportName}" refused: ${replyError(reply.type, reply.data)}`);
    if (reply.type !== P.REP_INFO) throw new NbdProtocolError(uri.text, `unexpected reply ${reply.type} to GO`);
    if (reply.data.length < 2) throw new NbdProtocolError(uri.text, 'short INFO reply');
    const infoType = reply.data.readUInt16BE(0);
    if (infoType === P.INFO_EXPORT) {
      if (reply.data.length !== 12) throw new NbdProtocolError(uri.text, 'bad NBD_INFO_EXPORT length');
      info.size = u64(reply.data, 2);
      info.flags = reply.data.readUInt16BE(10);
    } else if (infoType === P.INFO_BLOCK_SIZE) {
      if (reply.data.length !== 14) throw new NbdProtocolError(uri.text, 'bad NBD_INFO_BLOCK_SIZE length');
      info.minBlockSize = reply.data.readUInt32BE(2);
      info.preferredBlockSize = reply.data.readUInt32BE(6);
      info.maxBlockSize = reply.data.readUInt32BE(10);
    }
  }
  if (info.size < 0) throw new NbdProtocolError(uri.text, 'the server finished GO without sending the export size');
  return info;
}
