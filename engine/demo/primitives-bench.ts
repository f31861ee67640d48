/**
 * Micro-benchmark of the engine's primitives on 1 MiB blocks, in MB/s (MB = 10^6 bytes), one thread,
 * like `proxmox-backup-client benchmark`: SHA-256 (node:crypto), xxh64 (xxhash-wasm, through the
 * repository's checksum64), lz4 compress / decompress as the engine runs them (liblz4, or lz4-napi where its
 * addon is not built: repo-format/lz4-native.ts), the zero check
 * (Buffer.equals against a preallocated zero buffer), and the primitives of encrypted repositories:
 * HMAC-SHA256 (keyed chunk ids) and AES-256-GCM seal / open as the repository calls them (random nonce,
 * 16-byte tag). Data: seeded random, text-like, and all-zero blocks.
 *
 *   engine bench            (or: npm run bench:primitives)
 *   engine bench --trial-ms 20   (the same rows from short trials: a quick check that every primitive runs)
 */
import { createHash } from 'node:crypto';
import os from 'node:os';
import { SeededRandom } from './synthetic-image.js';
import { checksum64, initChecksum } from '../../repo-format/checksum.js';
import { FLAG_LZ4, KIND_DATA } from '../../repo-format/constants.js';
import { compress, compressTransient, decompress, LZ4 } from '../../repo-format/compression.js';
import { LZ4_IMPLEMENTATION } from '../../repo-format/lz4-native.js';
import { BlockPool } from '../pipeline/block-pool.js';
import { gcmOpen, gcmSeal, keyedId, newRepositoryKeys } from '../../repo-format/crypto.js';

export type DataKind = 'random' | 'text' | 'zero';

export interface Row {
  primitive: string;
  data: DataKind;
  blockSize: number;
  /** Median of the trials; bytes of input (for decompression: of output) per second / 10^6. */
  mbPerS: number;
  trialsMbPerS: number[];
  /** lz4 only: raw bytes / compressed bytes. */
  ratio?: number | undefined;
  note?: string | undefined;
}

const BLOCK = 1024 * 1024;
const BLOCKS_PER_KIND = 8;
/** Each trial's length by default; the warm-up before a primitive's trials is a quarter of it. */
export const DEFAULT_TRIAL_MS = 400;
const TRIALS = 3;
/** Turn the event loop every few calls: lz4-napi (the fallback codec) frees its output buffers from finalizers that run then. */
const YIELD_EVERY = 4;

const WORDS = (
  'the of and to in is that for it as was with be by on not he this are or his from at which but have an they you were her ' +
  'kernel module config service network storage volume backup restore snapshot system user error warning info debug ' +
  'lib usr share bin etc var log tmp home root boot proc sys dev run srv opt mnt media 0 1 2 3 4 5 6 7 8 9 10 100 1024 ' +
  'Jan 12 03:14:07 host systemd[1]: Started Session of user. /usr/lib/x86_64-linux-gnu/libc.so.6 <?xml version="1.0"?>'
).split(' ');

/** Log- and source-like text: words chosen by the seeded stream, with newlines. */
function textBlock(random: SeededRandom, length: number): Buffer {
  const choices = random.bytes(length);
  const parts: string[] = [];
  let size = 0;
  for (let i = 0; size < length; i += 2) {
    const word = WORDS[choices[i % length]! % WORDS.length]!;
    const sep = choices[(i + 1) % length]! % 11 === 0 ? '\n' : ' ';
    parts.push(word, sep);
    size += word.length + 1;
  }
  return Buffer.from(parts.join(''), 'latin1').subarray(0, length);
}

function blocksOf(kind: DataKind): Buffer[] {
  const random = new SeededRandom(`bench-primitives/${kind}`);
  return Array.from({ length: BLOCKS_PER_KIND }, () => {
    if (kind === 'random') return random.bytes(BLOCK);
    if (kind === 'text') return textBlock(random, BLOCK);
    return Buffer.alloc(BLOCK);
  });
}

const nextTurn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

/** Calls `fn` on the blocks round-robin for `ms`; returns bytes / s / 10^6. */
async function timeFor(ms: number, inputs: Buffer[], bytesPerCall: (i: number) => number, fn: (input: Buffer) => void): Promise<number> {
  let bytes = 0;
  let calls = 0;
  const started = performance.now();
  let elapsed = 0;
  while (elapsed < ms) {
    const i = calls % inputs.length;
    fn(inputs[i]!);
    bytes += bytesPerCall(i);
    calls += 1;
    if (calls % YIELD_EVERY === 0) await nextTurn();
    elapsed = performance.now() - started;
  }
  return bytes / 1e6 / (elapsed / 1000);
}

