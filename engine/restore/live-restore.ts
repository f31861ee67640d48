/**
 * Live restore (SPEC 16.4): a VM runs on its backup within seconds while its disks are copied back under it.
 *
 * The backup is served over NBD by a detached `serve` process (engine/mount/serve-daemon.ts) on a Unix socket
 * in the run's folder; each target is a new qcow2 whose backing file is that export (`qemu-img create -b
 * nbd+unix://…`). Reads of what the target does not hold yet go to the backup; writes go to the target from
 * the first second. Then the data is streamed into the target and the backing link cut:
 *
 * - `--libvirt NAME`: a new domain, defined from the backup's `libvirt-domain` attachment (live-domain-xml.ts),
 *   started on the targets; QEMU's block-stream (`virsh blockpull`) copies what the guest has not written and
 *   drops the backing file when it ends. The job runs in QEMU, not in the engine.
 * - `--to PATH.qcow2` (no VM): `qemu-img rebase -b ''` copies every cluster the image does not hold and then
 *   drops the backing file. Chosen over a qemu-storage-daemon's block-stream: with no guest there is nothing
 *   to serve the target to, and rebase is one process and no QMP; it skips clusters already in the image, so
 *   a rerun after a kill copies only the rest (convert would start over); it writes the header last, so the
 *   image is never without both its backing link and its data.
 *
 * The run journal, <run dir>/live/<hash of the target>/state.json, records the server (pid and identity, its
 * registration or lease), the targets and the domain as soon as each exists. The server outlives the engine:
 * a kill -9 of the engine leaves the guest running and the stream going (it is QEMU's); `--resume` finds the
 * journal, starts the server again if it died (QEMU's NBD client reconnects on its next request), starts the
 * stream again if it is not running, waits for it, then stops the server and removes the journal.
 *
 * While QEMU's streams run, a detached guard (live-guard.ts, recorded in the journal) aborts them the moment the
 * server dies, engine running or killed: QEMU 7.2's stream would give the guest zeros instead of EIO. It is the one
 * mechanism; the engine's wait only reports a dead server (and aborts the jobs itself only if the guard is gone).
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { openSync, closeSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { chmod, chown, mkdir, readFile, rename, rm, stat, unlink, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { CorruptMetadataError, EngineError, InvalidArgumentError } from '../../repo-format/errors.js';
import { isS3Url } from '../../repo-format/storage/s3-url.js';
import { removeDeadProcessLease } from '../../repo-format/v3/dead-lease.js';
import { checkLocalPath } from '../../repo-format/local-path.js';
import { diskFileName, nameMatches } from '../../repo-format/names.js';
import { MUTABLE_FILE_MODE } from '../../repo-format/file-modes.js';
import { isProcessAlive } from '../../repo-format/process-alive.js';
import type { Passphrase } from '../../repo-format/passphrase.js';
import { processIdentity, stopProcess } from '../host/process.js';
import { signalName } from '../host/interrupt.js';
import { InterruptedError, TargetUnwritableError } from '../errors.js';
import { runTool, runToolJson, ToolError } from '../cbt/run-tool.js';
import { serveDaemonScript, startDaemon } from '../mount/mount.js';
import type { ServedExport } from '../serve/serve.js';
import { domainDiskTargets, liveDomainXml } from './live-domain-xml.js';
import type { LiveGuardOrders } from './live-guard.js';

export interface LiveRestoreOptions {
  repo: string;
  passphrase?: Passphrase | undefined;
  backupId: string;
  disk?: string | undefined;
  /** No VM: a new qcow2 file (one disk), or a directory that gets <disk>.qcow2 for each. */
  to?: string | undefined;
  /** A new libvirt domain of this name; its images go to `imageDir`. */
  libvirt?: string | undefined;
  /** Where the new domain's images are made (default /var/lib/libvirt/images). */
  imageDir?: string | undefined;
  /** --libvirt: QEMU's stream limited to this many bytes per second (0 or none: no limit). */
  bandwidth?: number | undefined;
  cacheBytes?: number | undefined;
  runDir?: string | undefined;
  signal?: AbortSignal | undefined;
  onProgress?: ((p: { disk: string; bytesDone: number; bytesTotal: number }) => void) | undefined;
  onNotice?: ((message: string) => void) | undefined;
}

