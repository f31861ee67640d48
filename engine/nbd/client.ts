/**
 * An NBD client over one or more connections (several when the server advertises CAN_MULTI_CONN).
 * Reads are split into requests of at most `requestSize` (256 KiB by default: measured against qemu-nbd,
 * 64–256 KiB requests with many in flight beat 1–4 MiB ones) and spread over the connections.
 */
import { NbdConnectError, NbdProtocolError } from '../errors.js';
import { NbdConnection, type BlockStatusExtent, type ExportInfo } from './connection.js';
import * as P from './protocol.js';
import { loadTlsCredentials, type NbdClientTls } from './tls.js';
import { parseNbdUri, type NbdUri } from './uri.js';

export interface NbdClientOptions {
  /** Metadata contexts to negotiate; those in `require` must be granted. */
  metaContexts?: string[];
  require?: string[];
  connections?: number;
  requestSize?: number;
  timeoutMs?: number;
}

/**
 * The credentials of an nbds:// URI, loaded once for every connection: from its files, or (neither given)
 * the system's CAs and no client certificate.
 */
async function clientTls(uri: NbdUri): Promise<NbdClientTls | undefined> {
  if (!uri.tls) return undefined;
  const { certificates, pskFile, username, hostname } = uri.tls;
  if (certificates === undefined && pskFile === undefined) return { credentials: { kind: 'system', source: 'the system CAs' }, hostname };
  return { credentials: await loadTlsCredentials({ certificates, pskFile }, 'client'), username, hostname };
}

/**
 * Largest BLOCK_STATUS request: servers answer big ranges in one go, but lengths are u32. 4 GiB less 1 MiB
 * (aligned for any server's block size). Measured walking a 16 TiB thin qcow2 through qemu-nbd (load ~30):
 * 1 GiB spans one at a time took ~5 s per walk (16,384 round trips).
 */
const BLOCK_STATUS_SPAN = 2 ** 32 - 2 ** 20;
/** BLOCK_STATUS requests in flight at once while walking a range (spread over the connections). */
const BLOCK_STATUS_AHEAD = 8;

/** A span of a block status walk, asked ahead. */
interface AskedSpan {
  start: number;
  end: number;
  reply: Promise<BlockStatusExtent[]>;
}

export class NbdClient {
  private constructor(
    readonly uri: NbdUri,
    private readonly connections: NbdConnection[],
    readonly requestSize: number,
  ) {}

  static async connect(uri: string | NbdUri, options: NbdClientOptions = {}): Promise<NbdClient> {
    const parsed = typeof uri === 'string' ? parseNbdUri(uri) : uri;
    const tls = await clientTls(parsed);
    const connect = (): Promise<NbdConnection> => NbdConnection.connect(parsed, { metaContexts: options.metaContexts ?? [], timeoutMs: options.timeoutMs, tls });
    const first = await connect();
    const connections = [first];
    try {
      for (const wanted of options.require ?? []) {
        if (!first.info.contexts.has(wanted)) throw new NbdConnectError(parsed.text, `the export has no metadata context ${wanted}`);
      }
      const wantedConnections = (first.info.flags & P.TFLAG_CAN_MULTI_CONN) !== 0 ? (options.connections ?? 4) : 1;
      while (connections.length < wantedConnections) connections.push(await connect());
    } catch (error) {
      await Promise.allSettled(connections.map((c) => c.close()));
      throw error;
    }
    const requestSize = Math.max(first.info.minBlockSize, Math.min(options.requestSize ?? 256 * 1024, first.info.maxBlockSize));
    return new NbdClient(parsed, connections, requestSize);
  }

  get info(): ExportInfo {
    return this.connections[0]!.info;
  }

  get size(): number {
    return this.info.size;
  }

  get connectionCount(): number {
    return this.connections.length;
  }

  hasContext(name: string): boolean {
    return this.info.contexts.has(name);
  }

  /** The connection with the fewest requests in flight. */
  private pick(): NbdConnection {
    let best = this.connections[0]!;
    for (const connection of this.connections) if (connection.inFlight < best.inFlight) best = connection;
    return best;
  }

  async read(target: Buffer, offset: number): Promise<void> {
    await this.readv([target], offset);
  }

