/**
 * `engine serve` against real clients (qemu-img, nbdcopy, nbdinfo, qemu-io, the engine's own NBD client),
 * on a sparse 5 GiB disk with data past 2^32 and a short last block; the lock released while serving; the
 * writable overlay never touching the repository; a damaged chunk failing only its own reads; and clients
 * that break the protocol.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { chmod, open, readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { NbdClient, serve, type ServeHandle } from '../dist/engine/index.js';
import { Overlay } from '../dist/engine/serve/overlay.js';
import { NbdServer } from '../dist/engine/nbd/server.js';
import { exitOf, filesIdentical, parseJson, readThroughOverlay, runEngine, sh, sha256File, spawnEngine, sparseFile, tempDir, writeRegion, type BackupJson, waitFor } from './helpers.js';
import { qemuImgCompare } from './qemu.js';
import { RawClient } from './nbd-raw-client.js';
import { encodeOptionHeader } from '../dist/engine/nbd/wire.js';

const MiB = 1024 * 1024;
const SIZE = 5 * 1024 * MiB + 12345;
let dir: string;
let cleanup: () => Promise<void>;
let repo: string;
let image: string;
let backupId: string;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-serve-'));
  repo = join(dir, 'repo');
  image = join(dir, 'disk.raw');
  await sparseFile(image, SIZE);
  await writeRegion(image, 0, 3 * MiB, 'random', 'a');
  await writeRegion(image, 4200 * MiB, 2 * MiB, 'random', 'b'); // past 2^32
  await writeRegion(image, 5 * 1024 * MiB, 12345, 'text'); // the short last block
  // Format 1: the server's registration in readers/ and the lock are checked (format 3: v3-readers).
  expect((await runEngine(['init', repo, '--format', '1'])).code).toBe(0);
  const backup = await runEngine(['backup', '--repo', repo, '--source', image, '--disk-name', 'os', '--json']);
  expect(backup.code).toBe(0);
  backupId = parseJson<BackupJson>(backup.stdout).id;
});
afterAll(async () => {
  await cleanup();
});

async function readerFiles(root = repo): Promise<string[]> {
  return (await readdir(join(root, 'readers')).catch(() => [] as string[])).filter((n) => n.endsWith('.json'));
}

async function packDigests(root: string): Promise<string[]> {
  const out: string[] = [];
  for (const sub of (await readdir(join(root, 'packs'))).sort()) {
    for (const name of (await readdir(join(root, 'packs', sub))).sort()) out.push(`${name}:${await sha256File(join(root, 'packs', sub, name))}`);
  }
  return out;
}

describe('read-only serve against real clients', () => {
  let handle: ServeHandle;
  let uri: string;
  const log: string[] = [];

  beforeAll(async () => {
    handle = await serve({ repo, backupId, socket: join(dir, 'ro.sock'), onLog: (m) => log.push(m) });
    uri = handle.exports[0]!.uri;
  });
  afterAll(async () => {
    await handle.close();
  });

  test('one export named after the disk, the reader registered, the lock free', async () => {
    expect(handle.exports.map((e) => [e.name, e.size])).toEqual([['os', SIZE]]);
    expect(await readerFiles()).toEqual([`${handle.readerToken}.json`]);
    // A backup runs while the server serves: serve does not hold the lock.
    const other = join(dir, 'other.raw');
    await sparseFile(other, 4 * MiB);
    await writeRegion(other, 0, MiB, 'text');
    const backup = await runEngine(['backup', '--repo', repo, '--source', other, '--json']);
    expect(backup.code).toBe(0);
  });

  test('qemu-img convert restores byte for byte, and qemu-img compare agrees', async () => {
    const out = join(dir, 'convert.raw');
    await sh('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, out]);
    // qemu's block layer rounds a size up to whole 512-byte sectors: the tail reads as zeros.
    expect((await stat(out)).size).toBe(Math.ceil(SIZE / 512) * 512);
    // Every byte of the disk, and zeros in the padding: qemu-img compare pads the image the same way and
    // skips the holes of both files (cmp -n would read 5 GiB of holes twice).
    expect(await qemuImgCompare(out, 'raw', image, 'raw')).toBe(true);
    expect(await qemuImgCompare(image, 'raw', uri, 'raw')).toBe(true);
  });

  test('nbdcopy copies the export exactly', async () => {
    const out = join(dir, 'nbdcopy.raw');
    await sparseFile(out, SIZE);
    await sh('nbdcopy', [uri, out]);
    expect(await filesIdentical(out, image)).toBe(true);
    await sh('nbdcopy', [uri, 'null:']);
  });

  test('nbdinfo --map shows holes exactly where the backup has zero blocks', async () => {
    const map = (await sh('nbdinfo', ['--map', uri])).trim().split('\n').map((line) => line.trim().split(/\s+/).slice(0, 3).map(Number));
    expect(map).toEqual([
      [0, 3 * MiB, 0],
      [3 * MiB, 4197 * MiB, 3],
      [4200 * MiB, 2 * MiB, 0],
      [4202 * MiB, 918 * MiB, 3],
      [5120 * MiB, 12345, 0],
    ]);
  });

  test('two clients at once: qemu-img compare and four multi-conn connections of the engine client', async () => {
    const client = await NbdClient.connect(uri);
    try {
      expect(client.connectionCount).toBe(4);
      const reads = (async () => {
        const expected = await open(image, 'r');
        try {
          for (const offset of [0, 4200 * MiB + 123, 5120 * MiB]) {
            const length = Math.min(2 * MiB, SIZE - offset);
            const got = Buffer.alloc(length);
            const want = Buffer.alloc(length);
            await client.read(got, offset);
            await expected.read(want, 0, length, offset);
            expect(got.equals(want)).toBe(true);
          }
        } finally {
          await expected.close();
        }
      })();
      const [compared] = await Promise.all([qemuImgCompare(image, 'raw', uri, 'raw'), reads]);
      expect(compared).toBe(true);
    } finally {
      await client.close();
    }
  });

  test('writes to the read-only export are refused', async () => {
    await expect(sh('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 4k', uri])).rejects.toThrow();
  });

  test('nothing was logged', () => {
    expect(log).toEqual([]);
  });
});

describe('serve --writable', () => {
  test('writes land in the overlay, read back merged, and never reach the repository', async () => {
    const before = await packDigests(repo);
    const backupsBefore = (await readdir(join(repo, 'backups'))).sort();
    const handle = await serve({ repo, backupId, socket: join(dir, 'rw.sock'), writable: true, overlayDir: dir });
    const uri = handle.exports[0]!.uri;
    try {
      // Unaligned, across a chunk boundary, in a zero block past 2^32, and zeroes over data.
      await sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 1048000 10000', '-c', `write -P 0x6b ${4300 * MiB + 7} 100`, '-c', 'write -z 2M 4096', uri]);
      const reread = await sh('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5a 1048000 10000', '-c', `read -P 0x6b ${4300 * MiB + 7} 100`, '-c', `read -P 0 ${4300 * MiB} 7`, '-c', 'read -P 0 2M 4096', uri]);
      expect(reread).not.toMatch(/Pattern verification failed/);
      // The bytes around the write are the backup's.
      const client = await NbdClient.connect(uri);
      const got = Buffer.alloc(1048000);
      await client.read(got, 0);
      await client.close();
      const want = Buffer.alloc(1048000);
      const file = await open(image, 'r');
      await file.read(want, 0, want.length, 0);
      await file.close();
      expect(got.equals(want)).toBe(true);
      expect(handle.stats().overlayBytesWritten).toBe(10000 + 100 + 4096);
    } finally {
      await handle.close();
    }
    expect(await packDigests(repo)).toEqual(before);
    expect((await readdir(join(repo, 'backups'))).sort()).toEqual(backupsBefore);
    expect((await readdir(dir)).filter((n) => n.startsWith('engine-overlay-'))).toEqual([]);
    // A new server serves the backup unchanged: the overlay was discarded.
    const again = await serve({ repo, backupId, socket: join(dir, 'ro2.sock') });
    try {
      expect(await qemuImgCompare(image, 'raw', again.exports[0]!.uri, 'raw')).toBe(true);
    } finally {
      await again.close();
    }
  });
});

describe('an encrypted repository', () => {
  test('engine serve --password-file serves the decrypted disk; without the passphrase it refuses', async () => {
    const encrypted = join(dir, 'repo-encrypted');
    const passwordFile = join(dir, 'passphrase');
    await writeFile(passwordFile, 'correct horse battery staple\n');
    expect((await runEngine(['init', encrypted, '--encrypt', '--password-file', passwordFile])).code).toBe(0);
    const small = join(dir, 'small.raw');
    await sparseFile(small, 64 * MiB + 4097);
    await writeRegion(small, MiB, 5 * MiB, 'text', 'enc');
    await writeRegion(small, 40 * MiB, 3 * MiB, 'random', 'enc');
    const backup = await runEngine(['backup', '--repo', encrypted, '--source', small, '--disk-name', 'os', '--json', '--password-file', passwordFile]);
    expect(backup.code).toBe(0);
    const id = parseJson<BackupJson>(backup.stdout).id;

    const refused = await runEngine(['serve', '--repo', encrypted, id, '--socket', join(dir, 'enc-refused.sock')], { env: { ENGINE_PASSWORD: '' } });
    expect(refused.code).toBe(6);
    expect(refused.stderr).toContain('is encrypted, and no passphrase was given: give its passphrase');

    const socket = join(dir, 'enc.sock');
    const child = spawnEngine(['serve', '--repo', encrypted, id, '--socket', socket, '--password-file', passwordFile]);
    try {
      await waitFor('serve listens', () => stat(socket).then(() => true, () => false), { child });
      const out = join(dir, 'enc-copy.raw');
      await sparseFile(out, 64 * MiB + 4097);
      await sh('nbdcopy', [`nbd+unix:///os?socket=${socket}`, out]);
      expect(await filesIdentical(out, small)).toBe(true);
    } finally {
      child.kill('SIGTERM');
      expect((await exitOf(child)).code).toBe(0);
    }
  });
});

describe('a damaged chunk', () => {
  let damaged: string;
  const failed: number[] = [];

  test('fails the reads that need it with EIO, is logged with backup, disk and offset, and the server keeps serving', async () => {
    damaged = join(dir, 'damaged');
    await sh('cp', ['-a', repo, damaged]);
    // The first data frame of the first data pack: flip a payload byte.
    let flipped = false;
    for (const sub of (await readdir(join(damaged, 'packs'))).sort()) {
      for (const name of await readdir(join(damaged, 'packs', sub))) {
        const path = join(damaged, 'packs', sub, name);
        const handle = await open(path, 'r');
        const header = Buffer.alloc(53);
        await handle.read(header, 0, 53, 32);
        await handle.close();
        if (flipped || header[4] !== 1 || (await stat(path)).size < MiB) continue;
        await chmod(path, 0o644);
        const w = await open(path, 'r+');
        const byte = Buffer.alloc(1);
        await w.read(byte, 0, 1, 32 + 48 + 100);
        byte[0] = byte[0]! ^ 0xff;
        await w.write(byte, 0, 1, 32 + 48 + 100);
        await w.close();
        flipped = true;
      }
    }
    expect(flipped).toBe(true);
    const log: string[] = [];
    const handle = await serve({ repo: damaged, backupId, socket: join(dir, 'bad.sock'), onLog: (m) => log.push(m) });
    const client = await NbdClient.connect(handle.exports[0]!.uri);
    try {
      const file = await open(image, 'r');
      for (const block of [0, 1, 2, 4200, 4201, 5120]) {
        const length = Math.min(MiB, SIZE - block * MiB);
        const got = Buffer.alloc(length);
        try {
          await client.read(got, block * MiB);
        } catch (error) {
          expect((error as { code?: string; details?: { errno?: string } }).details?.errno).toBe('EIO');
          failed.push(block);
          continue;
        }
        const want = Buffer.alloc(length);
        await file.read(want, 0, length, block * MiB);
        expect(got.equals(want)).toBe(true);
      }
      await file.close();
    } finally {
      await client.close();
      await handle.close();
    }
    expect(failed.length).toBe(1);
    expect(log.some((m) => m.includes(`backup ${backupId}, disk os, offset ${failed[0]! * MiB}`) && m.includes('EIO'))).toBe(true);
  });

  test('with --writable, a block the guest overwrote whole reads back without touching the damaged chunk', async () => {
    expect(failed.length).toBe(1);
    const offset = failed[0]! * MiB;
    const log: string[] = [];
    const handle = await serve({ repo: damaged, backupId, socket: join(dir, 'bad-rw.sock'), writable: true, overlayDir: dir, onLog: (m) => log.push(m) });
    try {
      const client = await NbdClient.connect(handle.exports[0]!.uri);
      try {
        await client.write(Buffer.alloc(MiB, 0x33), offset);
        const got = Buffer.alloc(MiB);
        await client.read(got, offset);
        expect(got.equals(Buffer.alloc(MiB, 0x33))).toBe(true);
        await client.writeZeroes(offset, 4096);
        await client.trim(offset + 8192, 4096);
        await client.read(got.subarray(0, 16384), offset);
        expect(got.subarray(0, 4096).equals(Buffer.alloc(4096))).toBe(true);
        expect(got.subarray(4096, 8192).equals(Buffer.alloc(4096, 0x33))).toBe(true);
        expect(got.subarray(8192, 12288).equals(Buffer.alloc(4096))).toBe(true);
      } finally {
        await client.close();
      }
      expect(handle.stats().badChunks).toBe(0);
      expect(log).toEqual([]);
    } finally {
      await handle.close();
    }
  });
});

describe('the copy-on-write overlay', () => {
  test('WRITE_ZEROES/TRIM of whole granules store nothing; partial granules, data past 2^32 and the short last granule read back exact', async () => {
    const size = 6 * 1024 * MiB + 1000;
    const overlay = await Overlay.create(size, MiB, dir);
    const BASE = 0xab;
    // The export's content: a backup of 0xab bytes with the overlay merged over it.
    const current = (offset: number, length: number): Promise<Buffer> => readThroughOverlay(overlay, MiB, offset, Buffer.alloc(length, BASE));
    const expectBytes = async (offset: number, length: number, value: number): Promise<void> => {
      expect((await current(offset, length)).equals(Buffer.alloc(length, value))).toBe(true);
    };
    try {
      const at = 2 ** 32 + 100;
      await overlay.write(Buffer.alloc(3 * MiB, 0x11), at, current);
      const zeroFrom = 2 ** 32 + 1000;
      const zeroLength = 256 * MiB + 5000;
      await overlay.zero(zeroFrom, zeroLength, current);
      // Only the two partial granules at the ends of the zeroed range were written besides the data.
      expect(await overlay.allocatedBytes()).toBeLessThan(3 * MiB + 64 * 1024);
      await expectBytes(2 ** 32, 100, BASE);
      await expectBytes(at, zeroFrom - at, 0x11);
      await expectBytes(zeroFrom, 8 * MiB, 0);
      await expectBytes(zeroFrom + zeroLength - 8 * MiB, 8 * MiB, 0);
      await expectBytes(zeroFrom + zeroLength, 4096, BASE);
      const middle = Math.floor((zeroFrom + MiB) / MiB);
      expect(overlay.covers(middle, 0, MiB)).toBe(true);
      expect(overlay.covers(middle + 1000, 0, MiB)).toBe(false);
      // Data written into a zeroed range, unaligned: its neighbours stay zero.
      await overlay.write(Buffer.alloc(10, 0x22), zeroFrom + 5 * MiB + 7, current);
      await expectBytes(zeroFrom + 5 * MiB, 7, 0);
      await expectBytes(zeroFrom + 5 * MiB + 7, 10, 0x22);
      await expectBytes(zeroFrom + 5 * MiB + 17, 4096, 0);
      // The disk's last granule is 1000 bytes: zeroed whole, then written in part.
      await overlay.zero(size - 1000, 1000, current);
      await expectBytes(size - 1000, 1000, 0);
      await overlay.write(Buffer.alloc(10, 0x44), size - 500, current);
      await expectBytes(size - 1000, 500, 0);
      await expectBytes(size - 500, 10, 0x44);
      await expectBytes(size - 490, 490, 0);
      expect(overlay.bytesWritten).toBe(3 * MiB + zeroLength + 10 + 1000 + 10);
    } finally {
      await overlay.close();
    }
  });
});

/** The data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT. */
function metaContextOption(exportName: string, queries: string[]): Buffer {
  const field = (text: string): Buffer => {
    const bytes = Buffer.from(text, 'utf8');
    const out = Buffer.alloc(4 + bytes.length);
    out.writeUInt32BE(bytes.length, 0);
    bytes.copy(out, 4);
    return out;
  };
  const count = Buffer.alloc(4);
  count.writeUInt32BE(queries.length, 0);
  return Buffer.concat([field(exportName), count, ...queries.map(field)]);
}

