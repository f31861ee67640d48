/**
 * Policies and schedules of `engine server` (SPEC.md 23.1), over real HTTP against real repositories, the
 * server run as its own process with its clock driven through a file (ENGINE_SERVER_TEST_CLOCK), so that
 * days pass without waiting:
 *
 * - a week of nightly runs on a qcow2 image: the level rules give incremental on weekdays and a full backup
 *   on Sunday in the middle of the chain (with `auto` it would be incremental), retention keeps the newest 3
 *   (and leaves a backup of another name alone), every backup is copied to a second repository;
 * - the server stopped over four nightly slots: one catch-up run at start, for the newest slot;
 * - failing runs fire both hooks (a real executable, a real HTTP receiver) without secrets; hooks that fail
 *   are logged; a read token cannot start a run;
 * - a libvirt policy's domains chosen from real `virsh list` output (libvirt's test driver: no daemon);
 * - one job at a time per VM (a manual run and another policy's slot skipped ENGINE_VM_BUSY while a run reads
 *   the VM, a manual run while a backup job posted to the API does), and the server killed -9 or stopped
 *   (SIGTERM) mid-run: at restart the run is failed and its slot run again once, and a further restart runs
 *   nothing.
 *
 * Every JSON answer is checked against the OpenAPI document at the end.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { access, chmod, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { initRepository, runEngine, tempDir, waitFor } from './helpers.js';
import { qcow2, qemuIo } from './qemu.js';
import { call, checkAnswers, openApiDocument, recorded, startServer, writeConfig, type RunningServer } from './server-helpers.js';

interface Run {
  id: string;
  policy: string;
  vm: string;
  slot: string;
  trigger: string;
  missedSlots: number;
  level: string;
  state: string;
  jobs: { step: string; id: string; state: string; error: { code: string } | null }[];
  backup: string | null;
  error: { code: string; message: string } | null;
  resumes: string | null;
}

let dir: string;
let cleanup: () => Promise<void>;
const operator = 'engine_operator-token-for-the-policies-test-0000';
const reader = 'engine_read-token-for-the-policies-test-000000000';
const auth = { token: operator };

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-policies-'));
  const sha = (t: string): string => createHash('sha256').update(t).digest('hex');
  await writeFile(join(dir, 'tokens'), `${sha(operator)} operator ops\n${sha(reader)} read dashboard\n`, { mode: 0o600 });
});

afterAll(async () => {
  await cleanup?.();
});

async function setClock(file: string, iso: string): Promise<void> {
  await writeFile(file, iso);
}

async function runsOf(server: RunningServer, policy: string): Promise<Run[]> {
  const answer = await call(server, 'GET', `/api/v1/policies/${policy}/runs?limit=1000`, undefined, auth);
  expect(answer.status, answer.text).toBe(200);
  return (answer.json as { runs: Run[] }).runs;
}

/** Waits until the policy has `count` runs, all finished; its runs, newest first. */
async function finishedRuns(server: RunningServer, policy: string, count: number): Promise<Run[]> {
  let runs: Run[] = [];
  await waitFor(`${count} finished runs of ${policy}`, async () => {
    runs = await runsOf(server, policy);
    if (runs.length > count) throw new Error(`${runs.length} runs of ${policy}, expected ${count}: ${JSON.stringify(runs.map((r) => [r.trigger, r.slot, r.state]))}`);
    return runs.length === count && runs.every((r) => r.state !== 'running');
  }, { child: server.child, output: server.stderr, everyMs: 50 });
  return runs;
}

async function backupsIn(server: RunningServer, repository: string): Promise<{ id: string; name: string; type: string; startTime: string }[]> {
  const answer = await call(server, 'GET', `/api/v1/repositories/${repository}/backups`, undefined, auth);
  expect(answer.status, answer.text).toBe(200);
  return (answer.json as { backups: { id: string; name: string; type: string; startTime: string }[] }).backups;
}

