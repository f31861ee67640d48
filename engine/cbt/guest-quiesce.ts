/**
 * Quiesce for libvirt backups (`backup --libvirt DOMAIN --quiesce`): the guest's file systems frozen through its
 * QEMU guest agent around the instant backup-begin takes its point in time, thawed as soon as it returns (the
 * pull-mode export is frozen in time by then; the data is read after the thaw). libvirt 9.0 refuses
 * `checkpoint-create --quiesce` and backup-begin has no quiesce flag, so the freeze and thaw are libvirt's
 * fsfreeze calls (`virsh domfsfreeze`/`domfsthaw`) around backup-begin.
 *
 * The order: pre-freeze hook on the appliance → pre-freeze hook in the guest (guest-exec) → watchdog started →
 * freeze → backup-begin → thaw → watchdog stopped → post-thaw hook in the guest → post-thaw hook on the appliance
 * (each post-thaw hook whose pre-freeze hook succeeded, whatever happened after).
 * No hook runs while the guest is frozen (the agent refuses guest-exec then, and a hook must not lengthen the
 * freeze).
 *
 * The guest does not stay frozen: before the freeze, the thaw watchdog (../quiesce/thaw-watchdog.ts, shared with oVirt: a
 * detached process in its own session, so that it outlives the engine killed with -9 or its process group) sleeps
 * until the freeze timeout and then thaws the guest, again and again, until the agent says `thawed` or the domain
 * is gone; the engine stops it once its own thaw, after a freeze that returned, succeeded. A freeze that failed or
 * timed out is thawed by the engine once at once and the watchdog left running: libvirt's fsfreeze goes on waiting
 * for the agent after virsh is gone, so the freeze may land later.
 */
import { execFile } from 'node:child_process';
import { NO_QUIESCE, type Consistency } from '../../repo-format/backup-record.js';
import { crashPoint } from '../../repo-format/crash-points.js';
import { QuiesceFailedError } from '../errors.js';
import { startThawWatchdog } from '../quiesce/thaw-watchdog-control.js';
import { runTool, runToolOutput, ToolError } from './run-tool.js';

export interface QuiesceRequest {
  /** `required`: a backup that cannot be quiesced fails (ENGINE_QUIESCE_FAILED); `try`: it is taken crash-consistent, the reason recorded. */
  mode: 'required' | 'try';
  /** From the watchdog's start (right before the freeze): the watchdog thaws the guest then, whatever happened to the engine. Default 10 s. */
  freezeTimeoutMs?: number | undefined;
  /** The longest a hook may run (each); default 60 s. */
  hookTimeoutMs?: number | undefined;
  /** Run in the guest by its agent (`/bin/sh -c`) before the freeze; a failure is a failed quiesce. */
  preFreeze?: string | undefined;
  /** Run in the guest by its agent (`/bin/sh -c`) after the thaw, when `preFreeze` succeeded (or, without it, once the freeze was asked for). */
  postThaw?: string | undefined;
  /** Run on this host (`/bin/sh -c`, ENGINE_DOMAIN set) before the freeze; a failure is a failed quiesce. */
  preFreezeHost?: string | undefined;
  /** Run on this host (`/bin/sh -c`, ENGINE_DOMAIN set) after the thaw, when `preFreezeHost` succeeded (or, without it, once the freeze was asked for). */
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
/** How much longer than the freeze timeout the freeze is waited for: libvirt's own errors (its agent's 5 s sync) come first. */
const FREEZE_GRACE_MS = 5_000;
/** libvirt's refusals that come before anything is sent to the agent (qemuDomainAgentAvailable): no freeze can follow. */
const NEVER_SENT = /guest agent is not configured|agent is not connected|domain is not running/iu;
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
  // The post-thaw hooks owed: each one whose pre-freeze hook succeeded (or that has none, once the freeze was
  // asked for), run whatever happened after, as qemu-ga runs its own thaw hook (qga/commands-posix.c).
  const owed = { guest: false, host: false };
  const postThaw = (): Promise<void> => afterThaw(domain, request, owed, hookTimeoutMs, notice);
  try {
    if (request.preFreezeHost !== undefined) await hostHook(domain, 'pre-freeze', request.preFreezeHost, hookTimeoutMs);
    owed.host = request.preFreezeHost !== undefined;
    if (request.preFreeze !== undefined) await guestHook(domain, 'pre-freeze', request.preFreeze, hookTimeoutMs);
    owed.guest = request.preFreeze !== undefined;
  } catch (error) {
    await postThaw();
    return fallBack((error as Error).message);
  }
  owed.host = owed.guest = true;
  const watchdog = await startThawWatchdog({ afterMs: freezeTimeoutMs, libvirt: domain });
  const started = performance.now();
  try {
    // Waited for up to the freeze timeout (and a little more, for libvirt's own errors to come first): past it
    // the watchdog thaws the guest, so a freeze that has not returned by then cannot make a quiesced backup.
    await runTool('virsh', ['-q', 'domfsfreeze', domain], { timeoutMs: freezeTimeoutMs + FREEZE_GRACE_MS });
  } catch (error) {
    const message = (error as Error).message;
    const why = error instanceof ToolError && error.timedOut ? `the guest agent's freeze did not end within ${(freezeTimeoutMs + FREEZE_GRACE_MS) / 1000} s (the freeze timeout and ${FREEZE_GRACE_MS / 1000} s)` : `the guest agent's freeze failed: ${agentWords(message)}`;
    if (NEVER_SENT.test(message)) {
      // libvirt refused before anything reached the agent: nothing can be frozen.
      await watchdog.stop();
    } else {
      // libvirt's fsfreeze goes on waiting for the agent after virsh is gone, and a freeze it gave up on may still
      // be carried out: thawed once now (as VDSM does: "Must always thaw, even if freeze failed"), and the
      // watchdog stays, to thaw until the agent says thawed.
      await thaw(domain, AGENT_ANSWER_S * 1000).catch(() => undefined);
    }
    await postThaw();
    return fallBack(why);
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
      notice(`domain ${domain}: the thaw failed (${agentWords((error as Error).message)}); the watchdog thaws the guest ${freezeTimeoutMs / 1000} s after the freeze, and until the agent says thawed`);
      return undefined;
    });
    freezeMs = Math.round(performance.now() - started);
    // The freeze had returned: a thaw that succeeded leaves nothing frozen.
    if (thawedCount !== undefined) await watchdog.stop();
    await postThaw();
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

/** The post-thaw hooks `owed`: each runs whatever the backup's fate; a failure is said, not thrown. */
async function afterThaw(domain: string, request: QuiesceRequest, owed: { guest: boolean; host: boolean }, hookTimeoutMs: number, notice: (message: string) => void): Promise<void> {
  if (owed.guest && request.postThaw !== undefined) await guestHook(domain, 'post-thaw', request.postThaw, hookTimeoutMs).catch((error: unknown) => notice((error as Error).message));
  if (owed.host && request.postThawHost !== undefined) await hostHook(domain, 'post-thaw', request.postThawHost, hookTimeoutMs).catch((error: unknown) => notice((error as Error).message));
}

/** virsh's own words without its prefixes ("virsh -q domfsfreeze d failed: error: …"). */
function agentWords(message: string): string {
  return message.replace(/^virsh .*? failed: /u, '').replace(/\berror: /gu, '').trim();
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
