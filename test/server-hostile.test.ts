/**
 * engine server against hostile and careless clients, and its listening rules (SPEC.md "The service API"):
 * tokens (stored hashed, made by `engine server token add`), roles, TLS (and plain HTTP sent to the TLS
 * port), bad JSON, bodies over the limit, unknown fields, path traversal in repository names and job ids, a
 * full queue, a non-loopback address without TLS or tokens, a Unix socket. Every error is one line and a
 * stable code in a JSON body; every JSON answer is checked against the OpenAPI document at the end.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { access, readFile, stat, writeFile } from 'node:fs/promises';
import { spawn, type ChildProcess } from 'node:child_process';
import { connect } from 'node:net';
import { join } from 'node:path';
import { initRepository, runEngine, sh, tempDir, waitFor, writeRegion } from './helpers.js';
import { call, checkAnswers, jobEnd, openApiDocument, recorded, startServer, writeConfig, type RunningServer } from './server-helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let repo: string;
let tokensFile: string;
let operator: string;
let reader: string;
let ca: Buffer;
let server: RunningServer;
let nbdkit: ChildProcess;
let slowUri: string;

const PASSPHRASE = 'correct horse battery staple';

type ErrorAnswer = { error: { code: string; message: string; details: Record<string, unknown> } };

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-server-hostile-'));
  repo = join(dir, 'repo');
  await initRepository(repo);
  await writeRegion(join(dir, 'a.img'), 0, 4 * 1024 * 1024, 'random', 'a');
  tokensFile = join(dir, 'tokens');
  const made = await runEngine(['server', 'token', 'add', '--role', 'operator', '--file', tokensFile, '--label', 'ci', '--json']);
  expect(made.code, made.stderr).toBe(0);
  operator = (JSON.parse(made.stdout) as { token: string }).token;
  const plain = await runEngine(['server', 'token', 'add', '--role', 'read', '--file', tokensFile, '--label', 'dashboard']);
  expect(plain.code, plain.stderr).toBe(0);
  reader = plain.stdout.trim();
  await sh('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1', '-days', '2', '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem')]);
  ca = await readFile(join(dir, 'cert.pem'));
  const socket = join(dir, 'slow.sock');
  nbdkit = spawn('nbdkit', ['-f', '--exit-with-parent', '-t', '1', '-U', socket, '--filter=delay', 'pattern', '64M', 'rdelay=300ms'], { stdio: 'ignore' });
  await waitFor('nbdkit listens', () => access(socket).then(() => true, () => false), { child: nbdkit });
  slowUri = `nbd+unix:///?socket=${socket}`;
  // An encrypted repository: its passphrase in a file the config names, never in a request or an answer.
  await writeFile(join(dir, 'passphrase'), `${PASSPHRASE}\n`, { mode: 0o600 });
  const init = await runEngine(['init', join(dir, 'secret'), '--encrypt', '--password-file', join(dir, 'passphrase')]);
  expect(init.code, init.stderr).toBe(0);
  const config = await writeConfig(dir, { stateDir: join(dir, 'state'), tokensFile, limits: { jobs: 1, queue: 1 }, repositories: { main: { location: repo }, secret: { location: join(dir, 'secret'), passwordFile: join(dir, 'passphrase') } } });
  server = await startServer(['--config', config, '--listen', '127.0.0.1:0', '--tls-cert', join(dir, 'cert.pem'), '--tls-key', join(dir, 'key.pem')]);
});

afterAll(async () => {
  await server?.stop();
  if (nbdkit && nbdkit.exitCode === null) nbdkit.kill('SIGTERM');
  await cleanup?.();
});

function expectError(answer: { status: number; json: unknown; text: string }, status: number, code: string): ErrorAnswer['error'] {
  expect(answer.status, answer.text).toBe(status);
  const { error } = answer.json as ErrorAnswer;
  expect(error.code).toBe(code);
  expect(error.message).not.toMatch(/\n/);
  expect(error.message.length).toBeGreaterThan(0);
  return error;
}

describe('engine server: tokens, roles and TLS', () => {
  test('the tokens file holds SHA-256 hashes, 0600, never a token', async () => {
    const text = await readFile(tokensFile, 'utf8');
    expect(text).not.toContain(operator);
    expect(text).not.toContain(reader);
    expect(text.trim().split('\n').map((line) => line.replace(/^[0-9a-f]{64} /, 'HASH '))).toEqual(['HASH operator ci', 'HASH read dashboard']);
    expect((await stat(tokensFile)).mode & 0o777).toBe(0o600);
    expect(server.url).toMatch(/^https:\/\/127\.0\.0\.1:\d+$/);
  });

  test('no token, an unknown one: 401; a read token reads and cannot start or cancel a job: 403', async () => {
    const none = await call(server, 'GET', '/api/v1/jobs', undefined, { ca });
    expectError(none, 401, 'ENGINE_UNAUTHORIZED');
    expect(none.headers['www-authenticate']).toBe('Bearer realm="engine"');
    expectError(await call(server, 'GET', '/api/v1/jobs', undefined, { ca, token: `${operator}x` }), 401, 'ENGINE_UNAUTHORIZED');
    expectError(await call(server, 'GET', '/api/v1/jobs', undefined, { ca, headers: { authorization: `Basic ${operator}` } }), 401, 'ENGINE_UNAUTHORIZED');
    // Without a token nothing is told, not even which paths exist.
    expectError(await call(server, 'GET', '/api/v1/nothing-here', undefined, { ca }), 401, 'ENGINE_UNAUTHORIZED');
    expect((await call(server, 'GET', '/api/v1/jobs', undefined, { ca, token: reader })).status).toBe(200);
    expect((await call(server, 'GET', '/api/v1/repositories', undefined, { ca, token: reader })).status).toBe(200);
    const refused = expectError(await call(server, 'POST', '/api/v1/jobs', { kind: 'gc', repository: 'main', dryRun: true }, { ca, token: reader }), 403, 'ENGINE_FORBIDDEN');
    expect(refused.details).toEqual({ role: 'read', needs: 'operator' });
    expectError(await call(server, 'DELETE', `/api/v1/jobs/${'0'.repeat(32)}`, undefined, { ca, token: reader }), 403, 'ENGINE_FORBIDDEN');
    // The OpenAPI document needs no token.
    expect((await call(server, 'GET', '/api/openapi.json', undefined, { ca })).status).toBe(200);
  });

  test('plain HTTP sent to the TLS port gets no answer; the server goes on answering over TLS', async () => {
    const url = new URL(server.url);
    const reply = await new Promise<string>((resolve) => {
      let text = '';
      const socket = connect(Number(url.port), url.hostname, () => socket.write(`GET /api/v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${operator}\r\n\r\n`));
      socket.on('data', (chunk) => (text += chunk.toString('latin1')));
      socket.on('error', () => resolve(text));
      socket.on('close', () => resolve(text));
    });
    expect(reply).not.toContain('HTTP/1.1');
    await waitFor('the refusal is logged', () => server.stderr().includes('refused a TLS connection from 127.0.0.1'));
    expect((await call(server, 'GET', '/api/v1/jobs', undefined, { ca, token: operator })).status).toBe(200);
  });
});

describe('engine server: hostile requests', () => {
  const post = (body: unknown, headers: Record<string, string> = {}): ReturnType<typeof call> => call(server, 'POST', '/api/v1/jobs', body, { ca, token: operator, headers });

  test('bad JSON, a wrong content type, no body, unknown fields and kinds, secrets in the body: 400, one line', async () => {
    expect(expectError(await post('{"kind": "backup",'), 400, 'ENGINE_INVALID_ARGUMENT').message).toMatch(/^the request body is not JSON: /);
    expectError(await post('kind=backup', { 'content-type': 'application/x-www-form-urlencoded' }), 400, 'ENGINE_INVALID_ARGUMENT');
    expectError(await post(''), 400, 'ENGINE_INVALID_ARGUMENT');
    expectError(await post([1, 2]), 400, 'ENGINE_INVALID_ARGUMENT');
    const unknown = expectError(await post({ kind: 'gc', repository: 'main', dryrun: true }), 400, 'ENGINE_INVALID_ARGUMENT');
    expect(unknown.message).toBe('a gc job: unknown field "dryrun" (known: kind, repository, rewriteBelow, dryRun)');
    expect(expectError(await post({ kind: 'backup', repository: 'main', disks: [{ kind: 'raw', path: join(dir, 'a.img') }], passphrase: 'secret' }), 400, 'ENGINE_INVALID_ARGUMENT').message).toMatch(/unknown field "passphrase"/);
    expectError(await post({ kind: 'format', repository: 'main' }), 400, 'ENGINE_INVALID_ARGUMENT');
    expectError(await post({ kind: 'backup', repository: 'main', disks: [{ kind: 'raw', path: 'relative.img' }] }), 400, 'ENGINE_INVALID_ARGUMENT');
    expectError(await post({ kind: 'backup', repository: 'main', disks: [{ kind: 'raw', path: join(dir, 'a.img') }], libvirt: { domain: 'vm' } }), 400, 'ENGINE_INVALID_ARGUMENT');
    expectError(await post({ kind: 'prune', repository: 'main', keep: {} }), 400, 'ENGINE_INVALID_ARGUMENT');
    expectError(await post({ kind: 'restore', repository: 'main', backup: '../../etc', target: { kind: 'file', path: join(dir, 'x') } }), 400, 'ENGINE_INVALID_ARGUMENT');
    expectError(await call(server, 'GET', '/api/v1/jobs?limit=5', undefined, { ca, token: operator }), 400, 'ENGINE_INVALID_ARGUMENT');
    expectError(await call(server, 'PUT', '/api/v1/jobs', undefined, { ca, token: operator }), 405, 'ENGINE_INVALID_ARGUMENT');
  });

  test('a body over 64 KiB: 413, declared or chunked', async () => {
    const huge = JSON.stringify({ kind: 'gc', repository: 'main', pad: 'x'.repeat(70 * 1024) });
    expectError(await post(huge), 413, 'ENGINE_BODY_TOO_LARGE');
    const chunked = await call(server, 'POST', '/api/v1/jobs', huge, { ca, token: operator, chunked: true });
    expectError(chunked, 413, 'ENGINE_BODY_TOO_LARGE');
    expect(chunked.headers.connection).toBe('close');
    expect((await call(server, 'GET', '/api/v1/jobs', undefined, { ca, token: operator })).status).toBe(200);
  });

  test('path traversal in repository names and job ids, unknown repositories: 404, nothing outside the config read', async () => {
    for (const path of ['/api/v1/repositories/../../etc/backups', '/api/v1/repositories/..%2F..%2Fetc/backups', '/api/v1/repositories/.hidden/stats', `/api/v1/repositories/${'a'.repeat(65)}/stats`, '/api/v1/repositories/other/backups']) {
      expectError(await call(server, 'GET', path, undefined, { ca, token: operator }), 404, 'ENGINE_NOT_FOUND');
    }
    for (const path of ['/api/v1/jobs/..%2F..%2Fstate', '/api/v1/jobs/../../etc/passwd', `/api/v1/jobs/${'0'.repeat(32)}`, '/api/v1/jobs/ABCDEF/events']) {
      expectError(await call(server, 'GET', path, undefined, { ca, token: operator }), 404, 'ENGINE_NOT_FOUND');
    }
    expectError(await post({ kind: 'gc', repository: '../repo', dryRun: true }), 404, 'ENGINE_NOT_FOUND');
    expectError(await call(server, 'GET', '/api/v1/repositories/main/backups/..', undefined, { ca, token: operator }), 404, 'ENGINE_NOT_FOUND');
  });

  test('one job running and one queued fill the server: the next is refused 429, the queued one can be cancelled before it starts', async () => {
    const running = (await post({ kind: 'backup', repository: 'main', name: 'slow', disks: [{ kind: 'nbd', uri: slowUri }] })).json as { id: string };
    const queued = await post({ kind: 'gc', repository: 'main', dryRun: true });
    expect(queued.status).toBe(202);
    expect((queued.json as { state: string }).state).toBe('queued');
    const full = expectError(await post({ kind: 'gc', repository: 'main', dryRun: true }), 429, 'ENGINE_QUEUE_FULL');
    expect(full.details).toEqual({ queued: 1 });
    const cancelled = await call(server, 'DELETE', `/api/v1/jobs/${(queued.json as { id: string }).id}`, undefined, { ca, token: operator });
    expect(cancelled.json).toMatchObject({ state: 'cancelled', startedAt: null, error: { code: 'ENGINE_INTERRUPTED' } });
    await call(server, 'DELETE', `/api/v1/jobs/${running.id}`, undefined, { ca, token: operator });
    expect((await jobEnd(server, running.id, { ca, token: operator })).state).toBe('cancelled');
    // Room again: the next job runs.
    const next = (await post({ kind: 'backup', repository: 'main', disks: [{ kind: 'raw', path: join(dir, 'a.img') }] })).json as { id: string };
    expect((await jobEnd(server, next.id, { ca, token: operator })).state).toBe('succeeded');
  });
});

describe('engine server: an encrypted repository', () => {
  test('its passphrase comes from the file the config names: a backup and the catalogue work, no answer carries it', async () => {
    const posted = await call(server, 'POST', '/api/v1/jobs', { kind: 'backup', repository: 'secret', disks: [{ kind: 'raw', path: join(dir, 'a.img') }] }, { ca, token: operator });
    expect(posted.status, posted.text).toBe(202);
    const job = (await jobEnd(server, (posted.json as { id: string }).id, { ca, token: operator })) as { state: string; result: { id: string } };
    expect(job.state).toBe('succeeded');
    const listed = (await call(server, 'GET', '/api/v1/repositories/secret/backups', undefined, { ca, token: reader })).json as { backups: { id: string }[] };
    expect(listed.backups.map((b) => b.id)).toEqual([job.result.id]);
    const repositories = (await call(server, 'GET', '/api/v1/repositories', undefined, { ca, token: reader })).json as { repositories: { name: string; encrypted: boolean }[] };
    expect(repositories.repositories.map((r) => [r.name, r.encrypted])).toEqual([
      ['main', false],
      ['secret', true],
    ]);
    expect(JSON.stringify(recorded)).not.toContain(PASSPHRASE);
    expect(await readFile(join(dir, 'state', 'jobs', `${(posted.json as { id: string }).id}.json`), 'utf8')).not.toContain(PASSPHRASE);
  });
});

describe('engine server: where it listens', () => {
  test('a non-loopback address without TLS and tokens is refused; with --insecure it starts, saying so loudly', async () => {
    const config = await writeConfig(join(dir), { stateDir: join(dir, 'state-open'), repositories: { main: { location: repo } } });
    const refused = await runEngine(['server', '--config', config, '--listen', '0.0.0.0:0', '--json']);
    expect(refused.code).toBe(2);
    expect(JSON.parse(refused.stdout)).toEqual({ error: { code: 'ENGINE_INVALID_ARGUMENT', message: 'listening on 0.0.0.0 port 0, which is not a loopback address, needs TLS (a certificate and key) and a tokens file', details: { listen: '0.0.0.0:0', missing: ['TLS (a certificate and key)', 'a tokens file'] } } });
    const open = await startServer(['--config', config, '--listen', '0.0.0.0:0', '--insecure']);
    try {
      expect(open.stderr()).toMatch(/^engine server: WARNING: INSECURE: listening on 0\.0\.0\.0 port \d+ WITHOUT TLS \(A CERTIFICATE AND KEY\) AND A TOKENS FILE: ANYONE WHO CAN REACH THIS HOST CAN START BACKUPS AND RESTORES/);
    } finally {
      await open.stop();
    }
  });

  test('a Unix socket, 0600, answers without a token when the config names no tokens file', async () => {
    const config = await writeConfig(join(dir), { stateDir: join(dir, 'state-socket'), repositories: { main: { location: repo } } });
    const socketPath = join(dir, 'api.sock');
    const local = await startServer(['--config', config, '--socket', socketPath]);
    try {
      expect(local.socket).toBe(socketPath);
      expect((await stat(socketPath)).mode & 0o777).toBe(0o600);
      const answer = await call(local, 'GET', '/api/v1/repositories');
      expect(answer.status).toBe(200);
      expect(local.stderr()).toBe('');
    } finally {
      await local.stop();
    }
    await expect(access(socketPath)).rejects.toThrow();
  });

  test('a config with an unknown field, or a secret in it, is refused before anything listens', async () => {
    const config = await writeConfig(join(dir), { stateDir: join(dir, 'state-bad'), repositories: { main: { location: repo, passphrase: 'secret' } } });
    const refused = await runEngine(['server', '--config', config, '--json']);
    expect(refused.code).toBe(2);
    expect((JSON.parse(refused.stdout) as ErrorAnswer).error.message).toBe(`server config ${config}: repositories.main has unknown field "passphrase" (known: location, passwordFile, limits, s3)`);
  });

  test('every JSON answer above matches the OpenAPI document', async () => {
    const doc = await openApiDocument();
    const { unchecked, problems } = checkAnswers(doc, recorded);
    expect(problems).toEqual([]);
    expect(unchecked).toEqual([]);
    expect(recorded.filter((a) => a.status >= 400).length).toBeGreaterThan(30);
  });
});
