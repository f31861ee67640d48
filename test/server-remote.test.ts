/**
 * `engine --server URL backup|restore|verify|prune|gc` (SPEC.md 23.5) against a real `engine server` on
 * 127.0.0.1 with bearer tokens: each command prints what the same command prints locally, text or --json,
 * and exits with the same code (the server's repository is a folder, so the local command can run on the
 * very same repository for the comparison); a restore compared byte for byte; a damaged pack exits 4 both
 * ways; SIGINT cancels the server's job (exit 130, the job `cancelled`, nothing committed); the token from a
 * file or ENGINE_SERVER_TOKEN, a missing or read-only token refused with the server's code.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { access, chmod, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { collectOutput, damageFirstDataFrame, exitOf, filesIdentical, initRepository, runEngine, spawnEngine, tempDir, waitFor, writeRegion } from './helpers.js';
import { call, startServer, writeConfig, type RunningServer } from './server-helpers.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;
let repo: string;
/** A folder repository beside the server's, for the local command's run of the same backups. */
let twin: string;
let image: string;
let server: RunningServer;
let nbdkit: ChildProcess;
let slowUri: string;
let operatorFile: string;
let readToken: string;
let operatorToken: string;

async function token(role: 'read' | 'operator'): Promise<string> {
  const made = await runEngine(['server', 'token', 'add', '--role', role, '--file', join(dir, 'tokens'), '--label', `${role}-cli`, '--json']);
  expect(made.code, made.stderr).toBe(0);
  return (JSON.parse(made.stdout) as { token: string }).token;
}

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-server-remote-'));
  repo = join(dir, 'repo');
  await initRepository(repo);
  twin = join(dir, 'twin');
  await initRepository(twin);
  image = join(dir, 'disk.img');
  await writeRegion(image, 0, 3 * MiB, 'random', 'remote');
  const socket = join(dir, 'slow.sock');
  nbdkit = spawn('nbdkit', ['-f', '--exit-with-parent', '-t', '1', '-U', socket, '--filter=delay', 'pattern', '64M', 'rdelay=300ms'], { stdio: 'ignore' });
  await waitFor('nbdkit listens', () => access(socket).then(() => true, () => false), { child: nbdkit });
  slowUri = `nbd+unix:///?socket=${socket}`;
  readToken = await token('read');
  operatorToken = await token('operator');
  operatorFile = join(dir, 'operator.token');
  await writeFile(operatorFile, `${operatorToken}\n`);
  await chmod(operatorFile, 0o600);
  const config = await writeConfig(dir, { stateDir: join(dir, 'state'), tokensFile: join(dir, 'tokens'), repositories: { main: { location: repo } } });
  server = await startServer(['--config', config, '--listen', '127.0.0.1:0']);
});

afterAll(async () => {
  await server?.stop();
  if (nbdkit && nbdkit.exitCode === null) nbdkit.kill('SIGTERM');
  await cleanup?.();
});

/** engine --server URL ARGS, the token from the operator's file unless `env` gives another way. */
function remote(args: string[], env: Record<string, string> = {}, tokenFile: string | null = operatorFile): ReturnType<typeof runEngine> {
  return runEngine(['--server', server.url, ...(tokenFile ? ['--server-token-file', tokenFile] : []), ...args], { env: { ENGINE_SERVER_TOKEN: '', ...env } });
}

/** What varies between two runs of the same backup: ids, times, durations and rates. */
function steady(text: string): string {
  return text
    .replace(/\b[0-9a-f]{32}\b/g, 'ID')
    .replace(/in \d+\.\d s \([^)]*\)/g, 'in T')
    .replace(/"(startTime|endTime|durationMs|hostname)": [^,\n]+/g, '"$1": X');
}

let backupId: string;

