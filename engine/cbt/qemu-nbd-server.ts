/**
 * The engine's own qemu-nbd for an offline image: read-only unless asked (a restore into a new qcow2
 * writes through it), persistent (several connections), on a Unix socket in a private temporary directory
 * (short: socket paths are limited to 108 bytes), optionally exposing one dirty bitmap as
 * qemu:dirty-bitmap:NAME.
 */
import { chmod, mkdtemp, readFile, rm } from 'node:fs/promises';
import { PRIVATE_DIRECTORY_MODE } from '../../repo-format/file-modes.js';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { runTool } from './run-tool.js';
import { stopProcess } from '../host/process.js';

export interface RunningExport {
  uri: string;
  stop(): Promise<void>;
}

export async function serveImage(image: string, format: string, options: { bitmap?: string | undefined; writable?: boolean } = {}): Promise<RunningExport> {
  const dir = await mkdtemp(join(tmpdir(), 'engine-nbd-'));
  await chmod(dir, PRIVATE_DIRECTORY_MODE);
  const socket = join(dir, 'nbd.sock');
  const pidFile = join(dir, 'qemu-nbd.pid');
  const args = ['-f', format, '--socket', socket, '--persistent', '--shared', '8', '--fork', '--pid-file', pidFile];
  if (!options.writable) args.push('-r');
  // Writes reach the image file without qemu's page-cache games; FLUSH makes them durable.
  else args.push('--cache', 'writeback');
  if (options.bitmap) args.push('-B', options.bitmap);
  try {
    await runTool('qemu-nbd', [...args, resolve(image)]);
  } catch (error) {
    await rm(dir, { recursive: true, force: true });
    throw error;
  }
  const pid = Number((await readFile(pidFile, 'utf8')).trim());
  return {
    uri: `nbd+unix:///?socket=${socket}`,
    stop: async () => {
      // qemu-nbd releases the image lock when it exits; wait for that before qemu-img touches the image.
      await stopProcess(pid);
      await rm(dir, { recursive: true, force: true });
    },
  };
}
