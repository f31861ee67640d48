/**
 * `engine mount` / `engine umount`: file-level restore. A backup's disks are served by a background
 * `serve` (serve-daemon.ts) on a socket in the mount's state directory, each export appears as a file
 * through nbdfuse, partition tables are read (partition-table.ts), and every ext2/3/4 or xfs filesystem is
 * mounted read-only through a read-only loop device over its byte range:
 *
 *   <dir>/<disk>/        the filesystem of a disk without a partition table
 *   <dir>/<disk>/p<N>/   the filesystem of partition N
 *
 * Everything a mount creates (server, nbdfuse processes, loop devices, mounts, directories) is recorded
 * in <run dir>/mounts/<hash of dir>/state.json as soon as it exists, so `umount` (or a mount that fails
 * half-way) removes exactly that, in reverse order, and nothing is left behind: no mount, loop device,
 * process or reader registration. The run dir is $ENGINE_RUN_DIR, /run/engine by default.
 */
import { refuseInsideRepository } from '../host/write-guard.js';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, openSync } from 'node:fs';
import { chmod, open, readdir, readFile, realpath, rename, rm, rmdir, stat, unlink, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CorruptMetadataError, EngineError, InvalidArgumentError } from '../../repo-format/errors.js';
import { isS3Url } from '../../repo-format/storage/s3-url.js';
import { removeDeadProcessLease } from '../../repo-format/v3/dead-lease.js';
import { noticeSink } from '../../repo-format/notices.js';
import { isProcessAlive } from '../../repo-format/process-alive.js';
import { checkLocalPath } from '../../repo-format/local-path.js';
import { diskFileName } from '../../repo-format/names.js';
import { createPrivateDirectory, ensurePrivateDirectory, MUTABLE_FILE_MODE, PRIVATE_DIRECTORY_MODE } from '../../repo-format/file-modes.js';
import { processIdentity, stopProcess } from '../host/process.js';
import { cleanUpDeadVmRuns } from '../vm/journal.js';
import { notInstalled, runTool } from '../cbt/run-tool.js';
import type { ServedExport } from '../serve/serve.js';
import { probeFilesystem } from './filesystem-probe.js';
import { readPartitionTable, type ReadAt } from './partition-table.js';
import { passphraseBytes, type Passphrase } from '../../repo-format/passphrase.js';
import { MOUNT_PASSPHRASE_VARIABLE } from './serve-daemon-env.js';
import type { Volume } from '../file-restore/files.js';

export interface MountOptions {
  repo: string;
  backupId: string;
  dir: string;
  disk?: string | undefined;
  runDir?: string | undefined;
  cacheBytes?: number | undefined;
  /** The passphrase of an encrypted repository; handed to the background server in its environment, never in argv. */
  passphrase?: Passphrase | undefined;
}

export interface MountedFilesystem {
  disk: string;
  /** Partition number, or null for a filesystem on the whole disk. */
  partition: number | null;
  offset: number;
  length: number;
  type: string | null;
  /** Where it is mounted, or null when it is not (`reason` says why). */
  path: string | null;
  loop: string | null;
  reason: string | null;
}

export interface MountResult {
  backup: string;
  dir: string;
  /** The disks as files (nbdfuse), for tools that want the raw image. */
  disks: { name: string; size: number; image: string; partitionTable: string }[];
  filesystems: MountedFilesystem[];
  serverPid: number;
  /** null when the repository is read without its lock (read-only or full: SPEC 12.6), and for version 3. */
  readerToken: string | null;
  /** Version 3: the key of the server's shared lease (leases/<id>.json); null for versions 1 and 2. */
  lease: string | null;
}

export interface MountState {
  version: 1;
  dir: string;
  repo: string;
  created: string;
  /** `identity` (boot id and start time, process.ts): a pid held by another process later is never signalled. */
  server?: { pid: number; identity?: string | undefined; readerToken?: string | null; lease?: string | null };
  fuse: { pid: number; identity?: string | undefined; mountpoint: string }[];
  loops: string[];
  mounts: string[];
  dirs: string[];
  /** `engine mount --vm`: the FUSE mount's source name (/proc/mounts); a mount at `mounts` with it is this one's. */
  fuseSource?: string | undefined;
  result?: MountResult | VmMountResult;
}

