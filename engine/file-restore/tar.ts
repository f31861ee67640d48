/**
 * The tar streams of a file restore (SPEC 16.3): the appliance's GNU tar output is parsed here (POSIX pax,
 * ustar, and GNU long names), every member's name sanitized, and the members either written to a directory
 * that they can never leave, or written again as a pax archive with the sanitized names. Names come from a
 * guest's file system, which an attacker may have crafted: they are never trusted.
 */
import { constants } from 'node:fs';
import { chmod, link, lchown, lstat, lutimes, mkdir, open, symlink, utimes } from 'node:fs/promises';
import { join } from 'node:path';
import type { Writable } from 'node:stream';
import { EngineError } from '../../repo-format/errors.js';

export type EntryType = 'file' | 'directory' | 'symlink' | 'hardlink' | 'char' | 'block' | 'fifo';

export interface TarEntry {
  /** Sanitized, relative, '/'-separated; never empty, never with '.' or '..' components. */
  path: string;
  type: EntryType;
  mode: number;
  uid: number;
  gid: number;
  /** Seconds since the epoch, as tar gave it (pax: exact, with its fraction). */
  mtime: string;
  size: number;
  /** Symlink target (as in the guest, not sanitized: it is never followed) or, for a hardlink, the sanitized path it links to. */
  linkname: string;
}

/**
 * A guest's name made safe as a relative host path: control characters become %XX, empty and '.'
 * components go, a leading '/' goes; null when a '..' component remains (the member is refused).
 */
export function sanitizePath(name: string): string | null {
  const parts: string[] = [];
  for (const part of name.split('/')) {
    if (part === '' || part === '.') continue;
    if (part === '..') return null;
    parts.push(part.replace(/[\u0000-\u001f\u007f]/g, (c) => `%${c.charCodeAt(0).toString(16).padStart(2, '0')}`));
  }
  return parts.length === 0 ? null : parts.join('/');
}

const BLOCK = 512;

function field(header: Buffer, offset: number, length: number): string {
  const raw = header.subarray(offset, offset + length);
  const end = raw.indexOf(0);
  return raw.subarray(0, end < 0 ? length : end).toString('utf8');
}

function numeric(header: Buffer, offset: number, length: number): number {
  const raw = header.subarray(offset, offset + length);
  if ((raw[0]! & 0x80) !== 0) {
    // GNU base-256 (positive only here).
    let value = 0;
    for (let i = 1; i < length; i += 1) value = value * 256 + raw[i]!;
    return value;
  }
  const text = raw.toString('latin1').replace(/[\0 ]+$/, '').trim();
  return text === '' ? 0 : parseInt(text, 8);
}

function parsePax(data: Buffer): Map<string, string> {
  const records = new Map<string, string>();
  let at = 0;
  while (at < data.length) {
    const space = data.indexOf(0x20, at);
    if (space < 0) break;
    const length = Number(data.subarray(at, space).toString('latin1'));
    if (!Number.isSafeInteger(length) || length <= 0 || at + length > data.length) break;
    const record = data.subarray(space + 1, at + length - 1).toString('utf8');
    const equals = record.indexOf('=');
    if (equals > 0) records.set(record.slice(0, equals), record.slice(equals + 1));
    at += length;
  }
  return records;
}

const TYPES: Record<string, EntryType> = { '0': 'file', '\0': 'file', '7': 'file', '1': 'hardlink', '2': 'symlink', '3': 'char', '4': 'block', '5': 'directory', '6': 'fifo' };

export interface MemberSink {
  /** A member; for a file, `data` yields its bytes (consume them all before returning). */
  entry(entry: TarEntry, data: AsyncIterable<Buffer>): Promise<void>;
  /** A member that was left out, and why (a '..' name, a type the restore does not make). */
  skipped(name: string, why: string): void;
}

/**
 * Parses a tar stream, handing each member to `sink` with its name sanitized. With `top`, each name's first
 * component is replaced by it (the appliance names a volume's root after its own mount point, `d0`, which the
 * host knows as the disk's name).
 */
