/**
 * Block-size benchmark: full backup, restore, 1% change + second backup, and metadata size, for each
 * candidate block size, against the read / write / compute ceilings of this machine.
 *
 *   node dist/bench/block-size.js [--size 4G] [--block-sizes 256K,1M,4M] [--dir DIR] [--out bench/results] [--seed S]
 *
 * Every engine operation runs in its own child process (dist/bench/run-op.js) so that its peak RSS is
 * measured alone. Nothing here asserts: a missed target is printed as MISS and the exit code stays 0.
 * MB = 10^6 bytes; every MB/s figure is the disk (image) size divided by the wall time.
 */
import { spawn } from 'node:child_process';
import { rmSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, lstat, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import {
  ENGINE_VERSION,
  KIND_DATA,
  KIND_MAP_LEAF,
  KIND_MAP_NODE,
  LAYOUT,
  Repository,
  formatBytes,
  initRepository,
  parseSize,
  type DiskStats,
} from '../engine/index.js';
import type { BackupOpResult, ComputeOpResult, OpName, OpOutput, OpRequest, OpSuccess, RestoreOpResult } from './op-protocol.js';

const MB = 1e6;
const RUN_OP = fileURLToPath(new URL('./run-op.js', import.meta.url));
const MUTATION_FRACTION = 0.01;
const TARGET_BACKUP_VS_COMPUTE = 0.6;
const TARGET_RESTORE_VS_WRITE = 0.6;
const TARGET_PEAK_RSS_MIB = 300;
/**
 * The repository format measured: 1, named (not `engine init`'s default, 3) because what this bench reports
 * of a repository — its LevelDB index's size, the index's blobs by kind — is format 1's; format 3 keeps its
 * index as segments in the store (its memory and size: bench/v3-index-memory.ts, bench/v3-s3.ts).
 */
const REPOSITORY_FORMAT = 1;
const PAGE_CACHE_NOTE =
  'The page cache cannot be dropped here; instead each backup source is read once with `cat FILE > /dev/null` just before the backup, so every candidate starts warm (the image is served from RAM).';
const MB_NOTE = 'MB = 10^6 bytes; MB/s = disk (image) size / wall time of the operation, whatever the bytes actually read or written.';

// ---------------------------------------------------------------------------------------------------
// Options and machine

interface Settings {
  imageSize: number;
  blockSizes: number[];
  dir: string | undefined;
  out: string;
  seed: string;
}

function parseOptions(): Settings {
  const { values } = parseArgs({
    options: {
      size: { type: 'string', default: '4G' },
      'block-sizes': { type: 'string', default: '256K,1M,4M' },
      dir: { type: 'string' },
      out: { type: 'string', default: 'bench/results' },
      seed: { type: 'string', default: 'block-size-bench' },
    },
    strict: true,
  });
  const blockSizes = values['block-sizes']
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s.length > 0)
    .map(parseSize);
  if (blockSizes.length === 0) throw new Error('--block-sizes names no block size');
  const imageSize = parseSize(values.size);
  if (imageSize <= 0) throw new Error('--size must be more than 0');
  return { imageSize, blockSizes, dir: values.dir, out: values.out, seed: values.seed };
}

interface MachineInfo {
  cpuModel: string;
  cores: number;
  availableParallelism: number;
  totalMemoryBytes: number;
  node: string;
  platform: string;
  release: string;
  workDirBase: string;
}

function machineInfo(workDirBase: string): MachineInfo {
  const cpus = os.cpus();
  return {
    cpuModel: cpus[0]?.model.trim() ?? 'unknown',
    cores: cpus.length,
    availableParallelism: os.availableParallelism(),
    totalMemoryBytes: os.totalmem(),
    node: process.version,
    platform: os.platform(),
    release: os.release(),
    workDirBase,
  };
}

// ---------------------------------------------------------------------------------------------------
// Child processes

