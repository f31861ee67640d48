/**
 * Property and fuzz tests of the oVirt answers as the engine decodes them: the XML layer (decodeXml), every
 * decoder of engine/ovirt/answers.ts, imageio's two JSON documents (imageio-json.ts), and the REST client
 * over real HTTP against a server that answers anything. Given any answer, each either returns a value that
 * keeps its promises (ids are non-empty strings, sizes whole numbers of bytes within 2^53, extents
 * contiguous over the image) or fails with an EngineError of a stable code from the engine layer
 * (ENGINE_OVIRT_FAULT, ENGINE_OVIRT_AUTH, never ENGINE_INTERNAL, a TypeError or a hang). Valid answers built
 * from typed values decode back to them. Bounded: a few hundred cases each, a fresh seed every run
 * (fast-check prints the seed and the shrunk input of a failure).
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import fc from 'fast-check';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { EngineError } from '../dist/repo-format/errors.js';
import { buildXml, decodeXml, parseXml, type XmlElement, type XmlInput } from '../dist/engine/ovirt/xml.js';
import * as answers from '../dist/engine/ovirt/answers.js';
import { decodeExtents, decodeOptions } from '../dist/engine/ovirt/imageio-json.js';
import { OvirtClient } from '../dist/engine/ovirt/client.js';
import { ImageioSource } from '../dist/engine/ovirt/imageio-source.js';

const RUNS = { numRuns: 300 };
const WHAT = 'GET test';

/** The only acceptable failure: an EngineError with one of `codes`. */
function decodedOr<T>(codes: string[], decode: () => T): T | EngineError {
  try {
    return decode();
  } catch (error) {
    if (error instanceof EngineError && codes.includes(error.code)) return error;
    throw error;
  }
}

const id = fc.uuid();
const word = fc.string({ minLength: 1, maxLength: 12 }).filter((s) => s.trim() === s && s.trim() !== '');
/** Element names the decoders read, and a few they do not. */
const names = ['vms', 'vm', 'name', 'status', 'cluster', 'initialization', 'configuration', 'data', 'clusters', 'version', 'major', 'minor', 'data_center', 'disk_attachments', 'disk_attachment', 'disk', 'active', 'logical_name', 'disks', 'alias', 'provisioned_size', 'snapshots', 'snapshot', 'description', 'snapshot_status', 'backups', 'backup', 'phase', 'to_checkpoint_id', 'backup_mode', 'checkpoints', 'checkpoint', 'state', 'storage_domains', 'storage_domain', 'type', 'available', 'storage', 'image_transfer', 'transfer_url', 'proxy_url', 'fault', 'reason', 'detail', 'other'];
const leafText = fc.oneof(fc.constantFrom('', '0', '-1', '1e3', '65536', '9007199254740993', 'NaN', 'true', 'ok', 'ready', 'full', 'incremental'), id, fc.string({ maxLength: 20 }));

/** A random XML element tree over oVirt's element names: attributes (id), text, repeated children. */
const tree: fc.Arbitrary<XmlInput> = fc.letrec<{ node: XmlInput }>((tie) => ({
  node: fc
    .tuple(
      fc.option(fc.oneof(id, fc.constantFrom('', ' ', '0')), { nil: undefined }),
      fc.array(fc.tuple(fc.constantFrom(...names), fc.oneof({ depthSize: 'small', withCrossShrink: true }, leafText, tie('node'), fc.array(tie('node'), { maxLength: 3 }))), { maxLength: 5 }),
    )
    .map(([elementId, kids]) => {
      const node: XmlInput = elementId === undefined ? {} : { '@_id': elementId };
      for (const [name, value] of kids) node[name] = value as XmlInput;
      return node;
    }),
})).node;

