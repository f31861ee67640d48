/**
 * engine server's `GET /metrics` and `limits.perHost` (SPEC.md 23.2, 23.3), over real HTTP on 127.0.0.1 with
 * bearer tokens, against a real repository. The sources are two real qemu-nbd servers on two "hosts",
 * 127.0.0.1 and 127.0.0.2, stopped (SIGSTOP) while the jobs are posted, so that the jobs that start stay
 * running until the test lets them go, however fast or loaded the machine. With perHost 1, two backups from
 * the first host run one after the other while the one from the second host runs beside the first. The metrics text is checked by promtool (Debian's prometheus package,
 * the Prometheus project's own parser and linter) and its figures against the jobs' own results.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { connect, createServer } from 'node:net';
import { join } from 'node:path';
import { initRepository, runEngine, tempDir, waitFor, writeRegion } from './helpers.js';
import { call, checkAnswers, jobEnd, openApiDocument, recorded, startServer, writeConfig, type RunningServer } from './server-helpers.js';
import { parseJobRequest } from '../dist/engine/server/job-requests.js';
import { sourceHostsOf } from '../dist/engine/server/source-hosts.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;
let repo: string;
let server: RunningServer;
const servers: ChildProcess[] = [];
let hostA: { uri: string; child: ChildProcess };
let hostB: { uri: string; child: ChildProcess };
let readToken: string;
let operatorToken: string;

type Job = Record<string, unknown> & { id: string; state: string; startedAt: string | null; endedAt: string | null; result: Record<string, unknown> | null; error: { code: string } | null; progress: { done: number } | null };

function freePort(host: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.once('error', reject);
    probe.listen(0, host, () => {
      const address = probe.address();
      probe.close(() => (typeof address === 'object' && address ? resolve(address.port) : reject(new Error('no port'))));
    });
  });
}

/** qemu-nbd serving `image` read-only on host:port (its own child: the test stops and continues it). */
async function nbdOn(host: string, image: string): Promise<{ uri: string; child: ChildProcess }> {
  const port = await freePort(host);
  const child = spawn('qemu-nbd', ['-f', 'raw', '-r', '--persistent', '--shared', '8', '-b', host, '-p', String(port), image], { stdio: 'ignore' });
  servers.push(child);
  const answers = (): Promise<boolean> =>
    new Promise((resolve) => {
      const socket = connect(port, host, () => {
        socket.destroy();
        resolve(true);
      });
      socket.on('error', () => resolve(false));
    });
  await waitFor(`qemu-nbd on ${host}:${port}`, answers, { child });
  return { uri: `nbd://${host}:${port}/`, child };
}

async function token(role: 'read' | 'operator'): Promise<string> {
  const made = await runEngine(['server', 'token', 'add', '--role', role, '--file', join(dir, 'tokens'), '--label', role, '--json']);
  expect(made.code, made.stderr).toBe(0);
  return (JSON.parse(made.stdout) as { token: string }).token;
}

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-server-metrics-'));
  repo = join(dir, 'repo');
  await initRepository(repo);
  await writeRegion(join(dir, 'a.img'), 0, 8 * MiB, 'random', 'host-a');
  await writeRegion(join(dir, 'b.img'), 0, 8 * MiB, 'random', 'host-b');
  [hostA, hostB] = await Promise.all([nbdOn('127.0.0.1', join(dir, 'a.img')), nbdOn('127.0.0.2', join(dir, 'b.img'))]);
  readToken = await token('read');
  operatorToken = await token('operator');
  const config = await writeConfig(dir, { stateDir: join(dir, 'state'), tokensFile: join(dir, 'tokens'), limits: { jobs: 4, perHost: 1 }, repositories: { main: { location: repo } } });
  server = await startServer(['--config', config, '--listen', '127.0.0.1:0']);
});

afterAll(async () => {
  await server?.stop();
  for (const child of servers) {
    if (child.exitCode !== null || child.signalCode !== null) continue;
    child.kill('SIGCONT');
    child.kill('SIGTERM');
  }
  await cleanup?.();
});