  /**
   * Fills `targets` one after another from `offset` on: every request of the run is sent at once, in order
   * of offset, so the server (and the storage under it) sees one reader going forward.
   */
  async readv(targets: readonly Buffer[], offset: number): Promise<void> {
    const requests: Promise<void>[] = [];
    let base = offset;
    for (const target of targets) {
      for (let at = 0; at < target.length; at += this.requestSize) {
        const length = Math.min(this.requestSize, target.length - at);
        requests.push(this.pick().read(target.subarray(at, at + length), base + at));
      }
      base += target.length;
    }
    await Promise.all(requests);
  }

  async write(data: Buffer, offset: number): Promise<void> {
    const requests: Promise<void>[] = [];
    for (let at = 0; at < data.length; at += this.requestSize) {
      const length = Math.min(this.requestSize, data.length - at);
      requests.push(this.pick().write(data.subarray(at, at + length), offset + at));
    }
    await Promise.all(requests);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    await this.pick().writeZeroes(offset, length);
  }

  async trim(offset: number, length: number): Promise<void> {
    await this.pick().trim(offset, length);
  }

  /**
   * FLUSH on every connection: with multi-conn, a flush covers the writes that completed before it. An
   * export without NBD_FLAG_SEND_FLUSH must not be sent one (the protocol forbids it; nbdkit answers
   * EINVAL): its writes are as stable when answered as that server makes them, and nothing more can be
   * asked of it.
   */
  async flush(): Promise<void> {
    if ((this.info.flags & P.TFLAG_SEND_FLUSH) === 0) return;
    await Promise.all(this.connections.map((c) => c.flush()));
  }

  /**
   * The extents of a metadata context over [offset, offset + length), in order, exactly covering the
   * range (the last extent is cut at the end). Adjacent extents with the same flags are merged, so the
   * request spans the client uses never show.
   */
  async *blockStatus(context: string, offset = 0, length = this.size - offset): AsyncGenerator<BlockStatusExtent> {
    const end = offset + length;
    const ask = (start: number, stop: number): AskedSpan => {
      const reply = this.pick().blockStatus(context, start, stop - start);
      // A span asked ahead and never reached (the walk stopped early) must not become an unhandled rejection.
      reply.catch(() => undefined);
      return { start, end: stop, reply };
    };
    // Spans asked ahead, in order: the walk waits for one round trip per BLOCK_STATUS_AHEAD spans, not per span.
    const ahead: AskedSpan[] = [];
    let next = offset;
    let at = offset;
    let held: BlockStatusExtent | undefined;
    while (at < end) {
      while (ahead.length < BLOCK_STATUS_AHEAD && next < end) {
        const stop = Math.min(next + BLOCK_STATUS_SPAN, end);
        ahead.push(ask(next, stop));
        next = stop;
      }
      const span = ahead.shift()!;
      // An extent of an earlier reply ran past this span (a server may describe more than was asked).
      if (span.end <= at) continue;
      const from = at;
      for (const extent of await span.reply) {
        const extentEnd = Math.min(extent.offset + extent.length, end);
        if (extentEnd <= at) continue;
        const cut = extentEnd - at;
        if (held && held.flags === extent.flags && held.offset + held.length === at) {
          held.length += cut;
        } else {
          if (held) yield held;
          held = { offset: at, length: cut, flags: extent.flags };
        }
        at = extentEnd;
        if (at >= end) break;
      }
      // A server may answer only the start of a span: the rest is asked before the spans after it.
      if (at === from) throw new NbdProtocolError(this.uri.text, `BLOCK_STATUS ${context} at offset ${at} described no bytes`);
      if (at < span.end) ahead.unshift(ask(at, span.end));
    }
    if (held) yield held;
  }

  /** Clean disconnect of every connection, after the requests in flight. */
  async close(): Promise<void> {
    await Promise.allSettled(this.connections.map((c) => c.close()));
  }

  /** Every connection released at once: requests in flight fail rather than being waited for (NbdConnection.dispose). */
  async dispose(): Promise<void> {
    await Promise.allSettled(this.connections.map((c) => c.dispose()));
  }
}
