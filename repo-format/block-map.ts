/**
 * The block map of one disk: one 32-byte entry per block (the chunk id, or ZERO_ID for an all-zero
 * block), stored as a small Merkle tree of content-addressed pages so that a backup that changes few
 * blocks writes few pages.
 *
 *   level 0 (leaf) page: up to 1024 block entries
 *   level L page:        up to 1024 ids of level L-1 pages
 *   ZERO_ID in place of a page id: every block under it is zero (such pages are never stored)
 *
 * depth = the smallest d ≥ 0 with 1024^(d+1) ≥ blockCount; the root is the one page at level `depth`.
 * Pages are built in block order and written as soon as they fill, so memory stays at one page per level
 * whatever the disk size. See SPEC.md, "Block map".
 */
import { ID_SIZE, KIND_MAP_LEAF, KIND_MAP_NODE, MAP_PAGE_ENTRIES, ZERO_ID } from './constants.js';
import { CorruptMetadataError } from './errors.js';

const PAGE_BYTES = MAP_PAGE_ENTRIES * ID_SIZE;
const ZERO_PAGE = Buffer.alloc(PAGE_BYTES);

export function mapDepth(blockCount: number): number {
  let depth = 0;
  let coverage = MAP_PAGE_ENTRIES;
  while (coverage < blockCount) {
    depth += 1;
    coverage *= MAP_PAGE_ENTRIES;
  }
  return depth;
}

/** Blocks covered by one page at `level`. */
function pageCoverage(level: number): number {
  return MAP_PAGE_ENTRIES ** (level + 1);
}

export interface MapRoot {
  root: Buffer;
  depth: number;
  blocks: number;
}

/** Stores a page and returns its id (SHA-256 of the page bytes); deduplicates like any blob. */
export type StorePage = (kind: number, page: Buffer) => Promise<Buffer>;
export type LoadPage = (id: Buffer, kind: number) => Promise<Buffer>;

export class MapBuilder {
  private readonly pages: Buffer[];
  private readonly counts: number[];
  private pushed = 0;
  readonly depth: number;

  constructor(
    readonly blockCount: number,
    private readonly storePage: StorePage,
  ) {
    this.depth = mapDepth(blockCount);
    this.pages = Array.from({ length: this.depth + 1 }, () => Buffer.alloc(PAGE_BYTES));
    this.counts = new Array<number>(this.depth + 1).fill(0);
  }

  /** Appends the entry of the next block, in block order. */
  async push(entry: Uint8Array): Promise<void> {
    if (this.pushed >= this.blockCount) throw new Error('more map entries than blocks');
    this.pushed += 1;
    await this.append(0, entry);
  }

  /** Appends `count` all-zero blocks: whole pages of them become one ZERO_ID at the highest level they fill. */
  async pushZeros(count: number): Promise<void> {
    await this.pushSpan(count, ZERO_SPAN);
  }

  /**
   * Appends the entries of the next `count` blocks as `source` has them. A page the span covers whole (and
   * the last, short page of a level when the span reaches the disk's end) is appended as its id, one entry
   * at the level above, never block by block: the map comes out exactly as `push` of each entry would
   * make it (SPEC.md, section 8), in time proportional to the pages, not to the blocks.
   */
  async pushSpan(count: number, source: MapSpanSource): Promise<void> {
    if (this.pushed + count > this.blockCount) throw new Error('more map entries than blocks');
    let left = count;
    while (left > 0) {
      const block = this.pushed;
      // The highest level at which an entry starts at `block` and the span covers all of its blocks.
      let level = 0;
      while (level < this.depth) {
        const under = pageCoverage(level);
        if (block % under !== 0 || left < Math.min(under, this.blockCount - block)) break;
        level += 1;
      }
      if (level === 0) {
        const n = Math.min(left, MAP_PAGE_ENTRIES - this.counts[0]!);
        await this.appendEntries(await source.entries(block, n), n);
        this.pushed += n;
        left -= n;
      } else {
        const n = Math.min(pageCoverage(level - 1), this.blockCount - block);
        const id = await source.pageId(level - 1, block);
        this.pushed += n;
        left -= n;
        await this.append(level, id);
      }
    }
  }

  async finish(): Promise<MapRoot> {
    if (this.pushed !== this.blockCount) throw new Error(`map has ${this.pushed} of ${this.blockCount} entries`);
    for (let level = 0; level < this.depth; level += 1) {
      if (this.counts[level]! > 0) await this.flush(level);
    }
    const root = await this.pageId(this.depth);
    return { root, depth: this.depth, blocks: this.blockCount };
  }