describe('misbehaving clients', () => {
  let handle: ServeHandle;
  let socketPath: string;

  beforeAll(async () => {
    socketPath = join(dir, 'bad-clients.sock');
    handle = await serve({ repo, backupId, socket: socketPath });
  });
  afterAll(async () => {
    await handle.close();
  });

  test('unknown client flags: the server hangs up', async () => {
    const client = await RawClient.open(socketPath, 0x80);
    expect(await client.closed()).toBe(true);
  });

  test('a bad option magic: the server hangs up', async () => {
    const client = await RawClient.open(socketPath);
    client.socket.write(Buffer.alloc(16, 0x41));
    expect(await client.closed()).toBe(true);
  });

  test('unknown options, unknown exports and malformed options get error replies; the negotiation goes on', async () => {
    const client = await RawClient.open(socketPath);
    client.option(99, Buffer.from('whatever'));
    expect((await client.optionReply()).type).toBe(2 ** 31 + 1); // NBD_REP_ERR_UNSUP
    client.option(3, Buffer.from('x'));
    expect((await client.optionReply()).type).toBe(2 ** 31 + 3); // LIST with data: NBD_REP_ERR_INVALID
    const name = Buffer.from('nope');
    const go = Buffer.alloc(4 + name.length + 2);
    go.writeUInt32BE(name.length, 0);
    name.copy(go, 4);
    client.option(7, go);
    expect((await client.optionReply()).type).toBe(2 ** 31 + 6); // NBD_REP_ERR_UNKNOWN
    const lying = Buffer.alloc(6);
    lying.writeUInt32BE(4000, 0); // a name length past the option's end
    client.option(7, lying);
    expect((await client.optionReply()).type).toBe(2 ** 31 + 3);
    client.option(3);
    const listed = await client.optionReply();
    expect(listed.type).toBe(2); // NBD_REP_SERVER
    expect(listed.data.toString('utf8', 4, 4 + listed.data.readUInt32BE(0))).toBe('os');
    expect((await client.optionReply()).type).toBe(1);
    client.option(2);
    expect((await client.optionReply()).type).toBe(1); // ABORT is acknowledged
    client.close();
  });

  test('an option longer than the server accepts: NBD_REP_ERR_TOO_BIG, then a hang-up', async () => {
    const client = await RawClient.open(socketPath);
    client.socket.write(encodeOptionHeader({ option: 7, length: 0x7fffffff }));
    expect((await client.optionReply()).type).toBe(2 ** 31 + 9);
    expect(await client.closed()).toBe(true);
  });

  test('oversized and out-of-range requests get EINVAL/ENOSPC/EPERM and the connection stays usable', async () => {
    const client = await RawClient.open(socketPath);
    await client.go('os');
    client.request(0, 0, 64 * MiB); // more than the 32 MiB maximum
    expect(await client.structuredResult()).toBe(22);
    client.request(0, SIZE - 10, 4096); // past the end
    expect(await client.structuredResult()).toBe(22);
    client.request(0, 2 ** 52, 1); // far past the end
    expect(await client.structuredResult()).toBe(22);
    client.request(1, 0, 4096, Buffer.alloc(4096)); // write to a read-only export
    expect(await client.structuredResult()).toBe(1);
    client.request(42, 0, 0); // unknown command
    expect(await client.structuredResult()).toBe(22);
    client.request(0, 0, 4096, undefined, 0x40); // unknown flag
    expect(await client.structuredResult()).toBe(22);
    client.request(7, 0, 4096); // block status without a negotiated context
    expect(await client.structuredResult()).toBe(22);
    client.request(0, 4200 * MiB, 4096); // and a good read still works
    expect(await client.structuredResult()).toBe(0);
    client.close();
  });

  test('without structured replies, errors are simple replies without payload', async () => {
    const client = await RawClient.open(socketPath);
    await client.go('', false); // the empty name is the first disk
    client.request(0, SIZE, 1);
    expect(await client.simpleResult()).toBe(22);
    client.request(0, 0, 16);
    expect(await client.simpleResult()).toBe(0);
    expect((await client.reader.read(16)).length).toBe(16);
    client.close();
  });

  test('a bad request magic, or a WRITE longer than the maximum: the server hangs up', async () => {
    const bad = await RawClient.open(socketPath);
    await bad.go('os');
    bad.socket.write(Buffer.alloc(28, 0x11));
    expect(await bad.closed()).toBe(true);
    const huge = await RawClient.open(socketPath);
    await huge.go('os');
    huge.request(1, 0, 0x7fffffff);
    expect(await huge.closed()).toBe(true);
  });

  test('metadata contexts: "base:" lists base:allocation and selects nothing; a failed SET_META_CONTEXT deselects', async () => {
    const client = await RawClient.open(socketPath);
    client.option(8);
    expect((await client.optionReply()).type).toBe(1);
    client.option(9, metaContextOption('os', ['base:']));
    const listed = await client.optionReply();
    expect(listed.type).toBe(4); // NBD_REP_META_CONTEXT
    expect([listed.data.readUInt32BE(0), listed.data.toString('utf8', 4)]).toEqual([0, 'base:allocation']);
    expect((await client.optionReply()).type).toBe(1);
    client.option(10, metaContextOption('os', ['base:', 'x-other:thing']));
    expect((await client.optionReply()).type).toBe(1); // nothing selected, straight to ACK
    client.option(10, metaContextOption('os', ['base:allocation']));
    expect((await client.optionReply()).type).toBe(4);
    expect((await client.optionReply()).type).toBe(1);
    // A malformed SET_META_CONTEXT fails, and replaces the selection all the same.
    client.option(10, metaContextOption('os', ['base:allocation']).subarray(0, 12));
    expect((await client.optionReply()).type).toBe(2 ** 31 + 3);
    await client.go('os', false);
    client.request(7, 0, 4096);
    expect(await client.structuredResult()).toBe(22);
    client.close();
  });

  test('a writable export: TRIM past the end is EINVAL, WRITE_ZEROES past the end ENOSPC', async () => {
    const rwSocket = join(dir, 'rw-raw.sock');
    const rw = await serve({ repo, backupId, socket: rwSocket, writable: true, overlayDir: dir });
    try {
      const client = await RawClient.open(rwSocket);
      await client.go('os');
      client.request(4, SIZE - 10, 4096);
      expect(await client.structuredResult()).toBe(22);
      client.request(6, SIZE - 10, 4096);
      expect(await client.structuredResult()).toBe(28);
      client.request(4, SIZE - 4096, 4096);
      expect(await client.simpleResult()).toBe(0);
      client.close();
    } finally {
      await rw.close();
    }
  });

  test('the server still serves a well-behaved client', async () => {
    expect(await qemuImgCompare(image, 'raw', handle.exports[0]!.uri, 'raw')).toBe(true);
  });
});

