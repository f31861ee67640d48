/**
 * Cursors that walk, in block order, what an incremental backup needs besides the source: the parent
 * backup's map (entries of unchanged blocks) and the dirty extents (which blocks changed). Both consume
 * their input lazily, so memory stays flat whatever the disk size.
 */
import { ID_SIZE, ZERO_ID } from '../../repo-format/constants.js';
import { readMap, type LoadPage, type MapRoot, type MapRun } from '../../repo-format/block-map.js';
import { blockAt, blockOffset } from '../../repo-format/disk-geometry.js';
import { CorruptMetadataError } from '../../repo-format/errors.js';

export class ParentMapCursor {
  private readonly runs: AsyncGenerator<MapRun>;
  private run: MapRun | undefined;

  constructor(
    private readonly map: MapRoot,
    loadPage: LoadPage,
  ) {
    this.runs = readMap(map, loadPage);
  }

  /**
   * The parent's entry for `block`. Blocks must not go backwards. A map that ends before `block` covers
   * fewer blocks than its record's disk: the record or the map is damaged (ENGINE_CORRUPT_METADATA).
   */
  async entry(block: number): Promise<Buffer> {
    while (!this.run || this.run.firstBlock + this.run.count <= block) {
      const next = await this.runs.next();
      if (next.done) throw new CorruptMetadataError(`block map ${this.map.root.toString('hex').slice(0, 16)}…`, `it covers ${this.map.blocks} blocks, and block ${block} of the disk it is read for was asked`);
      this.run = next.value;
    }
    if (this.run.entries === null) return ZERO_ID;
    const at = (block - this.run.firstBlock) * ID_SIZE;
    return this.run.entries.subarray(at, at + ID_SIZE);
  }
}

export interface Range {
  offset: number;
  length: number;
}

export class DirtyCursor {
  private readonly iterator: AsyncIterator<Range>;
  private current: Range | undefined;
  private done = false;

  constructor(dirty: AsyncIterable<Range>) {
    this.iterator = dirty[Symbol.asyncIterator]();
  }

  /** The first block at or after `fromBlock` that any dirty byte touches, or `blockCount` if none. */
  async nextDirtyBlock(fromBlock: number, blockSize: number, blockCount: number): Promise<number> {
    const from = blockOffset(fromBlock, blockSize);
    while (!this.done && (!this.current || this.current.offset + this.current.length <= from)) {
      const next = await this.iterator.next();
      if (next.done) this.done = true;
      else this.current = next.value;
    }
    if (!this.current || this.current.offset + this.current.length <= from) return blockCount;
    return Math.min(blockCount, Math.max(fromBlock, blockAt(this.current.offset, blockSize)));
  }
}

/** The ranges of `stream` and of `extra` (sorted by offset), in order of offset: what DirtyCursor walks. */
export async function* mergeRanges(stream: AsyncIterable<Range>, extra: readonly Range[]): AsyncGenerator<Range> {
  let next = 0;
  for await (const range of stream) {
    while (next < extra.length && extra[next]!.offset < range.offset) yield extra[next++]!;
    yield range;
  }
  while (next < extra.length) yield extra[next++]!;
}