/** Every decoder the flows use, each called as the flows call it. */
const decoders: [string, (xml: XmlElement | undefined) => unknown][] = [
  ['vmList', (x) => answers.vmList(x, WHAT)],
  ['vmOf', (x) => answers.vmOf(x)],
  ['clusterOf', (x) => answers.clusterOf(x)],
  ['clusterList', (x) => answers.clusterList(x)],
  ['diskAttachmentList', (x) => answers.diskAttachmentList(x, WHAT)],
  ['diskAttachmentOf', (x) => answers.diskAttachmentOf(x, WHAT)],
  ['diskOf', (x) => answers.diskOf(x, WHAT, 'd1')],
  ['diskStatus', (x) => answers.diskStatus(x)],
  ['diskList', (x) => answers.diskList(x, WHAT)],
  ['snapshotOf', (x) => answers.snapshotOf(x, WHAT)],
  ['snapshotList', (x) => answers.snapshotList(x, WHAT)],
  ['backupOf', (x) => answers.backupOf(x, WHAT)],
  ['backupPhase', (x) => answers.backupPhase(x)],
  ['backupList', (x) => answers.backupList(x)],
  ['backupDiskModes', (x) => answers.backupDiskModes(x, WHAT)],
  ['checkpointList', (x) => answers.checkpointList(x, WHAT)],
  ['storageDomainList', (x) => answers.storageDomainList(x, WHAT)],
  ['transferOf', (x) => answers.transferOf(x, WHAT)],
  ['createdId', (x) => answers.createdId(x, 'disk', WHAT, 'disk')],
];

/**
 * What every decoded value promises, whatever the answer was. A cluster's id and data centre may be absent
 * (common.ts's clusterFrom refuses such a cluster with the request named); every other id is there.
 */
function checkPromises(value: unknown, idsOptional = false): void {
  const visit = (v: unknown, key: string): void => {
    if (Array.isArray(v)) return v.forEach((item) => visit(item, key));
    if (v instanceof Map) return [...v.entries()].forEach(([k, item]) => (visit(k, 'id'), visit(item, key)));
    if (typeof v === 'object' && v !== null) return Object.entries(v).forEach(([k, item]) => visit(item, k));
    if (['id', 'diskId'].includes(key) && !idsOptional) expect(typeof v === 'string' && v !== '').toBe(true);
    if (['size', 'available'].includes(key)) expect(Number.isSafeInteger(v) && (v as number) >= 0).toBe(true);
    if (key === 'version') expect(Number.isSafeInteger(v)).toBe(true);
    if (typeof v === 'number') expect(Number.isFinite(v)).toBe(true);
  };
  visit(value, '');
}

