/**
 * A small fake NBD server that misbehaves on purpose: every malformed, short or unexpected reply must end
 * in a clear error, never a hang and never a silently wrong read.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { NbdClient } from '../dist/engine/nbd/client.js';
import { runEngine, tempDir } from './helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
const servers: Server[] = [];

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-nbd-fake-'));
});
afterAll(async () => {
  for (const s of servers) s.close();
  await cleanup();
});

const SIZE = 1024 * 1024;

function u64(value: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(value);
  return b;
}

function optionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(20);
  h.writeBigUInt64BE(0x0003e889045565a9n, 0);
  h.writeUInt32BE(option, 8);
  h.writeUInt32BE(type, 12);
  h.writeUInt32BE(data.length, 16);
  return Buffer.concat([h, data]);
}

/** Reads exactly n bytes from a socket (test side). */
function reader(socket: Socket): (n: number) => Promise<Buffer> {
  let buffered = Buffer.alloc(0);
  let wake: (() => void) | undefined;
  socket.on('data', (chunk: Buffer) => {
    buffered = Buffer.concat([buffered, chunk]);
    wake?.();
  });
  return async (n) => {
    while (buffered.length < n) await new Promise<void>((r) => (wake = r));
    const out = buffered.subarray(0, n);
    buffered = buffered.subarray(n);
    return out;
  };
}

interface Request {
  type: number;
  cookie: Buffer;
  offset: number;
  length: number;
}

/**
 * A server that negotiates correctly (structured replies refused, so simple replies) and then answers
 * each request with `reply`, which may misbehave.
 */
async function fakeServer(name: string, options: { greeting?: Buffer; structured?: boolean; tcp?: boolean; reply?: (socket: Socket, request: Request) => void }): Promise<string> {
  const path = join(dir, `${name}.sock`);
  const server = createServer((socket) => {
    void (async () => {
      const read = reader(socket);
      socket.on('error', () => undefined);
      if (options.greeting) {
        socket.write(options.greeting);
        return;
      }
      socket.write(Buffer.concat([Buffer.from('NBDMAGIC'), Buffer.from('IHAVEOPT'), Buffer.from([0, 3])]));
      await read(4);
      for (;;) {
        const header = await read(16);
        const option = header.readUInt32BE(8);
        const data = await read(header.readUInt32BE(12));
        void data;
        if (option === 7) {
          const info = Buffer.alloc(12);
          info.writeUInt16BE(0, 0);
          u64(BigInt(SIZE)).copy(info, 2);
          info.writeUInt16BE(1, 10);
          socket.write(Buffer.concat([optionReply(7, 3, info), optionReply(7, 1)]));
          break;
        }
        if (option === 8 && options.structured) socket.write(optionReply(option, 1));
        else socket.write(optionReply(option, 2 ** 31 + 1)); // NBD_REP_ERR_UNSUP
      }
      for (;;) {
        const r = await read(28);
        const request: Request = { type: r.readUInt16BE(6), cookie: r.subarray(8, 16), offset: Number(r.readBigUInt64BE(16)), length: r.readUInt32BE(24) };
        if (request.type === 2) return socket.end();
        options.reply?.(socket, request);
      }
    })().catch(() => socket.destroy());
  });
  servers.push(server);
  if (options.tcp) {
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return `nbd://127.0.0.1:${(server.address() as AddressInfo).port}/`;
  }
  await new Promise<void>((resolve) => server.listen(path, resolve));
  return `nbd+unix:///?socket=${path}`;
}

function simpleReply(request: Request, error = 0, magic = 0x67446698): Buffer {
  const h = Buffer.alloc(16);
  h.writeUInt32BE(magic, 0);
  h.writeUInt32BE(error, 4);
  request.cookie.copy(h, 8);
  return h;
}

function dataChunk(request: Request, offset: number, data: Buffer, done: boolean): Buffer {
  const h = Buffer.alloc(20);
  h.writeUInt32BE(0x668e33ef, 0);
  h.writeUInt16BE(done ? 1 : 0, 4);
  h.writeUInt16BE(1, 6); // NBD_REPLY_TYPE_OFFSET_DATA
  request.cookie.copy(h, 8);
  h.writeUInt32BE(8 + data.length, 16);
  return Buffer.concat([h, u64(BigInt(offset)), data]);
}

