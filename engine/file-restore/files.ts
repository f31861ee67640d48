/**
 * `engine files ls` / `engine files extract`: file-level restore through a throw-away appliance VM (SPEC
 * 16.3). The backup is served in this process on a private Unix socket (engine/serve/), read-only; the
 * appliance (appliance.ts, built on first use) boots with the disks attached read-only over NBD, activates
 * LVM read-only and mounts every filesystem it knows read-only without journal replay; its agent lists
 * directories and streams tar archives over a virtio-serial port. The guest's file systems are parsed by the
 * appliance's kernel, never by this host's.
 *
 * Names (SPEC 16.3): `<disk>/` a filesystem on a whole disk, `<disk>/p<N>/` partition N, `<disk>/lvm/<VG>/<LV>/`
 * a logical volume (under the disk holding its VG's first physical volume). btrfs is mounted at its top level
 * (subvolid 5), so every subvolume is a directory of its volume (`vda/p2/@home/…`).
 */
import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import type { Writable } from 'node:stream';
import { EngineError, InterruptedError, InvalidArgumentError } from '../../repo-format/errors.js';
import type { Passphrase } from '../../repo-format/passphrase.js';
import { serve } from '../serve/serve.js';
import { ensureAppliance } from './appliance.js';
import { AgentError, ApplianceVm } from './appliance-vm.js';
import { acceleratorChoice, withAccelerator } from '../vm/accelerator.js';
import { cleanedNotice, VmRunJournal } from '../vm/journal.js';
import { DirectorySink, readTar, TarWriterSink, type ExtractCounts } from './tar.js';

export interface FilesOptions {
  repo: string;
  backupId: string;
  /** Attach only this disk (default: every disk of the backup; LVM spanning disks needs them all). */
  disk?: string | undefined;
  passphrase?: Passphrase | undefined;
  cacheBytes?: number | undefined;
  signal?: AbortSignal | undefined;
  /** What the run is, for its journal (`ls`, `extract`). */
  purpose?: 'ls' | 'extract' | 'mount' | undefined;
  /** What the run says on its own (the appliance being built, a dead run cleaned up after). */
  onNotice?: ((message: string) => void) | undefined;
}

export interface Volume {
  /** Its name in paths: `vda/p1`, `vda`, `vda/lvm/VG/LV`. */
  name: string;
  /** As blkid names it (`ext4`, `xfs`, `btrfs`, `vfat`, `ntfs`, `LVM2_member`, `swap`), or `none`. */
  type: string;
  /** `mounted`, `failed` (detail says why), `lvm` (a physical volume), `unsupported`, `unknown`. */
  state: string;
  size: number;
  detail: string;
}

export interface FileEntry {
  name: string;
  type: 'file' | 'directory' | 'symlink' | 'char' | 'block' | 'fifo' | 'socket' | 'volume';
  size: number;
  /** Permission bits (12), as a number. */
  mode: number;
  /** Seconds since the epoch with nanoseconds: "1700000000.123456789". */
  mtime: string;
  uid: number;
  gid: number;
  /** A symlink's target; null otherwise. */
  target: string | null;
  /** For a volume (or a folder of volumes): what it holds. */
  volume?: Volume | undefined;
}

export interface Timings {
  /** From the call to the appliance's agent answering (served, booted, volumes mounted). */
  applianceReadyMs: number;
  /** From the call to the first byte of the answer (a listing, or the first tar bytes). */
  firstByteMs: number | null;
  accel: 'kvm' | 'tcg';
}

const TYPE_NAMES: Record<string, FileEntry['type']> = { f: 'file', d: 'directory', l: 'symlink', c: 'char', b: 'block', p: 'fifo', s: 'socket' };

/** The session of one command: a server, a VM, and the translation of disk names to the appliance's d<K>. */
export class FileRestoreSession {
  private constructor(
    readonly vm: ApplianceVm,
    readonly disks: string[],
    readonly volumes: Volume[],
    readonly backupId: string,
    private readonly started: number,
    readonly applianceReadyMs: number,
    /** The server's reader registration (versions 1, 2) and lease (version 3), for a mount's state (umount releases them after a kill -9). */
    readonly readerToken: string | null = null,
    readonly lease: string | null = null,
  ) {}