describe('oVirt XML answers', () => {
  test('any text: decodeXml gives a document or a reason, never an exception; parseXml an ENGINE_OVIRT_FAULT', () => {
    const xmlish = fc.array(fc.oneof(fc.constantFrom('<', '>', '</', '/>', '<![CDATA[', ']]>', '<!--', '-->', '&amp;', '&#0;', '&#x110000;', '"', '<?xml version="1.0"?>', '<__proto__>', '<constructor>', '<a id="', '<vm>', '</vm>'), fc.string({ maxLength: 8 })), { maxLength: 40 }).map((parts) => parts.join(''));
    fc.assert(
      fc.property(fc.oneof(fc.string({ maxLength: 200 }), xmlish), (body) => {
        const decoded = decodeXml(body);
        expect(typeof decoded === 'string' || (typeof decoded === 'object' && decoded !== null)).toBe(true);
        const parsed = decodedOr(['ENGINE_OVIRT_FAULT'], () => parseXml(body, WHAT));
        if (parsed instanceof EngineError) expect(parsed.message).not.toMatch(/[\u0000-\u001f]/);
      }),
      RUNS,
    );
  });

  test('elements nested past the parser\'s limit are a reason, not a stack overflow', () => {
    const deep = `${'<vm>'.repeat(5000)}x${'</vm>'.repeat(5000)}`;
    expect(typeof decodeXml(deep)).toBe('string');
  });

  test('any document over oVirt\'s element names: every decoder returns what it promises or an ENGINE_OVIRT_FAULT', () => {
    fc.assert(
      fc.property(fc.constantFrom(...names), tree, (root, body) => {
        const xml = decodeXml(buildXml(root, body));
        if (typeof xml === 'string') return;
        for (const [name, decode] of decoders) {
          const value = decodedOr(['ENGINE_OVIRT_FAULT'], () => decode(xml));
          if (value instanceof EngineError) expect(value.message).toContain(WHAT);
          else checkPromises(value, name.startsWith('cluster'));
        }
      }),
      RUNS,
    );
  });

  test('a missing id or an unusable size is refused with the request named, never passed on', () => {
    const disk = (size: string | undefined): XmlElement => parseXml(buildXml('disk', { '@_id': 'd1', alias: 'a', ...(size === undefined ? {} : { provisioned_size: size }) }));
    for (const size of [undefined, '', '-1', '1.5', '1e9', 'NaN', '9007199254740993', '99999999999999999']) {
      expect(() => answers.diskOf(disk(size), WHAT, 'd1')).toThrow(expect.objectContaining({ code: 'ENGINE_OVIRT_FAULT', message: expect.stringContaining(WHAT) }));
    }
    expect(answers.diskOf(disk('9007199254740991'), WHAT, 'd1').size).toBe(2 ** 53 - 1);
    expect(() => answers.createdId(parseXml(buildXml('disk', { name: 'x' })), 'disk', 'POST disks', 'disk')).toThrow(/POST disks.*names no disk id/);
    expect(() => answers.createdId(parseXml(buildXml('disk', { '@_id': '' })), 'disk', 'POST disks', 'disk')).toThrow(/names no disk id/);
    expect(() => answers.vmList(parseXml(buildXml('vms', { vm: [{ '@_id': 'v1', name: 'a' }, { name: 'b' }] })), WHAT)).toThrow(/names no VM id/);
    // An attachment naming its disk with an empty id (found by the property below): refused, not ''.
    expect(() => answers.diskAttachmentOf(parseXml(buildXml('disk_attachment', { disk: { '@_id': '' } })), WHAT)).toThrow(/names no disk attachment id/);
    expect(answers.diskAttachmentOf(parseXml(buildXml('disk_attachment', { '@_id': 'd2', disk: { '@_id': '' } })), WHAT).diskId).toBe('d2');
  });

  test('valid answers built from typed values decode back to them', () => {
    const disk = fc.record({ id, alias: word, size: fc.nat({ max: Number.MAX_SAFE_INTEGER }) });
    const domain = fc.record({ id, name: word, type: fc.constantFrom('data', 'iso', 'export'), status: fc.constantFrom('active', 'maintenance'), available: fc.nat({ max: Number.MAX_SAFE_INTEGER }), storage: fc.constantFrom('nfs', 'iscsi', 'fcp') });
    fc.assert(
      fc.property(fc.array(disk, { maxLength: 4 }), fc.array(domain, { maxLength: 3 }), fc.array(fc.record({ id, state: fc.constantFrom('created', 'invalid') }), { maxLength: 4 }), (disks, domains, checkpoints) => {
        const diskXml = parseXml(buildXml('disks', { disk: disks.map((d) => ({ '@_id': d.id, alias: d.alias, provisioned_size: d.size })) }));
        expect(answers.diskList(diskXml, WHAT)).toEqual(disks);
        const domainXml = parseXml(buildXml('storage_domains', { storage_domain: domains.map((d) => ({ '@_id': d.id, name: d.name, type: d.type, status: d.status, available: d.available, storage: { type: d.storage } })) }));
        expect(answers.storageDomainList(domainXml, WHAT)).toEqual(domains);
        const checkpointXml = parseXml(buildXml('checkpoints', { checkpoint: checkpoints.map((c) => ({ '@_id': c.id, state: c.state })) }));
        expect(answers.checkpointList(checkpointXml, WHAT)).toEqual(checkpoints);
      }),
      { numRuns: 100 },
    );
    const backup = parseXml(buildXml('backup', { '@_id': 'b1', phase: 'ready', to_checkpoint_id: 'c2', snapshot: { '@_id': 's1' } }));
    expect(answers.backupOf(backup, WHAT)).toEqual({ id: 'b1', phase: 'ready', snapshotId: 's1', toCheckpoint: 'c2' });
    const cluster = parseXml(buildXml('cluster', { '@_id': 'c1', name: 'Default', version: { major: 4, minor: 7 }, data_center: { '@_id': 'dc1' } }));
    expect(answers.clusterOf(cluster)).toEqual({ id: 'c1', name: 'Default', version: [4, 7], dataCenter: 'dc1' });
  });
});

