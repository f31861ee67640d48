/** The NBD messages: every encode/decode pair round-trips, and decoders name what is wrong. */
import { describe, expect, test } from 'vitest';
import {
  decodeClientFlags,
  decodeGreeting,
  encodeClientFlags,
  encodeGreeting,
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
import {
  decodeExportNameReply,
  decodeInfoOption,
  decodeInfoReply,
  decodeMetaContextOption,
  decodeMetaContextReply,
  decodeServerReply,
  encodeExportNameReply,
  encodeInfoOption,
  encodeInfoReply,
  encodeMetaContextOption,
  encodeMetaContextReply,
  encodeServerReply,
} from '../dist/engine/nbd/wire-options.js';
import {
  decodeBlockStatus,
  decodeErrorChunk,
  decodeOffsetDataHead,
  decodeOffsetHole,
  encodeBlockStatus,
  encodeErrorChunk,
  encodeOffsetDataHead,
  encodeOffsetHole,
} from '../dist/engine/nbd/wire-chunks.js';

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

describe('NBD handshake messages', () => {
  test('greeting and client flags round-trip; the greeting says what kind of server it is not', () => {
    const greeting = encodeGreeting({ flags: 3 });
    expect(greeting.toString('hex')).toBe(`${Buffer.from('NBDMAGIC').toString('hex')}${Buffer.from('IHAVEOPT').toString('hex')}0003`);
    expect(decodeGreeting(greeting)).toEqual({ flags: 3 });
    expect(decodeGreeting(Buffer.from('HTTP/1.1 400 Bad R'))).toBe('not an NBD server (bad greeting magic)');
    const oldstyle = Buffer.from(greeting);
    oldstyle.writeBigUInt64BE(0x00420281861253n, 8);
    expect(decodeGreeting(oldstyle)).toBe('the server speaks oldstyle NBD, which is not supported');
    expect(decodeClientFlags(encodeClientFlags(0xffffffff))).toBe(0xffffffff);
    expect(decodeClientFlags(Buffer.alloc(3))).toBe('client flags of 3 bytes');
  });

  test('option data: SET/LIST_META_CONTEXT and INFO/GO round-trip; trailing or missing bytes are malformed', () => {
    const meta = { exportName: 'disk-ä', queries: ['base:allocation', 'qemu:dirty-bitmap:b1', ''] };
    const metaBytes = encodeMetaContextOption(meta);
    expect(decodeMetaContextOption(metaBytes)).toEqual(meta);
    expect(decodeMetaContextOption(Buffer.concat([metaBytes, Buffer.alloc(1)]))).toBe('malformed metadata context option');
    expect(decodeMetaContextOption(metaBytes.subarray(0, metaBytes.length - 1))).toBe('malformed metadata context option');
    // A count of 2^32-1 queries in 12 bytes: refused without looping or allocating for the count.
    const huge = Buffer.from('00000000ffffffff00000000', 'hex');
    expect(decodeMetaContextOption(huge)).toBe('malformed metadata context option');
    const info = { exportName: '', requests: [3, 1, 2] };
    const infoBytes = encodeInfoOption(info);
    expect(infoBytes.toString('hex')).toBe('000000000003000300010002');
    expect(decodeInfoOption(infoBytes)).toEqual(info);
    expect(decodeInfoOption(infoBytes.subarray(0, 11))).toBe('malformed NBD_OPT_INFO/NBD_OPT_GO');
    // A name longer than the protocol's string limit is malformed, whatever the data holds.
    const long = encodeInfoOption({ exportName: 'x'.repeat(4097), requests: [] });
    expect(decodeInfoOption(long)).toBe('malformed NBD_OPT_INFO/NBD_OPT_GO');
  });

  test('option replies: NBD_REP_SERVER, NBD_REP_META_CONTEXT and every NBD_REP_INFO round-trip', () => {
    expect(decodeServerReply(encodeServerReply({ name: 'd1', description: 'the first disk' }))).toEqual({ name: 'd1', description: 'the first disk' });
    expect(decodeServerReply(Buffer.from('000000ff', 'hex'))).toBe('malformed NBD_REP_SERVER');
    const context = encodeMetaContextReply({ id: 7, name: 'base:allocation' });
    expect(context.toString('hex')).toBe(`00000007${Buffer.from('base:allocation').toString('hex')}`);
    expect(decodeMetaContextReply(context)).toEqual({ id: 7, name: 'base:allocation' });
    expect(decodeMetaContextReply(Buffer.alloc(4))).toBe('short META_CONTEXT reply');
    const replies = [
      { kind: 'export', size: 2 ** 40 + 512, flags: 0x10b },
      { kind: 'name', name: 'vda' },
      { kind: 'description', description: 'a disk' },
      { kind: 'block-size', minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 },
      { kind: 'unknown', type: 99 },
    ] as const;
    for (const reply of replies) expect(decodeInfoReply(encodeInfoReply(reply))).toEqual(reply);
    expect(encodeInfoReply(replies[0]).toString('hex')).toBe('0000' + '0000010000000200' + '010b');
    expect(decodeInfoReply(Buffer.alloc(1))).toBe('short INFO reply');
    expect(decodeInfoReply(Buffer.alloc(11))).toBe('bad NBD_INFO_EXPORT length');
    expect(decodeInfoReply(Buffer.from('0003000000010000', 'hex'))).toBe('bad NBD_INFO_BLOCK_SIZE length');
    const far = encodeInfoReply({ kind: 'export', size: 0, flags: 0 });
    far.writeBigUInt64BE(2n ** 63n, 2);
    expect(decodeInfoReply(far)).toBe(`export size ${2n ** 63n} is too large`);
  });

  test('NBD_OPT_EXPORT_NAME reply: 10 bytes with NO_ZEROES, 134 without', () => {
    const reply = { size: 2 ** 33, flags: 3 };
    expect(encodeExportNameReply(reply, true).length).toBe(10);
    const padded = encodeExportNameReply(reply, false);
    expect(padded.length).toBe(134);
    expect(padded.subarray(10).equals(Buffer.alloc(124))).toBe(true);
    expect(decodeExportNameReply(padded.subarray(0, 10))).toEqual(reply);
    expect(decodeExportNameReply(padded)).toBe('export name reply of 134 bytes');
  });
});

describe('NBD structured reply chunk payloads', () => {
  test('OFFSET_DATA head and OFFSET_HOLE round-trip past 2^32; offsets beyond 2^53 are refused', () => {
    expect(decodeOffsetDataHead(encodeOffsetDataHead(2 ** 32 + 4096))).toEqual({ offset: 2 ** 32 + 4096 });
    const hole = { offset: 2 ** 40, length: 0xffffffff };
    const holeBytes = encodeOffsetHole(hole);
    expect(holeBytes.toString('hex')).toBe('0000010000000000ffffffff');
    expect(decodeOffsetHole(holeBytes)).toEqual(hole);
    holeBytes.writeBigUInt64BE(2n ** 64n - 1n, 0);
    expect(decodeOffsetHole(holeBytes)).toBe(`hole chunk offset ${2n ** 64n - 1n} is too large`);
    expect(decodeOffsetHole(Buffer.alloc(11))).toBe('hole chunk of 11 bytes');
    expect(decodeOffsetDataHead(Buffer.from('ffffffffffffffff', 'hex'))).toBe(`data chunk offset ${2n ** 64n - 1n} is too large`);
  });

  test('BLOCK_STATUS round-trips; a partial descriptor or a zero-length extent is refused', () => {
    const status = { contextId: 1, descriptors: [{ length: 65536, flags: 3 }, { length: 0xffffffff, flags: 0 }] };
    const bytes = encodeBlockStatus(status);
    expect(bytes.toString('hex')).toBe('00000001' + '0001000000000003' + 'ffffffff00000000');
    expect(decodeBlockStatus(bytes)).toEqual(status);
    expect(decodeBlockStatus(bytes.subarray(0, 19))).toBe('block status chunk of 19 bytes');
    expect(decodeBlockStatus(Buffer.alloc(4))).toBe('block status chunk of 4 bytes');
    expect(decodeBlockStatus(Buffer.from('000000010000000000000001', 'hex'))).toBe('block status extent of length 0');
  });

  test('ERROR round-trips; a message running past the chunk is refused; trailing bytes (ERROR_OFFSET) are allowed', () => {
    const error = { errno: 5, message: 'read failed: ä' };
    const bytes = encodeErrorChunk(error);
    expect(bytes.subarray(0, 6).toString('hex')).toBe('00000005000f');
    expect(decodeErrorChunk(bytes)).toEqual(error);
    expect(decodeErrorChunk(Buffer.concat([bytes, Buffer.alloc(8)]))).toEqual(error);
    expect(decodeErrorChunk(bytes.subarray(0, bytes.length - 1))).toBe('error chunk message runs past the chunk');
    expect(decodeErrorChunk(Buffer.alloc(5))).toBe('error chunk of 5 bytes');
    // The encoder cuts a message to what a client takes (MAX_STRING bytes).
    expect(encodeErrorChunk({ errno: 22, message: 'x'.repeat(70_000) }).length).toBe(6 + 4096);
  });
});
