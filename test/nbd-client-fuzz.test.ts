/**
 * The NBD client fed hostile servers over a real Unix socket (fast-check, a fresh seed every run, bounded):
 * handshake replies and transmission replies built from the protocol's pieces and then broken — wrong
 * cookies, chunk flags, chunk types, lengths past the request or the export, payloads that disagree with
 * their header, oversized chunks, error chunks with absurd message lengths, garbage, streams cut anywhere.
 *
 * Whatever arrives, a request or a connect settles (never a hang: the client's own timeout is far beyond
 * the test's, so a timeout fails it), with a value that is right or one clean error naming the URI:
 * ENGINE_NBD_PROTOCOL for what the server got wrong, ENGINE_NBD_COMMAND / ENGINE_NBD_CONNECT for what it
 * refused, with the server's own text escaped. No allocation is sized by a length the server claims: every case sends under 64 KiB, and the
 * largest buffer allocated while it runs stays under 1 MiB. A claim past the client's bounds fails at once,
 * before the bytes it announces (which never come) could be waited for.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import fc from 'fast-check';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { NbdClient } from '../dist/engine/nbd/client.js';
import { EngineError } from '../dist/repo-format/errors.js';
import { tempDir } from './helpers.js';

const SIZE = 2 ** 33;
/** Reads at 4 GiB + 4 KiB: offsets past 2^32. */
const AT = 2 ** 32 + 4096;
const LENGTH = 65536;
const CONTEXT_ID = 1;
const DATA_BYTE = 0xab;
/** The client's own timeout: a case that reaches it hung. */
const CLIENT_TIMEOUT_MS = 20_000;
const ALLOCATION_BOUND = 1024 * 1024;

let dir: string;
let cleanup: () => Promise<void>;
let server: Server;
let uri: string;
/** What the fake server does for the connection under test. */
let behaviour: (socket: Socket, read: (n: number) => Promise<Buffer>) => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-nbd-client-fuzz-'));
  const path = join(dir, 'fuzz.sock');
  server = createServer((socket) => {
    socket.on('error', () => undefined);
    void behaviour(socket, exactReader(socket)).catch(() => socket.destroy());
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  uri = `nbd+unix:///?socket=${path}`;
});
afterAll(async () => {
  await new Promise((resolve) => server.close(resolve));
  await cleanup();
});

/** Exactly n bytes from the socket (the fake server's side). */
function exactReader(socket: Socket): (n: number) => Promise<Buffer> {
  let buffered = Buffer.alloc(0);
  let wake: (() => void) | undefined;
  let ended = false;
  socket.on('data', (chunk: Buffer) => {
    buffered = Buffer.concat([buffered, chunk]);
    wake?.();
  });
  socket.on('close', () => {
    ended = true;
    wake?.();
  });
  return async (n) => {
    while (buffered.length < n) {
      if (ended) throw new Error('closed');
      await new Promise<void>((resolve) => (wake = resolve));
    }
    const out = buffered.subarray(0, n);
    buffered = buffered.subarray(n);
    return out;
  };
}

// Protocol values, written out here (not imported from the code under test).
const u16 = (v: number): Buffer => Buffer.from([Math.floor(v / 256) % 256, v % 256]);
function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}
function u64(v: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt.asUintN(64, v));
  return b;
}
function optionReply(option: number, type: number, data: Buffer = Buffer.alloc(0), declared = data.length): Buffer {
  return Buffer.concat([u64(0x0003e889045565a9n), u32(option), u32(type), u32(declared), data]);
}
const GREETING = Buffer.concat([Buffer.from('NBDMAGIC'), Buffer.from('IHAVEOPT'), u16(3)]);
const ACK = 1;
const REP_INFO = 3;
const REP_META_CONTEXT = 4;
const exportInfo = Buffer.concat([u16(0), u64(BigInt(SIZE)), u16(1)]);

