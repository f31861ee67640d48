/**
 * The kernel's FUSE protocol on /dev/fuse, spoken here (SPEC 16.3, `engine mount --vm`): Node has no
 * maintained FUSE binding, and the protocol a read-only file system needs is small. The layouts are the
 * kernel's include/uapi/linux/fuse.h (protocol 7.31 answered; every kernel since 5.4 speaks it); all
 * little-endian (x86-64, the appliance's only host architecture).
 *
 * The mount is made by mount(8) with `-i` (no helper) and `fd=3`: the /dev/fuse descriptor this process
 * opened is the child's fd 3 when it calls mount(2), and the kernel keeps the file after the child exits.
 * It is read-only (`ro`: the kernel answers EROFS to every write before asking), nosuid, nodev, and with
 * default_permissions (the kernel checks the guest's modes against the caller; only root, or the owner of
 * the mount, enters it at all since allow_other is not given).
 *
 * Requests are read one at a time (a blocking read on libuv's thread pool) and answered out of order as
 * their answers arrive: the kernel sends reads of one file in parallel (FUSE_ASYNC_READ).
 */
import { spawn } from 'node:child_process';
import { closeSync, openSync, read, writeSync } from 'node:fs';
import { EngineError } from '../../repo-format/errors.js';

const OP = {
  LOOKUP: 1, FORGET: 2, GETATTR: 3, SETATTR: 4, READLINK: 5, SYMLINK: 6, MKNOD: 8, MKDIR: 9, UNLINK: 10, RMDIR: 11,
  RENAME: 12, LINK: 13, OPEN: 14, READ: 15, WRITE: 16, STATFS: 17, RELEASE: 18, FSYNC: 20, SETXATTR: 21,
  REMOVEXATTR: 24, INIT: 26, OPENDIR: 27, READDIR: 28, RELEASEDIR: 29, INTERRUPT: 36, DESTROY: 38,
  CREATE: 35, BATCH_FORGET: 42, FALLOCATE: 43, RENAME2: 45, COPY_FILE_RANGE: 47, SETUPMAPPING: 48, TMPFILE: 51,
} as const;

/** Operations that would change the file system: EROFS (the kernel refuses most of them itself on a ro mount). */
const WRITES = new Set<number>([OP.SETATTR, OP.SYMLINK, OP.MKNOD, OP.MKDIR, OP.UNLINK, OP.RMDIR, OP.RENAME, OP.LINK, OP.WRITE, OP.SETXATTR, OP.REMOVEXATTR, OP.CREATE, OP.FALLOCATE, OP.RENAME2, OP.COPY_FILE_RANGE, OP.TMPFILE]);

export const ERRNO = { EPERM: 1, ENOENT: 2, EIO: 5, EBADF: 9, EACCES: 13, ENOTDIR: 20, EISDIR: 21, EINVAL: 22, EROFS: 30, ERANGE: 34, ENOSYS: 38, ENAMETOOLONG: 36, ENOTCONN: 107, EPROTO: 71 } as const;

const IN_HEADER = 40;
const OUT_HEADER = 16;
const FUSE_ASYNC_READ = 1;
const FUSE_MAX_PAGES = 1 << 22;
const FOPEN_KEEP_CACHE = 1 << 1;
/** The largest READ the kernel sends (max_pages 256 × 4 KiB) and so the largest reply; the read buffer has room for a request of max_write. */
export const MAX_READ = 1024 * 1024;
const MAX_WRITE = 128 * 1024;
const READ_BUFFER = MAX_WRITE + 4096;

/** What a file system answers: stat-like attributes. Times are seconds and nanoseconds. */
export interface Attributes {
  ino: bigint;
  /** The whole st_mode: type bits and permissions. */
  mode: number;
  size: number;
  nlink: number;
  uid: number;
  gid: number;
  mtimeSec: number;
  mtimeNsec: number;
}

/** A read-only file system by node id (1 is the root); errors are thrown as FuseError(errno). */
export interface FuseFileSystem {
  lookup(parent: number, name: string): Promise<{ node: number; attributes: Attributes }>;
  forget(node: number, lookups: number): void;
  getattr(node: number): Promise<Attributes>;
  readlink(node: number): Promise<string>;
  /** A handle for reads of a regular file. */
  open(node: number): Promise<number>;
  read(handle: number, offset: number, length: number): Promise<Buffer>;
  release(handle: number): void;
  opendir(node: number): Promise<number>;
  /** Entries from index `offset` on (`.` and `..` included by the file system), for readdir. */
  readdir(handle: number, offset: number): { name: string; ino: bigint; type: number }[];
  releasedir(handle: number): void;
}

export class FuseError extends Error {
  constructor(readonly errno: number, message = `errno ${errno}`) {
    super(message);
  }
}

/** Seconds the kernel may keep names and attributes: a backup never changes. */
const VALID_SECONDS = 3600n;