export async function readTar(source: AsyncIterable<Buffer>, sink: MemberSink, top?: string): Promise<void> {
  const rename = (name: string): string => (top === undefined ? name : name.replace(/^\/*[^/]*/, top));
  const iterator = source[Symbol.asyncIterator]();
  let pending: Buffer = Buffer.alloc(0);
  let done = false;
  const fill = async (n: number): Promise<boolean> => {
    while (pending.length < n && !done) {
      const next = await iterator.next();
      if (next.done) done = true;
      else pending = pending.length === 0 ? next.value : Buffer.concat([pending, next.value]);
    }
    return pending.length >= n;
  };
  const take = (n: number): Buffer => {
    const taken = pending.subarray(0, n);
    pending = pending.subarray(n);
    return taken;
  };
  async function* body(size: number): AsyncGenerator<Buffer> {
    let left = size;
    while (left > 0) {
      if (pending.length === 0 && !(await fill(1))) throw new EngineError('ENGINE_TOOL_FAILED', 'the appliance\'s tar stream ended inside a member');
      const n = Math.min(left, pending.length);
      left -= n;
      yield Buffer.from(take(n));
    }
    const padding = (BLOCK - (size % BLOCK)) % BLOCK;
    if (!(await fill(padding))) throw new EngineError('ENGINE_TOOL_FAILED', 'the appliance\'s tar stream ended inside a member');
    take(padding);
  }
  const readAll = async (size: number): Promise<Buffer> => {
    const parts: Buffer[] = [];
    for await (const part of body(size)) parts.push(part);
    return Buffer.concat(parts);
  };
  let pax = new Map<string, string>();
  let longName: string | undefined;
  let longLink: string | undefined;
  for (;;) {
    if (!(await fill(BLOCK))) {
      if (pending.length === 0) return;
      throw new EngineError('ENGINE_TOOL_FAILED', 'the appliance\'s tar stream ended inside a header');
    }
    const header = Buffer.from(take(BLOCK));
    if (header.every((byte) => byte === 0)) continue;
    const typeflag = String.fromCharCode(header[156]!);
    let size = numeric(header, 124, 12);
    if (typeflag === 'x') {
      pax = parsePax(await readAll(size));
      continue;
    }
    if (typeflag === 'g') {
      await readAll(size);
      continue;
    }
    if (typeflag === 'L' || typeflag === 'K') {
      const text = (await readAll(size)).toString('utf8').replace(/\0+$/, '');
      if (typeflag === 'L') longName = text;
      else longLink = text;
      continue;
    }
    const ustarPrefix = field(header, 0, 6) !== '' && header.subarray(257, 262).toString('latin1') === 'ustar' ? field(header, 345, 155) : '';
    const rawName = pax.get('path') ?? longName ?? (ustarPrefix ? `${ustarPrefix}/${field(header, 0, 100)}` : field(header, 0, 100));
    const rawLink = pax.get('linkpath') ?? longLink ?? field(header, 157, 100);
    if (pax.has('size')) size = Number(pax.get('size'));
    const mtime = pax.get('mtime') ?? String(numeric(header, 136, 12));
    const uid = pax.has('uid') ? Number(pax.get('uid')) : numeric(header, 108, 8);
    const gid = pax.has('gid') ? Number(pax.get('gid')) : numeric(header, 116, 8);
    pax = new Map();
    longName = undefined;
    longLink = undefined;
    const type = TYPES[typeflag];
    const path = sanitizePath(rename(rawName));
    const data = type === 'file' ? body(size) : undefined;
    if (type === undefined || path === null) {
      sink.skipped(rawName, type === undefined ? `tar member type ${JSON.stringify(typeflag)}` : 'a ".." in its name');
      await readAll(type === 'file' || type === undefined ? size : 0);
      continue;
    }
    let linkname = rawLink;
    if (type === 'hardlink') {
      const target = sanitizePath(rename(rawLink));
      if (target === null) {
        sink.skipped(rawName, 'a hard link to a name with ".."');
        continue;
      }
      linkname = target;
    }
    const entry: TarEntry = { path, type, mode: numeric(header, 100, 8) & 0o7777, uid, gid, mtime, size: type === 'file' ? size : 0, linkname };
    await sink.entry(entry, data ?? (async function* () {})());
    if (data) for await (const _ of data) void _;
  }
}

/** Seconds (with a fraction) to what utimes takes; exact to about a microsecond (a double). */
function seconds(mtime: string): number {
  return Number(mtime);
}

export interface ExtractCounts {
  files: number;
  directories: number;
  symlinks: number;
  hardlinks: number;
  bytes: number;
  skipped: { name: string; why: string }[];
}

