/**
 * `engine serve`: a backup's disks as NBD exports, one per disk, named after the disk.
 *
 * Versions 1 and 2: the repository lock is held only while the chunk locations are resolved
 * (block-table.ts): then the server registers as a reader (SPEC 12.2) and releases the lock, so that backups
 * keep running while a VM boots from the export for hours. Version 3 (a folder or S3): the server holds a
 * shared lease, refreshed, for as long as it serves, so backups, restores and prunes run beside it and gc's
 * deletions wait for it; when the lease is lost the server stops serving at once and says why (SPEC 19.9).
 * Chunks are read from the packs and checked before they are served; a damaged chunk fails the request
 * that needs it (EIO) and is logged, and the server keeps serving everything else.
 *
 * Memory: the block tables (44 B per block of distinct map pages; zero and repeated pages cost nothing), the chunk cache (`cacheBytes`, 64 MiB by default), the
 * worker slots (32 MiB), and per connection a bounded number of requests of at most 32 MiB.
 *
 * Access: a private Unix socket by default; TCP only with TLS and client authentication unless the caller
 * says `insecure` (listen-policy.ts), checked before the repository is opened.
 */
import { refuseInsideRepository } from '../host/write-guard.js';
import { unlinkSync } from 'node:fs';
import { registerReader, type RegisteredReader } from '../../repo-format/readers.js';
import { Repository } from '../../repo-format/repository.js';
import type { BackupRecord } from '../../repo-format/backup-record.js';
import type { RepositoryKeys } from '../../repo-format/crypto.js';
import type { FrameReader } from '../../repo-format/pack-file.js';
import { LeaseLostError } from '../../repo-format/errors.js';
import { BlockPool } from '../pipeline/block-pool.js';
import { NbdServer, type ListenAddress } from '../nbd/server.js';
import { loadTlsCredentials, type NbdTlsCredentials } from '../nbd/tls.js';
import { prepareSocketPath } from '../nbd/unix-socket.js';
import { DiskNotFoundError } from '../errors.js';
import { defaultSocketPath, exposureWarnings, planListen, type ListenRequest } from './listen-policy.js';
import { BackupExport } from './backup-export.js';
import { BlockTableResolver, type BlockTable } from './block-table.js';
import { ChunkCache, ChunkLoader } from './chunk-cache.js';
import { Overlay } from './overlay.js';
import type { Passphrase } from '../../repo-format/passphrase.js';
import { checkLocalPath } from '../../repo-format/local-path.js';
import { nameMatches } from '../../repo-format/names.js';

export const DEFAULT_CACHE_BYTES = 64 * 1024 * 1024;
const DEFAULT_READ_AHEAD_BYTES = 8 * 1024 * 1024;

/** Where and how to listen (socket, port, host, tls, insecure, writable) are the ListenRequest's. */
export interface ServeOptions extends ListenRequest {
  repo: string;
  backupId: string;
  /** Serve only this disk (default: every disk of the backup). */
  disk?: string | undefined;
  overlayDir?: string | undefined;
  cacheBytes?: number | undefined;
  readAheadBytes?: number | undefined;
  workers?: number | undefined;
  /** The passphrase of an encrypted repository. */
  passphrase?: Passphrase | undefined;
  onLog?: ((message: string) => void) | undefined;
  /** Stops the opening of the repository (a wait for the lease, the cache's catch-up); serving is stopped by close(). */
  signal?: AbortSignal | undefined;
  /** What the lease (or registration) says holds it: `serve` by default, `mount` for a mount's server. */
  holder?: 'serve' | 'mount' | undefined;
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
  /** How clients authenticate: 'x509' (a client certificate), 'psk' (a pre-shared key), or null (no TLS). */
  tls: 'x509' | 'psk' | null;
  /** What the caller must know about the exposure (serving without TLS on TCP). */
  warnings: string[];
  /** The reader registration (readers/<token>.json) held while serving; null for a repository read without its lock (SPEC 12.6), and for version 3. */
  readerToken: string | null;
  /** Version 3: the key of the shared lease held while serving (leases/<id>.json); null for versions 1 and 2. */
  lease: string | null;
  /**
   * Resolves (never rejects) once the server has stopped on its own because its lease was lost (version 3,
   * SPEC 19.9): the caller ends with that error. Never settles otherwise.
   */
  lost: Promise<LeaseLostError>;
  writable: boolean;
  tableBytes: number;
  stats(): { cacheHits: number; cacheMisses: number; badChunks: number; overlayBytesWritten: number };
  /** Stops the server, discards overlays, releases the registration. Idempotent. */
  close(): Promise<void>;
}