  /**
   * One attempt under `accel`, in a run folder of its own ($ENGINE_RUN_DIR/vms/<run>/, vm/journal.ts: the
   * server's, the agent's and QMP's sockets, the console; a dead run's leftovers are cleaned up first).
   * `close` removes everything, the folder last; so does a failed attempt.
   */
  static async open(options: FilesOptions, accel: 'kvm' | 'tcg', started: number): Promise<{ session: FileRestoreSession; close: () => Promise<void> }> {
    const { journal, cleaned } = await VmRunJournal.begin(options.purpose ? `files ${options.purpose}` : 'files', { repo: options.repo });
    for (const run of cleaned) options.onNotice?.(cleanedNotice(run));
    const cleanups: (() => Promise<void>)[] = [() => journal.end()];
    const close = async (): Promise<void> => {
      for (const cleanup of cleanups.reverse()) await cleanup().catch(() => undefined);
      cleanups.length = 0;
    };
    try {
      const appliance = await ensureAppliance(options.onNotice);
      const socket = join(journal.dir, 'nbd.sock');
      const handle = await serve({ repo: options.repo, backupId: options.backupId, disk: options.disk, socket, passphrase: options.passphrase, cacheBytes: options.cacheBytes, signal: options.signal, holder: 'mount' });
      cleanups.push(() => handle.close());
      await journal.update({ readerToken: handle.readerToken, lease: handle.lease });
      const disks = handle.exports.map((e) => e.name);
      const vm = await ApplianceVm.start({ appliance, nbdSocket: socket, disks: disks.map((exportName) => ({ exportName })), dir: journal.dir, accel, started: (process) => journal.update({ vm: process }), signal: options.signal });
      cleanups.push(() => vm.close());
      const applianceReadyMs = Date.now() - started;
      const table = Buffer.concat(await collect(vm.request('VOLUMES'))).toString('utf8');
      const volumes: Volume[] = [];
      for (const line of table.split('\n')) {
        if (!line) continue;
        const [name = '', type = '', state = '', size = '0', detail = ''] = line.split('\t');
        const match = /^d(\d+)(\/.*)?$/.exec(name);
        const disk = match ? disks[Number(match[1])] : undefined;
        if (disk === undefined) continue;
        volumes.push({ name: `${disk}${match![2] ?? ''}`, type, state, size: Number(size), detail });
      }
      return { session: new FileRestoreSession(vm, disks, volumes, handle.backup.id, started, applianceReadyMs, handle.readerToken, handle.lease), close };
    } catch (error) {
      await close();
      throw error;
    }
  }

  /** The appliance's name of a host path (`vda/p1/etc` → `d0/p1/etc`), or undefined when no disk is named. */
  private toAppliance(path: string): string | undefined {
    const [disk, ...rest] = path.split('/');
    const index = this.disks.indexOf(disk ?? '');
    return index < 0 ? undefined : [`d${index}`, ...rest].join('/');
  }

  /** The mounted volume holding `path`, if any (the longest volume name that is a whole-component prefix). */
  volumeOf(path: string): Volume | undefined {
    let best: Volume | undefined;
    for (const volume of this.volumes) {
      if (volume.state !== 'mounted') continue;
      if ((path === volume.name || path.startsWith(`${volume.name}/`)) && (!best || volume.name.length > best.name.length)) best = volume;
    }
    return best;
  }