describe('imageio JSON answers', () => {
  test('OPTIONS: any bytes give options with 1..8 readers and writers, or a reason', () => {
    const json = fc.json().map((text) => Buffer.from(text));
    fc.assert(
      fc.property(fc.oneof(json, fc.uint8Array({ maxLength: 200 }).map((b) => Buffer.from(b))), (body) => {
        const options = decodeOptions(body);
        if (typeof options === 'string') return;
        expect(options.features.every((f) => typeof f === 'string')).toBe(true);
        for (const count of [options.maxReaders, options.maxWriters]) expect(Number.isSafeInteger(count) && count >= 1 && count <= 8).toBe(true);
      }),
      RUNS,
    );
    expect(decodeOptions(Buffer.from('{"features":["extents",3],"max_readers":64,"max_writers":-2}'))).toEqual({ features: ['extents'], maxReaders: 8, maxWriters: 1 });
  });

  test('extents: valid lists round-trip; anything else is a reason, never a list that misses or overruns the image', () => {
    const lengths = fc.array(fc.integer({ min: 1, max: 2 ** 40 }), { maxLength: 8 });
    fc.assert(
      fc.property(lengths, fc.array(fc.boolean(), { minLength: 8, maxLength: 8 }), (list, flags) => {
        let at = 0;
        const extents = list.map((length, i) => {
          const extent = { start: at, length, zero: flags[i]!, dirty: !flags[i]! };
          at += length;
          return extent;
        });
        expect(decodeExtents(Buffer.from(JSON.stringify(extents)), at)).toEqual(extents);
      }),
      { numRuns: 100 },
    );
    const hostileItem = fc.record({ start: fc.oneof(fc.integer(), fc.double(), fc.string(), fc.constant(null)), length: fc.oneof(fc.integer(), fc.double(), fc.string(), fc.constant(null)), zero: fc.anything(), dirty: fc.anything() }, { requiredKeys: [] });
    fc.assert(
      fc.property(fc.oneof(fc.json().map((t) => Buffer.from(t)), fc.array(hostileItem, { maxLength: 6 }).map((l) => Buffer.from(JSON.stringify(l)))), fc.nat({ max: 2 ** 20 }), (body, size) => {
        const extents = decodeExtents(body, size);
        if (typeof extents === 'string') return;
        let at = 0;
        for (const e of extents) {
          expect(e.start).toBe(at);
          expect(Number.isSafeInteger(e.length) && e.length > 0).toBe(true);
          expect(typeof e.zero === 'boolean' && typeof e.dirty === 'boolean').toBe(true);
          at += e.length;
        }
        expect(at).toBe(size);
      }),
      RUNS,
    );
  });
});