export interface LiveResumeOptions {
  to?: string | undefined;
  libvirt?: string | undefined;
  bandwidth?: number | undefined;
  runDir?: string | undefined;
  passphrase?: Passphrase | undefined;
  signal?: AbortSignal | undefined;
  onProgress?: LiveRestoreOptions['onProgress'];
  onNotice?: LiveRestoreOptions['onNotice'];
}

export interface LiveRestoreResult {
  backup: string;
  mode: 'libvirt' | 'qcow2';
  domain: string | null;
  disks: { name: string; path: string; size: number }[];
  /** From the call to the domain started (libvirt) or the images usable (qcow2), in ms; null on a resume. */
  readyMs: number | null;
  /** From then to the last backing link cut, in ms. */
  hydrationMs: number;
  resumed: boolean;
  /** Whether this run had to start the server again (it had died). */
  serverRestarted: boolean;
}

interface LiveDisk {
  name: string;
  /** The domain's target device (libvirt), else the disk's name. */
  device: string;
  path: string;
  size: number;
  uri: string;
}

/** The run journal (SPEC 16.4). */
interface LiveState {
  version: 1;
  mode: 'libvirt' | 'qcow2';
  key: string;
  repo: string;
  backupId: string;
  disk: string | null;
  domain: string | null;
  created: string;
  server: { pid: number; identity?: string | undefined; readerToken: string | null; lease: string | null } | null;
  /** The guard (live-guard.ts) of the domain's streams while they run; absent in journals from before it. */
  guard?: { pid: number; identity: string | undefined } | null;
  /** Images made (each recorded before qemu-img makes it). */
  disks: LiveDisk[];
  /** created → (libvirt) defined → started → streaming; hydrated once every backing link is cut. */
  phase: 'created' | 'defined' | 'started' | 'streaming' | 'hydrated';
}

const POLL_MS = 200;
/**
 * The stream reads each disk from start to end: the server loads this far ahead of it, many chunks at once (on
 * S3 each a ranged GET of its own, several in flight), where `serve` keeps 8 MiB for a guest's reads.
 */
const LIVE_READ_AHEAD_BYTES = 32 * 1024 * 1024;

function runDirOf(options: { runDir?: string | undefined }): string {
  return options.runDir ?? process.env.ENGINE_RUN_DIR ?? '/run/engine';
}

function keyOf(options: { to?: string | undefined; libvirt?: string | undefined }): string {
  if (options.libvirt !== undefined) return `libvirt:${options.libvirt}`;
  return `qcow2:${resolve(options.to!)}`;
}

function stateDirOf(runDir: string, key: string): string {
  return join(runDir, 'live', createHash('sha256').update(key).digest('hex').slice(0, 16));
}

async function saveState(dir: string, state: LiveState): Promise<void> {
  const path = join(dir, 'state.json');
  await writeFile(`${path}.tmp`, JSON.stringify(state, null, 2), { mode: MUTABLE_FILE_MODE });
  await rename(`${path}.tmp`, path);
}

async function loadState(dir: string): Promise<LiveState | undefined> {
  const path = join(dir, 'state.json');
  const text = await readFile(path, 'utf8').catch(() => undefined);
  if (text === undefined) return undefined;
  let state: Partial<LiveState> | null;
  try {
    state = JSON.parse(text) as Partial<LiveState> | null;
  } catch {
    throw new CorruptMetadataError(`live restore journal ${path}`, 'it is not JSON');
  }
  if (state?.version !== 1 || (state.mode !== 'libvirt' && state.mode !== 'qcow2') || !Array.isArray(state.disks) || typeof state.repo !== 'string') {
    throw new CorruptMetadataError(`live restore journal ${path}`, 'it lacks what a resume needs (version 1, mode, repo, disks)');
  }
  return state as LiveState;
}