/** A correct handshake: structured replies, base:allocation as CONTEXT_ID, GO with size and flags. */
async function negotiate(socket: Socket, read: (n: number) => Promise<Buffer>): Promise<void> {
  socket.write(GREETING);
  await read(4);
  for (;;) {
    const header = await read(16);
    const option = header.readUInt32BE(8);
    await read(header.readUInt32BE(12));
    if (option === 8) socket.write(optionReply(8, ACK));
    else if (option === 10) socket.write(Buffer.concat([optionReply(10, REP_META_CONTEXT, Buffer.concat([u32(CONTEXT_ID), Buffer.from('base:allocation')])), optionReply(10, ACK)]));
    else if (option === 7) {
      socket.write(Buffer.concat([optionReply(7, REP_INFO, exportInfo), optionReply(7, ACK)]));
      return;
    } else socket.write(optionReply(option, 2 ** 31 + 1));
  }
}

interface Request {
  type: number;
  cookie: bigint;
  offset: number;
  length: number;
}

async function readRequest(read: (n: number) => Promise<Buffer>): Promise<Request> {
  const r = await read(28);
  return { type: r.readUInt16BE(6), cookie: r.readBigUInt64BE(8), offset: Number(r.readBigUInt64BE(16)), length: r.readUInt32BE(24) };
}

// ---- hostile replies, planned without knowing the request, built once it is known ----

type CookiePlan = 'right' | bigint;
/** Where a chunk says its bytes are: relative to the request's offset, or anywhere in 64 bits. */
type OffsetPlan = { relative: number } | { absolute: bigint };
/** A chunk's length field: the payload's own, off by some bytes, or any u32. */
type LengthPlan = 'exact' | { delta: number } | { absolute: number };

type PayloadPlan =
  | { kind: 'data'; at: OffsetPlan; length: number }
  | { kind: 'hole'; at: OffsetPlan; length: number }
  | { kind: 'status'; contextId: number; descriptors: { length: number; flags: number }[] }
  | { kind: 'error'; errno: number; messageLength: number; actual: number }
  | { kind: 'raw'; bytes: Buffer };

type PiecePlan =
  | { kind: 'simple'; magic: number; errno: number; cookie: CookiePlan; data: number }
  | { kind: 'chunk'; flags: number; type: number; cookie: CookiePlan; length: LengthPlan; payload: PayloadPlan }
  | { kind: 'garbage'; bytes: Buffer };

