/**
 * Dashboard bench (issue 18, "dashboard load time with 10,000 backups in the catalogue"):
 * `node dist/bench/dashboard.js [--backups 10000] [--vms 100] [--rounds 7] [--baseline /work/main] [--keep DIR] [--out bench/results]`.
 *
 * The catalogue: one real backup of a 64 KiB file (`engine backup`), then backups-1 more records committed
 * through the repository's own API (Repository.commitBackup, under a backup's lease, as `engine backup` commits
 * its record) that reuse that backup's disk map: each a real, restorable backup of the same data, named after
 * one of `vms` VMs, a full one every 10 and incremental ones between with their parents, one hour apart. That
 * is 10,000 record files as the engine writes them, without 10,000 reads of a source.
 *
 * Measured, each against an `engine server` started as users start it (bin/engine, no tokens file), at load:
 * - the catalogue API `GET /api/v1/repositories/main/backups`: the first request after start (the server reads
 *   every record; page cache dropped first) and then `rounds` more (warm), by this checkout and, with
 *   --baseline, by another checkout's engine (its bin/engine) on the same repository, interleaved;
 * - `GET /api/v1/repositories/main/stats`;
 * - the dashboard `GET /`: the server's answer (time to the last byte, bytes), and in Chromium (Debian's,
 *   /usr/bin/chromium, by playwright-core) the navigation's responseEnd, first contentful paint and load event.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { request } from 'node:http';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { Repository, type BackupRecord } from '../engine/index.js';
import { arg, dropCaches, ENGINE, initRepository, loadAverage, logger, machineLine, privateEngineCache, run } from './tools.js';

const log = logger('dashboard-bench');

interface Server {
  url: string;
  /** VmRSS and VmHWM of the server process, MiB. */
  memory(): Promise<{ rss: number; hwm: number }>;
  stop(): Promise<void>;
}

async function startServer(engine: string, config: string, env: Record<string, string>): Promise<Server> {
  const child: ChildProcess = spawn(engine, ['server', '--json', '--config', config, '--listen', '127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  let out = '';
  let err = '';
  child.stdout!.on('data', (chunk: Buffer) => (out += chunk.toString()));
  child.stderr!.on('data', (chunk: Buffer) => (err += chunk.toString()));
  for (let i = 0; i < 800 && !out.trim().endsWith('}'); i++) await new Promise((r) => setTimeout(r, 25));
  if (!out.trim().endsWith('}')) throw new Error(`${engine} server did not start: ${err.slice(-500)}`);
  return {
    url: (JSON.parse(out) as { url: string }).url,
    memory: async () => {
      // bin/engine is a shell script that execs node: the same pid.
      const status = await readFile(`/proc/${child.pid}/status`, 'utf8');
      const kib = (field: string): number => Number(new RegExp(`${field}:\\s+(\\d+)`).exec(status)?.[1] ?? NaN) / 1024;
      return { rss: kib('VmRSS'), hwm: kib('VmHWM') };
    },
    stop: () =>
      new Promise((resolve) => {
        if (child.exitCode !== null) return resolve();
        child.once('exit', () => resolve());
        child.kill('SIGTERM');
      }),
  };
}

/** One GET: milliseconds to the last byte, the body's size, the status, and the Set-Cookie header. */
function get(url: string, headers: Record<string, string> = {}): Promise<{ ms: number; bytes: number; status: number; cookie: string | undefined; body: string }> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    request(url, { headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const body = Buffer.concat(chunks);
        resolve({ ms: performance.now() - started, bytes: body.length, status: res.statusCode!, cookie: res.headers['set-cookie']?.[0]?.split(';')[0], body: body.toString('utf8') });
      });
    })
      .on('error', reject)
      .end();
  });
}

const median = (values: number[]): number => {
  const s = [...values].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};
const ms = (v: number): string => v.toFixed(v < 10 ? 2 : 1);
const spread = (all: number[]): string => {
  const values = all.filter((v) => Number.isFinite(v));
  if (values.length === 0) return 'not recorded';
  return `${ms(Math.min(...values))} / **${ms(median(values))}** / ${ms(Math.max(...values))}${values.length < all.length ? ` (${all.length - values.length} of ${all.length} runs without it)` : ''}`;
};