function uriFor(address: { socket?: string; port?: number; host?: string }, name: string, tls: boolean): string {
  const exportName = encodeURIComponent(name);
  const scheme = tls ? 'nbds' : 'nbd';
  if (address.socket) return `${scheme}+unix:///${exportName}?socket=${address.socket}`;
  const host = address.host && address.host.includes(':') ? `[${address.host}]` : address.host;
  return `${scheme}://${host}:${address.port}/${exportName}`;
}

/** Every served disk's block table, and what serving then reads from and holds. */
interface OpenedBackup {
  record: BackupRecord;
  tables: { name: string; table: BlockTable; missing: number }[];
  tableBytes: number;
  blockSize: number;
  /** The keys outlive the resolution: the workers open (decrypt and check) chunks while serving. */
  keys: RepositoryKeys | undefined;
  frames: FrameReader;
  /** Versions 1 and 2: the reader registration held while serving (none when read without the lock, SPEC 12.6). */
  reader: RegisteredReader | undefined;
  /** Version 3: the shared lease held while serving (SPEC 19.9). */
  lease: { key: string; lost: AbortSignal } | undefined;
  /** Lets go of what serving held: the registration and the detached store, or the repository and its lease. */
  release(): Promise<void>;
}

/**
 * Opens the repository and resolves every served disk's block table. Versions 1 and 2: under the lock, then
 * registered as a reader, the lock released and frames read through a store of their own (a folder).
 * Version 3: the shared lease is taken and kept (refreshed) for as long as the server runs, and frames are
 * read through the repository handle that holds it, which checks the lease before every read (SPEC 19.9).
 */
async function openBackup(options: ServeOptions): Promise<OpenedBackup> {
  const command = options.holder ?? 'serve';
  const repo = await Repository.open(options.repo, { access: 'exclusive', command, passphrase: options.passphrase, readWithoutLock: true, manyWriters: true, signal: options.signal });
  let keep = false;
  try {
    const record = await repo.findBackup(options.backupId);
    const disks = options.disk === undefined ? record.disks : record.disks.filter((d) => nameMatches(d.name, options.disk!));
    if (disks.length === 0) throw new DiskNotFoundError(record.id, options.disk ?? '', record.disks.map((d) => d.name));
    // One resolver for every disk: pages they share are resolved once (block-table.ts).
    const resolver = new BlockTableResolver(repo);
    const tables: { name: string; table: BlockTable; missing: number }[] = [];
    for (const disk of disks) {
      const table = await resolver.resolve(disk);
      tables.push({ name: disk.name, table, missing: table.missing });
    }
    const resolved = { record, tables, tableBytes: resolver.memoryBytes, blockSize: repo.blockSize, keys: repo.keys };
    const lease = repo.lease;
    if (lease) {
      keep = true;
      return { ...resolved, frames: repo, reader: undefined, lease, release: () => repo.close() };
    }
    // Registered before the lock goes: no moment where a gc could see neither the lock nor the reader. A
    // repository read without its lock (read-only, or full) cannot be registered in (SPEC 12.6).
    const reader = repo.withoutLock ? undefined : await registerReader(repo.root, command, [record.id]);
    const frames = repo.detachedStore();
    const release = async (): Promise<void> => {
      await frames.close().catch(() => undefined);
      await reader?.release();
    };
    return { ...resolved, frames, reader, lease: undefined, release };
  } finally {
    if (!keep) await repo.close();
  }
}

