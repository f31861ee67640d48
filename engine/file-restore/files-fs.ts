/**
 * A backup's files as a FUSE file system (fuse.ts), named as `engine files ls` names them (SPEC 16.3):
 * `<disk>/p<N>/…`, `<disk>/lvm/<VG>/<LV>/…`, `<disk>/…`. Directories are the appliance's LS, file bytes its
 * READ; both are cached here within a fixed budget (listings 8 MiB, file blocks 16 MiB), so a process
 * serving a mount stays far under the 300 MiB a process may use however large the guest's trees and files.
 *
 * Inode numbers (st_ino) are a hash of the path: stable for as long as the mount lives, with no table of
 * every path ever seen. The kernel's node ids are a table of the nodes it holds (until it forgets them).
 */
import { createHash } from 'node:crypto';
import { AgentError } from './appliance-vm.js';
import type { FileEntry, FileRestoreSession } from './files.js';
import { ERRNO, FuseError, type Attributes, type FuseFileSystem } from './fuse.js';

const S_IF: Record<FileEntry['type'], number> = { file: 0o100000, directory: 0o040000, volume: 0o040000, symlink: 0o120000, char: 0o020000, block: 0o060000, fifo: 0o010000, socket: 0o140000 };
const DT: Record<FileEntry['type'], number> = { file: 8, directory: 4, volume: 4, symlink: 10, char: 2, block: 6, fifo: 1, socket: 12 };

/** One READ of the appliance: a block of a file, and the unit of the cache and of read-ahead. */
export const BLOCK = 1024 * 1024;
const BLOCK_BUDGET = 16 * BLOCK;
const LISTING_BUDGET = 8 * 1024 * 1024;

/**
 * A node the kernel holds (until it forgets it): as small as it can be, since the kernel may hold one for
 * every file a `find` passed (its inode cache), and the listing it came from may be long gone.
 */
interface Node {
  path: string;
  attributes: Attributes;
  /** `type` of the entry: what open and readlink check. */
  type: FileEntry['type'];
  target: string | null;
  lookups: number;
}

interface Listing {
  /** The directory itself, inside a volume (a volume's root: its file system's root directory). */
  self?: FileEntry | undefined;
  children: Map<string, FileEntry>;
  bytes: number;
}

function inoOf(path: string): bigint {
  if (path === '') return 1n;
  const n = createHash('sha1').update(path).digest().readBigUInt64LE(0);
  // 0 and 1 are not used for others: 0 is "no inode", 1 the root.
  return n < 2n ? n + 2n : n;
}

function attributesOf(path: string, entry: FileEntry): Attributes {
  const [seconds = '0', fraction = ''] = entry.mtime.split('.');
  const directory = entry.type === 'directory' || entry.type === 'volume';
  return {
    ino: inoOf(path),
    mode: S_IF[entry.type] + (entry.type === 'volume' ? 0o555 : entry.mode),
    size: directory && entry.type === 'volume' ? 0 : entry.size,
    nlink: directory ? 2 : 1,
    uid: entry.uid,
    gid: entry.gid,
    mtimeSec: Number(seconds),
    mtimeNsec: Number(fraction.padEnd(9, '0').slice(0, 9)),
  };
}

const ROOT: FileEntry = { name: '', type: 'volume', size: 0, mode: 0o555, mtime: '0', uid: 0, gid: 0, target: null };

/** The errno of the appliance's answer (its strerror text), EIO for anything else. */
function errnoOf(error: unknown): FuseError {
  if (error instanceof FuseError) return error;
  const message = error instanceof AgentError ? error.agentMessage : '';
  if (/No such file/i.test(message)) return new FuseError(ERRNO.ENOENT);
  if (/Not a directory/i.test(message)) return new FuseError(ERRNO.ENOTDIR);
  if (/Permission denied/i.test(message)) return new FuseError(ERRNO.EACCES);
  if (/too long/i.test(message)) return new FuseError(ERRNO.ENAMETOOLONG);
  return new FuseError(ERRNO.EIO, (error as Error).message);
}

/** A least-recently-used map within a byte budget. */
class Lru<V> {
  private readonly items = new Map<string, { value: V; bytes: number }>();
  private used = 0;
  constructor(private readonly budget: number) {}