  /**
   * The entries of a directory (or the one entry a file is). Above the volumes (``, `vda`, `vda/lvm`),
   * the disks and volumes themselves, as entries of type `volume`.
   */
  async list(path: string): Promise<FileEntry[]> {
    const clean = normalize(path);
    if (this.volumeOf(clean) === undefined) return this.listVolumes(clean);
    const { self, children } = await this.entries(clean);
    return self.type === 'directory' ? children.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0)) : [self];
  }

  /**
   * The entry at `path` (inside a mounted volume) and, for a directory, its children in the file system's
   * order. Throws AgentError (the appliance's strerror text as agentMessage) for a path that is not there.
   */
  async entries(path: string): Promise<{ self: FileEntry; children: FileEntry[] }> {
    const translated = this.toAppliance(normalize(path))!;
    const raw = Buffer.concat(await collect(this.vm.request('LS', translated)));
    const fields = raw.toString('utf8').split('\0');
    const entries: FileEntry[] = [];
    for (let i = 0; i + 8 <= fields.length; i += 8) {
      const [type = 'f', mode = '0', size = '0', mtime = '0', uid = '0', gid = '0', name = '', target = ''] = fields.slice(i, i + 8);
      entries.push({ name, type: TYPE_NAMES[type] ?? 'file', size: Number(size), mode: parseInt(mode, 8), mtime, uid: Number(uid), gid: Number(gid), target: type === 'l' ? target : null });
    }
    // The first entry is the path itself: a directory lists its children, anything else itself.
    const [self, ...children] = entries;
    if (!self) throw new InvalidArgumentError(`no such path in backup ${this.backupId}: ${path}`, { path });
    return { self, children };
  }

  /** Up to `length` (at most 4 MiB) bytes of the regular file at `path` from `offset`; fewer only at its end. */
  async read(path: string, offset: number, length: number): Promise<Buffer> {
    const clean = normalize(path);
    if (this.volumeOf(clean) === undefined) throw new InvalidArgumentError(`${path} is not inside a mounted volume of backup ${this.backupId}`, { path });
    return Buffer.concat(await collect(this.vm.request('READ', this.toAppliance(clean)!, String(offset), String(length))));
  }

  /** The disks and volumes above the volumes' contents (``, `vda`, `vda/lvm`, …), as entries of type `volume`. */
  listVolumes(path: string): FileEntry[] {
    const prefix = path === '' ? '' : `${path}/`;
    const seen = new Map<string, FileEntry>();
    for (const volume of this.volumes) {
      if (!volume.name.startsWith(prefix) && path !== '') continue;
      const rest = volume.name.slice(prefix.length).split('/');
      const name = rest[0]!;
      if (seen.has(name)) continue;
      const exact = rest.length === 1;
      seen.set(name, { name, type: 'volume', size: exact ? volume.size : 0, mode: 0o555, mtime: '0', uid: 0, gid: 0, target: null, volume: exact ? volume : undefined });
    }
    // A disk with no volumes still shows.
    if (path === '') for (const disk of this.disks) if (!seen.has(disk)) seen.set(disk, { name: disk, type: 'volume', size: 0, mode: 0o555, mtime: '0', uid: 0, gid: 0, target: null });
    if (seen.size === 0) throw new InvalidArgumentError(`no such path in backup ${this.backupId}: ${path} (the volumes are ${this.volumes.map((v) => v.name).join(', ') || 'none'})`, { path });
    return [...seen.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  /** A tar stream (GNU tar in the appliance) of `path`, its members named from path's last component. */
  tar(path: string): AsyncGenerator<Buffer> {
    const clean = normalize(path);
    const volume = this.volumeOf(clean);
    if (!volume) throw new InvalidArgumentError(`${path} is not inside a mounted volume of backup ${this.backupId} (the volumes are ${this.volumes.map((v) => `${v.name} (${v.type}, ${v.state})`).join(', ') || 'none'})`, { path });
    return this.vm.request('TAR', this.toAppliance(clean)!);
  }

  elapsed(): number {
    return Date.now() - this.started;
  }
}

function normalize(path: string): string {
  return path.split('/').filter((part) => part !== '' && part !== '.').join('/');
}

async function collect(source: AsyncIterable<Buffer>): Promise<Buffer[]> {
  const parts: Buffer[] = [];
  for await (const part of source) parts.push(part);
  return parts;
}

/**
 * An open session under vm/accelerator.ts's rule (a KVM that cannot run the appliance gets it started again under
 * TCG, only while it starts); `close` removes everything. For a caller that outlives one command (the FUSE mount).
 */
export function openFileRestore(options: FilesOptions): Promise<{ session: FileRestoreSession; close: () => Promise<void> }> {
  const started = Date.now();
  // No notice of a retry: on a host whose KVM fails it would be every command's; `--json` timings say which ran.
  return withAccelerator(acceleratorChoice(), (accel) => FileRestoreSession.open(options, accel, started));
}

/**
 * Runs `work` with an open session, and removes everything afterwards however it ends (VM, server, run
 * folder). The accelerator is vm/accelerator.ts's rule: a KVM that cannot run the appliance gets it started
 * again under TCG (only while it starts: once its agent answered, KVM runs it).
 */
export async function withFileRestore<T>(options: FilesOptions, work: (session: FileRestoreSession) => Promise<T>): Promise<T> {
  try {
    const { session, close } = await openFileRestore(options);
    try {
      return await work(session);
    } finally {
      await close();
    }
  } catch (error) {
    if (options.signal?.aborted) throw new InterruptedError('the file restore', 'nothing was left behind', signalName(options.signal));
    throw error;
  }
}

function signalName(signal: AbortSignal): string | undefined {
  const reason: unknown = signal.reason;
  return typeof reason === 'string' ? reason : undefined;
}

export interface FilesListResult {
  backup: string;
  path: string;
  entries: FileEntry[];
  volumes: Volume[];
  timings: Timings;
}

export async function filesList(options: FilesOptions & { path: string }): Promise<FilesListResult> {
  return withFileRestore({ ...options, purpose: 'ls' }, async (session) => {
    const entries = await session.list(options.path);
    return { backup: session.backupId, path: normalize(options.path), entries, volumes: session.volumes, timings: { applianceReadyMs: session.applianceReadyMs, firstByteMs: session.elapsed(), accel: session.vm.accel } };
  });
}

export interface FilesExtractResult extends ExtractCounts {
  backup: string;
  paths: string[];
  /** The directory written into, or the tar file (`-`: stdout). */
  to: string;
  timings: Timings;
}

/**
 * Extracts `paths` (files or trees) into `to` (a directory, made if missing; nothing in it is overwritten) or
 * as one tar archive into `tar` (a stream). Each path's last component is the top of what it gives.
 */
export async function filesExtract(options: FilesOptions & { paths: string[]; to?: string | undefined; tar?: Writable | undefined; tarName?: string | undefined }): Promise<FilesExtractResult> {
  if ((options.to === undefined) === (options.tar === undefined)) throw new InvalidArgumentError('give one of a directory to extract into or a tar stream to write');
  if (options.paths.length === 0) throw new InvalidArgumentError('give at least one path to extract');
  if (options.to !== undefined) {
    await mkdir(options.to, { recursive: true, mode: 0o700 });
  }
  return withFileRestore({ ...options, purpose: 'extract' }, async (session) => {
    const sink = options.to !== undefined ? new DirectorySink(options.to) : new TarWriterSink(options.tar!);
    let firstByteMs: number | null = null;
    for (const path of options.paths) {
      const stream = session.tar(path);
      const timed = (async function* () {
        for await (const chunk of stream) {
          firstByteMs ??= session.elapsed();
          yield chunk;
        }
      })();
      try {
        // Members are named from the path's last component, as the user wrote it (a volume's root included).
        await readTar(timed, sink, normalize(path).split('/').pop());
      } catch (error) {
        if (error instanceof AgentError) throw new EngineError('ENGINE_TOOL_FAILED', `extracting ${path}: ${error.agentMessage || error.message}`, { path, exitCode: error.exitCode });
        throw error;
      }
    }
    await sink.finish();
    return { backup: session.backupId, paths: options.paths, to: options.to ?? options.tarName ?? '-', ...sink.counts, timings: { applianceReadyMs: session.applianceReadyMs, firstByteMs, accel: session.vm.accel } };
  });
}
