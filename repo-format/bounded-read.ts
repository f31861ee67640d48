/**
 * Reads a small repository file (config, key file, backup record, lock, registration, quarantine or journal
 * entry) whole, but never more than `limit` bytes: each of them has a size this engine never exceeds, and
 * a file larger than that (damage, or a hostile edit) must not size an allocation. Throws
 * FileTooLargeToReadError for a larger file, and the raw errno error otherwise (ENOENT, EISDIR, …): the
 * caller knows what the file means and says so.
 */
import { open } from 'node:fs/promises';

export class FileTooLargeToReadError extends Error {
  constructor(
    readonly path: string,
    readonly size: number,
    readonly limit: number,
  ) {
    super(`${path} holds ${size} bytes, more than the ${limit} such a file can hold`);
    this.name = 'FileTooLargeToReadError';
  }
}

export async function readBoundedFile(path: string, limit: number): Promise<Buffer> {
  const handle = await open(path, 'r');
  try {
    const { size } = await handle.stat();
    if (size > limit) throw new FileTooLargeToReadError(path, size, limit);
    // Read one byte more than the limit: a file that grew since stat() is caught too.
    const buffer = Buffer.allocUnsafe(Math.min(limit, size + 64 * 1024) + 1);
    let length = 0;
    for (;;) {
      const { bytesRead } = await handle.read(buffer, length, buffer.length - length, length);
      if (bytesRead === 0) break;
      length += bytesRead;
      if (length > limit) throw new FileTooLargeToReadError(path, length, limit);
      if (length === buffer.length) break;
    }
    return buffer.subarray(0, length);
  } finally {
    await handle.close();
  }
}
