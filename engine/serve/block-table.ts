/**
 * Where every block of a served disk lives, resolved once while holding the repository lock, so that the
 * server can then read packs for hours without the lock and without the index (SPEC 12.2).
 *
 * The table has the shape of the disk's block map (SPEC 8) and is built from it page by page: a resolved
 * leaf holds, for its up to 1024 blocks, the chunk ids (the page itself) and each chunk's place
 *   pack      u32  index into the pack id list; ZERO (all-zero block) or MISSING (not in the index)
 *   offset    u32  frame offset in the pack
 *   length    u32  frame length
 * = 44 bytes per block; a resolved node holds its children. A zero page (ZERO_ID) costs nothing, and a
 * page that occurs at several places (the same content: a map deduplicates its pages like any blob) is
 * resolved once and shared, also between the disks of one server. Memory therefore follows the distinct
 * pages the repository holds, never the disk size a record states: a thin 64 TiB disk costs what its
 * data does, and a crafted record cannot make it more than the pages it can name (44 MiB per TiB of
 * distinct data at 1 MiB blocks). Lookups walk at most four levels.
 */
import { mapDepth } from '../../repo-format/block-map.js';
import { type DiskRecord } from '../../repo-format/backup-record.js';
import { ID_SIZE, KIND_MAP_LEAF, KIND_MAP_NODE, MAP_PAGE_ENTRIES, ZERO_ID } from '../../repo-format/constants.js';
import { CorruptMetadataError } from '../../repo-format/errors.js';
import { DiskGeometry } from '../../repo-format/disk-geometry.js';
import type { Repository } from '../../repo-format/repository.js';

export const ZERO_BLOCK = 0xffffffff;
export const MISSING_BLOCK = 0xfffffffe;
export const BYTES_PER_BLOCK = 4 + 4 + 4 + ID_SIZE;

/** Pack ids, each stored once and named by a small number in the tables. */
export class PackIds {
  private readonly indexOf = new Map<string, number>();
  readonly ids: string[] = [];

  number(packId: string): number {
    let n = this.indexOf.get(packId);
    if (n === undefined) {
      n = this.ids.length;
      this.ids.push(packId);
      this.indexOf.set(packId, n);
    }
    return n;
  }
}

export interface ChunkLocation {
  packId: string;
  offset: number;
  length: number;
  id: Buffer;
}

interface ResolvedLeaf {
  kind: 'leaf';
  /** The leaf page: count × 32-byte chunk ids. */
  ids: Buffer;
  pack: Uint32Array;
  offset: Uint32Array;
  length: Uint32Array;
  /** Blocks under this page whose chunk the index does not know. */
  missing: number;
}

interface ResolvedNode {
  kind: 'node';
  /** null: an all-zero child. */
  children: (ResolvedPage | null)[];
  missing: number;
}

type ResolvedPage = ResolvedLeaf | ResolvedNode;

/** Blocks covered by one page at `level`. */
const coverage = (level: number): number => MAP_PAGE_ENTRIES ** (level + 1);

export class BlockTable {
  readonly geometry: DiskGeometry;
  readonly blocks: number;

  constructor(
    readonly diskSize: number,
    readonly blockSize: number,
    private readonly depth: number,
    private readonly root: ResolvedPage | null,
    private readonly packIds: PackIds,
  ) {
    this.geometry = new DiskGeometry(diskSize, blockSize);
    this.blocks = this.geometry.blocks;
  }

  /** Bytes of block `block` (the last block may be short). */
  lengthOf(block: number): number {
    return this.geometry.lengthOf(block);
  }

  /** The leaf holding `block` and the block's entry in it, or undefined for a zero page. */
  private leafOf(block: number): { leaf: ResolvedLeaf; at: number } | undefined {
    let page = this.root;
    for (let level = this.depth; page !== null && page.kind === 'node'; level -= 1) {
      page = page.children[Math.floor(block / MAP_PAGE_ENTRIES ** level) % MAP_PAGE_ENTRIES] ?? null;
    }
    return page === null ? undefined : { leaf: page, at: block % MAP_PAGE_ENTRIES };
  }

  isZero(block: number): boolean {
    const found = this.leafOf(block);
    return found === undefined || found.leaf.pack[found.at] === ZERO_BLOCK;
  }

  isMissing(block: number): boolean {
    const found = this.leafOf(block);
    return found !== undefined && found.leaf.pack[found.at] === MISSING_BLOCK;
  }

  id(block: number): Buffer {
    const found = this.leafOf(block);
    if (!found) return ZERO_ID;
    return found.leaf.ids.subarray(found.at * ID_SIZE, (found.at + 1) * ID_SIZE);
  }