async function buildCatalogue(repo: string, dir: string, backups: number, vms: number): Promise<void> {
  await initRepository(repo);
  const source = join(dir, 'tiny.img');
  await writeFile(source, randomBytes(64 * 1024));
  const first = JSON.parse((await run(ENGINE, ['backup', '--repo', repo, '--source', source, '--name', 'vm-0', '--json'])).stdout) as { id: string };
  const started = performance.now();
  const repository = await Repository.open(repo, { access: 'exclusive', command: 'backup', manyWriters: true });
  try {
    const base = await repository.readBackup(first.id);
    const t0 = Date.parse(base.startTime) - backups * 3600_000;
    const last = new Map<string, string>();
    for (let i = 1; i < backups; i++) {
      const vm = `vm-${i % vms}`;
      const nth = Math.floor(i / vms);
      const full = nth % 10 === 0 || !last.has(vm);
      const start = new Date(t0 + i * 3600_000);
      const record: BackupRecord = { ...base, id: randomBytes(16).toString('hex'), name: vm, type: full ? 'full' : 'incremental', parent: full ? null : last.get(vm)!, startTime: start.toISOString(), endTime: new Date(start.getTime() + 60_000).toISOString() };
      await repository.commitBackup(record);
      last.set(vm, record.id);
      if (i % 1000 === 0) log(`${i} records committed`);
    }
  } finally {
    await repository.close();
  }
  log(`${backups} backups in ${((performance.now() - started) / 1000).toFixed(1)} s`);
}

interface Figures {
  memory: { rss: number; hwm: number };
  firstMs: number;
  warmMs: number[];
  bytes: number;
  count: number;
}

async function catalogueFigures(engine: string, config: string, env: Record<string, string>, rounds: number): Promise<Figures & { statsMs: number[] }> {
  await dropCaches();
  const server = await startServer(engine, config, env);
  try {
    const first = await get(`${server.url}/api/v1/repositories/main/backups`);
    if (first.status !== 200) throw new Error(`backups: ${first.status} ${first.body.slice(0, 300)}`);
    const warmMs: number[] = [];
    for (let i = 0; i < rounds; i++) warmMs.push((await get(`${server.url}/api/v1/repositories/main/backups`)).ms);
    const statsMs: number[] = [];
    for (let i = 0; i < rounds; i++) statsMs.push((await get(`${server.url}/api/v1/repositories/main/stats`)).ms);
    return { memory: await server.memory(), firstMs: first.ms, warmMs, bytes: first.bytes, count: (JSON.parse(first.body) as { backups: unknown[] }).backups.length, statsMs };
  } finally {
    await server.stop();
  }
}

