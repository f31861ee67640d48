/**
 * The server side of fixed newstyle negotiation (NBD protocol, "Handshake"): greeting, client flags, then
 * options until the client enters transmission (NBD_OPT_GO or NBD_OPT_EXPORT_NAME) or leaves.
 *
 * With TLS credentials the server is FORCEDTLS (the protocol's "TLS support"): before the upgrade every
 * option but NBD_OPT_STARTTLS and NBD_OPT_ABORT is answered NBD_REP_ERR_TLS_REQD, NBD_OPT_GO included,
 * and NBD_OPT_EXPORT_NAME (which cannot be answered with an error) ends the connection; after it, the rest of
 * the negotiation and the transmission run over TLS, and a second STARTTLS is NBD_REP_ERR_INVALID.
 * Without credentials the server is NOTLS: STARTTLS is NBD_REP_ERR_UNSUP.
 *
 * Every option is answered, unknown ones with NBD_REP_ERR_UNSUP, malformed ones with NBD_REP_ERR_INVALID;
 * lengths inside an option are checked against the option's own length before anything is read. The
 * connection is dropped (a hard disconnect, which the protocol allows on a violation of a MUST) on a bad
 * magic, unknown client flags, an option longer than MAX_OPTION_DATA, an unknown NBD_OPT_EXPORT_NAME
 * (which cannot be answered with an error), or more than MAX_OPTIONS options.
 */
import type { Socket } from 'node:net';
import * as P from './protocol.js';
import type { SocketReader } from './socket-reader.js';
import type { NbdExport } from './export.js';
import { acceptTls, type NbdTlsCredentials } from './tls.js';
import { decodeOptionHeader, encodeLengthPrefixed, encodeOptionReply, OPTION_HEADER_SIZE } from './wire.js';

export const MAX_OPTION_DATA = 64 * 1024;
const MAX_OPTIONS = 1024;
/** The one metadata context this server offers, and its id in BLOCK_STATUS replies. */
export const BASE_ALLOCATION_ID = 1;

export interface Negotiated {
  export: NbdExport;
  /** Whether the connection runs over TLS from here on. */
  tls: boolean;
  /** Who the client authenticated as over TLS (for the log). */
  peer?: string | undefined;
  structuredReplies: boolean;
  /** Clients that sent NBD_FLAG_C_NO_ZEROES. */
  noZeroes: boolean;
  baseAllocation: boolean;
}

export interface HandshakeContext {
  /** The connection; replaced by its TLS socket (and a reader over it) when the client starts TLS. */
  socket: Socket;
  reader: SocketReader;
  /** Credentials: the server is then TLS-only (FORCEDTLS). */
  tls?: NbdTlsCredentials | undefined;
  /** A reader over the TLS socket, made like the first one. */
  readerFor: (socket: Socket) => SocketReader;
  /** The export a name selects; the empty name selects the default export. */
  find: (name: string) => NbdExport | undefined;
  exports: readonly NbdExport[];
  blockSizes: { minimum: number; preferred: number; maximum: number };
  /** Transmission flags for an export, given whether structured replies were negotiated. */
  transmissionFlags: (exp: NbdExport) => number;
  shuttingDown: () => boolean;
}

export class HangUp extends Error {}

/** A cursor over an option's data that refuses to read past it. */
class OptionData {
  private at = 0;
  constructor(private readonly data: Buffer) {}
  get remaining(): number {
    return this.data.length - this.at;
  }
  u16(): number | undefined {
    if (this.remaining < 2) return undefined;
    this.at += 2;
    return this.data.readUInt16BE(this.at - 2);
  }
  u32(): number | undefined {
    if (this.remaining < 4) return undefined;
    this.at += 4;
    return this.data.readUInt32BE(this.at - 4);
  }
  string(): string | undefined {
    const length = this.u32();
    if (length === undefined || length > P.MAX_STRING || length > this.remaining) return undefined;
    this.at += length;
    return this.data.toString('utf8', this.at - length, this.at);
  }
}

function send(context: HandshakeContext, option: number, type: number, data?: Buffer): void {
  context.socket.write(encodeOptionReply({ option, type, length: data?.length ?? 0 }, data));
}

function sendError(context: HandshakeContext, option: number, type: number, message: string): void {
  send(context, option, type, Buffer.from(message, 'utf8'));
}

