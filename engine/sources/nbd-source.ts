/**
 * An NBD export as a backup source (qemu-nbd, a libvirt pull-mode backup, nbdkit). base:allocation, when
 * the server has it, tells which regions read as zeros: the backup records them without reading them.
 */
import { NbdClient } from '../nbd/client.js';
import * as P from '../nbd/protocol.js';
import type { BlockSource, Extent, SourceDescription } from './source.js';

export class NbdSource implements BlockSource {
  private constructor(
    private readonly client: NbdClient,
    readonly description: SourceDescription,
  ) {}

  static async open(uri: string, options: { connections?: number } = {}): Promise<NbdSource> {
    const client = await NbdClient.connect(uri, { metaContexts: [P.CONTEXT_BASE_ALLOCATION], connections: options.connections });
    return new NbdSource(client, { kind: 'nbd', path: uri });
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

  async dispose(): Promise<void> {
    await this.client.close();
  }
}
