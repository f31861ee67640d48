/**
 * `engine copy` measured (issue 17, SPEC.md 22), in one run on this machine:
 *
 * 1. RGW's own PUT and GET ceiling (curl, 8 objects of 32 MiB, 4 in flight; s3-lab.ts), the page cache dropped;
 * 2. a copy of one backup of new random data (incompressible: what goes up is what was read) from a format-3
 *    folder repository into a fresh plain S3 repository on the same RGW, and into a fresh folder repository,
 *    each after `sync; echo 3 > /proc/sys/vm/drop_caches`: bytes sent per second over the ceiling's PUT rate;
 * 3. the S3 copy copied back into a fresh folder (bytes per second over the ceiling's GET rate);
 * 4. restore of the backup from the source (folder), from the folder copy and from the S3 copy, each cold,
 *    each compared with the image (cmp).
 *
 *   node dist/bench/copy.js [--size 512M] [--out bench/results] [--dir /var/tmp]
 *
 * Writes bench/results/copy-<commit>.md and .json. RGW runs on the same cores (one memstore OSD: objects in RAM).
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { open } from 'node:fs/promises';
import { dropCaches, loadAverage, rgwCeiling, startBenchCluster, type Ceiling } from './s3-lab.js';
import { arg, ENGINE, logger, machineLine, MB, run, timed, type Measured } from './tools.js';
import { parseSize } from '../engine/common/units.js';

const log = logger('copy');
const BUCKET = 'bench-copy';

interface Row {
  what: string;
  seconds: number;
  /** Disk bytes over wall time. */
  diskMBps: number;
  /** Bytes sent to the target over wall time (copies), or null. */
  sentMBps: number | null;
  cpuSeconds: number;
  peakRssMiB: number;
  load: string;
  note: string;
}

interface CopyJson {
  backupsCopied: number;
  chunksSent: number;
  bytesSent: number;
  bytesRead: number;
}

async function writeRandom(path: string, size: number): Promise<void> {
  const file = await open(path, 'w');
  try {
    for (let at = 0; at < size; at += 8 * 2 ** 20) await file.write(randomBytes(Math.min(8 * 2 ** 20, size - at)));
    await file.sync();
  } finally {
    await file.close();
  }
}

async function identical(a: string, b: string): Promise<boolean> {
  return run('cmp', ['-s', a, b]).then(() => true, () => false);
}

