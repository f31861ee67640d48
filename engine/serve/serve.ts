/**
 * `engine serve`: a backup's disks as NBD exports, one per disk, named after the disk.
 *
 * The repository lock is held only while the chunk locations are resolved (block-table.ts): then the
 * server registers as a reader (SPEC 12.2) and releases the lock, so that backups keep running while a
 * VM boots from the export for hours. Chunks are then read straight from the packs and checked before
 * they are served; a damaged chunk fails the request that needs it (EIO) and is logged, and the server
 * keeps serving everything else.
 *
 * Memory: the block tables (44 B per block), the chunk cache (`cacheBytes`, 64 MiB by default), the
 * worker slots (32 MiB), and per connection a bounded number of requests of at most 32 MiB.
 */
import { refuseInsideRepository } from '../write-guard.js';
import { unlinkSync } from 'node:fs';
import { registerReader, type RegisteredReader } from '../../repo-format/readers.js';
import { Repository } from '../../repo-format/repository.js';
import type { BackupRecord } from '../../repo-format/backup-record.js';
import type { RepositoryKeys } from '../../repo-format/crypto.js';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { BlockPool } from '../pipeline/block-pool.js';
import { NbdServer, type ListenAddress } from '../nbd/server.js';
import { DiskNotFoundError } from '../errors.js';
import { BackupExport } from './backup-export.js';
import { PackIds, resolveBlockTable, type BlockTable } from './block-table.js';
import { ChunkCache, ChunkLoader } from './chunk-cache.js';
import { Overlay } from './overlay.js';

export const DEFAULT_CACHE_BYTES = 64 * 1024 * 1024;
const DEFAULT_READ_AHEAD_BYTES = 8 * 1024 * 1024;

export interface ServeOptions {
  repo: string;
  backupId: string;
  /** Serve only this disk (default: every disk of the backup). */
  disk?: string | undefined;
  /** Where to listen: a Unix socket path, or a TCP port (0: any free port) on `host` (default 127.0.0.1). */
  socket?: string | undefined;
  port?: number | undefined;
  host?: string | undefined;
  /** Guest writes go to a temporary copy-on-write overlay, discarded when the server stops. */
  writable?: boolean | undefined;
  overlayDir?: string | undefined;
  cacheBytes?: number | undefined;
  readAheadBytes?: number | undefined;
  workers?: number | undefined;
  /** The passphrase of an encrypted repository. */
  passphrase?: string | undefined;
  onLog?: ((message: string) => void) | undefined;
}

export interface ServedExport {
  name: string;
  size: number;
  uri: string;
  /** Blocks whose chunk the index does not know: reading them answers EIO. */
  missingChunks: number;
}

export interface ServeHandle {
  backup: BackupRecord;
  exports: ServedExport[];
  address: { socket?: string; port?: number; host?: string };
  /** The reader registration (readers/<token>.json) held while serving. */
  readerToken: string;
  writable: boolean;
  tableBytes: number;
  stats(): { cacheHits: number; cacheMisses: number; badChunks: number; overlayBytesWritten: number };
  /** Stops the server, discards overlays, releases the registration. Idempotent. */
  close(): Promise<void>;
}

function uriFor(address: { socket?: string; port?: number; host?: string }, name: string): string {
  const exportName = encodeURIComponent(name);
  if (address.socket) return `nbd+unix:///${exportName}?socket=${address.socket}`;
  const host = address.host && address.host.includes(':') ? `[${address.host}]` : address.host;
  return `nbd://${host}:${address.port}/${exportName}`;
}

/** Resolves every served disk's block table under the lock, registers as a reader, releases the lock. */
async function resolveUnderLock(options: ServeOptions): Promise<{ record: BackupRecord; tables: { name: string; table: BlockTable; missing: number }[]; reader: RegisteredReader; root: string; blockSize: number; keys: RepositoryKeys | undefined }> {
  const repo = await Repository.open(options.repo, { access: 'exclusive', command: 'serve', passphrase: options.passphrase });
  try {
    const record = await repo.findBackup(options.backupId);
    const disks = options.disk === undefined ? record.disks : record.disks.filter((d) => d.name === options.disk);
    if (disks.length === 0) throw new DiskNotFoundError(record.id, options.disk ?? '', record.disks.map((d) => d.name));
    const packIds = new PackIds();
    const tables: { name: string; table: BlockTable; missing: number }[] = [];
    for (const disk of disks) {
      const { table, missing } = await resolveBlockTable(repo, disk, packIds);
      tables.push({ name: disk.name, table, missing });
    }
    // Registered before the lock goes: no moment where a gc could see neither the lock nor the reader.
    const reader = await registerReader(repo.root, 'serve', [record.id]);
    // The keys outlive the repository handle: the workers open (decrypt and check) chunks while serving.
    return { record, tables, reader, root: repo.root, blockSize: repo.blockSize, keys: repo.keys };
  } finally {
    await repo.close();
  }
}

