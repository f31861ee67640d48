/** The fixed NBD messages: every encode/decode pair round-trips, and decoders name what is wrong. */
import { describe, expect, test } from 'vitest';
import {
  decodeChunkHeader,
  decodeOptionHeader,
  decodeOptionReplyHeader,
  decodeRequest,
  decodeSimpleReply,
  encodeChunkHeader,
  encodeOptionHeader,
  encodeOptionReply,
  encodeRequest,
  encodeSimpleReply,
} from '../dist/engine/nbd/wire.js';

describe('NBD wire messages', () => {
  test('request round-trips, offsets past 2^32 included', () => {
    const request = { flags: 2, type: 6, cookie: 0xfedcba9876543210n, offset: 2 ** 32 + 4096 * 3, length: 0xffffffff };
    const bytes = encodeRequest(request);
    expect(bytes.length).toBe(28);
    expect(bytes.subarray(0, 4).toString('hex')).toBe('25609513');
    expect(decodeRequest(bytes)).toEqual(request);
  });

  test('a request with a bad magic is named, and an offset beyond 2^53 fails every range check', () => {
    const bytes = encodeRequest({ flags: 0, type: 0, cookie: 1n, offset: 0, length: 1 });
    bytes.writeUInt32BE(0xdeadbeef, 0);
    expect(decodeRequest(bytes)).toBe('bad request magic 0xdeadbeef');
    const far = encodeRequest({ flags: 0, type: 0, cookie: 1n, offset: 0, length: 1 });
    far.writeBigUInt64BE(2n ** 63n, 16);
    const decoded = decodeRequest(far);
    expect(typeof decoded === 'object' && decoded.offset).toBe(Number.POSITIVE_INFINITY);
  });

  test('option header, option reply, simple reply and chunk header round-trip', () => {
    expect(decodeOptionHeader(encodeOptionHeader({ option: 7, length: 1234 }))).toEqual({ option: 7, length: 1234 });
    const reply = encodeOptionReply({ option: 10, type: 2 ** 31 + 1, length: 3 }, Buffer.from('abc'));
    expect(decodeOptionReplyHeader(reply.subarray(0, 20))).toEqual({ option: 10, type: 2 ** 31 + 1, length: 3 });
    expect(reply.subarray(20).toString()).toBe('abc');
    expect(decodeSimpleReply(encodeSimpleReply(22, 99n))).toEqual({ errno: 22, cookie: 99n });
    const chunk = { flags: 1, type: 2 ** 15 + 1, cookie: 5n, length: 0xffffffff };
    expect(decodeChunkHeader(encodeChunkHeader(chunk))).toEqual(chunk);
  });

  test('decoders refuse wrong magics and sizes', () => {
    const option = encodeOptionHeader({ option: 1, length: 0 });
    option[0] = 0;
    expect(decodeOptionHeader(option)).toBe('bad option magic (expected IHAVEOPT)');
    expect(decodeSimpleReply(Buffer.alloc(16))).toBe('bad simple reply magic');
    expect(decodeChunkHeader(Buffer.alloc(19))).toBe('chunk header of 19 bytes');
    expect(decodeOptionReplyHeader(Buffer.alloc(20))).toBe('bad option reply magic');
  });
});