function exportInfo(context: HandshakeContext, exp: NbdExport): Buffer {
  const info = Buffer.allocUnsafe(12);
  info.writeUInt16BE(P.INFO_EXPORT, 0);
  info.writeBigUInt64BE(BigInt(exp.size), 2);
  info.writeUInt16BE(context.transmissionFlags(exp), 10);
  return info;
}

/** NBD_OPT_STARTTLS was acknowledged: hand the socket to TLS; the client must authenticate or is dropped. */
async function startTls(context: HandshakeContext, credentials: NbdTlsCredentials): Promise<string> {
  try {
    context.reader.detach();
  } catch (error) {
    throw new HangUp((error as Error).message);
  }
  const accepted = await acceptTls(context.socket, credentials).catch((error: unknown) => {
    throw new HangUp((error as Error).message);
  });
  context.socket = accepted.socket;
  context.reader = context.readerFor(accepted.socket);
  return accepted.peer;
}

/** Runs the negotiation; resolves when the client enters transmission, throws HangUp when it leaves. */
export async function negotiate(context: HandshakeContext): Promise<Negotiated> {
  const greeting = Buffer.allocUnsafe(18);
  greeting.writeBigUInt64BE(P.NBDMAGIC, 0);
  greeting.writeBigUInt64BE(P.IHAVEOPT, 8);
  greeting.writeUInt16BE(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES, 16);
  context.socket.write(greeting);
  const clientFlags = (await context.reader.read(4)).readUInt32BE(0);
  if ((clientFlags & ~(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)) !== 0) throw new HangUp(`unknown client flags 0x${clientFlags.toString(16)}`);
  const noZeroes = (clientFlags & P.FLAG_NO_ZEROES) !== 0;
  let structuredReplies = false;
  /** SET_META_CONTEXT's choice holds for the export it named only. */
  let contextFor: string | undefined;
  let tls = false;
  let peer: string | undefined;

  for (let count = 0; ; count += 1) {
    if (count >= MAX_OPTIONS) throw new HangUp(`more than ${MAX_OPTIONS} options`);
    const header = decodeOptionHeader(Buffer.from(await context.reader.read(OPTION_HEADER_SIZE)));
    if (typeof header === 'string') throw new HangUp(header);
    const { option, length } = header;
    if (length > MAX_OPTION_DATA) {
      sendError(context, option, P.REP_ERR_TOO_BIG, `option data of ${length} bytes is more than this server accepts`);
      throw new HangUp(`option ${option} with ${length} bytes of data`);
    }
    const raw = Buffer.from(await context.reader.read(length));
    const data = new OptionData(raw);
    const tlsRequired = context.tls !== undefined && !tls;

    if (option === P.OPT_EXPORT_NAME) {
      if (tlsRequired) throw new HangUp('NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS on a server that requires TLS');
      const exp = context.find(raw.toString('utf8'));
      if (!exp || context.shuttingDown()) throw new HangUp(`NBD_OPT_EXPORT_NAME for unknown export "${raw.toString('utf8')}"`);
      const reply = Buffer.alloc(noZeroes ? 10 : 134);
      reply.writeBigUInt64BE(BigInt(exp.size), 0);
      reply.writeUInt16BE(context.transmissionFlags(exp), 8);
      context.socket.write(reply);
      return { export: exp, tls, peer, structuredReplies, noZeroes, baseAllocation: structuredReplies && contextFor === exp.name };
    }
    if (option === P.OPT_ABORT) {
      send(context, option, P.REP_ACK);
      throw new HangUp('client aborted the negotiation');
    }
    if (context.shuttingDown()) {
      sendError(context, option, P.REP_ERR_SHUTDOWN, 'the server is shutting down');
      continue;
    }
    if (option === P.OPT_STARTTLS) {
      if (!context.tls) sendError(context, option, P.REP_ERR_UNSUP, 'this server does not offer TLS');
      else if (tls) sendError(context, option, P.REP_ERR_INVALID, 'TLS is already on');
      else if (length !== 0) sendError(context, option, P.REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
      else {
        send(context, option, P.REP_ACK);
        peer = await startTls(context, context.tls);
        tls = true;
      }
      continue;
    }
    if (tlsRequired) {
      sendError(context, option, P.REP_ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first');
      continue;
    }
    switch (option) {
      case P.OPT_LIST: {
        if (length !== 0) {
          sendError(context, option, P.REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
          break;
        }
        for (const exp of context.exports) {
          send(context, option, P.REP_SERVER, Buffer.concat([encodeLengthPrefixed(exp.name), Buffer.from(exp.description, 'utf8')]));
        }
        send(context, option, P.REP_ACK);
        break;
      }
      case P.OPT_STRUCTURED_REPLY: {
        if (length !== 0) sendError(context, option, P.REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        else {
          structuredReplies = true;
          send(context, option, P.REP_ACK);
        }
        break;
      }
      case P.OPT_LIST_META_CONTEXT:
      case P.OPT_SET_META_CONTEXT: {
        // SET_META_CONTEXT replaces the selection even when it fails (NBD protocol): nothing stays selected.
        if (option === P.OPT_SET_META_CONTEXT) contextFor = undefined;
        const name = data.string();
        const queryCount = data.u32();
        const queries: string[] = [];
        for (let i = 0; queryCount !== undefined && i < queryCount; i += 1) {
          const query = data.string();
          if (query === undefined) break;
          queries.push(query);
        }
        if (name === undefined || queryCount === undefined || queries.length !== queryCount || data.remaining !== 0) {
          sendError(context, option, P.REP_ERR_INVALID, 'malformed metadata context option');
          break;
        }
        if (!structuredReplies) {
          sendError(context, option, P.REP_ERR_INVALID, 'negotiate NBD_OPT_STRUCTURED_REPLY first');
          break;
        }
        const exp = context.find(name);
        if (!exp) {
          sendError(context, option, P.REP_ERR_UNKNOWN, `no export "${name}"`);
          break;
        }
        const listing = option === P.OPT_LIST_META_CONTEXT;
        const matches = listing
          ? queryCount === 0 || queries.some((q) => q === 'base:' || q === P.CONTEXT_BASE_ALLOCATION)
          : queries.includes(P.CONTEXT_BASE_ALLOCATION);
        if (matches) {
          const reply = Buffer.concat([Buffer.alloc(4), Buffer.from(P.CONTEXT_BASE_ALLOCATION, 'utf8')]);
          reply.writeUInt32BE(listing ? 0 : BASE_ALLOCATION_ID, 0);
          send(context, option, P.REP_META_CONTEXT, reply);
        }
        if (!listing) contextFor = matches ? exp.name : undefined;
        send(context, option, P.REP_ACK);
        break;
      }
      case P.OPT_INFO:
      case P.OPT_GO: {
        const name = data.string();
        const requestCount = data.u16();
        const requests: number[] = [];
        for (let i = 0; requestCount !== undefined && i < requestCount; i += 1) {
          const request = data.u16();
          if (request === undefined) break;
          requests.push(request);
        }
        if (name === undefined || requestCount === undefined || requests.length !== requestCount || data.remaining !== 0) {
          sendError(context, option, P.REP_ERR_INVALID, 'malformed NBD_OPT_INFO/NBD_OPT_GO');
          break;
        }
        const exp = context.find(name);
        if (!exp) {
          sendError(context, option, P.REP_ERR_UNKNOWN, `no export "${name}" (exports: ${context.exports.map((e) => e.name).join(', ')})`);
          break;
        }
        send(context, option, P.REP_INFO, exportInfo(context, exp));
        if (requests.includes(P.INFO_NAME)) {
          send(context, option, P.REP_INFO, Buffer.concat([Buffer.from([0, P.INFO_NAME]), Buffer.from(exp.name, 'utf8')]));
        }
        if (requests.includes(P.INFO_DESCRIPTION)) {
          send(context, option, P.REP_INFO, Buffer.concat([Buffer.from([0, P.INFO_DESCRIPTION]), Buffer.from(exp.description, 'utf8')]));
        }
        if (requests.includes(P.INFO_BLOCK_SIZE)) {
          const sizes = Buffer.allocUnsafe(14);
          sizes.writeUInt16BE(P.INFO_BLOCK_SIZE, 0);
          sizes.writeUInt32BE(context.blockSizes.minimum, 2);
          sizes.writeUInt32BE(context.blockSizes.preferred, 6);
          sizes.writeUInt32BE(context.blockSizes.maximum, 10);
          send(context, option, P.REP_INFO, sizes);
        }
        send(context, option, P.REP_ACK);
        if (option === P.OPT_GO) {
          return { export: exp, tls, peer, structuredReplies, noZeroes, baseAllocation: structuredReplies && contextFor === exp.name };
        }
        break;
      }
      default:
        sendError(context, option, P.REP_ERR_UNSUP, `option ${option} is not supported`);
    }
  }
}
