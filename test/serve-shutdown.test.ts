/**
 * `engine serve` stops cleanly (issue 11, item 12; the NBD protocol, "Terminating the transmission phase":
 * a server shutting down SHOULD service the requests in flight and error the rest with NBD_ESHUTDOWN). With
 * 64 reads of 1 MiB in flight on one connection, every request gets its reply: its exact bytes if the
 * server had accepted it, NBD_ESHUTDOWN if it arrived once the shutdown began. Nothing is lost in a write
 * buffer or a reset.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { NbdClient, NbdServer, type NbdExport } from '../dist/engine/index.js';
import { exitOf, parseJson, runEngine, spawnEngine, tempDir, writeRegion, type BackupJson, waitFor } from './helpers.js';

const MiB = 1024 * 1024;
const REQUESTS = 64;
let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-serve-shutdown-'));
});
afterAll(async () => {
  await cleanup();
});

/** The byte at `offset` of the test export: a pattern a misplaced or short reply cannot match. */
function pattern(offset: number, length: number): Buffer {
  const out = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i += 1) out[i] = ((offset + i) * 31 + Math.floor((offset + i) / 4096)) % 251;
  return out;
}

type Outcome = { data: true } | { errno: string } | { other: string };

/** Sorts each settled read: its exact bytes, an NBD error (by name), or anything else (a failure of the test). */
function outcomes(results: PromiseSettledResult<void>[], buffers: Buffer[], expected: (i: number) => Buffer): Outcome[] {
  return results.map((result, i) => {
    if (result.status === 'fulfilled') return buffers[i]!.equals(expected(i)) ? { data: true } : { other: 'wrong bytes' };
    const error = result.reason as { code?: string; details?: { errno?: string }; message: string };
    if (error.code === 'ENGINE_NBD_COMMAND' && error.details?.errno) return { errno: error.details.errno };
    return { other: `${error.code ?? ''} ${error.message}` };
  });
}

describe('NbdServer.close() with requests in flight', () => {
  test('the 16 accepted reads are answered with their bytes, the 48 others with ESHUTDOWN, then the connection closes', async () => {
    const releases: (() => void)[] = [];
    let released = false;
    const slow: NbdExport = {
      name: 'slow',
      description: 'reads wait until the test releases them',
      size: REQUESTS * MiB,
      writable: false,
      read: async (offset, length) => {
        if (!released) await new Promise<void>((resolve) => releases.push(resolve));
        return [{ offset, data: pattern(offset, length) }];
      },
      allocation: async (_offset, length) => [{ length, flags: 0 }],
    };
    const socket = join(dir, 'slow.sock');
    const server = new NbdServer({ exports: [slow] });
    await server.listen({ socket });
    const client = await NbdClient.connect(`nbd+unix:///slow?socket=${socket}`, { connections: 1, requestSize: MiB });
    const buffers = Array.from({ length: REQUESTS }, () => Buffer.alloc(MiB));
    const reads = Promise.allSettled(buffers.map((buffer, i) => client.read(buffer, i * MiB)));
    // The server accepts 16 requests per connection at once; they now wait in the export.
    await waitFor('16 requests wait in the export', () => releases.length >= 16, { everyMs: 10 });
    await new Promise((r) => setTimeout(r, 100));
    expect(releases).toHaveLength(16);

    const closing = server.close();
    // The listener goes first: no new client can connect while the old ones finish.
    for (let i = 0; i < 100 && (await stat(socket).then(() => true, () => false)); i += 1) await new Promise((r) => setTimeout(r, 10));
    await expect(NbdClient.connect(`nbd+unix:///slow?socket=${socket}`)).rejects.toMatchObject({ code: 'ENGINE_NBD_CONNECT' });
    released = true;
    for (const release of releases.splice(0)) release();
    const results = outcomes(await reads, buffers, (i) => pattern(i * MiB, MiB));
    await closing;
    expect(results.filter((r) => 'other' in r)).toEqual([]);
    expect(results.slice(0, 16)).toEqual(Array.from({ length: 16 }, () => ({ data: true })));
    expect(results.slice(16)).toEqual(Array.from({ length: REQUESTS - 16 }, () => ({ errno: 'ESHUTDOWN' })));
    expect(server.connectionCount).toBe(0);
    await client.close();
  });
});

describe('engine serve on SIGTERM', () => {
  test('64 reads of 1 MiB in flight: every one answered, with its exact bytes or ESHUTDOWN; exit 0, socket and registration gone', async () => {
    const repo = join(dir, 'repo');
    const image = join(dir, 'disk.raw');
    await writeRegion(image, 0, REQUESTS * MiB, 'random', 'shutdown');
    // Version 1: the registration checked below is versions 1 and 2's (readers/); version 3's lease on SIGTERM is test/v3-readers.
    expect((await runEngine(['init', '--format', '1', repo])).code).toBe(0);
    const backup = await runEngine(['backup', '--repo', repo, '--source', image, '--disk-name', 'os', '--json']);
    expect(backup.code).toBe(0);
    const id = parseJson<BackupJson>(backup.stdout).id;
    const socket = join(dir, 'cli.sock');
    const child = spawnEngine(['serve', '--repo', repo, id, '--socket', socket, '--json']);
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (c: Buffer) => (stdout += c.toString()));
    child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
    await waitFor('serve is ready', () => stdout.trim().endsWith('}'), { child, output: () => stderr });
    const ready = parseJson<{ exports: { uri: string }[]; readerToken: string }>(stdout);

    const expected = await readFile(image);
    const client = await NbdClient.connect(ready.exports[0]!.uri, { connections: 1, requestSize: MiB });
    const buffers = Array.from({ length: REQUESTS }, () => Buffer.alloc(MiB));
    const settled = buffers.map((buffer, i) => client.read(buffer, i * MiB));
    // SIGTERM once the first reply is in: the server then holds accepted requests and unread ones.
    await settled[0];
    child.kill('SIGTERM');
    const results = outcomes(await Promise.allSettled(settled), buffers, (i) => expected.subarray(i * MiB, (i + 1) * MiB));
    expect((await exitOf(child)).code).toBe(0);
    expect(results.filter((r) => 'other' in r)).toEqual([]);
    expect(results.length).toBe(REQUESTS);
    const answered = results.filter((r) => 'data' in r).length;
    const refused = results.filter((r) => 'errno' in r && r.errno === 'ESHUTDOWN').length;
    expect(answered + refused).toBe(REQUESTS);
    expect(answered).toBeGreaterThan(1);
    expect(stderr).toBe('');
    await expect(stat(socket)).rejects.toThrow();
    await expect(stat(join(repo, 'readers', `${ready.readerToken}.json`))).rejects.toThrow();
    await client.close();
  });
});