  /** `n` leaf entries at once (no more than the leaf has room for). */
  private async appendEntries(entries: Uint8Array, n: number): Promise<void> {
    const count = this.counts[0]!;
    this.pages[0]!.set(entries.subarray(0, n * ID_SIZE), count * ID_SIZE);
    this.counts[0] = count + n;
    if (count + n === MAP_PAGE_ENTRIES && this.depth > 0) await this.flush(0);
  }

  private async append(level: number, entry: Uint8Array): Promise<void> {
    const count = this.counts[level]!;
    this.pages[level]!.set(entry.subarray(0, ID_SIZE), count * ID_SIZE);
    this.counts[level] = count + 1;
    if (count + 1 === MAP_PAGE_ENTRIES && level < this.depth) await this.flush(level);
  }

  private async flush(level: number): Promise<void> {
    const id = await this.pageId(level);
    this.counts[level] = 0;
    await this.append(level + 1, id);
  }

  private async pageId(level: number): Promise<Buffer> {
    const bytes = this.counts[level]! * ID_SIZE;
    const page = this.pages[level]!.subarray(0, bytes);
    if (page.equals(ZERO_PAGE.subarray(0, bytes))) return ZERO_ID;
    return this.storePage(level === 0 ? KIND_MAP_LEAF : KIND_MAP_NODE, Buffer.from(page));
  }
}

/** Where MapBuilder.pushSpan takes a span's entries from: whole pages by id, or the entries of single blocks. */
export interface MapSpanSource {
  /** The id of the page at `level` whose first block is `firstBlock` (ZERO_ID when all its blocks are zero). */
  pageId(level: number, firstBlock: number): Promise<Buffer>;
  /** The entries of `count` blocks from `firstBlock` on, all in one leaf: count × 32 bytes. */
  entries(firstBlock: number, count: number): Promise<Uint8Array>;
}

/** A span of zero blocks. */
const ZERO_SPAN: MapSpanSource = {
  pageId: () => Promise.resolve(ZERO_ID),
  entries: () => Promise.resolve(ZERO_PAGE),
};

/**
 * An existing map read by position, forward, as a MapSpanSource: an incremental takes its unchanged
 * blocks from the parent's map a whole page at a time (the page's id, unread) where it can, and reads only
 * the pages on the edges of a span. It holds the last page read at each level, so memory is one page per
 * level; the pages it reads are checked like readMap's.
 */
export class MapPageReader implements MapSpanSource {
  /** Per level: the page held (null: a zero page) and the first block it covers. */
  private readonly held: ({ first: number; page: Buffer | null } | undefined)[];

  constructor(
    private readonly map: MapRoot,
    private readonly loadPage: LoadPage,
  ) {
    checkMapShape(map);
    this.held = new Array<{ first: number; page: Buffer | null } | undefined>(map.depth + 1).fill(undefined);
  }

  async pageId(level: number, firstBlock: number): Promise<Buffer> {
    this.checkBlock(firstBlock);
    if (level === this.map.depth) return this.map.root;
    const parent = await this.page(level + 1, firstBlock);
    if (parent.page === null) return ZERO_ID;
    const at = Math.floor((firstBlock - parent.first) / pageCoverage(level)) * ID_SIZE;
    return parent.page.subarray(at, at + ID_SIZE);
  }

  async entries(firstBlock: number, count: number): Promise<Uint8Array> {
    this.checkBlock(firstBlock + count - 1);
    const leaf = await this.page(0, firstBlock);
    if (leaf.page === null) return ZERO_PAGE.subarray(0, count * ID_SIZE);
    const at = (firstBlock - leaf.first) * ID_SIZE;
    return leaf.page.subarray(at, at + count * ID_SIZE);
  }

  /** The entry of one block (ZERO_ID when it is zero). */
  async entry(block: number): Promise<Buffer> {
    return Buffer.from(await this.entries(block, 1));
  }

  private checkBlock(block: number): void {
    if (block < 0 || block >= this.map.blocks) {
      throw new CorruptMetadataError(`block map ${this.map.root.toString('hex').slice(0, 16)}…`, `it covers ${this.map.blocks} blocks, and block ${block} of the disk it is read for was asked`);
    }
  }

  /** The page at `level` that covers `block`, read (and checked) unless it is the one held. */
  private async page(level: number, block: number): Promise<{ first: number; page: Buffer | null }> {
    const coverage = pageCoverage(level);
    const first = Math.floor(block / coverage) * coverage;
    const held = this.held[level];
    if (held && held.first === first) return held;
    const id = await this.pageId(level, first);
    let page: Buffer | null = null;
    if (!id.equals(ZERO_ID)) {
      page = await this.loadPage(id, level === 0 ? KIND_MAP_LEAF : KIND_MAP_NODE);
      checkPageLength(page, id, level, Math.min(coverage, this.map.blocks - first));
    }
    const now = { first, page };
    this.held[level] = now;
    return now;
  }
}

