/**
 * Instant recovery writes: `engine serve --writable` against the reference nbd-server, with the NBD reference
 * implementation's own test client, on the same data in the same run.
 *
 *   node dist/bench/overlay-writes.js [--rounds 3] [--size 50M] [--tester PATH] [--dir DIR] [--out bench/results]
 *
 * The client is nbd-tester-client from the nbd project's tests/run (Debian does not package it):
 * bench/nbd-tester.sh builds it from the nbd source (NBD_SOURCE=a checkout at tag nbd-3.24, or `apt-get
 * source nbd`; see that script), or `--tester PATH` / NBD_TESTER names a built one; the integrity trace
 * (integrity-test.tr) is taken from beside the client. The reference server is Debian's nbd-server package
 * (3.24), installed here when missing; each of its runs exports a fresh copy of the image file with
 * `flush = true` and `fua = true` (it then fsyncs on FLUSH and fdatasyncs on FUA), as the nbd test suite's
 * own write, flush and integrity tests configure it.
 *
 * The tests, each the nbd test suite's own invocation, each against a freshly started server (a fresh
 * overlay; a fresh copy for nbd-server), engine and nbd-server interleaved in every round:
 *   read       `-N disk`            1 KiB reads over the whole export, pipelined
 *   write      `-N disk -w`         1 KiB writes over the whole export, pipelined
 *   flush      `-N disk -w -f`      the same with FUA on one write in 16 and a FLUSH after another in 16
 *   integrity  `-N zero -i -t integrity-test.tr`  the suite's trace of mixed reads, writes and flushes,
 *              every read checked (on a disk of zeros: the trace's expectation; 50 MiB, its size)
 * Both servers listen on a Unix socket (the engine's default; how a hypervisor on the host connects); figures are the client's own
 * "Took N seconds" and the server's CPU seconds (user + sys of the engine process; of nbd-server's
 * per-connection child), medians over the rounds; ratio = engine / nbd-server.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { copyFile, mkdir, mkdtemp, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { formatBytes, generateImage, parseSize } from '../engine/index.js';
import { reportMarkdown, verdict, writeReport } from './report.js';
import { arg, ENGINE, ensure, initRepository, loadAverage, logger, machineLine, privateEngineCache, run } from './tools.js';

const log = logger('overlay-writes');

interface Test {
  name: string;
  disk: 'data' | 'zero';
  args: (trace: string) => string[];
}

const TESTS: Test[] = [
  { name: 'read', disk: 'data', args: () => [] },
  { name: 'write', disk: 'data', args: () => ['-w'] },
  { name: 'flush', disk: 'data', args: () => ['-w', '-f'] },
  { name: 'integrity', disk: 'zero', args: (trace) => ['-i', '-t', trace] },
];

interface Server {
  socket: string;
  /** CPU seconds (user + sys) the server spent so far on this connection. */
  cpuSeconds: () => Promise<number>;
  stop: () => Promise<void>;
}

const CLOCK_TICKS = 100;

/** user + sys seconds of a live process and of its children it has reaped, from /proc (0 when it is gone). */
async function processCpu(pid: number): Promise<number> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  if (!stat) return 0;
  // Fields after the command: state is 0, utime 11, stime 12, cutime 13, cstime 14.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ').map(Number);
  return (fields[11]! + fields[12]! + fields[13]! + fields[14]!) / CLOCK_TICKS;
}

async function gone(pid: number): Promise<void> {
  for (let i = 0; i < 400; i += 1) {
    if (!(await readFile(`/proc/${pid}/stat`).then(() => true, () => false))) return;
    await new Promise((r) => setTimeout(r, 25));
  }
}

function exited(child: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve();
    else child.once('exit', () => resolve());
  });
}

