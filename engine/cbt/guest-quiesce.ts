/**
 * Quiesce for libvirt backups (`backup --libvirt DOMAIN --quiesce`): the guest's file systems frozen through its
 * QEMU guest agent around the instant backup-begin takes its point in time, thawed as soon as it returns (the
 * pull-mode export is frozen in time by then; the data is read after the thaw). libvirt 9.0 refuses
 * `checkpoint-create --quiesce` and backup-begin has no quiesce flag, so the freeze and thaw are libvirt's
 * fsfreeze calls (`virsh domfsfreeze`/`domfsthaw`) around backup-begin.
 *
 * The order: pre-freeze hook on the appliance → pre-freeze hook in the guest (guest-exec) → watchdog started →
 * freeze → backup-begin → thaw → watchdog stopped → post-thaw hook in the guest → post-thaw hook on the appliance.
 * No hook runs while the guest is frozen (the agent refuses guest-exec then, and a hook must not lengthen the
 * freeze).
 *
 * The guest never stays frozen: before the freeze, a detached watchdog process (a shell, in its own session, so
 * that it outlives the engine killed with -9 or its process group) sleeps until the freeze timeout and then thaws
 * the guest, retrying a few times; the engine stops it once its own thaw succeeded. A freeze that libvirt gave up
 * on but the agent carried out later is thawed by it too (it is stopped only after a thaw the engine saw succeed).
 */
import { execFile, spawn } from 'node:child_process';
import { NO_QUIESCE, type Consistency } from '../../repo-format/backup-record.js';
import { crashPoint } from '../../repo-format/crash-points.js';
import { QuiesceFailedError } from '../errors.js';
import { runTool, runToolOutput } from './run-tool.js';

export interface QuiesceRequest {
  /** `required`: a backup that cannot be quiesced fails (ENGINE_QUIESCE_FAILED); `try`: it is taken crash-consistent, the reason recorded. */
  mode: 'required' | 'try';
  /** The longest the guest stays frozen: the watchdog thaws it then, whatever happened to the engine. Default 10 s. */
  freezeTimeoutMs?: number | undefined;
  /** The longest a hook may run (each); default 60 s. */
  hookTimeoutMs?: number | undefined;
  /** Run in the guest by its agent (`/bin/sh -c`) before the freeze; a failure is a failed quiesce. */
  preFreeze?: string | undefined;
  /** Run in the guest by its agent (`/bin/sh -c`) after the thaw, whenever the guest was frozen. */
  postThaw?: string | undefined;
  /** Run on this host (`/bin/sh -c`, ENGINE_DOMAIN set) before the freeze; a failure is a failed quiesce. */
  preFreezeHost?: string | undefined;
  /** Run on this host (`/bin/sh -c`, ENGINE_DOMAIN set) after the thaw, whenever the guest was frozen. */
  postThawHost?: string | undefined;
}

/**
 * 10 s: Windows' VSS holds writes for at most 10 s (its own limit for the freeze), and Linux applications stall
 * their writes for as long as the freeze lasts; backup-begin itself takes well under that (SPEC.md 11.2).
 */
export const DEFAULT_FREEZE_TIMEOUT_MS = 10_000;
export const DEFAULT_HOOK_TIMEOUT_MS = 60_000;
/** How long the agent is given to answer a command (guest-exec and its status). */
const AGENT_ANSWER_S = 10;
/** How much longer than its own timeout a virsh call that talks to the agent may take before it is killed. */
const VIRSH_GRACE_MS = 30_000;
/** What of a hook's output goes into an error message. */
const HOOK_OUTPUT_CHARS = 600;

const FSFREEZE = 'qemu-guest-agent fsfreeze';

/**
 * Runs `act` (backup-begin) with the guest frozen as `request` asks, and says what consistency it got. `act`
 * throwing while the guest is frozen: thawed, the post-thaw hooks run, the error passed on.
 */
