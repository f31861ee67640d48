/**
 * Loaded with `node --import` (NODE_OPTIONS) into a process a bench measures: samples process.memoryUsage()
 * every 20 ms and, at exit, writes the peaks to $BENCH_MEMORY_OUT as JSON (MiB): rss, V8 heap used and
 * total, external and array buffers (Buffers' bytes). What rss holds beyond heapTotal + external is native
 * memory outside V8 (LevelDB's memtables and caches, malloc arenas, code). From /proc/self/status every
 * 100 ms, the two halves of rss: anonymous memory (heaps, malloc arenas) and file-backed pages (mapped files:
 * LevelDB's tables, and code), at their own peaks. The main thread only.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { isMainThread } from 'node:worker_threads';

const out = process.env.BENCH_MEMORY_OUT;

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
  setInterval(sample, 20).unref();
  setInterval(sampleParts, 100).unref();
  process.on('exit', () => {
    sample();
    sampleParts();
    const mib = Object.fromEntries(Object.entries(peak).map(([k, v]) => [k, Math.round(v / 2 ** 20)]));
    writeFileSync(out, JSON.stringify(mib));
  });
}