const exists = (path: string): Promise<boolean> => stat(path).then(() => true, () => false);

/** `virsh -q …` */
function virsh(args: string[]): Promise<string> {
  return runTool('virsh', ['-q', ...args]);
}

async function domainState(name: string): Promise<string | undefined> {
  return (await virsh(['domstate', name]).catch(() => undefined))?.trim();
}

/**
 * The user QEMU runs as under libvirt (qemu.conf's `user`, libvirt-qemu by default on Debian): the server's
 * socket is handed to it, the socket's folders made passable (not readable) by others.
 */
async function qemuUser(): Promise<{ uid: number; gid: number } | undefined> {
  const conf = await readFile('/etc/libvirt/qemu.conf', 'utf8').catch(() => '');
  const user = /^\s*user\s*=\s*"([^"]+)"/m.exec(conf)?.[1] ?? 'libvirt-qemu';
  if (user === 'root' || user === '+0') return undefined;
  const uid = Number((await runTool('id', ['-u', user]).catch(() => '')).trim());
  const gid = Number((await runTool('id', ['-g', user]).catch(() => '')).trim());
  return Number.isInteger(uid) && Number.isInteger(gid) && uid > 0 ? { uid, gid } : undefined;
}

async function openToQemu(runDir: string, stateDir: string, socket: string): Promise<void> {
  const user = await qemuUser();
  if (!user) return;
  // Passable (x) only: nobody lists these folders; the socket itself is QEMU's user's alone (0600).
  for (const dir of [runDir, join(runDir, 'live'), stateDir]) {
    const mode = (await stat(dir)).mode & 0o7777;
    if ((mode & 0o011) !== 0o011) await chmod(dir, mode | 0o011);
  }
  await chown(socket, user.uid, user.gid);
}

async function startServer(state: LiveState, stateDir: string, options: { passphrase?: Passphrase | undefined; cacheBytes?: number | undefined }): Promise<{ exports: ServedExport[]; domainXml: string | null }> {
  const socket = join(stateDir, 'nbd.sock');
  const server = await startDaemon(serveDaemonScript(), { repo: state.repo, backupId: state.backupId, disk: state.disk ?? undefined, socket, cacheBytes: options.cacheBytes, readAheadBytes: LIVE_READ_AHEAD_BYTES, passphrase: options.passphrase, holder: 'serve' as const }, join(stateDir, 'serve.log'));
  state.server = { pid: server.pid, identity: processIdentity(server.pid), readerToken: server.readerToken, lease: server.lease };
  state.backupId = server.backupId;
  await saveState(stateDir, state);
  return { exports: server.exports ?? [], domainXml: server.domainXml ?? null };
}

function serverAlive(state: LiveState): boolean {
  const server = state.server;
  if (!server || !isProcessAlive(server.pid)) return false;
  return server.identity === undefined || processIdentity(server.pid) === server.identity;
}

/** Stops the server; one that died (or was killed) gets its registration or lease released for it. */
async function stopServer(state: LiveState, stateDir: string): Promise<void> {
  const server = state.server;
  if (!server) return;
  await stopProcess(server.pid, 10_000, server.identity);
  if (server.readerToken && /^[0-9a-f]{16}$/.test(server.readerToken) && !isS3Url(state.repo)) await unlink(join(state.repo, 'readers', `${server.readerToken}.json`)).catch(() => undefined);
  if (server.lease && /^leases\/[0-9a-f]{32}\.json$/.test(server.lease)) await removeDeadProcessLease(state.repo, server.lease).catch(() => undefined);
  state.server = null;
  await saveState(stateDir, state);
}

/** Whether the image still has a backing file (qemu-img info -U: the image may be open in QEMU). */
async function hasBacking(path: string): Promise<boolean> {
  const info = (await runToolJson('qemu-img', ['info', '-U', '--output=json', path])) as { 'backing-filename'?: string };
  return typeof info['backing-filename'] === 'string' && info['backing-filename'] !== '';
}

function interrupted(signal: AbortSignal | undefined, state: string): InterruptedError {
  return new InterruptedError('the live restore', state, signalName(signal));
}

