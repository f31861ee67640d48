/**
 * Which compression a new repository gets (SPEC.md 13.1, issue 15 item 3): each codec on the same data,
 * through the real CLI, interleaved so that a loaded machine weighs on every codec alike.
 *
 *   node dist/bench/compression.js [--image /var/tmp/engine-real-image/usr.img] [--rounds 2]
 *        [--codecs lz4,zstd:1,zstd:3] [--template-size 1G] [--random-size 256M] [--restic yes|no]
 *        [--work /var/tmp]
 *
 * Data: the real /usr ext4 image (bench/real-image.sh; read only), the suite's synthetic template
 * (generateImage) and random data. Per codec and data set: a full backup into a new format-3 folder
 * repository, cold (page cache dropped first, root), wall and CPU-s (user+sys) per GiB of the disk; the
 * repository's bytes; a restore to a new file made durable (`restore` then `sync`), cold, wall and CPU-s per
 * GiB; the restored file compared with the source. restic 0.14 (zstd, its default `auto`) backs up the real
 * image once per round for its repository size and backup time. Then the probe (compression.ts
 * worthCompressing) alone: what it costs on compressible blocks and saves on incompressible ones, in CPU-s
 * per GiB, in this process.
 */
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { open } from 'node:fs/promises';
import { formatBytes, generateImage, parseSize } from '../engine/index.js';
import { compress, parseCompression, worthCompressing, type Compression } from '../repo-format/compression.js';
import { arg, coldTimed, duBytes, ENGINE, initRepository, loadAverage, logger, machineLine, privateEngineCache, run, type Measured } from './tools.js';

const log = logger('compression');
const GiB = 1024 ** 3;

interface Row {
  data: string;
  codec: string;
  round: number;
  backup: Measured;
  restore: Measured;
  stored: number;
  identical: boolean;
  load: string;
}

async function engineRun(args: string[]): Promise<Measured> {
  return coldTimed(ENGINE, args);
}

async function oneCodec(work: string, data: { name: string; path: string }, codec: string, round: number): Promise<Row> {
  const repo = join(work, `repo-${codec.replace(':', '-')}`);
  const into = join(work, 'restored.img');
  try {
    await initRepository(repo, ['--compression', codec]);
    const load = await loadAverage();
    const backup = await engineRun(['backup', '--repo', repo, '--source', data.path, '--json']);
    const id = (JSON.parse(backup.stdout) as { id: string }).id;
    const stored = await duBytes(repo);
    // Durable: the restore's own writes, then a sync that charges whatever write-back it left to it.
    const restore = await coldTimed('sh', ['-c', `"$0" restore --repo "$1" "$2" --to "$3" >/dev/null && sync`, ENGINE, repo, id, into]);
    const identical = await run('cmp', ['-s', data.path, into]).then(() => true, () => false);
    return { data: data.name, codec, round, backup, restore, stored, identical, load };
  } finally {
    await rm(repo, { recursive: true, force: true });
    await rm(into, { force: true });
  }
}

async function resticSize(work: string, image: string): Promise<{ backup: Measured; stored: number }> {
  const repo = join(work, 'restic-repo');
  const env = { RESTIC_REPOSITORY: repo, RESTIC_PASSWORD: 'bench', RESTIC_CACHE_DIR: join(work, 'restic-cache') };
  try {
    await run('restic', ['init'], env);
    const backup = await coldTimed('restic', ['backup', '--quiet', image], env);
    return { backup, stored: await duBytes(repo) };
  } finally {
    await rm(repo, { recursive: true, force: true });
    await rm(join(work, 'restic-cache'), { recursive: true, force: true });
  }
}