export async function serve(options: ServeOptions): Promise<ServeHandle> {
  if ((options.socket === undefined) === (options.port === undefined)) throw new InvalidArgumentError('serve needs exactly one of a Unix socket path or a TCP port');
  await refuseServeFilesInRepository(options);
  const { record, tables, reader, root, blockSize, keys } = await resolveUnderLock(options);
  const overlays: Overlay[] = [];
  let pool: BlockPool | undefined;
  let server: NbdServer | undefined;
  try {
    pool = new BlockPool({ blockSize, workers: options.workers ?? 2, keys });
    const loader = new ChunkLoader(pool, root, new ChunkCache(options.cacheBytes ?? DEFAULT_CACHE_BYTES));
    const readAheadBlocks = Math.max(1, Math.floor((options.readAheadBytes ?? DEFAULT_READ_AHEAD_BYTES) / blockSize));
    const exports: BackupExport[] = [];
    for (const [exportIndex, { name, table }] of tables.entries()) {
      const overlay = options.writable ? await Overlay.create(table.diskSize, blockSize, options.overlayDir) : undefined;
      if (overlay) overlays.push(overlay);
      exports.push(new BackupExport({ name, backupId: record.id, exportIndex, table, loader, readAheadBlocks, overlay, onLog: options.onLog }));
    }
    for (const { name, missing } of tables) {
      if (missing > 0) options.onLog?.(`disk ${name}: ${missing} chunks are missing (not in the index, or their pack is gone); reading them answers EIO`);
    }
    server = new NbdServer({ exports, preferredBlockSize: 4096, onLog: options.onLog });
    const listenOn: ListenAddress = options.socket !== undefined ? { socket: options.socket } : { port: options.port!, host: options.host };
    const address = await server.listen(listenOn);
    const running = { server, pool };
    let closed: Promise<void> | undefined;
    // However the process ends (an uncaught error included), the registration goes with it.
    const removeAtExit = (): void => {
      try {
        unlinkSync(reader.path);
      } catch {
        // already released
      }
    };
    process.once('exit', removeAtExit);
    return {
      backup: record,
      exports: tables.map(({ name, table, missing }) => ({ name, size: table.diskSize, uri: uriFor(address, name), missingChunks: missing })),
      address,
      readerToken: reader.registration.token,
      writable: options.writable === true,
      tableBytes: tables.reduce((sum, t) => sum + t.table.memoryBytes, 0),
      stats: () => ({
        cacheHits: loader.cache.hits,
        cacheMisses: loader.cache.misses,
        badChunks: exports.reduce((sum, e) => sum + e.badChunks, 0),
        overlayBytesWritten: overlays.reduce((sum, o) => sum + o.bytesWritten, 0),
      }),
      close: () => {
        closed ??= (async () => {
          await running.server.close().catch(() => undefined);
          for (const overlay of overlays) await overlay.close().catch(() => undefined);
          await running.pool.close().catch(() => undefined);
          await reader.release();
          process.removeListener('exit', removeAtExit);
        })();
        return closed;
      },
    };
  } catch (error) {
    await server?.close().catch(() => undefined);
    for (const overlay of overlays) await overlay.close().catch(() => undefined);
    await pool?.close().catch(() => undefined);
    await reader.release();
    throw error;
  }
}

/** The socket and the overlay are files serve creates where it is told: never inside a repository (write-guard.ts). */
async function refuseServeFilesInRepository(options: ServeOptions): Promise<void> {
  if (options.socket !== undefined) await refuseInsideRepository(options.socket, 'serve socket', options.repo);
  if (options.overlayDir !== undefined) await refuseInsideRepository(options.overlayDir, 'overlay directory', options.repo);
}
