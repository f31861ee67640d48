/**
 * The client side of fixed newstyle negotiation (NBD protocol, "Handshake"), in the order it runs:
 * the greeting and our flags → NBD_OPT_STARTTLS and the TLS handshake (nbds:// only) → structured replies
 * (needed for block status and for holes in reads) → the metadata contexts asked for (contexts the server
 * does not have are simply absent from the result) → NBD_OPT_GO with block size information.
 *
 * For an nbds:// URI, NBD_OPT_STARTTLS is the first option (the protocol's advice against downgrades) and
 * a server that does not acknowledge it is refused: nothing is sent in clear. Every message is read through
 * the wire.ts / wire-options.ts decoders; what the server gets wrong is an NbdProtocolError, what it refuses
 * an NbdConnectError, both naming the URI.
 */
import type { Socket } from 'node:net';
import { displayText } from '../../repo-format/display-text.js';
import { EngineError } from '../../repo-format/errors.js';
import { NbdConnectError, NbdProtocolError } from '../errors.js';
import * as P from './protocol.js';
import { SocketReader } from './socket-reader.js';
import { startTls, type NbdClientTls } from './tls.js';
import type { NbdUri } from './uri.js';
import { decodeGreeting, decodeOptionReplyHeader, encodeClientFlags, encodeOptionHeader, GREETING_SIZE, OPTION_REPLY_HEADER_SIZE } from './wire.js';
import { decodeInfoReply, decodeMetaContextReply, encodeInfoOption, encodeMetaContextOption } from './wire-options.js';

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

/** The socket and its reader; both replaced when the connection switches to TLS. */
export interface Link {
  socket: Socket;
  reader: SocketReader;
}

/** The most of a server's error text an error message carries. */
export const MESSAGE_CHARACTERS = 512;

interface OptionReply {
  type: number;
  data: Buffer;
}

/** A reader whose end (a close, a reset) is an NbdProtocolError naming the URI, never a bare errno. */
export function readerFor(uri: NbdUri, socket: Socket): SocketReader {
  return new SocketReader(socket, (cause) => {
    if (!cause) return new NbdProtocolError(uri.text, 'the server closed the connection');
    return new NbdProtocolError(uri.text, `the connection was lost (${(cause as NodeJS.ErrnoException).code ?? cause.message})`);
  });
}

/** Negotiates on a fresh connection; resolves with what transmission needs to know about the export. */
export async function handshake(uri: NbdUri, link: Link, metaContexts: string[], tls: NbdClientTls | undefined): Promise<ExportInfo> {
  await greet(uri, link);
  if (tls) await upgrade(uri, link, tls);
  const structuredReplies = await askStructuredReplies(uri, link, tls);
  // Metadata contexts need structured replies (block status has no simple reply).
  const contexts = structuredReplies && metaContexts.length > 0 ? await setMetaContexts(uri, link, metaContexts) : new Map<string, number>();
  return go(uri, link, contexts, structuredReplies);
}

/** The server's greeting (fixed newstyle only), and our flags in return. */
async function greet(uri: NbdUri, link: Link): Promise<void> {
  const greeting = decodeGreeting(await link.reader.read(GREETING_SIZE));
  if (typeof greeting === 'string') throw new NbdConnectError(uri.text, greeting);
  if ((greeting.flags & P.FLAG_FIXED_NEWSTYLE) === 0) throw new NbdConnectError(uri.text, 'the server does not support fixed newstyle negotiation');
  link.socket.write(encodeClientFlags(P.FLAG_FIXED_NEWSTYLE | (greeting.flags & P.FLAG_NO_ZEROES)));
}

function sendOption(link: Link, option: number, data: Buffer = Buffer.alloc(0)): void {
  link.socket.write(Buffer.concat([encodeOptionHeader({ option, length: data.length }), data]));
}

/** The next reply, which must answer `option`; its data bounded by MAX_OPTION_REPLY before it is read. */
async function optionReply(uri: NbdUri, reader: SocketReader, option: number): Promise<OptionReply> {
  const header = decodeOptionReplyHeader(await reader.read(OPTION_REPLY_HEADER_SIZE));
  if (typeof header === 'string') throw new NbdProtocolError(uri.text, header);
  if (header.option !== option) throw new NbdProtocolError(uri.text, `reply to option ${header.option}, expected ${option}`);
  if (header.length > P.MAX_OPTION_REPLY) throw new NbdProtocolError(uri.text, `option reply of ${header.length} bytes`);
  return { type: header.type, data: Buffer.from(await reader.read(header.length)) };
}

function isError(reply: OptionReply): boolean {
  return (reply.type & P.REP_ERROR_BIT) !== 0;
}