describe('a client that pipelines big reads and never reads the replies', () => {
  test('the server builds at most 64 MiB of replies at once per connection, and answers every request in the end', async () => {
    const started: number[] = [];
    const releases: (() => void)[] = [];
    const exportSize = 1024 * MiB;
    const server = new NbdServer({
      exports: [
        {
          name: 'held',
          description: 'reads wait for the test',
          size: exportSize,
          writable: false,
          read: async (offset: number, length: number) => {
            started.push(offset);
            await new Promise<void>((resolve) => releases.push(resolve));
            return [{ offset, length, zero: true as const }];
          },
          allocation: async (_offset: number, length: number) => [{ length, flags: 0 }],
        },
      ],
    });
    const socketPath = join(dir, 'held.sock');
    await server.listen({ socket: socketPath });
    const until = async (check: () => boolean): Promise<void> => {
      while (!check()) await new Promise((resolve) => setTimeout(resolve, 10));
    };
    try {
      const client = await RawClient.open(socketPath);
      await client.go('held');
      for (let i = 0; i < 16; i += 1) client.request(0, i * 32 * MiB, 32 * MiB);
      await until(() => started.length >= 2);
      // Two reads of 32 MiB fill the connection's budget: the others wait, unread, in the socket.
      expect(started.length).toBe(2);
      releases.shift()!();
      await until(() => started.length >= 3);
      expect(started.length).toBe(3);
      // Let everything through; every request is answered.
      const answered = (async () => {
        for (let i = 0; i < 16; i += 1) expect(await client.structuredResult()).toBe(0);
      })();
      while (started.length < 16 || releases.length > 0) {
        releases.shift()?.();
        await new Promise((resolve) => setTimeout(resolve, 1));
      }
      await answered;
      expect(started.sort((a, b) => a - b)).toEqual(Array.from({ length: 16 }, (_, i) => i * 32 * MiB));
      client.close();
    } finally {
      for (const release of releases) release();
      await server.close();
    }
  });
});