async function post(body: Record<string, unknown>): Promise<Job> {
  const answer = await call(server, 'POST', '/api/v1/jobs', body, { token: operatorToken });
  expect(answer.status, answer.text).toBe(202);
  return answer.json as Job;
}

async function job(id: string): Promise<Job> {
  return (await call(server, 'GET', `/api/v1/jobs/${id}`, undefined, { token: readToken })).json as Job;
}

/** The samples of an exposition text: `name{labels}` as written → value. */
function samples(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const at = line.lastIndexOf(' ');
    out.set(line.slice(0, at), Number(line.slice(at + 1)));
  }
  return out;
}

async function scrape(token: string | undefined = readToken): Promise<{ status: number; type: string | undefined; text: string }> {
  const answer = await call(server, 'GET', '/metrics', undefined, { token });
  return { status: answer.status, type: answer.headers['content-type'], text: answer.text };
}

/** promtool check metrics: the Prometheus project's parser and linter; its exit code and what it said. */
function promtool(text: string): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn('promtool', ['check', 'metrics'], { stdio: ['pipe', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
    child.on('error', (error) => reject(new Error(`promtool cannot be run (${(error as NodeJS.ErrnoException).code ?? error.message}): install Debian's prometheus package (scripts/setup.sh)`)));
    child.on('close', (code) => resolve({ code, output }));
    child.stdin.end(text);
  });
}

const ended: Job[] = [];

describe('engine server: limits.perHost', () => {
  test("a job's source hosts: NBD hosts, this host for files and sockets, the libvirt URI's host, the oVirt engine's; none for verify, prune, gc", () => {
    const hosts = (body: Record<string, unknown>, env: Record<string, string> = {}): string[] => sourceHostsOf(parseJobRequest({ repository: 'main', ...body }), env);
    const disks = [
      { kind: 'nbd', uri: 'nbd://Hyper-1.example:10809/vda' },
      { kind: 'nbd', uri: 'nbd://[fd00::5]/vdb' },
      { kind: 'nbd', uri: 'nbd+unix:///x?socket=/run/x.sock' },
      { kind: 'raw', path: '/dev/vg/disk' },
      { kind: 'nbd', uri: 'nbd://hyper-1.example/vdc' },
    ];
    expect(hosts({ kind: 'backup', disks })).toEqual(['hyper-1.example', 'fd00::5', 'local']);
    expect(hosts({ kind: 'backup', libvirt: { domain: 'web' } })).toEqual(['local']);
    expect(hosts({ kind: 'backup', libvirt: { domain: 'web' } }, { LIBVIRT_DEFAULT_URI: 'qemu+ssh://root@kvm-2.example/system' })).toEqual(['kvm-2.example']);
    expect(hosts({ kind: 'backup', libvirt: { domain: 'web' } }, { LIBVIRT_DEFAULT_URI: 'qemu:///system' })).toEqual(['local']);
    expect(hosts({ kind: 'backup', ovirt: { url: 'https://engine.example/ovirt-engine', vm: 'web', credentialsFile: '/etc/c' } })).toEqual(['engine.example']);
    expect(hosts({ kind: 'restore', backup: 'ab', target: { kind: 'nbd', uri: 'nbd://10.0.0.7/vda' } })).toEqual(['10.0.0.7']);
    expect(hosts({ kind: 'restore', backup: 'ab', target: { kind: 'file', path: '/srv/x.img' } })).toEqual(['local']);
    expect(hosts({ kind: 'verify' })).toEqual([]);
    expect(hosts({ kind: 'prune', keep: { last: 1 } })).toEqual([]);
    expect(hosts({ kind: 'gc' })).toEqual([]);
  });

  test('two backups from one host run one after the other, one from another host runs beside the first; /metrics shows them running and queued', async () => {
    // Both NBD servers stopped (SIGSTOP): a job that starts stays running, whatever the machine's speed.
    hostA.child.kill('SIGSTOP');
    hostB.child.kill('SIGSTOP');
    const a1 = await post({ kind: 'backup', repository: 'main', name: 'vm-a1', disks: [{ kind: 'nbd', uri: hostA.uri }] });
    const a2 = await post({ kind: 'backup', repository: 'main', name: 'vm-a2', disks: [{ kind: 'nbd', uri: hostA.uri }] });
    const b1 = await post({ kind: 'backup', repository: 'main', name: 'vm-b1', disks: [{ kind: 'nbd', uri: hostB.uri }] });
    await waitFor('a1 and b1 running', async () => (await job(a1.id)).state === 'running' && (await job(b1.id)).state === 'running', { everyMs: 50 });
    // The second job of host A waits, though the server has slots free (limits.jobs 4).
    expect((await job(a2.id)).state).toBe('queued');
    const during = samples((await scrape()).text);
    expect(during.get('engine_jobs_running{repository="main"}')).toBe(2);
    expect(during.get('engine_jobs_queued{repository="main"}')).toBe(1);
    expect((await job(a2.id)).state).toBe('queued');
    hostA.child.kill('SIGCONT');
    hostB.child.kill('SIGCONT');

    for (const id of [a1.id, a2.id, b1.id]) ended.push((await jobEnd(server, id, { token: readToken })) as Job);
    const [e1, e2, eb] = ended as [Job, Job, Job];
    for (const j of ended) expect(j.error).toBeNull();
    expect(ended.map((j) => j.state)).toEqual(['succeeded', 'succeeded', 'succeeded']);
    // a2 started only once a1 had ended; b1 started before a1 ended (it ran beside it).
    expect(e2.startedAt! >= e1.endedAt!).toBe(true);
    expect(eb.startedAt! < e1.endedAt!).toBe(true);
    for (const j of ended) expect(j.result).toMatchObject({ type: 'full', disks: [{ size: 8 * MiB, bytesRead: 8 * MiB }] });
    // a2 read what a1 had stored: nothing new.
    expect((e2.result!.disks as { bytesNew: number }[])[0]!.bytesNew).toBe(0);
  });
});

