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
import { CLIENT_FLAGS_SIZE, decodeClientFlags, decodeOptionHeader, encodeGreeting, encodeOptionReply, OPTION_HEADER_SIZE } from './wire.js';
import {
  decodeInfoOption,
  decodeMetaContextOption,
  encodeExportNameReply,
  encodeInfoReply,
  encodeMetaContextReply,
  encodeServerReply,
  type InfoReply,
} from './wire-options.js';

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

/** What the negotiation has settled so far. */
interface NegotiationState {
  /** The client sent NBD_FLAG_C_NO_ZEROES. */
  noZeroes: boolean;
  structuredReplies: boolean;
  /** SET_META_CONTEXT's choice holds for the export it named only. */
  contextFor: string | undefined;
  tls: boolean;
  peer: string | undefined;
}

/** An option as received: its header and its data (at most MAX_OPTION_DATA bytes). */
interface ReceivedOption {
  option: number;
  data: Buffer;
}

function send(context: HandshakeContext, option: number, type: number, data?: Buffer): void {
  context.socket.write(encodeOptionReply({ option, type, length: data?.length ?? 0 }, data));
}

function sendError(context: HandshakeContext, option: number, type: number, message: string): void {
  send(context, option, type, Buffer.from(message, 'utf8'));
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

/** The client enters transmission with `exp`: what was negotiated for it. */
function entered(state: NegotiationState, exp: NbdExport): Negotiated {
  const { tls, peer, structuredReplies, noZeroes } = state;
  return { export: exp, tls, peer, structuredReplies, noZeroes, baseAllocation: structuredReplies && state.contextFor === exp.name };
}

/** Runs the negotiation; resolves when the client enters transmission, throws HangUp when it leaves. */
export async function negotiate(context: HandshakeContext): Promise<Negotiated> {
  const state = await greet(context);
  for (let count = 0; ; count += 1) {
    if (count >= MAX_OPTIONS) throw new HangUp(`more than ${MAX_OPTIONS} options`);
    const received = await receiveOption(context);
    const negotiated = await answerOption(context, state, received);
    if (negotiated) return negotiated;
  }
}

/** The greeting, and the client's flags in return. */
async function greet(context: HandshakeContext): Promise<NegotiationState> {
  context.socket.write(encodeGreeting({ flags: P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES }));
  const clientFlags = decodeClientFlags(await context.reader.read(CLIENT_FLAGS_SIZE));
  if (typeof clientFlags === 'string') throw new HangUp(clientFlags);
  if ((clientFlags & ~(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)) !== 0) throw new HangUp(`unknown client flags 0x${clientFlags.toString(16)}`);
  return { noZeroes: (clientFlags & P.FLAG_NO_ZEROES) !== 0, structuredReplies: false, contextFor: undefined, tls: false, peer: undefined };
}

/** The next option's header and data; data longer than MAX_OPTION_DATA is refused unread (a hang-up). */
async function receiveOption(context: HandshakeContext): Promise<ReceivedOption> {
  const header = decodeOptionHeader(Buffer.from(await context.reader.read(OPTION_HEADER_SIZE)));
  if (typeof header === 'string') throw new HangUp(header);
  const { option, length } = header;
  if (length > MAX_OPTION_DATA) {
    sendError(context, option, P.REP_ERR_TOO_BIG, `option data of ${length} bytes is more than this server accepts`);
    throw new HangUp(`option ${option} with ${length} bytes of data`);
  }
  return { option, data: Buffer.from(await context.reader.read(length)) };
}

/**
 * Answers one option. Resolves with what was negotiated when the client enters transmission (NBD_OPT_GO,
 * NBD_OPT_EXPORT_NAME), undefined when the negotiation goes on.
 */
async function answerOption(context: HandshakeContext, state: NegotiationState, received: ReceivedOption): Promise<Negotiated | undefined> {
  const { option } = received;
  if (option === P.OPT_EXPORT_NAME) return enterByExportName(context, state, received.data);
  if (option === P.OPT_ABORT) {
    send(context, option, P.REP_ACK);
    throw new HangUp('client aborted the negotiation');
  }
  if (context.shuttingDown()) {
    sendError(context, option, P.REP_ERR_SHUTDOWN, 'the server is shutting down');
  } else if (option === P.OPT_STARTTLS) {
    await answerStartTls(context, state, received);
  } else if (context.tls !== undefined && !state.tls) {
    sendError(context, option, P.REP_ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first');
  } else if (option === P.OPT_LIST) {
    answerList(context, received);
  } else if (option === P.OPT_STRUCTURED_REPLY) {
    answerStructuredReply(context, state, received);
  } else if (option === P.OPT_LIST_META_CONTEXT || option === P.OPT_SET_META_CONTEXT) {
    answerMetaContext(context, state, received);
  } else if (option === P.OPT_INFO || option === P.OPT_GO) {
    return answerInfo(context, state, received);
  } else {
    sendError(context, option, P.REP_ERR_UNSUP, `option ${option} is not supported`);
  }
  return undefined;
}

/** NBD_OPT_EXPORT_NAME: enters transmission at once; it has no error reply, so an unknown name is a hang-up. */
function enterByExportName(context: HandshakeContext, state: NegotiationState, data: Buffer): Negotiated {
  if (context.tls !== undefined && !state.tls) throw new HangUp('NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS on a server that requires TLS');
  const name = data.toString('utf8');
  const exp = context.find(name);
  if (!exp || context.shuttingDown()) throw new HangUp(`NBD_OPT_EXPORT_NAME for unknown export "${name}"`);
  context.socket.write(encodeExportNameReply({ size: exp.size, flags: context.transmissionFlags(exp) }, state.noZeroes));
  return entered(state, exp);
}

/** NBD_OPT_STARTTLS: acknowledged only on a TLS server, once, without data; then the TLS handshake. */
async function answerStartTls(context: HandshakeContext, state: NegotiationState, { option, data }: ReceivedOption): Promise<void> {
  if (!context.tls) sendError(context, option, P.REP_ERR_UNSUP, 'this server does not offer TLS');
  else if (state.tls) sendError(context, option, P.REP_ERR_INVALID, 'TLS is already on');
  else if (data.length !== 0) sendError(context, option, P.REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
  else {
    send(context, option, P.REP_ACK);
    state.peer = await startTls(context, context.tls);
    state.tls = true;
  }
}

function answerList(context: HandshakeContext, { option, data }: ReceivedOption): void {
  if (data.length !== 0) {
    sendError(context, option, P.REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
    return;
  }
  for (const exp of context.exports) send(context, option, P.REP_SERVER, encodeServerReply({ name: exp.name, description: exp.description }));
  send(context, option, P.REP_ACK);
}

function answerStructuredReply(context: HandshakeContext, state: NegotiationState, { option, data }: ReceivedOption): void {
  if (data.length !== 0) {
    sendError(context, option, P.REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
    return;
  }
  state.structuredReplies = true;
  send(context, option, P.REP_ACK);
}

/**
 * NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT: base:allocation is the one context offered.
 * SET_META_CONTEXT replaces the selection even when it fails (NBD protocol): nothing stays selected.
 */
function answerMetaContext(context: HandshakeContext, state: NegotiationState, { option, data }: ReceivedOption): void {
  const listing = option === P.OPT_LIST_META_CONTEXT;
  if (!listing) state.contextFor = undefined;
  const request = decodeMetaContextOption(data);
  if (typeof request === 'string') return sendError(context, option, P.REP_ERR_INVALID, request);
  if (!state.structuredReplies) return sendError(context, option, P.REP_ERR_INVALID, 'negotiate NBD_OPT_STRUCTURED_REPLY first');
  const exp = context.find(request.exportName);
  if (!exp) return sendError(context, option, P.REP_ERR_UNKNOWN, `no export "${request.exportName}"`);
  const { queries } = request;
  const matches = listing ? queries.length === 0 || queries.some((q) => q === 'base:' || q === P.CONTEXT_BASE_ALLOCATION) : queries.includes(P.CONTEXT_BASE_ALLOCATION);
  if (matches) send(context, option, P.REP_META_CONTEXT, encodeMetaContextReply({ id: listing ? 0 : BASE_ALLOCATION_ID, name: P.CONTEXT_BASE_ALLOCATION }));
  if (!listing) state.contextFor = matches ? exp.name : undefined;
  send(context, option, P.REP_ACK);
}

/** NBD_OPT_INFO and NBD_OPT_GO: the export's size and flags, and what else the client asked for; GO enters transmission. */
function answerInfo(context: HandshakeContext, state: NegotiationState, { option, data }: ReceivedOption): Negotiated | undefined {
  const request = decodeInfoOption(data);
  if (typeof request === 'string') {
    sendError(context, option, P.REP_ERR_INVALID, request);
    return undefined;
  }
  const exp = context.find(request.exportName);
  if (!exp) {
    sendError(context, option, P.REP_ERR_UNKNOWN, `no export "${request.exportName}" (exports: ${context.exports.map((e) => e.name).join(', ')})`);
    return undefined;
  }
  const { requests } = request;
  const { minimum, preferred, maximum } = context.blockSizes;
  const replies: InfoReply[] = [
    { kind: 'export', size: exp.size, flags: context.transmissionFlags(exp) },
    ...(requests.includes(P.INFO_NAME) ? [{ kind: 'name', name: exp.name } as const] : []),
    ...(requests.includes(P.INFO_DESCRIPTION) ? [{ kind: 'description', description: exp.description } as const] : []),
    ...(requests.includes(P.INFO_BLOCK_SIZE) ? [{ kind: 'block-size', minimum, preferred, maximum } as const] : []),
  ];
  for (const reply of replies) send(context, option, P.REP_INFO, encodeInfoReply(reply));
  send(context, option, P.REP_ACK);
  return option === P.OPT_GO ? entered(state, exp) : undefined;
}