/**
 * Writes members under `dir` and nowhere else: every parent is a real directory (lstat, never a symlink a
 * member made), files are created with O_EXCL|O_NOFOLLOW (nothing existing is overwritten or followed),
 * hard links only to files already extracted here, device nodes and fifos skipped. Owners are kept when
 * running as root; modes and modification times always (directories' times set last).
 */
export class DirectorySink implements MemberSink {
  readonly counts: ExtractCounts = { files: 0, directories: 0, symlinks: 0, hardlinks: 0, bytes: 0, skipped: [] };
  private readonly directories: TarEntry[] = [];
  private readonly asRoot = process.getuid?.() === 0;

  constructor(private readonly dir: string) {}

  skipped(name: string, why: string): void {
    this.counts.skipped.push({ name, why });
  }

  /** Makes (or checks) the parents of `path` inside dir, refusing any that is not a real directory. */
  private async parents(path: string): Promise<string> {
    const parts = path.split('/');
    let at = this.dir;
    for (const part of parts.slice(0, -1)) {
      at = join(at, part);
      await mkdir(at, { mode: 0o700 }).catch((error: NodeJS.ErrnoException) => {
        if (error.code !== 'EEXIST') throw error;
      });
      const info = await lstat(at);
      if (!info.isDirectory()) throw new EngineError('ENGINE_INVALID_ARGUMENT', `refusing to extract through ${at}: it is not a directory (a member of the archive made it a ${info.isSymbolicLink() ? 'symlink' : 'file'})`, { path: at });
    }
    return join(at, parts[parts.length - 1]!);
  }

  private async owner(target: string, entry: TarEntry): Promise<void> {
    if (this.asRoot) await lchown(target, entry.uid, entry.gid);
  }

  async entry(entry: TarEntry, data: AsyncIterable<Buffer>): Promise<void> {
    const target = await this.parents(entry.path);
    switch (entry.type) {
      case 'directory': {
        await mkdir(target, { mode: 0o700 }).catch((error: NodeJS.ErrnoException) => {
          if (error.code !== 'EEXIST') throw error;
        });
        const info = await lstat(target);
        if (!info.isDirectory()) throw new EngineError('ENGINE_INVALID_ARGUMENT', `refusing to extract into ${target}: it is not a directory`, { path: target });
        this.directories.push(entry);
        this.counts.directories += 1;
        return;
      }
      case 'file': {
        const handle = await open(target, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600).catch((error: NodeJS.ErrnoException) => {
          if (error.code === 'EEXIST') throw new EngineError('ENGINE_TARGET_HOLDS_DATA', `${target} exists: a file restore never overwrites (or follows) what is there; extract into a new or empty directory`, { path: target });
          throw error;
        });
        try {
          for await (const chunk of data) {
            await handle.write(chunk);
            this.counts.bytes += chunk.length;
          }
        } finally {
          await handle.close();
        }
        await this.owner(target, entry);
        // After chown, which clears set-id bits.
        await chmod(target, entry.mode);
        await utimes(target, seconds(entry.mtime), seconds(entry.mtime));
        this.counts.files += 1;
        return;
      }
      case 'symlink':
        await symlink(entry.linkname, target);
        await this.owner(target, entry);
        await lutimes(target, seconds(entry.mtime), seconds(entry.mtime));
        this.counts.symlinks += 1;
        return;
      case 'hardlink': {
        const source = join(this.dir, entry.linkname);
        const info = await lstat(source).catch(() => undefined);
        // Only to a regular file of this extraction: lstat of a path whose parents were all checked above
        // as they were made; a link to anything else is left out.
        if (!info?.isFile()) {
          this.skipped(entry.path, 'a hard link to something that is not a file extracted here');
          return;
        }
        await link(source, target);
        this.counts.hardlinks += 1;
        return;
      }
      default:
        this.skipped(entry.path, `a ${entry.type} device or fifo (not made by a file restore)`);
    }
  }

  /** Directories' modes, owners and times, deepest first (writing into a directory changes its time). */
  async finish(): Promise<void> {
    for (const entry of this.directories.reverse()) {
      const target = join(this.dir, entry.path);
      await this.owner(target, entry);
      await chmod(target, entry.mode);
      await utimes(target, seconds(entry.mtime), seconds(entry.mtime));
    }
  }
}

function octal(value: number, length: number): string {
  return `${value.toString(8).padStart(length - 1, '0')}\0`;
}

