/**
 * The job kinds of `POST /api/v1/jobs` beyond backup, restore to a path, verify, prune and gc (SPEC.md 23):
 * a copy between two folder repositories of the config, the copied backup restored from the target byte
 * for byte, and the refusals of bodies that name no or a wrong target. Every request body is checked
 * against the OpenAPI document's JobRequest, every answer against its answer schema.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createHash } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { filesIdentical, initRepository, sh, tempDir, waitFor, writeRegion } from './helpers.js';
import { destroyDomain, ensureLibvirtd, startDomain } from './libvirt.js';
import { qemuImgCompare, qemuIo } from './qemu.js';
import { contractProblems } from './ovirt-contract/contract.js';
import { startOvirtSim, type OvirtSim } from '../dist/test/ovirt-sim/server.js';
import { parseJobRequest } from '../dist/engine/server/job-requests.js';
import { sourceHostsOf } from '../dist/engine/server/source-hosts.js';
import { call, checkAnswers, jobEnd, openApiDocument, recorded, startServer, validate, writeConfig, type RunningServer } from './server-helpers.js';

type Job = Record<string, unknown> & { id: string; state: string; result: Record<string, unknown> | null; error: { code: string; message: string } | null };

let dir: string;
let cleanup: () => Promise<void>;
let server: RunningServer;
let sim: OvirtSim | undefined;
const SOURCE = `engine-jobkinds-${process.pid}-source`;
const RESTORED = `engine-jobkinds-${process.pid}-restored`;
const operator = 'engine_operator-token-for-the-jobkinds-test-0000';
const reader = 'engine_read-token-for-the-jobkinds-test-000000000';
const bodies: unknown[] = [];

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-jobkinds-'));
  await sh('chmod', ['755', dir]); // QEMU runs as libvirt-qemu and must reach the images
  const sha = (t: string): string => createHash('sha256').update(t).digest('hex');
  await writeFile(join(dir, 'tokens'), `${sha(operator)} operator ops\n${sha(reader)} read dashboard\n`, { mode: 0o600 });
  await Promise.all([initRepository(join(dir, 'main')), initRepository(join(dir, 'offsite'))]);
  await writeRegion(join(dir, 'a.img'), 0, 4 * 1024 * 1024, 'random', 'a');
  await writeRegion(join(dir, 'a.img'), 6 * 1024 * 1024, 1024 * 1024, 'random', 'a2');
  const config = await writeConfig(dir, {
    stateDir: join(dir, 'state'),
    tokensFile: join(dir, 'tokens'),
    repositories: { main: { location: join(dir, 'main') }, offsite: { location: join(dir, 'offsite') } },
  });
  // The live restore's NBD server and journal under the test's folder, not /run/engine.
  // The simulator's 409s do not clear up with time: retried quickly (as the oVirt tests' SIM_ENV).
  server = await startServer(['--config', config, '--listen', '127.0.0.1:0'], { ENGINE_RUN_DIR: join(dir, 'run'), ENGINE_OVIRT_CONFLICT_DELAY_MS: '20' });
});

afterAll(async () => {
  await server?.stop();
  for (const domain of [SOURCE, RESTORED]) await destroyDomain(domain);
  if (sim) {
    // Every request the server made to the simulator follows oVirt's API model.
    expect(contractProblems(sim.requests)).toEqual([]);
    await sim.stop();
  }
  await cleanup?.();
});

async function post(body: Record<string, unknown>, token = operator): Promise<{ status: number; json: unknown }> {
  bodies.push(body);
  return call(server, 'POST', '/api/v1/jobs', body, { token });
}

async function run(body: Record<string, unknown>): Promise<Job> {
  const answer = await post(body);
  expect(answer.status, JSON.stringify(answer.json)).toBe(202);
  const job = (await jobEnd(server, (answer.json as Job).id, { token: operator })) as Job;
  expect(job.error).toBeNull();
  expect(job.state).toBe('succeeded');
  return job;
}

async function refused(body: Record<string, unknown>, status: number, field?: string): Promise<void> {
  const answer = await post(body);
  expect(answer.status, JSON.stringify(answer.json)).toBe(status);
  const error = (answer.json as { error: { code: string; details?: Record<string, unknown> } }).error;
  expect(error.code).toBe(status === 404 ? 'ENGINE_NOT_FOUND' : 'ENGINE_INVALID_ARGUMENT');
  if (field !== undefined) expect(error.details?.field).toBe(field);
}

describe('engine server: job kinds', () => {
  test('a copy job copies a backup into another repository of the config; restored from there, it is the source byte for byte; its result is copy --json', async () => {
    const backedUp = await run({ kind: 'backup', repository: 'main', name: 'a', disks: [{ kind: 'raw', path: join(dir, 'a.img') }] });
    const id = String(backedUp.result!.id);
    const copied = await run({ kind: 'copy', repository: 'main', to: 'offsite', backups: [id.slice(0, 12)] });
    expect(copied.repository).toBe('main');
    expect(copied.result).toMatchObject({ from: join(dir, 'main'), to: join(dir, 'offsite'), backupsCopied: 1, backupsSkipped: 0, limit: null, damaged: [] });
    const [entry] = (copied.result as { backups: { source: string; target: string; name: string; status: string }[] }).backups;
    expect(entry).toMatchObject({ source: id, name: 'a', status: 'copied' });
    const listed = (await call(server, 'GET', '/api/v1/repositories/offsite/backups', undefined, { token: reader })).json as { backups: { id: string; name: string }[] };
    expect(listed.backups.map((b) => [b.id, b.name])).toEqual([[entry!.target, 'a']]);
    // /metrics takes the target's figures again after a copy: its catalogue now holds the backup.
    await waitFor('the target\'s figures taken again', async () => (await call(server, 'GET', '/metrics', undefined, { token: reader })).text.includes('engine_repository_backups{repository="offsite"} 1'), { everyMs: 100 });
    const target = join(dir, 'restored.img');
    await run({ kind: 'restore', repository: 'offsite', backup: entry!.target, target: { kind: 'file', path: target } });
    expect(await filesIdentical(target, join(dir, 'a.img'))).toBe(true);

    // Again by name and latest: the target has it, nothing sent.
    const again = await run({ kind: 'copy', repository: 'main', to: 'offsite', name: 'a', latest: 1 });
    expect(again.result).toMatchObject({ backupsCopied: 0, backupsSkipped: 1, chunksSent: 0, backups: [{ source: id, target: entry!.target, status: 'skipped' }] });
  });

  test('copy jobs refused: no selection, two, the own repository, a repository not in the config, a reader\'s token', async () => {
    await refused({ kind: 'copy', repository: 'main', to: 'offsite' }, 400, 'backups');
    await refused({ kind: 'copy', repository: 'main', to: 'offsite', all: true, latest: 2 }, 400, 'backups');
    await refused({ kind: 'copy', repository: 'main', to: 'offsite', all: false }, 400, 'all');
    await refused({ kind: 'copy', repository: 'main', to: 'offsite', backups: ['not-hex'] }, 400, 'backups[0]');
    await refused({ kind: 'copy', repository: 'main', to: 'offsite', latest: 0 }, 400, 'latest');
    await refused({ kind: 'copy', repository: 'main', to: 'main', all: true }, 400, 'to');
    await refused({ kind: 'copy', repository: 'main', all: true }, 400, 'to');
    await refused({ kind: 'copy', repository: 'main', to: 'offsite', all: true, toPassword: 'secret' }, 400, 'a copy job.toPassword');
    await refused({ kind: 'copy', repository: 'main', to: 'elsewhere', all: true }, 404);
    const forbidden = await post({ kind: 'copy', repository: 'main', to: 'offsite', all: true }, reader);
    expect(forbidden.status).toBe(403);
  });

  test('a restore job into a new libvirt domain (restore --live --libvirt): a domain from the backup\'s definition, running on new images in dir that hold the backup', async () => {
    // A domain that sits in SeaBIOS (no OS) on a small qcow2 image: backed up through libvirt as a job, then destroyed.
    await writeRegion(join(dir, 'vm.raw'), 0, 3 * 1024 * 1024, 'random', 'vm');
    await writeRegion(join(dir, 'vm.raw'), 7 * 1024 * 1024, 1024 * 1024, 'random', 'vm2');
    const image = join(dir, 'vm.qcow2');
    await sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', join(dir, 'vm.raw'), image]);
    await sh('chown', ['libvirt-qemu:kvm', image]).catch(() => undefined);
    await ensureLibvirtd();
    await startDomain(SOURCE, [{ image, target: 'vda' }], dir);
    const backedUp = await run({ kind: 'backup', repository: 'main', libvirt: { domain: SOURCE } });
    await destroyDomain(SOURCE);
    const images = join(dir, 'images');
    await sh('mkdir', [images]);
    const restored = await run({ kind: 'restore', repository: 'main', backup: String(backedUp.result!.id), target: { kind: 'libvirt', domain: RESTORED, dir: images } });
    const path = join(images, `${RESTORED}-vda.qcow2`);
    expect(restored.result).toMatchObject({ backup: backedUp.result!.id, mode: 'libvirt', domain: RESTORED, disks: [{ name: 'vda', path, size: 8 * 1024 * 1024 }], resumed: false });
    expect((await sh('virsh', ['domstate', RESTORED])).trim()).toBe('running');
    expect((await sh('virsh', ['domblklist', RESTORED])).split('\n').some((line) => line.trim().split(/\s+/).join(' ') === `vda ${path}`)).toBe(true);
    await destroyDomain(RESTORED);
    // Hydrated: no backing file left, and the guest's bytes are the source's.
    expect(JSON.parse(await sh('qemu-img', ['info', '--output=json', path])) as Record<string, unknown>).not.toHaveProperty('backing-filename');
    expect(await qemuImgCompare(path, 'qcow2', join(dir, 'vm.raw'), 'raw')).toBe(true);
  });

  test('libvirt restore targets refused: force or workers with them, no domain or dir, a relative dir, a domain name with a slash, a path field', async () => {
    const base = { kind: 'restore', repository: 'main', backup: 'ab' };
    await refused({ ...base, target: { kind: 'libvirt', domain: 'x', dir: '/tmp/x' }, force: true }, 400, 'force');
    await refused({ ...base, target: { kind: 'libvirt', domain: 'x', dir: '/tmp/x' }, workers: 2 }, 400, 'workers');
    await refused({ ...base, target: { kind: 'libvirt', dir: '/tmp/x' } }, 400, 'target.domain');
    await refused({ ...base, target: { kind: 'libvirt', domain: 'x' } }, 400, 'target.dir');
    await refused({ ...base, target: { kind: 'libvirt', domain: 'x', dir: 'images' } }, 400, 'target.dir');
    await refused({ ...base, target: { kind: 'libvirt', domain: 'a/b', dir: '/tmp/x' } }, 400, 'target.domain');
    await refused({ ...base, target: { kind: 'libvirt', domain: 'x', dir: '/tmp/x', path: '/tmp/y' } }, 400, 'target.path');
    await refused({ ...base, target: { kind: 'file', domain: 'x', path: '/tmp/y' } }, 400, 'target.domain');
  });

  test('a restore job into oVirt (restore --ovirt --new-vm --via transfer): a new VM whose disk holds the backup; credentials from a file on the server', async () => {
    sim = await startOvirtSim({ dir: join(dir, 'sim'), lockMs: 150 });
    const vm = await sim.addVm('db1', [{ alias: 'db1_os', size: '8M' }]);
    const source = sim.disks.get(vm.disks[0]!)!.image;
    await qemuIo(source, ['write -P 0x11 0 3M', 'write -P 0x12 6M 1M']);
    const credentialsFile = join(dir, 'ovirt-credentials');
    await writeFile(credentialsFile, 'admin@internal\nsecret\n', { mode: 0o600 });
    const ovirt = { url: sim.url, credentialsFile, insecureHttp: true };
    const backedUp = await run({ kind: 'backup', repository: 'main', ovirt: { ...ovirt, vm: 'db1' } });
    const restored = await run({ kind: 'restore', repository: 'main', backup: String(backedUp.result!.id), target: { kind: 'ovirt', ...ovirt, newVm: 'db1-restored', via: 'transfer' } });
    const result = restored.result as { backup: string; vm: { id: string; name: string }; disks: { name: string; id: string; size: number }[] };
    expect(result).toMatchObject({ backup: backedUp.result!.id, vm: { name: 'db1-restored' }, disks: [{ name: 'db1_os', size: 8 * 1024 * 1024 }] });
    expect(result.disks[0]!.id).not.toBe(vm.disks[0]);
    expect([...sim.vms.get(result.vm.id)!.attachments.keys()]).toEqual([result.disks[0]!.id]);
    // -U: the simulator's images may still be open in its imageio's qemu-nbd; compare exits 1 on a difference.
    await sh('qemu-img', ['compare', '-U', '-q', '-f', 'qcow2', '-F', 'qcow2', sim.disks.get(result.disks[0]!.id)!.image, source]);
    expect([...sim.transfers.values()].filter((t) => t.direction === 'upload').map((t) => t.phase)).toEqual(['finished_success']);
    // The request as the API shows it back names the credentials' file, not what is in it.
    expect(JSON.stringify(restored.request)).not.toContain('secret');
  });

  test('oVirt restore targets refused: no appliance without via transfer, neither or both of newVm and toVm, toVm without disk, a password in the body, force', async () => {
    const base = { kind: 'restore', repository: 'main', backup: 'ab' };
    const ovirt = { kind: 'ovirt', url: 'http://127.0.0.1:1', credentialsFile: '/etc/engine/ovirt', insecureHttp: true };
    await refused({ ...base, target: { ...ovirt, newVm: 'x' } }, 400, 'target.appliance');
    await refused({ ...base, target: { ...ovirt, via: 'transfer' } }, 400, 'target.newVm');
    await refused({ ...base, target: { ...ovirt, via: 'transfer', newVm: 'x', toVm: 'y' } }, 400, 'target.newVm');
    await refused({ ...base, target: { ...ovirt, via: 'transfer', toVm: 'y' } }, 400, 'disk');
    await refused({ ...base, target: { ...ovirt, via: 'transfer', newVm: 'x', password: 'secret' } }, 400, 'target.password');
    await refused({ ...base, target: { ...ovirt, via: 'transfer', newVm: 'x', credentialsFile: 'ovirt' } }, 400, 'target.credentialsFile');
    await refused({ ...base, target: { ...ovirt, via: 'transfer', newVm: 'x' }, force: true }, 400, 'force');
  });

  test("the new kinds' hosts for limits.perHost: the oVirt engine's, the libvirt URI's (else this host); none for a copy", () => {
    const hosts = (body: Record<string, unknown>, env: Record<string, string> = {}): string[] => sourceHostsOf(parseJobRequest({ repository: 'main', ...body }), env);
    const restore = { kind: 'restore', backup: 'ab' };
    expect(hosts({ ...restore, target: { kind: 'ovirt', url: 'https://Engine.example/ovirt-engine', credentialsFile: '/etc/c', newVm: 'x', via: 'transfer' } })).toEqual(['engine.example']);
    expect(hosts({ ...restore, target: { kind: 'libvirt', domain: 'x', dir: '/srv' } })).toEqual(['local']);
    expect(hosts({ ...restore, target: { kind: 'libvirt', domain: 'x', dir: '/srv' } }, { LIBVIRT_DEFAULT_URI: 'qemu+ssh://root@kvm-2.example/system' })).toEqual(['kvm-2.example']);
    expect(hosts({ kind: 'copy', to: 'offsite', all: true })).toEqual([]);
  });

  test('every accepted body matches the OpenAPI JobRequest, every refused one does not; every answer matches its schema', async () => {
    const doc = await openApiDocument();
    const jobRequest = { $ref: '#/components/schemas/JobRequest' };
    const posted = recorded.filter((a) => a.method === 'POST' && a.path === '/api/v1/jobs');
    expect(posted.length).toBe(bodies.length);
    // The schema is looser than the parser where JSON Schema cannot say it: exactly one selection, not the own repository, no force with a libvirt or oVirt target, the oVirt target's combinations.
    const schemaOnly = (body: unknown): boolean => {
      const b = body as Record<string, unknown>;
      const target = b.target as Record<string, unknown> | undefined;
      if (b.kind === 'restore' && target?.kind === 'ovirt') return target.password === undefined;
      if (b.kind === 'restore') return target?.kind === 'libvirt' && (b.force !== undefined || b.workers !== undefined || (target.dir !== undefined && !String(target.dir).startsWith('/')));
      return b.kind === 'copy' && b.to !== undefined && (b.to === b.repository || b.to === 'elsewhere' || ['backups', 'all', 'name', 'latest'].filter((k) => b[k] !== undefined).length !== 1);
    };
    bodies.forEach((body, i) => {
      const problems = validate(doc, jobRequest, body);
      const accepted = posted[i]!.status === 202 || posted[i]!.status === 403;
      if (accepted || schemaOnly(body)) expect(problems, JSON.stringify(body)).toEqual([]);
      else expect(problems, JSON.stringify(body)).not.toEqual([]);
    });
    const { unchecked, problems } = checkAnswers(doc, recorded);
    expect(unchecked).toEqual([]);
    expect(problems).toEqual([]);
  });
});
