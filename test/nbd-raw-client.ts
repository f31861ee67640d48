/** A raw NBD client for the server's tests: it sends exactly what a test says (to misbehave on purpose, or to set flags such as FUA). */
import { expect } from 'vitest';
import { connect, type Socket } from 'node:net';
import { SocketReader } from '../dist/engine/nbd/socket-reader.js';
import { encodeOptionHeader, encodeRequest } from '../dist/engine/nbd/wire.js';

export class RawClient {
  readonly reader: SocketReader;
  private constructor(readonly socket: Socket) {
    this.reader = new SocketReader(socket, () => new Error('closed'));
  }

  static async open(path: string, clientFlags = 1): Promise<RawClient> {
    const socket = connect(path);
    socket.on('error', () => undefined);
    const client = new RawClient(socket);
    const greeting = await client.reader.read(18);
    expect(greeting.readBigUInt64BE(0)).toBe(0x4e42444d41474943n);
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(clientFlags, 0);
    socket.write(flags);
    return client;
  }

  option(option: number, data: Buffer = Buffer.alloc(0)): void {
    this.socket.write(Buffer.concat([encodeOptionHeader({ option, length: data.length }), data]));
  }

  async optionReply(): Promise<{ type: number; data: Buffer }> {
    const header = Buffer.from(await this.reader.read(20));
    const length = header.readUInt32BE(16);
    return { type: header.readUInt32BE(12), data: Buffer.from(await this.reader.read(length)) };
  }

  async go(name: string, structured = true): Promise<void> {
    if (structured) {
      this.option(8);
      expect((await this.optionReply()).type).toBe(1);
    }
    const nameBytes = Buffer.from(name);
    const data = Buffer.alloc(4 + nameBytes.length + 2);
    data.writeUInt32BE(nameBytes.length, 0);
    nameBytes.copy(data, 4);
    this.option(7, data);
    for (;;) {
      const reply = await this.optionReply();
      if (reply.type === 1) return;
      expect(reply.type).toBe(3);
    }
  }

  request(type: number, offset: number, length: number, payload?: Buffer, flags = 0, cookie = 7n): void {
    this.socket.write(Buffer.concat([encodeRequest({ flags, type, cookie, offset, length }), payload ?? Buffer.alloc(0)]));
  }

  /** The errno of a structured error reply, or 0 after a successful read's chunks. */
  async structuredResult(): Promise<number> {
    for (;;) {
      const header = Buffer.from(await this.reader.read(20));
      expect(header.readUInt32BE(0)).toBe(0x668e33ef);
      const flags = header.readUInt16BE(4);
      const type = header.readUInt16BE(6);
      const payload = Buffer.from(await this.reader.read(header.readUInt32BE(16)));
      if (type >= 0x8000) return payload.readUInt32BE(0);
      if ((flags & 1) !== 0) return 0;
    }
  }

  async simpleResult(): Promise<number> {
    const reply = Buffer.from(await this.reader.read(16));
    expect(reply.readUInt32BE(0)).toBe(0x67446698);
    return reply.readUInt32BE(4);
  }

  closed(): Promise<boolean> {
    return new Promise((resolve) => {
      if (this.socket.destroyed || this.socket.readableEnded) resolve(true);
      this.socket.once('close', () => resolve(true));
      setTimeout(() => resolve(false), 10_000);
    });
  }

  close(): void {
    this.socket.destroy();
  }
}
