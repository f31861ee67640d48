/**
 * An upload image transfer as a restore target: PUT with a Content-Range per chunk (`flush=n`: one flush
 * at the end), PATCH {"op": "flush"} before the restore is reported done. A new disk reads as zeros, so
 * zero blocks are skipped.
 */
import { Agent as HttpAgent, request as httpRequest } from 'node:http';
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https';
import { TargetUnwritableError } from '../errors.js';
import type { RestoreTarget } from '../restore/file-target.js';
import { describeTlsError } from '../tls-errors.js';

export class ImageioTarget implements RestoreTarget {
  readonly zeroed = true;
  private readonly agent: HttpAgent | HttpsAgent;

  constructor(
    private readonly url: URL,
    private readonly ca?: Buffer,
  ) {
    this.agent = url.protocol === 'https:' ? new HttpsAgent({ keepAlive: true, maxSockets: 4, ca }) : new HttpAgent({ keepAlive: true, maxSockets: 4 });
  }

  get path(): string {
    return this.url.href;
  }

  private send(method: string, query: string, headers: Record<string, string>, body: Buffer): Promise<number> {
    const requester = this.url.protocol === 'https:' ? httpsRequest : httpRequest;
    return new Promise((resolve, reject) => {
      const req = requester(
        { protocol: this.url.protocol, host: this.url.hostname, port: this.url.port, path: `${this.url.pathname}${query}`, method, headers: { ...headers, 'Content-Length': String(body.length) }, agent: this.agent, ca: this.ca, timeout: 120_000 },
        (res) => {
          res.resume();
          res.on('end', () => resolve(res.statusCode ?? 0));
          res.on('error', reject);
        },
      );
      req.on('timeout', () => req.destroy(new Error(`imageio ${method} timed out`)));
      req.on('error', (error) => reject(new TargetUnwritableError(this.url.href, describeTlsError(error))));
      req.end(body);
    });
  }

  async write(data: Buffer, offset: number): Promise<void> {
    const status = await this.send('PUT', '?flush=n', { 'Content-Range': `bytes ${offset}-${offset + data.length - 1}/*`, 'Content-Type': 'application/octet-stream' }, data);
    if (status !== 200 && status !== 204) throw new TargetUnwritableError(this.url.href, `imageio PUT at ${offset} answered HTTP ${status}`);
  }

  async finish(): Promise<void> {
    const status = await this.send('PATCH', '', { 'Content-Type': 'application/json' }, Buffer.from(JSON.stringify({ op: 'flush' })));
    this.agent.destroy();
    if (status !== 200 && status !== 204) throw new TargetUnwritableError(this.url.href, `imageio flush answered HTTP ${status}`);
  }

  async discard(): Promise<void> {
    this.agent.destroy();
  }
}
