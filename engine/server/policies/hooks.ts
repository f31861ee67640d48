/**
 * Notification hooks of a policy (SPEC.md 23.1): on a run's failure (and, when asked, its success) an
 * executable gets the run's JSON on stdin and an HTTP(S) URL gets it POSTed. Neither blocks the scheduler:
 * each is started and left to finish on its own, killed (or aborted) at the timeout; at most MAX_IN_FLIGHT
 * run at once, and one more is dropped with a log line rather than piling up behind a hook that hangs.
 *
 * No secret reaches a hook: the run's JSON holds none (requests name secret files, never their content),
 * the executable gets a bare environment (PATH, LANG, TZ: not the server's AWS keys or ENGINE_PASSWORD), a
 * URL's user and password appear in no log line, redirects are not followed (the body would go where the
 * config did not say). A hook's failure, exit status or timeout is logged, and changes nothing else.
 */
import { spawn } from 'node:child_process';
import type { NotifyConfig } from './config.js';
import type { RunRecord } from './store.js';

const MAX_IN_FLIGHT = 16;
/** What a hook may say back that is logged (its stderr's start, on failure). */
const MAX_LOGGED = 200;

export interface Hooks {
  fire(notify: NotifyConfig, run: RunRecord): void;
  /** Every hook started has ended (tests, shutdown). */
  settled(): Promise<void>;
}

/** The URL as logs show it: without user and password. */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    u.username = '';
    u.password = '';
    u.search = '';
    return u.toString();
  } catch {
    return '(a URL)';
  }
}

export function createHooks(log: (message: string) => void): Hooks {
  const inFlight = new Set<Promise<void>>();
  const start = (what: string, work: () => Promise<void>): void => {
    if (inFlight.size >= MAX_IN_FLIGHT) {
      log(`${what}: not started, ${MAX_IN_FLIGHT} hooks are still running`);
      return;
    }
    const done: Promise<void> = work()
      .catch((error: unknown) => log(`${what} failed: ${(error as Error).message}`))
      .finally(() => inFlight.delete(done));
    inFlight.add(done);
  };
  return {
    fire(notify, run) {
      const outcome = run.state === 'succeeded' ? 'success' : 'failure';
      if (!notify.on.has(outcome)) return;
      const body = `${JSON.stringify({ event: `run.${outcome}`, run })}\n`;
      const what = `policy ${run.policy}, run ${run.id} (${run.vm}, ${run.state})`;
      if (notify.command) start(`${what}: hook ${notify.command[0]}`, () => runCommand(notify.command!, body, notify.timeoutMs));
      if (notify.url) start(`${what}: hook POST ${redactUrl(notify.url)}`, () => postJson(notify.url!, body, notify.timeoutMs));
    },
    async settled() {
      while (inFlight.size > 0) await Promise.all([...inFlight]);
    },
  };
}

function runCommand(command: string[], body: string, timeoutMs: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const env: Record<string, string> = { PATH: process.env.PATH ?? '/usr/bin:/bin', LANG: 'C.UTF-8' };
    if (process.env.TZ !== undefined) env.TZ = process.env.TZ;
    const child = spawn(command[0]!, command.slice(1), { stdio: ['pipe', 'ignore', 'pipe'], env, cwd: '/' });
    let stderr = '';
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.stderr.on('data', (chunk: Buffer) => {
      if (stderr.length < MAX_LOGGED) stderr += chunk.toString('utf8');
    });
    // A hook that does not read its stdin is its own business: EPIPE is not a failure of the hook.
    child.stdin.on('error', () => undefined);
    child.stdin.end(body);
    child.on('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (timedOut) return reject(new Error(`killed after ${timeoutMs / 1000} s`));
      if (code === 0) return resolve();
      const said = stderr.trim().split('\n')[0]?.slice(0, MAX_LOGGED);
      reject(new Error(`${signal ? `killed by ${signal}` : `exit status ${code}`}${said ? `: ${said}` : ''}`));
    });
  });
}

async function postJson(url: string, body: string, timeoutMs: number): Promise<void> {
  // fetch refuses a URL with a user and password in it: they go as Basic authentication (RFC 7617).
  const target = new URL(url);
  const headers: Record<string, string> = { 'content-type': 'application/json' };
  if (target.username !== '' || target.password !== '') {
    headers.authorization = `Basic ${Buffer.from(`${decodeURIComponent(target.username)}:${decodeURIComponent(target.password)}`).toString('base64')}`;
    target.username = '';
    target.password = '';
  }
  const answer = await fetch(target, { method: 'POST', headers, body, redirect: 'manual', signal: AbortSignal.timeout(timeoutMs) }).catch((error: unknown) => {
    const e = error as Error & { cause?: { code?: string } };
    throw new Error(e.name === 'TimeoutError' ? `no answer within ${timeoutMs / 1000} s` : (e.cause?.code ?? e.message));
  });
  await answer.body?.cancel().catch(() => undefined);
  if (answer.status < 200 || answer.status > 299) throw new Error(`HTTP ${answer.status}`);
}
