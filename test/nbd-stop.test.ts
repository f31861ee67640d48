/**
 * SIGINT while an NBD server sits on the engine's requests (nbdkit's delay filter: every READ, or WRITE,
 * answered only after DELAY_S). The engine must not wait for those replies: it fails them, drops the
 * connection and exits 130 at once, having committed nothing and left no lease behind.
 *
 * No clock decides the outcome. nbdkit's log filter (outside the delay filter) records each request as it
 * arrives and its return before the reply is sent; the log is read as soon as the engine has exited. An
 * engine that waited for the replies would find every request answered (return=0) by then: a request
 * without a successful return at the engine's exit proves it did not wait. (One whose sleep nbdkit cut short
 * on seeing the connection close shows as ESHUTDOWN.) DELAY_S is below the engine's request timeout (60 s),
 * which would also close the connection, and long enough for the engine to stop first on any machine.
 * nbdkit is not asked to outlive the disconnect: 1.32 sometimes aborts then (raw_send_socket: Assertion
 * `sock >= 0' failed), its own bug.
 */
import { afterAll, beforeAll, describe, expect, onTestFinished, test } from 'vitest';
import { access, readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { backUp, collectOutput, exitOf, hostCacheLeftovers, initRepository, spawnEngine, tempDir, waitFor, withoutProgress, withoutStopNotice, writeRegion } from './helpers.js';

const MiB = 1024 * 1024;
const DELAY_S = 45;
let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-nbd-stop-'));
});
afterAll(async () => {
  await cleanup();
});

/** nbdkit in the foreground, tied to this process, logging every request (the log filter outside the delay). */
async function slowExport(name: string, plugin: string[], delay: string): Promise<{ uri: string; log: string }> {
  const socket = join(dir, `${name}.sock`);
  const log = join(dir, `${name}.log`);
  // -t 256: every request the engine sends reaches the delay at once (16 threads per connection would queue the rest unlogged).
  const nbdkit = spawn('nbdkit', ['-f', '--exit-with-parent', '-t', '256', '-U', socket, '--filter=log', '--filter=delay', ...plugin, `${delay}=${DELAY_S}`, `logfile=${log}`], { stdio: 'ignore', cwd: dir });
  onTestFinished(async () => {
    if (nbdkit.exitCode === null && nbdkit.signalCode === null) {
      nbdkit.kill('SIGTERM');
      await exitOf(nbdkit);
    }
  });
  await waitFor('nbdkit listens', () => access(socket).then(() => true, () => false), { child: nbdkit });
  return { uri: `nbd+unix:///?socket=${socket}`, log };
}

/** The requests of `command` (Read, Write) nbdkit logged, by connection and id, with the return each got so far. */
async function requests(log: string, command: string): Promise<Map<string, string | undefined>> {
  const seen = new Map<string, string | undefined>();
  for (const line of (await readFile(log, 'utf8').catch(() => '')).split('\n')) {
    const asked = new RegExp(`connection=(\\d+) ${command} id=(\\d+) `).exec(line);
    if (asked) seen.set(`${asked[1]}/${asked[2]}`, undefined);
    const answered = new RegExp(`connection=(\\d+) \\.\\.\\.${command} id=(\\d+) (return=.*)$`).exec(line);
    if (answered) seen.set(`${answered[1]}/${answered[2]}`, answered[3]);
  }
  return seen;
}

/**
 * Starts `args`, sends SIGINT once nbdkit has `command` requests of it in its delay, and returns how it exited
 * and the returns nbdkit had logged for those requests at that moment.
 */
async function interruptWhileDelayed(args: string[], log: string, command: string): Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string; atExit: (string | undefined)[] }> {
  const child: ChildProcess = spawnEngine(args);
  const out = collectOutput(child);
  onTestFinished(() => void (child.exitCode === null && child.kill('SIGKILL')));
  // The engine sends its first request after it holds its lease and its signal handlers are in place.
  await waitFor(`nbdkit has a ${command} of the engine`, async () => (await requests(log, command)).size > 0, { child, output: out.stderr });
  child.kill('SIGINT');
  const exit = await exitOf(child);
  const atExit = [...(await requests(log, command)).values()];
  // The final line is what is checked: a loaded machine may say first that it is stopping (the slow-stop notice).
  return { ...exit, stderr: withoutStopNotice(withoutProgress(out.stderr())), atExit };
}

/** At the engine's exit, nbdkit had its requests, and none was answered: the engine left them in flight. */
function expectAbandoned(atExit: (string | undefined)[]): void {
  expect(atExit.length).toBeGreaterThan(0);
  expect(atExit.filter((r) => r !== undefined && r !== 'return=-1 error=ESHUTDOWN')).toEqual([]);
}

describe('SIGINT with an NBD server that holds the requests in flight', () => {
  test(`backup from nbdkit delay-read=${DELAY_S}: exit 130, nothing committed, no lease left; the reads in flight were abandoned, not awaited`, async () => {
    const repo = join(dir, 'repo-backup');
    await initRepository(repo);
    const exported = await slowExport('read', ['pattern', String(64 * MiB)], 'delay-read');
    const result = await interruptWhileDelayed(['backup', '--repo', repo, '--source', exported.uri, '--name', 'stalled'], exported.log, 'Read');
    expect([result.code, result.signal, result.stderr]).toEqual([130, null, 'engine: backup was interrupted (SIGINT); nothing of it was committed\n']);
    for (const folder of ['backups', 'index', 'leases']) expect([folder, await readdir(join(repo, folder)).catch(() => [])]).toEqual([folder, []]);
    expect(await hostCacheLeftovers(repo)).toEqual([]);
    expectAbandoned(result.atExit);
  });

  test(`restore to nbdkit delay-write=${DELAY_S}: exit 130, said as partially written (never as restored), no lease left; the writes in flight were abandoned`, async () => {
    const repo = join(dir, 'repo-restore');
    await initRepository(repo);
    const image = join(dir, 'disk.raw');
    await writeRegion(image, 0, 32 * MiB, 'random', 'nbd-stop');
    const backup = await backUp(repo, ['--source', image]);
    const exported = await slowExport('write', ['memory', String(64 * MiB)], 'delay-write');
    const result = await interruptWhileDelayed(['restore', '--repo', repo, backup.id, '--to', exported.uri], exported.log, 'Write');
    expect([result.code, result.signal]).toEqual([130, null]);
    const target = exported.uri.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
    expect(result.stderr).toMatch(new RegExp(`^engine: restore was interrupted \\(SIGINT\\); target ${target} was partially written: bytes 0 to \\d+ \\(of ${32 * MiB}\\) may differ from both its old content and the backup; the rest of it is unchanged\\n$`));
    expect(await readdir(join(repo, 'leases')).catch(() => [])).toEqual([]);
    expect(await hostCacheLeftovers(repo)).toEqual([]);
    expectAbandoned(result.atExit);
  });
});