  location(block: number): ChunkLocation | undefined {
    const found = this.leafOf(block);
    if (!found) return undefined;
    const { leaf, at } = found;
    const pack = leaf.pack[at]!;
    if (pack === ZERO_BLOCK || pack === MISSING_BLOCK) return undefined;
    return { packId: this.packIds.ids[pack]!, offset: leaf.offset[at]!, length: leaf.length[at]!, id: leaf.ids.subarray(at * ID_SIZE, (at + 1) * ID_SIZE) };
  }

  /** Blocks whose chunk the index does not know: reading them answers EIO. */
  get missing(): number {
    return this.root?.missing ?? 0;
  }
}

/**
 * Resolves maps into block tables (needs the repository's index, so: under the lock). One resolver per
 * server: a page resolved for one disk serves every other place it occurs. `memoryBytes` is what the
 * resolved pages hold.
 */
export class BlockTableResolver {
  private readonly pages = new Map<string, ResolvedPage>();
  memoryBytes = 0;

  constructor(
    private readonly repo: Repository,
    readonly packIds: PackIds = new PackIds(),
  ) {}

  async resolve(disk: DiskRecord): Promise<BlockTable> {
    const { blocks, depth } = disk.map;
    // Checked when the record was read; checked again here because the walk below relies on it.
    if (depth !== mapDepth(blocks)) throw new CorruptMetadataError('block map', `depth ${depth} does not fit ${blocks} blocks`);
    const root = blocks === 0 ? null : await this.page(Buffer.from(disk.map.root, 'hex'), depth, blocks);
    return new BlockTable(disk.size, this.repo.blockSize, depth, root, this.packIds);
  }

  /** The resolved page `id` at `level` covering `count` blocks (a page holds exactly what its place implies). */
  private async page(id: Buffer, level: number, count: number): Promise<ResolvedPage | null> {
    if (id.equals(ZERO_ID)) return null;
    const key = `${level}:${count}:${id.toString('hex')}`;
    const known = this.pages.get(key);
    if (known) return known;
    const page = await this.repo.loadPage(id, level === 0 ? KIND_MAP_LEAF : KIND_MAP_NODE);
    const resolved = level === 0 ? await this.leaf(id, page, count) : await this.node(id, page, level, count);
    this.pages.set(key, resolved);
    return resolved;
  }

  private async leaf(id: Buffer, page: Buffer, count: number): Promise<ResolvedLeaf> {
    if (page.length !== count * ID_SIZE) throw new CorruptMetadataError(`map page ${id.toString('hex')}`, `holds ${page.length / ID_SIZE} entries, expected ${count}`);
    const leaf: ResolvedLeaf = { kind: 'leaf', ids: page, pack: new Uint32Array(count).fill(ZERO_BLOCK), offset: new Uint32Array(count), length: new Uint32Array(count), missing: 0 };
    this.memoryBytes += count * BYTES_PER_BLOCK;
    const wanted: number[] = [];
    for (let i = 0; i < count; i += 1) if (!ZERO_ID.equals(page.subarray(i * ID_SIZE, (i + 1) * ID_SIZE))) wanted.push(i);
    // A chunk whose pack is gone or cut short is missing too: announced at start, answered with EIO.
    const locations = await this.repo.packPresence.filter(await this.repo.lookup(wanted.map((i) => page.subarray(i * ID_SIZE, (i + 1) * ID_SIZE))));
    wanted.forEach((i, n) => {
      const location = locations[n];
      if (!location) {
        leaf.pack[i] = MISSING_BLOCK;
        leaf.missing += 1;
        return;
      }
      leaf.pack[i] = this.packIds.number(location.packId);
      leaf.offset[i] = location.offset;
      leaf.length[i] = location.length;
    });
    return leaf;
  }

  private async node(id: Buffer, page: Buffer, level: number, count: number): Promise<ResolvedNode> {
    const childCoverage = coverage(level - 1);
    const childCount = Math.ceil(count / childCoverage);
    if (page.length !== childCount * ID_SIZE) throw new CorruptMetadataError(`map page ${id.toString('hex')}`, `holds ${page.length / ID_SIZE} children, expected ${childCount}`);
    const node: ResolvedNode = { kind: 'node', children: [], missing: 0 };
    this.memoryBytes += childCount * 8;
    for (let i = 0; i < childCount; i += 1) {
      const child = await this.page(Buffer.from(page.subarray(i * ID_SIZE, (i + 1) * ID_SIZE)), level - 1, Math.min(childCoverage, count - i * childCoverage));
      node.children.push(child);
      node.missing += child?.missing ?? 0;
    }
    return node;
  }
}