const cookiePlan: fc.Arbitrary<CookiePlan> = fc.oneof({ weight: 5, arbitrary: fc.constant('right' as const) }, fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }));
const offsetPlan: fc.Arbitrary<OffsetPlan> = fc.oneof(
  { weight: 4, arbitrary: fc.integer({ min: -LENGTH, max: 2 * LENGTH }).map((relative) => ({ relative })) },
  { weight: 2, arbitrary: fc.constantFrom(0, LENGTH / 2, LENGTH - 1, LENGTH).map((relative) => ({ relative })) },
  { weight: 1, arbitrary: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }).map((absolute) => ({ absolute })) },
);
const lengthPlan: fc.Arbitrary<LengthPlan> = fc.oneof(
  { weight: 6, arbitrary: fc.constant('exact' as const) },
  { weight: 2, arbitrary: fc.integer({ min: -16, max: 16 }).map((delta) => ({ delta })) },
  { weight: 2, arbitrary: fc.constantFrom(0, 5, 6, 11, 12, 4 + 8 * 1024 * 1024 + 8, 0x7fffffff, 0xffffffff).map((absolute) => ({ absolute })) },
  { weight: 1, arbitrary: fc.nat(0xffffffff).map((absolute) => ({ absolute })) },
);
const payloadPlan: fc.Arbitrary<PayloadPlan> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ kind: fc.constant('data' as const), at: offsetPlan, length: fc.oneof(fc.constantFrom(0, LENGTH / 2, LENGTH), fc.nat(LENGTH + 16)) }) },
  { weight: 3, arbitrary: fc.record({ kind: fc.constant('hole' as const), at: offsetPlan, length: fc.oneof(fc.constantFrom(0, LENGTH / 2, LENGTH), fc.nat(0xffffffff)) }) },
  {
    weight: 3,
    arbitrary: fc.record({
      kind: fc.constant('status' as const),
      contextId: fc.oneof({ weight: 4, arbitrary: fc.constant(CONTEXT_ID) }, fc.nat(0xffffffff)),
      descriptors: fc.array(fc.record({ length: fc.oneof(fc.constantFrom(0, 1, 4096, LENGTH, 0xffffffff), fc.nat(0xffffffff)), flags: fc.nat(3) }), { maxLength: 6 }),
    }),
  },
  {
    weight: 3,
    arbitrary: fc.record({
      kind: fc.constant('error' as const),
      errno: fc.constantFrom(1, 5, 22, 28, 75, 95, 108, 0, 0xffffffff),
      messageLength: fc.oneof(fc.nat(64), fc.constantFrom(0xffff, 4097)),
      actual: fc.nat(64),
    }),
  },
  { weight: 1, arbitrary: fc.uint8Array({ maxLength: 48 }).map((b) => ({ kind: 'raw' as const, bytes: Buffer.from(b) })) },
);
const chunkType = fc.oneof({ weight: 8, arbitrary: fc.constantFrom(0, 1, 2, 5, 2 ** 15 + 1, 2 ** 15 + 2) }, fc.nat(0xffff));
const chunkFlags = fc.oneof({ weight: 6, arbitrary: fc.constantFrom(0, 1) }, fc.nat(0xffff));
/** A chunk whose type matches its payload most of the time, so that replies get deep into the parser. */
const chunkPlan: fc.Arbitrary<PiecePlan> = fc
  .record({ flags: chunkFlags, type: chunkType, cookie: cookiePlan, length: lengthPlan, payload: payloadPlan, matched: fc.boolean() })
  .map(({ matched, ...chunk }) => {
    const natural = { data: 1, hole: 2, status: 5, error: 2 ** 15 + 1, raw: chunk.type }[chunk.payload.kind];
    return { kind: 'chunk' as const, ...chunk, type: matched ? natural : chunk.type };
  });
const piecePlan: fc.Arbitrary<PiecePlan> = fc.oneof(
  { weight: 8, arbitrary: chunkPlan },
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant('simple' as const),
      magic: fc.oneof({ weight: 6, arbitrary: fc.constant(0x67446698) }, fc.nat(0xffffffff)),
      errno: fc.oneof({ weight: 3, arbitrary: fc.constant(0) }, fc.constantFrom(5, 108, 0xffffffff)),
      cookie: cookiePlan,
      data: fc.constantFrom(0, 100, LENGTH, LENGTH + 8),
    }),
  },
  { weight: 1, arbitrary: fc.uint8Array({ maxLength: 40 }).map((b) => ({ kind: 'garbage' as const, bytes: Buffer.from(b) })) },
);

function offsetOf(plan: OffsetPlan, request: Request): bigint {
  return 'relative' in plan ? BigInt(request.offset + plan.relative) : plan.absolute;
}

function payloadBytes(plan: PayloadPlan, request: Request): Buffer {
  switch (plan.kind) {
    case 'data':
      return Buffer.concat([u64(offsetOf(plan.at, request)), Buffer.alloc(plan.length, DATA_BYTE)]);
    case 'hole':
      return Buffer.concat([u64(offsetOf(plan.at, request)), u32(plan.length)]);
    case 'status':
      return Buffer.concat([u32(plan.contextId), ...plan.descriptors.flatMap((d) => [u32(d.length), u32(d.flags)])]);
    case 'error':
      return Buffer.concat([u32(plan.errno), u16(plan.messageLength), Buffer.alloc(plan.actual, 0x6d)]);
    case 'raw':
      return plan.bytes;
  }
}

