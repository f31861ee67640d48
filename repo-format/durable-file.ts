import { link, open, rename, unlink, type FileHandle } from 'node:fs/promises';
import { dirname, basename, join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { classifyWriteError } from './errors.js';
import { IMMUTABLE_FILE_MODE, openNewFile } from './file-modes.js';

/** fsync a directory so that a rename or unlink inside it survives a power loss. */
export async function fsyncDirectory(path: string): Promise<void> {
  const handle = await open(path, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** Writes all of `data` from offset 0, fsyncs and closes the handle (closed whatever happens). */
export async function writeAllSyncAndClose(handle: FileHandle, data: Uint8Array): Promise<void> {
  try {
    let written = 0;
    while (written < data.length) {
      const { bytesWritten } = await handle.write(data, written, data.length - written, written);
      written += bytesWritten;
    }
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/**
 * The one durable-write path of the repository: temp file (in the same directory, or a given temp
 * directory on the same filesystem) → write → fsync → close → rename (or link, when the name must not
 * exist yet) → fsync(directory). A reader sees either no file or the whole file, never a part.
 * `mode` (default 0400: written once, never changed in place) is set exactly, whatever the umask.
 */
export async function writeFileDurably(path: string, data: Uint8Array, options: { exclusive?: boolean; tempDir?: string; mode?: number } = {}): Promise<void> {
  const dir = dirname(path);
  const temp = join(options.tempDir ?? dir, `.${basename(path)}.${randomBytes(6).toString('hex')}.tmp`);
  try {
    await writeAllSyncAndClose(await openNewFile(temp, 'wx', options.mode ?? IMMUTABLE_FILE_MODE), data);
    if (options.exclusive) {
      // link() fails with EEXIST where rename() would silently replace: the file is written once.
      await link(temp, path);
    } else {
      await rename(temp, path);
    }
  } catch (error) {
    await unlink(temp).catch(() => undefined);
    throw classifyWriteError(error, path);
  }
  // The file now exists under its name; what follows only makes that durable and tidies up.
  await unlink(temp).catch(() => undefined);
  await fsyncDirectory(dir).catch((error: unknown) => {
    throw classifyWriteError(error, dir);
  });
}