function attr(target: Buffer, at: number, a: Attributes): void {
  target.writeBigUInt64LE(a.ino, at);
  target.writeBigUInt64LE(BigInt(a.size), at + 8);
  target.writeBigUInt64LE(BigInt(Math.ceil(a.size / 512)), at + 16);
  for (const slot of [24, 32, 40]) target.writeBigInt64LE(BigInt(a.mtimeSec), at + slot);
  for (const slot of [48, 52, 56]) target.writeUInt32LE(a.mtimeNsec, at + slot);
  target.writeUInt32LE(a.mode, at + 60);
  target.writeUInt32LE(a.nlink, at + 64);
  target.writeUInt32LE(a.uid, at + 68);
  target.writeUInt32LE(a.gid, at + 72);
  target.writeUInt32LE(0, at + 76); // rdev
  target.writeUInt32LE(65536, at + 80); // blksize: the size tools like cat read in
  target.writeUInt32LE(0, at + 84);
}

/** Where mount(8) can be told the fd: the fs name in /proc/mounts is `source`, the type fuse.engine. */
export async function mountFuse(fd: number, mountpoint: string, source: string): Promise<void> {
  const uid = process.getuid?.() ?? 0;
  const gid = process.getgid?.() ?? 0;
  const options = `ro,nosuid,nodev,noexec,fd=3,rootmode=40000,user_id=${uid},group_id=${gid},default_permissions`;
  await new Promise<void>((resolve, reject) => {
    const child = spawn('mount', ['-i', '-t', 'fuse.engine', '-o', options, source, mountpoint], { stdio: ['ignore', 'ignore', 'pipe', fd] });
    let stderr = '';
    child.stderr!.on('data', (chunk: Buffer) => {
      stderr += chunk.toString('utf8');
    });
    child.once('error', (error) => reject(new EngineError('ENGINE_TOOL_FAILED', `mount failed to start: ${error.message}`, { tool: 'mount' })));
    child.once('exit', (code) => (code === 0 ? resolve() : reject(new EngineError('ENGINE_TOOL_FAILED', `mount -t fuse.engine ${mountpoint} failed (${code}): ${stderr.trim()}`, { tool: 'mount' }))));
  });
}

/**
 * Serves `fs` on a new FUSE connection mounted at `mountpoint`. Resolves with `done` (the connection ended:
 * unmounted, or aborted) once the mount exists.
 */
export async function serveFuse(fs: FuseFileSystem, mountpoint: string, source: string, onError: (error: Error) => void): Promise<{ done: Promise<void> }> {
  const fd = openSync('/dev/fuse', 'r+');
  try {
    await mountFuse(fd, mountpoint, source);
  } catch (error) {
    closeSync(fd);
    throw error;
  }
  const connection = new Connection(fd, fs, onError);
  return { done: connection.run() };
}

class Connection {
  private readonly buffer = Buffer.alloc(READ_BUFFER);
  private ended = false;

  constructor(private readonly fd: number, private readonly fs: FuseFileSystem, private readonly onError: (error: Error) => void) {}

  async run(): Promise<void> {
    while (!this.ended) {
      let n: number;
      try {
        n = await new Promise<number>((resolve, reject) => read(this.fd, this.buffer, 0, this.buffer.length, null, (error, bytes) => (error ? reject(error) : resolve(bytes))));
      } catch (error) {
        const code = (error as NodeJS.ErrnoException).code;
        // One request interrupted before it was read: read on. ENODEV: unmounted (or the connection
        // aborted), the normal end.
        if (code === 'ENOENT' || code === 'EINTR' || code === 'EAGAIN') continue;
        if (code !== 'ENODEV') this.onError(error as Error);
        break;
      }
      if (n < IN_HEADER) continue;
      this.dispatch(Buffer.from(this.buffer.subarray(0, n)));
    }
    this.ended = true;
    closeSync(this.fd);
  }

  private reply(unique: bigint, errno: number, body?: Buffer): void {
    if (this.ended) return;
    const header = Buffer.alloc(OUT_HEADER);
    const length = OUT_HEADER + (errno === 0 && body ? body.length : 0);
    header.writeUInt32LE(length, 0);
    header.writeInt32LE(-errno, 4);
    header.writeBigUInt64LE(unique, 8);
    try {
      // One write per reply: the kernel takes a reply whole or not at all.
      writeSync(this.fd, errno === 0 && body ? Buffer.concat([header, body]) : header);
    } catch (error) {
      // ENOENT: the request was interrupted meanwhile and is no longer waited for.
      const code = (error as NodeJS.ErrnoException).code;
      if (code !== 'ENOENT' && code !== 'ENODEV' && code !== 'EBADF') this.onError(error as Error);
    }
  }

  private dispatch(request: Buffer): void {
    const opcode = request.readUInt32LE(4);
    const unique = request.readBigUInt64LE(8);
    const node = Number(request.readBigUInt64LE(16));
    const body = request.subarray(IN_HEADER);
    // No answer at all: the kernel waits for none.
    if (opcode === OP.FORGET) {
      this.fs.forget(node, Number(body.readBigUInt64LE(0)));
      return;
    }
    if (opcode === OP.BATCH_FORGET) {
      const count = body.readUInt32LE(0);
      for (let i = 0; i < count; i += 1) this.fs.forget(Number(body.readBigUInt64LE(8 + i * 16)), Number(body.readBigUInt64LE(16 + i * 16)));
      return;
    }
    if (opcode === OP.INTERRUPT) return;
    this.handle(opcode, node, body).then(
      (answer) => this.reply(unique, 0, answer),
      (error: unknown) => {
        if (error instanceof FuseError) this.reply(unique, error.errno);
        else {
          this.onError(error as Error);
          this.reply(unique, ERRNO.EIO);
        }
      },
    );
  }

