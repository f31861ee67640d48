/**
 * The benchmark suite (`npm run bench`): the engine side by side with its peers and the machine's limits, on
 * the same seeded VM-like images, in one run.
 *
 *   node dist/bench/suite.js [--size 1G] [--peers restic,borg,virtnbdbackup] [--rss-sizes 1G,16G]
 *                            [--dir /var/tmp] [--out bench/results] [--no-libvirt]
 *                            [--scenarios synthetic,real,libvirt,rss] [--real-image /var/tmp/engine-real-image/usr.img]
 *
 * --scenarios picks what runs (default: all four): `synthetic` (the seeded template's rows), `real` (the real
 * image of bench/real-image.sh: full, 1% incremental, restore, verify), `libvirt` (a running VM), `rss` (peak
 * RSS by image size). `--scenarios real` runs the real-data rows alone.
 *
 * Data: a template image (OS-like mix: text, binaries, zeros, duplicated files, random); VM A = the template
 * as raw (for the peers) and as qcow2 (for the engine's CBT chain through qemu-nbd bitmaps); VM B = the
 * template diverged by 5% (a second VM from the same template). Change sets of 1% and 10% (random 4 KiB–1 MiB
 * writes) go to VM A's raw and qcow2 copies alike, so every tool backs up the same bytes.
 *
 * Scenarios: full backup; incremental after 1% and after 10%; second VM; restore to a raw file; restore to
 * qcow2 through NBD; verify --read-data; a running VM under libvirt against virtnbdbackup (with the pull
 * export's nbdcopy ceiling, and a restore and verify of the engine's backup); peak RSS by image size. Real
 * data: a copy of the real ext4 image (bench/real-image.sh), its full backup, an incremental after ~1% of its
 * allocated bytes were rewritten in place (bench/real-change.ts: the recipe), a restore to a new file made
 * durable and verify --read-data, by the engine, borg and restic, beside `cat` of the cold image and cp + sync. Every tool runs as its own process under /usr/bin/time (wall, CPU, peak RSS), after a `sync` and a drop of the page cache (root). Restores are checked
 * with cmp / qemu-img compare: a fast wrong answer does not count.
 *
 * Targets (reported, never enforced; each printed as met or missed with its figures): full ≥ 5× restic, ≥ 2×
 * borg, ≥ 10× virtnbdbackup, ≥ 70% of the read ceiling; incremental at 1% ≤ 5% of the full's time (--image and
 * --libvirt); restore ≥ 70% of the write ceiling; peak RSS ≤ 300 MiB; and issue 15's on the real image (full
 * ≥ 2× borg's speed at ≤ borg's CPU-s per GiB, ≥ 5× restic; restore ≥ 2× restic, within 1.5× of cp + sync;
 * repository ≤ restic's) and on the running VM (full ≥ 90% of nbdcopy from the same pull export).
 */