async function measure(trialMs: number, inputs: Buffer[], bytesPerCall: (i: number) => number, fn: (input: Buffer) => void): Promise<number[]> {
  await timeFor(trialMs / 4, inputs, bytesPerCall, fn);
  const trials: number[] = [];
  for (let t = 0; t < TRIALS; t += 1) trials.push(await timeFor(trialMs, inputs, bytesPerCall, fn));
  return trials;
}

const median = (values: number[]): number => {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
};

export async function runPrimitives(trialMs = DEFAULT_TRIAL_MS): Promise<Row[]> {
  await initChecksum();
  const zeros = Buffer.alloc(BLOCK);
  const keys = newRepositoryKeys();
  const aad = Buffer.alloc(48);
  const rows: Row[] = [];
  let sink = 0;
  for (const data of ['random', 'text', 'zero'] as const) {
    const blocks = blocksOf(data);
    const raw = (): number => BLOCK;
    const add = (primitive: string, trials: number[], extra: Partial<Row> = {}): void => {
      rows.push({ primitive, data, blockSize: BLOCK, mbPerS: median(trials), trialsMbPerS: trials, ...extra });
    };

    add('SHA-256 (node:crypto)', await measure(trialMs, blocks, raw, (b) => {
      sink ^= createHash('sha256').update(b).digest()[0]!;
    }));
    add('xxh64 (xxhash-wasm h64Raw)', await measure(trialMs, blocks, raw, (b) => {
      sink ^= Number(checksum64(b) & 0xffn);
    }));

    // The engine's own calls: compressing into the thread's reused buffer, decoding into a block slot.
    const compressed = blocks.map((b) => compress(LZ4, b));
    const ratio = blocks.reduce((n, b) => n + b.length, 0) / compressed.reduce((n, c) => n + c.length, 0);
    add(`lz4 compress (${LZ4_IMPLEMENTATION})`, await measure(trialMs, blocks, raw, (b) => {
      sink ^= compressTransient(LZ4, b).length;
    }), { ratio });
    const slot = Buffer.allocUnsafe(BLOCK);
    add(`lz4 decompress (${LZ4_IMPLEMENTATION})`, await measure(trialMs, compressed, raw, (c) => {
      const plaintext = decompress(FLAG_LZ4, c, c.readUInt32LE(0), slot);
      sink ^= typeof plaintext === 'string' ? 0 : plaintext.length;
    }), { ratio, note: 'MB/s of decompressed output' });

    add('zero check (Buffer.equals)', await measure(trialMs, blocks, raw, (b) => {
      sink ^= b.equals(zeros) ? 1 : 0;
    }), data === 'zero' ? {} : { note: 'exits at the first non-zero byte' });

    add('HMAC-SHA256 (node:crypto)', await measure(trialMs, blocks, raw, (b) => {
      sink ^= keyedId(keys.idKey, b)[0]!;
    }));
    add('AES-256-GCM encrypt (node:crypto)', await measure(trialMs, blocks, raw, (b) => {
      sink ^= gcmSeal(keys.dataKey, b, aad).length;
    }));
    const sealed = blocks.map((b) => gcmSeal(keys.dataKey, b, aad));
    add('AES-256-GCM decrypt (node:crypto)', await measure(trialMs, sealed, raw, (s) => {
      sink ^= gcmOpen(keys.dataKey, s, aad)?.length ?? 0;
    }), { note: 'tag checked' });
  }
  void sink; // keeps the results observable, so no call is optimised away
  return rows;
}

export function renderPrimitives(rows: Row[]): string {
  const primitives = [...new Set(rows.map((r) => r.primitive))];
  const kinds: DataKind[] = ['random', 'text', 'zero'];
  const cell = (primitive: string, data: DataKind): string => {
    const row = rows.find((r) => r.primitive === primitive && r.data === data);
    if (!row) return '—';
    const mbps = row.mbPerS >= 100_000 ? row.mbPerS.toExponential(1) : row.mbPerS.toFixed(0);
    return row.ratio !== undefined ? `${mbps} (ratio ${row.ratio.toFixed(2)})` : mbps;
  };
  const lines = [
    '| primitive (1 thread, 1 MiB blocks) | random MB/s | text-like MB/s | all-zero MB/s |',
    '|---|---|---|---|',
    ...primitives.map((p) => `| ${p} | ${kinds.map((k) => cell(p, k)).join(' | ')} |`),
  ];
  return lines.join('\n');
}