function pieceBytes(plan: PiecePlan, request: Request): Buffer {
  const cookie = (c: CookiePlan): Buffer => u64(c === 'right' ? request.cookie : c);
  if (plan.kind === 'garbage') return plan.bytes;
  if (plan.kind === 'simple') {
    const data = plan.errno === 0 ? Buffer.alloc(plan.data, DATA_BYTE) : Buffer.alloc(0);
    return Buffer.concat([u32(plan.magic), u32(plan.errno), cookie(plan.cookie), data]);
  }
  const payload = payloadBytes(plan.payload, request);
  const declared = plan.length === 'exact' ? payload.length : 'delta' in plan.length ? Math.max(0, payload.length + plan.length.delta) : plan.length.absolute;
  return Buffer.concat([u32(0x668e33ef), u16(plan.flags), u16(plan.type), cookie(plan.cookie), u32(declared), payload]);
}

/** Runs `work`, noting the largest Buffer allocated meanwhile (anywhere in this process). */
async function largestAllocation<T>(work: () => Promise<T>): Promise<{ outcome: T; largest: number }> {
  const originals = { alloc: Buffer.alloc, allocUnsafe: Buffer.allocUnsafe, allocUnsafeSlow: Buffer.allocUnsafeSlow };
  let largest = 0;
  const note = (size: number): void => {
    largest = Math.max(largest, size);
  };
  Buffer.alloc = ((...args: Parameters<typeof Buffer.alloc>) => (note(args[0]), originals.alloc(...args))) as typeof Buffer.alloc;
  Buffer.allocUnsafe = ((size: number) => (note(size), originals.allocUnsafe(size))) as typeof Buffer.allocUnsafe;
  Buffer.allocUnsafeSlow = ((size: number) => (note(size), originals.allocUnsafeSlow(size))) as typeof Buffer.allocUnsafeSlow;
  try {
    return { outcome: await work(), largest };
  } finally {
    Object.assign(Buffer, originals);
  }
}

type Outcome = { ok: true; value: unknown } | { ok: false; error: unknown };
const settle = (promise: Promise<unknown>): Promise<Outcome> => promise.then((value) => ({ ok: true as const, value }), (error: unknown) => ({ ok: false as const, error }));

/** The only acceptable failures: these codes, with the URI in the message. */
function expectCleanError(error: unknown, codes: string[]): void {
  expect(error).toBeInstanceOf(EngineError);
  const engineError = error as EngineError;
  expect(codes, `${engineError.code}: ${engineError.message}`).toContain(engineError.code);
  expect(engineError.message).toContain(uri);
  // The server's text is shown escaped: no control character of its reaches a terminal or a log.
  expect(engineError.message).not.toMatch(/[\u0000-\u001f\u007f-\u009f]/);
}

interface Case {
  read: boolean;
  pieces: PiecePlan[];
  /** Cut the stream after this many bytes (a server that dies mid-reply). */
  cut: number | null;
}

/** `arbitrary` one time in `oneIn`, null otherwise. */
const sometimes = <T>(arbitrary: fc.Arbitrary<T>, oneIn: number): fc.Arbitrary<T | null> => fc.oneof({ weight: oneIn - 1, arbitrary: fc.constant(null) }, { weight: 1, arbitrary });

const caseArb: fc.Arbitrary<Case> = fc.record({ read: fc.boolean(), pieces: fc.array(piecePlan, { minLength: 1, maxLength: 4 }), cut: sometimes(fc.nat(400), 3) });

/** Connects, sends one request, lets the fake server answer with `bytes`, then closes (or not). */
async function runCase(c: Case, options: { close: boolean }): Promise<{ outcome: Outcome; largest: number; target: Buffer }> {
  behaviour = async (socket, read) => {
    await negotiate(socket, read);
    const request = await readRequest(read);
    let bytes = Buffer.concat(c.pieces.map((p) => pieceBytes(p, request)));
    if (c.cut !== null) bytes = bytes.subarray(0, c.cut);
    socket.write(bytes);
    if (options.close) socket.end();
  };
  const target = Buffer.alloc(LENGTH, 0x55);
  const client = await NbdClient.connect(uri, { metaContexts: ['base:allocation'], requestSize: LENGTH, timeoutMs: CLIENT_TIMEOUT_MS });
  try {
    const { outcome, largest } = await largestAllocation(() =>
      settle(
        c.read
          ? client.read(target, AT)
          : (async () => {
              const extents = [];
              for await (const extent of client.blockStatus('base:allocation', AT, LENGTH)) extents.push(extent);
              return extents;
            })(),
      ),
    );
    return { outcome, largest, target };
  } finally {
    await client.close();
  }
}