/** `engine mount --vm` (SPEC 16.3): one FUSE mount of the appliance's view; its process serves the backup too. */
export interface VmMountResult {
  backup: string;
  dir: string;
  mode: 'vm';
  volumes: Volume[];
  serverPid: number;
  readerToken: string | null;
  lease: string | null;
}

const WAIT_MS = 20_000;

function runDirOf(options: { runDir?: string | undefined }): string {
  return options.runDir ?? process.env.ENGINE_RUN_DIR ?? '/run/engine';
}

async function canonical(dir: string): Promise<string> {
  return realpath(dir).catch(() => resolve(dir));
}

export function stateDirFor(runDir: string, dir: string): string {
  return join(runDir, 'mounts', createHash('sha256').update(dir).digest('hex').slice(0, 16));
}

export async function saveState(stateDir: string, state: MountState): Promise<void> {
  const path = join(stateDir, 'state.json');
  await writeFile(`${path}.tmp`, JSON.stringify(state, null, 2), { mode: MUTABLE_FILE_MODE });
  await rename(`${path}.tmp`, path);
}

async function waitFor(what: string, check: () => Promise<boolean>, timeoutMs = WAIT_MS): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new EngineError('ENGINE_TIMEOUT', `${what} did not happen within ${timeoutMs / 1000} s`, { what });
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** The device mounted at `path` (the newest mount there), or undefined when nothing is. */
async function mountedAt(path: string): Promise<string | undefined> {
  const mounts = await readFile('/proc/mounts', 'utf8');
  // /proc/mounts escapes spaces and the like as octal.
  const escaped = path.replace(/[ \t\n\\]/g, (c) => `\\${c.charCodeAt(0).toString(8).padStart(3, '0')}`);
  const lines = mounts.split('\n').filter((line) => line.split(' ')[1] === escaped);
  return lines.length === 0 ? undefined : lines[lines.length - 1]!.split(' ')[0];
}

/**
 * Whether loop device `loop` is still this mount's: its backing file is one of the mount's nbdfuse files.
 * A recorded loop device can be detached by someone else and the name reused (or, with a persistent
 * ENGINE_RUN_DIR, the host rebooted): another's loop device is never detached.
 */
async function loopIsOurs(loop: string, stateDir: string): Promise<boolean> {
  const backing = await runTool('losetup', ['--list', '--noheadings', '--output', 'BACK-FILE', loop]).catch(() => '');
  return backing.trim().replace(/ \(deleted\)$/, '').startsWith(`${stateDir}/`);
}

/** What a background process of a mount reports over IPC once it serves. */
export interface DaemonReady {
  readerToken?: string | null;
  lease?: string | null;
  backupId?: string;
  exports?: ServedExport[];
  volumes?: Volume[];
  /** The backup's `libvirt-domain` attachment, or null: for a live restore's new domain. */
  domainXml?: string | null;
  notices?: string[];
}

/**
 * Starts a mount's background process (`script`: serve-daemon.js, or the VM mount's fuse-daemon.js) with its
 * options as one JSON argument; resolves with its pid and report once it serves.
 */
export function startDaemon<O extends { passphrase?: Passphrase | undefined }>(script: string, options: O, logPath: string, nodeArguments: string[] = []): Promise<DaemonReady & { pid: number; readerToken: string | null; lease: string | null; backupId: string }> {
  const log = openSync(logPath, 'a', MUTABLE_FILE_MODE);
  const { passphrase, ...visible } = options;
  // argv is readable by every user of the host (ps); the environment of a process is not. The passphrase
  // goes as base64 of its bytes (an environment value is text, a passphrase is bytes: SPEC.md, 18.2).
  const env = { ...process.env, [MOUNT_PASSPHRASE_VARIABLE]: passphrase === undefined ? '' : passphraseBytes(passphrase).toString('base64') };
  const child = spawn(process.execPath, [...nodeArguments, script, JSON.stringify(visible)], { detached: true, stdio: ['ignore', log, log, 'ipc'], env });
  closeSync(log);
  return new Promise((resolvePromise, reject) => {
    const fail = (error: Error): void => {
      if (child.pid !== undefined && isProcessAlive(child.pid)) process.kill(child.pid, 'SIGTERM');
      reject(error);
    };
    child.once('error', fail);
    child.once('exit', (code) => fail(new EngineError('ENGINE_INTERNAL', `the mount's server exited (${code}) before it was ready; see ${logPath}`)));
    child.once('message', (message: DaemonReady & { ready?: boolean; error?: { message: string; code?: string; details?: Record<string, unknown> } }) => {
      child.removeAllListeners('exit');
      if (message.error) {
        reject(new EngineError((message.error.code as never) ?? 'ENGINE_INTERNAL', message.error.message, message.error.details ?? {}));
        return;
      }
      child.disconnect();
      child.unref();
      const notice = noticeSink();
      for (const text of message.notices ?? []) notice(text);
      resolvePromise({ ...message, pid: child.pid!, readerToken: message.readerToken ?? null, lease: message.lease ?? null, backupId: message.backupId! });
    });
  });
}