describe('the oVirt client against a server that answers anything', () => {
  let server: Server;
  let url: string;
  /** What the server answers next to GET …/vms and to the SSO token request. */
  let next: { status: number; body: Buffer | string } = { status: 200, body: '' };
  let token: { status: number; body: string } = { status: 200, body: '{"access_token":"t"}' };

  beforeAll(async () => {
    server = createServer((req, res) => {
      req.resume();
      const answer = req.url?.startsWith('/ovirt-engine/sso/') ? token : next;
      res.writeHead(answer.status, { 'Content-Type': 'application/xml' });
      res.end(answer.body);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  afterAll(async () => {
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });

  const client = (): OvirtClient => new OvirtClient({ url, credentials: { username: 'admin@internal', password: 'p' }, insecureHttp: true, conflictRetries: 0, requestTimeoutMs: 5000 });

  test('any answer to a request: the VMs it lists, or one ENGINE_OVIRT_FAULT line naming the request', async () => {
    const body = fc.oneof(
      fc.constantFrom(0, 1, 2).chain((root) => tree.map((t) => buildXml(['vms', 'fault', 'vm'][root]!, t))),
      fc.string({ maxLength: 200 }).map((s) => `<${s}`),
      fc.uint8Array({ maxLength: 200 }).map((b) => Buffer.from(b)),
    );
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(200, 201, 400, 404, 500, 503), body, async (status, answer) => {
        next = { status, body: answer };
        try {
          const vms = await client().read('vms', answers.vmList);
          expect(status < 400).toBe(true);
          checkPromises(vms);
        } catch (error) {
          expect(error).toBeInstanceOf(EngineError);
          expect((error as EngineError).code).toBe('ENGINE_OVIRT_FAULT');
          expect((error as EngineError).message).toContain('vms');
          expect((error as EngineError).message).not.toMatch(/[\u0000-\u001f]/);
        }
      }),
      { numRuns: 150 },
    );
  });

  test('any answer to the SSO login: a session, or one ENGINE_OVIRT_AUTH line without control characters', async () => {
    next = { status: 200, body: '<vms/>' };
    const answer = fc.oneof(fc.json(), fc.string({ maxLength: 100 }), fc.record({ access_token: fc.anything(), error: fc.anything(), error_description: fc.anything() }, { requiredKeys: [] }).map((o) => JSON.stringify(o)));
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(200, 400, 401), answer, async (status, body) => {
        token = { status, body };
        try {
          await client().read('vms', answers.vmList);
        } catch (error) {
          expect(error).toBeInstanceOf(EngineError);
          expect((error as EngineError).code).toBe('ENGINE_OVIRT_AUTH');
          expect((error as EngineError).message).not.toMatch(/[\u0000-\u001f]/);
        }
      }),
      { numRuns: 150 },
    );
    token = { status: 200, body: '{"access_token":"t"}' };
  });
});

describe('imageio over real HTTP, answering anything', () => {
  let server: Server;
  let url: string;
  /** What the server answers to OPTIONS, to GET …/extents and to a ranged GET. */
  let answers: Record<'options' | 'extents' | 'read', { status: number; body: Buffer }>;

  beforeAll(async () => {
    server = createServer((req, res) => {
      req.resume();
      const answer = req.method === 'OPTIONS' ? answers.options : req.url?.includes('/extents') ? answers.extents : answers.read;
      res.writeHead(answer.status, { 'Content-Type': 'application/json' });
      res.end(answer.body);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/images/ticket`;
  });
  afterAll(async () => {
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });

  test("a download: the disk's extents and bytes, or one ENGINE_SOURCE_ line with imageio's words escaped", async () => {
    const size = 65536;
    const body = fc.oneof(
      fc.json().map((t) => Buffer.from(t)),
      fc.uint8Array({ maxLength: 300 }).map((b) => Buffer.from(b)),
      fc.constant(Buffer.from(JSON.stringify([{ start: 0, length: size, zero: false, dirty: true }]))),
      fc.constant(Buffer.from('{"features":["extents"],"max_readers":2}')),
      fc.constant(Buffer.from('error\x1b[31m\nforged line\r')),
    );
    const answer = fc.record({ status: fc.constantFrom(200, 200, 204, 206, 400, 403, 416, 500), body });
    await fc.assert(
      fc.asyncProperty(answer, answer, answer, async (options, extents, read) => {
        answers = { options, extents, read };
        let source: ImageioSource | undefined;
        try {
          source = await ImageioSource.open({ transferUrl: url, proxyUrl: undefined }, size, { name: 'd', description: { kind: 'ovirt-imageio', path: 'vm/d' } });
          let covered = 0;
          for await (const extent of source.extents()) covered += extent.length;
          expect(covered).toBe(size);
          const block = Buffer.alloc(4096);
          await source.read(block, 0);
          expect(read.body.subarray(0, 4096).equals(block)).toBe(true);
        } catch (error) {
          expect(error).toBeInstanceOf(EngineError);
          expect((error as EngineError).code).toMatch(/^ENGINE_SOURCE_(UNREADABLE|CHANGED)$/);
          expect((error as EngineError).message).not.toMatch(/[\u0000-\u001f\u007f]/);
        } finally {
          await source?.close().catch(() => undefined);
          source?.dispose?.();
        }
      }),
      { numRuns: 120 },
    );
  });
});