const log = (message: string): void => {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${message}\n`);
};

async function runOp<N extends OpName>(request: OpRequest & { op: N }): Promise<OpSuccess<N>> {
  const child = spawn(process.execPath, [RUN_OP, JSON.stringify(request)], { stdio: ['ignore', 'pipe', 'inherit'] });
  let stdout = '';
  child.stdout.setEncoding('utf8');
  child.stdout.on('data', (chunk: string) => (stdout += chunk));
  const code = await new Promise<number | null>((done, fail) => {
    child.on('error', fail);
    child.on('close', (exitCode) => done(exitCode));
  });
  const lines = stdout.split('\n').filter((line) => line.trim().length > 0);
  const last = lines[lines.length - 1];
  if (last === undefined) throw new Error(`run-op ${request.op} printed nothing (exit code ${String(code)})`);
  const output = JSON.parse(last) as OpOutput;
  if (!output.ok) throw new Error(`run-op ${request.op} failed: ${output.error}`);
  if (output.op !== request.op) throw new Error(`run-op answered for ${output.op}, asked ${request.op}`);
  return output as OpSuccess<N>;
}

/** Runs a command, returns its wall time in ms; fails on a non-zero exit. */
async function timedCommand(command: string, args: string[]): Promise<number> {
  const started = performance.now();
  const child = spawn(command, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk: string) => (stderr += chunk));
  const code = await new Promise<number | null>((done, fail) => {
    child.on('error', fail);
    child.on('close', (exitCode) => done(exitCode));
  });
  const wallMs = performance.now() - started;
  if (code !== 0) throw new Error(`${command} ${args.join(' ')} exited with ${String(code)}: ${stderr.trim()}`);
  return wallMs;
}

/** `cat FILE > /dev/null`, exactly as a shell would run it. */
const catToNull = (path: string): Promise<number> => timedCommand('sh', ['-c', 'cat "$1" > /dev/null', 'sh', path]);

/**
 * `sync` (all filesystems) so that no write-back of an earlier step (the generated image, a mutation, a
 * deleted file) competes with the next timed operation for the disk. It does not evict the page cache.
 */
const settle = async (): Promise<void> => {
  await timedCommand('sync', []);
};

async function filesIdentical(a: string, b: string): Promise<boolean> {
  try {
    await timedCommand('cmp', ['-s', a, b]);
    return true;
  } catch {
    return false;
  }
}

// ---------------------------------------------------------------------------------------------------
// Repository metadata

interface DirSize {
  files: number;
  bytes: number;
  diskBytes: number;
}

async function dirSize(path: string): Promise<DirSize> {
  const total: DirSize = { files: 0, bytes: 0, diskBytes: 0 };
  for (const entry of await readdir(path, { withFileTypes: true })) {
    const full = join(path, entry.name);
    if (entry.isDirectory()) {
      const sub = await dirSize(full);
      total.files += sub.files;
      total.bytes += sub.bytes;
      total.diskBytes += sub.diskBytes;
    } else {
      const s = await lstat(full);
      total.files += 1;
      total.bytes += s.size;
      total.diskBytes += s.blocks * 512;
    }
  }
  return total;
}

interface RepoMetadata {
  dataBlobs: number;
  dataFrameBytes: number;
  mapLeafPages: number;
  mapNodePages: number;
  /** Sum of the index `length` (stored frame bytes) of every KIND_MAP_LEAF and KIND_MAP_NODE blob. */
  mapPageBytes: number;
  /** The LevelDB index directory. */
  index: DirSize;
  packs: DirSize;
}

async function repoMetadata(dir: string): Promise<RepoMetadata> {
  const meta: RepoMetadata = {
    dataBlobs: 0,
    dataFrameBytes: 0,
    mapLeafPages: 0,
    mapNodePages: 0,
    mapPageBytes: 0,
    index: { files: 0, bytes: 0, diskBytes: 0 },
    packs: { files: 0, bytes: 0, diskBytes: 0 },
  };
  const repo = await Repository.open(dir, { access: 'exclusive', command: 'bench' });
  try {
    for await (const entry of repo.index.blobs()) {
      if (entry.kind === KIND_MAP_LEAF || entry.kind === KIND_MAP_NODE) {
        meta.mapPageBytes += entry.length;
        if (entry.kind === KIND_MAP_LEAF) meta.mapLeafPages += 1;
        else meta.mapNodePages += 1;
      } else if (entry.kind === KIND_DATA) {
        meta.dataBlobs += 1;
        meta.dataFrameBytes += entry.length;
      }
    }
  } finally {
    await repo.close();
  }
  // Sizes after close: LevelDB has flushed what it holds open.
  meta.index = await dirSize(join(dir, LAYOUT.index));
  meta.packs = await dirSize(join(dir, LAYOUT.packs));
  return meta;
}

// ---------------------------------------------------------------------------------------------------
// Measurements

interface OpMeasure {
  wallS: number;
  mbPerS: number;
  peakRssMiB: number;
  rssBeforeMiB: number;
  rssSamplesMiB: number[];
  cpuUserS: number;
  cpuSystemS: number;
  cpuS: number;
  /** CPU time / (wall time × cores), percent. */
  cpuOfAllCoresPct: number;
}

function measure(output: OpSuccess<OpName>, diskSize: number, cores: number): OpMeasure {
  const wallS = output.wallMs / 1000;
  const cpuUserS = output.cpuUserUs / 1e6;
  const cpuSystemS = output.cpuSystemUs / 1e6;
  return {
    wallS,
    mbPerS: diskSize / MB / wallS,
    peakRssMiB: output.maxRssKiB / 1024,
    rssBeforeMiB: output.rssBeforeMiB,
    rssSamplesMiB: output.rssSamplesMiB,
    cpuUserS,
    cpuSystemS,
    cpuS: cpuUserS + cpuSystemS,
    cpuOfAllCoresPct: ((cpuUserS + cpuSystemS) / wallS / cores) * 100,
  };
}

interface ComputeCeiling extends ComputeOpResult {
  cores: number;
  /** The brief's ceiling: SHA-256 + lz4 of every block, one thread, × cores. */
  plainSingleThreadMbPerS: number;
  plainMbPerS: number;
  /** The engine's own work: zero check of every block, SHA-256 of non-zero ones, lz4 of new ones; × cores. */
  engineWorkSingleThreadMbPerS: number;
  engineWorkMbPerS: number;
  /** lz4 ratio of the new blocks: raw / stored payload. */
  expectedCompressionRatio: number;
}

function computeCeiling(result: ComputeOpResult, cores: number): ComputeCeiling {
  const plainNs = result.shaNonZeroNs + result.shaZeroNs + result.lz4NewNs + result.lz4SkippedNs;
  const engineNs = result.zeroCheckNs + result.shaNonZeroNs + result.lz4NewNs;
  const plainSingle = result.size / MB / (plainNs / 1e9);
  const engineSingle = result.size / MB / (engineNs / 1e9);
  return {
    ...result,
    cores,
    plainSingleThreadMbPerS: plainSingle,
    plainMbPerS: plainSingle * cores,
    engineWorkSingleThreadMbPerS: engineSingle,
    engineWorkMbPerS: engineSingle * cores,
    expectedCompressionRatio: result.newCompressedBytes > 0 ? result.newRawBytes / result.newCompressedBytes : 1,
  };
}

interface TargetCheck {
  blockSize: number;
  check: string;
  measured: number;
  limit: number;
  unit: string;
  /** measured / ceiling for throughput checks (target: ≥ 0.6); measured / limit for RSS (target: ≤ 1). */
  ratio: number;
  pass: boolean;
}

interface BlockSizeResult {
  blockSize: number;
  full: OpMeasure & { stats: DiskStats; mapDepth: number; mapBlocks: number };
  restore: OpMeasure & { bytesWritten: number; blocksZero: number; identical: boolean };
  incremental: OpMeasure & { stats: DiskStats };
  storage: {
    /** Full backup: raw bytes of new chunks / bytes they took in packs (frames included). */
    compressionRatio: number;
    /** Disk size / pack bytes after the full backup (zeros, duplicates and compression together). */
    reductionRatio: number;
    afterFull: RepoMetadata;
    afterIncremental: RepoMetadata;
    /** Growth of packs/ (data + map pages + pack headers) caused by the second backup. */
    incrementalPackGrowthBytes: number;
    incrementalMapPageBytes: number;
  };
  targets: TargetCheck[];
}

interface WriteCeiling {
  command: string;
  runsS: number[];
  /** Median of the runs. */
  wallS: number;
  mbPerS: number;
  /** Allocated size of the copy dd made. */
  fileDiskBytes: number;
}

interface Ceilings {
  read: { command: string; runsS: number[]; medianS: number; mbPerS: number };
  write: WriteCeiling;
  writeSparse: WriteCeiling;
  compute: ComputeCeiling[];
}

const median = (values: number[]): number => {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
};

const blockLabel = (bytes: number): string => formatBytes(bytes).replace(/\.00 /, ' ');

// ---------------------------------------------------------------------------------------------------
// Output

function table(headers: string[], rows: (string | number)[][]): string {
  const line = (cells: (string | number)[]): string => `| ${cells.map(String).join(' | ')} |`;
  return [line(headers), line(headers.map(() => '---')), ...rows.map(line)].join('\n');
}

const f0 = (n: number): string => n.toFixed(0);
const f1 = (n: number): string => n.toFixed(1);
const f2 = (n: number): string => n.toFixed(2);

interface Report {
  benchmark: 'block-size';
  date: string;
  engineVersion: string;
  machine: MachineInfo;
  settings: {
    imageSize: number;
    blockSizes: number[];
    seed: string;
    mutationFraction: number;
    repositoryFormat: number;
    mbDefinition: string;
    pageCache: string;
    writeCeilingCommand: string;
    targets: { backupVsComputeCeiling: number; restoreVsWriteCeiling: number; peakRssMiB: number };
  };
  image: { size: number; dataBytes: number; generateWallS: number; mutation: { writes: number; bytes: number; wallS: number } };
  ceilings: Ceilings;
  results: BlockSizeResult[];
}

function renderMarkdown(report: Report): string {
  const { machine, image, ceilings } = report;
  const out: string[] = [];
  out.push(`# Block-size benchmark (${report.date})`);
  out.push('');
  out.push(
    `Machine: ${machine.cpuModel}, ${machine.cores} cores (availableParallelism ${machine.availableParallelism}), ` +
      `${formatBytes(machine.totalMemoryBytes)} RAM, Node ${machine.node}, ${machine.platform} ${machine.release}. Engine ${report.engineVersion}.`,
  );
  out.push(
    `Image: ${formatBytes(image.size)} (${image.size} B) from generateImage(seed "${report.settings.seed}"), ` +
      `${formatBytes(image.dataBytes)} non-zero (${f1((image.dataBytes / image.size) * 100)}%), generated in ${f1(image.generateWallS)} s. ` +
      `Change: mutateImage(${report.settings.mutationFraction}) = ${image.mutation.writes} writes, ${formatBytes(image.mutation.bytes)}, on a copy.`,
  );
  out.push(`Work directory under ${machine.workDirBase}. Repositories: format ${report.settings.repositoryFormat} folders (its LevelDB index is what the storage table measures).`);
  out.push('');
  out.push(`- ${MB_NOTE}`);
  out.push(`- ${PAGE_CACHE_NOTE}`);
  out.push('- Before every timed step the benchmark runs `sync`, so that write-back of an earlier step (image generation, mutation, a deleted restore) does not compete with it for the disk.');
  out.push('- Each engine operation runs in its own child process; peak RSS = that process\'s maxRSS (whole process, Node itself included); CPU = user + system of all its threads during the operation.');
  out.push('');
  out.push('## Ceilings');
  out.push('');
  const ceilingRows: (string | number)[][] = [
    ['read', `\`${ceilings.read.command}\` (warm, median of ${ceilings.read.runsS.length})`, f2(ceilings.read.medianS), f0(ceilings.read.mbPerS)],
    [
      'write (target basis)',
      `\`${ceilings.write.command}\` (writes ${formatBytes(ceilings.write.fileDiskBytes)}; median of ${ceilings.write.runsS.map(f2).join(', ')} s)`,
      f2(ceilings.write.wallS),
      f0(ceilings.write.mbPerS),
    ],
    [
      'write, sparse (info)',
      `\`${ceilings.writeSparse.command}\` (writes ${formatBytes(ceilings.writeSparse.fileDiskBytes)}, holes for zeros as restore leaves; median of ${ceilings.writeSparse.runsS.map(f2).join(', ')} s)`,
      f2(ceilings.writeSparse.wallS),
      f0(ceilings.writeSparse.mbPerS),
    ],
  ];
  for (const c of ceilings.compute) {
    ceilingRows.push([
      `compute ${blockLabel(c.blockSize)} (target basis)`,
      `SHA-256 + lz4 compressSync of every block, 1 thread ${f0(c.plainSingleThreadMbPerS)} MB/s × ${c.cores} cores`,
      f2(c.size / MB / c.plainMbPerS),
      f0(c.plainMbPerS),
    ]);
    ceilingRows.push([
      `compute ${blockLabel(c.blockSize)}, engine work (info)`,
      `zero check all, SHA-256 of ${c.blocks - c.zeroBlocks} non-zero, lz4 of ${c.newBlocks} new blocks; 1 thread ${f0(c.engineWorkSingleThreadMbPerS)} MB/s × ${c.cores}`,
      f2(c.size / MB / c.engineWorkMbPerS),
      f0(c.engineWorkMbPerS),
    ]);
  }
  out.push(table(['ceiling', 'how', 's', 'MB/s'], ceilingRows));
  out.push('');
  out.push('## Operations');
  out.push('');
  const opRows: (string | number)[][] = [];
  for (const r of report.results) {
    const row = (name: string, m: OpMeasure, note: string): (string | number)[] => [
      blockLabel(r.blockSize),
      name,
      f2(m.wallS),
      f0(m.mbPerS),
      f0(m.peakRssMiB),
      `${f1(m.cpuS)} (${f1(m.cpuUserS)} u + ${f1(m.cpuSystemS)} s)`,
      f0(m.cpuOfAllCoresPct),
      note,
    ];
    opRows.push(row('full backup', r.full, `${r.full.stats.blocksNew} new, ${r.full.stats.blocksZero} zero, ${r.full.stats.blocksDeduplicated} dedup of ${r.full.stats.blocksTotal}`));
    opRows.push(row('restore', r.restore, `${formatBytes(r.restore.bytesWritten)} written + fsync; identical: ${r.restore.identical ? 'yes' : 'NO'}`));
    opRows.push(row('2nd backup (1% changed)', r.incremental, `${r.incremental.stats.blocksNew} new blocks, ${formatBytes(r.incremental.stats.bytesStored)} stored`));
  }
  out.push(table(['block', 'operation', 'wall s', 'MB/s', 'peak RSS MiB', 'CPU s', 'CPU % of all cores', 'notes'], opRows));
  out.push('');
  out.push('## Targets (reported, never enforced)');
  out.push('');
  const targetRows: (string | number)[][] = [];
  for (const r of report.results) {
    for (const t of r.targets) {
      targetRows.push([blockLabel(t.blockSize), t.check, `${f0(t.measured)} ${t.unit}`, `${f0(t.limit)} ${t.unit}`, f2(t.ratio), t.pass ? 'PASS' : 'MISS']);
    }
  }
  out.push(table(['block', 'check', 'measured', 'ceiling / limit', 'ratio', 'result'], targetRows));
  out.push('');
  out.push('## Storage');
  out.push('');
  const storageRows = report.results.map((r) => {
    const s = r.storage;
    return [
      blockLabel(r.blockSize),
      formatBytes(r.full.stats.bytesStored),
      f2(s.compressionRatio),
      f2(s.reductionRatio),
      `${r.incremental.stats.blocksNew} (${formatBytes(r.incremental.stats.bytesNew)} raw)`,
      formatBytes(r.incremental.stats.bytesStored),
      formatBytes(s.incrementalPackGrowthBytes),
      `${formatBytes(s.afterFull.mapPageBytes)} / ${formatBytes(s.afterIncremental.mapPageBytes)} (${s.afterIncremental.mapLeafPages} leaf + ${s.afterIncremental.mapNodePages} node)`,
      `${formatBytes(s.afterFull.index.bytes)} / ${formatBytes(s.afterIncremental.index.bytes)}`,
    ];
  });
  out.push(
    table(
      [
        'block',
        'full: bytesStored',
        'compression (raw new / stored)',
        'disk size / packs',
        '2nd: new blocks',
        '2nd: bytesStored',
        '2nd: packs growth',
        'map pages after full / after 2nd',
        'index dir after full / after 2nd',
      ],
      storageRows,
    ),
  );
  out.push('');
  out.push(
    'bytesStored = compressed data frames of new blocks (DiskStats); packs growth also counts map pages and pack headers. ' +
      'Map page bytes = sum of index `length` of KIND_MAP_LEAF/KIND_MAP_NODE entries; index dir = apparent size of the LevelDB directory.',
  );
  return out.join('\n');
}

