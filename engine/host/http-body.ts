/**
 * Collects an HTTP response body, never more than `limit` bytes: an answer of the oVirt engine or of
 * imageio sizes no allocation past what such an answer can hold. A larger one is destroyed and reported.
 */
import type { IncomingMessage } from 'node:http';

/** oVirt REST answers (a VM's OVF, lists of disks, checkpoints) and imageio extent lists: 64 MiB is far beyond any. */
export const HTTP_BODY_LIMIT = 64 * 1024 * 1024;

export class BodyTooLargeError extends Error {
  constructor(readonly limit: number) {
    super(`the answer is larger than the ${limit} bytes such an answer can hold`);
    this.name = 'BodyTooLargeError';
  }
}

export function collectBody(res: IncomingMessage, limit: number, done: (body: Buffer) => void, fail: (error: Error) => void): void {
  const declared = Number(res.headers['content-length']);
  if (Number.isFinite(declared) && declared > limit) {
    res.destroy();
    fail(new BodyTooLargeError(limit));
    return;
  }
  const chunks: Buffer[] = [];
  let length = 0;
  res.on('data', (chunk: Buffer) => {
    length += chunk.length;
    if (length > limit) {
      res.destroy();
      fail(new BodyTooLargeError(limit));
      return;
    }
    chunks.push(chunk);
  });
  res.on('end', () => {
    if (length <= limit) done(Buffer.concat(chunks));
  });
  res.on('error', fail);
}
