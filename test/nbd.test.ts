/**
 * The NBD client against a real qemu-nbd: exact reads, base:allocation, dirty bitmaps, writes, multi-conn;
 * and backups from NBD exports that read only allocated data and restore byte for byte.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { NbdClient } from '../dist/engine/nbd/client.js';
import { parseNbdUri } from '../dist/engine/nbd/uri.js';
import { parseJson, runEngine, sh, tempDir, type BackupJson, withoutProgress } from './helpers.js';
import { qcow2, qemuImgCompare, qemuIo, qemuNbd, type Export } from './qemu.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;
const exportsToStop: Export[] = [];

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-nbd-'));
});
afterAll(async () => {
  for (const e of exportsToStop) await e.stop();
  await cleanup();
});

async function serve(image: string, options: Parameters<typeof qemuNbd>[2] = {}): Promise<Export> {
  const e = await qemuNbd(image, dir, options);
  exportsToStop.push(e);
  return e;
}

describe('NBD URIs', () => {
  test.each([
    ['nbd://example.org/disk0', { address: { kind: 'tcp', host: 'example.org', port: 10809 }, exportName: 'disk0' }],
    ['nbd://[::1]:10810/', { address: { kind: 'tcp', host: '::1', port: 10810 }, exportName: '' }],
    ['nbd+unix:///vda?socket=/run/bk.sock', { address: { kind: 'unix', path: '/run/bk.sock' }, exportName: 'vda' }],
    ['nbd+unix:///my%20disk?socket=/tmp/a%20b.sock', { address: { kind: 'unix', path: '/tmp/a b.sock' }, exportName: 'my disk' }],
    ['nbds://alice@example.org/d?tls-psk-file=/k.psk', { address: { kind: 'tcp', host: 'example.org', port: 10809 }, tls: { pskFile: '/k.psk', username: 'alice', hostname: 'example.org' } }],
    ['nbds://10.0.0.1:10810/d?tls-certificates=/pki&tls-hostname=nbd.example.org', { tls: { certificates: '/pki', hostname: 'nbd.example.org' } }],
    ['nbds+unix:///d?socket=/run/s.sock&tls-certificates=/pki', { address: { kind: 'unix', path: '/run/s.sock' }, tls: { certificates: '/pki', hostname: undefined } }],
    // A password (NBD has none) is not repeated in messages.
    ['nbds://alice:secret@example.org/d', { text: 'nbds://alice@example.org/d', tls: { username: 'alice' } }],
  ])('%s', (text, expected) => {
    expect(parseNbdUri(text)).toMatchObject(expected);
  });

  test.each([
    ['nbd+unix:///vda', 'needs ?socket=PATH'],
    ['nbd://host/x?tls-certificates=/pki', 'need an nbds:// or nbds+unix:// URI'],
    ['nbds://host/x?tls-certificates=/pki&tls-psk-file=/k', 'not both'],
    ['nbds://host/x?tls-verify-peer=false', 'the server is always verified'],
    ['http://host/x', 'is not an NBD URI'],
    ['nbd:///x', 'needs a host'],
  ])('%s is refused', (text, message) => {
    expect(() => parseNbdUri(text)).toThrow(message);
  });
});

describe('NBD client against qemu-nbd', () => {
  let image: string;
  let served: Export;

  beforeAll(async () => {
    image = join(dir, 'client.qcow2');
    await qcow2(image, '6G');
    // Data at the start, across the 4 GiB boundary, and a single byte near the end.
    await qemuIo(image, ['write -P 0xab 0 4M', 'write -P 0xcd 4095M 2M', 'write -P 0x11 6143M 1']);
    served = await serve(image);
  });

  test('reads exact bytes, across 2^32, with many requests in flight', async () => {
    const client = await NbdClient.connect(served.uri);
    try {
      expect(client.size).toBe(6 * 1024 * MiB);
      expect(client.connectionCount).toBe(4); // qemu-nbd -r advertises CAN_MULTI_CONN
      const buffer = Buffer.alloc(4 * MiB);
      await client.read(buffer, 4094 * MiB);
      expect(buffer.subarray(0, MiB).equals(Buffer.alloc(MiB))).toBe(true);
      expect(buffer.subarray(MiB, 3 * MiB).equals(Buffer.alloc(2 * MiB, 0xcd))).toBe(true);
      expect(buffer.subarray(3 * MiB).equals(Buffer.alloc(MiB))).toBe(true);
      const reads = await Promise.all(Array.from({ length: 64 }, async (_, i) => {
        const b = Buffer.alloc(64 * 1024);
        await client.read(b, i * 64 * 1024);
        return b.equals(Buffer.alloc(64 * 1024, 0xab));
      }));
      expect(reads.every(Boolean)).toBe(true);
    } finally {
      await client.close();
    }
  });

  test('base:allocation describes the layout exactly', async () => {
    const client = await NbdClient.connect(served.uri, { metaContexts: ['base:allocation'], require: ['base:allocation'] });
    try {
      const extents = [];
      for await (const e of client.blockStatus('base:allocation')) extents.push(e);
      // Contiguous, covering the whole export.
      let at = 0;
      for (const e of extents) {
        expect(e.offset).toBe(at);
        at += e.length;
      }
      expect(at).toBe(client.size);
      const data = extents.filter((e) => (e.flags & 2) === 0).map((e) => [e.offset, e.offset + e.length]);
      // qcow2 allocates 64 KiB clusters around each write.
      expect(data).toEqual([
        [0, 4 * MiB],
        [4095 * MiB, 4097 * MiB],
        [6143 * MiB, 6143 * MiB + 64 * 1024],
      ]);
    } finally {
      await client.close();
    }
  });

  test('base:allocation of a 12 TiB thin export, walked in many spans asked ahead: contiguous, exact, cut where asked', async () => {
    const TiB = 1024 * 1024 * MiB;
    const thin = join(dir, 'thin-12t.qcow2');
    await qcow2(thin, String(12 * TiB));
    // Data in the first span, across the 4 GiB - 1 MiB span boundary, and in the last span.
    const boundary = 4 * 1024 * MiB - MiB;
    await qemuIo(thin, ['write -P 0x11 0 64k', `write -P 0x22 ${boundary - 64 * 1024} 128k`, `write -P 0x33 ${7 * TiB} 64k`, `write -P 0x44 ${12 * TiB - 64 * 1024} 64k`]);
    const e = await serve(thin);
    const client = await NbdClient.connect(e.uri, { metaContexts: ['base:allocation'], require: ['base:allocation'] });
    try {
      for (const [from, to] of [
        [0, 12 * TiB],
        [32 * 1024 + 7, 12 * TiB - 1000],
      ] as const) {
        const extents = [];
        for await (const x of client.blockStatus('base:allocation', from, to - from)) extents.push(x);
        let at = from;
        for (const x of extents) {
          expect(x.offset).toBe(at);
          at += x.length;
        }
        expect(at).toBe(to);
        const data = extents.filter((x) => (x.flags & 2) === 0).map((x) => [x.offset, x.offset + x.length]);
        expect(data).toEqual([
          [from, 64 * 1024],
          [boundary - 64 * 1024, boundary + 64 * 1024],
          [7 * TiB, 7 * TiB + 64 * 1024],
          [12 * TiB - 64 * 1024, to],
        ]);
      }
    } finally {
      await client.close();
      await e.stop();
    }
  });

  test('dirty bitmap context: only the blocks written since the bitmap was added', async () => {
    const bitmapImage = join(dir, 'bitmap.qcow2');
    await qcow2(bitmapImage, '1G');
    await qemuIo(bitmapImage, ['write -P 0x01 0 8M']);
    await runQemuImgBitmap(bitmapImage, 'b0');
    await qemuIo(bitmapImage, ['write -P 0x02 1M 64k', 'write -P 0x03 500M 1']);
    const e = await serve(bitmapImage, { bitmap: 'b0' });
    const client = await NbdClient.connect(e.uri, { metaContexts: ['qemu:dirty-bitmap:b0'], require: ['qemu:dirty-bitmap:b0'] });
    try {
      const dirty = [];
      for await (const x of client.blockStatus('qemu:dirty-bitmap:b0')) if (x.flags & 1) dirty.push([x.offset, x.length]);
      expect(dirty).toEqual([
        [MiB, 64 * 1024],
        [500 * MiB, 64 * 1024],
      ]);
    } finally {
      await client.close();
      await e.stop();
    }
  });

  test('a missing metadata context is a clear connect error', async () => {
    await expect(NbdClient.connect(served.uri, { metaContexts: ['qemu:dirty-bitmap:nope'], require: ['qemu:dirty-bitmap:nope'] })).rejects.toMatchObject({
      code: 'ENGINE_NBD_CONNECT',
      message: expect.stringContaining('the export has no metadata context qemu:dirty-bitmap:nope'),
    });
  });

  test('an unknown export name is refused by the server, clearly', async () => {
    const uri = served.uri.replace('nbd+unix:///?', 'nbd+unix:///nope?');
    await expect(NbdClient.connect(uri)).rejects.toMatchObject({ code: 'ENGINE_NBD_CONNECT', message: expect.stringContaining('export "nope" refused') });
  });

  test('WRITE, WRITE_ZEROES, TRIM and FLUSH on a writable export', async () => {
    const target = join(dir, 'writable.qcow2');
    await qcow2(target, '64M');
    const e = await serve(target, { readOnly: false });
    const client = await NbdClient.connect(e.uri);
    const pattern = Buffer.alloc(3 * MiB + 512, 0x5a);
    await client.write(pattern, MiB);
    await client.writeZeroes(2 * MiB, 64 * 1024);
    await client.trim(10 * MiB, MiB);
    await client.flush();
    await client.close();
    await e.stop();
    const raw = join(dir, 'writable.raw');
    await runQemuImgConvert(target, raw);
    const bytes = await readFile(raw);
    const expected = Buffer.alloc(64 * MiB);
    pattern.copy(expected, MiB);
    expected.fill(0, 2 * MiB, 2 * MiB + 64 * 1024);
    expect(bytes.equals(expected)).toBe(true);
  });
});

describe('backups from NBD exports', () => {
  test('reads only allocated data, restores byte for byte (qemu-img compare), past 2^32', async () => {
    const image = join(dir, 'backup-src.qcow2');
    await qcow2(image, '6G');
    await qemuIo(image, ['write -P 0xab 0 4M', 'write -P 0xcd 100M 64k', 'write -P 0x77 4095M 2M', 'write -P 0x11 6143M 1']);
    const e = await serve(image);
    const repo = join(dir, 'repo');
    expect((await runEngine(['init', repo])).code).toBe(0);
    const result = await runEngine(['backup', '--repo', repo, '--source', e.uri, '--disk-name', 'vda', '--json']);
    expect(withoutProgress(result.stderr)).toBe('');
    const backup = parseJson<BackupJson>(result.stdout);
    const disk = backup.disks[0]!;
    expect(disk.size).toBe(6 * 1024 * MiB);
    // Whole blocks holding data, nothing else (base:allocation): 0–4 MiB is blocks 0–3, 100 MiB block 100,
    // 4095–4097 MiB blocks 4095 and 4096, 6143 MiB block 6143.
    expect(disk.bytesRead).toBe(8 * MiB);
    expect(disk.blocksNew).toBe(4); // 0xab ×4 are one chunk; 0xcd, 0x77 ×2 (one chunk), 0x11
    const restored = join(dir, 'restored.raw');
    expect((await runEngine(['restore', '--repo', repo, backup.id, '--to', restored])).code).toBe(0);
    expect(await qemuImgCompare(restored, 'raw', image, 'qcow2')).toBe(true);
    await e.stop();
  });

  test('the same image backed up as a file and over NBD deduplicates completely', async () => {
    const image = join(dir, 'same.qcow2');
    await qcow2(image, '64M');
    await qemuIo(image, ['write -P 0x42 0 16M', 'write -P 0x43 40M 3M']);
    const raw = join(dir, 'same.raw');
    await runQemuImgConvert(image, raw);
    const repo = join(dir, 'repo-same');
    await runEngine(['init', repo]);
    const fromFile = parseJson<BackupJson>((await runEngine(['backup', '--repo', repo, '--source', raw, '--json'])).stdout);
    const e = await serve(image);
    const fromNbd = parseJson<BackupJson>((await runEngine(['backup', '--repo', repo, '--source', e.uri, '--json'])).stdout);
    expect(fromNbd.disks[0]!.blocksNew).toBe(0);
    expect(fromNbd.disks[0]!.bytesRead).toBe(19 * MiB);
    // The converted file is sparse: its holes are skipped as the export's are.
    expect(fromFile.disks[0]!.bytesRead).toBe(19 * MiB);
    await e.stop();
  });
});

async function runQemuImgBitmap(image: string, name: string): Promise<void> {
  await sh('qemu-img', ['bitmap', '--add', '--enable', image, name]);
}

async function runQemuImgConvert(image: string, raw: string): Promise<void> {
  await sh('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, raw]);
}