describe('engine server: scheduled policies on qcow2 sources', () => {
  let server: RunningServer;
  let config: string;
  let clock: string;
  let receiver: Server;
  let receiverUrl: string;
  let closedPort: number;
  const received: { url: string; headers: IncomingHttpHeaders; body: string }[] = [];
  const env = { ENGINE_PASSWORD: 'server-env-passphrase', AWS_SECRET_ACCESS_KEY: 'server-env-aws-secret' } as Record<string, string>;

  beforeAll(async () => {
    await initRepository(join(dir, 'main'));
    await initRepository(join(dir, 'offsite'));
    // A backup of another name: the policy's retention is not its to prune.
    await writeFile(join(dir, 'other.img'), Buffer.alloc(1024 * 1024, 7));
    expect((await runEngine(['backup', '--repo', join(dir, 'main'), '--source', join(dir, 'other.img'), '--name', 'other'])).code).toBe(0);
    await qcow2(join(dir, 'web.qcow2'), '8M');
    await qemuIo(join(dir, 'web.qcow2'), ['write -P 0x11 0 8M']);
    receiver = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        received.push({ url: req.url ?? '', headers: req.headers, body: Buffer.concat(chunks).toString('utf8') });
        res.end('ok');
      });
    });
    await new Promise<void>((resolve) => receiver.listen(0, '127.0.0.1', resolve));
    const address = receiver.address() as { port: number };
    receiverUrl = `http://hook-user:hook-s3cret@127.0.0.1:${address.port}/hook?key=query-secret`;
    await writeFile(join(dir, 'hook.sh'), '#!/bin/sh\ncat > "$1/hook-stdin.json"\nenv > "$1/hook-env.txt"\n');
    await writeFile(join(dir, 'failing-hook.sh'), '#!/bin/sh\ncat > /dev/null\necho "the pager is down" >&2\nexit 3\n');
    await chmod(join(dir, 'hook.sh'), 0o755);
    await chmod(join(dir, 'failing-hook.sh'), 0o755);
    // libvirt's test driver: real virsh, real libvirt, these domains, no daemon.
    const domain = (name: string): string => `<domain type='test'><name>${name}</name><memory>8192</memory><os><type>hvm</type></os></domain>`;
    await writeFile(join(dir, 'libvirt-node.xml'), `<node>${['web-1', 'db', 'mail', 'web-2', 'webmail'].map(domain).join('')}</node>\n`);
    env.LIBVIRT_DEFAULT_URI = `test://${join(dir, 'libvirt-node.xml')}`;
    clock = join(dir, 'clock');
    env.ENGINE_SERVER_TEST_CLOCK = clock;
    // Wednesday noon: the week's first slot is Thursday 01:00.
    await setClock(clock, '2027-03-03T12:00:00Z');
    const never = '0 0 1 1 *';
    // A port nothing listens on: the hook's POST is refused.
    const closed = createServer();
    await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
    closedPort = (closed.address() as { port: number }).port;
    await new Promise<void>((resolve) => closed.close(() => resolve()));
    config = await writeConfig(dir, {
      stateDir: join(dir, 'state'),
      tokensFile: join(dir, 'tokens'),
      repositories: { main: { location: join(dir, 'main') }, offsite: { location: join(dir, 'offsite') } },
      policies: {
        nightly: {
          vms: { sources: [{ name: 'web', disks: [{ kind: 'image', path: join(dir, 'web.qcow2') }] }] },
          repository: 'main',
          schedule: '0 1 * * *',
          timeZone: 'UTC',
          levels: [
            { when: '* * * * sun', level: 'full' },
            { when: '* * * * *', level: 'incremental' },
          ],
          retention: { keep: { last: 3 } },
          copyTo: 'offsite',
        },
        broken: {
          vms: { sources: [{ name: 'gone', disks: [{ kind: 'raw', path: join(dir, 'missing.img') }] }] },
          repository: 'main',
          schedule: never,
          notify: { command: [join(dir, 'hook.sh'), dir], url: receiverUrl, timeoutSeconds: 10 },
        },
        'broken-hooks': {
          vms: { sources: [{ name: 'gone-too', disks: [{ kind: 'raw', path: join(dir, 'missing-too.img') }] }] },
          repository: 'main',
          schedule: never,
          notify: { command: [join(dir, 'failing-hook.sh')], url: `http://127.0.0.1:${closedPort}/refused` },
        },
        domains: { vms: { libvirt: { domains: ['db'], pattern: 'web-*' } }, repository: 'main', schedule: never },
      },
    });
    server = await startServer(['--config', config, '--listen', '127.0.0.1:0'], env);
  });

  afterAll(async () => {
    await server?.stop();
    await new Promise<void>((resolve) => (receiver ? receiver.close(() => resolve()) : resolve()));
  });

  test('a week of nightly runs: levels by rule (a full backup on Sunday mid-chain), retention keeps 3, every backup copied', async () => {
    const listed = await call(server, 'GET', '/api/v1/policies', undefined, { token: reader });
    expect(listed.status).toBe(200);
    expect((listed.json as { policies: { name: string }[] }).policies.map((p) => p.name)).toEqual(['nightly', 'broken', 'broken-hooks', 'domains']);
    const days = ['04', '05', '06', '07', '08', '09', '10'];
    for (const [i, day] of days.entries()) {
      // The guest wrote something since the last backup.
      await qemuIo(join(dir, 'web.qcow2'), [`write -P 0x${(0x20 + i).toString(16)} ${i * 1024 * 1024} 64k`]);
      await setClock(clock, `2027-03-${day}T01:00:00Z`);
      await finishedRuns(server, 'nightly', i + 1);
    }
    const runs = (await runsOf(server, 'nightly')).reverse();
    expect(runs.map((r) => r.slot)).toEqual(days.map((d) => `2027-03-${d}T01:00:00.000Z`));
    expect(runs.map((r) => r.trigger)).toEqual(Array(7).fill('schedule'));
    expect(runs.map((r) => r.state)).toEqual(Array(7).fill('succeeded'));
    // 7 March 2027 is a Sunday.
    expect(runs.map((r) => r.level)).toEqual(['incremental', 'incremental', 'incremental', 'full', 'incremental', 'incremental', 'incremental']);
    expect(runs.map((r) => r.jobs.map((j) => `${j.step}:${j.state}`))).toEqual(Array(7).fill(['backup:succeeded', 'prune:succeeded', 'copy:succeeded']));
    // The copies keep every backup: the first was full (no chain yet), Sunday's full by the rule, the rest incremental.
    const copies = (await backupsIn(server, 'offsite')).sort((a, b) => (a.startTime < b.startTime ? -1 : 1));
    expect(copies.map((b) => b.type)).toEqual(['full', 'incremental', 'incremental', 'full', 'incremental', 'incremental', 'incremental']);
    expect(copies.every((b) => b.name === 'web')).toBe(true);
    // Retention (keep last 3) after each run: the three newest remain, the runs' own backups.
    const kept = await backupsIn(server, 'main');
    expect(kept.filter((b) => b.name === 'web').map((b) => b.id).sort()).toEqual(runs.slice(-3).map((r) => r.backup).sort());
    expect(kept.filter((b) => b.name !== 'web').map((b) => b.name)).toEqual(['other']);
    const policy = (await call(server, 'GET', '/api/v1/policies/nightly', undefined, auth)).json as { lastSlot: string; nextSlot: string; lastRun: { state: string } };
    expect(policy).toMatchObject({ lastSlot: '2027-03-10T01:00:00.000Z', nextSlot: '2027-03-11T01:00:00.000Z', lastRun: { state: 'succeeded' } });
  });

  test('down over four nightly slots: one catch-up run at start, for the newest slot (a Sunday: full)', async () => {
    await server.stop();
    await setClock(clock, '2027-03-14T12:00:00Z');
    server = await startServer(['--config', config, '--listen', '127.0.0.1:0'], env);
    const runs = await finishedRuns(server, 'nightly', 8);
    expect(runs[0]).toMatchObject({ trigger: 'catch-up', missedSlots: 4, slot: '2027-03-14T01:00:00.000Z', level: 'full', state: 'succeeded' });
    expect(server.stderr()).toContain('policy nightly: 4 slots missed while the server was down; one catch-up run for 2027-03-14T01:00:00.000Z');
    const policy = (await call(server, 'GET', '/api/v1/policies/nightly', undefined, auth)).json as { lastSlot: string; nextSlot: string };
    expect(policy).toMatchObject({ lastSlot: '2027-03-14T01:00:00.000Z', nextSlot: '2027-03-15T01:00:00.000Z' });
    expect((await backupsIn(server, 'offsite')).length).toBe(8);
    expect((await backupsIn(server, 'main')).length).toBe(4);
  });

  test('a failing run fires both hooks with the run, and no secret; failing hooks are logged; a read token cannot run a policy', async () => {
    const refused = await call(server, 'POST', '/api/v1/policies/broken/run', undefined, { token: reader });
    expect(refused.status).toBe(403);
    expect((refused.json as { error: { code: string } }).error.code).toBe('ENGINE_FORBIDDEN');
    const started = await call(server, 'POST', '/api/v1/policies/broken/run', undefined, auth);
    expect(started.status, started.text).toBe(202);
    const [run] = (started.json as { runs: Run[] }).runs;
    expect(run).toMatchObject({ policy: 'broken', vm: 'gone', trigger: 'manual', state: 'running' });
    const [failed] = await finishedRuns(server, 'broken', 1);
    expect(failed!.state).toBe('failed');
    expect(failed!.error?.code).toMatch(/^ENGINE_/);
    expect(failed!.jobs).toEqual([{ step: 'backup', id: expect.stringMatching(/^[0-9a-f]{32}$/) as string, state: 'failed', error: expect.objectContaining({ code: failed!.error!.code }) as object }]);
    await waitFor('both hooks ran', async () => received.length === 1 && (await access(join(dir, 'hook-env.txt')).then(() => true, () => false)), { everyMs: 50 });
    await waitFor('the hook wrote its stdin', async () => (await readFile(join(dir, 'hook-stdin.json'), 'utf8')).endsWith('\n'), { everyMs: 50 });
    const stdin = JSON.parse(await readFile(join(dir, 'hook-stdin.json'), 'utf8')) as { event: string; run: Run };
    expect(stdin.event).toBe('run.failure');
    expect(stdin.run).toEqual(failed);
    expect(JSON.parse(received[0]!.body)).toEqual(stdin);
    expect(received[0]!.url).toBe('/hook?key=query-secret');
    expect(received[0]!.headers['content-type']).toBe('application/json');
    expect(received[0]!.headers.authorization).toBe(`Basic ${Buffer.from('hook-user:hook-s3cret').toString('base64')}`);
    // The hook's environment is bare: none of the server's secrets.
    const hookEnv = await readFile(join(dir, 'hook-env.txt'), 'utf8');
    expect(hookEnv).not.toContain('server-env-passphrase');
    expect(hookEnv).not.toContain('server-env-aws-secret');
    expect(hookEnv).not.toContain('ENGINE_SERVER_TEST_CLOCK');
    // The policy as the API shows it: where the hook goes, not its user, password or query.
    const shown = (await call(server, 'GET', '/api/v1/policies/broken', undefined, auth)).json as { notify: { url: string; command: string } };
    expect(shown.notify).toEqual({ on: ['failure'], command: join(dir, 'hook.sh'), url: `http://127.0.0.1:${new URL(receiverUrl).port}/hook`, timeoutSeconds: 10 });

    expect((await call(server, 'POST', '/api/v1/policies/broken-hooks/run', undefined, auth)).status).toBe(202);
    await finishedRuns(server, 'broken-hooks', 1);
    await waitFor('the failing hooks are logged', () => server.stderr().includes(`hook POST http://127.0.0.1:${closedPort}/refused failed`) && server.stderr().includes('failing-hook.sh failed: exit status 3: the pager is down'), { everyMs: 50 });
    expect(server.stderr()).toMatch(new RegExp(`run [0-9a-f]{32} \\(gone-too, failed\\): hook POST http://127\\.0\\.0\\.1:${closedPort}/refused failed: ECONNREFUSED`));
    for (const secret of ['hook-s3cret', 'query-secret', 'server-env-passphrase']) expect(server.stderr()).not.toContain(secret);
  });

  test('a libvirt policy: its domains from real `virsh list` output, listed ones and those matching the pattern', async () => {
    const started = await call(server, 'POST', '/api/v1/policies/domains/run', undefined, auth);
    expect(started.status, started.text).toBe(202);
    expect((started.json as { runs: Run[] }).runs.map((r) => r.vm)).toEqual(['db', 'web-1', 'web-2']);
    // The test driver makes no backups: each run fails with the engine's error, seen in the runs.
    const runs = await finishedRuns(server, 'domains', 3);
    expect(runs.every((r) => r.state === 'failed' && r.jobs[0]?.step === 'backup' && /^ENGINE_/.test(r.error?.code ?? ''))).toBe(true);
  });

  test('unknown policies, bad queries', async () => {
    const missing = await call(server, 'GET', '/api/v1/policies/nope/runs', undefined, auth);
    expect(missing.status).toBe(404);
    expect((missing.json as { error: { code: string } }).error.code).toBe('ENGINE_NOT_FOUND');
    expect((await call(server, 'GET', '/api/v1/policies/nightly/runs?limit=0', undefined, auth)).status).toBe(400);
    expect((await call(server, 'GET', '/api/v1/policies/nightly/runs?state=done', undefined, auth)).status).toBe(400);
    const failed = await call(server, 'GET', '/api/v1/policies/nightly/runs?state=succeeded&limit=2', undefined, auth);
    expect((failed.json as { runs: Run[] }).runs.map((r) => r.slot)).toEqual(['2027-03-14T01:00:00.000Z', '2027-03-10T01:00:00.000Z']);
  });

  test('a bad policy config: the server refuses to start, one line naming the field', async () => {
    const path = await writeConfig(dir, { stateDir: join(dir, 'state-bad'), repositories: { main: { location: join(dir, 'main') } }, policies: { p: { vms: { libvirt: { pattern: 'web-*' } }, repository: 'main', schedule: '0 25 * * *' } } });
    const result = await runEngine(['server', '--config', path, '--listen', '127.0.0.1:0']);
    expect(result.code).toBe(2);
    expect(result.stderr.trim().split('\n')).toEqual([`engine: server config ${path}: policies.p.schedule is not a cron schedule: schedule "0 25 * * *": hour 25 is outside 0-23`]);
  });
});

