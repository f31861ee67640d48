/**
 * Checks that read a repository's state (list, verify --read-data, restore of every backup, prune) made as calls
 * of the engine's library in the test's own process rather than as `engine` processes: what they assert is the
 * repository's state, which the library reads as the CLI does (the CLI's commands are these calls,
 * cli/engine-calls.ts), not the CLI's contract, which its own tests hold. A process each costs its start-up,
 * ~0.1-0.15 CPU-s, about 5x the call on a small repository (measured, one process against 11 calls in one:
 * restore of 6 MiB 0.17 CPU-s as a process, 0.03 as a call; list 0.09 and 0.001; verify --read-data 0.17 and
 * 0.03), and the heavy files run hundreds of them. The faults themselves (kill -9, ENGINE_CRASH_AT, a stop, a
 * clock skew by LD_PRELOAD) and the commands whose output or exit code is the assertion stay processes.
 */
import { expect } from 'vitest';
import { restore, setNoticeSink, verify, type VerifyReport } from '../dist/engine/index.js';
import { filesIdentical } from './helpers.js';

let turns: Promise<unknown> = Promise.resolve();

/**
 * `call` with `env` (ENGINE_CACHE_DIR, S3's variables: the library reads them from process.env, as a process
 * does) set in process.env for its length; calls take turns, so that none sees another's.
 */
export function inEnvironment<T>(env: Record<string, string>, call: () => Promise<T>, notices?: string[]): Promise<T> {
  const turn = turns.then(async () => {
    const saved = Object.keys(env).map((key) => [key, process.env[key]] as const);
    Object.assign(process.env, env);
    // What the CLI prints on stderr of its own accord (repo-format/notices.ts: a dead lease broken, a cache rebuilt).
    if (notices) setNoticeSink((message) => notices.push(message));
    try {
      return await call();
    } finally {
      if (notices) setNoticeSink(undefined);
      for (const [key, value] of saved) {
        if (value === undefined) delete process.env[key];
        else process.env[key] = value;
      }
    }
  });
  turns = turn.catch(() => undefined);
  return turn;
}

/** ENGINE_PASSWORD of an environment as the library's passphrase (its bytes, as the CLI takes them). */
export const passphraseOf = (env: Record<string, string>): Buffer | undefined => (env.ENGINE_PASSWORD === undefined ? undefined : Buffer.from(env.ENGINE_PASSWORD));

/** verify --read-data with no problem (the CLI's exit 0 is report.ok: cli/commands/maintenance.ts). */
export function expectClean(report: VerifyReport): VerifyReport {
  expect(report.problems).toEqual([]);
  expect(report.ok).toBe(true);
  return report;
}

/**
 * `restore ID --to target` (a new file) and compared with `source` (cmp); false when either fails. `notices`
 * collects what the CLI would have printed on stderr (its notices; a restore prints nothing else but progress).
 */
export async function restoresIdentical(repo: string, id: string, source: string, target: string, env: Record<string, string> = {}, passphrase = passphraseOf(env), notices?: string[]): Promise<boolean> {
  const restored = await inEnvironment(env, () => restore({ repo, passphrase, backupId: id, target: { kind: 'path', path: target } }), notices).then(
    () => true,
    () => false,
  );
  return restored && (await filesIdentical(target, source));
}

/** verify --read-data, in `env`, clean. */
export async function verifiesClean(repo: string, env: Record<string, string> = {}, passphrase = passphraseOf(env)): Promise<VerifyReport> {
  return expectClean(await inEnvironment(env, () => verify({ repo, passphrase, readData: true })));
}
