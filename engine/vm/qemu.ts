/**
 * Running one throw-away QEMU VM: the binary found ($ENGINE_QEMU, else qemu-system-x86_64 on PATH), its
 * version, the process started under `setpriv --pdeathsig SIGKILL` (it dies with the engine, kill -9
 * included) in a process group of its own (a terminal's Ctrl-C reaches the engine, which then stops the VM
 * itself, in order), its pid and identity given to the caller's journal before anything else happens, QMP,
 * a watch for a KVM that cannot run the guest, and a stop that always ends with the process gone.
 */
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { closeSync, openSync, readFileSync } from 'node:fs';
import { access, constants } from 'node:fs/promises';
import { MUTABLE_FILE_MODE } from '../../repo-format/file-modes.js';
import { delimiter, join } from 'node:path';
import { EngineError } from '../../repo-format/errors.js';
import { ToolError } from '../cbt/run-tool.js';
import { processIdentity } from '../host/process.js';
import { qemuArgs, type VmSpec } from './qemu-args.js';
import { QmpClient } from './qmp.js';
import { KvmFailedError } from './accelerator.js';

export const DEFAULT_QEMU = 'qemu-system-x86_64';

/** The QEMU binary to run: $ENGINE_QEMU (a path or a name on PATH), else qemu-system-x86_64; a clear error when there is none. */
export async function findQemu(env: NodeJS.ProcessEnv = process.env): Promise<string> {
  const wanted = env.ENGINE_QEMU !== undefined && env.ENGINE_QEMU !== '' ? env.ENGINE_QEMU : DEFAULT_QEMU;
  const candidates = wanted.includes('/') ? [wanted] : (env.PATH ?? '').split(delimiter).filter((d) => d !== '').map((d) => join(d, wanted));
  for (const path of candidates) {
    if (await access(path, constants.X_OK).then(() => true, () => false)) return path;
  }
  const how = env.ENGINE_QEMU ? `ENGINE_QEMU=${env.ENGINE_QEMU} names no executable file` : `${DEFAULT_QEMU} is not installed (it is not on PATH; Debian: apt-get install qemu-system-x86)`;
  throw new ToolError(wanted, [], `${how}; boot tests and file restores run in a QEMU VM`);
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

/**
 * util-linux's setpriv, which QEMU is started under: it sets PR_SET_PDEATHSIG and execs QEMU (same pid), so
 * the kernel kills the VM when the engine's process dies, however it dies.
 */
async function findSetpriv(env: NodeJS.ProcessEnv): Promise<string> {
  for (const dir of (env.PATH ?? '').split(delimiter).filter((d) => d !== '').concat(['/usr/bin', '/bin'])) {
    const path = join(dir, 'setpriv');
    if (await access(path, constants.X_OK).then(() => true, () => false)) return path;
  }
  throw new ToolError('setpriv', [], 'setpriv is not installed (Debian: apt-get install util-linux); QEMU runs under it so that it dies with the engine');
}

/** QEMU's words when KVM could not run the guest (`-cpu host` on a nested KVM: "failed to set MSR", a failed kvm_* assertion, "failed to initialize kvm"). */
const KVM_FAILED = /\bkvm|\bMSR\b/i;

/** Whether QEMU's end says KVM failed: it ended by itself (not by our SIGKILL or SIGTERM), not cleanly, with such words. */
function kvmFailedExit(e: { code: number | null; signal: NodeJS.Signals | null; stderr: string }): boolean {
  return e.code !== 0 && e.signal !== 'SIGKILL' && e.signal !== 'SIGTERM' && KVM_FAILED.test(e.stderr);
}

export interface StartedProcess {
  pid: number;
  identity: string | undefined;
}

export class VirtualMachine {
  /** Resolves when QEMU has exited: its code, or the signal that ended it, and the last lines of its stderr. */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>;
  private exit: { code: number | null; signal: NodeJS.Signals | null } | undefined;

  /**
   * Resolves when KVM turns out unable to run the guest: QEMU stopped it with an internal error (QMP
   * `query-status`, asked every half second) or exited with words about KVM. Never under TCG.
   */
  readonly kvmFailure: Promise<KvmFailedError>;

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
    this.kvmFailure = spec.accelerator === 'kvm' ? this.watchKvm() : new Promise(() => undefined);
  }

  private watchKvm(): Promise<KvmFailedError> {
    return new Promise((resolve) => {
      const poll = setInterval(() => {
        void this.qmp.execute<{ status: string }>('query-status', undefined, 2000).then(
          (status) => {
            if (status.status === 'internal-error') resolve(new KvmFailedError('KVM internal error'));
          },
          () => undefined,
        );
      }, 500);
      void this.exited.then((e) => {
        clearInterval(poll);
        if (kvmFailedExit(e)) resolve(new KvmFailedError(lastLine(e.stderr)));
      });
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
    const setpriv = await findSetpriv(process.env);
    // QEMU's own messages go to a file, never to a pipe of ours: nothing of its output is lost or blocks
    // on a full pipe, and its end is the kernel's pdeathsig, not a SIGPIPE at some later write.
    const log = openSync(spec.logFile, 'a', MUTABLE_FILE_MODE);
    let child: ChildProcess;
    try {
      child = spawn(setpriv, ['--pdeathsig', 'SIGKILL', '--', binary, ...args], { stdio: ['ignore', log, log], detached: true });
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
      if (spec.accelerator === 'kvm' && kvmFailedExit(ended)) throw new KvmFailedError(lastLine(ended.stderr));
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

  /** SIGKILL, and the process gone (a VM with nothing worth a clean shutdown: its disks are read-only or thrown away). */
  async destroy(): Promise<void> {
    this.kill();
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

function lastLine(text: string): string {
  return text.trim().split('\n').pop()?.trim().slice(0, 200) ?? '';
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