import { mkdir, mkdtemp, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { formatBytes, generateImage, mutateImage, parseSize } from '../engine/index.js';
import { reportMarkdown, writeReport } from './report.js';
import { svgBarChart, type ChartBar } from './chart.js';
import { applyChangeSet, withQemuNbd } from './change-set.js';
import { libvirtScenario } from './libvirt-scenario.js';
import { applyRealChange } from './real-change.js';
import { arg, coldTimed, duBytes, ENGINE, ensure, initRepository, loadAverage, logger, machineLine, MB, privateEngineCache, run, type Measured } from './tools.js';

const log = logger('bench');

/**
 * Every timed step starts after `sync` and with the page cache dropped (root): write-back left by the step
 * before (a restore's file, a repository's packs) must not be charged to the next tool, and every tool reads
 * its image or repository cold, as a backup of a disk snapshot does (issue 15: warm, the engine led borg; cold,
 * its scattered 1 MiB reads made it 1.7× slower).
 */
const timed = coldTimed;

interface Row extends ChartBar {
  /** The disk the row is about (MB/s and CPU-s per GiB are of its size). */
  diskBytes: number;
  bytesRead: number | null;
  storedBytes: number | null;
  /** Full backups: the disk's allocated bytes over the bytes the backup added to the repository. */
  compressionRatio: number | null;
  cpuSeconds: number;
  userSeconds: number | null;
  systemSeconds: number | null;
  peakRssMiB: number;
  load: string;
  note: string;
}

type Extra = Partial<Pick<Row, 'bytesRead' | 'storedBytes' | 'note' | 'diskBytes' | 'compressionRatio'>>;

const GiB = 2 ** 30;
const metOrMissed = (met: boolean): string => (met ? 'met' : 'missed');

interface EngineJson {
  id: string;
  disks: { bytesRead: number; bytesStored: number; mode: string }[];
}

class Suite {
  readonly rows: Row[] = [];
  readonly targets: string[] = [];
  readonly skipped: string[] = [];
  readonly notes: string[] = [];

  constructor(readonly size: number) {}

  add(scenario: string, tool: string, kind: Row['kind'], m: Measured, extra: Extra = {}): Row {
    const diskBytes = extra.diskBytes ?? this.size;
    const row: Row = {
      scenario,
      tool,
      kind,
      seconds: m.seconds,
      diskBytes,
      mbPerS: diskBytes / MB / m.seconds,
      cpuSeconds: m.cpuSeconds,
      userSeconds: m.userSeconds ?? null,
      systemSeconds: m.systemSeconds ?? null,
      peakRssMiB: m.peakRssMiB,
      load: m.load ?? '',
      bytesRead: extra.bytesRead ?? null,
      storedBytes: extra.storedBytes ?? null,
      compressionRatio: extra.compressionRatio ?? null,
      note: extra.note ?? '',
    };
    this.rows.push(row);
    return row;
  }

  find(scenario: string, tool: string): Row | undefined {
    return this.rows.find((r) => r.scenario === scenario && r.tool === tool);
  }

  /** One target's line: what it asks, the figures, met or missed. */
  target(label: string, figures: string, met: boolean): void {
    this.targets.push(`${label}: ${figures} → **${metOrMissed(met)}**`);
  }

  /** "≥ N× peer" targets: the peer's time over the engine's. */
  targetFaster(label: string, engine: Row | undefined, peer: Row | undefined, factor: number): void {
    if (!engine || !peer) return;
    const ratio = peer.seconds / engine.seconds;
    this.target(`${label} ≥ ${factor}× ${peer.tool}`, `${peer.seconds.toFixed(2)} s ÷ ${engine.seconds.toFixed(2)} s = ${ratio.toFixed(2)}×`, ratio >= factor);
  }

  /** "≥ P% of a ceiling" targets: the engine's MB/s over the ceiling's. */
  targetShare(label: string, engine: Row | undefined, ceiling: Row | undefined, share: number): void {
    if (!engine || !ceiling) return;
    const ratio = engine.mbPerS / ceiling.mbPerS;
    this.target(`${label} ≥ ${share * 100}% of ${ceiling.tool}`, `${engine.mbPerS.toFixed(0)} MB/s against ${ceiling.mbPerS.toFixed(0)} MB/s = ${(ratio * 100).toFixed(0)}%`, ratio >= share);
  }

  /** "≤ N× a ceiling's time" targets (restore within 1.5× of cp + sync). */
  targetWithin(label: string, engine: Row | undefined, ceiling: Row | undefined, factor: number): void {
    if (!engine || !ceiling) return;
    const ratio = engine.seconds / ceiling.seconds;
    this.target(`${label} within ${factor}× of ${ceiling.tool}`, `${engine.seconds.toFixed(2)} s = ${ratio.toFixed(2)}× its ${ceiling.seconds.toFixed(2)} s`, ratio <= factor);
  }

  /** "≤ P% of the full's time" targets of incrementals. */
  targetIncremental(label: string, inc: Row | undefined, full: Row | undefined, share: number): void {
    if (!inc || !full) return;
    const ratio = inc.seconds / full.seconds;
    this.target(`${label} ≤ ${share * 100}% of the full's time`, `${inc.seconds.toFixed(2)} s of ${full.seconds.toFixed(2)} s = ${(ratio * 100).toFixed(1)}%`, ratio <= share);
  }
}

async function engine(args: string[]): Promise<{ measured: Measured; json: EngineJson }> {
  const measured = await timed(ENGINE, [...args, '--json']);
  return { measured, json: JSON.parse(measured.stdout) as EngineJson };
}

const sum = (json: EngineJson, field: 'bytesRead' | 'bytesStored'): number => json.disks.reduce((total, d) => total + d[field], 0);

async function identical(a: string, b: string): Promise<boolean> {
  return run('cmp', ['-s', a, b]).then(() => true, () => false);
}

/**
 * `command args…` then `sync FILE`, timed together, cold: a restore counts once its file is durable, as the
 * write ceiling (cp + sync) does; the restore's write-back is charged to it, not to the step after it.
 */
function durably(command: string, args: string[], file: string, env: Record<string, string> = {}): Promise<Measured> {
  return timed('bash', ['-c', 'f=$1; shift; "$@" && sync "$f"', 'durably', file, command, ...args], env);
}

/** Bytes allocated to a file (du -B1): the data a backup of it has to read, holes left out. */
async function allocatedBytes(path: string): Promise<number> {
  return Number((await run('du', ['-B1', path])).stdout.split(/\s+/)[0]);
}

interface Peer {
  name: string;
  env: Record<string, string>;
  backup(image: string, label: string): Promise<Measured>;
  /** Restores `image` as of `label` under `into` and makes the file durable; the restored file's path. */
  restore(label: string, image: string, into: string): Promise<{ measured: Measured; path: string }>;
  verify(): Promise<Measured>;
  repo: string;
}

function restic(work: string): Peer {
  const repo = join(work, 'restic-repo');
  const env = { RESTIC_REPOSITORY: repo, RESTIC_PASSWORD: 'bench', RESTIC_CACHE_DIR: join(work, 'restic-cache') };
  return {
    name: 'restic 0.14',
    env,
    repo,
    backup: (image, label) => timed('restic', ['backup', '--quiet', '--tag', label, image], env),
    restore: async (label, image, into) => ({
      measured: await durably('restic', ['restore', 'latest', '--tag', label, '--target', into], join(into, image), env),
      path: join(into, image),
    }),
    verify: () => timed('restic', ['check', '--read-data'], env),
  };
}

function borg(work: string): Peer {
  const repo = join(work, 'borg-repo');
  const env = { BORG_REPO: repo, BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK: 'yes', BORG_RELOCATED_REPO_ACCESS_IS_OK: 'yes', BORG_BASE_DIR: join(work, 'borg-base') };
  return {
    name: 'borg 1.2 (fixed 4 MiB)',
    env,
    repo,
    backup: (image, label) => timed('borg', ['create', '--chunker-params', 'fixed,4194304', '--compression', 'lz4', '--sparse', `::${label}`, image], env),
    restore: async (label, image, into) => {
      await mkdir(into, { recursive: true });
      const path = join(into, image);
      return { measured: await timed('bash', ['-c', 'cd "$1" && borg extract --sparse "::$2" && sync "$3"', 'borg-restore', into, label, path], env), path };
    },
    verify: () => timed('borg', ['check', '--verify-data'], env),
  };
}

async function setUpPeers(work: string, wanted: Set<string>, suite: Suite): Promise<Peer[]> {
  const peers: Peer[] = [];
  if (wanted.has('restic')) {
    const ok = await ensure('restic', 'restic');
    if (ok !== true) suite.skipped.push(`restic: ${ok}`);
    else {
      const peer = restic(work);
      await run('restic', ['init'], peer.env);
      peers.push(peer);
    }
  }
  if (wanted.has('borg')) {
    const ok = await ensure('borg', 'borgbackup');
    if (ok !== true) suite.skipped.push(`borg: ${ok}`);
    else {
      const peer = borg(work);
      await run('borg', ['init', '-e', 'none'], peer.env);
      peers.push(peer);
    }
  }
  return peers;
}

/** A backup by every peer of the same image, with the bytes it added to its repository. */
async function peersBackUp(suite: Suite, peers: Peer[], scenario: string, image: string, label: string, extra: { diskBytes?: number; ratioOf?: number } = {}): Promise<void> {
  for (const peer of peers) {
    log(`${peer.name}: ${scenario}`);
    const before = await duBytes(peer.repo);
    const measured = await peer.backup(image, label);
    const stored = (await duBytes(peer.repo)) - before;
    suite.add(scenario, peer.name, 'peer', measured, {
      storedBytes: stored,
      diskBytes: extra.diskBytes,
      compressionRatio: extra.ratioOf === undefined ? null : extra.ratioOf / stored,
      note: 'reads the whole image',
    });
  }
}

/**
 * The real-data rows (issue 15): a copy of the real ext4 image (bench/real-image.sh), backed up in full, then
 * again after ~1% of its allocated bytes were rewritten in place (bench/real-change.ts), restored to a new
 * file made durable, and verified reading all data, by the engine (raw file: no CBT, so the incremental reads
 * the whole image and dedupes, as the peers do), borg and restic; beside `cat` of the cold image (read
 * ceiling) and cp + sync (write ceiling). Every run is cold.
 */
async function realScenario(suite: Suite, work: string, source: string, wanted: Set<string>): Promise<void> {
  const exists = await stat(source).then((s) => s.isFile(), () => false);
  if (!exists) {
    suite.skipped.push(`real-data rows: no image at ${source} (bash bench/real-image.sh builds it)`);
    return;
  }
  const dir = join(work, 'real');
  await mkdir(dir);
  // A copy: the change set writes into it, and the shared image stays as bench/real-image.sh built it.
  const image = join(dir, 'real.img');
  log(`real image: copying ${source}`);
  await run('cp', ['--sparse=always', source, image]);
  const diskBytes = (await stat(image)).size;
  const allocated = await allocatedBytes(image);
  const repo = join(dir, 'engine-repo');
  await initRepository(repo);
  const peers = await setUpPeers(dir, new Set([...wanted].filter((p) => p === 'restic' || p === 'borg')), suite);
  const size = { diskBytes };
  const FULL = 'real image: full backup';
  const INC = 'real image: incremental, 1% rewritten';
  const RESTORE = 'real image: restore to a new file + sync';
  const VERIFY = 'real image: verify, reading all data';

  log('real image: read ceiling (cat, cold)');
  suite.add(FULL, 'read ceiling: cat (cold)', 'ceiling', await timed('bash', ['-c', `cat '${image}' > /dev/null`]), size);
  log('real image: engine full');
  const full = await engine(['backup', '--repo', repo, '--source', image, '--name', 'real', '--full']);
  const engineFull = suite.add(FULL, 'engine (raw file)', 'engine', full.measured, {
    ...size,
    bytesRead: sum(full.json, 'bytesRead'),
    storedBytes: sum(full.json, 'bytesStored'),
    compressionRatio: allocated / sum(full.json, 'bytesStored'),
  });
  await peersBackUp(suite, peers, FULL, image, 'full', { diskBytes, ratioOf: allocated });

  log('real image: rewriting ~1% in place (bench/real-change.ts)');
  const change = await applyRealChange(image, allocated, 0.01, dir);
  await run('sync', []);
  log(`real image: engine incremental (${change.files} files, ${formatBytes(change.bytes)} rewritten)`);
  const inc = await engine(['backup', '--repo', repo, '--source', image, '--name', 'real']);
  suite.add(INC, 'engine (raw file, no CBT: full read + dedupe)', 'engine', inc.measured, {
    ...size,
    bytesRead: sum(inc.json, 'bytesRead'),
    storedBytes: sum(inc.json, 'bytesStored'),
    note: `${change.files} files, ${formatBytes(change.bytes)} of their blocks rewritten; ${((inc.measured.seconds / engineFull.seconds) * 100).toFixed(1)}% of the full's time`,
  });
  await peersBackUp(suite, peers, INC, image, 'inc', size);

  log('real image: engine restore');
  const out = join(dir, 'restored.img');
  const restored = await durably(ENGINE, ['restore', '--repo', repo, inc.json.id, '--to', out, '--json'], out);
  const same = await identical(out, image);
  const engineRestore = suite.add(RESTORE, 'engine', 'engine', restored, { ...size, note: same ? 'cmp: identical' : 'cmp: DIFFERENT' });
  if (!same) suite.notes.push('The engine restore of the real image differed from the source: a bug, its figures do not count.');
  await rm(out, { force: true });
  for (const peer of peers) {
    log(`${peer.name}: real image restore`);
    const into = join(dir, `${peer.name.split(' ')[0]}-out`);
    const result = await peer.restore('inc', image, into);
    suite.add(RESTORE, peer.name, 'peer', result.measured, { ...size, note: (await identical(result.path, image)) ? 'cmp: identical' : 'cmp: DIFFERENT' });
    await rm(into, { recursive: true, force: true });
  }
  log('real image: write ceiling (cp + sync)');
  const copy = join(dir, 'copy.img');
  const cp = suite.add(RESTORE, 'write ceiling: cp --sparse + sync', 'ceiling', await timed('bash', ['-c', `cp --sparse=always '${image}' '${copy}' && sync '${copy}'`]), size);
  await rm(copy, { force: true });

  log('real image: verify');
  const packs = await duBytes(repo);
  suite.add(VERIFY, 'engine verify --read-data', 'engine', await timed(ENGINE, ['verify', '--repo', repo, '--read-data']), { ...size, storedBytes: packs, note: `${formatBytes(packs)} of repository` });
  for (const peer of peers) {
    log(`${peer.name}: real image verify`);
    suite.add(VERIFY, `${peer.name} ${peer.name.startsWith('restic') ? 'check --read-data' : 'check --verify-data'}`, 'peer', await peer.verify(), { ...size, storedBytes: await duBytes(peer.repo) });
  }

  // Issue 15's targets on the real image.
  const borgFull = suite.find(FULL, 'borg 1.2 (fixed 4 MiB)');
  const resticFull = suite.find(FULL, 'restic 0.14');
  suite.targetFaster('real image, full backup', engineFull, borgFull, 2);
  if (borgFull) {
    const mine = engineFull.cpuSeconds / (diskBytes / GiB);
    const theirs = borgFull.cpuSeconds / (diskBytes / GiB);
    suite.target('real image, full backup ≤ borg\'s CPU-s per GiB', `${mine.toFixed(2)} against ${theirs.toFixed(2)} CPU-s per GiB`, mine <= theirs);
  }
  suite.targetFaster('real image, full backup', engineFull, resticFull, 5);
  suite.targetShare('real image, full backup', engineFull, suite.find(FULL, 'read ceiling: cat (cold)'), 0.7);
  suite.targetFaster('real image, restore (durable)', engineRestore, suite.find(RESTORE, 'restic 0.14'), 2);
  suite.targetWithin('real image, restore (durable)', engineRestore, cp, 1.5);
  if (resticFull && engineFull.storedBytes !== null && resticFull.storedBytes !== null) {
    suite.target(
      'real image, repository ≤ restic\'s (zstd)',
      `engine ${formatBytes(engineFull.storedBytes)} (ratio ${engineFull.compressionRatio?.toFixed(2)}) against restic ${formatBytes(resticFull.storedBytes)} (ratio ${resticFull.compressionRatio?.toFixed(2)}) after the full`,
      engineFull.storedBytes <= resticFull.storedBytes,
    );
  }
  await rm(dir, { recursive: true, force: true });
}

/** Runs one scenario; when it fails, the report says so and the other scenarios still run and report. */
async function guarded(suite: Suite, name: string, scenario: () => Promise<void>): Promise<void> {
  try {
    await scenario();
  } catch (error) {
    log(`${name} scenario failed: ${(error as Error).message}`);
    suite.notes.push(`The ${name} scenario FAILED part-way (${(error as Error).message}): its rows above are the ones measured before that.`);
  }
}

async function mainSuite(): Promise<void> {
  const size = parseSize(arg('--size') ?? '1G');
  const outDir = arg('--out') ?? 'bench/results';
  const wanted = new Set((arg('--peers') ?? 'restic,borg,virtnbdbackup').split(',').filter(Boolean));
  const rssSizes = (arg('--rss-sizes') ?? '1G,16G').split(',').filter(Boolean).map(parseSize);
  const scenarios = new Set((arg('--scenarios') ?? 'synthetic,real,libvirt,rss').split(',').filter(Boolean));
  if (process.argv.includes('--no-libvirt')) scenarios.delete('libvirt');
  const realImage = arg('--real-image') ?? '/var/tmp/engine-real-image/usr.img';
  const work = await mkdtemp(join(arg('--dir') ?? '/var/tmp', 'engine-bench-'));
  const cache = await privateEngineCache();
  const suite = new Suite(size);
  const rssRows: { size: number; backup: Measured; restore: Measured; identical: boolean }[] = [];
  const loadAtStart = await loadAverage();
  try {
    // engine init's default format, as users get it; the report says which.
    const format = await initRepository(join(work, 'format-probe'));
    await rm(join(work, 'format-probe'), { recursive: true, force: true });
    const vmAQcow2 = join(work, 'vm-a.qcow2');
    if (scenarios.has('synthetic') || scenarios.has('libvirt')) {
      log(`generating a ${formatBytes(size)} template image`);
      const template = join(work, 'template.raw');
      await generateImage(template, size, 'bench-template');
      await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', template, vmAQcow2]);
      if (scenarios.has('synthetic')) await guarded(suite, 'synthetic', () => syntheticScenario(suite, work, template, vmAQcow2, wanted));
      await rm(template, { force: true });
    }
    if (scenarios.has('real')) await guarded(suite, 'real', () => realScenario(suite, work, realImage, wanted));

    // A running VM under libvirt, against virtnbdbackup.
    if (!scenarios.has('libvirt')) suite.skipped.push('libvirt scenarios: not selected (--scenarios / --no-libvirt)');
    else await guarded(suite, 'libvirt', async () => {
      const outcome = await libvirtScenario(vmAQcow2, size, work, log, { virtnbdbackup: wanted.has('virtnbdbackup') });
      suite.skipped.push(...outcome.skipped);
      const VM = 'running VM (libvirt)';
      if (outcome.ceiling) {
        suite.add(`${VM}: full`, 'read ceiling: nbdcopy of the pull export → null:', 'ceiling', outcome.ceiling.nbdcopy, { note: 'same domain, same run, right before the engine\'s full' });
        suite.add(`${VM}: full`, 'read ceiling: backup-begin + nbdcopy + domjobabort', 'ceiling', outcome.ceiling.whole, { note: 'the pull job\'s set-up and end included' });
      }
      for (const r of outcome.rows) {
        suite.add(`${VM}: ${r.scenario}`, r.tool, r.tool.startsWith('engine') ? 'engine' : 'peer', r.measured, { bytesRead: r.bytesRead, storedBytes: r.storedBytes ?? null, note: r.note });
      }
      const engineFull = suite.find(`${VM}: full`, 'engine --libvirt');
      suite.targetFaster('full backup of a running VM', engineFull, suite.find(`${VM}: full`, 'virtnbdbackup 1.9'), 10);
      suite.targetShare('full backup of a running VM', engineFull, suite.find(`${VM}: full`, 'read ceiling: nbdcopy of the pull export → null:'), 0.9);
      suite.targetIncremental('incremental at 1% via --libvirt', suite.find(`${VM}: incremental, 1% rewritten`, 'engine --libvirt'), engineFull, 0.05);
    });

    // Peak RSS by image size.
    if (scenarios.has('rss')) await guarded(suite, 'rss', async () => {
      for (const rssSize of rssSizes) {
        log(`peak RSS at ${formatBytes(rssSize)}`);
        const image = join(work, `rss-${rssSize}.raw`);
        await generateImage(image, rssSize, 'bench-rss');
        const rssRepo = join(work, `rss-repo-${rssSize}`);
        await initRepository(rssRepo);
        const b = await engine(['backup', '--repo', rssRepo, '--source', image, '--name', 'rss']);
        const target = join(work, `rss-out-${rssSize}.raw`);
        const r = await durably(ENGINE, ['restore', '--repo', rssRepo, b.json.id, '--to', target], target);
        rssRows.push({ size: rssSize, backup: b.measured, restore: r, identical: await identical(image, target) });
        await rm(image, { force: true });
        await rm(target, { force: true });
        await rm(rssRepo, { recursive: true, force: true });
      }
    });
    const engineRows = suite.rows.filter((r) => r.kind === 'engine');
    if (rssRows.length > 0 || engineRows.length > 0) {
      const worstRss = Math.max(...rssRows.flatMap((r) => [r.backup.peakRssMiB, r.restore.peakRssMiB]), ...engineRows.map((r) => r.peakRssMiB));
      const sizes = rssRows.length > 0 ? `every engine row and ${rssRows.map((r) => formatBytes(r.size)).join(', ')}` : 'every engine row';
      suite.target('peak RSS ≤ 300 MiB whatever the image size', `worst ${worstRss.toFixed(0)} MiB (${sizes})`, worstRss <= 300);
    }

    await report(suite, rssRows, size, outDir, format, [...scenarios], { start: loadAtStart, end: await loadAverage() });
  } finally {
    await rm(work, { recursive: true, force: true });
    await cache.remove();
  }
}

/** The seeded template's rows: VM A raw and qcow2, VM B, change sets of 1% and 10%, restores, verify. */
async function syntheticScenario(suite: Suite, work: string, template: string, vmAQcow2: string, wanted: Set<string>): Promise<void> {
  const size = suite.size;
  const vmA = join(work, 'vm-a.raw');
  const vmB = join(work, 'vm-b.raw');
  log('two VMs from the template');
  await run('cp', ['--sparse=always', template, vmA]);
  await run('cp', ['--sparse=always', template, vmB]);
  await mutateImage(vmB, 0.05, 'bench-vm-b');
  // The qcow2 twin of VM A for the engine's CBT chain: a copy, the libvirt scenario keeps the template's.
  const vmAQcow2Cbt = join(work, 'vm-a-cbt.qcow2');
  await run('cp', [vmAQcow2, vmAQcow2Cbt]);
  await run('sync', []);
  const allocated = await allocatedBytes(vmA);

  const repo = join(work, 'engine-repo');
  const repoCbt = join(work, 'engine-repo-cbt');
  await initRepository(repo);
  await initRepository(repoCbt);
  const peers = await setUpPeers(work, wanted, suite);

  // Full backup.
  const FULL = 'full backup';
  log('read ceilings');
  suite.add(FULL, 'read ceiling: cat (raw, cold)', 'ceiling', await timed('bash', ['-c', `cat '${vmA}' > /dev/null`]));
  const nbdcopy = await withQemuNbd(vmAQcow2Cbt, 'qcow2', work, (uri) => timed('nbdcopy', [uri, 'null:']));
  suite.add(FULL, 'read ceiling: nbdcopy qcow2 → null:', 'ceiling', nbdcopy);
  log('engine: full backup of the raw image');
  const full = await engine(['backup', '--repo', repo, '--source', vmA, '--name', 'vm-a']);
  let latestA = full.json.id;
  const engineFull = suite.add(FULL, 'engine (raw file)', 'engine', full.measured, {
    bytesRead: sum(full.json, 'bytesRead'),
    storedBytes: sum(full.json, 'bytesStored'),
    compressionRatio: allocated / sum(full.json, 'bytesStored'),
  });
  log('engine: full backup of the qcow2 image through qemu-nbd (starts the CBT chain)');
  const fullCbt = await engine(['backup', '--repo', repoCbt, '--image', vmAQcow2Cbt, '--name', 'vm-a', '--full']);
  const engineFullCbt = suite.add(FULL, 'engine --image (qcow2 via qemu-nbd)', 'engine', fullCbt.measured, { bytesRead: sum(fullCbt.json, 'bytesRead'), storedBytes: sum(fullCbt.json, 'bytesStored') });
  await peersBackUp(suite, peers, FULL, vmA, 'full', { ratioOf: allocated });
  for (const peer of peers) suite.targetFaster('full backup', engineFull, suite.find(FULL, peer.name), peer.name.startsWith('restic') ? 5 : 2);
  suite.targetShare('full backup (raw)', engineFull, suite.find(FULL, 'read ceiling: cat (raw, cold)'), 0.7);
  suite.targetShare('full backup (qcow2 via NBD)', engineFullCbt, suite.find(FULL, 'read ceiling: nbdcopy qcow2 → null:'), 0.7);

  // Incrementals.
  for (const fraction of [0.01, 0.1]) {
    const scenario = `incremental, ${fraction * 100}% rewritten`;
    const written = await withQemuNbd(vmAQcow2Cbt, 'qcow2', work, (uri) => applyChangeSet({ nbd: [uri], raw: [vmA] }, size, fraction, `bench-change-${fraction}`));
    await run('sync', []);
    log(`engine: ${scenario} (CBT)`);
    const inc = await engine(['backup', '--repo', repoCbt, '--image', vmAQcow2Cbt, '--name', 'vm-a', '--incremental']);
    const row = suite.add(scenario, 'engine --image --incremental (CBT)', 'engine', inc.measured, {
      bytesRead: sum(inc.json, 'bytesRead'),
      storedBytes: sum(inc.json, 'bytesStored'),
      note: `${inc.json.disks.map((d) => d.mode).join('+')}; ${formatBytes(written)} rewritten; ${((inc.measured.seconds / engineFullCbt.seconds) * 100).toFixed(1)}% of the full's time`,
    });
    log(`engine: ${scenario} (raw file, full read + dedupe)`);
    const reread = await engine(['backup', '--repo', repo, '--source', vmA, '--name', 'vm-a']);
    latestA = reread.json.id;
    suite.add(scenario, 'engine (raw file, no CBT: full read + dedupe)', 'engine', reread.measured, { bytesRead: sum(reread.json, 'bytesRead'), storedBytes: sum(reread.json, 'bytesStored') });
    await peersBackUp(suite, peers, scenario, vmA, `inc${fraction * 100}`);
    if (fraction === 0.01) suite.targetIncremental('incremental at 1% via --image (CBT)', row, engineFullCbt, 0.05);
  }

  // A second VM from the same template.
  const SECOND = 'second VM from the template (5% diverged)';
  log('engine: second VM');
  const second = await engine(['backup', '--repo', repo, '--source', vmB, '--name', 'vm-b']);
  suite.add(SECOND, 'engine (raw file)', 'engine', second.measured, { bytesRead: sum(second.json, 'bytesRead'), storedBytes: sum(second.json, 'bytesStored'), note: 'dedupe across VMs' });
  await peersBackUp(suite, peers, SECOND, vmB, 'vm-b');

  // Restore to a raw file, durable: VM A as of the 10% change set.
  const RESTORE = 'restore to a raw file + sync';
  log('engine: restore to a raw file');
  const out = join(work, 'restored.raw');
  const restored = await durably(ENGINE, ['restore', '--repo', repo, latestA, '--to', out, '--json'], out);
  const ok = await identical(out, vmA);
  const engineRestore = suite.add(RESTORE, 'engine', 'engine', restored, { note: ok ? 'cmp: identical' : 'cmp: DIFFERENT' });
  if (!ok) suite.notes.push('The engine restore differed from the source: a bug, the figures above do not count.');
  await rm(out, { force: true });
  for (const peer of peers) {
    log(`${peer.name}: restore`);
    const into = join(work, `${peer.name.split(' ')[0]}-out`);
    const result = await peer.restore('inc10', vmA, into);
    suite.add(RESTORE, peer.name, 'peer', result.measured, { note: (await identical(result.path, vmA)) ? 'cmp: identical' : 'cmp: DIFFERENT' });
    await rm(into, { recursive: true, force: true });
  }
  log('write ceilings');
  const copy = join(work, 'copy.raw');
  const cp = suite.add(RESTORE, 'write ceiling: cp --sparse + sync', 'ceiling', await timed('bash', ['-c', `cp --sparse=always '${vmA}' '${copy}' && sync '${copy}'`]));
  await rm(copy, { force: true });
  suite.add(RESTORE, 'write ceiling: qemu-img convert raw → raw', 'ceiling', await timed('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', vmA, copy]));
  await rm(copy, { force: true });
  suite.targetShare('restore', engineRestore, cp, 0.7);
  for (const peer of peers) suite.targetFaster('restore (reported)', engineRestore, suite.find(RESTORE, peer.name), 1);

  // Restore into qcow2 through NBD.
  const QCOW2 = 'restore to qcow2 through NBD';
  const qcow2Out = join(work, 'restored.qcow2');
  log('engine: restore to qcow2');
  const toQcow2 = await engine(['restore', '--repo', repo, latestA, '--to-qcow2', qcow2Out]);
  const sameQcow2 = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', vmA, qcow2Out]).then(() => true, () => false);
  suite.add(QCOW2, 'engine --to-qcow2', 'engine', toQcow2.measured, { note: sameQcow2 ? 'qemu-img compare: identical' : 'qemu-img compare: DIFFERENT' });
  if (!sameQcow2) suite.notes.push('The engine restore into qcow2 differed from the source: a bug, the figures above do not count.');
  await rm(qcow2Out, { force: true });
  suite.add(QCOW2, 'write ceiling: qemu-img convert raw → qcow2', 'ceiling', await timed('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', vmA, qcow2Out]));
  await rm(qcow2Out, { force: true });

  // verify --read-data.
  const VERIFY = 'verify, reading all data';
  log('engine: verify --read-data');
  const repoBytes = await duBytes(join(repo, 'packs'));
  suite.add(VERIFY, 'engine verify --read-data', 'engine', await timed(ENGINE, ['verify', '--repo', repo, '--read-data']), { storedBytes: repoBytes, note: `${formatBytes(repoBytes)} of packs` });
  for (const peer of peers) {
    log(`${peer.name}: verify`);
    suite.add(VERIFY, `${peer.name} ${peer.name.startsWith('restic') ? 'check --read-data' : 'check --verify-data'}`, 'peer', await peer.verify(), { storedBytes: await duBytes(peer.repo) });
  }
  for (const path of [vmA, vmB, vmAQcow2Cbt]) await rm(path, { force: true });
  for (const path of [repo, repoCbt, ...peers.map((p) => p.repo)]) await rm(path, { recursive: true, force: true });
}

