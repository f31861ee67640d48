/**
 * An NBD export as a restore target (an `nbd` target; the CLI's `restore --to nbd://…|nbd+unix://…`): data through WRITE, zero
 * blocks through WRITE_ZEROES without NBD_CMD_FLAG_NO_HOLE (the server may punch or mark them zero
 * rather than allocate; zero buffers are written when the export has no WRITE_ZEROES), FLUSH on every
 * connection before the restore is reported done. The export must be writable and at least as large as
 * the disk.
 */
import { NbdClient } from '../nbd/client.js';
import * as P from '../nbd/protocol.js';
import { TargetTooSmallError, TargetUnwritableError } from '../errors.js';
import type { TargetWriter } from './target-writer.js';
import type { Range } from '../pipeline/map-cursors.js';

/** WRITE_ZEROES lengths are u32; servers answer big ones quickly, but stay well inside the field. */
const ZEROES_SPAN = 256 * 1024 * 1024;

export class NbdTarget implements TargetWriter {
  private constructor(
    readonly path: string,
    private readonly client: NbdClient,
    readonly zeroed: boolean,
  ) {}

  /**
   * `zeroed`: the export is known to read as zeros (a qcow2 the engine just created), so zero blocks are
   * skipped. `metaContexts`: contexts to negotiate (a dirty bitmap for a rollback through it).
   */
  static async open(uri: string, diskSize: number, options: { zeroed?: boolean; metaContexts?: string[] } = {}): Promise<NbdTarget> {
    const client = await NbdClient.connect(uri, { metaContexts: options.metaContexts ?? [] });
    try {
      if ((client.info.flags & P.TFLAG_READ_ONLY) !== 0) throw new TargetUnwritableError(uri, 'the NBD export is read-only');
      if (client.size < diskSize) throw new TargetTooSmallError(uri, client.size, diskSize);
    } catch (error) {
      await client.close();
      throw error;
    }
    return new NbdTarget(uri, client, options.zeroed === true);
  }

  hasContext(name: string): boolean {
    return this.client.hasContext(name);
  }

  /** Ranges a metadata context flags with `flag` (e.g. the dirty blocks of a qemu:dirty-bitmap context). */
  async *flaggedRanges(context: string, flag: number, length: number): AsyncGenerator<Range> {
    for await (const extent of this.client.blockStatus(context, 0, length)) {
      if ((extent.flags & flag) !== 0) yield { offset: extent.offset, length: extent.length };
    }
  }

  write(data: Buffer, offset: number): Promise<void> {
    return this.client.write(data, offset);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    if ((this.client.info.flags & P.TFLAG_SEND_WRITE_ZEROES) === 0) {
      const zeros = Buffer.alloc(Math.min(length, this.client.requestSize * 4));
      for (let at = offset; at < offset + length; at += zeros.length) await this.client.write(zeros.subarray(0, Math.min(zeros.length, offset + length - at)), at);
      return;
    }
    for (let at = offset; at < offset + length; at += ZEROES_SPAN) await this.client.writeZeroes(at, Math.min(ZEROES_SPAN, offset + length - at));
  }

  read(target: Buffer, offset: number): Promise<void> {
    return this.client.read(target, offset);
  }

  async finish(): Promise<void> {
    try {
      await this.client.flush();
    } finally {
      await this.client.close();
    }
  }

  async discard(): Promise<void> {
    await this.client.dispose();
  }

  async abandon(): Promise<void> {
    await this.client.dispose();
  }
}