/** What a --resume of this run is, in the CLI's words. */
function resumeHint(state: LiveState): string {
  return state.mode === 'libvirt' ? `engine restore --live --resume --libvirt ${state.domain}` : `engine restore --live --resume --to ${state.key.slice('qcow2:'.length)}`;
}

export async function liveRestore(options: LiveRestoreOptions): Promise<LiveRestoreResult> {
  const started = Date.now();
  if ((options.to === undefined) === (options.libvirt === undefined)) throw new InvalidArgumentError('a live restore needs --to PATH.qcow2 (or a directory) or --libvirt NEW-DOMAIN');
  if (options.to !== undefined) checkLocalPath(options.to, '--to');
  if (options.imageDir !== undefined) {
    checkLocalPath(options.imageDir, '--to');
    if (!(await stat(options.imageDir).then((s) => s.isDirectory(), () => false))) throw new InvalidArgumentError(`--to ${options.imageDir}: with --libvirt, give the directory the new domain's images go to`);
  }
  if (options.libvirt !== undefined && options.disk !== undefined) throw new InvalidArgumentError('a live restore into a new domain restores every disk of the backup: leave out --disk');
  const runDir = runDirOf(options);
  const key = keyOf(options);
  const stateDir = stateDirOf(runDir, key);
  if (await exists(join(stateDir, 'state.json'))) throw new InvalidArgumentError(`a live restore into ${key.replace(/^\w+:/, '')} is under way: finish it with ${options.libvirt !== undefined ? `--resume --libvirt ${options.libvirt}` : `--resume --to ${options.to}`}`);
  if (options.libvirt !== undefined && (await domainState(options.libvirt)) !== undefined) throw new InvalidArgumentError(`domain ${options.libvirt} exists already: give a new name`);
  await mkdir(stateDir, { recursive: true, mode: 0o700 });
  const state: LiveState = {
    version: 1,
    mode: options.libvirt !== undefined ? 'libvirt' : 'qcow2',
    key,
    repo: isS3Url(options.repo) ? options.repo : resolve(options.repo),
    backupId: options.backupId,
    disk: options.disk ?? null,
    domain: options.libvirt ?? null,
    created: new Date().toISOString(),
    server: null,
    disks: [],
    phase: 'created',
  };
  await saveState(stateDir, state);
  let readyMs: number;
  try {
    const { exports, domainXml } = await startServer(state, stateDir, options);
    if (state.mode === 'libvirt') await openToQemu(runDir, stateDir, join(stateDir, 'nbd.sock'));
    if (state.mode === 'libvirt' && domainXml === null) throw new InvalidArgumentError(`backup ${state.backupId} keeps no libvirt domain definition (it was not taken with backup --libvirt): restore its disks with --live --to PATH.qcow2`);
    const devices = domainXml === null ? [] : domainDiskTargets(domainXml);
    const planned = await planTargets(options, exports, devices);
    for (const disk of planned) {
      if (await exists(disk.path)) throw new InvalidArgumentError(`${disk.path} exists: a live restore makes new images`);
      // Recorded before it exists: a failure (or a kill) right after qemu-img still has it in the journal.
      state.disks.push(disk);
      await saveState(stateDir, state);
      await runTool('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', disk.uri, disk.path]);
    }
    if (state.mode === 'libvirt') {
      const xml = liveDomainXml(domainXml!, state.domain!, new Map(state.disks.map((d) => [d.device, d.path])));
      const xmlPath = join(stateDir, 'domain.xml');
      await writeFile(xmlPath, xml, { mode: MUTABLE_FILE_MODE });
      await virsh(['define', xmlPath]);
      state.phase = 'defined';
      await saveState(stateDir, state);
      if (options.signal?.aborted) throw interrupted(options.signal, 'nothing was left behind');
      await virsh(['start', state.domain!]);
      state.phase = 'started';
      await saveState(stateDir, state);
    }
    readyMs = Date.now() - started;
  } catch (error) {
    // Before the guest runs nothing depends on what was made: all of it goes (the server's log said in the error).
    const log = (await readFile(join(stateDir, 'serve.log'), 'utf8').catch(() => '')).trim().split('\n').slice(-3).join(' / ');
    await undo(state, stateDir);
    if (error instanceof EngineError && error.code === 'ENGINE_INTERNAL' && log) throw new EngineError('ENGINE_INTERNAL', `the live restore's NBD server exited before it was ready: ${log}`);
    throw error;
  }
  options.onNotice?.(state.mode === 'libvirt' ? `domain ${state.domain} runs on backup ${state.backupId} after ${(readyMs / 1000).toFixed(1)} s; hydrating its disks` : `${state.disks.map((d) => d.path).join(', ')} usable (backed by backup ${state.backupId}); hydrating`);
  const hydrationStarted = Date.now();
  await hydrate(state, stateDir, options);
  return finish(state, stateDir, { readyMs, hydrationMs: Date.now() - hydrationStarted, resumed: false, serverRestarted: false });
}