/** The background server's script: next to this module in dist/engine/mount/, and in dist/bundle/ (scripts/bundle.mjs). */
export function serveDaemonScript(): string {
  return fileURLToPath(new URL('./serve-daemon.js', import.meta.url));
}

/** Starts nbdfuse for one export; resolves once the file is there. */
async function startFuse(uriSocket: string, exportName: string, mountpoint: string): Promise<number> {
  await ensurePrivateDirectory(mountpoint);
  const pidFile = `${mountpoint}.pid`;
  const uri = `nbd+unix:///${encodeURIComponent(exportName)}?socket=${uriSocket}`;
  const child = spawn('nbdfuse', ['-r', '-P', pidFile, join(mountpoint, 'disk'), uri], { detached: true, stdio: 'ignore' });
  child.unref();
  let exited: string | undefined;
  child.once('error', (error) => {
    exited = (error as NodeJS.ErrnoException).code === 'ENOENT' ? `nbdfuse failed to start: ${notInstalled('nbdfuse')}` : `nbdfuse failed to start (${error.message})`;
  });
  child.once('exit', (code) => {
    exited = `nbdfuse exited with code ${code}`;
  });
  try {
    await waitFor(`nbdfuse of ${exportName} becoming ready`, async () => {
      if (exited) throw new EngineError('ENGINE_TOOL_FAILED', exited);
      return stat(pidFile).then(() => true, () => false);
    });
  } catch (error) {
    // Not yet in the state: stop it here, or a timed-out nbdfuse would outlive the failed mount.
    if (child.pid !== undefined && exited === undefined) await stopProcess(child.pid, 5000).catch(() => undefined);
    if (await mountedAt(mountpoint)) await runTool('umount', [mountpoint]).catch(() => undefined);
    throw error;
  }
  await unlink(pidFile).catch(() => undefined);
  return child.pid!;
}

function fileReader(path: string, size: number): { readAt: ReadAt; close: () => Promise<void> } {
  let handle: Awaited<ReturnType<typeof open>> | undefined;
  return {
    readAt: async (offset, length) => {
      handle ??= await open(path, 'r');
      const out = Buffer.alloc(length);
      if (offset >= size) return out;
      await handle.read(out, 0, Math.min(length, size - offset), offset);
      return out;
    },
    close: async () => {
      await handle?.close();
    },
  };
}

/**
 * Checks and claims the mount point of a mount (either kind): an empty (or new) directory outside any
 * repository, made private, not already an engine mount; its state directory made and the state saved.
 */
export async function prepareMount(options: MountOptions): Promise<{ dir: string; stateDir: string; state: MountState }> {
  checkLocalPath(options.dir, 'mount directory');
  const existing = await stat(options.dir).catch(() => undefined);
  if (existing && !existing.isDirectory()) throw new InvalidArgumentError(`mount point ${options.dir} is not a directory: give an empty (or new) directory`);
  // The mount point and what mount creates under it never go inside a repository (write-guard.ts).
  await refuseInsideRepository(options.dir, 'mount point', options.repo);
  await ensurePrivateDirectory(options.dir);
  const dir = await canonical(options.dir);
  if ((await readdir(dir)).length > 0) throw new InvalidArgumentError(`mount point ${dir} is not empty`);
  // The guest's files keep the guest's owners and modes, and its uids and gids mean other users here: only
  // the owner of the mount point may enter it (SPEC.md, 16.2).
  await chmod(dir, PRIVATE_DIRECTORY_MODE);
  const stateDir = stateDirFor(runDirOf(options), dir);
  if (await stat(join(stateDir, 'state.json')).then(() => true, () => false)) throw new InvalidArgumentError(`${dir} is already an engine mount: engine umount ${dir} first`);
  await ensurePrivateDirectory(stateDir);
  const state: MountState = { version: 1, dir, repo: isS3Url(options.repo) ? options.repo : resolve(options.repo), created: new Date().toISOString(), fuse: [], loops: [], mounts: [], dirs: [] };
  await saveState(stateDir, state);
  return { dir, stateDir, state };
}