describe('engine serve (CLI)', () => {
  test('prints its exports as JSON, serves until SIGTERM, then removes its registration and exits 0', async () => {
    const socket = join(dir, 'cli.sock');
    const child = spawnEngine(['serve', '--repo', repo, backupId.slice(0, 8), '--socket', socket, '--json']);
    let stdout = '';
    child.stdout!.on('data', (chunk: Buffer) => {
      stdout += chunk.toString();
    });
    await waitFor('serve is ready', () => stdout.trim().endsWith('}'), { child, everyMs: 50 });
    const ready = parseJson<{ backup: string; exports: { name: string; uri: string }[]; readerToken: string; pid: number }>(stdout);
    expect(ready.backup).toBe(backupId);
    expect(ready.exports[0]!.uri).toBe(`nbd+unix:///os?socket=${socket}`);
    expect(await readerFiles()).toContain(`${ready.readerToken}.json`);
    const info = await sh('nbdinfo', ['--size', ready.exports[0]!.uri]);
    expect(Number(info.trim())).toBe(SIZE);
    child.kill('SIGTERM');
    expect((await exitOf(child)).code).toBe(0);
    expect(await readerFiles()).not.toContain(`${ready.readerToken}.json`);
    await expect(stat(socket)).rejects.toThrow();
  });
});
