/**
 * The server's memory and events latency: `node dist/bench/server.js memory|latency [--engine DIR] [--dir DIR]`.
 * Prints one JSON document (the figures; bench/results/server-*.md quotes them with the machine's load).
 *
 * memory: `DIR/bin/engine server` (default: this checkout; another checkout's bin/engine for a before/after) as its own
 *   process, limits.jobs 8. VmRSS from /proc: idle after start; every 50 ms while 8 backups of 64 MiB of random data
 *   run at once (peak, and the median while all 8 run); idle after; then 20 backups one after the other, RSS after each
 *   (does each job leave memory behind?); then idle 100 s (an unused arena is given back after 90 s).
 * fairness: see fairness() below.
 * latency: the server in this process (startServer, its onJobEvent hook stamps each event with process.hrtime, which is
 *   CLOCK_MONOTONIC, the same clock in every process), an SSE client as a process of its own (dist/bench/server-sse-client.js)
 *   stamping each event as it reads it. One slow NBD backup (nbdkit, 20 ms per read) emits progress all along; with 0, 2
 *   and 8 more backups of 64 MiB kept running beside it (each resubmitted as it ends), every event of every job is timed.
 */
import { spawn } from 'node:child_process';
import { access, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { request } from 'node:http';
import { startServer } from '../engine/server/server.js';
import { arg, initRepository, logger, run } from './tools.js';

const log = logger('server-bench');
const MiB = 1024 * 1024;
const here = fileURLToPath(new URL('.', import.meta.url));

function rssOf(pid: number): Promise<{ rss: number; hwm: number }> {
  return readFile(`/proc/${pid}/status`, 'utf8').then((s) => ({
    rss: Number(/^VmRSS:\s+(\d+) kB/m.exec(s)![1]) / 1024,
    hwm: Number(/^VmHWM:\s+(\d+) kB/m.exec(s)![1]) / 1024,
  }));
}

function post(url: string, body: unknown): Promise<{ id: string }> {
  return json(url, 'POST', body) as Promise<{ id: string }>;
}

function json(url: string, method: string, body?: unknown): Promise<unknown> {
  const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
  return new Promise((resolve, reject) => {
    const req = request(url, { method, headers: payload ? { 'content-type': 'application/json', 'content-length': String(payload.length) } : {} }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        if ((res.statusCode ?? 500) >= 300) reject(new Error(`${method} ${url}: ${res.statusCode} ${text}`));
        else resolve(JSON.parse(text));
      });
    });
    req.on('error', reject);
    req.end(payload);
  });
}

