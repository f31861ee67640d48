/**
 * lz4 codecs head to head on 1 MiB blocks of real data (issue 15 item 2): lz4-napi 2.10 (Rust lz4_flex through
 * napi-rs; a new output Buffer per call) against liblz4 through the engine's own N-API addon (native/lz4;
 * compressing into and decompressing into buffers the caller owns), in this one process, one thread.
 *
 *   node dist/bench/lz4-codec.js [--image /var/tmp/engine-real-image/usr.img] [--sample-mib 256] [--rounds 6]
 *        [--out bench/results/lz4-codec.md]
 *
 * The sample: `--sample-mib` blocks of 1 MiB spread evenly over the image, all-zero blocks skipped (the
 * engine never compresses those), read once into memory. Each round times every codec on the whole sample,
 * compress and decompress, the order of the two codecs alternating round by round (A B, B A, ...) so that a
 * machine that gets busier weighs on both alike; a row's figure is the median over rounds of MB (10^6 bytes of
 * plaintext) per CPU-second of this process (user + system, from process.cpuUsage: what a core pays) and per
 * wall second, and the paired ratio is the median of the per-round ratios. lz4-napi's figures include the turns
 * of the event loop its output buffers need to be freed (every 4 calls, as engine bench does): the engine pays
 * them too. Before timing, every block of the sample is checked both ways: liblz4's blocks decode with
 * lz4-napi to the same bytes and lz4-napi's with liblz4.
 */
import { open, writeFile } from 'node:fs/promises';
import { compressSync, uncompressSync } from 'lz4-napi';
import { nativeLz4, NATIVE_LZ4_PATH } from '../repo-format/lz4-native.js';
import { arg, loadAverage, logger, machineLine } from './tools.js';

const log = logger('lz4-codec');
const BLOCK = 1024 * 1024;
const PREFIX = 4;
const YIELD_EVERY = 4;

interface Trial {
  cpuSeconds: number;
  wallSeconds: number;
}

const turn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

async function timeIt(fn: () => Promise<void>): Promise<Trial> {
  const cpu = process.cpuUsage();
  const started = performance.now();
  await fn();
  const used = process.cpuUsage(cpu);
  return { cpuSeconds: (used.user + used.system) / 1e6, wallSeconds: (performance.now() - started) / 1000 };
}

