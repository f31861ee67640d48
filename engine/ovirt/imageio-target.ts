/**
 * An upload image transfer as a restore target: PUT with a Content-Range per chunk (`flush=n`: one flush
 * at the end), PATCH {"op": "flush"} before the restore is reported done. A new disk reads as zeros, so
 * zero blocks are skipped. The address is transfer_url, or proxy_url when the host cannot be reached
 * (imageio-connection.ts); the ticket must allow PUT and offer flush.
 */
import { TargetUnwritableError } from '../errors.js';
import type { TargetWriter } from '../restore/target-writer.js';
import { describeTlsError } from '../host/tls-errors.js';
import { answerText, imageioAgent, imageioRequest, openImageio, uploadFailure, type ImageioAgent, type ImageioUrls } from './imageio-connection.js';

export class ImageioTarget implements TargetWriter {
  readonly zeroed = true;

  private constructor(
    private readonly url: URL,
    private readonly agent: ImageioAgent,
  ) {}

  static async open(urls: ImageioUrls, ca: Buffer | undefined): Promise<ImageioTarget> {
    const endpoint = await openImageio(urls, ca, uploadFailure);
    if (endpoint.allow.length > 0 && !endpoint.allow.includes('PUT')) throw new TargetUnwritableError(endpoint.url.href, `the imageio ticket does not allow writing (Allow: ${endpoint.allow.join(',')})`);
    return new ImageioTarget(endpoint.url, imageioAgent(endpoint.url, Math.max(1, Math.min(4, endpoint.maxWriters)), ca));
  }

  get path(): string {
    return this.url.href;
  }

  /** One request; an error answer becomes TargetUnwritableError with imageio's own words. */
  private async send(what: string, method: string, query: string, headers: Record<string, string>, body: Buffer): Promise<void> {
    let answer;
    try {
      answer = await imageioRequest(this.url, this.agent, { method, path: `${this.url.pathname}${query}`, headers, body });
    } catch (error) {
      throw new TargetUnwritableError(this.url.href, describeTlsError(error as Error));
    }
    if (answer.status !== 200 && answer.status !== 204) throw new TargetUnwritableError(this.url.href, `imageio ${what} answered HTTP ${answer.status}: ${answerText(answer.body)}`);
  }

  async write(data: Buffer, offset: number): Promise<void> {
    await this.send(`PUT at ${offset}`, 'PUT', '?flush=n', { 'Content-Range': `bytes ${offset}-${offset + data.length - 1}/*`, 'Content-Type': 'application/octet-stream' }, data);
  }

  async finish(): Promise<void> {
    try {
      await this.send('flush', 'PATCH', '', { 'Content-Type': 'application/json' }, Buffer.from(JSON.stringify({ op: 'flush' })));
    } finally {
      this.agent.destroy();
    }
  }

  async discard(): Promise<void> {
    this.agent.destroy();
  }
}
