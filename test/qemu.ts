/** Real QEMU tools for the tests: qcow2 images, qemu-io writes, qemu-nbd exports. */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { sh } from './helpers.js';
import { stopProcess } from '../dist/engine/host/process.js';

export async function qcow2(path: string, size: string): Promise<void> {
  await sh('qemu-img', ['create', '-q', '-f', 'qcow2', path, size]);
}

/** Runs qemu-io commands (e.g. 'write -P 0xab 0 4M') against a closed image. */
export async function qemuIo(path: string, commands: string[], format = 'qcow2'): Promise<void> {
  await sh('qemu-io', ['-f', format, ...commands.flatMap((c) => ['-c', c]), path]);
}

export interface Export {
  uri: string;
  socket: string;
  stop: () => Promise<void>;
}

let counter = 0;

/** Serves an image with qemu-nbd on a Unix socket until stop(). */
export async function qemuNbd(image: string, dir: string, options: { readOnly?: boolean; bitmap?: string; format?: string; exportName?: string } = {}): Promise<Export> {
  counter += 1;
  const socket = join(dir, `nbd-${process.pid}-${counter}.sock`);
  const pidFile = join(dir, `nbd-${process.pid}-${counter}.pid`);
  const args = ['-f', options.format ?? 'qcow2', '--socket', socket, '--persistent', '--fork', '--pid-file', pidFile, '--shared', '8'];
  if (options.readOnly !== false) args.push('-r');
  if (options.bitmap) args.push('-B', options.bitmap);
  if (options.exportName !== undefined) args.push('-x', options.exportName);
  await sh('qemu-nbd', [...args, image]);
  const pid = Number((await readFile(pidFile, 'utf8')).trim());
  const name = options.exportName ?? '';
  return {
    uri: `nbd+unix:///${encodeURIComponent(name)}?socket=${socket}`,
    socket,
    stop: async () => {
      await stopProcess(pid);
    },
  };
}

export async function qemuImgCompare(a: string, aFormat: string, b: string, bFormat: string): Promise<boolean> {
  try {
    await sh('qemu-img', ['compare', '-q', '-f', aFormat, '-F', bFormat, a, b]);
    return true;
  } catch {
    return false;
  }
}
