/**
 * Thin disks of many TiB (issue 15, item 6): the time of a backup, incremental, restore and verify against
 * the data they hold, the hole walk in TiB of holes per second for each kind of source, and peak RSS at
 * several disk sizes holding the same data (the bar: peak memory must not grow with disk size).
 *
 *   npx tsc -p tsconfig.json && node dist/bench/scale.js [--dir /var/tmp/engine-scale] [--data-mib 16]
 *     [--sizes 1G,1T,15T] [--real /var/tmp/engine-real-image/usr.img] [--real-only]
 *
 * The recipe, exactly:
 * - Raw: `truncate -s SIZE thin-SIZE.raw`, then DATA MiB of random bytes (one file, the same for every size)
 *   written at offset min(SIZE / 2, SIZE - DATA) rounded down to 1 MiB; ext4 caps a file at 16 TiB - 4 KiB,
 *   so the largest raw disk is 15 TiB. Each size: a full backup (`engine backup --source`, cold), a second
 *   full (all deduplicated), a restore to a new file and `verify` / `verify --read-data`.
 * - qcow2: `qemu-img create -f qcow2 thin.qcow2 16T`, the same DATA MiB written with `qemu-io write -s` at
 *   8 TiB; `engine backup --image` (full, adds the bitmap), then 1% of DATA (at least 1 MiB) rewritten
 *   with `qemu-io write -P` at 12 TiB and `engine backup --image` again (incremental), then its restore
 *   to a new qcow2 (`--to-qcow2`: ext4 holds no raw file of 16 TiB).
 * - Hole walk alone, no backup: `qemu-img map` of the largest raw file (the file source's walk), and the
 *   base:allocation walk of the NBD client over `qemu-nbd` (the qcow2) and over `nbdkit file` (the raw file).
 * - --real IMAGE (run once: it writes 16 GiB to the shared disk): a 64 GiB sparse raw file holding the
 *   allocated extents of IMAGE (`qemu-img map -f raw`; bench/real-image.sh's 3 GiB ext4 of /usr, 1.75 GiB
 *   allocated) copied at offsets 0, 6, 12, ... GiB, at their own offsets within each copy, until 16 GiB of
 *   data (9+ copies); in each copy the first byte of every MiB is set to the copy's number (1, 2, ...), so
 *   the copies do not deduplicate against each other. A full backup, a second backup after one byte was
 *   changed every 100 MiB (the source has no CBT: it reads all, stores only those blocks), a restore of the
 *   full; all deleted at the end.
 *
 * Every timed step runs as users run it (bin/engine, a private ENGINE_CACHE_DIR) after dropping the page
 * cache (root). Figures are one run each; the load average is printed beside each. Nothing is written to
 * bench/results.
 */