describe('engine --server', () => {
  test('backup: the same text and JSON as the local command (into a twin repository), exit 0', async () => {
    const local = await runEngine(['backup', '--repo', twin, '--source', image, '--name', 'vm', '--full']);
    const viaServer = await remote(['backup', '--repo', 'main', '--source', image, '--name', 'vm', '--full']);
    expect(viaServer.code, viaServer.stderr).toBe(0);
    expect(local.code).toBe(0);
    expect(viaServer.stdout).toMatch(/^backup [0-9a-f]{32} \(full\) "vm" committed\n {2}disk\.img: full/);
    expect(steady(viaServer.stdout)).toBe(steady(local.stdout));

    const localJson = await runEngine(['backup', '--repo', twin, '--source', image, '--name', 'vm', '--json']);
    const viaServerJson = await remote(['backup', '--repo', 'main', '--source', image, '--name', 'vm', '--json'], { ENGINE_SERVER_TOKEN: operatorToken }, null);
    expect(viaServerJson.code, viaServerJson.stderr).toBe(0);
    expect(viaServerJson.stderr).toBe('');
    const a = JSON.parse(localJson.stdout) as Record<string, unknown>;
    const b = JSON.parse(viaServerJson.stdout) as Record<string, unknown>;
    expect(Object.keys(b)).toEqual(Object.keys(a));
    expect(b).toMatchObject({ name: 'vm', type: 'full', parent: null, disks: [{ name: 'disk.img', size: 3 * MiB, bytesNew: 0 }] });
    expect(steady(JSON.stringify(b, null, 1))).toBe(steady(JSON.stringify(a, null, 1)));
    backupId = String(b.id);
  });

  test('restore: the file byte for byte, the same text as the local command', async () => {
    const local = await runEngine(['restore', '--repo', repo, backupId, '--to', join(dir, 'local.img')]);
    const viaServer = await remote(['restore', '--repo', 'main', backupId.slice(0, 12), '--to', join(dir, 'remote.img')]);
    expect(viaServer.code, viaServer.stderr).toBe(0);
    expect(await filesIdentical(join(dir, 'remote.img'), image)).toBe(true);
    expect(viaServer.stdout.replace('remote.img', 'X')).toBe(local.stdout.replace('local.img', 'X'));
  });

  test('prune and gc (dry runs), verify: the same JSON as the local command on the same repository', async () => {
    for (const args of [['prune', '--keep-last', '1', '--dry-run'], ['gc', '--dry-run'], ['verify']]) {
      const local = await runEngine([...args, '--repo', repo, '--json']);
      const viaServer = await remote([...args, '--repo', 'main', '--json']);
      expect(viaServer.code, `${args.join(' ')}: ${viaServer.stderr}`).toBe(local.code);
      expect(JSON.parse(viaServer.stdout), args.join(' ')).toEqual(JSON.parse(local.stdout));
    }
  });

  test('errors: the server\'s code and the local exit code; a damaged pack exits 4 both ways; a missing or read-only token refused', async () => {
    const missing = await remote(['restore', '--repo', 'main', 'abcdef', '--to', join(dir, 'none.img'), '--json']);
    const missingLocal = await runEngine(['restore', '--repo', repo, 'abcdef', '--to', join(dir, 'none.img'), '--json']);
    expect(missing.code).toBe(missingLocal.code);
    expect((JSON.parse(missing.stdout) as { error: { code: string } }).error.code).toBe((JSON.parse(missingLocal.stdout) as { error: { code: string } }).error.code);

    const noToken = await remote(['gc', '--repo', 'main', '--dry-run', '--json'], {}, null);
    expect(noToken.code).toBe(1);
    expect((JSON.parse(noToken.stdout) as { error: { code: string } }).error.code).toBe('ENGINE_UNAUTHORIZED');
    const reader = await remote(['gc', '--repo', 'main', '--dry-run', '--json'], { ENGINE_SERVER_TOKEN: readToken }, null);
    expect((JSON.parse(reader.stdout) as { error: { code: string } }).error.code).toBe('ENGINE_FORBIDDEN');
    const local = await remote(['list', '--repo', 'main']);
    expect(local.code).toBe(2);
    expect(local.stderr).toMatch(/--server runs backup, restore, verify, prune, gc; list runs here only/);
    const passphrase = await remote(['gc', '--repo', 'main', '--password-file', operatorFile]);
    expect(passphrase.code).toBe(2);
    const unreachable = await runEngine(['--server', 'http://127.0.0.1:9', 'gc', '--repo', 'main', '--json']);
    expect(unreachable.code).toBe(1);
    expect((JSON.parse(unreachable.stdout) as { error: { code: string } }).error.code).toBe('ENGINE_SERVER_UNREACHABLE');

    await damageFirstDataFrame(repo);
    const damagedLocal = await runEngine(['verify', '--read-data', '--repo', repo, '--json']);
    const damaged = await remote(['verify', '--read-data', '--repo', 'main', '--json']);
    expect(damagedLocal.code).toBe(4);
    expect(damaged.code).toBe(4);
    expect(JSON.parse(damaged.stdout)).toEqual(JSON.parse(damagedLocal.stdout));
  });

  test('SIGINT cancels the job on the server: exit 130, the job cancelled, no backup committed', async () => {
    const before = (await call(server, 'GET', '/api/v1/repositories/main/backups', undefined, { token: readToken })).json as { backups: unknown[] };
    const child = spawnEngine(['--server', server.url, '--server-token-file', operatorFile, 'backup', '--repo', 'main', '--source', slowUri, '--name', 'slow', '--json']);
    const output = collectOutput(child);
    let jobId = '';
    await waitFor('the job reads', async () => {
      const jobs = ((await call(server, 'GET', '/api/v1/jobs?state=running', undefined, { token: readToken })).json as { jobs: { id: string; progress: { done: number } | null }[] }).jobs;
      jobId = jobs[0]?.id ?? '';
      return (jobs[0]?.progress?.done ?? 0) > 0;
    }, { child, everyMs: 50 });
    child.kill('SIGINT');
    const exited = await exitOf(child);
    expect(exited.code).toBe(130);
    expect((JSON.parse(output.stdout()) as { error: { code: string } }).error.code).toBe('ENGINE_INTERRUPTED');
    const job = (await call(server, 'GET', `/api/v1/jobs/${jobId}`, undefined, { token: readToken })).json as { state: string };
    expect(job.state).toBe('cancelled');
    const after = (await call(server, 'GET', '/api/v1/repositories/main/backups', undefined, { token: readToken })).json as { backups: unknown[] };
    expect(after.backups.length).toBe(before.backups.length);
  });
});
