/**
 * An NBD export as a backup source (qemu-nbd, a libvirt pull-mode backup, nbdkit). base:allocation, when
 * the server has it, tells which regions read as zeros: the backup records them without reading them.
 */
import { NbdClient } from '../nbd/client.js';
import * as P from '../nbd/protocol.js';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import type { BlockSource, Extent, ReadDepth, SourceDescription } from './source.js';

/**
 * Bytes kept in flight at an export: nbdcopy keeps 64 requests of 256 KiB per connection (64 MiB over 4);
 * its own figure with 16 requests per connection (16 MiB in flight) read a libvirt pull export as fast
 * within the noise (bench/results/libvirt-full-read-5c21fe6.md). The backup's slots bound it too: a read
 * holds its slot, and the slots are also what the hash, seal and write stages hold.
 */
export const NBD_DEPTH_BYTES = 16 * 1024 * 1024;

export class NbdSource implements BlockSource {
  private constructor(
    private readonly client: NbdClient,
    readonly description: SourceDescription,
  ) {}

  /** `dirtyContext`: a metadata context (qemu:dirty-bitmap:NAME) that must exist; see dirtyExtents(). */
  static async open(uri: string, options: { connections?: number; dirtyContext?: string | undefined; description?: SourceDescription } = {}): Promise<NbdSource> {
    const contexts = [P.CONTEXT_BASE_ALLOCATION, ...(options.dirtyContext ? [options.dirtyContext] : [])];
    const client = await NbdClient.connect(uri, { metaContexts: contexts, require: options.dirtyContext ? [options.dirtyContext] : [], connections: options.connections });
    const source = new NbdSource(client, options.description ?? { kind: 'nbd', path: uri });
    source.dirtyContext = options.dirtyContext;
    return source;
  }

  private dirtyContext: string | undefined;

  /** The dirty extents of the negotiated dirty-bitmap context, in order. */
  async *dirtyExtents(): AsyncGenerator<{ offset: number; length: number }> {
    if (!this.dirtyContext) throw new InvalidArgumentError(`dirty extents of ${this.description.path} were asked for, but it was opened without a dirty-bitmap context (dirtyContext)`);
    for await (const extent of this.client.blockStatus(this.dirtyContext)) {
      if ((extent.flags & P.STATE_DIRTY) !== 0) yield { offset: extent.offset, length: extent.length };
    }
  }

  get size(): number {
    return this.client.size;
  }

  get defaultName(): string {
    return this.client.uri.exportName || 'nbd';
  }

  read(target: Buffer, offset: number): Promise<void> {
    return this.client.read(target, offset);
  }

  get depth(): ReadDepth {
    return { requestSize: this.client.requestSize, bytes: NBD_DEPTH_BYTES };
  }

  get extents(): (() => AsyncIterable<Extent>) | undefined {
    if (!this.client.hasContext(P.CONTEXT_BASE_ALLOCATION)) return undefined;
    return () => this.allocation();
  }

  private async *allocation(): AsyncGenerator<Extent> {
    for await (const extent of this.client.blockStatus(P.CONTEXT_BASE_ALLOCATION)) {
      yield { offset: extent.offset, length: extent.length, zero: (extent.flags & P.STATE_ZERO) !== 0 };
    }
  }

  async close(): Promise<void> {
    await this.client.close();
  }

  /** After a failure or an interruption: reads still in flight fail, not waited for (a stalled server). */
  async dispose(): Promise<void> {
    await this.client.dispose();
  }
}
