/**
 * A disk being downloaded through ovirt-imageio (an image transfer of a backup): a BlockSource over HTTP.
 * OPTIONS gives max_readers (that many keep-alive connections read ranges in parallel); GET with a Range
 * reads; /extents?context=zero gives the zero extents (read nothing there), ?context=dirty the blocks an
 * incremental must read. Dirty extents that are also zero are recorded as zero without being read.
 */
import { Agent as HttpAgent, request as httpRequest } from 'node:http';
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https';
import { EngineError } from '../../repo-format/errors.js';
import { SourceChangedError, SourceUnreadableError } from '../errors.js';
import type { BlockSource, Extent, SourceDescription } from '../sources/source.js';
import { describeTlsError } from '../tls-errors.js';
import { collectBody, HTTP_BODY_LIMIT } from '../http-body.js';

const REQUEST_SIZE = 4 * 1024 * 1024;

interface ImageioExtent {
  start: number;
  length: number;
  zero?: boolean;
  dirty?: boolean;
}

export class ImageioSource implements BlockSource {
  private constructor(
    private readonly url: URL,
    readonly size: number,
    readonly description: SourceDescription,
    readonly defaultName: string,
    private readonly agent: HttpAgent | HttpsAgent,
    private readonly ca: Buffer | undefined,
  ) {}

  static async open(transferUrl: string, size: number, options: { name: string; description: SourceDescription; ca?: Buffer | undefined }): Promise<ImageioSource> {
    const url = new URL(transferUrl);
    const probe = url.protocol === 'https:' ? new HttpsAgent({ keepAlive: true, ca: options.ca }) : new HttpAgent({ keepAlive: true });
    const source = new ImageioSource(url, size, options.description, options.name, probe, options.ca);
    const answer = await source.send('OPTIONS', url.pathname, {});
    let maxReaders = 1;
    if (answer.status === 200) {
      const features = JSON.parse(answer.body.toString('utf8')) as { max_readers?: number; features?: string[] };
      maxReaders = Math.max(1, Math.min(8, features.max_readers ?? 1));
      if (!features.features?.includes('extents')) throw new SourceUnreadableError(transferUrl, 'imageio has no extents support (needed to skip zeros and read dirty blocks)');
    } else if (answer.status !== 405 && answer.status !== 204) {
      throw new SourceUnreadableError(transferUrl, `imageio OPTIONS answered HTTP ${answer.status}`);
    }
    probe.destroy();
    const agent = url.protocol === 'https:' ? new HttpsAgent({ keepAlive: true, maxSockets: maxReaders, ca: options.ca }) : new HttpAgent({ keepAlive: true, maxSockets: maxReaders });
    return new ImageioSource(url, size, options.description, options.name, agent, options.ca);
  }

  /**
   * One request. Every request here is idempotent (OPTIONS, GET), so a connection the server closed while
   * it sat idle in the keep-alive pool ("socket hang up", ECONNRESET) is retried on a fresh one.
   */
  private async send(method: string, path: string, headers: Record<string, string>, limit?: number): Promise<{ status: number; body: Buffer }> {
    for (let attempt = 1; ; attempt += 1) {
      try {
        return await this.sendOnce(method, path, headers, limit);
      } catch (error) {
        const code = (error as NodeJS.ErrnoException).code;
        const stale = code === 'ECONNRESET' || code === 'EPIPE' || (error as Error).message === 'socket hang up';
        if (!stale || attempt >= 3) throw new SourceUnreadableError(this.url.href, describeTlsError(error as Error));
      }
    }
  }

  /** `limit`: the most bytes the answer may hold (a range read: the range; an extent list: HTTP_BODY_LIMIT). */
  private sendOnce(method: string, path: string, headers: Record<string, string>, limit = HTTP_BODY_LIMIT): Promise<{ status: number; body: Buffer }> {
    const requester = this.url.protocol === 'https:' ? httpsRequest : httpRequest;
    return new Promise((resolve, reject) => {
      const req = requester({ protocol: this.url.protocol, host: this.url.hostname, port: this.url.port, path, method, headers, agent: this.agent, ca: this.ca, timeout: 120_000 }, (res) => {
        collectBody(res, limit, (body) => resolve({ status: res.statusCode ?? 0, body }), reject);
      });
      req.on('timeout', () => req.destroy(new Error(`imageio ${method} ${path} timed out`)));
      req.on('error', reject);
      req.end();
    });
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
            throw new EngineError('ENGINE_SOURCE_UNREADABLE', `imageio GET ${this.url.pathname} bytes ${start}-${start + length - 1}: HTTP ${answer.status} ${answer.body.toString('utf8').slice(0, 200)}`, { status: answer.status });
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
    if (answer.status !== 200) throw new SourceUnreadableError(this.url.href, `imageio extents?context=${context} answered HTTP ${answer.status}: ${answer.body.toString('utf8').slice(0, 200)}`);
    const list = JSON.parse(answer.body.toString('utf8')) as ImageioExtent[];
    let at = 0;
    for (const e of list) {
      if (e.start !== at || !(e.length > 0)) throw new SourceUnreadableError(this.url.href, `imageio ${context} extents are not contiguous at ${at}`);
      at += e.length;
    }
    if (at !== this.size) throw new SourceUnreadableError(this.url.href, `imageio ${context} extents cover ${at} of ${this.size} bytes`);
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