  private async handle(opcode: number, node: number, body: Buffer): Promise<Buffer | undefined> {
    switch (opcode) {
      case OP.INIT: {
        const major = body.readUInt32LE(0);
        const minor = body.readUInt32LE(4);
        const readahead = body.readUInt32LE(8);
        const flags = body.readUInt32LE(12);
        if (major !== 7) throw new FuseError(ERRNO.EPROTO);
        const out = Buffer.alloc(64);
        out.writeUInt32LE(7, 0);
        out.writeUInt32LE(Math.min(minor, 31), 4);
        out.writeUInt32LE(readahead, 8);
        out.writeUInt32LE(flags & (FUSE_ASYNC_READ | FUSE_MAX_PAGES), 12);
        out.writeUInt16LE(16, 16); // max_background
        out.writeUInt16LE(12, 18); // congestion_threshold
        out.writeUInt32LE(MAX_WRITE, 20);
        out.writeUInt32LE(1, 24); // time_gran: nanoseconds
        out.writeUInt16LE(MAX_READ / 4096, 28); // max_pages
        return out;
      }
      case OP.DESTROY:
        return undefined;
      case OP.LOOKUP: {
        const end = body.indexOf(0);
        const name = body.subarray(0, end < 0 ? body.length : end).toString('utf8');
        const { node: child, attributes } = await this.fs.lookup(node, name);
        const out = Buffer.alloc(128);
        out.writeBigUInt64LE(BigInt(child), 0);
        out.writeBigUInt64LE(0n, 8); // generation
        out.writeBigUInt64LE(VALID_SECONDS, 16);
        out.writeBigUInt64LE(VALID_SECONDS, 24);
        attr(out, 40, attributes);
        return out;
      }
      case OP.GETATTR: {
        const out = Buffer.alloc(104);
        out.writeBigUInt64LE(VALID_SECONDS, 0);
        attr(out, 16, await this.fs.getattr(node));
        return out;
      }
      case OP.READLINK:
        return Buffer.from(await this.fs.readlink(node), 'utf8');
      case OP.OPEN:
      case OP.OPENDIR: {
        // O_ACCMODE: anything but O_RDONLY is a write.
        if (opcode === OP.OPEN && body.readUInt32LE(0) % 4 !== 0) throw new FuseError(ERRNO.EROFS);
        const handle = opcode === OP.OPEN ? await this.fs.open(node) : await this.fs.opendir(node);
        const out = Buffer.alloc(16);
        out.writeBigUInt64LE(BigInt(handle), 0);
        // The backup never changes: what the page cache holds of a file stays valid across opens.
        out.writeUInt32LE(opcode === OP.OPEN ? FOPEN_KEEP_CACHE : 0, 8);
        return out;
      }
      case OP.READ: {
        const handle = Number(body.readBigUInt64LE(0));
        const offset = Number(body.readBigUInt64LE(8));
        const size = body.readUInt32LE(16);
        return this.fs.read(handle, offset, Math.min(size, MAX_READ));
      }
      case OP.READDIR: {
        const handle = Number(body.readBigUInt64LE(0));
        const offset = Number(body.readBigUInt64LE(8));
        const size = body.readUInt32LE(16);
        const parts: Buffer[] = [];
        let used = 0;
        let index = offset;
        for (const entry of this.fs.readdir(handle, offset)) {
          const name = Buffer.from(entry.name, 'utf8');
          const length = 24 + name.length;
          const padded = Math.ceil(length / 8) * 8;
          if (used + padded > size) break;
          const dirent = Buffer.alloc(padded);
          index += 1;
          dirent.writeBigUInt64LE(entry.ino, 0);
          dirent.writeBigUInt64LE(BigInt(index), 8); // the offset of the next entry
          dirent.writeUInt32LE(name.length, 16);
          dirent.writeUInt32LE(entry.type, 20);
          name.copy(dirent, 24);
          parts.push(dirent);
          used += padded;
        }
        return Buffer.concat(parts, used);
      }
      case OP.RELEASE:
        this.fs.release(Number(body.readBigUInt64LE(0)));
        return undefined;
      case OP.RELEASEDIR:
        this.fs.releasedir(Number(body.readBigUInt64LE(0)));
        return undefined;
      case OP.STATFS: {
        // Nothing free (read-only), sizes unknown: df shows the mount with zeros.
        const out = Buffer.alloc(80);
        out.writeUInt32LE(4096, 40); // bsize
        out.writeUInt32LE(255, 44); // namelen
        out.writeUInt32LE(4096, 48); // frsize
        return out;
      }
      default:
        throw new FuseError(WRITES.has(opcode) ? ERRNO.EROFS : ERRNO.ENOSYS);
    }
  }
}