export async function quiesced(domain: string, request: QuiesceRequest | undefined, act: () => Promise<void>, notice: (message: string) => void): Promise<Consistency> {
  if (!request) {
    await act();
    return NO_QUIESCE;
  }
  const freezeTimeoutMs = request.freezeTimeoutMs ?? DEFAULT_FREEZE_TIMEOUT_MS;
  const hookTimeoutMs = request.hookTimeoutMs ?? DEFAULT_HOOK_TIMEOUT_MS;
  const fallBack = async (why: string): Promise<Consistency> => {
    if (request.mode === 'required') throw new QuiesceFailedError(domain, why);
    notice(`domain ${domain}: not quiesced, the backup is crash-consistent: ${why}`);
    await act();
    return { level: 'crash', method: `${FSFREEZE} tried`, freezeMs: null, reason: why };
  };
  try {
    if (request.preFreezeHost !== undefined) await hostHook(domain, 'pre-freeze', request.preFreezeHost, hookTimeoutMs);
    if (request.preFreeze !== undefined) await guestHook(domain, 'pre-freeze', request.preFreeze, hookTimeoutMs);
  } catch (error) {
    return fallBack((error as Error).message);
  }
  const watchdog = startWatchdog(domain, freezeTimeoutMs);
  const started = performance.now();
  try {
    // libvirt's own agent timeouts end a freeze that gets no answer; this bound is only for a virsh that hangs.
    await runTool('virsh', ['-q', 'domfsfreeze', domain], { timeoutMs: freezeTimeoutMs + VIRSH_GRACE_MS });
  } catch (error) {
    // The watchdog stays: a freeze libvirt gave up on may still be carried out by the agent; it thaws it then.
    return fallBack(`the guest agent's freeze failed: ${agentWords((error as Error).message)}`);
  }
  /** When backup-begin returned, in ms after the freeze was asked for. */
  let pointTakenMs = 0;
  let freezeMs = 0;
  /** File systems the engine's thaw thawed; undefined when it failed. */
  let thawedCount: number | undefined;
  try {
    crashPoint('guest-frozen');
    await act();
    pointTakenMs = performance.now() - started;
    crashPoint('guest-checkpoint-taken');
  } finally {
    thawedCount = await thaw(domain, freezeTimeoutMs + VIRSH_GRACE_MS).catch((error: unknown) => {
      notice(`domain ${domain}: the thaw failed (${agentWords((error as Error).message)}); the watchdog thaws the guest ${freezeTimeoutMs / 1000} s after the freeze`);
      return undefined;
    });
    freezeMs = Math.round(performance.now() - started);
    if (thawedCount !== undefined) watchdog.stop();
    await afterThaw(domain, request, hookTimeoutMs, notice);
  }
  // Not trusted as quiesced: a backup-begin that returned past the freeze timeout (the watchdog's deadline counts
  // from its start, before the freeze, so it may have thawed the guest before the point in time), or a thaw that
  // found nothing frozen (something thawed the guest first: the watchdog, another agent client).
  const late = pointTakenMs >= freezeTimeoutMs ? `backup-begin returned ${Math.round(pointTakenMs)} ms after the freeze, past the freeze timeout (${freezeTimeoutMs} ms)` : undefined;
  const early = thawedCount === 0 ? 'the guest was no longer frozen when the engine thawed it' : undefined;
  if (late !== undefined || early !== undefined) {
    const why = `${[late, early].filter((w) => w !== undefined).join('; ')}: the guest may have been thawed before the checkpoint`;
    if (request.mode === 'required') throw new QuiesceFailedError(domain, why);
    notice(`domain ${domain}: the backup is crash-consistent: ${why}`);
    return { level: 'crash', method: `${FSFREEZE} tried`, freezeMs: null, reason: why };
  }
  const hooked = request.preFreeze !== undefined || request.preFreezeHost !== undefined;
  return { level: hooked ? 'application' : 'filesystem', method: hooked ? `${FSFREEZE} with pre-freeze hooks` : FSFREEZE, freezeMs, reason: null };
}

/** `virsh domfsthaw` (not quiet: its count is the only output): how many file systems it thawed. */
async function thaw(domain: string, timeoutMs: number): Promise<number> {
  const said = await runTool('virsh', ['domfsthaw', domain], { timeoutMs });
  const count = /Thawed (\d+) file ?system/iu.exec(said)?.[1];
  // A libvirt that words it otherwise: the thaw succeeded, its count unknown (taken as having thawed).
  return count === undefined ? 1 : Number(count);
}

/** Post-thaw hooks: each runs once the guest was frozen, whatever the backup's fate; a failure is said, not thrown. */
async function afterThaw(domain: string, request: QuiesceRequest, hookTimeoutMs: number, notice: (message: string) => void): Promise<void> {
  if (request.postThaw !== undefined) await guestHook(domain, 'post-thaw', request.postThaw, hookTimeoutMs).catch((error: unknown) => notice((error as Error).message));
  if (request.postThawHost !== undefined) await hostHook(domain, 'post-thaw', request.postThawHost, hookTimeoutMs).catch((error: unknown) => notice((error as Error).message));
}

/** virsh's own words without its prefixes ("virsh -q domfsfreeze d failed: error: …"). */
function agentWords(message: string): string {
  return message.replace(/^virsh .*? failed: /u, '').replace(/\berror: /gu, '').trim();
}

