/**
 * Runs ONE benchmark operation through the public API and prints one JSON line (bench/op-protocol.ts)
 * with its result, wall time, CPU time and the process's peak RSS. bench/block-size.ts spawns one of these
 * per operation, so that maxRSS is the peak of that operation alone.
 *
 *   node dist/bench/run-op.js '{"op":"backup","repo":"/tmp/r","source":"/tmp/img","diskName":"disk","name":"full"}'
 */
import { createHash } from 'node:crypto';
import { closeSync, fstatSync, openSync, readSync } from 'node:fs';
import { compressSync } from 'lz4-napi';
import { backup, generateImage, mutateImage, restore } from '../engine/index.js';
import type { ComputeOpResult, OpFailure, OpName, OpRequest, OpResults, OpSuccess } from './op-protocol.js';

const MiB = 1024 * 1024;

function parseRequest(text: string | undefined): OpRequest {
  if (text === undefined) throw new Error('usage: run-op.js <operation as JSON>');
  const value: unknown = JSON.parse(text);
  if (typeof value !== 'object' || value === null) throw new Error('the operation is not a JSON object');
  const op = (value as { op?: unknown }).op;
  if (op !== 'generate' && op !== 'mutate' && op !== 'backup' && op !== 'restore' && op !== 'compute') {
    throw new Error(`unknown operation ${JSON.stringify(op)}`);
  }
  return value as OpRequest;
}

const nextTurn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

/** SHA-256 + lz4 (and the engine's zero check) on one thread, block by block; only the compute is timed. */
async function compute(image: string, blockSize: number): Promise<ComputeOpResult> {
  const fd = openSync(image, 'r');
  const result: ComputeOpResult = {
    blockSize,
    size: 0,
    blocks: 0,
    zeroBlocks: 0,
    duplicateBlocks: 0,
    newBlocks: 0,
    newRawBytes: 0,
    newCompressedBytes: 0,
    zeroCheckNs: 0,
    shaNonZeroNs: 0,
    shaZeroNs: 0,
    lz4NewNs: 0,
    lz4SkippedNs: 0,
  };
  try {
    const size = fstatSync(fd).size;
    result.size = size;
    const buffer = Buffer.allocUnsafe(blockSize);
    const zeros = Buffer.alloc(blockSize);
    const seen = new Set<string>();
    let sinceYield = 0;
    for (let offset = 0; offset < size; offset += blockSize) {
      const length = Math.min(blockSize, size - offset);
      let filled = 0;
      while (filled < length) {
        const got = readSync(fd, buffer, filled, length - filled, offset + filled);
        if (got === 0) throw new Error(`${image} ended at ${offset + filled} of ${size} bytes`);
        filled += got;
      }
      const block = buffer.subarray(0, length);
      result.blocks += 1;

      let t0 = process.hrtime.bigint();
      const zero = block.equals(zeros.subarray(0, length));
      let t1 = process.hrtime.bigint();
      result.zeroCheckNs += Number(t1 - t0);

      t0 = process.hrtime.bigint();
      const id = createHash('sha256').update(block).digest('hex');
      t1 = process.hrtime.bigint();
      if (zero) result.shaZeroNs += Number(t1 - t0);
      else result.shaNonZeroNs += Number(t1 - t0);

      const fresh = !zero && !seen.has(id);
      t0 = process.hrtime.bigint();
      const compressed = compressSync(block);
      t1 = process.hrtime.bigint();
      if (fresh) {
        result.lz4NewNs += Number(t1 - t0);
        seen.add(id);
        result.newBlocks += 1;
        result.newRawBytes += length;
        result.newCompressedBytes += Math.min(compressed.length, length);
      } else {
        result.lz4SkippedNs += Number(t1 - t0);
        if (zero) result.zeroBlocks += 1;
        else result.duplicateBlocks += 1;
      }
      // lz4-napi frees its output buffers from finalizers that run only when the event loop turns.
      sinceYield += length;
      if (sinceYield >= 4 * MiB) {
        sinceYield = 0;
        await nextTurn();
      }
    }
  } finally {
    closeSync(fd);
  }
  return result;
}

async function runOp(request: OpRequest): Promise<OpResults[OpName]> {
  switch (request.op) {
    case 'generate': {
      const image = await generateImage(request.path, request.size, request.seed);
      return { size: image.size, dataBytes: image.dataBytes };
    }
    case 'mutate': {
      const writes = await mutateImage(request.path, request.fraction, request.seed);
      return { writes: writes.length, bytes: writes.reduce((sum, w) => sum + w.length, 0) };
    }
    case 'backup': {
      const { record } = await backup({ repo: request.repo, from: { kind: 'disks', disks: [{ kind: 'raw', path: request.source, name: request.diskName }] }, name: request.name });
      const disk = record.disks[0]!;
      return { backupId: record.id, blockSize: record.blockSize, size: disk.size, mapDepth: disk.map.depth, mapBlocks: disk.map.blocks, stats: disk.stats };
    }
    case 'restore': {
      const restored = await restore({ repo: request.repo, backupId: request.backupId, target: { kind: 'path', path: request.to } });
      const disk = restored.disks[0]!;
      return { size: disk.size, bytesWritten: disk.bytesWritten, blocksZero: disk.blocksZero };
    }
    case 'compute':
      return compute(request.image, request.blockSize);
  }
}

function downsample(values: number[], count: number): number[] {
  if (values.length <= count) return values;
  return Array.from({ length: count }, (_, i) => values[Math.round((i * (values.length - 1)) / (count - 1))]!);
}

const mib = (bytes: number): number => Math.round((bytes / MiB) * 10) / 10;

async function main(): Promise<void> {
  let opName = 'unknown';
  try {
    const request = parseRequest(process.argv[2]);
    opName = request.op;
    const rssBefore = process.memoryUsage.rss();
    const samples: number[] = [];
    const sampler = setInterval(() => samples.push(mib(process.memoryUsage.rss())), 250);
    const cpuStart = process.cpuUsage();
    const started = performance.now();
    let result: OpResults[OpName];
    try {
      result = await runOp(request);
    } finally {
      clearInterval(sampler);
    }
    const wallMs = performance.now() - started;
    const cpu = process.cpuUsage(cpuStart);
    const total = process.cpuUsage();
    const output: OpSuccess<OpName> = {
      ok: true,
      op: request.op,
      result,
      wallMs,
      cpuUserUs: cpu.user,
      cpuSystemUs: cpu.system,
      processCpuUserUs: total.user,
      processCpuSystemUs: total.system,
      maxRssKiB: process.resourceUsage().maxRSS,
      rssBeforeMiB: mib(rssBefore),
      rssSamplesMiB: downsample(samples, 24),
    };
    process.stdout.write(`${JSON.stringify(output)}\n`);
  } catch (error) {
    const output: OpFailure = { ok: false, op: opName, error: error instanceof Error ? `${error.name}: ${error.message}` : String(error) };
    process.stdout.write(`${JSON.stringify(output)}\n`);
    process.exitCode = 1;
  }
}

await main();
