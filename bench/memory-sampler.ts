/**
 * Loaded with `node --import` (NODE_OPTIONS) into a process a bench measures: samples process.memoryUsage()
 * every 20 ms and, at exit, writes the peaks to $BENCH_MEMORY_OUT as JSON (MiB): rss, V8 heap used and
 * total, external and array buffers (Buffers' bytes). What rss holds beyond heapTotal + external is native
 * memory outside V8 (LevelDB's memtables and caches, malloc arenas, code). From /proc/self/status every
 * 100 ms, the two halves of rss: anonymous memory (heaps, malloc arenas) and file-backed pages (mapped files:
 * LevelDB's tables, and code), at their own peaks. The main thread only. With $BENCH_MEMORY_TRACE, also a
 * line per second ($BENCH_MEMORY_TRACE_MS: every that many ms) into that file (ms since start, then the same
 * figures in MiB as they are then), to see which phase of a command holds the peak. With $BENCH_MEMORY_GC too (and node --expose-gc), a full GC
 * before each line of the trace: the line's heapUsed is then what is live, not what is live plus garbage
 * V8 has not collected yet (a diagnosis: it changes the peaks it measures).
 */
import { appendFileSync, readFileSync, writeFileSync } from 'node:fs';
import { getHeapSpaceStatistics } from 'node:v8';
import { isMainThread } from 'node:worker_threads';

const out = process.env.BENCH_MEMORY_OUT;
const trace = process.env.BENCH_MEMORY_TRACE;

/** RssAnon and RssFile of this process, in bytes (0 where /proc is not Linux's). */
function rssParts(): { rssAnon: number; rssFile: number } {
  try {
    const status = readFileSync('/proc/self/status', 'utf8');
    const kib = (name: string): number => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? 0) * 1024;
    return { rssAnon: kib('RssAnon'), rssFile: kib('RssFile') };
  } catch {
    return { rssAnon: 0, rssFile: 0 };
  }
}

if (out && isMainThread) {
  const peak = { rss: 0, heapUsed: 0, heapTotal: 0, external: 0, arrayBuffers: 0, nativeBeyondV8: 0, rssAnon: 0, rssFile: 0 };
  const sample = (): void => {
    const m = process.memoryUsage();
    peak.rss = Math.max(peak.rss, m.rss);
    peak.heapUsed = Math.max(peak.heapUsed, m.heapUsed);
    peak.heapTotal = Math.max(peak.heapTotal, m.heapTotal);
    peak.external = Math.max(peak.external, m.external);
    peak.arrayBuffers = Math.max(peak.arrayBuffers, m.arrayBuffers);
    peak.nativeBeyondV8 = Math.max(peak.nativeBeyondV8, m.rss - m.heapTotal - m.external);
  };
  const sampleParts = (): void => {
    const { rssAnon, rssFile } = rssParts();
    peak.rssAnon = Math.max(peak.rssAnon, rssAnon);
    peak.rssFile = Math.max(peak.rssFile, rssFile);
  };
  if (trace) {
    const started = performance.now();
    const mib = (bytes: number): number => Math.round(bytes / 2 ** 20);
    const collect = process.env.BENCH_MEMORY_GC ? (globalThis as { gc?: () => void }).gc : undefined;
    setInterval(() => {
      collect?.();
      const m = process.memoryUsage();
      const { rssAnon, rssFile } = rssParts();
      // V8's spaces by size (MiB): which one holds heapTotal (the young generation's reserve, or old garbage).
      const spaces = Object.fromEntries(getHeapSpaceStatistics().filter((space) => space.space_size >= 2 ** 20).map((space) => [space.space_name, mib(space.space_size)]));
      const line = { ms: Math.round(performance.now() - started), rss: mib(m.rss), heapUsed: mib(m.heapUsed), heapTotal: mib(m.heapTotal), external: mib(m.external), arrayBuffers: mib(m.arrayBuffers), rssAnon: mib(rssAnon), rssFile: mib(rssFile), spaces };
      appendFileSync(trace, `${JSON.stringify(line)}\n`);
    }, Number(process.env.BENCH_MEMORY_TRACE_MS) || 1000).unref();
  }
  setInterval(sample, 20).unref();
  setInterval(sampleParts, 100).unref();
  process.on('exit', () => {
    sample();
    sampleParts();
    const mib = Object.fromEntries(Object.entries(peak).map(([k, v]) => [k, Math.round(v / 2 ** 20)]));
    writeFileSync(out, JSON.stringify(mib));
  });
}