export async function serve(options: ServeOptions): Promise<ServeHandle> {
  // Path arguments that look like URLs are refused first (local-path.ts).
  for (const [path, what] of [[options.socket, 'socket'], [options.overlayDir, 'overlayDir'], [options.tls?.certificates, 'tls.certificates'], [options.tls?.pskFile, 'tls.pskFile']] as const) {
    if (path !== undefined) checkLocalPath(path, what);
  }
  const plan = planListen(options);
  const warn = (message: string): void => options.onLog?.(message);
  const tlsCredentials: NbdTlsCredentials | undefined = plan.tls ? await loadTlsCredentials(options.tls ?? {}, 'server', warn) : undefined;
  // A path that cannot be used is said before the repository is opened; one inside a repository is never
  // touched (not even a stale socket there replaced).
  const socket = 'socket' in plan.address ? plan.address.socket : undefined;
  await refuseServeFilesInRepository(options, socket);
  if (socket !== undefined) await prepareSocketPath(socket, warn);
  const opened = await openBackup(options);
  const { record, tables, tableBytes, reader, frames, blockSize, keys, lease } = opened;
  const overlays: Overlay[] = [];
  let pool: BlockPool | undefined;
  let server: NbdServer | undefined;
  try {
    pool = new BlockPool({ blockSize, workers: options.workers ?? 2, keys });
    const loader = new ChunkLoader(pool, frames, new ChunkCache(options.cacheBytes ?? DEFAULT_CACHE_BYTES));
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
    server = new NbdServer({ exports, preferredBlockSize: 4096, tls: tlsCredentials, onLog: options.onLog });
    const listenOn: ListenAddress = 'defaultSocket' in plan.address ? { socket: await defaultSocketPath(record.id) } : plan.address;
    const address = await server.listen(listenOn);
    const warnings = address.port !== undefined ? exposureWarnings(plan, address.host ?? '', address.port) : [];
    for (const warning of warnings) warn(warning);
    const running = { server, pool };
    let closed: Promise<void> | undefined;
    // Version 3: a lost lease (refreshes failed, or it was removed or replaced) ends serving at once; what
    // the lease protected (no pack deleted while it is read) no longer holds (SPEC 19.9).
    let onLost: (() => void) | undefined;
    const lost = new Promise<LeaseLostError>((resolve) => {
      if (!lease) return;
      onLost = () => {
        const reason = lease.lost.reason as { details?: { why?: unknown } } | undefined;
        const why = typeof reason?.details?.why === 'string' ? reason.details.why : 'it could not be kept';
        const error = new LeaseLostError(options.repo, lease.key, why, 'serving stopped, since a gc may now delete the packs it reads (start it again to serve on)');
        void close().finally(() => resolve(error));
      };
      if (lease.lost.aborted) queueMicrotask(onLost);
      else lease.lost.addEventListener('abort', onLost, { once: true });
    });
    // However the process ends (an uncaught error included), the registration goes with it.
    const removeAtExit = (): void => {
      try {
        if (reader) unlinkSync(reader.path);
      } catch {
        // already released
      }
    };
    process.once('exit', removeAtExit);
    return {
      backup: record,
      exports: tables.map(({ name, table, missing }) => ({ name, size: table.diskSize, uri: uriFor(address, name, tlsCredentials !== undefined), missingChunks: missing })),
      address,
      tls: tlsCredentials?.kind ?? null,
      warnings,
      readerToken: reader?.registration.token ?? null,
      lease: lease?.key ?? null,
      lost,
      writable: options.writable === true,
      tableBytes,
      stats: () => ({
        cacheHits: loader.cache.hits,
        cacheMisses: loader.cache.misses,
        badChunks: exports.reduce((sum, e) => sum + e.badChunks, 0),
        overlayBytesWritten: overlays.reduce((sum, o) => sum + o.bytesWritten, 0),
      }),
      close,
    };
    function close(): Promise<void> {
      closed ??= (async () => {
        if (onLost) lease?.lost.removeEventListener('abort', onLost);
        await running.server.close().catch(() => undefined);
        for (const overlay of overlays) await overlay.close().catch(() => undefined);
        await running.pool.close().catch(() => undefined);
        await opened.release();
        process.removeListener('exit', removeAtExit);
      })();
      return closed;
    }
  } catch (error) {
    await server?.close().catch(() => undefined);
    for (const overlay of overlays) await overlay.close().catch(() => undefined);
    await pool?.close().catch(() => undefined);
    await opened.release();
    throw error;
  }
}

/** The socket and the overlay are files serve creates where it is told: never inside a repository (write-guard.ts). */
async function refuseServeFilesInRepository(options: ServeOptions, socket: string | undefined): Promise<void> {
  if (socket !== undefined) await refuseInsideRepository(socket, 'serve socket', options.repo);
  if (options.overlayDir !== undefined) await refuseInsideRepository(options.overlayDir, 'overlay directory', options.repo);
}
