/**
 * A disk being downloaded through ovirt-imageio (an image transfer of a backup): a BlockSource over HTTP.
 * OPTIONS gives max_readers (that many keep-alive connections read ranges in parallel); GET with a Range
 * reads; /extents?context=zero gives the zero extents (read nothing there), ?context=dirty the blocks an
 * incremental must read. Dirty extents that are also zero are recorded as zero without being read.
 */
import { EngineError } from '../../repo-format/errors.js';
import { SourceChangedError, SourceUnreadableError } from '../errors.js';
import type { BlockSource, Extent, SourceDescription } from '../sources/source.js';
import { describeTlsError } from '../host/tls-errors.js';
import { answerText, downloadFailure, imageioAgent, imageioRequest, openImageio, type ImageioAgent, type ImageioUrls } from './imageio-connection.js';
import { decodeExtents, type ImageioExtent } from './imageio-json.js';

const REQUEST_SIZE = 4 * 1024 * 1024;


export class ImageioSource implements BlockSource {
  private constructor(
    private readonly url: URL,
    readonly size: number,
    readonly description: SourceDescription,
    readonly defaultName: string,
    private readonly agent: ImageioAgent,
    /** True when the host's transfer_url could not be reached and the engine's proxy_url serves the disk. */
    readonly viaProxy: boolean,
  ) {}

  /**
   * Opens a download: transfer_url, or proxy_url when the host cannot be reached (imageio-connection.ts);
   * OPTIONS gives max_readers (that many keep-alive connections) and must list the extents feature.
   */
  static async open(urls: ImageioUrls, size: number, options: { name: string; description: SourceDescription; ca?: Buffer | undefined }): Promise<ImageioSource> {
    const endpoint = await openImageio(urls, options.ca, downloadFailure);
    if (endpoint.allow.length > 0 && !endpoint.allow.includes('GET')) throw new SourceUnreadableError(endpoint.url.href, `the imageio ticket does not allow reading (Allow: ${endpoint.allow.join(',')})`);
    if (endpoint.allow.length > 0 && !endpoint.features.includes('extents')) throw new SourceUnreadableError(endpoint.url.href, 'imageio has no extents support (needed to skip zeros and read dirty blocks)');
    return new ImageioSource(endpoint.url, size, options.description, options.name, imageioAgent(endpoint.url, endpoint.maxReaders, options.ca), endpoint.viaProxy);
  }

  /**
   * One request. Every request here is idempotent (GET), so a connection the server closed while it sat
   * idle in the keep-alive pool ("socket hang up", ECONNRESET) is retried on a fresh one.
   */
  private async send(method: string, path: string, headers: Record<string, string>, limit?: number): Promise<{ status: number; body: Buffer }> {
    for (let attempt = 1; ; attempt += 1) {
      try {
        return await imageioRequest(this.url, this.agent, { method, path, headers, ...(limit === undefined ? {} : { limit }) });
      } catch (error) {
        const code = (error as NodeJS.ErrnoException).code;
        const stale = code === 'ECONNRESET' || code === 'EPIPE' || (error as Error).message === 'socket hang up';
        if (!stale || attempt >= 3) throw new SourceUnreadableError(this.url.href, describeTlsError(error as Error));
      }
    }
  }


  async read(target: Buffer, offset: number): Promise<void> {
    const reads: Promise<void>[] = [];
    for (let at = 0; at < target.length; at += REQUEST_SIZE) {
      const length = Math.min(REQUEST_SIZE, target.length - at);
      reads.push(
        (async () => {
          const start = offset + at;
          // An answer longer than the range (plus room for an error page) is not one to buffer.
          const answer = await this.send('GET', this.url.pathname, { Range: `bytes=${start}-${start + length - 1}` }, length + 64 * 1024);
          if (answer.status === 416) throw new SourceChangedError(this.url.href, `range ${start}+${length} lies past the end of the image`);
          if (answer.status !== 206 && answer.status !== 200) {
            // 403: the ticket is gone — the transfer was cancelled, by oVirt too when it sat idle longer than its inactivity timeout.
            const why = answer.status === 403 ? ' (the transfer\'s ticket is gone: cancelled, or idle past its inactivity timeout)' : '';
            throw new EngineError('ENGINE_SOURCE_UNREADABLE', `imageio GET ${this.url.pathname} bytes ${start}-${start + length - 1}: HTTP ${answer.status} ${answerText(answer.body)}${why}`, { status: answer.status });
          }
          if (answer.body.length !== length) throw new SourceChangedError(this.url.href, `asked ${length} bytes at ${start}, got ${answer.body.length}`);
          answer.body.copy(target, at);
        })(),
      );
    }
    await Promise.all(reads);
  }

  private async extentList(context: 'zero' | 'dirty'): Promise<ImageioExtent[]> {
    const answer = await this.send('GET', `${this.url.pathname}/extents?context=${context}`, {});
    if (answer.status !== 200) throw new SourceUnreadableError(this.url.href, `imageio extents?context=${context} answered HTTP ${answer.status}: ${answerText(answer.body)}`);
    const list = decodeExtents(answer.body, this.size);
    if (typeof list === 'string') throw new SourceUnreadableError(this.url.href, `imageio ${context} extents: ${list}`);
    return list;
  }

  extents(): AsyncIterable<Extent> {
    // Fetched when the iteration starts, not before: an unread disk must not leave a rejected promise behind.
    const list = (): Promise<ImageioExtent[]> => this.extentList('zero');
    return (async function* () {
      for (const e of await list()) yield { offset: e.start, length: e.length, zero: e.zero === true };
    })();
  }

  /** Dirty extents of an incremental backup disk (dirty and zero ones included: the zero map skips their read). */
  dirtyExtents(): AsyncIterable<{ offset: number; length: number }> {
    const list = (): Promise<ImageioExtent[]> => this.extentList('dirty');
    return (async function* () {
      for (const e of await list()) if (e.dirty) yield { offset: e.start, length: e.length };
    })();
  }

  async close(): Promise<void> {
    this.agent.destroy();
  }


  async dispose(): Promise<void> {
    this.agent.destroy();
  }
}