async function report(
  suite: Suite,
  rssRows: { size: number; backup: Measured; restore: Measured; identical: boolean }[],
  size: number,
  outDir: string,
  format: number,
  scenarios: string[],
  load: { start: string; end: string },
): Promise<void> {
  const machine = machineLine();
  const engineOf = (scenario: string): Row | undefined => suite.rows.find((r) => r.scenario === scenario && r.kind === 'engine');
  const bytes = (n: number | null): string => (n === null ? '—' : formatBytes(n));
  const loads = suite.rows.map((r) => Number(r.load.split(' ')[0])).filter((l) => Number.isFinite(l) && l > 0);
  const table = [
    '| scenario | tool | wall s | MB/s of disk | this ÷ engine (time) | bytes read | stored | compression ratio | CPU s (user + sys) | CPU-s per GiB of disk | peak RSS MiB | load (1 min) | note |',
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |',
    ...suite.rows.map((r) => {
      const engine = engineOf(r.scenario);
      const ratio = engine && engine !== r ? (r.seconds / engine.seconds).toFixed(2) : '';
      const split = r.userSeconds !== null && r.systemSeconds !== null ? ` (${r.userSeconds.toFixed(1)} + ${r.systemSeconds.toFixed(1)})` : '';
      const perGiB = (r.cpuSeconds / (r.diskBytes / GiB)).toFixed(2);
      const compression = r.compressionRatio === null ? '—' : r.compressionRatio.toFixed(2);
      return `| ${r.scenario} | ${r.tool} | ${r.seconds.toFixed(2)} | ${r.mbPerS.toFixed(0)} | ${ratio} | ${bytes(r.bytesRead)} | ${bytes(r.storedBytes)} | ${compression} | ${r.cpuSeconds.toFixed(1)}${split} | ${perGiB} | ${r.peakRssMiB.toFixed(0)} | ${r.load.split(' ')[0] ?? ''} | ${r.note} |`;
    }),
    ...(rssRows.length > 0
      ? [
          '',
          '### Peak RSS by image size (engine, full backup and restore of a fresh VM-like image)',
          '',
          '| image | backup wall s | backup peak RSS MiB | restore wall s | restore peak RSS MiB | restore identical |',
          '| --- | --- | --- | --- | --- | --- |',
          ...rssRows.map((r) => `| ${formatBytes(r.size)} | ${r.backup.seconds.toFixed(1)} | ${r.backup.peakRssMiB.toFixed(0)} | ${r.restore.seconds.toFixed(1)} | ${r.restore.peakRssMiB.toFixed(0)} | ${r.identical ? 'yes (cmp)' : 'NO'} |`),
        ]
      : []),
  ].join('\n');
  const markdown = reportMarkdown(
    'Benchmark suite',
    [
      `Machine: ${machine}. Scenarios: ${scenarios.join(', ')}. Synthetic disk: ${formatBytes(size)} VM-like image (seeded; OS-like mix); real disk: the 3 GiB ext4 image of bench/real-image.sh (this machine's /usr), its incremental after bench/real-change.ts rewrote ~1% of its allocated bytes in place. MB = 10^6 B; MB/s = disk size / wall time; CPU-s per GiB = user + sys CPU-seconds of the process tree per GiB of disk size; compression ratio = the disk's allocated bytes over the bytes its full backup added to the repository.`,
      `The engine's repositories: format ${format} folders (what \`engine init\` creates by default), the host index cache of the run's own (ENGINE_CACHE_DIR), the CLI run as users run it (bin/engine).`,
      'Every tool ran as its own process (whole CLI runs: process start included) under /usr/bin/time after `sync; echo 3 > /proc/sys/vm/drop_caches` (as root): images and repositories cold, as a backup of a disk snapshot meets them. Restores count once the file is durable (`sync FILE` inside the timed run).',
      `Load average (1, 5, 15 min) at the start ${load.start}, at the end ${load.end}; the 1-minute load before each timed run is in the table${loads.length > 0 ? ` (${Math.min(...loads).toFixed(2)}–${Math.max(...loads).toFixed(2)})` : ''}. On 2 cores shared with other work, read ratios within a scenario rather than absolute times.`,
      '"this ÷ engine": this tool\'s wall time over the engine\'s first row of the scenario (above 1: the engine is faster).',
      ...suite.notes,
    ],
    table,
    suite.targets,
    suite.skipped,
  );
  await writeReport(outDir, 'suite', markdown, { machine, size, repositoryFormat: format, scenarios, load, rows: suite.rows, rss: rssRows, targets: suite.targets, skipped: suite.skipped }, {
    svg: svgBarChart(suite.rows.filter((r) => !r.tool.includes('cat (') && !r.scenario.startsWith('real image')), `The engine against its peers on a ${formatBytes(size)} VM-like disk (MB/s of disk size, higher is better)`),
  });
}

await mainSuite();