async function main(): Promise<void> {
  const backups = Number(arg('--backups') ?? 10_000);
  const vms = Number(arg('--vms') ?? 100);
  const rounds = Number(arg('--rounds') ?? 7);
  const baseline = arg('--baseline');
  const out = arg('--out') ?? fileURLToPath(new URL('../../bench/results/', import.meta.url));
  const kept = arg('--keep');
  const dir = kept ?? (await mkdtemp('/var/tmp/engine-dashboard-bench-'));
  const cache = await privateEngineCache();
  process.env.ENGINE_CACHE_DIR = cache.dir;
  const env = { ENGINE_CACHE_DIR: cache.dir };
  const loadStart = await loadAverage();
  try {
    const repo = join(dir, 'repo');
    const built = await Repository.isVersion3(repo).catch(() => false);
    if (!built) await buildCatalogue(repo, dir, backups, vms);
    const config = join(dir, 'server.json');
    await writeFile(config, JSON.stringify({ stateDir: join(dir, 'state'), repositories: { main: { location: repo } } }));

    // The catalogue API: this checkout, and the baseline's engine, interleaved round by round.
    const ours: (Figures & { statsMs: number[] })[] = [];
    const theirs: (Figures & { statsMs: number[] })[] = [];
    for (let i = 0; i < 3; i++) {
      ours.push(await catalogueFigures(ENGINE, config, env, rounds));
      if (baseline) theirs.push(await catalogueFigures(join(baseline, 'bin/engine'), config, env, rounds));
      log(`round ${i + 1}: first ${ms(ours.at(-1)!.firstMs)} ms, warm ${ms(median(ours.at(-1)!.warmMs))} ms${baseline ? `; baseline first ${ms(theirs.at(-1)!.firstMs)}, warm ${ms(median(theirs.at(-1)!.warmMs))}` : ''}`);
    }

    // The dashboard: the server's answer, then Chromium's navigation timing.
    const server = await startServer(ENGINE, config, env);
    const pageMs: number[] = [];
    const browserRows: { responseEnd: number; fcp: number; load: number }[] = [];
    let pageBytes = 0;
    let rows = 0;
    try {
      const opened = await get(`${server.url}/`);
      const cookie = opened.cookie!;
      for (let i = 0; i < rounds; i++) {
        const answer = await get(`${server.url}/`, { cookie });
        pageMs.push(answer.ms);
        pageBytes = answer.bytes;
        rows = (answer.body.match(/<tr data-vm=/g) ?? []).length;
      }
      const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args: ['--no-sandbox'] });
      try {
        for (let i = 0; i < rounds; i++) {
          const context = await browser.newContext();
          const page = await context.newPage();
          await page.goto(`${server.url}/`, { waitUntil: 'load' });
          // Headless Chromium may record the first paint just after the load event.
          await page.waitForFunction("performance.getEntriesByName('first-contentful-paint').length > 0", undefined, { timeout: 5000 }).catch(() => undefined);
          browserRows.push(
            // Run in the page (a string: this file is typed for Node, not the DOM).
            await page.evaluate<{ responseEnd: number; fcp: number; load: number }>(`(() => {
              const nav = performance.getEntriesByType('navigation')[0];
              const fcp = performance.getEntriesByName('first-contentful-paint')[0];
              return { responseEnd: nav.responseEnd, fcp: fcp ? fcp.startTime : NaN, load: nav.loadEventEnd };
            })()`),
          );
          await context.close();
        }
      } finally {
        await browser.close();
      }
    } finally {
      await server.stop();
    }
    const loadEnd = await loadAverage();
    const commit = (await run('git', ['rev-parse', '--short', 'HEAD'])).stdout.trim();
    const first = (f: Figures[]): number[] => f.map((x) => x.firstMs);
    const warm = (f: Figures[]): number[] => f.flatMap((x) => x.warmMs);
    const lines = [
      `# The dashboard and the catalogue API with ${backups} backups (commit ${commit})`,
      '',
      `Machine: ${machineLine()}; other sessions running: load average ${loadStart} at start, ${loadEnd} at the end. \`node dist/bench/dashboard.js${baseline ? ` --baseline ${baseline}` : ''}\`.`,
      `Catalogue: ${backups} backups of ${vms} VMs in one format-3 folder repository: one real \`engine backup\` of a 64 KiB file, and ${backups - 1} records committed through Repository.commitBackup (under a backup's lease) reusing its disk map, a full backup every 10 per VM and incremental ones between (their parents set). Server: \`bin/engine server\`, no tokens file, 127.0.0.1. Times in ms, min / **median** / max.`,
      '',
      '## Catalogue API: `GET /api/v1/repositories/main/backups`',
      '',
      `3 server starts, each after \`sync; echo 3 > /proc/sys/vm/drop_caches\`: its first request, then ${rounds} more (warm). Answer: the first page, ${ours[0]!.count} backups (the default \`limit\`), ${(ours[0]!.bytes / 1048576).toFixed(1)} MiB of JSON.`,
      '',
      '| engine | first request after start (cold) | later requests (warm) |',
      '|---|---|---|',
      `| this commit (records cached between requests) | ${spread(first(ours))} | ${spread(warm(ours))} |`,
      ...(baseline ? [`| baseline \`${baseline}\` (${(await run('git', ['-C', baseline, 'rev-parse', '--short', 'HEAD'])).stdout.trim()}: every record read per request) | ${spread(first(theirs))} | ${spread(warm(theirs))} |`, `| ratio baseline / this, medians | ${(median(first(theirs)) / median(first(ours))).toFixed(2)} | ${(median(warm(theirs)) / median(warm(ours))).toFixed(2)} |`] : []),
      '',
      `Server memory after these requests, MiB (VmRSS, VmHWM): this commit ${ours.map((x) => `${x.memory.rss.toFixed(0)}, ${x.memory.hwm.toFixed(0)}`).join('; ')}${baseline ? `; baseline ${theirs.map((x) => `${x.memory.rss.toFixed(0)}, ${x.memory.hwm.toFixed(0)}`).join('; ')}` : ''}.`,
      '',
      `\`GET /api/v1/repositories/main/stats\` (warm): this commit ${spread(ours.flatMap((x) => x.statsMs))}${baseline ? `; baseline ${spread(theirs.flatMap((x) => x.statsMs))}` : ''}.`,
      '',
      '## The dashboard `GET /`',
      '',
      `Page: ${(pageBytes / 1024).toFixed(1)} KiB of HTML, ${rows} VM rows (50 a page), each VM's newest 12 restore points.`,
      '',
      '| measure | ms |',
      '|---|---|',
      `| server: request to last byte (Node http client, warm, ${rounds} runs) | ${spread(pageMs)} |`,
      `| Chromium: navigation responseEnd (fresh context each run, ${rounds} runs) | ${spread(browserRows.map((r) => r.responseEnd))} |`,
      `| Chromium: first contentful paint | ${spread(browserRows.map((r) => r.fcp))} |`,
      `| Chromium: load event end | ${spread(browserRows.map((r) => r.load))} |`,
      '',
    ];
    const file = join(out, `dashboard-${commit}.md`);
    await writeFile(file, `${lines.join('\n')}\n`);
    log(`wrote ${file}`);
    process.stdout.write(`${lines.join('\n')}\n`);
  } finally {
    await cache.remove();
    if (!kept) await rm(dir, { recursive: true, force: true });
  }
}

await main();