export async function liveRestoreResume(options: LiveResumeOptions): Promise<LiveRestoreResult> {
  if ((options.to === undefined) === (options.libvirt === undefined)) throw new InvalidArgumentError('--resume needs the live restore\'s --to PATH or --libvirt NAME');
  const runDir = runDirOf(options);
  const stateDir = stateDirOf(runDir, keyOf(options));
  const state = await loadState(stateDir);
  if (!state) throw new InvalidArgumentError(`no live restore into ${options.libvirt ?? options.to} is under way (no journal in ${stateDir})`);
  const hydrationStarted = Date.now();
  let serverRestarted = false;
  if (state.phase !== 'hydrated' && !serverAlive(state)) {
    // The same socket path: it is what the images' backing files name, and what QEMU reconnects to.
    options.onNotice?.(`the NBD server of the live restore is gone (killed, or the host restarted): starting it again`);
    await unlink(join(stateDir, 'nbd.sock')).catch(() => undefined);
    await startServer(state, stateDir, options);
    if (state.mode === 'libvirt') await openToQemu(runDir, stateDir, join(stateDir, 'nbd.sock'));
    serverRestarted = true;
  }
  if (state.mode === 'libvirt' && (state.phase === 'created' || state.phase === 'defined')) {
    // Killed before the domain ran: nothing depends on the images yet; start over is the caller's.
    await undo(state, stateDir);
    throw new InvalidArgumentError(`the live restore into ${state.domain} had not started its domain: everything it made is removed; run it again`);
  }
  if (state.phase !== 'hydrated') await hydrate(state, stateDir, options);
  return finish(state, stateDir, { readyMs: null, hydrationMs: Date.now() - hydrationStarted, resumed: true, serverRestarted });
}

async function planTargets(options: LiveRestoreOptions, exports: ServedExport[], devices: string[]): Promise<LiveDisk[]> {
  if (options.libvirt !== undefined) {
    const dir = options.imageDir ?? '/var/lib/libvirt/images';
    return exports.map((e) => {
      // A backup --libvirt names its disks after their targets (vda …); one renamed on adoption still matches one.
      const device = devices.find((d) => d === e.name) ?? devices.find((d) => nameMatches(e.name, d)) ?? e.name;
      return { name: e.name, device, path: join(dir, `${options.libvirt}-${diskFileName(e.name)}.qcow2`), size: e.size, uri: e.uri };
    });
  }
  const to = resolve(options.to!);
  const isDir = await stat(to).then((s) => s.isDirectory(), () => false);
  if (!isDir) {
    if (exports.length !== 1) throw new InvalidArgumentError(`backup ${options.backupId} has ${exports.length} disks: name one with --disk, or give a directory to --to`);
    if (!to.endsWith('.qcow2')) throw new InvalidArgumentError(`--live --to makes a qcow2 image: give a path ending in .qcow2 (or a directory), not ${to}`);
    if (!(await exists(dirname(to)))) throw new InvalidArgumentError(`${dirname(to)} does not exist`);
    return [{ name: exports[0]!.name, device: exports[0]!.name, path: to, size: exports[0]!.size, uri: exports[0]!.uri }];
  }
  return exports.map((e) => ({ name: e.name, device: e.name, path: join(to, `${diskFileName(e.name)}.qcow2`), size: e.size, uri: e.uri }));
}