/** A page holds exactly the entries its position implies (SPEC.md, section 8): `count` blocks under it. */
function checkPageLength(page: Buffer, id: Buffer, level: number, count: number): void {
  const entries = level === 0 ? count : Math.ceil(count / pageCoverage(level - 1));
  if (page.length !== entries * ID_SIZE) {
    throw new CorruptMetadataError(`map page ${id.toString('hex')}`, `holds ${page.length / ID_SIZE} ${level === 0 ? 'entries' : 'children'}, expected ${entries}`);
  }
}

/** A run of consecutive blocks: `entries` holds count × 32 bytes, or is null when all are zero. */
export interface MapRun {
  firstBlock: number;
  count: number;
  entries: Buffer | null;
}

/** The chunks of a run: the ids that are not ZERO_ID (copied out of the page) and their block numbers. */
export function runChunks(run: MapRun): { ids: Buffer[]; blocks: number[] } {
  const ids: Buffer[] = [];
  const blocks: number[] = [];
  if (run.entries === null) return { ids, blocks };
  for (let i = 0; i < run.count; i += 1) {
    const id = run.entries.subarray(i * ID_SIZE, (i + 1) * ID_SIZE);
    if (ZERO_ID.equals(id)) continue;
    ids.push(Buffer.from(id));
    blocks.push(run.firstBlock + i);
  }
  return { ids, blocks };
}

/** Reads a map in block order, one leaf (or one zero subtree) at a time. */
export async function* readMap(map: MapRoot, loadPage: LoadPage): AsyncGenerator<MapRun> {
  checkMapShape(map);
  if (map.blocks === 0) return;
  yield* walk(map.root, map.depth, 0, map.blocks, loadPage);
}

/**
 * The shape a map must have before a page of it is read (SPEC.md, section 8): `depth` fits `blocks`, and the
 * map of 0 blocks (an empty disk) is depth 0 with root ZERO_ID, nothing else.
 */
function checkMapShape(map: MapRoot): void {
  if (map.depth !== mapDepth(map.blocks)) throw new CorruptMetadataError('block map', `depth ${map.depth} does not fit ${map.blocks} blocks`);
  if (map.blocks === 0 && !map.root.equals(ZERO_ID)) throw new CorruptMetadataError('block map', 'a map of 0 blocks must have the zero root');
}

async function* walk(id: Buffer, level: number, firstBlock: number, totalBlocks: number, loadPage: LoadPage): AsyncGenerator<MapRun> {
  const count = Math.min(pageCoverage(level), totalBlocks - firstBlock);
  if (id.equals(ZERO_ID)) {
    yield { firstBlock, count, entries: null };
    return;
  }
  const page = await loadPage(id, level === 0 ? KIND_MAP_LEAF : KIND_MAP_NODE);
  checkPageLength(page, id, level, count);
  if (level === 0) {
    yield { firstBlock, count, entries: page };
    return;
  }
  const childCoverage = pageCoverage(level - 1);
  const children = page.length / ID_SIZE;
  for (let i = 0; i < children; i += 1) {
    const child = Buffer.from(page.subarray(i * ID_SIZE, (i + 1) * ID_SIZE));
    yield* walk(child, level - 1, firstBlock + i * childCoverage, totalBlocks, loadPage);
  }
}

/**
 * Every distinct page id a map references (for verify and garbage collection), each once: a page that
 * occurs at several places (maps deduplicate their pages) is not walked again, so the walk follows the
 * pages the repository holds, not the blocks the map covers.
 */
export async function* mapPageIds(map: MapRoot, loadPage: LoadPage): AsyncGenerator<{ id: Buffer; kind: number }> {
  checkMapShape(map);
  if (map.blocks === 0) return;
  yield* walkPages(map.root, map.depth, loadPage, new Set<string>());
}

async function* walkPages(id: Buffer, level: number, loadPage: LoadPage, seen: Set<string>): AsyncGenerator<{ id: Buffer; kind: number }> {
  if (id.equals(ZERO_ID)) return;
  const key = `${level}:${id.toString('hex')}`;
  if (seen.has(key)) return;
  seen.add(key);
  const kind = level === 0 ? KIND_MAP_LEAF : KIND_MAP_NODE;
  yield { id, kind };
  if (level === 0) return;
  const page = await loadPage(id, kind);
  for (let at = 0; at < page.length; at += ID_SIZE) {
    yield* walkPages(Buffer.from(page.subarray(at, at + ID_SIZE)), level - 1, loadPage, seen);
  }
}