describe('the NBD client against hostile replies', () => {
  test('any reply, then the server closes: the right value or one clean error naming the URI, nothing sized by the server', async () => {
    await fc.assert(
      fc.asyncProperty(caseArb, async (c) => {
        const { outcome, largest, target } = await runCase(c, { close: true });
        expect(largest).toBeLessThan(ALLOCATION_BOUND);
        if (!outcome.ok) return expectCleanError(outcome.error, ['ENGINE_NBD_PROTOCOL', 'ENGINE_NBD_COMMAND']);
        if (c.read) {
          // A read that succeeds was covered exactly: every byte is data the server sent or a hole's zeros.
          expect(target.every((b) => b === DATA_BYTE || b === 0)).toBe(true);
        } else {
          const extents = outcome.value as { offset: number; length: number }[];
          expect(extents[0]!.offset).toBe(AT);
          let at = AT;
          for (const extent of extents) {
            expect(extent.offset).toBe(at);
            at += extent.length;
          }
          expect(at).toBe(AT + LENGTH);
        }
      }),
      { numRuns: 250 },
    );
  });

  test('a chunk claiming more than the client accepts fails at once, without waiting for the bytes it announces', async () => {
    // Per chunk type, the most the client accepts: data up to the request's end, a hole of 12 bytes, 2^20
    // block status descriptors, an error message of 4096 bytes (and 8 for ERROR_OFFSET), nothing for NONE.
    const bound: Record<number, number> = { 1: 8 + LENGTH, 2: 12, 5: 4 + 8 * 1024 * 1024, [2 ** 15 + 1]: 6 + 4096 + 8, 0: 0 };
    const claims = fc.record({
      type: fc.constantFrom(1, 2, 5, 2 ** 15 + 1, 0),
      over: fc.oneof(fc.constantFrom(1, 8, 4096), fc.nat(0x7fffffff)).map((n) => n + 1),
      offset: fc.constantFrom(0, LENGTH / 2),
    });
    await fc.assert(
      fc.asyncProperty(claims, async ({ type, over, offset }) => {
        const length = Math.min(0xffffffff, bound[type]! + over);
        const c: Case = {
          read: type !== 5,
          // The header and the 8 bytes that say where a data chunk goes; the rest never comes.
          pieces: [{ kind: 'chunk', flags: 1, type, cookie: 'right', length: { absolute: length }, payload: { kind: 'raw', bytes: u64(BigInt(AT + offset)) } }],
          cut: null,
        };
        const started = Date.now();
        const { outcome, largest } = await runCase(c, { close: false });
        expect(outcome.ok).toBe(false);
        if (!outcome.ok) expectCleanError(outcome.error, ['ENGINE_NBD_PROTOCOL']);
        expect(largest).toBeLessThan(ALLOCATION_BOUND);
        expect(Date.now() - started).toBeLessThan(CLIENT_TIMEOUT_MS);
      }),
      { numRuns: 40 },
    );
  });

  test('hostile handshake replies: connect succeeds or fails with one clean error naming the URI', async () => {
    interface Reply {
      option: number;
      type: number;
      data: Buffer;
      declared?: number;
    }
    // The replies a good server gives, in order: STRUCTURED_REPLY, SET_META_CONTEXT, GO (with block sizes).
    const good: Reply[] = [
      { option: 8, type: ACK, data: Buffer.alloc(0) },
      { option: 10, type: REP_META_CONTEXT, data: Buffer.concat([u32(CONTEXT_ID), Buffer.from('base:allocation')]) },
      { option: 10, type: ACK, data: Buffer.alloc(0) },
      { option: 7, type: REP_INFO, data: exportInfo },
      { option: 7, type: REP_INFO, data: Buffer.concat([u16(3), u32(1), u32(4096), u32(2 ** 25)]) },
      { option: 7, type: ACK, data: Buffer.alloc(0) },
    ];
    type Mutation =
      | { kind: 'type'; at: number; type: number }
      | { kind: 'option'; at: number; option: number }
      | { kind: 'data'; at: number; data: Buffer }
      | { kind: 'declared'; at: number; declared: number }
      | { kind: 'drop'; at: number }
      | { kind: 'size'; size: bigint };
    const mutation: fc.Arbitrary<Mutation> = fc.oneof(
      fc.record({ kind: fc.constant('type' as const), at: fc.nat(5), type: fc.oneof(fc.constantFrom(ACK, 2, REP_INFO, REP_META_CONTEXT, 2 ** 31 + 1, 2 ** 31 + 5, 2 ** 31 + 6), fc.nat(0xffffffff)) }),
      fc.record({ kind: fc.constant('option' as const), at: fc.nat(5), option: fc.nat(12) }),
      fc.record({ kind: fc.constant('data' as const), at: fc.nat(5), data: fc.uint8Array({ maxLength: 32 }).map((b) => Buffer.from(b)) }),
      fc.record({ kind: fc.constant('declared' as const), at: fc.nat(5), declared: fc.oneof(fc.constantFrom(0xffffffff, 64 * 1024 + 1, 0, 1), fc.nat(0xffffffff)) }),
      fc.record({ kind: fc.constant('drop' as const), at: fc.nat(5) }),
      fc.record({ kind: fc.constant('size' as const), size: fc.constantFrom(2n ** 53n, 2n ** 64n - 1n, 0n) }),
    );
    const plan = fc.record({
      greeting: sometimes(fc.uint8Array({ minLength: 18, maxLength: 18 }), 10),
      mutations: fc.array(mutation, { maxLength: 3 }),
      cut: sometimes(fc.nat(120), 4),
    });
    const mutated = (mutations: Mutation[]): Reply[] => {
      const replies = good.map((r) => ({ ...r }));
      for (const m of mutations) {
        const reply = 'at' in m ? replies[m.at] : undefined;
        if (m.kind === 'size') replies[3]!.data = Buffer.concat([u16(0), u64(m.size), u16(1)]);
        else if (m.kind === 'drop') replies.splice(m.at, 1);
        else if (reply && m.kind === 'type') reply.type = m.type;
        else if (reply && m.kind === 'option') reply.option = m.option;
        else if (reply && m.kind === 'data') reply.data = m.data;
        else if (reply && m.kind === 'declared') reply.declared = m.declared;
      }
      return replies;
    };
    await fc.assert(
      fc.asyncProperty(plan, async (p) => {
        // All replies at once, then the server closes: nothing waits on the client's next option.
        behaviour = async (socket, read) => {
          socket.write(p.greeting ? Buffer.from(p.greeting) : GREETING);
          await read(4);
          let bytes = Buffer.concat(mutated(p.mutations).map((r) => optionReply(r.option, r.type, r.data, r.declared ?? r.data.length)));
          if (p.cut !== null) bytes = bytes.subarray(0, bytes.length - p.cut);
          socket.end(bytes);
        };
        const { outcome, largest } = await largestAllocation(() => settle(NbdClient.connect(uri, { metaContexts: ['base:allocation'], timeoutMs: CLIENT_TIMEOUT_MS })));
        expect(largest).toBeLessThan(ALLOCATION_BOUND);
        if (outcome.ok) {
          const client = outcome.value as NbdClient;
          // A connect that succeeds saw a size it can use.
          expect(Number.isSafeInteger(client.size) && client.size >= 0).toBe(true);
          await client.close();
        } else expectCleanError(outcome.error, ['ENGINE_NBD_PROTOCOL', 'ENGINE_NBD_CONNECT']);
      }),
      { numRuns: 200 },
    );
  });
});