  get(key: string): V | undefined {
    const item = this.items.get(key);
    if (!item) return undefined;
    this.items.delete(key);
    this.items.set(key, item);
    return item.value;
  }

  set(key: string, value: V, bytes: number): void {
    const old = this.items.get(key);
    if (old) {
      this.used -= old.bytes;
      this.items.delete(key);
    }
    this.items.set(key, { value, bytes });
    this.used += bytes;
    for (const [oldest, item] of this.items) {
      if (this.used <= this.budget || oldest === key) break;
      this.items.delete(oldest);
      this.used -= item.bytes;
    }
  }
}

export class FilesFileSystem implements FuseFileSystem {
  private readonly nodes = new Map<number, Node>([[1, { path: '', attributes: attributesOf('', ROOT), type: 'volume', target: null, lookups: 1 }]]);
  private readonly byPath = new Map<string, number>([['', 1]]);
  private nextNode = 2;
  private readonly listings = new Lru<Listing>(LISTING_BUDGET);
  private readonly listingsInFlight = new Map<string, Promise<Listing>>();
  private readonly blocks = new Lru<Buffer>(BLOCK_BUDGET);
  private readonly blocksInFlight = new Map<string, Promise<Buffer>>();
  private readonly files = new Map<number, { path: string; size: number; next: number }>();
  private readonly dirs = new Map<number, { name: string; ino: bigint; type: number }[]>();
  private nextHandle = 1;

  constructor(private readonly session: FileRestoreSession) {}

  private node(id: number): Node {
    const node = this.nodes.get(id);
    if (!node) throw new FuseError(ERRNO.ENOENT);
    return node;
  }

  /** The children of the directory at `path`, from the cache or the appliance. */
  private listing(path: string): Promise<Listing> {
    const cached = this.listings.get(path);
    if (cached) return Promise.resolve(cached);
    let pending = this.listingsInFlight.get(path);
    if (!pending) {
      pending = this.load(path).finally(() => this.listingsInFlight.delete(path));
      this.listingsInFlight.set(path, pending);
    }
    return pending;
  }

  private async load(path: string): Promise<Listing> {
    let entries: FileEntry[];
    let self: FileEntry | undefined;
    if (path === '' || this.session.volumeOf(path) === undefined) {
      // Above the volumes; a volume that is not mounted (an LVM physical volume, a failed one) is empty.
      try {
        entries = this.session.listVolumes(path);
      } catch {
        entries = [];
      }
    } else {
      try {
        const listed = await this.session.entries(path);
        if (listed.self.type !== 'directory') throw new FuseError(ERRNO.ENOTDIR);
        self = listed.self;
        entries = listed.children;
      } catch (error) {
        throw errnoOf(error);
      }
    }
    const children = new Map<string, FileEntry>();
    let bytes = 0;
    for (const entry of entries) {
      children.set(entry.name, entry);
      // An entry object with its strings, as V8 holds it (measured ~400 bytes for a short name).
      bytes += 400 + 2 * (entry.name.length + (entry.target?.length ?? 0));
    }
    const listing = { self, children, bytes };
    this.listings.set(path, listing, bytes);
    return listing;
  }

  async lookup(parent: number, name: string): Promise<{ node: number; attributes: Attributes }> {
    const parentNode = this.node(parent);
    let entry = (await this.listing(parentNode.path)).children.get(name);
    if (!entry) throw new FuseError(ERRNO.ENOENT);
    const path = parentNode.path === '' ? name : `${parentNode.path}/${name}`;
    // A mounted volume shows its root directory's owner, mode and time (its listing is read next anyway).
    if (entry.type === 'volume' && this.session.volumeOf(path)?.name === path) {
      const root = await this.listing(path).then((listing) => listing.self, () => undefined);
      if (root) entry = { ...root, name };
    }
    const attributes = attributesOf(path, entry);
    let id = this.byPath.get(path);
    if (id === undefined) {
      id = this.nextNode;
      this.nextNode += 1;
      this.byPath.set(path, id);
      this.nodes.set(id, { path, attributes, type: entry.type, target: entry.target, lookups: 1 });
    } else this.nodes.get(id)!.lookups += 1;
    return { node: id, attributes };
  }