// ---------------------------------------------------------------------------------------------------
// The run

async function main(): Promise<void> {
  const settings = parseOptions();
  const base = settings.dir ? resolve(settings.dir) : os.tmpdir();
  await mkdir(base, { recursive: true });
  const machine = machineInfo(base);
  const cores = machine.availableParallelism;
  const work = await mkdtemp(join(base, 'block-size-bench-'));
  const cleanUp = (): void => rmSync(work, { recursive: true, force: true });
  const onSignal = (signal: NodeJS.Signals): void => {
    log(`${signal}: removing ${work}`);
    cleanUp();
    process.exit(130);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  const date = new Date().toISOString();
  log(`work directory ${work}`);

  try {
    const image = join(work, 'image.raw');
    const copy = join(work, 'image-changed.raw');

    log(`generating a ${formatBytes(settings.imageSize)} image`);
    const generated = await runOp({ op: 'generate', path: image, size: settings.imageSize, seed: settings.seed });
    const diskSize = generated.result.size;

    // The generated image is still being written back: let that finish before anything is timed.
    await settle();

    // Read ceiling: one warm-up cat, then the median of three.
    log('read ceiling (cat)');
    await catToNull(image);
    const readRuns: number[] = [];
    for (let i = 0; i < 3; i += 1) readRuns.push((await catToNull(image)) / 1000);
    const readMedian = median(readRuns);

    // Write ceilings: dd with fsync at the end, as restore syncs its target before it reports success.
    // Median of three runs each: the virtual disk is noisy. The last sparse copy stays, to be mutated.
    const ddCopy = async (conv: string, keep: boolean): Promise<WriteCeiling> => {
      const runsS: number[] = [];
      let fileDiskBytes = 0;
      for (let i = 0; i < 3; i += 1) {
        await rm(copy, { force: true });
        await catToNull(image);
        await settle();
        runsS.push((await timedCommand('dd', [`if=${image}`, `of=${copy}`, 'bs=4M', `conv=${conv}`, 'status=none'])) / 1000);
        const copied = await stat(copy);
        if (copied.size !== diskSize) throw new Error(`dd conv=${conv} made a ${copied.size} B copy of a ${diskSize} B image`);
        fileDiskBytes = copied.blocks * 512;
      }
      if (!keep) await rm(copy, { force: true });
      const wallS = median(runsS);
      return { command: `dd if=IMAGE of=COPY bs=4M conv=${conv}`, runsS, wallS, mbPerS: diskSize / MB / wallS, fileDiskBytes };
    };
    log('write ceiling (dd conv=fsync, 3 runs)');
    const write = await ddCopy('fsync', false);
    log('write ceiling, sparse (dd conv=sparse,fsync, 3 runs)');
    const writeSparse = await ddCopy('sparse,fsync', true);
    if (!(await filesIdentical(image, copy))) throw new Error('the dd copy differs from the image');

    // The changed image for every candidate's second backup: the copy, mutated once (deterministic).
    log(`mutating ${MUTATION_FRACTION * 100}% of the copy`);
    const mutation = await runOp({ op: 'mutate', path: copy, fraction: MUTATION_FRACTION, seed: `${settings.seed}/change` });
    await settle();

    const ceilings: Ceilings = {
      read: { command: 'cat IMAGE > /dev/null', runsS: readRuns, medianS: readMedian, mbPerS: diskSize / MB / readMedian },
      write,
      writeSparse,
      compute: [],
    };

    for (const blockSize of settings.blockSizes) {
      log(`compute ceiling, ${blockLabel(blockSize)} blocks (1 thread)`);
      const result = await runOp({ op: 'compute', image, blockSize });
      ceilings.compute.push(computeCeiling(result.result, cores));
    }

    const results: BlockSizeResult[] = [];
    for (const [i, blockSize] of settings.blockSizes.entries()) {
      const label = blockLabel(blockSize);
      const ceiling = ceilings.compute[i]!;
      const repo = join(work, `repo-${blockSize}`);
      const restored = join(work, `restored-${blockSize}.raw`);
      await initRepository(repo, { blockSize, format: REPOSITORY_FORMAT });

      log(`${label}: full backup`);
      await catToNull(image);
      await settle();
      const full = await runOp({ op: 'backup', repo, source: image, diskName: 'disk', name: 'full' });
      const afterFull = await repoMetadata(repo);

      log(`${label}: restore`);
      await settle();
      const rest = await runOp({ op: 'restore', repo, backupId: full.result.backupId, to: restored });
      const restoreResult: RestoreOpResult = rest.result;
      const identical = await filesIdentical(image, restored);

      log(`${label}: second backup of the changed copy`);
      await rm(restored, { force: true });
      await catToNull(copy);
      await settle();
      const incr = await runOp({ op: 'backup', repo, source: copy, diskName: 'disk', name: 'changed' });
      const afterIncremental = await repoMetadata(repo);
      await rm(repo, { recursive: true, force: true });

      const fullResult: BackupOpResult = full.result;
      const fullMeasure = measure(full, diskSize, cores);
      const restoreMeasure = measure(rest, diskSize, cores);
      const incrMeasure = measure(incr, diskSize, cores);
      const targets: TargetCheck[] = [
        {
          blockSize,
          check: `full backup ≥ ${TARGET_BACKUP_VS_COMPUTE * 100}% of compute ceiling (SHA-256 + lz4 × ${cores} cores)`,
          measured: fullMeasure.mbPerS,
          limit: ceiling.plainMbPerS,
          unit: 'MB/s',
          ratio: fullMeasure.mbPerS / ceiling.plainMbPerS,
          pass: fullMeasure.mbPerS >= TARGET_BACKUP_VS_COMPUTE * ceiling.plainMbPerS,
        },
        {
          blockSize,
          check: `(info) full backup vs engine-work compute ceiling, same ${TARGET_BACKUP_VS_COMPUTE * 100}% bar`,
          measured: fullMeasure.mbPerS,
          limit: ceiling.engineWorkMbPerS,
          unit: 'MB/s',
          ratio: fullMeasure.mbPerS / ceiling.engineWorkMbPerS,
          pass: fullMeasure.mbPerS >= TARGET_BACKUP_VS_COMPUTE * ceiling.engineWorkMbPerS,
        },
        {
          blockSize,
          check: `restore ≥ ${TARGET_RESTORE_VS_WRITE * 100}% of write ceiling (dd conv=fsync)`,
          measured: restoreMeasure.mbPerS,
          limit: ceilings.write.mbPerS,
          unit: 'MB/s',
          ratio: restoreMeasure.mbPerS / ceilings.write.mbPerS,
          pass: restoreMeasure.mbPerS >= TARGET_RESTORE_VS_WRITE * ceilings.write.mbPerS,
        },
        {
          blockSize,
          check: `(info) restore vs sparse write ceiling (dd conv=sparse,fsync), same ${TARGET_RESTORE_VS_WRITE * 100}% bar`,
          measured: restoreMeasure.mbPerS,
          limit: ceilings.writeSparse.mbPerS,
          unit: 'MB/s',
          ratio: restoreMeasure.mbPerS / ceilings.writeSparse.mbPerS,
          pass: restoreMeasure.mbPerS >= TARGET_RESTORE_VS_WRITE * ceilings.writeSparse.mbPerS,
        },
        ...(
          [
            ['full backup', fullMeasure],
            ['restore', restoreMeasure],
            ['2nd backup', incrMeasure],
          ] as const
        ).map(([name, m]) => ({
          blockSize,
          check: `${name} peak RSS ≤ ${TARGET_PEAK_RSS_MIB} MiB`,
          measured: m.peakRssMiB,
          limit: TARGET_PEAK_RSS_MIB,
          unit: 'MiB',
          ratio: m.peakRssMiB / TARGET_PEAK_RSS_MIB,
          pass: m.peakRssMiB <= TARGET_PEAK_RSS_MIB,
        })),
      ];
      results.push({
        blockSize,
        full: { ...fullMeasure, stats: fullResult.stats, mapDepth: fullResult.mapDepth, mapBlocks: fullResult.mapBlocks },
        restore: { ...restoreMeasure, bytesWritten: restoreResult.bytesWritten, blocksZero: restoreResult.blocksZero, identical },
        incremental: { ...incrMeasure, stats: incr.result.stats },
        storage: {
          compressionRatio: fullResult.stats.bytesStored > 0 ? fullResult.stats.bytesNew / fullResult.stats.bytesStored : 1,
          reductionRatio: afterFull.packs.bytes > 0 ? diskSize / afterFull.packs.bytes : 0,
          afterFull,
          afterIncremental,
          incrementalPackGrowthBytes: afterIncremental.packs.bytes - afterFull.packs.bytes,
          incrementalMapPageBytes: afterIncremental.mapPageBytes - afterFull.mapPageBytes,
        },
        targets,
      });
      log(`${label}: full ${f0(fullMeasure.mbPerS)} MB/s, restore ${f0(restoreMeasure.mbPerS)} MB/s, 2nd ${f0(incrMeasure.mbPerS)} MB/s`);
    }

    const report: Report = {
      benchmark: 'block-size',
      date,
      engineVersion: ENGINE_VERSION,
      machine,
      settings: {
        imageSize: settings.imageSize,
        blockSizes: settings.blockSizes,
        seed: settings.seed,
        mutationFraction: MUTATION_FRACTION,
        repositoryFormat: REPOSITORY_FORMAT,
        mbDefinition: MB_NOTE,
        pageCache: PAGE_CACHE_NOTE,
        writeCeilingCommand: write.command,
        targets: { backupVsComputeCeiling: TARGET_BACKUP_VS_COMPUTE, restoreVsWriteCeiling: TARGET_RESTORE_VS_WRITE, peakRssMiB: TARGET_PEAK_RSS_MIB },
      },
      image: {
        size: diskSize,
        dataBytes: generated.result.dataBytes,
        generateWallS: generated.wallMs / 1000,
        mutation: { ...mutation.result, wallS: mutation.wallMs / 1000 },
      },
      ceilings,
      results,
    };

    const outDir = resolve(settings.out);
    await mkdir(outDir, { recursive: true });
    const outFile = join(outDir, `block-size-${date.replace(/\.\d+Z$/, 'Z').replace(/:/g, '-')}.json`);
    await writeFile(outFile, `${JSON.stringify(report, null, 2)}\n`);
    process.stdout.write(`${renderMarkdown(report)}\n\nJSON: ${outFile}\n`);
  } finally {
    log(`removing ${work}`);
    await rm(work, { recursive: true, force: true });
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

await main();