async function readSample(path: string, sampleMiB: number): Promise<Buffer[]> {
  const file = await open(path, 'r');
  try {
    const size = (await file.stat()).size;
    const total = Math.floor(size / BLOCK);
    const blocks: Buffer[] = [];
    const zero = Buffer.alloc(BLOCK);
    // Walk the image with a stride that visits every block once in a scattered order, until the sample is full.
    const stride = Math.max(1, Math.floor(total / sampleMiB));
    for (let start = 0; start < stride && blocks.length < sampleMiB; start++) {
      for (let i = start; i < total && blocks.length < sampleMiB; i += stride) {
        const block = Buffer.allocUnsafe(BLOCK);
        const { bytesRead } = await file.read(block, 0, BLOCK, i * BLOCK);
        if (bytesRead === BLOCK && !block.equals(zero)) blocks.push(block);
      }
    }
    return blocks;
  } finally {
    await file.close();
  }
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

async function main(): Promise<void> {
  const image = arg('--image') ?? '/var/tmp/engine-real-image/usr.img';
  const sampleMiB = Number(arg('--sample-mib') ?? 256);
  const rounds = Number(arg('--rounds') ?? 6);
  const out = arg('--out');
  const native = nativeLz4;
  if (!native) throw new Error(`the lz4 addon is not built (${NATIVE_LZ4_PATH}): run scripts/setup.sh`);
  const blocks = await readSample(image, sampleMiB);
  const bytes = blocks.length * BLOCK;
  log(`${blocks.length} non-zero blocks of 1 MiB from ${image}`);

  // Each codec's compressed form of every block, kept for the decompression trials and the cross checks.
  const napiFrames = blocks.map((b) => compressSync(b));
  const bound = PREFIX + native.compressBound(BLOCK);
  const nativeFrames = blocks.map((b) => {
    const frame = Buffer.allocUnsafe(bound);
    frame.writeUInt32LE(b.length, 0);
    const n = native.compress(b, frame.subarray(PREFIX));
    if (n <= 0) throw new Error('liblz4 did not compress a block');
    return frame.subarray(0, PREFIX + n);
  });
  const plain = Buffer.allocUnsafe(BLOCK);
  for (let i = 0; i < blocks.length; i++) {
    if (!uncompressSync(nativeFrames[i]!).equals(blocks[i]!)) throw new Error(`lz4-napi decodes liblz4's block ${i} to other bytes`);
    const n = native.decompress(napiFrames[i]!.subarray(PREFIX), plain);
    if (n !== BLOCK || !plain.equals(blocks[i]!)) throw new Error(`liblz4 decodes lz4-napi's block ${i} to other bytes`);
  }
  const napiStored = napiFrames.reduce((sum, f) => sum + f.length, 0);
  const nativeStored = nativeFrames.reduce((sum, f) => sum + f.length, 0);
  log(`cross-checked: every block decodes both ways; stored ${napiStored} (lz4-napi) vs ${nativeStored} (liblz4) bytes`);

  const work = Buffer.allocUnsafe(bound);
  const codecs = {
    'lz4-napi': {
      compress: async () => {
        for (let i = 0; i < blocks.length; i++) {
          compressSync(blocks[i]!);
          if (i % YIELD_EVERY === YIELD_EVERY - 1) await turn();
        }
      },
      decompress: async () => {
        for (let i = 0; i < blocks.length; i++) {
          uncompressSync(napiFrames[i]!);
          if (i % YIELD_EVERY === YIELD_EVERY - 1) await turn();
        }
      },
    },
    liblz4: {
      compress: async () => {
        for (const b of blocks) {
          work.writeUInt32LE(b.length, 0);
          native.compress(b, work.subarray(PREFIX));
        }
      },
      decompress: async () => {
        for (const f of nativeFrames) native.decompress(f.subarray(PREFIX), plain);
      },
    },
  };
  type Name = keyof typeof codecs;
  const trials: Record<string, Trial[]> = {};
  const loads: string[] = [];
  for (let round = 0; round < rounds; round++) {
    loads.push(await loadAverage());
    const order: Name[] = round % 2 === 0 ? ['lz4-napi', 'liblz4'] : ['liblz4', 'lz4-napi'];
    for (const op of ['compress', 'decompress'] as const) {
      for (const name of order) {
        const t = await timeIt(codecs[name][op]);
        (trials[`${name} ${op}`] ??= []).push(t);
        log(`round ${round + 1}: ${name} ${op} ${(bytes / 1e6 / t.cpuSeconds).toFixed(0)} MB/CPU-s, ${(bytes / 1e6 / t.wallSeconds).toFixed(0)} MB/s wall`);
      }
    }
  }
  const lines = [
    '# lz4 codecs on real data: lz4-napi vs liblz4 (bench/lz4-codec.ts)',
    '',
    `${machineLine()}; ${new Date().toISOString().slice(0, 16)}Z; load at each round's start: ${loads.join(' | ')}`,
    '',
    `Sample: ${blocks.length} non-zero 1 MiB blocks spread over ${image}; ${rounds} rounds, codec order alternating. MB = 10^6 bytes of plaintext; CPU = user + system of this process.`,
    `Stored: lz4-napi ${(napiStored / 1e6).toFixed(1)} MB (ratio ${(bytes / napiStored).toFixed(3)}), liblz4 ${(nativeStored / 1e6).toFixed(1)} MB (ratio ${(bytes / nativeStored).toFixed(3)}), both with the 4-byte size prefix.`,
    '',
    '| operation | lz4-napi MB/CPU-s | liblz4 MB/CPU-s | liblz4 / lz4-napi (paired, median; min-max) | lz4-napi MB/s wall | liblz4 MB/s wall |',
    '|---|---|---|---|---|---|',
  ];
  for (const op of ['compress', 'decompress'] as const) {
    const a = trials[`lz4-napi ${op}`]!;
    const b = trials[`liblz4 ${op}`]!;
    const ratios = a.map((t, i) => t.cpuSeconds / b[i]!.cpuSeconds);
    const rate = (ts: Trial[], key: keyof Trial) => median(ts.map((t) => bytes / 1e6 / t[key])).toFixed(0);
    lines.push(`| ${op} | ${rate(a, 'cpuSeconds')} | ${rate(b, 'cpuSeconds')} | ${median(ratios).toFixed(2)}x (${Math.min(...ratios).toFixed(2)}-${Math.max(...ratios).toFixed(2)}) | ${rate(a, 'wallSeconds')} | ${rate(b, 'wallSeconds')} |`);
  }
  lines.push('', `Per round, MB/CPU-s: ${Object.entries(trials).map(([k, ts]) => `${k} ${ts.map((t) => (bytes / 1e6 / t.cpuSeconds).toFixed(0)).join(' ')}`).join('; ')}.`, '');
  const markdown = lines.join('\n');
  process.stdout.write(markdown);
  if (out) await writeFile(out, markdown);
}

await main();
