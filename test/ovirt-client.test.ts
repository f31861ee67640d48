/**
 * The oVirt REST client over real HTTP against the simulator: SSO, Version and Correlation-Id headers,
 * token renewal, 409 retries, faults as typed errors, bounded polling; and the XML layer on response
 * shapes recorded from the API model (fault, 202 with creation_status, backup with <phase>).
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { OvirtClient } from '../dist/engine/ovirt/client.js';
import { attribute, child, children, parseXml, text, buildXml } from '../dist/engine/ovirt/xml.js';
import { contractProblems } from './ovirt-contract/contract.js';
import { startOvirtSim, type OvirtSim } from '../dist/test/ovirt-sim/server.js';
import { sh, tempDir } from './helpers.js';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';

let sim: OvirtSim;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  let dir: string;
  ({ path: dir, cleanup } = await tempDir('engine-ovirt-client-'));
  sim = await startOvirtSim({ dir });
  await sim.addVm('vm1', [{ alias: 'vm1_Disk1', size: '16M' }]);
  await sim.addVm('backup-appliance', []);
});
afterAll(async () => {
  // Every request the engine made here follows oVirt's API model.
  expect(contractProblems(sim.requests)).toEqual([]);
  await sim.stop();
  await cleanup();
});

function client(password = 'secret'): OvirtClient {
  return new OvirtClient({ url: sim.url, credentials: { username: 'admin@internal', password }, conflictDelayMs: 10, insecureHttp: true });
}

describe('oVirt client', () => {
  test('logs in through SSO and sends Version: 4, Accept and a Correlation-Id on every request', async () => {
    const c = client();
    const root = await c.get('');
    expect(text(child(child(child(root.xml, 'api'), 'product_info'), 'version'), 'major')).toBe('4');
    const last = sim.requests.at(-1)!;
    expect(last.headers.version).toBe('4');
    expect(last.headers.accept).toBe('application/xml');
    expect(last.headers.authorization).toMatch(/^Bearer [0-9a-f-]{36}$/);
    expect(last.headers['correlation-id']).toMatch(new RegExp(`^${c.correlation}-\\d+$`));
  });

  test('finds a VM by name and reads it by id', async () => {
    const c = client();
    const list = await c.get('vms', { search: 'name=vm1' });
    const vms = children(child(list.xml, 'vms'), 'vm');
    expect(vms.map((vm) => text(vm, 'name'))).toEqual(['vm1']);
    const id = attribute(vms[0], 'id')!;
    const vm = await c.get(`vms/${id}`);
    expect(text(child(vm.xml, 'vm'), 'status')).toBe('up');
  });

  test('a 404 (oVirt answers it with no body) becomes an OvirtFaultError with its status', async () => {
    await expect(client().get('vms/00000000-0000-0000-0000-000000000000')).rejects.toMatchObject({
      code: 'ENGINE_OVIRT_FAULT',
      status: 404,
      message: 'oVirt GET /ovirt-engine/api/vms/00000000-0000-0000-0000-000000000000: HTTP 404: Not Found',
    });
  });

  test('a fault becomes an OvirtFaultError with status, reason and detail', async () => {
    const c = client();
    const body = '<backup><disks><disk id="00000000-0000-0000-0000-000000000000"/></disks></backup>';
    const vm = attribute(children(child((await c.get('vms', { search: 'name=vm1' })).xml, 'vms'), 'vm')[0], 'id')!;
    await expect(c.call('POST', `vms/${vm}/backups`, { body })).rejects.toMatchObject({
      code: 'ENGINE_OVIRT_FAULT',
      status: 400,
      message: `oVirt POST /ovirt-engine/api/vms/${vm}/backups: HTTP 400: Operation Failed ([Cannot backup VM. The following disks do not exist: 00000000-0000-0000-0000-000000000000.])`,
    });
  });

  test('wrong credentials are a clear login error', async () => {
    await expect(client('wrong').get('')).rejects.toMatchObject({ code: 'ENGINE_OVIRT_AUTH', message: expect.stringContaining('Cannot authenticate user: Invalid credentials') });
  });

  test('an expired token is renewed once, transparently', async () => {
    const c = client();
    await c.get('');
    sim.faults.expireTokens();
    const before = sim.requests.length;
    const root = await c.get('');
    expect(root.status).toBe(200);
    expect(sim.requests.slice(before).map((r) => [r.path.split('?')[0], r.status])).toEqual([
      ['/ovirt-engine/api/', 401],
      ['/ovirt-engine/sso/oauth/token', 200],
      ['/ovirt-engine/api/', 200],
    ]);
  });

  test('409 Conflict is retried with backoff, then reported with its detail', async () => {
    const c = client();
    sim.faults.conflict('GET', /^\/vms$/, 2);
    expect((await c.get('vms')).status).toBe(200);
    sim.faults.conflict('GET', /^\/vms$/, 10);
    await expect(c.get('vms')).rejects.toMatchObject({ code: 'ENGINE_OVIRT_FAULT', status: 409, message: expect.stringContaining('Related operation is currently in progress') });
  });

  test('waitFor polls until a value, and times out clearly', async () => {
    const c = client();
    let calls = 0;
    expect(await c.waitFor('three polls', async () => (++calls >= 3 ? 'ok' : undefined), { intervalMs: 5 })).toBe('ok');
    await expect(c.waitFor('snapshot 42 to become ok', async () => undefined, { timeoutMs: 50, intervalMs: 10 })).rejects.toMatchObject({
      code: 'ENGINE_TIMEOUT',
      message: 'snapshot 42 to become ok did not answer within 0.05 s',
    });
  });
});

describe('recorded response shapes (from the API model and real engines)', () => {
  test('a real backup fault', () => {
    const xml = parseXml('<fault>\n    <detail>[Cannot backup VM. Backup is not supported by the host (hostname).]</detail>\n    <reason>Operation Failed</reason>\n</fault>');
    expect(text(child(xml, 'fault'), 'reason')).toBe('Operation Failed');
    expect(text(child(xml, 'fault'), 'detail')).toBe('[Cannot backup VM. Backup is not supported by the host (hostname).]');
  });

  test('202 Accepted with creation_status', () => {
    const xml = parseXml('<snapshot href="/ovirt-engine/api/vms/123/snapshots/456" id="456"><actions/><description>engine backup</description><snapshot_status>locked</snapshot_status><creation_status>pending</creation_status><link href="/ovirt-engine/api/vms/123/snapshots/456/creation_status/789" rel="creation_status"/></snapshot>');
    const snapshot = child(xml, 'snapshot');
    expect(attribute(snapshot, 'id')).toBe('456');
    expect(text(snapshot, 'snapshot_status')).toBe('locked');
    expect(text(snapshot, 'creation_status')).toBe('pending');
    expect(attribute(child(snapshot, 'link'), 'rel')).toBe('creation_status');
  });

  test('a backup with <phase> and its disks', () => {
    const xml = parseXml('<backup id="b1"><from_checkpoint_id>c0</from_checkpoint_id><to_checkpoint_id>c1</to_checkpoint_id><phase>ready</phase><disks><disk id="d1"><backup_mode>incremental</backup_mode></disk><disk id="d2"><backup_mode>full</backup_mode></disk></disks></backup>');
    const backup = child(xml, 'backup');
    expect(text(backup, 'phase')).toBe('ready');
    expect(text(backup, 'to_checkpoint_id')).toBe('c1');
    expect(children(child(backup, 'disks'), 'disk').map((d) => [attribute(d, 'id'), text(d, 'backup_mode')])).toEqual([
      ['d1', 'incremental'],
      ['d2', 'full'],
    ]);
  });

  test('OVF in CDATA or escaped text comes back as the same string', () => {
    const ovf = "<?xml version='1.0' encoding='UTF-8'?><ovf:Envelope xmlns:ovf=\"http://schemas.dmtf.org/ovf/envelope/1/\"><Content/></ovf:Envelope>";
    const escaped = parseXml(`<snapshot><initialization><configuration><type>ovf</type><data>${ovf.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')}</data></configuration></initialization></snapshot>`);
    const cdata = parseXml(`<snapshot><initialization><configuration><type>ovf</type><data><![CDATA[${ovf}]]></data></configuration></initialization></snapshot>`);
    for (const xml of [escaped, cdata]) {
      expect(text(child(child(child(xml, 'snapshot'), 'initialization'), 'configuration'), 'data')).toBe(ovf);
    }
  });

  test('request bodies: the disk attachment of the appliance flow', () => {
    const body = buildXml('disk_attachment', { disk: { '@_id': 'D', snapshot: { '@_id': 'S' } }, interface: 'virtio', bootable: false, active: true });
    expect(body).toBe('<disk_attachment><disk id="D"><snapshot id="S"/></disk><interface>virtio</interface><bootable>false</bootable><active>true</active></disk_attachment>');
  });
});

describe('TLS with the engine\'s CA', () => {
  test('a CA file makes the HTTPS engine trusted; without it the refusal is one clear line', async () => {
    const { path: tlsDir, cleanup: tlsCleanup } = await tempDir('engine-ovirt-tls-');
    try {
      const key = join(tlsDir, 'key.pem');
      const cert = join(tlsDir, 'cert.pem');
      await sh('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '1', '-subj', '/CN=engine.test', '-addext', 'subjectAltName=IP:127.0.0.1']);
      const secure = await startOvirtSim({ dir: join(tlsDir, 'sim'), tls: { key: await readFile(key, 'utf8'), cert: await readFile(cert, 'utf8') } });
      try {
        expect(secure.url).toMatch(/^https:/);
        const trusted = new OvirtClient({ url: secure.url, credentials: { username: 'admin@internal', password: 'secret' }, caFile: cert });
        expect((await trusted.get('')).status).toBe(200);
        const untrusted = new OvirtClient({ url: secure.url, credentials: { username: 'admin@internal', password: 'secret' } });
        // A library caller is told the condition, and what to do in details (the CLI words it as --ca-file).
        await expect(untrusted.get('')).rejects.toMatchObject({
          code: 'ENGINE_OVIRT_CONNECT',
          message: expect.stringMatching(/^[^\n]*cannot connect: the peer certificate is self-signed and not the trusted CA \(self[- ]signed certificate, DEPTH_ZERO_SELF_SIGNED_CERT\)$/),
          details: expect.objectContaining({ remedies: [{ kind: 'ovirt-ca' }] }),
        });
      } finally {
        await secure.stop();
      }
    } finally {
      await tlsCleanup();
    }
  });
});