export async function mount(options: MountOptions): Promise<MountResult> {
  const { dir, stateDir, state } = await prepareMount(options);
  try {
    const socket = join(stateDir, 'nbd.sock');
    const server = await startDaemon(serveDaemonScript(), { repo: options.repo, backupId: options.backupId, disk: options.disk, socket, cacheBytes: options.cacheBytes, passphrase: options.passphrase }, join(stateDir, 'serve.log'));
    state.server = { pid: server.pid, identity: processIdentity(server.pid), readerToken: server.readerToken, lease: server.lease };
    await saveState(stateDir, state);

    const result: MountResult = { backup: server.backupId, dir, disks: [], filesystems: [], serverPid: server.pid, readerToken: server.readerToken, lease: server.lease };
    for (const [i, exp] of (server.exports ?? []).entries()) {
      const mountpoint = join(stateDir, `fuse-${i}`);
      const pid = await startFuse(socket, exp.name, mountpoint);
      state.fuse.push({ pid, identity: processIdentity(pid), mountpoint });
      await saveState(stateDir, state);
      const image = join(mountpoint, 'disk');
      const reader = fileReader(image, exp.size);
      try {
        const table = await readPartitionTable(reader.readAt, exp.size);
        result.disks.push({ name: exp.name, size: exp.size, image, partitionTable: table.scheme });
        const areas = table.scheme === 'none' ? [{ number: null, offset: 0, length: exp.size }] : table.partitions.map((p) => ({ number: p.number as number | null, offset: p.offset, length: p.length }));
        for (const area of areas) {
          const fs = await probeFilesystem(reader.readAt, area.offset, area.length);
          const entry: MountedFilesystem = { disk: exp.name, partition: area.number, offset: area.offset, length: area.length, type: fs?.type ?? null, path: null, loop: null, reason: null };
          result.filesystems.push(entry);
          if (!fs) {
            entry.reason = 'no ext2/3/4 or xfs filesystem found';
            continue;
          }
          const loop = (await runTool('losetup', ['--find', '--show', '--read-only', '--offset', String(area.offset), '--sizelimit', String(area.length), image])).trim();
          state.loops.push(loop);
          await saveState(stateDir, state);
          entry.loop = loop;
          const diskDir = join(dir, diskFileName(exp.name));
          const target = area.number === null ? diskDir : join(diskDir, `p${area.number}`);
          for (const created of [diskDir, target]) {
            if (!(await stat(created).then(() => true, () => false))) {
              await createPrivateDirectory(created);
              state.dirs.push(created);
            }
          }
          // Recorded before it exists: a mount killed right after `mount` still leaves it in the state.
          state.mounts.push(target);
          await saveState(stateDir, state);
          await runTool('mount', ['-t', fs.type, '-o', fs.mountOptions, loop, target]);
          entry.path = target;
        }
      } finally {
        await reader.close();
      }
    }
    state.result = result;
    await saveState(stateDir, state);
    return result;
  } catch (error) {
    await teardown(stateDir, state).catch(() => undefined);
    throw error;
  }
}

export interface UmountResult {
  dir: string;
  unmounted: number;
  loopDevicesDetached: number;
  fuseStopped: number;
  /** True when the background server was running and was stopped; false when it had already gone (killed, crashed). */
  serverStopped: boolean;
}

export async function umount(options: { dir: string; runDir?: string | undefined }): Promise<UmountResult> {
  checkLocalPath(options.dir, 'mount directory');
  const dir = await canonical(options.dir);
  const stateDir = stateDirFor(runDirOf(options), dir);
  const text = await readFile(join(stateDir, 'state.json'), 'utf8').catch(() => undefined);
  if (text === undefined) throw new InvalidArgumentError(`${dir} is not an engine mount (no state in ${stateDir})`);
  return teardown(stateDir, parseState(text, join(stateDir, 'state.json')));
}

/**
 * A mount's state as saved, checked enough for teardown to walk it: a damaged file (edited, or written by
 * a disk that lost it) is named, never a TypeError half-way through a teardown.
 */