import { open, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { NbdClient } from '../engine/index.js';
import { arg, coldTimed, dropCaches, ENGINE, initRepository, loadAverage, logger, machineLine, privateEngineCache, run, sh, timed, type Measured } from './tools.js';

const log = logger('scale');
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const TiB = 1024 * GiB;

function parseSize(text: string): number {
  const match = /^(\d+)([GT])$/.exec(text);
  if (!match) throw new Error(`size ${text}: give NG or NT`);
  return Number(match[1]) * (match[2] === 'T' ? TiB : GiB);
}

function sizeName(bytes: number): string {
  return bytes >= TiB ? `${bytes / TiB} TiB` : `${bytes / GiB} GiB`;
}

interface Row {
  step: string;
  measured: Measured;
  load: string;
  note?: string;
}

const rows: Row[] = [];

function print(row: Row): void {
  const { seconds, cpuSeconds, peakRssMiB } = row.measured;
  const line = `${row.step.padEnd(52)} ${seconds.toFixed(2).padStart(8)} s wall ${cpuSeconds.toFixed(2).padStart(7)} CPU-s ${peakRssMiB.toFixed(0).padStart(5)} MiB peak RSS  load ${row.load}${row.note ? `  ${row.note}` : ''}`;
  process.stdout.write(`${line}\n`);
}

async function step(name: string, command: string, args: string[], note?: (measured: Measured) => string): Promise<Measured> {
  const load = await loadAverage();
  const measured = await coldTimed(command, args);
  const row: Row = { step: name, measured, load, note: note?.(measured) };
  rows.push(row);
  print(row);
  return measured;
}

interface DiskJson {
  durationMs: number;
  bytesRead: number;
  blocksZero: number;
  blocksUnchanged: number;
}

function diskOf(measured: Measured): DiskJson {
  return (JSON.parse(measured.stdout) as { disks: DiskJson[] }).disks[0]!;
}

/** The hole walk rate a backup achieved: bytes it did not read (holes, unchanged) per second of its disk's pipeline. */
function holeRate(size: number, measured: Measured): string {
  const disk = diskOf(measured);
  const holes = size - disk.bytesRead;
  return `disk ${(disk.durationMs / 1000).toFixed(2)} s, ${(holes / TiB / (disk.durationMs / 1000)).toFixed(2)} TiB/s of holes`;
}

async function backup(name: string, repo: string, args: string[], size: number): Promise<{ id: string; measured: Measured }> {
  const measured = await step(name, ENGINE, ['backup', '--repo', repo, '--json', ...args], (m) => holeRate(size, m));
  return { id: (JSON.parse(measured.stdout) as { id: string }).id, measured };
}

async function writeAt(path: string, data: Buffer, offset: number): Promise<void> {
  const handle = await open(path, 'r+');
  try {
    await handle.write(data, 0, data.length, offset);
  } finally {
    await handle.close();
  }
}

/** Times a base:allocation walk of a whole NBD export by the engine's NBD client. */
async function nbdWalk(name: string, uri: string): Promise<void> {
  const client = await NbdClient.connect(uri, { metaContexts: ['base:allocation'] });
  try {
    const started = performance.now();
    const cpu = process.cpuUsage();
    let extents = 0;
    let zero = 0;
    for await (const extent of client.blockStatus('base:allocation')) {
      extents += 1;
      if ((extent.flags & 2) !== 0) zero += extent.length;
    }
    const seconds = (performance.now() - started) / 1000;
    const used = process.cpuUsage(cpu);
    process.stdout.write(`${`hole walk, ${name}`.padEnd(52)} ${seconds.toFixed(2).padStart(8)} s wall ${((used.user + used.system) / 1e6).toFixed(2).padStart(7)} CPU-s (this process)  ${(zero / TiB / seconds).toFixed(2)} TiB/s of holes, ${extents} extents  load ${await loadAverage()}\n`);
  } finally {
    await client.close();
  }
}

/**
 * Starts a server that forks into the background and waits for its pid file. qemu-nbd --fork writes the file before
 * its parent exits; nbdkit's parent exits at once and the server writes the file only once it listens, so the file
 * can be missing, or empty, when the command returns: read it until it holds a whole line (10 s at most).
 */
async function serve(command: string, args: string[], pidFile: string): Promise<() => Promise<void>> {
  await sh(command, args);
  const deadline = performance.now() + 10_000;
  let pid = 0;
  for (;;) {
    const text = await readFile(pidFile, 'utf8').catch(() => '');
    if (/^[0-9]+\n/.test(text)) {
      pid = Number(text.trim());
      break;
    }
    if (performance.now() > deadline) throw new Error(`${command} wrote no pid to ${pidFile} within 10 s`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return async () => {
    try {
      process.kill(pid, 'SIGTERM');
    } catch {
      // already gone
    }
  };
}

async function thinDisks(dir: string, dataMiB: number, sizes: number[]): Promise<void> {
  const data = randomBytes(dataMiB * MiB);
  const dataFile = join(dir, 'data.bin');
  await writeFile(dataFile, data);
  const repo = join(dir, 'repo');
  // What a run cut short left (it is this bench's own directory).
  await rm(repo, { recursive: true, force: true });
  await initRepository(repo);
  let largest = '';
  for (const size of sizes) {
    const raw = join(dir, `thin-${size}.raw`);
    await run('truncate', ['-s', String(size), raw]);
    const at = Math.floor(Math.min(size / 2, size - data.length) / MiB) * MiB;
    await writeAt(raw, data, at);
    await dropCaches();
    const full = await backup(`raw ${sizeName(size)}, ${dataMiB} MiB: full`, repo, ['--source', raw], size);
    await backup(`raw ${sizeName(size)}, ${dataMiB} MiB: second full (deduplicated)`, repo, ['--source', raw], size);
    const target = join(dir, 'restored.raw');
    await step(`raw ${sizeName(size)}, ${dataMiB} MiB: restore to a new file`, ENGINE, ['restore', '--repo', repo, full.id, '--to', target]);
    const check = Buffer.alloc(data.length);
    const handle = await open(target, 'r');
    await handle.read(check, 0, check.length, at).finally(() => handle.close());
    if (!check.equals(data)) throw new Error(`the restore of ${raw} does not hold the data at ${at}`);
    await rm(target);
    await step(`raw ${sizeName(size)}, ${dataMiB} MiB: verify`, ENGINE, ['verify', '--repo', repo]);
    await step(`raw ${sizeName(size)}, ${dataMiB} MiB: verify --read-data`, ENGINE, ['verify', '--repo', repo, '--read-data']);
    if (largest) await rm(largest);
    largest = raw;
  }
  const largestSize = sizes[sizes.length - 1]!;
  // The file source's own walk: qemu-img map, as file-holes.ts runs it.
  const map = await timed('qemu-img', ['map', '--output=json', '-U', '-f', 'raw', largest]);
  process.stdout.write(`${`hole walk, raw ${sizeName(largestSize)} (qemu-img map)`.padEnd(52)} ${map.seconds.toFixed(2).padStart(8)} s wall ${map.cpuSeconds.toFixed(2).padStart(7)} CPU-s  ${(largestSize / TiB / map.seconds).toFixed(2)} TiB/s  load ${await loadAverage()}\n`);
  const nbdkitPid = join(dir, 'nbdkit.pid');
  const nbdkitSocket = join(dir, 'nbdkit.sock');
  const stopNbdkit = await serve('nbdkit', ['-U', nbdkitSocket, '-P', nbdkitPid, '-r', 'file', largest], nbdkitPid);
  try {
    await nbdWalk(`raw ${sizeName(largestSize)} through nbdkit file`, `nbd+unix:///?socket=${nbdkitSocket}`);
    await backup(`NBD (nbdkit file) ${sizeName(largestSize)}: full`, repo, ['--source', `nbd+unix:///?socket=${nbdkitSocket}`], largestSize);
  } finally {
    await stopNbdkit();
  }
  await rm(largest);

  const image = join(dir, 'thin.qcow2');
  const qsize = 16 * TiB;
  await sh('qemu-img', ['create', '-q', '-f', 'qcow2', image, '16T']);
  await sh('qemu-io', ['-f', 'qcow2', '-c', `write -q -s ${dataFile} ${8 * TiB} ${data.length}`, image]);
  const qemuPid = join(dir, 'qemu-nbd.pid');
  const qemuSocket = join(dir, 'qemu-nbd.sock');
  const stopQemu = await serve('qemu-nbd', ['-r', '-f', 'qcow2', '--socket', qemuSocket, '--fork', '--pid-file', qemuPid, '--shared', '4', image], qemuPid);
  try {
    await nbdWalk('qcow2 16 TiB through qemu-nbd', `nbd+unix:///?socket=${qemuSocket}`);
  } finally {
    await stopQemu();
  }
  await backup(`qcow2 16 TiB, ${dataMiB} MiB: --image full`, repo, ['--image', image], qsize);
  const changed = Math.max(1, Math.round(dataMiB / 100));
  await sh('qemu-io', ['-f', 'qcow2', '-c', `write -q -P 0x5a ${12 * TiB} ${changed * MiB}`, image]);
  const incremental = await backup(`qcow2 16 TiB: --image incremental (${changed} MiB changed)`, repo, ['--image', image], qsize);
  // A new qcow2: ext4 holds no raw file of 16 TiB (its limit is 16 TiB - 4 KiB).
  const target = join(dir, 'restored.qcow2');
  await step('qcow2 16 TiB: restore of the incremental to a new qcow2', ENGINE, ['restore', '--repo', repo, incremental.id, '--to-qcow2', target]);
  await rm(target);
  await rm(image);
  await rm(repo, { recursive: true, force: true });
  await rm(dataFile);
}

/** Where each copy of the real image starts in the 64 GiB file: 10 copies of a 3 GiB image fit. */
const COPY_STRIDE = 6 * GiB;

/** The 64 GiB image of 16 GiB of real data (see the recipe above). */
async function realData(dir: string, source: string): Promise<void> {
  const map = JSON.parse(await sh('qemu-img', ['map', '--output=json', '-U', '-f', 'raw', source])) as { start: number; length: number; data: boolean }[];
  const extents = map.filter((extent) => extent.data);
  const REAL_SPAN = (map[map.length - 1]!.start + map[map.length - 1]!.length);
  const image = join(dir, 'real-64g.raw');
  await run('truncate', ['-s', String(64 * GiB), image]);
  const input = await open(source, 'r');
  const output = await open(image, 'r+');
  const buffer = Buffer.alloc(8 * MiB);
  let written = 0;
  try {
    for (let copy = 0; copy * COPY_STRIDE + REAL_SPAN <= 64 * GiB && written < 16 * GiB; copy += 1) {
      const base = copy * COPY_STRIDE;
      for (const extent of extents) {
        for (let at = extent.start; at < extent.start + extent.length && written < 16 * GiB; at += buffer.length) {
          const length = Math.min(buffer.length, extent.start + extent.length - at, 16 * GiB - written);
          const { bytesRead } = await input.read(buffer, 0, length, at);
          // One byte per MiB says which copy this is, so copies do not deduplicate against each other.
          for (let mib = Math.ceil(at / MiB) * MiB; mib < at + bytesRead; mib += MiB) buffer[mib - at] = copy + 1;
          await output.write(buffer, 0, bytesRead, base + at);
          written += bytesRead;
        }
      }
    }
  } finally {
    await input.close();
    await output.close();
  }
  log(`${image}: ${(written / GiB).toFixed(2)} GiB of data from ${source}'s ${extents.length} allocated extents`);
  const repo = join(dir, 'repo-real');
  await rm(repo, { recursive: true, force: true });
  await initRepository(repo);
  try {
    const full = await backup('real 64 GiB, 16 GiB data: full', repo, ['--source', image], 64 * GiB);
    // 1% of the MiBs changed (one byte each): the second backup reads all, stores only those.
    const handle = await open(image, 'r+');
    try {
      const stride = 100 * MiB;
      for (let at = 0; at < 64 * GiB; at += stride) await handle.write(Buffer.from([0xee]), 0, 1, at + 4096);
    } finally {
      await handle.close();
    }
    await backup('real 64 GiB: second backup, 1% of MiBs changed', repo, ['--source', image], 64 * GiB);
    const target = join(dir, 'real-restored.raw');
    await step('real 64 GiB: restore of the full to a new file', ENGINE, ['restore', '--repo', repo, full.id, '--to', target]);
    await rm(target);
  } finally {
    await rm(repo, { recursive: true, force: true });
    await rm(image, { force: true });
  }
}

async function main(): Promise<void> {
  const dir = arg('--dir') ?? '/var/tmp/engine-scale';
  const dataMiB = Number(arg('--data-mib') ?? '16');
  const sizes = (arg('--sizes') ?? '1G,1T,15T').split(',').map(parseSize);
  const real = arg('--real');
  await mkdir(dir, { recursive: true });
  const cache = await privateEngineCache();
  process.stdout.write(`scale bench: ${machineLine()}; every timed step cold (page cache dropped)\n`);
  try {
    if (!process.argv.includes('--real-only')) await thinDisks(dir, dataMiB, sizes);
    if (real) await realData(dir, real);
  } finally {
    await cache.remove();
  }
}

await main();
