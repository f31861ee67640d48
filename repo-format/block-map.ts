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

  async finish(): Promise<MapRoot> {
    if (this.pushed !== this.blockCount) throw new Error(`map has ${this.pushed} of ${this.blockCount} entries`);
    for (let level = 0; level < this.depth; level += 1) {
      if (this.counts[level]! > 0) await this.flush(level);
    }
    const root = await this.pageId(this.depth);
    return { root, depth: this.depth, blocks: this.blockCount };
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
  if (level === 0) {
    if (page.length !== count * ID_SIZE) {
      throw new CorruptMetadataError(`map page ${id.toString('hex')}`, `holds ${page.length / ID_SIZE} entries, expected ${count}`);
    }
    yield { firstBlock, count, entries: page };
    return;
  }
  const childCoverage = pageCoverage(level - 1);
  const children = Math.ceil(count / childCoverage);
  if (page.length !== children * ID_SIZE) {
    throw new CorruptMetadataError(`map page ${id.toString('hex')}`, `holds ${page.length / ID_SIZE} children, expected ${children}`);
  }
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