function parseState(text: string, path: string): MountState {
  let state: Partial<MountState> | null;
  try {
    state = JSON.parse(text) as Partial<MountState> | null;
  } catch {
    throw new CorruptMetadataError(`mount state ${path}`, 'it is not JSON; unmount and detach what it listed by hand (findmnt, losetup -l), then remove it');
  }
  const texts = (value: unknown): boolean => Array.isArray(value) && value.every((v) => typeof v === 'string');
  const pids = (value: unknown): boolean => Array.isArray(value) && value.every((f: Partial<MountState['fuse'][number]> | null) => typeof f?.pid === 'number' && typeof f.mountpoint === 'string');
  const complete =
    typeof state === 'object' &&
    state !== null &&
    state.version === 1 &&
    typeof state.dir === 'string' &&
    typeof state.repo === 'string' &&
    texts(state.mounts) &&
    texts(state.loops) &&
    texts(state.dirs) &&
    pids(state.fuse) &&
    (state.server === undefined || typeof state.server.pid === 'number');
  if (!complete) throw new CorruptMetadataError(`mount state ${path}`, 'it lacks what umount needs (version 1, dir, repo, mounts, loops, dirs, fuse); unmount and detach what it listed by hand, then remove it');
  return state as MountState;
}

/** Undoes what `state` records, newest first; the state shrinks as each piece goes, so a retry resumes. */
export async function teardown(stateDir: string, state: MountState): Promise<UmountResult> {
  const result: UmountResult = { dir: state.dir, unmounted: 0, loopDevicesDetached: 0, fuseStopped: 0, serverStopped: false };
  while (state.mounts.length > 0) {
    const target = state.mounts[state.mounts.length - 1]!;
    // Only a filesystem on one of this mount's loop devices: whatever else is mounted there is not ours.
    const device = await mountedAt(target);
    // (--vm: the FUSE mount whose source names this mount; after a kill -9 of its process a dead one, which
    // umount(2) still removes.)
    if (device !== undefined && (state.loops.includes(device) || (state.fuseSource !== undefined && device === state.fuseSource))) await runTool('umount', [target]);
    state.mounts.pop();
    result.unmounted += 1;
    await saveState(stateDir, state);
  }
  while (state.loops.length > 0) {
    const loop = state.loops[state.loops.length - 1]!;
    if (await loopIsOurs(loop, stateDir)) await runTool('losetup', ['--detach', loop]).catch((error: unknown) => {
      // Already gone (a previous attempt) is fine; a busy device is not.
      if (!/No such device|not a block device|No such device or address/i.test((error as Error).message)) throw error;
    });
    state.loops.pop();
    result.loopDevicesDetached += 1;
    await saveState(stateDir, state);
  }
  for (const created of [...state.dirs].reverse()) await rmdir(created).catch(() => undefined);
  state.dirs = [];
  while (state.fuse.length > 0) {
    const fuse = state.fuse[state.fuse.length - 1]!;
    if (await mountedAt(fuse.mountpoint)) await runTool('umount', [fuse.mountpoint]);
    await stopProcess(fuse.pid, 10_000, fuse.identity);
    await rmdir(fuse.mountpoint).catch(() => undefined);
    state.fuse.pop();
    result.fuseStopped += 1;
    await saveState(stateDir, state);
  }
  if (state.server) {
    result.serverStopped = await stopProcess(state.server.pid, 10_000, state.server.identity);
    // A server that had to be killed (or died) could not release its registration: do it for it.
    if (state.server.readerToken && /^[0-9a-f]{16}$/.test(state.server.readerToken)) await unlink(join(state.repo, 'readers', `${state.server.readerToken}.json`)).catch(() => undefined);
    // Version 3: its lease too, if it is still there and its process provably gone (dead-lease.ts); on S3 with
    // the credentials umount runs with. One it cannot remove is broken by the next command on this host.
    if (state.server.lease && /^leases\/[0-9a-f]{32}\.json$/.test(state.server.lease)) await removeDeadProcessLease(state.repo, state.server.lease).catch(() => undefined);
    delete state.server;
    await saveState(stateDir, state);
  }
  // A `mount --vm` process killed with -9 leaves its VM's run folder (vm/journal.ts; its QEMU died with it):
  // removed here rather than by the next VM run.
  if (state.fuseSource !== undefined) await cleanUpDeadVmRuns();
  await rm(stateDir, { recursive: true, force: true });
  return result;
}
