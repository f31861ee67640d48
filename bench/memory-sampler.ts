/**
 * Loaded with `node --import` (NODE_OPTIONS) into a process a bench measures: samples process.memoryUsage()
 * every 20 ms and, at exit, writes the peaks to $BENCH_MEMORY_OUT as JSON (MiB): rss, V8 heap used and
 * total, external and array buffers (Buffers' bytes). What rss holds beyond heapTotal + external is native
 * memory outside V8 (LevelDB's memtables and caches, malloc arenas, code). On Linux it also samples
 * /proc/self/smaps_rollup every 100 ms: the peaks of anonymous (heap, malloc) and file-backed resident
 * memory (LevelDB's tables are read through mmap: their pages count in rss, and the kernel drops them first).
 * The main thread only.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { isMainThread } from 'node:worker_threads';

const out = process.env.BENCH_MEMORY_OUT;
if (out && isMainThread) {
  const peak = { rss: 0, heapUsed: 0, heapTotal: 0, external: 0, arrayBuffers: 0, nativeBeyondV8: 0, rssAnon: 0, rssFile: 0 };
  let ticks = 0;
  const rollup = (): void => {
    let text: string;
    try {
      text = readFileSync('/proc/self/smaps_rollup', 'utf8');
    } catch {
      return;
    }
    const kib = (field: string): number => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? 0) * 1024;
    peak.rssAnon = Math.max(peak.rssAnon, kib('Anonymous'));
    peak.rssFile = Math.max(peak.rssFile, kib('Rss') - kib('Anonymous'));
  };
  const sample = (): void => {
    if (ticks++ % 5 === 0) rollup();
    const m = process.memoryUsage();
    peak.rss = Math.max(peak.rss, m.rss);
    peak.heapUsed = Math.max(peak.heapUsed, m.heapUsed);
    peak.heapTotal = Math.max(peak.heapTotal, m.heapTotal);
    peak.external = Math.max(peak.external, m.external);
    peak.arrayBuffers = Math.max(peak.arrayBuffers, m.arrayBuffers);
    peak.nativeBeyondV8 = Math.max(peak.nativeBeyondV8, m.rss - m.heapTotal - m.external);
  };
  setInterval(sample, 20).unref();
  process.on('exit', () => {
    sample();
    const mib = Object.fromEntries(Object.entries(peak).map(([k, v]) => [k, Math.round(v / 2 ** 20)]));
    writeFileSync(out, JSON.stringify(mib));
  });
}
