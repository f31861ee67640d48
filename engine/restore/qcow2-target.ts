/**
 * A new qcow2 image as a restore target (a `qcow2` target; the CLI's `restore --to-qcow2 FILE`): `qemu-img create` at the disk's
 * size, the engine's own writable qemu-nbd on it, the restore written through the NBD client (a new image
 * reads as zeros, so zero blocks are skipped and stay unallocated), FLUSH, qemu-nbd stopped. A restore that
 * fails removes the image it created; an existing FILE is refused, never overwritten.
 */
import { rm } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { fsyncDirectory } from '../../repo-format/durable-file.js';
import { isErrnoException } from '../../repo-format/errors.js';
import { MUTABLE_FILE_MODE, openNewFile } from '../../repo-format/file-modes.js';
import { runTool } from '../cbt/run-tool.js';
import { serveImage, type RunningExport } from '../cbt/qemu-nbd-server.js';
import { TargetUnwritableError } from '../errors.js';
import type { TargetWriter } from './target-writer.js';
import { NbdTarget } from './nbd-target.js';

export class Qcow2Target implements TargetWriter {
  readonly zeroed = true;
  readonly created = true;

  private constructor(
    readonly path: string,
    private readonly exported: RunningExport,
    private readonly nbd: NbdTarget,
  ) {}

  static async create(path: string, diskSize: number): Promise<Qcow2Target> {
    const file = resolve(path);
    // The engine creates the file itself, exclusively (an existing FILE is refused, never overwritten) and
    // owner-only (SPEC.md, 2.1); qemu-img then formats it in place and keeps its mode, where a file of its
    // own would be 0644 under the usual umask.
    const handle = await openNewFile(file, 'wx', MUTABLE_FILE_MODE).catch((error: unknown) => {
      if (isErrnoException(error) && error.code === 'EEXIST') throw new TargetUnwritableError(file, 'it already exists (a qcow2 target is created new, never overwritten)');
      throw new TargetUnwritableError(file, isErrnoException(error) ? error.message : String(error));
    });
    await handle.close();
    let exported: RunningExport | undefined;
    try {
      await runTool('qemu-img', ['create', '-q', '-f', 'qcow2', file, String(diskSize)]);
      exported = await serveImage(file, 'qcow2', { writable: true });
      return new Qcow2Target(file, exported, await NbdTarget.open(exported.uri, diskSize, { zeroed: true }));
    } catch (error) {
      await exported?.stop();
      await rm(file, { force: true });
      throw error;
    }
  }

  write(data: Buffer, offset: number): Promise<void> {
    return this.nbd.write(data, offset);
  }

  async finish(): Promise<void> {
    try {
      await this.nbd.finish();
    } finally {
      await this.exported.stop();
    }
    await fsyncDirectory(dirname(this.path));
  }

  async discard(): Promise<void> {
    await this.nbd.discard();
    await this.exported.stop();
    await rm(this.path, { force: true });
  }
}
