/**
 * Running one throw-away QEMU VM: the binary found ($ENGINE_QEMU, else qemu-system-x86_64 on PATH), its
 * version, the process started in a process group of its own (a terminal's Ctrl-C reaches the engine,
 * which then stops the VM itself, in order), its pid and identity given to the caller's journal before
 * anything else happens, QMP, and a stop that always ends with the process gone.
 */
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { closeSync, openSync, readFileSync } from 'node:fs';
import { access, constants, open } from 'node:fs/promises';
import { MUTABLE_FILE_MODE } from '../../repo-format/file-modes.js';
import { delimiter, join } from 'node:path';
import { EngineError } from '../../repo-format/errors.js';
import { ToolError } from '../cbt/run-tool.js';
import { processIdentity } from '../host/process.js';
import { qemuArgs, type VmSpec } from './qemu-args.js';
import { QmpClient } from './qmp.js';

export const DEFAULT_QEMU = 'qemu-system-x86_64';

/** The QEMU binary to run: $ENGINE_QEMU (a path or a name on PATH), else qemu-system-x86_64; a clear error when there is none. */
export async function findQemu(env: NodeJS.ProcessEnv = process.env): Promise<string> {
  const wanted = env.ENGINE_QEMU !== undefined && env.ENGINE_QEMU !== '' ? env.ENGINE_QEMU : DEFAULT_QEMU;
  const candidates = wanted.includes('/') ? [wanted] : (env.PATH ?? '').split(delimiter).filter((d) => d !== '').map((d) => join(d, wanted));
  for (const path of candidates) {
    if (await access(path, constants.X_OK).then(() => true, () => false)) return path;
  }
  const how = env.ENGINE_QEMU ? `ENGINE_QEMU=${env.ENGINE_QEMU} names no executable file` : `${DEFAULT_QEMU} is not installed (it is not on PATH; Debian: apt-get install qemu-system-x86)`;
  throw new ToolError(wanted, [], `${how}; a boot test runs the backup in a QEMU VM`);
}

/** `qemu --version`'s version ("7.2.22"), or the first line when it does not parse. */
export function qemuVersion(binary: string): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(binary, ['--version'], { timeout: 30_000 }, (error, stdout, stderr) => {
      if (error) return reject(new ToolError(binary, ['--version'], (stderr || error.message).trim().split('\n')[0] ?? ''));
      const first = stdout.split('\n')[0] ?? '';
      resolve(/version (\S+)/.exec(first)?.[1] ?? first.trim());
    });
  });
}

/** Whether KVM can be used by this process: /dev/kvm opens read-write (exists is not enough: a container may see it without the right to use it). */
export async function kvmUsable(): Promise<boolean> {
  const handle = await open('/dev/kvm', 'r+').catch(() => undefined);
  await handle?.close();
  return handle !== undefined;
}

export interface StartedProcess {
  pid: number;
  identity: string | undefined;
}

export class VirtualMachine {
  /** Resolves when QEMU has exited: its code, or the signal that ended it, and the last lines of its stderr. */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>;
  private exit: { code: number | null; signal: NodeJS.Signals | null } | undefined;

  private constructor(
    child: ChildProcess,
    readonly spec: VmSpec,
    readonly binary: string,
    readonly process: StartedProcess,
    readonly qmp: QmpClient,
  ) {
    this.exited = exitOf(child, () => logTail(spec.logFile)).then((e) => {
      this.exit = e;
      return e;
    });
  }

  get running(): boolean {
    return this.exit === undefined;
  }