  forget(id: number, lookups: number): void {
    const node = this.nodes.get(id);
    if (!node || id === 1) return;
    node.lookups -= lookups;
    if (node.lookups <= 0) {
      this.nodes.delete(id);
      this.byPath.delete(node.path);
    }
  }

  getattr(id: number): Promise<Attributes> {
    return Promise.resolve(this.node(id).attributes);
  }

  readlink(id: number): Promise<string> {
    const node = this.node(id);
    if (node.type !== 'symlink' || node.target === null) throw new FuseError(ERRNO.EINVAL);
    return Promise.resolve(node.target);
  }

  open(id: number): Promise<number> {
    const node = this.node(id);
    if (node.type !== 'file') throw new FuseError(node.type === 'directory' || node.type === 'volume' ? ERRNO.EISDIR : ERRNO.EACCES);
    const handle = this.nextHandle;
    this.nextHandle += 1;
    this.files.set(handle, { path: node.path, size: node.attributes.size, next: 0 });
    return Promise.resolve(handle);
  }

  /** Block `index` of the file at `path`: cached, or being read, or read now. */
  private block(path: string, index: number): Promise<Buffer> {
    const key = `${index}\0${path}`;
    const cached = this.blocks.get(key);
    if (cached) return Promise.resolve(cached);
    let pending = this.blocksInFlight.get(key);
    if (!pending) {
      pending = this.session
        .read(path, index * BLOCK, BLOCK)
        .then((data) => {
          this.blocks.set(key, data, data.length + 128);
          return data;
        })
        .catch((error: unknown) => {
          throw errnoOf(error);
        })
        .finally(() => this.blocksInFlight.delete(key));
      this.blocksInFlight.set(key, pending);
    }
    return pending;
  }

  async read(handle: number, offset: number, length: number): Promise<Buffer> {
    const file = this.files.get(handle);
    if (!file) throw new FuseError(ERRNO.EBADF);
    const end = Math.min(offset + length, file.size);
    if (offset >= end) return Buffer.alloc(0);
    const first = Math.floor(offset / BLOCK);
    const last = Math.floor((end - 1) / BLOCK);
    const sequential = offset === file.next;
    file.next = end;
    const wanted: Promise<Buffer>[] = [];
    for (let index = first; index <= last; index += 1) wanted.push(this.block(file.path, index));
    // Read-ahead: a reader going through the file in order gets the next block asked for now, so that the
    // appliance reads it while this one travels (the kernel's own read-ahead is at most max_readahead).
    if (sequential && (last + 1) * BLOCK < file.size) void this.block(file.path, last + 1).catch(() => undefined);
    const blocks = await Promise.all(wanted);
    const joined = blocks.length === 1 ? blocks[0]! : Buffer.concat(blocks);
    const from = offset - first * BLOCK;
    return joined.subarray(from, Math.min(from + (end - offset), joined.length));
  }

  release(handle: number): void {
    this.files.delete(handle);
  }

  async opendir(id: number): Promise<number> {
    const node = this.node(id);
    const listing = await this.listing(node.path);
    const parentPath = node.path.includes('/') ? node.path.slice(0, node.path.lastIndexOf('/')) : '';
    const entries = [
      { name: '.', ino: inoOf(node.path), type: 4 },
      { name: '..', ino: inoOf(parentPath), type: 4 },
      ...[...listing.children.values()].map((entry) => ({ name: entry.name, ino: inoOf(node.path === '' ? entry.name : `${node.path}/${entry.name}`), type: DT[entry.type] })),
    ];
    const handle = this.nextHandle;
    this.nextHandle += 1;
    this.dirs.set(handle, entries);
    return handle;
  }

  readdir(handle: number, offset: number): { name: string; ino: bigint; type: number }[] {
    const entries = this.dirs.get(handle);
    if (!entries) throw new FuseError(ERRNO.EBADF);
    // A READDIR's answer is a page or so: never more than this many entries fit.
    return entries.slice(offset, offset + 1024);
  }

  releasedir(handle: number): void {
    this.dirs.delete(handle);
  }
}