/** Removes what a live restore that never ran its guest made: the domain, the images, the server, the journal. */
async function undo(state: LiveState, stateDir: string): Promise<void> {
  if (state.mode === 'libvirt' && state.phase !== 'created' && state.domain !== null) {
    await virsh(['destroy', state.domain]).catch(() => undefined);
    await virsh(['undefine', state.domain, '--nvram']).catch(() => virsh(['undefine', state.domain!]).catch(() => undefined));
  }
  await stopGuard(state, stateDir).catch(() => undefined);
  await stopServer(state, stateDir).catch(() => undefined);
  for (const disk of state.disks) await rm(disk.path, { force: true });
  await rm(stateDir, { recursive: true, force: true });
}

async function finish(state: LiveState, stateDir: string, times: { readyMs: number | null; hydrationMs: number; resumed: boolean; serverRestarted: boolean }): Promise<LiveRestoreResult> {
  state.phase = 'hydrated';
  await saveState(stateDir, state);
  // Every backing link is cut: nothing reads the server any more. The guard first: the server's end is no fault.
  await stopGuard(state, stateDir);
  await stopServer(state, stateDir);
  await rm(stateDir, { recursive: true, force: true });
  return { backup: state.backupId, mode: state.mode, domain: state.domain, disks: state.disks.map((d) => ({ name: d.name, path: d.path, size: d.size })), ...times };
}

async function hydrate(state: LiveState, stateDir: string, options: LiveResumeOptions): Promise<void> {
  const running = state.mode === 'libvirt' && (await domainState(state.domain!)) === 'running';
  if (state.mode === 'libvirt' && running) return streamInDomain(state, stateDir, options);
  if (state.mode === 'libvirt') {
    const now = await domainState(state.domain!);
    if (now === 'paused') throw new EngineError('ENGINE_TOOL_FAILED', `domain ${state.domain} is paused (${await domainReason(state.domain!)}); its disks still read from the backup. Resume it (virsh resume) after freeing space if its disk is full, then ${resumeHint(state)}`, { domain: state.domain });
    // Shut off: no QEMU to stream; the images are hydrated the way the qcow2 form is. No stream, nothing to guard.
    options.onNotice?.(`domain ${state.domain} is ${now ?? 'gone'}: hydrating its images without it`);
    await stopGuard(state, stateDir);
  }
  for (const disk of state.disks) {
    if (await hasBacking(disk.path)) await rebase(disk, state, stateDir, options);
  }
}

async function domainReason(domain: string): Promise<string> {
  return (await virsh(['domstate', domain, '--reason']).catch(() => '')).trim();
}

