/**
 * Reading a secret from a file named by the user (a passphrase file, oVirt credentials): bounded, and
 * never a hang. A regular file larger than the cap is refused from its size, unread; a device (/dev/zero,
 * a terminal: the engine never prompts) or a directory is refused; a pipe or FIFO (process substitution,
 * `--password-file /dev/stdin`) is read until its end, at most cap + 1 bytes, and given up after a timeout
 * when no writer ever ends it. A file other users may read is used, with a warning: it is the user's
 * file, and refusing would break a nightly job over a mode.
 */
import { close, constants, open as openDescriptor } from 'node:fs';
import { open, stat } from 'node:fs/promises';
import { promisify } from 'node:util';
import { Socket } from 'node:net';
import { InvalidArgumentError, isErrnoException } from '../../repo-format/errors.js';
import { checkLocalPath } from '../../repo-format/local-path.js';
import { formatMode, GROUP_OTHER_BITS } from '../../repo-format/file-modes.js';

/** A passphrase file holds at most this many bytes (SPEC.md, section 14). */
export const MAX_SECRET_FILE_BYTES = 4096;
/** How long a pipe or FIFO may take to deliver its secret and end. */
export const SECRET_PIPE_TIMEOUT_MS = 10_000;

export interface SecretFile {
  bytes: Buffer;
  /** Said to the user, not fatal: e.g. a file other users can read. */
  warnings: string[];
}

/**
 * `what` names the source in messages: "--password-file /etc/engine/pass", "$ENGINE_PASSWORD_FILE /run/…".
 * `secret: false` (a CA certificate: public) reads the same way, without the warning on loose modes.
 */
export async function readSecretFile(path: string, what: string, options: { maxBytes?: number; timeoutMs?: number; secret?: boolean } = {}): Promise<SecretFile> {
  const maxBytes = options.maxBytes ?? MAX_SECRET_FILE_BYTES;
  checkLocalPath(path, what.split(' ')[0]!);
  const stats = await stat(path).catch((error: unknown) => {
    throw new InvalidArgumentError(`${what}: cannot be read (${describeErrno(error)})`);
  });
  if (stats.isDirectory()) throw new InvalidArgumentError(`${what}: is a directory, not a file`);
  if (stats.isCharacterDevice() || stats.isBlockDevice()) {
    throw new InvalidArgumentError(`${what}: is a ${stats.isBlockDevice() ? 'block' : 'character'} device (a terminal, /dev/zero …), not a file; the engine never prompts: put the secret in a file`);
  }
  if (stats.isSocket()) throw new InvalidArgumentError(`${what}: is a socket, not a file`);
  const warnings: string[] = [];
  if (options.secret !== false && (stats.mode & GROUP_OTHER_BITS) !== 0) {
    warnings.push(`${what} is open to other users (mode ${formatMode(stats.mode)}): make it private, chmod 600 ${path}`);
  }
  if (stats.isFile()) {
    if (stats.size > maxBytes) throw tooLarge(what, `${stats.size} bytes`, maxBytes);
    return { bytes: await readRegularFile(path, what, maxBytes), warnings };
  }
  // A FIFO or an anonymous pipe (/dev/fd/N, /dev/stdin).
  return { bytes: await readPipe(path, what, maxBytes, options.timeoutMs ?? SECRET_PIPE_TIMEOUT_MS), warnings };
}

function describeErrno(error: unknown): string {
  if (!isErrnoException(error)) return String(error);
  if (error.code === 'ENOENT') return 'no such file';
  if (error.code === 'EACCES') return 'permission denied';
  return error.code ?? error.message;
}

function tooLarge(what: string, size: string, maxBytes: number): InvalidArgumentError {
  return new InvalidArgumentError(`${what}: holds ${size}; a secret file holds at most ${maxBytes} bytes (is it the right file?)`);
}

async function readRegularFile(path: string, what: string, maxBytes: number): Promise<Buffer> {
  const handle = await open(path, 'r').catch((error: unknown) => {
    throw new InvalidArgumentError(`${what}: cannot be read (${describeErrno(error)})`);
  });
  try {
    // One byte more than allowed: a file that grew since stat is caught too, without reading it all.
    const buffer = Buffer.alloc(maxBytes + 1);
    let length = 0;
    for (;;) {
      const { bytesRead } = await handle.read(buffer, length, buffer.length - length, length);
      if (bytesRead === 0) break;
      length += bytesRead;
      if (length > maxBytes) throw tooLarge(what, `more than ${maxBytes} bytes`, maxBytes);
    }
    return buffer.subarray(0, length);
  } finally {
    await handle.close();
  }
}

/**
 * Reads a pipe through the event loop (non-blocking: a FIFO without a writer neither blocks `open` nor a
 * thread of the pool), until its end, more than `maxBytes`, or the timeout.
 */
async function readPipe(path: string, what: string, maxBytes: number, timeoutMs: number): Promise<Buffer> {
  const fd = await promisify(openDescriptor)(path, constants.O_RDONLY | constants.O_NONBLOCK).catch((error: unknown) => {
    throw new InvalidArgumentError(`${what}: cannot be read (${describeErrno(error)})`);
  });
  let pipe: Socket;
  try {
    // The socket takes the descriptor over and closes it when destroyed.
    pipe = new Socket({ fd, readable: true, writable: false });
  } catch (error) {
    close(fd, () => undefined);
    throw new InvalidArgumentError(`${what}: cannot be read (${describeErrno(error)})`);
  }
  try {
    return await new Promise<Buffer>((resolve, reject) => {
      const chunks: Buffer[] = [];
      let length = 0;
      const timer = setTimeout(() => reject(new InvalidArgumentError(`${what}: is a pipe that delivered no complete secret within ${timeoutMs / 1000} s (nothing wrote it, or the writer did not close it)`)), timeoutMs);
      const settle = (action: () => void): void => {
        clearTimeout(timer);
        action();
      };
      pipe.on('data', (chunk: Buffer) => {
        chunks.push(chunk);
        length += chunk.length;
        if (length > maxBytes) settle(() => reject(tooLarge(what, `more than ${maxBytes} bytes`, maxBytes)));
      });
      pipe.once('end', () => settle(() => resolve(Buffer.concat(chunks, length))));
      pipe.once('error', (error) => settle(() => reject(new InvalidArgumentError(`${what}: cannot be read (${describeErrno(error)})`))));
    });
  } finally {
    pipe.destroy();
  }
}