  /**
   * Starts QEMU. `started` is called with the pid and identity as soon as the process exists (the caller's
   * journal: a run killed from here on leaves a VM the next run stops). Resolves once QMP answers; a
   * QEMU that exits first (a machine type it does not know, a disk it cannot open) is an ENGINE_TOOL_FAILED
   * error with its own words.
   */
  static async start(binary: string, spec: VmSpec, started: (process: StartedProcess) => Promise<void>): Promise<VirtualMachine> {
    const args = qemuArgs(spec);
    // QEMU's own messages go to a file, never to a pipe of ours: a run killed with -9 must not take its VM
    // along by SIGPIPE (the next run stops it, from the journal), nor leave it blocked on a full pipe.
    const log = openSync(spec.logFile, 'a', MUTABLE_FILE_MODE);
    let child: ChildProcess;
    try {
      child = spawn(binary, args, { stdio: ['ignore', log, log], detached: true });
    } finally {
      closeSync(log);
    }
    const stderr = (): string => logTail(spec.logFile);
    const spawnError = new Promise<Error>((resolve) => child.once('error', resolve));
    const pid = await Promise.race([new Promise<number>((resolve) => child.once('spawn', () => resolve(child.pid!))), spawnError.then((e) => Promise.reject(e))]).catch((error: NodeJS.ErrnoException) => {
      throw new ToolError(binary, [], error.code === 'ENOENT' ? `${binary} is not installed` : error.message);
    });
    const processInfo = { pid, identity: processIdentity(pid) };
    const early = exitOf(child, stderr);
    try {
      await started(processInfo);
      const qmp = await connectQmp(spec.qmpSocket, early);
      return new VirtualMachine(child, spec, binary, processInfo, qmp);
    } catch (error) {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      const ended = await early;
      if (error instanceof EngineError) throw error;
      const message = (error as Error).message;
      throw new ToolError(binary, args, ended.stderr && !message.includes(ended.stderr.trim()) ? `${message}: ${ended.stderr.trim()}` : message);
    }
  }

  /** Which accelerator runs the VM: `kvm` when QMP says KVM is enabled, else `tcg`. */
  async accelerator(): Promise<'kvm' | 'tcg'> {
    const kvm = await this.qmp.execute<{ enabled: boolean }>('query-kvm');
    return kvm.enabled ? 'kvm' : 'tcg';
  }

  /**
   * Ends the VM: waits up to `graceMs` for it to power off by itself (after a guest-shutdown the caller
   * sent), then QMP `quit`, then SIGKILL. Resolves once the process is gone.
   */
  async stop(graceMs: number, signal?: AbortSignal): Promise<void> {
    if (!this.running) return;
    // An interruption cuts the grace short: the VM goes within a second, its writes are thrown away anyway.
    const aborted = new Promise<boolean>((r) => (signal?.aborted ? r(false) : signal?.addEventListener('abort', () => r(false), { once: true })));
    const gone = (ms: number): Promise<boolean> => Promise.race([this.exited.then(() => true), aborted, new Promise<boolean>((r) => setTimeout(() => r(false), ms).unref())]);
    if (graceMs > 0 && (await gone(graceMs))) return this.qmp.close();
    await this.qmp.execute('quit', undefined, 1000).catch(() => undefined);
    if (!(await gone(1000))) this.kill();
    await this.exited;
    this.qmp.close();
  }

  /** SIGKILL now (interruption: within a second, the VM's writes are thrown away anyway). */
  kill(): void {
    if (this.running) {
      try {
        process.kill(this.process.pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
  }
}

/** The last lines QEMU wrote about itself (its log file), for an error message. */
function logTail(path: string): string {
  try {
    return readFileSync(path, 'utf8').slice(-4096);
  } catch {
    return '';
  }
}

function exitOf(child: ChildProcess, stderr: () => string): Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve({ code: child.exitCode, signal: child.signalCode, stderr: stderr() });
  return new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal, stderr: stderr() })));
}

async function connectQmp(path: string, early: Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>): Promise<QmpClient> {
  let exited: { code: number | null; stderr: string } | undefined;
  void early.then((e) => (exited = e));
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (exited) throw new Error(`QEMU exited at once (code ${exited.code ?? 'none'})${exited.stderr ? `: ${exited.stderr.trim()}` : ''}`);
    try {
      return await QmpClient.connect(path, 10_000);
    } catch (error) {
      if (Date.now() > deadline) throw error;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}