/** An error reply in words: its name and the server's text, escaped (it is the server's, not ours). */
function replyError(reply: OptionReply): string {
  const name = P.REP_ERRORS[reply.type] ?? `option error 0x${reply.type.toString(16)}`;
  return reply.data.length > 0 ? `${name}: ${displayText(reply.data.toString('utf8'), MESSAGE_CHARACTERS)}` : name;
}

/**
 * NBD_OPT_STARTTLS, then the TLS handshake over the same socket: the server must acknowledge, or the
 * connection ends (an nbds:// URI means TLS or nothing: the protocol's "downgrade attacks").
 */
async function upgrade(uri: NbdUri, link: Link, tls: NbdClientTls): Promise<void> {
  sendOption(link, P.OPT_STARTTLS);
  const reply = await optionReply(uri, link.reader, P.OPT_STARTTLS);
  if (reply.type !== P.REP_ACK) {
    throw new NbdConnectError(uri.text, `the server does not offer TLS (${replyError(reply)}); an nbds:// URI never falls back to plain text`);
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

/** NBD_OPT_STRUCTURED_REPLY: whether the server gives them (a refusal is no error: simple replies then). */
async function askStructuredReplies(uri: NbdUri, link: Link, tls: NbdClientTls | undefined): Promise<boolean> {
  sendOption(link, P.OPT_STRUCTURED_REPLY);
  const reply = await optionReply(uri, link.reader, P.OPT_STRUCTURED_REPLY).catch((error: unknown) => {
    // With TLS 1.3 a server checks our certificate after we think the handshake is done: its refusal is a close.
    if (tls && error instanceof NbdProtocolError) throw new NbdConnectError(uri.text, `the server ended the connection right after the TLS handshake: it does not accept our credentials (${tls.credentials.source})`);
    throw error;
  });
  if (reply.type === P.REP_ERR_TLS_REQD) throw new NbdConnectError(uri.text, 'the server requires TLS: connect with an nbds:// URI and its credentials (tls-certificates=DIR or tls-psk-file=FILE)');
  if (reply.type !== P.REP_ACK && !isError(reply)) throw new NbdProtocolError(uri.text, `unexpected reply ${reply.type} to STRUCTURED_REPLY`);
  return reply.type === P.REP_ACK;
}

/** NBD_OPT_SET_META_CONTEXT: the contexts the server grants, name → id. */
async function setMetaContexts(uri: NbdUri, link: Link, metaContexts: string[]): Promise<Map<string, number>> {
  sendOption(link, P.OPT_SET_META_CONTEXT, encodeMetaContextOption({ exportName: uri.exportName, queries: metaContexts }));
  const contexts = new Map<string, number>();
  for (;;) {
    const reply = await optionReply(uri, link.reader, P.OPT_SET_META_CONTEXT);
    if (reply.type === P.REP_ACK) return contexts;
    if (isError(reply)) throw new NbdConnectError(uri.text, `SET_META_CONTEXT refused: ${replyError(reply)}`);
    if (reply.type !== P.REP_META_CONTEXT) throw new NbdProtocolError(uri.text, `unexpected reply ${reply.type} to SET_META_CONTEXT`);
    const granted = decodeMetaContextReply(reply.data);
    if (typeof granted === 'string') throw new NbdProtocolError(uri.text, granted);
    contexts.set(granted.name, granted.id);
  }
}

/** NBD_OPT_GO, asking for block size constraints as well as size and flags. */
async function go(uri: NbdUri, link: Link, contexts: Map<string, number>, structuredReplies: boolean): Promise<ExportInfo> {
  sendOption(link, P.OPT_GO, encodeInfoOption({ exportName: uri.exportName, requests: [P.INFO_BLOCK_SIZE] }));
  const info: ExportInfo = { size: -1, flags: 0, minBlockSize: 1, preferredBlockSize: 4096, maxBlockSize: 32 * 1024 * 1024, contexts, structuredReplies };
  for (;;) {
    const reply = await optionReply(uri, link.reader, P.OPT_GO);
    if (reply.type === P.REP_ACK) break;
    if (isError(reply)) throw new NbdConnectError(uri.text, `export "${uri.exportName}" refused: ${replyError(reply)}`);
    if (reply.type !== P.REP_INFO) throw new NbdProtocolError(uri.text, `unexpected reply ${reply.type} to GO`);
    const item = decodeInfoReply(reply.data);
    if (typeof item === 'string') throw new NbdProtocolError(uri.text, item);
    if (item.kind === 'export') {
      info.size = item.size;
      info.flags = item.flags;
    } else if (item.kind === 'block-size') {
      info.minBlockSize = item.minimum;
      info.preferredBlockSize = item.preferred;
      info.maxBlockSize = item.maximum;
    }
  }
  if (info.size < 0) throw new NbdProtocolError(uri.text, 'the server finished GO without sending the export size');
  return info;
}