function paxRecord(key: string, value: string): Buffer {
  const body = ` ${key}=${value}\n`;
  const bodyLength = Buffer.byteLength(body);
  let length = bodyLength + 1;
  while (String(length).length + bodyLength !== length) length = String(length).length + bodyLength;
  return Buffer.from(`${length}${body}`, 'utf8');
}

function ustarHeader(name: string, typeflag: string, size: number, entry: { mode: number; uid: number; gid: number; mtime: number; linkname: string }): Buffer {
  const header = Buffer.alloc(BLOCK);
  header.write(name.slice(0, 99), 0, 100, 'latin1');
  header.write(octal(entry.mode, 8), 100, 'latin1');
  header.write(octal(Math.min(entry.uid, 0o7777777), 8), 108, 'latin1');
  header.write(octal(Math.min(entry.gid, 0o7777777), 8), 116, 'latin1');
  header.write(octal(Math.min(size, 0o77777777777), 12), 124, 'latin1');
  header.write(octal(Math.max(0, Math.min(Math.floor(entry.mtime), 0o77777777777)), 12), 136, 'latin1');
  header.write('        ', 148, 'latin1');
  header.write(typeflag, 156, 'latin1');
  header.write(entry.linkname.slice(0, 99), 157, 100, 'latin1');
  header.write('ustar\u000000', 257, 'latin1');
  let sum = 0;
  for (const byte of header) sum += byte;
  header.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 'latin1');
  return header;
}

const FLAGS: Record<EntryType, string> = { file: '0', hardlink: '1', symlink: '2', char: '3', block: '4', directory: '5', fifo: '6' };

/**
 * Writes members again as a POSIX pax archive: each with a pax header holding the sanitized path, the link
 * target, the exact mtime, uid, gid and size, so any tar reads the names in full and the times as the
 * appliance's tar gave them. Device nodes and fifos are written too (the reader's tar decides).
 */
export class TarWriterSink implements MemberSink {
  readonly counts: ExtractCounts = { files: 0, directories: 0, symlinks: 0, hardlinks: 0, bytes: 0, skipped: [] };

  constructor(private readonly out: Writable) {}

  private async write(buffer: Buffer): Promise<void> {
    if (!this.out.write(buffer)) {
      await new Promise<void>((resolve, reject) => {
        const onError = (error: Error): void => reject(error);
        this.out.once('error', onError);
        this.out.once('drain', () => {
          this.out.off('error', onError);
          resolve();
        });
      });
    }
  }

  skipped(name: string, why: string): void {
    this.counts.skipped.push({ name, why });
  }

  async entry(entry: TarEntry, data: AsyncIterable<Buffer>): Promise<void> {
    const path = entry.type === 'directory' ? `${entry.path}/` : entry.path;
    const records = Buffer.concat([
      paxRecord('path', path),
      ...(entry.linkname && (entry.type === 'symlink' || entry.type === 'hardlink') ? [paxRecord('linkpath', entry.linkname)] : []),
      paxRecord('mtime', entry.mtime),
      paxRecord('uid', String(entry.uid)),
      paxRecord('gid', String(entry.gid)),
      paxRecord('size', String(entry.size)),
    ]);
    const common = { mode: entry.mode, uid: entry.uid, gid: entry.gid, mtime: Number(entry.mtime), linkname: '' };
    await this.write(ustarHeader('PaxHeader', 'x', records.length, { ...common, mode: 0o644 }));
    await this.write(Buffer.concat([records, Buffer.alloc((BLOCK - (records.length % BLOCK)) % BLOCK)]));
    await this.write(ustarHeader(path, FLAGS[entry.type], entry.size, { ...common, linkname: entry.linkname }));
    let written = 0;
    for await (const chunk of data) {
      await this.write(chunk);
      written += chunk.length;
    }
    if (written !== entry.size) throw new EngineError('ENGINE_TOOL_FAILED', `tar member ${entry.path}: ${written} bytes, not ${entry.size}`);
    await this.write(Buffer.alloc((BLOCK - (entry.size % BLOCK)) % BLOCK));
    this.counts.bytes += written;
    if (entry.type === 'file') this.counts.files += 1;
    else if (entry.type === 'directory') this.counts.directories += 1;
    else if (entry.type === 'symlink') this.counts.symlinks += 1;
    else if (entry.type === 'hardlink') this.counts.hardlinks += 1;
  }

  /** The end of the archive: two zero blocks. */
  async finish(): Promise<void> {
    await this.write(Buffer.alloc(2 * BLOCK));
  }
}