async function waitEnded(url: string, ids: string[]): Promise<void> {
  for (;;) {
    const { jobs } = (await json(`${url}/api/v1/jobs`, 'GET')) as { jobs: { id: string; state: string; error: unknown }[] };
    const mine = jobs.filter((j) => ids.includes(j.id));
    const failed = mine.find((j) => j.state === 'failed');
    if (failed) throw new Error(`job ${failed.id} failed: ${JSON.stringify(failed.error)}`);
    if (mine.length === ids.length && mine.every((j) => ['succeeded', 'cancelled'].includes(j.state))) return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

async function prepare(dir: string, images: number): Promise<{ repo: string; disks: string[] }> {
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir, { recursive: true });
  const repo = join(dir, 'repo');
  await initRepository(repo);
  const disks: string[] = [];
  for (let i = 0; i < images; i++) {
    const path = join(dir, `disk${i}.img`);
    await run('sh', ['-c', `head -c ${64 * MiB} /dev/urandom > '${path}'`]);
    disks.push(path);
  }
  return { repo, disks };
}

/** `DIR/bin/engine server` as its own process, once it listens. */
async function serverProcess(engineDir: string, dir: string, repo: string, jobs: number): Promise<{ url: string; pid: number; stop: () => Promise<void> }> {
  const config = join(dir, 'server.json');
  await writeFile(config, JSON.stringify({ stateDir: join(dir, 'state'), limits: { jobs, queue: 64 }, repositories: { main: { location: repo } } }));
  const child = spawn(join(engineDir, 'bin/engine'), ['server', '--json', '--config', config, '--listen', '127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'ignore'] });
  let out = '';
  child.stdout!.on('data', (c: Buffer) => (out += c.toString()));
  while (!out.trim().endsWith('}')) await new Promise((resolve) => setTimeout(resolve, 50));
  return {
    url: (JSON.parse(out) as { url: string }).url,
    pid: child.pid!,
    stop: async () => {
      child.kill('SIGTERM');
      await new Promise((resolve) => child.once('exit', resolve));
    },
  };
}

async function memory(dir: string, engineDir: string, jobs: number): Promise<Record<string, unknown>> {
  const { repo, disks } = await prepare(dir, 8);
  const { url, pid, stop } = await serverProcess(engineDir, dir, repo, jobs);
  try {
    await new Promise((resolve) => setTimeout(resolve, 2000));
    const idle = await rssOf(pid);
    log(`idle ${idle.rss.toFixed(0)} MiB`);
    // 8 at once: the first round writes the data, later rounds deduplicate; the first is the one that allocates most.
    const samples: number[] = [];
    let sampling = true;
    const sampler = (async () => {
      while (sampling) {
        samples.push((await rssOf(pid)).rss);
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    })();
    const started = Date.now();
    const ids = await Promise.all(disks.map(async (path) => (await post(`${url}/api/v1/jobs`, { kind: 'backup', repository: 'main', disks: [{ kind: 'raw', path }] })).id));
    await waitEnded(url, ids);
    const eightSeconds = (Date.now() - started) / 1000;
    sampling = false;
    await sampler;
    const during = await rssOf(pid);
    const sorted = [...samples].sort((a, b) => a - b);
    log(`8 at once: peak ${during.hwm.toFixed(0)} MiB, ${eightSeconds.toFixed(1)} s`);
    await new Promise((resolve) => setTimeout(resolve, 2000));
    const idleAfter = await rssOf(pid);
    const sequential: number[] = [];
    for (let i = 0; i < 20; i++) {
      const { id } = await post(`${url}/api/v1/jobs`, { kind: 'backup', repository: 'main', disks: [{ kind: 'raw', path: disks[i % disks.length]! }] });
      await waitEnded(url, [id]);
      sequential.push(Math.round((await rssOf(pid)).rss));
    }
    log(`20 one after the other: ${sequential.join(' ')}`);
    // Idle longer than the shared pool keeps an unused arena (shared-pool.ts ARENA_IDLE_MS, 90 s): its memory given back.
    await new Promise((resolve) => setTimeout(resolve, 100_000));
    const idleLater = await rssOf(pid);
    log(`idle 100 s later: ${idleLater.rss.toFixed(0)} MiB`);
    return {
      engine: engineDir,
      jobs,
      idleMiB: Math.round(idle.rss),
      eight: { peakMiB: Math.round(during.hwm), medianWhileRunningMiB: Math.round(sorted[Math.floor(sorted.length / 2)] ?? 0), samples: samples.length, seconds: eightSeconds },
      idleAfterEightMiB: Math.round(idleAfter.rss),
      sequentialRssMiB: sequential,
      peakAfterSequentialMiB: Math.round((await rssOf(pid)).hwm),
      idle100sLaterMiB: Math.round(idleLater.rss),
    };
  } finally {
    await stop();
  }
}

/** Seconds from POST to the job's end, polled every 20 ms. */
async function timedJob(url: string, body: unknown): Promise<number> {
  const started = process.hrtime.bigint();
  const { id } = await post(`${url}/api/v1/jobs`, body);
  await waitEnded(url, [id]);
  return Number(process.hrtime.bigint() - started) / 1e9;
}

/**
 * fairness: limits.jobs 2. A small backup (32 MiB of random data) alone, then started while a big one (512 MiB) runs:
 * how much longer it takes beside the big one. Two jobs sharing 2 cores fairly: about twice; a big job's tasks served
 * first: until the big one ends. The big job starts a fresh backup each round (its data deduplicated after the first).
 */
async function fairness(dir: string, engineDir: string): Promise<Record<string, unknown>> {
  await rm(dir, { recursive: true, force: true });
  await mkdir(dir, { recursive: true });
  const repo = join(dir, 'repo');
  await initRepository(repo);
  const small = join(dir, 'small.img');
  const big = join(dir, 'big.img');
  await run('sh', ['-c', `head -c ${32 * MiB} /dev/urandom > '${small}'; head -c ${512 * MiB} /dev/urandom > '${big}'`]);
  const { url, stop } = await serverProcess(engineDir, dir, repo, 2);
  const job = (path: string): unknown => ({ kind: 'backup', repository: 'main', disks: [{ kind: 'raw', path }] });
  try {
    await timedJob(url, job(small));
    await timedJob(url, job(big));
    const alone: number[] = [];
    const beside: number[] = [];
    const bigAlone: number[] = [];
    for (let round = 0; round < 5; round++) {
      alone.push(await timedJob(url, job(small)));
      bigAlone.push(await timedJob(url, job(big)));
      const { id } = await post(`${url}/api/v1/jobs`, job(big));
      // The big one well under way: a quarter read.
      for (;;) {
        const state = (await json(`${url}/api/v1/jobs/${id}`, 'GET')) as { state: string; progress: { done: number; total: number } | null };
        if (state.state !== 'queued' && state.state !== 'running') throw new Error(`the big job ended first: ${state.state}`);
        if (state.progress && state.progress.done >= state.progress.total / 4) break;
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
      beside.push(await timedJob(url, job(small)));
      await waitEnded(url, [id]);
      log(`round ${round}: small alone ${alone.at(-1)!.toFixed(2)} s, beside the big one ${beside.at(-1)!.toFixed(2)} s; big alone ${bigAlone.at(-1)!.toFixed(2)} s`);
    }
    const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
    return { engine: engineDir, smallAlone: alone, smallBesideBig: beside, bigAlone, ratios: beside.map((b, i) => b / alone[i]!), medianRatio: median(beside.map((b, i) => b / alone[i]!)) };
  } finally {
    await stop();
  }
}

function quantile(sorted: number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? NaN;
}

async function latency(dir: string): Promise<Record<string, unknown>> {
  const { repo, disks } = await prepare(dir, 8);
  const socket = join(dir, 'slow.sock');
  // Zeros (no extents: read, not skipped), slowly: a job that emits progress all along and costs the workers a zero check.
  const nbdkit = spawn('nbdkit', ['-f', '--exit-with-parent', '-U', socket, '--filter=noextents', '--filter=delay', 'null', '64G', 'rdelay=20ms'], { stdio: 'ignore' });
  while (!(await access(socket).then(() => true, () => false))) await new Promise((resolve) => setTimeout(resolve, 50));
  const config = join(dir, 'server.json');
  await writeFile(config, JSON.stringify({ stateDir: join(dir, 'state'), limits: { jobs: 10, queue: 64 }, repositories: { main: { location: repo } } }));
  const emitted = new Map<string, bigint>();
  const server = await startServer({ config, listen: '127.0.0.1:0', onJobEvent: (job, event) => emitted.set(`${job} ${event.id}`, process.hrtime.bigint()) });
  const results: Record<string, unknown> = {};
  try {
    for (const load of [0, 2, 8]) {
      const received: string[] = [];
      /** When each client had its answer's head: events emitted before it are replayed history, not timed. */
      const connected = new Map<string, bigint>();
      const clients = new Set<ReturnType<typeof spawn>>();
      const follow = (id: string): void => {
        const client = spawn(process.execPath, [join(here, 'server-sse-client.js'), `${server.url}/api/v1/jobs/${id}/events`, id], { stdio: ['ignore', 'pipe', 'inherit'] });
        clients.add(client);
        let buffered = '';
        client.stdout!.on('data', (c: Buffer) => {
          buffered += c.toString();
          const lines = buffered.split('\n');
          buffered = lines.pop()!;
          received.push(...lines);
        });
        client.once('exit', () => clients.delete(client));
      };
      const slow = await post(`${server.url}/api/v1/jobs`, { kind: 'backup', repository: 'main', disks: [{ kind: 'nbd', uri: `nbd+unix:///?socket=${socket}` }] });
      follow(slow.id);
      let running = true;
      const keep = Array.from({ length: load }, async (_, i) => {
        while (running) {
          const job = await post(`${server.url}/api/v1/jobs`, { kind: 'backup', repository: 'main', disks: [{ kind: 'raw', path: disks[i]! }] });
          follow(job.id);
          await waitEnded(server.url, [job.id]).catch(() => undefined);
        }
      });
      await new Promise((resolve) => setTimeout(resolve, 30_000));
      running = false;
      await json(`${server.url}/api/v1/jobs/${slow.id}`, 'DELETE');
      await Promise.all(keep);
      while (clients.size > 0) await new Promise((resolve) => setTimeout(resolve, 50));
      const ms: number[] = [];
      const byType: Record<string, number> = {};
      for (const line of received) {
        const [job, , type, at] = line.split(' ');
        if (type === 'connected') connected.set(job!, BigInt(at!));
      }
      for (const line of received) {
        const [job, id, type, at] = line.split(' ');
        const sent = emitted.get(`${job} ${id}`);
        const from = connected.get(job!);
        if (sent === undefined || at === undefined || from === undefined || sent < from) continue;
        byType[type!] = (byType[type!] ?? 0) + 1;
        ms.push(Number(BigInt(at) - sent) / 1e6);
      }
      ms.sort((a, b) => a - b);
      results[`load${load}`] = { events: ms.length, byType, medianMs: quantile(ms, 0.5), p99Ms: quantile(ms, 0.99), maxMs: ms.at(-1) };
      log(`${load} jobs beside: ${ms.length} events, median ${quantile(ms, 0.5).toFixed(3)} ms, p99 ${quantile(ms, 0.99).toFixed(3)} ms`);
    }
  } finally {
    await server.close();
    nbdkit.kill('SIGTERM');
  }
  return results;
}

const mode = process.argv[2];
const dir = arg('--dir') ?? '/var/tmp/engine-server-bench';
const engineDir = arg('--engine') ?? fileURLToPath(new URL('../..', import.meta.url));
const result = mode === 'memory' ? await memory(dir, engineDir, Number(arg('--jobs') ?? 8)) : mode === 'latency' ? await latency(dir) : mode === 'fairness' ? await fairness(dir, engineDir) : undefined;
if (!result) throw new Error('usage: server.js memory|latency|fairness [--engine DIR] [--jobs N] [--dir DIR]');
await rm(dir, { recursive: true, force: true });
process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