export interface PipelineRow {
  workers: number;
  data: Exclude<DataKind, 'zero'>;
  /** Input bytes through zero check + SHA-256 + lz4 + frame (xxh64) per second / 10^6. */
  mbPerS: number;
}

/**
 * The backup pipeline's CPU side with N workers: every block goes through the pool exactly as in a backup
 * (hash task: zero check + SHA-256; seal task: lz4 + frame + xxh64), all slots kept busy, no I/O. Shows how
 * the work scales with threads on this machine.
 */
export async function runPipeline(trialMs = DEFAULT_TRIAL_MS, workerCounts: number[] = [...new Set([1, 2, os.availableParallelism()])]): Promise<PipelineRow[]> {
  const rows: PipelineRow[] = [];
  for (const data of ['random', 'text'] as const) {
    const blocks = blocksOf(data);
    for (const workers of workerCounts) {
      const pool = new BlockPool({ blockSize: BLOCK, workers, compression: LZ4 });
      try {
        const runFor = async (ms: number): Promise<number> => {
          let bytes = 0;
          let next = 0;
          const started = performance.now();
          const lane = async (): Promise<void> => {
            while (performance.now() - started < ms) {
              const slot = await pool.slots.acquire();
              try {
                blocks[next++ % blocks.length]!.copy(pool.input(slot, BLOCK));
                const hashed = await pool.hash(slot, BLOCK);
                if (!hashed.zero) await pool.seal(slot, BLOCK, KIND_DATA, Buffer.from(hashed.id));
                bytes += BLOCK;
              } finally {
                pool.slots.release(slot);
              }
            }
          };
          await Promise.all(Array.from({ length: pool.slots.count }, lane));
          return bytes / 1e6 / ((performance.now() - started) / 1000);
        };
        await runFor((trialMs * 3) / 4); // longer than a primitive's: the worker threads warm up too
        const trials: number[] = [];
        for (let t = 0; t < TRIALS; t += 1) trials.push(await runFor(trialMs));
        rows.push({ workers, data, mbPerS: median(trials) });
      } finally {
        await pool.close();
      }
    }
  }
  return rows;
}

export function renderPipeline(rows: PipelineRow[]): string {
  const counts = [...new Set(rows.map((r) => r.workers))];
  const cell = (workers: number, data: PipelineRow['data']): string => rows.find((r) => r.workers === workers && r.data === data)?.mbPerS.toFixed(0) ?? '—';
  return [
    '| pipeline (hash + lz4 + frame, 1 MiB blocks) | random MB/s | text-like MB/s |',
    '|---|---|---|',
    ...counts.map((n) => `| ${n} worker${n === 1 ? '' : 's'} | ${cell(n, 'random')} | ${cell(n, 'text')} |`),
  ].join('\n');
}

/** The whole report: machine, method, tables. `trialMs`: each trial's length (shorter: quicker, noisier). */
export async function primitivesReport(trialMs = DEFAULT_TRIAL_MS): Promise<{ rows: Row[]; pipeline: PipelineRow[]; markdown: string }> {
  const cpu = os.cpus()[0]?.model.trim() ?? 'unknown';
  const rows = await runPrimitives(trialMs);
  const pipeline = await runPipeline(trialMs);
  const markdown =
    `# Primitives (${new Date().toISOString()})\n\n` +
    `Machine: ${cpu}, ${os.cpus().length} cores, ${(os.totalmem() / 1024 ** 3).toFixed(1)} GiB RAM, Node ${process.version}.\n` +
    `MB = 10^6 bytes; median of ${TRIALS} trials of ${trialMs} ms after a ${trialMs / 4} ms warm-up; ${BLOCKS_PER_KIND} distinct 1 MiB blocks per data kind; ` +
    `decompression counts output bytes; zero check on non-zero data exits at the first non-zero byte.\n\n` +
    `${renderPrimitives(rows)}\n\n` +
    `The pipeline with N worker threads (the main thread keeps every slot busy; no disk or repository I/O):\n\n` +
    `${renderPipeline(pipeline)}\n`;
  return { rows, pipeline, markdown };
}