/** The stream of each disk in QEMU (`virsh blockpull`), started unless it runs, waited for. */
async function streamInDomain(state: LiveState, stateDir: string, options: LiveResumeOptions): Promise<void> {
  const domain = state.domain!;
  const pending = new Set<LiveDisk>();
  for (const disk of state.disks) {
    if (await hasBacking(disk.path)) pending.add(disk);
  }
  // Before the first stream starts: from then on a server's death is guarded against, whether the engine runs or not.
  await startGuard(state, stateDir, [...pending]);
  for (const disk of pending) {
    const bandwidth = ['--bandwidth', String(options.bandwidth ?? 0), '--bytes'];
    if ((await blockJob(domain, disk.device)) === undefined) await virsh(['blockpull', domain, disk.device, ...bandwidth]);
    // A stream a killed engine started goes on at this run's speed (none given: no limit).
    else await virsh(['blockjob', domain, disk.device, ...bandwidth]);
  }
  state.phase = 'streaming';
  await saveState(stateDir, state);
  options.onNotice?.(`waiting for QEMU's stream of ${[...pending].map((d) => d.device).join(', ')} in domain ${domain}`);
  while (pending.size > 0) {
    if (options.signal?.aborted) throw interrupted(options.signal, `the guest runs on and QEMU's stream goes on, with the server; ${resumeHint(state)} waits for it and stops the server`);
    if (!serverAlive(state)) {
      // The guard (live-guard.ts) aborts the streams: one mechanism, the same with the engine running or killed.
      // The engine waits for it to have done so (it exits then); only a guard that is gone (killed) leaves it to us.
      await guardDone(state, domain, [...pending]);
      throw new EngineError('ENGINE_TOOL_FAILED', `the NBD server of the live restore of domain ${domain} is gone: the streams are stopped, and the guest's reads of what is not hydrated fail (EIO) until ${resumeHint(state)} starts the server again. Nothing is lost: the images keep their backing link and every guest write`, { domain });
    }
    for (const disk of [...pending]) {
      const job = await blockJob(domain, disk.device);
      if (job) {
        options.onProgress?.({ disk: disk.name, bytesDone: job.cur, bytesTotal: job.end });
        continue;
      }
      if (!(await hasBacking(disk.path))) {
        options.onProgress?.({ disk: disk.name, bytesDone: disk.size, bytesTotal: disk.size });
        pending.delete(disk);
        continue;
      }
      // No job and the backing link still there: the stream failed (QEMU said why in libvirt's log).
      const why = (await domainState(domain)) === 'paused' ? `the domain paused (${await domainReason(domain)}): its target's file system may be full` : serverAlive(state) ? "QEMU ended the stream with an error (see the domain's log). If the server had died: QEMU 7.2 does not reconnect to a server started again (libvirt gives an NBD backing file no reconnect delay), so shut the domain down (its writes are in the image) and resume then: the images are hydrated without it" : 'the NBD server is gone';
      throw new EngineError('ENGINE_TOOL_FAILED', `the hydration of disk ${disk.name} of domain ${domain} stopped before its end: ${why}. Nothing is lost: the image keeps its backing link and every guest write; ${resumeHint(state)} goes on`, { domain, disk: disk.name });
    }
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

function guardAlive(state: LiveState): boolean {
  const guard = state.guard;
  if (!guard || !isProcessAlive(guard.pid)) return false;
  return guard.identity === undefined || processIdentity(guard.pid) === guard.identity;
}

/** How long stopGuard and guardDone wait for the guard to end (it ends within a poll and the aborts). */
const GUARD_WAIT_MS = 30_000;

async function waitGuardGone(state: LiveState): Promise<boolean> {
  for (const deadline = Date.now() + GUARD_WAIT_MS; guardAlive(state); ) {
    if (Date.now() > deadline) return false;
    await new Promise((r) => setTimeout(r, 10));
  }
  return true;
}

/**
 * The guard of the domain's streams (live-guard.ts): detached, its own session, its orders on stdin, its log
 * guard.log in the journal's folder; recorded in the journal. A guard of an earlier run (of another server) goes first.
 */
async function startGuard(state: LiveState, stateDir: string, disks: LiveDisk[]): Promise<void> {
  await stopGuard(state, stateDir);
  const server = state.server;
  if (!server || disks.length === 0) return;
  const orders: LiveGuardOrders = { domain: state.domain!, devices: disks.map((d) => d.device), images: disks.map((d) => d.path), server: { pid: server.pid, identity: server.identity ?? processIdentity(server.pid) } };
  const script = fileURLToPath(new URL('./live-guard.js', import.meta.url));
  const logFd = openSync(join(stateDir, 'guard.log'), 'a', MUTABLE_FILE_MODE);
  let child;
  try {
    child = spawn(process.execPath, [script, 'engine-live-guard', state.domain!], { detached: true, stdio: ['pipe', 'ignore', logFd] });
    await new Promise<void>((done, fail) => {
      child!.once('spawn', done);
      child!.once('error', fail);
    });
  } finally {
    closeSync(logFd);
  }
  // Read before its orders are written: it cannot have exited yet, so the identity is its own.
  state.guard = { pid: child.pid!, identity: processIdentity(child.pid!) };
  await saveState(stateDir, state);
  child.stdin!.end(JSON.stringify(orders));
  child.unref();
}

/** Ends the guard (SIGUSR2: "hydration ended, or no stream left to guard"), if it is still that process. */
async function stopGuard(state: LiveState, stateDir: string): Promise<void> {
  const guard = state.guard;
  if (!guard) return;
  if (guardAlive(state)) {
    try {
      process.kill(guard.pid, 'SIGUSR2');
    } catch {
      // Gone in between.
    }
    // It exits at once; one stuck (in a virsh call of 60 s at most) is killed: the engine says hydration ended.
    if (!(await waitGuardGone(state))) await stopProcess(guard.pid, 1000, guard.identity);
  }
  state.guard = null;
  await saveState(stateDir, state);
}

/** The server died under a watching engine: the guard aborts the streams; a guard that is gone leaves it to the engine. */
async function guardDone(state: LiveState, domain: string, disks: LiveDisk[]): Promise<void> {
  if (guardAlive(state) && (await waitGuardGone(state))) return;
  await Promise.all(disks.map((disk) => virsh(['blockjob', domain, disk.device, '--abort']).catch(() => undefined)));
}

async function blockJob(domain: string, device: string): Promise<{ cur: number; end: number } | undefined> {
  const raw = await virsh(['blockjob', domain, device, '--raw']);
  const cur = /\bcur=(\d+)/.exec(raw)?.[1];
  const end = /\bend=(\d+)/.exec(raw)?.[1];
  if (cur === undefined || end === undefined) return undefined;
  return { cur: Number(cur), end: Number(end) };
}

/**
 * `qemu-img rebase -b ''`: every cluster the image does not hold is copied from the backing file, then the
 * link is dropped. Under pdeathsig: it dies with the engine (the rerun copies only what is still missing).
 */
async function rebase(disk: LiveDisk, state: LiveState, stateDir: string, options: LiveResumeOptions): Promise<void> {
  state.phase = 'streaming';
  await saveState(stateDir, state);
  const args = ['--pdeathsig', 'SIGKILL', '--', 'qemu-img', 'rebase', '-p', '-f', 'qcow2', '-b', '', disk.path];
  const child = spawn('setpriv', args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, LC_ALL: 'C' } });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (text: string) => {
    stderr = (stderr + text).slice(-4000);
  });
  child.stdout.setEncoding('utf8').on('data', (text: string) => {
    const percent = [...text.matchAll(/\((\d+(?:\.\d+)?)\/100%\)/g)].pop()?.[1];
    if (percent !== undefined) options.onProgress?.({ disk: disk.name, bytesDone: Math.round((Number(percent) / 100) * disk.size), bytesTotal: disk.size });
  });
  const stop = (): void => {
    child.kill('SIGTERM');
  };
  options.signal?.addEventListener('abort', stop, { once: true });
  const outcome = await new Promise<{ code: number | null; error?: Error }>((done) => {
    child.once('error', (error) => done({ code: null, error }));
    child.once('exit', (code) => done({ code }));
  });
  options.signal?.removeEventListener('abort', stop);
  if (options.signal?.aborted) {
    // Nothing runs on the image: the server is not needed until the resume starts it again.
    await stopServer(state, stateDir).catch(() => undefined);
    throw interrupted(options.signal, `${disk.path} keeps its backing link and what was copied; ${resumeHint(state)} copies the rest`);
  }
  if (outcome.code === 0) return;
  // Nothing runs on the image: the server goes until the resume starts it again.
  await stopServer(state, stateDir).catch(() => undefined);
  const why = outcome.error?.message ?? stderr.trim().split('\n').slice(-2).join(' ');
  if (/No space left on device|ENOSPC|Disk quota exceeded/i.test(why)) {
    throw new TargetUnwritableError(disk.path, `its file system is full (ENOSPC). Nothing is lost: the image keeps its backing link and what was copied; free space, then ${resumeHint(state)}`);
  }
  throw new ToolError('qemu-img', ['rebase', '-b', '', disk.path], `${why} (the image keeps its backing link; ${resumeHint(state)} goes on)`);
}