async function startEngine(repo: string, id: string, work: string): Promise<Server> {
  const socket = join(work, 'engine.sock');
  const child = spawn(ENGINE, ['serve', '--repo', repo, id, '--socket', socket, '--writable', '--overlay-dir', work, '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout!.on('data', (chunk: Buffer) => (out += chunk.toString()));
  child.stderr!.resume();
  for (let i = 0; i < 800 && !out.trim().endsWith('}'); i += 1) await new Promise((r) => setTimeout(r, 25));
  JSON.parse(out); // listening
  return {
    socket,
    cpuSeconds: () => processCpu(child.pid!),
    stop: async () => {
      child.kill('SIGTERM');
      await exited(child);
    },
  };
}

/** nbd-server as a daemon (it forks a child per connection). */
async function startNbdServer(work: string, name: string, file: string): Promise<Server> {
  const socket = join(work, 'nbd-server.sock');
  await rm(socket, { force: true });
  const config = join(work, 'nbd-server.conf');
  // unixsock alone: with `listenaddr` and `port = 0` beside it, 3.24 failed every Unix-socket connection here.
  await writeFile(config, `[generic]\n\tunixsock = ${socket}\n[${name}]\n\texportname = ${file}\n\tflush = true\n\tfua = true\n`);
  const pidFile = join(work, 'nbd-server.pid');
  await run('nbd-server', ['-C', config, '-p', pidFile]);
  let pid = 0;
  for (let i = 0; i < 200 && !pid; i += 1) {
    pid = Number((await readFile(pidFile, 'utf8').catch(() => '')).trim());
    if (!pid) await new Promise((r) => setTimeout(r, 25));
  }
  return {
    socket,
    // The connection's child has exited and been reaped by the time the client is done: its CPU is the parent's cutime/cstime.
    cpuSeconds: async () => {
      await new Promise((r) => setTimeout(r, 100));
      return processCpu(pid);
    },
    stop: async () => {
      process.kill(pid, 'SIGTERM');
      await gone(pid);
    },
  };
}

/** One client run: its own "Took N seconds" and the server's CPU meanwhile. */
async function runTester(tester: string, server: Server, exportName: string, args: string[]): Promise<{ seconds: number; serverCpu: number }> {
  const before = await server.cpuSeconds();
  // The client prints its figure through glib's g_message, on stderr.
  const output = await new Promise<string>((resolve, reject) => {
    const child = spawn(tester, ['-N', exportName, ...args, '-u', server.socket], { env: { ...process.env, NBD_TEST_SILENT: '1' }, stdio: ['ignore', 'pipe', 'pipe'] });
    let text = '';
    child.stdout!.on('data', (c: Buffer) => (text += c.toString()));
    child.stderr!.on('data', (c: Buffer) => (text += c.toString()));
    child.once('error', reject);
    child.once('exit', (code) => (code === 0 ? resolve(text) : reject(new Error(`nbd-tester-client ${args.join(' ')} failed (exit ${code}): ${text.trim().split('\n').slice(-2).join(' ')}`))));
  });
  const serverCpu = (await server.cpuSeconds()) - before;
  const took = /Took ([\d.]+) seconds/.exec(output);
  if (!took) throw new Error(`nbd-tester-client printed no time: ${output.trim().slice(-300)}`);
  return { seconds: Number(took[1]), serverCpu };
}

async function findTester(): Promise<string> {
  const given = arg('--tester') ?? process.env.NBD_TESTER;
  if (given) return given;
  const script = fileURLToPath(new URL('../../bench/nbd-tester.sh', import.meta.url));
  return (await run('bash', [script])).stdout.trim().split('\n').pop()!;
}

const median = (values: number[]): number => {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
};

async function main(): Promise<void> {
  const rounds = Number(arg('--rounds') ?? '3');
  const size = parseSize(arg('--size') ?? '50M');
  const outDir = arg('--out') ?? fileURLToPath(new URL('../../bench/results', import.meta.url));
  const installed = await ensure('nbd-server', 'nbd-server');
  if (installed !== true) throw new Error(installed);
  const tester = await findTester();
  const trace = join(dirname(tester), 'integrity-test.tr');
  const work = arg('--dir') ?? (await mkdtemp(join(tmpdir(), 'engine-overlay-bench-')));
  await mkdir(work, { recursive: true });
  const cache = await privateEngineCache();
  const machine = machineLine();
  const loads: string[] = [await loadAverage()];
  try {
    const repo = join(work, 'repo');
    const format = await initRepository(repo);
    const images = { data: join(work, 'data.raw'), zero: join(work, 'zero.raw') };
    log(`a ${formatBytes(size)} VM-like image and a ${formatBytes(size)} disk of zeros`);
    await generateImage(images.data, size, 'overlay-writes');
    await writeFile(images.zero, '');
    await truncate(images.zero, size);
    const ids = { data: '', zero: '' };
    for (const disk of ['data', 'zero'] as const) {
      const { stdout } = await run(ENGINE, ['backup', '--repo', repo, '--source', images[disk], '--disk-name', disk, '--json']);
      ids[disk] = (JSON.parse(stdout) as { id: string }).id;
    }
    const results: Record<string, { engine: number[]; nbd: number[]; engineCpu: number[]; nbdCpu: number[] }> = {};
    for (const test of TESTS) results[test.name] = { engine: [], nbd: [], engineCpu: [], nbdCpu: [] };
    for (let round = 1; round <= rounds; round += 1) {
      for (const test of TESTS) {
        // Alternating which goes first: neither always meets the other's leftover page cache or load.
        const order = round % 2 === 1 ? (['engine', 'nbd'] as const) : (['nbd', 'engine'] as const);
        for (const who of order) {
          let server: Server;
          if (who === 'engine') {
            server = await startEngine(repo, ids[test.disk], work);
          } else {
            const copy = join(work, 'nbd-export.raw');
            await copyFile(images[test.disk], copy);
            server = await startNbdServer(work, test.disk, copy);
          }
          try {
            const { seconds, serverCpu } = await runTester(tester, server, test.disk, test.args(trace));
            results[test.name]![who].push(seconds);
            results[test.name]![who === 'engine' ? 'engineCpu' : 'nbdCpu'].push(serverCpu);
            log(`round ${round} ${test.name} ${who}: ${seconds.toFixed(3)} s, server ${serverCpu.toFixed(2)} CPU-s`);
          } finally {
            await server.stop();
          }
        }
      }
      loads.push(await loadAverage());
    }
    const rows = TESTS.map((test) => {
      const r = results[test.name]!;
      const ratios = r.engine.map((e, i) => e / r.nbd[i]!);
      return { test: test.name, engine: median(r.engine), nbd: median(r.nbd), ratio: median(ratios), ratios, engineCpu: median(r.engineCpu), nbdCpu: median(r.nbdCpu), raw: r };
    });
    const body = [
      '| test (nbd-tester-client) | engine s | nbd-server s | engine / nbd-server | engine CPU-s | nbd-server CPU-s |',
      '|---|---|---|---|---|---|',
      ...rows.map((r) => `| ${r.test} | ${r.engine.toFixed(2)} | ${r.nbd.toFixed(2)} | ${r.ratio.toFixed(2)}× (rounds: ${r.ratios.map((x) => x.toFixed(2)).join(', ')}) | ${r.engineCpu.toFixed(2)} | ${r.nbdCpu.toFixed(2)} |`),
    ].join('\n');
    const markdown = reportMarkdown(
      'Instant recovery writes: engine serve --writable against nbd-server',
      [
        `Machine: ${machine}. Load average before and after each round: ${loads.join(' → ')}.`,
        `A ${formatBytes(size)} disk: VM-like data (generateImage, seed "overlay-writes") for read, write and flush; zeros for the integrity trace. Repository format ${format}, the CLI as users run it (bin/engine).`,
        `Client: nbd-tester-client built from the nbd project's source (bench/nbd-tester.sh); server: Debian's nbd-server with flush and fua on, a fresh copy per run. ${rounds} rounds, engine and nbd-server alternating; medians. The machine was shared with other work: the ratios, from the same minutes, are the figure.`,
      ],
      body,
      rows.map((r) => `${r.test}: engine within 2× of nbd-server — ${verdict(r.ratios, (x) => x <= 2)}`),
      [],
    );
    await writeReport(outDir, 'overlay-writes', markdown, { machine, size, repositoryFormat: format, rounds, loads, rows, sharedMachine: true });
  } finally {
    if (!arg('--dir')) await rm(work, { recursive: true, force: true });
    await cache.remove();
  }
}

await main();