describe('engine server: GET /metrics', () => {
  test('needs a read token; the text passes promtool; its figures are the jobs\' and the repository\'s', async () => {
    const failed = (await jobEnd(server, (await post({ kind: 'backup', repository: 'main', name: 'vm-gone', disks: [{ kind: 'nbd', uri: `nbd://127.0.0.1:${await freePort('127.0.0.1')}/` }] })).id, { token: readToken })) as Job;
    expect(failed.state).toBe('failed');
    const code = failed.error!.code;

    const anonymous = await call(server, 'GET', '/metrics');
    expect(anonymous.status).toBe(401);
    expect((anonymous.json as { error: { code: string } }).error.code).toBe('ENGINE_UNAUTHORIZED');
    expect((await call(server, 'GET', '/metrics?x=1', undefined, { token: readToken })).status).toBe(400);

    const stats = (await call(server, 'GET', '/api/v1/repositories/main/stats', undefined, { token: readToken })).json as { storedBytes: number; packs: number; backups: number; logicalBytes: number };
    expect(stats.backups).toBe(3);
    // The repository's figures are taken again after each backup, in the background: wait for the one after the last.
    let scraped = await scrape();
    await waitFor('the figures after the last backup', async () => {
      scraped = await scrape();
      const now = samples(scraped.text);
      // And the last job out of the running set: it leaves it once its end is journaled, after GET shows it ended.
      return now.get('engine_repository_backups{repository="main"}') === 3 && now.get('engine_repository_stored_bytes{repository="main"}') === stats.storedBytes && now.get('engine_jobs_running{repository="main"}') === 0;
    }, { everyMs: 100 });
    expect(scraped.status).toBe(200);
    expect(scraped.type).toBe('text/plain; version=0.0.4; charset=utf-8');
    const checked = await promtool(scraped.text);
    expect(checked, checked.output).toEqual({ code: 0, output: '' });

    const m = samples(scraped.text);
    const sum = (key: string): number => ended.reduce((n, j) => n + Number((j.result!.disks as Record<string, number>[])[0]![key]), 0);
    expect(m.get('engine_jobs_total{kind="backup",result="succeeded"}')).toBe(3);
    expect(m.get('engine_jobs_total{kind="backup",result="failed"}')).toBe(1);
    expect(m.get(`engine_job_errors_total{kind="backup",code="${code}"}`)).toBe(1);
    expect(m.get('engine_job_duration_seconds_count{kind="backup",result="succeeded"}')).toBe(3);
    expect(m.get('engine_job_duration_seconds_bucket{kind="backup",result="succeeded",le="+Inf"}')).toBe(3);
    expect(m.get('engine_job_duration_seconds_bucket{kind="backup",result="succeeded",le="86400"}')).toBe(3);
    expect(m.get('engine_backup_read_bytes_total{repository="main"}')).toBe(3 * 8 * MiB);
    expect(m.get('engine_backup_new_bytes_total{repository="main"}')).toBe(sum('bytesNew'));
    expect(m.get('engine_backup_stored_bytes_total{repository="main"}')).toBe(sum('bytesStored'));
    expect(m.get('engine_repository_packs{repository="main"}')).toBe(stats.packs);
    expect(m.get('engine_repository_logical_bytes{repository="main"}')).toBe(stats.logicalBytes);
    expect(m.get('engine_jobs_running{repository="main"}')).toBe(0);
    expect(m.get('engine_jobs_queued{repository="main"}')).toBe(0);
    expect(m.get('engine_api_errors_total{code="ENGINE_UNAUTHORIZED"}')).toBe(1);
    expect(m.get('engine_api_errors_total{code="ENGINE_INVALID_ARGUMENT"}')).toBe(1);
    for (const j of ended) expect(m.get(`engine_backup_last_success_timestamp_seconds{repository="main",name="${String(j.result!.name)}"}`)).toBe(Date.parse(String(j.result!.endTime)) / 1000);
    // The failed backup's name has no last success: only the catalogue's names have a series.
    expect([...m.keys()].filter((k) => k.startsWith('engine_backup_last_success_timestamp_seconds')).length).toBe(3);
    expect(m.get('engine_backup_names_omitted{repository="main"}')).toBe(0);
    // Every family has its HELP and TYPE, counters end in _total.
    const types = [...scraped.text.matchAll(/^# TYPE (\S+) (\S+)$/gm)].map((t) => [t[1]!, t[2]!]);
    expect(types.length).toBe([...scraped.text.matchAll(/^# HELP /gm)].length);
    for (const [name, type] of types) {
      expect(name).toMatch(/^engine_/);
      if (type === 'counter') expect(name).toMatch(/_total$/);
    }
  });

  test('metrics.anonymous: a scraper without a token; counters start at zero with the process, the repository\'s figures come from the catalogue', async () => {
    await server.stop();
    const config = await writeConfig(dir, { stateDir: join(dir, 'state'), tokensFile: join(dir, 'tokens'), metrics: { anonymous: true }, repositories: { main: { location: repo } } });
    server = await startServer(['--config', config, '--listen', '127.0.0.1:0']);
    let scraped = await scrape(undefined);
    await waitFor('the figures taken at start', async () => {
      scraped = await scrape(undefined);
      return samples(scraped.text).get('engine_repository_backups{repository="main"}') === 3;
    }, { everyMs: 100 });
    expect(scraped.status).toBe(200);
    expect((await promtool(scraped.text)).code).toBe(0);
    const m = samples(scraped.text);
    expect([...m.keys()].filter((k) => k.startsWith('engine_jobs_total'))).toEqual([]);
    for (const j of ended) expect(m.get(`engine_backup_last_success_timestamp_seconds{repository="main",name="${String(j.result!.name)}"}`)).toBe(Date.parse(String(j.result!.endTime)) / 1000);
    // Only /metrics is open: the API still wants a token.
    expect((await call(server, 'GET', '/api/v1/jobs')).status).toBe(401);
  });

  test('every JSON answer above matches the OpenAPI document, which has /metrics', async () => {
    const doc = await openApiDocument();
    expect(Object.keys(doc.paths as object)).toContain('/metrics');
    const { unchecked, problems } = checkAnswers(doc, recorded);
    expect(unchecked).toEqual([]);
    expect(problems).toEqual([]);
    expect(recorded.some((a) => a.path === '/metrics' && a.status === 401)).toBe(true);
  });
});