async function main(): Promise<void> {
  const size = parseSize(arg('--size') ?? '512M');
  const outDir = arg('--out') ?? 'bench/results';
  const work = await mkdtemp(join(arg('--dir') ?? '/var/tmp', 'engine-bench-copy-'));
  const commit = (await run('git', ['rev-parse', '--short', 'HEAD'])).stdout.trim();
  const loadAtStart = await loadAverage();
  const cluster = await startBenchCluster({ memstoreBytes: Math.max(2 * 2 ** 30, 3 * size) }, BUCKET, work, log);
  const env = { AWS_ACCESS_KEY_ID: cluster.user.accessKeyId, AWS_SECRET_ACCESS_KEY: cluster.user.secretAccessKey, AWS_ENDPOINT_URL_S3: cluster.endpoint, AWS_REGION: cluster.region, AWS_SHARED_CREDENTIALS_FILE: join(work, 'none'), AWS_CONFIG_FILE: join(work, 'none'), ENGINE_CACHE_DIR: join(work, 'cache') };
  const rows: Row[] = [];
  const notes: string[] = [];
  let ceiling: Ceiling | undefined;
  const add = async (what: string, m: Measured, sent: number | null, note = ''): Promise<void> => {
    const row: Row = { what, seconds: m.seconds, diskMBps: size / MB / m.seconds, sentMBps: sent === null ? null : sent / MB / m.seconds, cpuSeconds: m.cpuSeconds, peakRssMiB: m.peakRssMiB, load: m.load ?? (await loadAverage()), note };
    rows.push(row);
    log(`${what}: ${row.seconds.toFixed(2)} s, ${row.diskMBps.toFixed(0)} MB/s of disk${row.sentMBps === null ? '' : `, ${row.sentMBps.toFixed(0)} MB/s sent`}, CPU ${row.cpuSeconds.toFixed(1)} s, RSS ${row.peakRssMiB.toFixed(0)} MiB ${note}`);
  };
  const cold = async (args: string[]): Promise<Measured> => {
    await dropCaches();
    const load = await loadAverage();
    return { ...(await timed(ENGINE, [...args, '--json'], env)), load };
  };
  try {
    const image = join(work, 'random.img');
    await writeRandom(image, size);
    const source = join(work, 'source');
    await run(ENGINE, ['init', source], env);
    const backup = JSON.parse((await run(ENGINE, ['backup', '--repo', source, '--source', image, '--name', 'random', '--json'], env)).stdout) as { id: string };
    log('RGW ceiling (curl, 8 objects of 32 MiB, 4 in flight)');
    await dropCaches();
    ceiling = await rgwCeiling(cluster, BUCKET, work, 8, 32 * 2 ** 20, 4, 'copy');
    log(`ceiling: PUT ${ceiling.putMBps.toFixed(0)} MB/s, GET ${ceiling.getMBps.toFixed(0)} MB/s`);

    const s3 = `s3://${BUCKET}/copy`;
    const folder = join(work, 'copy-folder');
    await run(ENGINE, ['init', s3], env);
    await run(ENGINE, ['init', folder], env);
    const targets: { name: string; repo: string; id?: string }[] = [{ name: 'S3 (RGW)', repo: s3 }, { name: 'folder', repo: folder }];
    for (const target of targets) {
      const m = await cold(['copy', '--from', source, '--to', target.repo, '--all']);
      const json = JSON.parse(m.stdout) as CopyJson & { backups: { target: string }[] };
      target.id = json.backups[0]!.target;
      await add(`copy folder → ${target.name}`, m, json.bytesSent, `${json.chunksSent} chunks, ${(json.bytesSent / MB).toFixed(0)} MB sent`);
    }
    // The other way: the S3 copy into a fresh folder (reads from RGW, one ranged GET per chunk).
    const back = join(work, 'copy-back');
    await run(ENGINE, ['init', back], env);
    const backM = await cold(['copy', '--from', s3, '--to', back, '--all']);
    const backJson = JSON.parse(backM.stdout) as CopyJson;
    await add('copy S3 (RGW) → folder', backM, backJson.bytesSent, `${backJson.chunksSent} chunks, ${(backJson.bytesRead / MB).toFixed(0)} MB read`);
    const restoreInto = join(work, 'restored.raw');
    for (const [what, repo, id] of [['restore from the source (folder)', source, backup.id], ['restore from the folder copy', folder, targets[1]!.id!], ['restore from the S3 copy', s3, targets[0]!.id!]] as const) {
      const m = await cold(['restore', '--repo', repo, id, '--to', restoreInto]);
      const same = await identical(restoreInto, image);
      if (!same) notes.push(`${what}: the restore differed from the image (a bug: its figures do not count)`);
      await add(what, m, null, same ? 'cmp: identical' : 'cmp: DIFFERENT');
      await rm(restoreInto, { force: true });
    }
  } finally {
    await cluster.stop();
    await rm(work, { recursive: true, force: true });
  }
  const row = (what: string): Row | undefined => rows.find((r) => r.what === what);
  const s3Copy = row('copy folder → S3 (RGW)');
  const share = s3Copy && ceiling && s3Copy.sentMBps !== null ? s3Copy.sentMBps / ceiling.putMBps : undefined;
  const fromSource = row('restore from the source (folder)');
  const fromFolderCopy = row('restore from the folder copy');
  const fromS3Copy = row('restore from the S3 copy');
  const markdown = [
    `# engine copy at ${commit} (${new Date().toISOString()})`,
    '',
    `${machineLine()}; load average at start ${loadAtStart}, at end ${await loadAverage()} (a shared machine: other sessions' work runs meanwhile).`,
    `One run. Image: ${(size / 2 ** 20).toFixed(0)} MiB of new random data (incompressible), one backup in a format-3 folder repository (1 MiB blocks, lz4). Every timed run is its own process under /usr/bin/time after \`sync; echo 3 > /proc/sys/vm/drop_caches\`. RGW runs on the same two cores (one memstore OSD: objects in RAM).`,
    '',
    `RGW ceiling (curl, 8 objects of 32 MiB, 4 in flight, measured in this run): PUT ${ceiling?.putMBps.toFixed(0)} MB/s, GET ${ceiling?.getMBps.toFixed(0)} MB/s.`,
    '',
    '| run | s | disk MB/s | sent MB/s | CPU s | peak RSS MiB | load before | note |',
    '|---|---|---|---|---|---|---|---|',
    ...rows.map((r) => `| ${r.what} | ${r.seconds.toFixed(2)} | ${r.diskMBps.toFixed(0)} | ${r.sentMBps === null ? '-' : r.sentMBps.toFixed(0)} | ${r.cpuSeconds.toFixed(1)} | ${r.peakRssMiB.toFixed(0)} | ${r.load} | ${r.note} |`),
    '',
    `- copy folder → S3: ${share === undefined ? 'not measured' : `${(share * 100).toFixed(0)}% of RGW's PUT ceiling`} (bytes sent per second over curl's PUT rate).`,
    `- copy S3 → folder: ${row('copy S3 (RGW) → folder') && ceiling ? `${((size / MB / row('copy S3 (RGW) → folder')!.seconds / ceiling.getMBps) * 100).toFixed(0)}% of RGW's GET ceiling` : 'not measured'} (disk bytes per second over curl's GET rate).`,
    `- restore from the folder copy / from the source: ${fromSource && fromFolderCopy ? (fromFolderCopy.seconds / fromSource.seconds).toFixed(2) : '-'} (time ratio; the copy's packs were written by one sequential writer, the source's by the backup pipeline).`,
    `- restore from the S3 copy / from the source (folder): ${fromSource && fromS3Copy ? (fromS3Copy.seconds / fromSource.seconds).toFixed(2) : '-'} (another store: RGW's GET path, not the copy, sets it).`,
    ...notes.map((n) => `- ${n}`),
    '',
  ].join('\n');
  process.stdout.write(markdown);
  await writeFile(join(outDir, `copy-${commit}.md`), markdown);
  await writeFile(join(outDir, `copy-${commit}.json`), JSON.stringify({ machine: machineLine(), commit, size, ceiling, rows, notes }, null, 2));
}

void main().catch((error: unknown) => {
  process.stderr.write(`${(error as Error).stack ?? String(error)}\n`);
  process.exit(1);
});
