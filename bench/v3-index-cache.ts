/**
 * `node dist/bench/v3-index-cache.js [segments] [entries per segment]`: what the v3 per-host index cache costs
 * (SPEC.md 19.4). Segments live in the memory backend (what is measured is decoding and LevelDB, not the
 * network; add the store's GET time per segment for S3), the cache on the local disk under $TMPDIR:
 *
 * - first open: every segment fetched, decoded and ingested (the time a new host or a lost cache costs);
 * - catch-up: one new segment of a backup's size after the cache is current (what each backup pays at start);
 * - rebuild: an ingested segment deleted, so the cache starts again from N segments;
 * - disk per slot, and per 100k entries.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { execFileSync } from 'node:child_process';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { initChecksum } from '../repo-format/checksum.js';
import { MemoryStorage } from '../repo-format/storage/memory.js';
import { encodeSegment, segmentKey, type SegmentEntry } from '../repo-format/v3/segment.js';
import { IndexCache } from '../repo-format/v3/index-cache.js';

await initChecksum();
const segments = Number(process.argv[2] ?? 100);
const perSegment = Number(process.argv[3] ?? 10_000);
const repositoryId = randomBytes(16).toString('hex');

function segmentOf(writer: string, count: number): { key: string; bytes: Buffer } {
  const entries: SegmentEntry[] = [];
  const pack = randomBytes(16).toString('hex');
  for (let i = 0; i < count; i++) entries.push({ id: randomBytes(32), packId: pack, offset: 32 + i * 1000, length: 900, rawLength: 1 << 20, kind: 1, flags: 1 });
  entries.sort((a, b) => Buffer.compare(a.id, b.id));
  const name = { writer, seq: 0 };
  return { key: segmentKey(name), bytes: encodeSegment({ name, supersedes: [], entries }) };
}

const storage = new MemoryStorage();
let storedBytes = 0;
for (let s = 0; s < segments; s++) {
  const { key, bytes } = segmentOf(randomBytes(16).toString('hex'), perSegment);
  storedBytes += bytes.length;
  await storage.put(key, bytes);
}
const total = segments * perSegment;
const root = await mkdtemp(join(tmpdir(), 'v3-cache-bench-'));
const seconds = (start: bigint): number => Number(process.hrtime.bigint() - start) / 1e9;
/** CPU seconds (user + system) of this process since `from`: what the machine's load does not inflate. */
const cpu = (from: NodeJS.CpuUsage): number => {
  const used = process.cpuUsage(from);
  return (used.user + used.system) / 1e6;
};
const du = (path: string): number => Number(execFileSync('du', ['-sb', path], { encoding: 'utf8' }).split('\t')[0]);

try {
  let start = process.hrtime.bigint();
  let cpuStart = process.cpuUsage();
  const { cache } = await IndexCache.open({ cacheRoot: root, repositoryId, storage });
  const firstOpen = seconds(start);
  const firstOpenCpu = cpu(cpuStart);
  const slotBytes = du(cache.path);

  const next = segmentOf(randomBytes(16).toString('hex'), perSegment);
  await storage.put(next.key, next.bytes);
  start = process.hrtime.bigint();
  cpuStart = process.cpuUsage();
  const caughtUp = await cache.catchUp();
  const catchUp = seconds(start);
  const catchUpCpu = cpu(cpuStart);

  start = process.hrtime.bigint();
  const nothing = await cache.catchUp();
  const idle = seconds(start);

  await storage.delete(next.key);
  start = process.hrtime.bigint();
  cpuStart = process.cpuUsage();
  const rebuilt = await cache.catchUp();
  const rebuild = seconds(start);
  const rebuildCpu = cpu(cpuStart);
  await cache.close();

  const lines = [
    `# v3 index cache: ${segments} segments × ${perSegment} entries = ${total} entries (${(storedBytes / 2 ** 20).toFixed(1)} MiB of segments)`,
    '',
    `load average at the end: ${loadavg().map((l) => l.toFixed(1)).join(', ')} on ${cpus().length} cores (wall times grow with it; CPU times much less)`,
    '',
    '| measure | wall | CPU |',
    '|---|---|---|',
    `| first open (fetch, decode, ingest all) | ${firstOpen.toFixed(2)} s = ${((firstOpen / total) * 1e5).toFixed(2)} s per 100k entries, ${((firstOpen / segments) * 1000).toFixed(1)} ms per segment | ${firstOpenCpu.toFixed(2)} s = ${((firstOpenCpu / total) * 1e5).toFixed(2)} s per 100k entries |`,
    `| catch-up, 1 new segment of ${perSegment} entries | ${(catchUp * 1000).toFixed(1)} ms (${caughtUp.ingested} ingested) = ${((catchUp / perSegment) * 1e5).toFixed(2)} s per 100k entries | ${(catchUpCpu * 1000).toFixed(1)} ms |`,
    `| catch-up with nothing new (list only) | ${(idle * 1000).toFixed(1)} ms (${nothing.ingested} ingested) | |`,
    `| rebuild from ${segments} segments (one ingested segment gone) | ${rebuild.toFixed(2)} s (${rebuilt.rebuilt ? 'rebuilt' : 'NOT rebuilt'}) | ${rebuildCpu.toFixed(2)} s |`,
    `| disk per slot after first open | ${(slotBytes / 2 ** 20).toFixed(1)} MiB = ${((slotBytes / total) * 1e5 / 2 ** 20).toFixed(2)} MiB per 100k entries (${(slotBytes / total).toFixed(1)} B per entry) | |`,
  ];
  process.stdout.write(`${lines.join('\n')}\n`);
} finally {
  await rm(root, { recursive: true, force: true });
}
