/**
 * One writer on a folder: what format 3 (the default since `init` makes it on a folder too) costs against
 * format 1 (plain) or 2 (encrypted) for the same work, measured in interleaved pairs so that the machine's
 * load drifts over both alike.
 *
 *   node dist/bench/folder-formats.js [--size 1G] [--rounds 3] [--encrypt] [--dir /var/tmp] [--out DIR]
 *
 * Data: the suite's template image (bench/suite.ts: generateImage 'bench-template') and a copy with a 1%
 * change set (random 4 KiB–1 MiB writes, as the suite's incrementals). Each round, for each format in turn
 * (the order alternates between rounds), a new repository and a new host cache folder: full backup of the
 * template; backup of the changed copy (a raw file: read whole, deduplicated against the first); restore of
 * it to a new file (checked with cmp, not timed); verify --read-data. Every step is a process of its own
 * under /usr/bin/time, after `sync` and a drop of the page cache (the images are read from the disk each
 * time, as at night). Figures: each step's median wall time, CPU and peak RSS per format, and the median
 * of the per-round ratios (format 3 / the old format).
 */
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { formatBytes, generateImage, parseSize } from '../engine/index.js';
import { applyChangeSet } from './change-set.js';
import { arg, dropCaches, ENGINE, logger, machineLine, run, timed, type Measured } from './tools.js';

const log = logger('folder-formats');
const STEPS = ['full backup', 'backup after 1% changed (read whole, deduplicated)', 'restore to a new file', 'verify --read-data'] as const;
type Step = (typeof STEPS)[number];

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

async function main(): Promise<void> {
  const size = parseSize(arg('--size') ?? '1G');
  const rounds = Number(arg('--rounds') ?? '3');
  const encrypt = process.argv.includes('--encrypt');
  const old = encrypt ? 2 : 1;
  const formats = [old, 3];
  const work = await mkdtemp(join(arg('--dir') ?? '/var/tmp', 'engine-folder-formats-'));
  const env: Record<string, string> = encrypt ? { ENGINE_PASSWORD: 'bench passphrase' } : {};
  const results = new Map<string, Measured[]>();
  const key = (format: number, step: Step): string => `${format} ${step}`;
  try {
    const template = join(work, 'template.raw');
    const changed = join(work, 'changed.raw');
    log(`generating a ${formatBytes(size)} template image and a copy with 1% changed`);
    await generateImage(template, size, 'bench-template');
    await run('cp', ['--sparse=always', template, changed]);
    await applyChangeSet({ raw: [changed] }, size, 0.01, 'bench-change-0.01');
    for (let round = 0; round < rounds; round += 1) {
      const order = round % 2 === 0 ? formats : [...formats].reverse();
      for (const format of order) {
        const repo = join(work, `repo-${format}`);
        const cache = join(work, `cache-${format}`);
        const restored = join(work, 'restored.raw');
        await mkdir(cache, { mode: 0o700 });
        const stepEnv: Record<string, string> = { ...env, ENGINE_CACHE_DIR: cache };
        await run(ENGINE, ['init', repo, '--format', String(format), ...(encrypt ? ['--encrypt'] : [])], stepEnv);
        const step = async (name: Step, args: string[]): Promise<Measured> => {
          await dropCaches();
          const measured = await timed(ENGINE, [...args], stepEnv);
          results.set(key(format, name), [...(results.get(key(format, name)) ?? []), measured]);
          log(`round ${round + 1}, format ${format}: ${name}: ${measured.seconds.toFixed(2)} s wall, ${measured.cpuSeconds.toFixed(2)} s CPU, ${measured.peakRssMiB.toFixed(0)} MiB`);
          return measured;
        };
        await step('full backup', ['backup', '--repo', repo, '--source', template, '--name', 'vm', '--json']);
        const second = JSON.parse((await step('backup after 1% changed (read whole, deduplicated)', ['backup', '--repo', repo, '--source', changed, '--name', 'vm', '--json'])).stdout) as { id: string };
        await step('restore to a new file', ['restore', '--repo', repo, second.id, '--to', restored]);
        await run('cmp', [changed, restored]);
        await rm(restored);
        await step('verify --read-data', ['verify', '--repo', repo, '--read-data']);
        await rm(repo, { recursive: true, force: true });
        await rm(cache, { recursive: true, force: true });
      }
    }
  } finally {
    await rm(work, { recursive: true, force: true });
  }
  const lines = [
    `# One writer on a folder: format ${old} against format 3${encrypt ? ' (encrypted)' : ''}`,
    '',
    `${machineLine()}; ${formatBytes(size)} template image; ${rounds} interleaved rounds; page cache dropped before every step; ${new Date().toISOString()}.`,
    '',
    `| step | format ${old}: wall s (median) | format 3: wall s | ratio 3/${old} (median of rounds) | CPU s ${old} / 3 | peak RSS MiB ${old} / 3 | wall s per round, ${old} / 3 |`,
    '|---|---|---|---|---|---|---|',
  ];
  for (const name of STEPS) {
    const a = results.get(key(old, name)) ?? [];
    const b = results.get(key(3, name)) ?? [];
    const ratios = a.map((m, i) => b[i]!.seconds / m.seconds);
    lines.push(
      `| ${name} | ${median(a.map((m) => m.seconds)).toFixed(2)} | ${median(b.map((m) => m.seconds)).toFixed(2)} | ${median(ratios).toFixed(2)} | ` +
        `${median(a.map((m) => m.cpuSeconds)).toFixed(2)} / ${median(b.map((m) => m.cpuSeconds)).toFixed(2)} | ` +
        `${median(a.map((m) => m.peakRssMiB)).toFixed(0)} / ${median(b.map((m) => m.peakRssMiB)).toFixed(0)} | ` +
        `${a.map((m) => m.seconds.toFixed(1)).join(' ')} / ${b.map((m) => m.seconds.toFixed(1)).join(' ')} |`,
    );
  }
  const report = `${lines.join('\n')}\n`;
  process.stdout.write(report);
  const out = arg('--out');
  if (out !== undefined) {
    await mkdir(out, { recursive: true });
    await writeFile(join(out, `folder-formats${encrypt ? '-encrypted' : ''}.md`), report);
  }
}

await main();
