/**
 * The cost of encryption: `node dist/bench/encryption.js [--size 1G] [--runs 3] [--dir DIR] [--out bench/results]`.
 *
 * The same generated VM-like image backed up in full into a fresh plain repository and a fresh encrypted
 * one (HMAC-SHA256 ids, AES-256-GCM frames), then restored from each; runs alternate plain / encrypted so
 * that a noisy neighbour hurts both alike, and the median run is reported. Also the cost of opening an
 * encrypted repository (scrypt N=2^15, r=8, p=1: `engine list` on an empty repository, process start included)
 * and the bytes stored. Each command runs as its own process under /usr/bin/time.
 * Target (reported, never enforced): encrypted full backup within 10% of the plain one's wall time.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { formatBytes, generateImage, parseSize } from '../engine/index.js';
import { reportMarkdown, verdict, writeReport } from './report.js';
import { arg, duBytes, ENGINE, initRepository, logger, machineLine, privateEngineCache, sh, timed, type Measured } from './tools.js';

const MB = 1e6;
const PASSWORD_ENV = { ENGINE_PASSWORD: 'bench passphrase' };
const log = logger('encryption');

type Kind = 'plain' | 'encrypted';
type Scenario = 'full backup' | 'restore' | 'open (engine list, empty repository)';

interface Row {
  scenario: Scenario;
  kind: Kind;
  /** Every run's measurement, in run order. */
  runs: Measured[];
  median: Measured;
  mbPerS?: number | undefined;
  storedBytes?: number | undefined;
}

const median = (values: Measured[]): Measured => [...values].sort((a, b) => a.seconds - b.seconds)[Math.floor(values.length / 2)]!;

async function main(): Promise<void> {
  const size = parseSize(arg('--size') ?? '1G');
  const runs = Number(arg('--runs') ?? '3');
  const outDir = arg('--out') ?? 'bench/results';
  const work = await mkdtemp(join(arg('--dir') ?? tmpdir(), 'encryption-bench-'));
  const cache = await privateEngineCache();
  // engine init's default format, as users get it; the report says which (every repository's, checked).
  const formats = new Set<number>();
  const measured = new Map<string, Measured[]>();
  const stored = new Map<Kind, number>();
  const record = (scenario: Scenario, kind: Kind, m: Measured): void => {
    const key = `${scenario}/${kind}`;
    measured.set(key, [...(measured.get(key) ?? []), m]);
  };
  try {
    const image = join(work, 'disk.img');
    log(`generating a ${formatBytes(size)} VM-like image`);
    await generateImage(image, size, 'encryption-bench');
    await sh('sync', []);
    await sh('cat', [image]).catch(() => undefined); // warm the page cache: both kinds start equal

    for (let run = 0; run < runs; run += 1) {
      for (const kind of ['plain', 'encrypted'] as const) {
        const repo = join(work, `${kind}-${run}`);
        const env = kind === 'encrypted' ? PASSWORD_ENV : {};
        formats.add(await initRepository(repo, kind === 'encrypted' ? ['--encrypt'] : [], env));
        log(`run ${run + 1}/${runs}, ${kind}: open, full backup, restore`);
        record('open (engine list, empty repository)', kind, await timed(ENGINE, ['list', '--repo', repo], env));
        record('full backup', kind, await timed(ENGINE, ['backup', '--repo', repo, '--source', image, '--name', 'bench'], env));
        stored.set(kind, await duBytes(join(repo, 'packs')));
        const id = (JSON.parse(await sh(ENGINE, ['list', '--repo', repo, '--json'], env)) as { backups: { id: string }[] }).backups[0]!.id;
        const target = join(work, `${kind}-${run}.restored`);
        record('restore', kind, await timed(ENGINE, ['restore', '--repo', repo, id, '--to', target], env));
        await rm(target, { force: true });
        await rm(repo, { recursive: true, force: true });
      }
    }

    const rows: Row[] = [];
    for (const scenario of ['full backup', 'restore', 'open (engine list, empty repository)'] as const) {
      for (const kind of ['plain', 'encrypted'] as const) {
        const all = measured.get(`${scenario}/${kind}`)!;
        const m = median(all);
        const moves = scenario !== 'open (engine list, empty repository)';
        rows.push({ scenario, kind, runs: all, median: m, mbPerS: moves ? size / MB / m.seconds : undefined, storedBytes: scenario === 'full backup' ? stored.get(kind) : undefined });
      }
    }
    const find = (scenario: Scenario, kind: Kind): Row => rows.find((r) => r.scenario === scenario && r.kind === kind)!;
    const ratio = (scenario: Scenario): number => find(scenario, 'encrypted').median.seconds / find(scenario, 'plain').median.seconds;
    const machine = machineLine();
    const table = [
      '| scenario | repository | wall s (median) | every run, s | MB/s of image | encrypted ÷ plain (time) | CPU s | peak RSS MiB | stored in packs |',
      '| --- | --- | --- | --- | --- | --- | --- | --- | --- |',
      ...rows.map((r) => {
        const cells = [
          r.scenario,
          r.kind,
          r.median.seconds.toFixed(2),
          r.runs.map((m) => m.seconds.toFixed(2)).join(', '),
          r.mbPerS !== undefined ? r.mbPerS.toFixed(0) : '',
          r.kind === 'encrypted' ? ratio(r.scenario).toFixed(2) : '',
          r.median.cpuSeconds.toFixed(2),
          r.median.peakRssMiB.toFixed(0),
          r.storedBytes !== undefined ? `${formatBytes(r.storedBytes)} (${r.storedBytes} B)` : '',
        ];
        return `| ${cells.join(' | ')} |`;
      }),
    ].join('\n');
    // The target holds in every run (plain and encrypted of the same run side by side), not in the medians.
    const plainRuns = find('full backup', 'plain').runs;
    const backupRatios = find('full backup', 'encrypted').runs.map((m, run) => m.seconds / plainRuns[run]!.seconds);
    const targets = [
      `encrypted full backup within 10% of plain (encrypted ÷ plain per run: ${backupRatios.map((r) => `${r.toFixed(2)}×`).join(', ')}; of the medians ${ratio('full backup').toFixed(2)}×) → ${verdict(backupRatios, (r) => r <= 1.1)}`,
    ];
    const markdown = reportMarkdown(
      'Encryption cost',
      [
        `Machine: ${machine}. Image: ${formatBytes(size)} VM-like raw image (generateImage seed "encryption-bench"), warm in the page cache. MB = 10^6 B.`,
        `${runs} runs, plain and encrypted alternating, each into a fresh repository; the median run is reported. The machine is shared with other work: figures are indicative.`,
        `The repositories: format ${[...formats].join(' and ')} folders (what \`engine init\` creates by default), the host index cache of the run's own (ENGINE_CACHE_DIR), the CLI run as users run it (bin/engine).`,
        'Encrypted: HMAC-SHA256 chunk ids, AES-256-GCM per frame and per backup record; the key file is unlocked by scrypt (N=2^15, r=8, p=1) at every open.',
      ],
      table,
      targets,
      [],
    );
    await writeReport(outDir, 'encryption', markdown, { machine, size, repositoryFormats: [...formats], runs, rows, targets });
  } finally {
    await rm(work, { recursive: true, force: true });
    await cache.remove();
  }
}

await main();