describe('engine server: one job per VM, and the server killed -9 mid-run', () => {
  let server: RunningServer;
  let nbdkit: ChildProcess;
  let socket: string;
  let config: string;
  let clock: string;
  let env: Record<string, string>;

  const startNbdkit = async (delay: boolean): Promise<void> => {
    nbdkit = spawn('nbdkit', ['-f', '--exit-with-parent', '-t', '1', '-U', socket, ...(delay ? ['--filter=delay'] : []), 'pattern', '64M', ...(delay ? ['rdelay=300ms'] : [])], { stdio: 'ignore' });
    await waitFor('nbdkit listens', () => access(socket).then(() => true, () => false), { child: nbdkit });
  };
  const stopNbdkit = async (): Promise<void> => {
    if (nbdkit.exitCode === null && nbdkit.signalCode === null) {
      const exited = new Promise((resolve) => nbdkit.once('exit', resolve));
      nbdkit.kill('SIGTERM');
      await exited;
    }
    // Gone with its process or not, the next nbdkit's socket is waited for by its file.
    await rm(socket, { force: true });
  };

  beforeAll(async () => {
    await initRepository(join(dir, 'busy-repo'));
    socket = join(dir, 'vm.sock');
    await startNbdkit(true);
    clock = join(dir, 'clock-busy');
    await setClock(clock, '2027-03-01T00:00:00Z');
    env = { ENGINE_SERVER_TEST_CLOCK: clock };
    const source = { sources: [{ name: 'vm', disks: [{ kind: 'nbd', uri: `nbd+unix:///?socket=${socket}` }] }] };
    config = join(dir, 'busy.json');
    await writeFile(config, JSON.stringify({ stateDir: join(dir, 'state-busy'), repositories: { main: { location: join(dir, 'busy-repo') } }, policies: { slow: { vms: source, repository: 'main', schedule: '0 2 * * *', timeZone: 'UTC', verify: { readData: true, subset: 0.5 } }, other: { vms: { sources: [{ name: 'vm-too', disks: source.sources[0]!.disks }] }, repository: 'main', schedule: '0 4 * * *', timeZone: 'UTC' } } }));
    server = await startServer(['--config', config, '--listen', '127.0.0.1:0'], env);
  });

  afterAll(async () => {
    await server?.stop();
    if (nbdkit) await stopNbdkit();
  });

  test('a VM being read: a manual run and another policy\'s slot are skipped; killed -9, the run is failed and its slot run again once', async () => {
    await setClock(clock, '2027-03-01T02:00:00Z');
    let first: Run | undefined;
    await waitFor('the slow run reads', async () => {
      [first] = await runsOf(server, 'slow');
      const jobId = first?.jobs[0]?.id;
      if (!jobId) return false;
      const job = (await call(server, 'GET', `/api/v1/jobs/${jobId}`)).json as { state: string; progress: { done: number } | null };
      return job.state === 'running' && (job.progress?.done ?? 0) > 0;
    }, { child: server.child, output: server.stderr, everyMs: 50 });
    expect(first).toMatchObject({ trigger: 'schedule', slot: '2027-03-01T02:00:00.000Z', state: 'running' });

    const manual = await call(server, 'POST', '/api/v1/policies/slow/run');
    expect(manual.status).toBe(202);
    const [skipped] = (manual.json as { runs: Run[] }).runs;
    expect(skipped).toMatchObject({ vm: 'vm', trigger: 'manual', state: 'skipped', jobs: [], error: { code: 'ENGINE_VM_BUSY' } });
    expect(skipped!.error!.message).toContain(`policy slow run ${first!.id}`);
    // Another policy reading the same disk, at its slot.
    await setClock(clock, '2027-03-01T04:00:00Z');
    const [other] = await finishedRuns(server, 'other', 1);
    expect(other).toMatchObject({ vm: 'vm-too', trigger: 'schedule', state: 'skipped', error: { code: 'ENGINE_VM_BUSY' } });
    // Its slot is named in state.json once its run is written: wait for that, or the restart would catch it up.
    await waitFor('the slot of other is recorded', async () => ((await call(server, 'GET', '/api/v1/policies/other')).json as { lastSlot: string | null }).lastSlot === '2027-03-01T04:00:00.000Z', { everyMs: 20 });

    server.child.kill('SIGKILL');
    await server.stop();
    await stopNbdkit();
    await startNbdkit(false);
    server = await startServer(['--config', config, '--listen', '127.0.0.1:0'], env);
    const runs = await finishedRuns(server, 'slow', 3);
    const interrupted = runs.find((r) => r.id === first!.id)!;
    expect(interrupted).toMatchObject({ state: 'failed', error: { code: 'ENGINE_SERVER_RESTARTED' }, jobs: [{ step: 'backup', state: 'failed', error: { code: 'ENGINE_SERVER_RESTARTED' } }] });
    const resumed = runs.find((r) => r.trigger === 'resume')!;
    expect(resumed.error).toBeNull();
    expect(resumed).toMatchObject({ slot: '2027-03-01T02:00:00.000Z', state: 'succeeded', resumes: first!.id, level: 'auto' });
    expect(resumed.jobs.map((j) => `${j.step}:${j.state}`)).toEqual(['backup:succeeded', 'verify:succeeded']);
    const verified = (await call(server, 'GET', `/api/v1/jobs/${resumed.jobs[1]!.id}`)).json as { result: { ok: boolean } };
    expect(verified.result.ok).toBe(true);
    const backups = (await call(server, 'GET', '/api/v1/repositories/main/backups')).json as { backups: { id: string }[] };
    expect(backups.backups.map((b) => b.id)).toEqual([resumed.backup]);
    expect((await runsOf(server, 'other')).length).toBe(1);

    // Each run is a file of the state directory.
    expect((await readdir(join(dir, 'state-busy', 'policies', 'slow', 'runs'))).filter((f) => f.endsWith('.json')).length).toBe(3);
  });

  test('stopped with SIGTERM mid-run: the next start runs the slot again once, as after a kill', async () => {
    await stopNbdkit();
    await startNbdkit(true);
    // A backup job posted to the API reads the VM: a policy's run skips it too.
    const posted = await call(server, 'POST', '/api/v1/jobs', { kind: 'backup', repository: 'main', name: 'by-hand', disks: [{ kind: 'nbd', uri: `nbd+unix:///?socket=${socket}` }] });
    expect(posted.status, posted.text).toBe(202);
    const apiJob = (posted.json as { id: string }).id;
    const manual = await call(server, 'POST', '/api/v1/policies/slow/run');
    expect((manual.json as { runs: Run[] }).runs).toMatchObject([{ state: 'skipped', error: { code: 'ENGINE_VM_BUSY', details: { by: `job ${apiJob}` } } }]);
    expect((await call(server, 'DELETE', `/api/v1/jobs/${apiJob}`)).status).toBe(202);
    await waitFor('the posted job is cancelled', async () => ((await call(server, 'GET', `/api/v1/jobs/${apiJob}`)).json as { state: string }).state === 'cancelled', { everyMs: 50 });
    await setClock(clock, '2027-03-02T02:00:00Z');
    let cut: Run | undefined;
    await waitFor('the next slot reads', async () => {
      [cut] = await runsOf(server, 'slow');
      const jobId = cut?.slot === '2027-03-02T02:00:00.000Z' ? cut.jobs[0]?.id : undefined;
      if (!jobId) return false;
      const job = (await call(server, 'GET', `/api/v1/jobs/${jobId}`)).json as { state: string; progress: { done: number } | null };
      return job.state === 'running' && (job.progress?.done ?? 0) > 0;
    }, { child: server.child, output: server.stderr, everyMs: 50 });
    await server.stop();
    expect(server.child.exitCode).toBe(0);
    expect(server.stderr()).toContain(`policy slow: run ${cut!.id} (vm) stopped with the server: the next start runs it again for its slot`);
    await stopNbdkit();
    await startNbdkit(false);
    server = await startServer(['--config', config, '--listen', '127.0.0.1:0'], env);
    const runs = await finishedRuns(server, 'slow', 6);
    expect(runs.find((r) => r.id === cut!.id)).toMatchObject({ state: 'failed', error: { code: 'ENGINE_SERVER_RESTARTED' }, jobs: [{ step: 'backup', state: 'cancelled' }] });
    expect(runs[0]).toMatchObject({ trigger: 'resume', resumes: cut!.id, slot: '2027-03-02T02:00:00.000Z', state: 'succeeded' });
    expect(((await call(server, 'GET', '/api/v1/repositories/main/backups')).json as { backups: unknown[] }).backups.length).toBe(2);
    // Started once more: both slots done, nothing runs (the scheduler has decided once nextSlot is set).
    await server.stop();
    server = await startServer(['--config', config, '--listen', '127.0.0.1:0'], env);
    await waitFor('the scheduler waits for its next slots', async () => {
      const policies = ((await call(server, 'GET', '/api/v1/policies')).json as { policies: { nextSlot: string | null }[] }).policies;
      return policies.every((p) => p.nextSlot !== null);
    }, { everyMs: 50 });
    const policies = ((await call(server, 'GET', '/api/v1/policies')).json as { policies: { name: string; lastSlot: string; nextSlot: string }[] }).policies;
    expect(policies.map((p) => [p.name, p.lastSlot, p.nextSlot])).toEqual([
      ['slow', '2027-03-02T02:00:00.000Z', '2027-03-03T02:00:00.000Z'],
      ['other', '2027-03-01T04:00:00.000Z', '2027-03-02T04:00:00.000Z'],
    ]);
    expect((await runsOf(server, 'slow')).length).toBe(6);
    expect((await runsOf(server, 'other')).length).toBe(1);
    // The jobs: two backups cut short, two resumed runs' backup and verify each, the cancelled posted one; none since.
    expect(((await call(server, 'GET', '/api/v1/jobs')).json as { jobs: unknown[] }).jobs.length).toBe(7);
  });
});

describe('engine server: policies in the OpenAPI document', () => {
  test('every JSON answer above matches it', async () => {
    const doc = await openApiDocument();
    const { unchecked, problems } = checkAnswers(doc, recorded);
    expect(unchecked).toEqual([]);
    expect(problems).toEqual([]);
    const covered = new Set(recorded.map((a) => `${a.method} ${a.path.replace(/policies\/[^/]+/, 'policies/{p}')} ${a.status}`));
    for (const expected of ['GET /api/v1/policies 200', 'GET /api/v1/policies/{p} 200', 'GET /api/v1/policies/{p}/runs 200', 'POST /api/v1/policies/{p}/run 202', 'POST /api/v1/policies/{p}/run 403', 'GET /api/v1/policies/{p}/runs 404', 'GET /api/v1/policies/{p}/runs 400']) {
      expect(covered, expected).toContain(expected);
    }
  });
});