describe('a misbehaving NBD server', () => {
  test('structured reply: a data chunk outside the requested range', async () => {
    const uri = await fakeServer('outside', { structured: true, reply: (s, r) => s.write(dataChunk(r, r.offset + r.length, Buffer.alloc(16), true)) });
    const client = await NbdClient.connect(uri, { timeoutMs: 2000 });
    await expect(client.read(Buffer.alloc(4096), 0)).rejects.toMatchObject({ code: 'ENGINE_NBD_PROTOCOL', message: expect.stringContaining('lies outside the request') });
    await client.close();
  });

  test('structured reply: DONE before the read was covered (no silently short read)', async () => {
    const uri = await fakeServer('partial', { structured: true, reply: (s, r) => s.write(dataChunk(r, r.offset, Buffer.alloc(r.length / 2, 3), true)) });
    const client = await NbdClient.connect(uri, { timeoutMs: 2000 });
    await expect(client.read(Buffer.alloc(4096), 0)).rejects.toMatchObject({ code: 'ENGINE_NBD_PROTOCOL', message: expect.stringContaining('covered 2048 of 4096 bytes') });
    await client.close();
  });

  test('a well-behaved fake works (control)', async () => {
    const uri = await fakeServer('good', { reply: (s, r) => s.write(Buffer.concat([simpleReply(r), Buffer.alloc(r.length, 7)])) });
    const client = await NbdClient.connect(uri, { timeoutMs: 2000 });
    const b = Buffer.alloc(4096);
    await client.read(b, 0);
    expect(b.equals(Buffer.alloc(4096, 7))).toBe(true);
    await client.close();
  });

  test('not an NBD server', async () => {
    const uri = await fakeServer('http', { greeting: Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n') });
    await expect(NbdClient.connect(uri, { timeoutMs: 2000 })).rejects.toMatchObject({ code: 'ENGINE_NBD_CONNECT', message: expect.stringContaining('not an NBD server') });
  });

  test('a greeting cut short, then silence: a timeout, not a hang', async () => {
    const uri = await fakeServer('silent', { greeting: Buffer.from('NBDMAG') });
    await expect(NbdClient.connect(uri, { timeoutMs: 300 })).rejects.toMatchObject({ code: 'ENGINE_TIMEOUT' });
  });

  test('garbage instead of a reply', async () => {
    const uri = await fakeServer('garbage', { reply: (s) => s.write(Buffer.alloc(64, 0x41)) });
    const client = await NbdClient.connect(uri, { timeoutMs: 2000 });
    await expect(client.read(Buffer.alloc(4096), 0)).rejects.toMatchObject({ code: 'ENGINE_NBD_PROTOCOL', message: expect.stringContaining('bad reply magic 0x41414141') });
    await client.close();
  });

  test('a short reply and a disconnect', async () => {
    const uri = await fakeServer('short', {
      reply: (s, r) => {
        s.write(Buffer.concat([simpleReply(r), Buffer.alloc(100, 1)]));
        s.destroy();
      },
    });
    const client = await NbdClient.connect(uri, { timeoutMs: 2000 });
    await expect(client.read(Buffer.alloc(4096), 0)).rejects.toMatchObject({ code: 'ENGINE_NBD_PROTOCOL', message: expect.stringContaining('closed the connection') });
    await client.close();
  });

  test('a connection reset mid-request: one error naming the URI (library and CLI), never a bare "read ECONNRESET"', async () => {
    const uri = await fakeServer('reset', { tcp: true, reply: (s) => s.resetAndDestroy() });
    const client = await NbdClient.connect(uri, { timeoutMs: 2000 });
    await expect(client.read(Buffer.alloc(4096), 0)).rejects.toMatchObject({ code: 'ENGINE_NBD_PROTOCOL', message: `NBD ${uri}: protocol error: the connection was lost (ECONNRESET)` });
    await client.close();
    const repo = join(dir, 'reset-repo');
    expect((await runEngine(['init', repo])).code).toBe(0);
    const backup = await runEngine(['backup', '--repo', repo, '--source', uri, '--disk-name', 'd']);
    expect(backup.code).toBe(1);
    expect(backup.stderr).toMatch(new RegExp(`^engine: .*NBD ${uri.replace(/[.]/g, '\\.')}: protocol error: the connection was lost \\(ECONNRESET\\)\n$`));
  });

  test('a reply for a request that was never sent', async () => {
    const uri = await fakeServer('cookie', {
      reply: (s, r) => {
        const wrong = { ...r, cookie: Buffer.from([9, 9, 9, 9, 9, 9, 9, 9]) };
        s.write(Buffer.concat([simpleReply(wrong), Buffer.alloc(r.length)]));
      },
    });
    const client = await NbdClient.connect(uri, { timeoutMs: 2000 });
    await expect(client.read(Buffer.alloc(4096), 0)).rejects.toMatchObject({ code: 'ENGINE_NBD_PROTOCOL', message: expect.stringContaining('unknown cookie') });
    await client.close();
  });

  test('an error reply names the command, range and errno', async () => {
    const uri = await fakeServer('eio', { reply: (s, r) => s.write(simpleReply(r, 5)) });
    const client = await NbdClient.connect(uri, { timeoutMs: 2000 });
    await expect(client.read(Buffer.alloc(4096), 8192)).rejects.toMatchObject({
      code: 'ENGINE_NBD_COMMAND',
      message: expect.stringContaining('READ of 4096 bytes at offset 8192 failed: EIO'),
    });
    await client.close();
  });

  test('no reply at all: the request times out', async () => {
    const uri = await fakeServer('mute', {});
    const client = await NbdClient.connect(uri, { timeoutMs: 300 });
    await expect(client.read(Buffer.alloc(4096), 0)).rejects.toMatchObject({ code: 'ENGINE_TIMEOUT' });
    await client.close();
  });
});