/**
 * The watchdog: a shell in its own session (it outlives the engine and its process group) that sleeps until the
 * freeze timeout, then thaws the guest (up to 5 tries a second apart: an agent busy finishing the freeze answers
 * late). `stop`: the engine's thaw succeeded; the shell kills its sleep and exits.
 */
function startWatchdog(domain: string, timeoutMs: number): { stop: () => void } {
  const script = [
    'trap \'kill "$s" 2>/dev/null; exit 0\' TERM',
    'sleep "$1" & s=$!',
    'wait "$s"',
    'for i in 1 2 3 4 5; do virsh -q domfsthaw "$2" >/dev/null 2>&1 && exit 0; sleep 1; done',
    'exit 1',
  ].join('\n');
  const child = spawn('/bin/sh', ['-c', script, 'engine-thaw-watchdog', (timeoutMs / 1000).toFixed(3), domain], { detached: true, stdio: 'ignore' });
  child.unref();
  return {
    stop: () => {
      if (child.pid !== undefined && child.exitCode === null) child.kill('SIGTERM');
    },
  };
}

/** A hook on this host: `/bin/sh -c CMD`, ENGINE_DOMAIN and ENGINE_HOOK set; its status checked, its output in the error. */
function hostHook(domain: string, phase: 'pre-freeze' | 'post-thaw', command: string, timeoutMs: number): Promise<void> {
  return new Promise((resolve, reject) => {
    execFile('/bin/sh', ['-c', command], { timeout: timeoutMs, killSignal: 'SIGKILL', maxBuffer: 1024 * 1024, env: { ...process.env, ENGINE_DOMAIN: domain, ENGINE_HOOK: phase } }, (error, stdout, stderr) => {
      if (!error) return resolve();
      const output = clip(`${stdout}${stderr}`);
      const how = error.killed ? `did not end within ${timeoutMs / 1000} s` : `failed (${typeof error.code === 'number' ? `exit status ${error.code}` : error.message})`;
      reject(new Error(`the ${phase} hook on this host ${how}${output ? `: ${output}` : ''}`));
    });
  });
}

function clip(text: string): string {
  const t = text.trim();
  return t.length > HOOK_OUTPUT_CHARS ? `${t.slice(0, HOOK_OUTPUT_CHARS)}…` : t;
}

/** One guest agent command through libvirt (`virsh qemu-agent-command`), its `return`. */
async function agentCommand<T>(domain: string, command: string, args?: Record<string, unknown>): Promise<T> {
  const json = JSON.stringify(args ? { execute: command, arguments: args } : { execute: command });
  const { stdout } = await runToolOutput('virsh', ['-q', 'qemu-agent-command', domain, json, '--timeout', String(AGENT_ANSWER_S)], { timeoutMs: (AGENT_ANSWER_S + 20) * 1000 });
  return (JSON.parse(stdout) as { return: T }).return;
}

/**
 * A hook in the guest: `/bin/sh -c CMD` by the agent's guest-exec, waited for (guest-exec-status) up to the
 * timeout, then killed (a guest-exec of `kill -9`); its exit status checked, its output in the error.
 */
async function guestHook(domain: string, phase: 'pre-freeze' | 'post-thaw', command: string, timeoutMs: number): Promise<void> {
  let pid: number;
  try {
    ({ pid } = await agentCommand<{ pid: number }>(domain, 'guest-exec', { path: '/bin/sh', arg: ['-c', command], 'capture-output': true }));
  } catch (error) {
    throw new Error(`the ${phase} hook could not be started in the guest: ${agentWords((error as Error).message)}`);
  }
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const status = await agentCommand<{ exited: boolean; exitcode?: number; signal?: number; 'out-data'?: string; 'err-data'?: string }>(domain, 'guest-exec-status', { pid });
    if (status.exited) {
      if (status.exitcode === 0) return;
      const output = clip(Buffer.from(status['out-data'] ?? '', 'base64').toString() + Buffer.from(status['err-data'] ?? '', 'base64').toString());
      const how = status.exitcode !== undefined ? `exit status ${status.exitcode}` : `signal ${status.signal ?? '?'}`;
      throw new Error(`the ${phase} hook in the guest failed (${how})${output ? `: ${output}` : ''}`);
    }
    if (performance.now() >= deadline) {
      await agentCommand(domain, 'guest-exec', { path: '/bin/sh', arg: ['-c', `kill -9 ${pid}`] }).catch(() => undefined);
      throw new Error(`the ${phase} hook in the guest did not end within ${timeoutMs / 1000} s (killed)`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}