function cpuSeconds(): number {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

/** The probe alone, in this process: CPU-s per GiB of blocks for probe, and for compressing whole blocks. */
async function probeCost(image: string, codecs: Compression[]): Promise<string[]> {
  const B = 1024 * 1024;
  const real: Buffer[] = [];
  const file = await open(image, 'r');
  try {
    const size = (await file.stat()).size;
    for (let at = 0; real.length < 256 && at + B <= size; at += 11 * B) {
      const block = Buffer.allocUnsafe(B);
      await file.read(block, 0, B, at);
      if (block.some((b) => b !== 0)) real.push(block);
    }
  } finally {
    await file.close();
  }
  const random = Array.from({ length: 128 }, () => randomBytes(B));
  const lines = ['| codec | data | probe CPU-s/GiB | whole-block compress CPU-s/GiB | blocks the probe skips | stored share of skipped blocks had they been compressed |', '|---|---|---|---|---|---|'];
  for (const codec of codecs) {
    for (const [name, blocks] of [['real /usr blocks', real], ['random', random]] as const) {
      const gib = (blocks.length * B) / GiB;
      let t = cpuSeconds();
      const worth = blocks.map((b) => worthCompressing(codec, b));
      const probe = cpuSeconds() - t;
      t = cpuSeconds();
      const sizes = blocks.map((b) => compress(codec, b).length);
      const whole = cpuSeconds() - t;
      const skipped = worth.filter((w) => !w).length;
      const skippedStored = sizes.filter((_, i) => !worth[i]).reduce((a, s) => a + Math.min(s, B), 0);
      lines.push(`| ${codec.codec === 'lz4' ? 'lz4' : `zstd:${codec.level}`} | ${name} | ${(probe / gib).toFixed(3)} | ${(whole / gib).toFixed(3)} | ${skipped} of ${blocks.length} | ${skipped ? ((skippedStored / (skipped * B)) * 100).toFixed(1) + '%' : '-'} |`);
    }
  }
  return lines;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

async function main(): Promise<void> {
  const image = arg('--image') ?? '/var/tmp/engine-real-image/usr.img';
  const rounds = Number(arg('--rounds') ?? '2');
  const codecs = (arg('--codecs') ?? 'lz4,zstd:1,zstd:3').split(',');
  const templateSize = parseSize(arg('--template-size') ?? '1G');
  const randomSize = parseSize(arg('--random-size') ?? '256M');
  const withRestic = (arg('--restic') ?? 'yes') === 'yes';
  const work = await mkdtemp(join(arg('--work') ?? '/var/tmp', 'engine-compression-'));
  const cache = await privateEngineCache();
  try {
    log(`${machineLine()}; load ${await loadAverage()}`);
    const sets = [{ name: 'real /usr image', path: image }];
    if (templateSize > 0) {
      const template = join(work, 'template.img');
      await generateImage(template, templateSize, 'bench-template');
      sets.push({ name: `template ${formatBytes(templateSize)}`, path: template });
    }
    if (randomSize > 0) {
      const random = join(work, 'random.img');
      await run('dd', ['if=/dev/urandom', `of=${random}`, 'bs=1M', `count=${Math.ceil(randomSize / 1024 ** 2)}`, 'status=none']);
      sets.push({ name: `random ${formatBytes(randomSize)}`, path: random });
    }
    const rows: Row[] = [];
    const restic: { backup: Measured; stored: number }[] = [];
    for (let round = 1; round <= rounds; round++) {
      for (const data of sets) {
        // Each round starts with another codec: none always runs first, or always after a given one.
        const order = codecs.map((_, i) => codecs[(i + round - 1) % codecs.length]!);
        for (const codec of order) {
          log(`round ${round}: ${data.name}, ${codec}`);
          const row = await oneCodec(work, data, codec, round);
          rows.push(row);
          log(`  backup ${row.backup.seconds.toFixed(2)} s / ${row.backup.cpuSeconds.toFixed(2)} CPU-s, stored ${formatBytes(row.stored)}, restore ${row.restore.seconds.toFixed(2)} s / ${row.restore.cpuSeconds.toFixed(2)} CPU-s, identical ${row.identical}, load ${row.load}`);
        }
      }
      if (withRestic) {
        log(`round ${round}: restic on the real image`);
        const r = await resticSize(work, image);
        restic.push(r);
        log(`  restic backup ${r.backup.seconds.toFixed(2)} s / ${r.backup.cpuSeconds.toFixed(2)} CPU-s, stored ${formatBytes(r.stored)}`);
      }
    }
    const out: string[] = [];
    out.push(`Machine: ${machineLine()}. ${rounds} rounds, codecs interleaved (each round starts with the next); medians. Every step cold (page cache dropped, root). CPU-s = user + sys of the process and its children. Load averages during the runs: ${rows.map((r) => r.load.split(' ')[0]).join(', ')}.`);
    out.push('');
    out.push('| data | codec | stored | ratio | backup s | backup CPU-s/GiB | restore s (durable) | restore CPU-s/GiB | peak RSS backup / restore | identical |');
    out.push('|---|---|---|---|---|---|---|---|---|---|');
    for (const data of sets) {
      const size = (await stat(data.path)).size;
      for (const codec of codecs) {
        const mine = rows.filter((r) => r.data === data.name && r.codec === codec);
        const stored = median(mine.map((r) => r.stored));
        out.push(
          `| ${data.name} | ${codec} | ${formatBytes(stored)} | ${(size / stored).toFixed(2)} | ${median(mine.map((r) => r.backup.seconds)).toFixed(2)} | ${(median(mine.map((r) => r.backup.cpuSeconds)) / (size / GiB)).toFixed(2)} | ${median(mine.map((r) => r.restore.seconds)).toFixed(2)} | ${(median(mine.map((r) => r.restore.cpuSeconds)) / (size / GiB)).toFixed(2)} | ${Math.max(...mine.map((r) => r.backup.peakRssMiB)).toFixed(0)} / ${Math.max(...mine.map((r) => r.restore.peakRssMiB)).toFixed(0)} MiB | ${mine.every((r) => r.identical) ? 'yes' : 'NO'} |`,
        );
      }
      if (data.path === image && restic.length > 0) {
        const stored = median(restic.map((r) => r.stored));
        out.push(`| ${data.name} | restic 0.14 (zstd auto) | ${formatBytes(stored)} | ${(size / stored).toFixed(2)} | ${median(restic.map((r) => r.backup.seconds)).toFixed(2)} | ${(median(restic.map((r) => r.backup.cpuSeconds)) / (size / GiB)).toFixed(2)} | - | - | - | - |`);
      }
    }
    out.push('');
    out.push('The probe (blocks of 1 MiB, this process):');
    out.push('');
    out.push(...(await probeCost(image, codecs.map(parseCompression))));
    process.stdout.write(`${out.join('\n')}\n`);
  } finally {
    await rm(work, { recursive: true, force: true });
    await cache.remove();
  }
}

await main();
