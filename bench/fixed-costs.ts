/**
 * What every CLI call pays before and after its real work: per-call CPU seconds (user + sys, the process and its
 * children: qemu-nbd, qemu-img) and wall seconds of small jobs, against another build of the engine when one is
 * given. Each round runs every step once with this build and once with the baseline, in turn (every other round in
 * the reverse order), so that a shared machine's load falls on both alike; medians and the median of the paired
 * ratios. The steps, on a 64 MiB sparse raw disk holding 8 MiB of data (random, text, zeros):
 *   --version             the floor: the runtime and the CLI's modules, no repository
 *   backup                a full backup of the disk into a repository that has its blocks (read 8 MiB, nothing new)
 *   restore               of that backup to a new file
 *   verify                verify --read-data of the repository
 *   image incremental     backup --image of the same disk as an unchanged qcow2, after its full: the CBT path's
 *                         fixed costs (qemu-img bitmap steps, qemu-nbd, the chain check; no data read)
 *   libvirt incremental   backup --libvirt of a running TCG domain on that qcow2, unchanged since its full: virsh
 *                         calls, the checkpoint and the pull-mode job (needs a running libvirtd; else said, and left out)
 * Warm by default (the page cache holds the runtime and the disk): these are the costs of the process, not of its
 * reads; --cold drops the page cache before every timed step (root), as a nightly call meets it.
 *
 * --phases N: where the wall time of an unchanged --image and --libvirt incremental goes, N runs of each build under
 * `strace -f -tt` (which slows every system call: the phases' shares matter, not their sum), cut at system calls
 * that mark the phases (phaseMarks below); medians, and each tool the engine ran with its own wall time.
 * --ratio N: issue 15's target, an incremental of 1% of a 1 GiB disk against its full, cold (page cache dropped),
 * via --image (qemu-io writes offline) and --libvirt (HMP qemu-io writes into the running guest), N rounds of a
 * full then an incremental (of each build, in turn); the median of the rounds' incremental/full wall ratios.
 *
 *   npm run build && node dist/bench/fixed-costs.js [--rounds 10] [--baseline /other/checkout/bin/engine] [--cold]
 *     [--phases 5] [--ratio 3] [--only-libvirt]
 *
 * Nothing is written to bench/results unless --out DIR says so.
 */
import { chmod, copyFile, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SeededRandom } from '../engine/index.js';
import { arg, available, coldTimed, ENGINE, loadAverage, logger, machineLine, privateEngineCache, run, timed, type Measured } from './tools.js';

const log = logger('fixed-costs');
const MiB = 1024 * 1024;

interface Build {
  name: string;
  engine: string;
  /** This build's own repository and qcow2 (CBT bitmaps are per image): set up untimed. */
  repo: string;
  qcow2: string;
  backupId: string;
  /** This build's running domain (on a qcow2 of its own), its full taken; undefined without libvirtd. */
  domain: string | undefined;
}

interface Step {
  name: string;
  args: (build: Build, round: number, work: string) => string[];
  /** Runs only where libvirtd does. */
  libvirt?: boolean;
}

const STEPS: Step[] = [
  { name: '--version', args: () => ['--version'] },
  { name: 'backup (8 MiB read, nothing new)', args: (b, _r, work) => ['backup', '--repo', b.repo, '--source', join(work, 'disk.raw'), '--name', 'disk', '--full', '--json'] },
  { name: 'restore to a new file', args: (b, r, work) => ['restore', '--repo', b.repo, b.backupId, '--to', join(work, `restored-${b.name}-${r}.raw`)] },
  { name: 'verify --read-data', args: (b) => ['verify', '--repo', b.repo, '--read-data'] },
  { name: 'backup --image, unchanged qcow2', args: (b) => ['backup', '--repo', b.repo, '--image', b.qcow2, '--incremental', '--json'] },
  { name: 'backup --libvirt, unchanged running VM', args: (b) => ['backup', '--repo', b.repo, '--libvirt', b.domain!, '--incremental', '--json'], libvirt: true },
];

const median = (values: number[]): number => {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
};

async function setUp(name: string, engine: string, work: string, libvirt: boolean): Promise<Build> {
  const repo = join(work, `repo-${name}`);
  const qcow2 = join(work, `disk-${name}.qcow2`);
  await run(engine, ['init', repo]);
  const full = JSON.parse((await run(engine, ['backup', '--repo', repo, '--source', join(work, 'disk.raw'), '--name', 'disk', '--json'])).stdout) as { id: string };
  await copyFile(join(work, 'disk.qcow2'), qcow2);
  await run(engine, ['backup', '--repo', repo, '--image', qcow2, '--full', '--json']);
  let domain: string | undefined;
  if (libvirt) {
    domain = await startDomain(`engine-fixed-costs-${name}-${process.pid}`, join(work, 'disk.qcow2'), work);
    await run(engine, ['backup', '--repo', repo, '--libvirt', domain, '--full', '--json']);
  }
  return { name, engine, repo, qcow2, backupId: full.id, domain };
}

/** Whether a libvirtd answers (the tests start one: test/libvirt.ts; this bench only uses one that runs). */
async function libvirtdRunning(): Promise<boolean> {
  return (await available('virsh')) && (await run('virsh', ['-c', 'qemu:///system', 'version']).then(() => true, () => false));
}

const domains: string[] = [];

/** A TCG domain sitting in SeaBIOS on a copy of `image` (qemu runs as libvirt-qemu: the folder is opened to it). */
async function startDomain(name: string, image: string, work: string): Promise<string> {
  const disk = join(work, `${name}.qcow2`);
  await copyFile(image, disk);
  await chmod(work, 0o755);
  await run('chown', ['libvirt-qemu:kvm', disk]).catch(() => undefined);
  const xml = join(work, `${name}.xml`);
  await writeFile(
    xml,
    `<domain type='qemu'><name>${name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os><devices><emulator>/usr/bin/qemu-system-x86_64</emulator><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${disk}'/><target dev='vda' bus='virtio'/></disk><video><model type='none'/></video><memballoon model='none'/></devices></domain>`,
  );
  await run('virsh', ['define', xml]);
  domains.push(name);
  await run('virsh', ['start', name]);
  return name;
}

async function removeDomains(): Promise<void> {
  for (const name of domains) {
    await run('virsh', ['destroy', name]).catch(() => undefined);
    await run('virsh', ['undefine', name, '--checkpoints-metadata']).catch(() => undefined);
  }
}

/** One system call of an `strace -f -tt -y` log: its process, its time of day in seconds, the call and its text. */
interface Traced {
  pid: number;
  at: number;
  call: string;
  text: string;
}

function parseStrace(log: string): Traced[] {
  const events: Traced[] = [];
  for (const line of log.split('\n')) {
    const match = /^(\d+)\s+(\d+):(\d+):(\d+\.\d+) (?:<\.\.\. )?([a-z_0-9]+|\+\+\+|---)(.*)$/.exec(line);
    if (!match) continue;
    events.push({ pid: Number(match[1]), at: Number(match[2]) * 3600 + Number(match[3]) * 60 + Number(match[4]), call: match[5]!, text: match[6]! });
  }
  return events;
}

/**
 * The phases of one backup, each ending at the first system call (at or after the previous mark) that marks its end:
 * the repository's config opened (the runtime and the CLI's modules loaded), the first backup record read (the
 * repository open: lease, index cache; the history is read next), the first NBD connection (the CBT setup: qemu-img,
 * qemu-nbd or virsh, whatever of them did not run during the open), the record's temporary file (the read, with the
 * audit and the source's release), the record's directory synced (the commit), and the lease's removal (the bitmaps
 * or checkpoints no chain needs). The rest is the close. The tools' own times are listed apart, with when each began:
 * a build may run some of them while the repository opens.
 */
function phaseMarks(repo: string): { name: string; ends: (e: Traced) => boolean }[] {
  return [
    { name: 'start: sh, Node, modules', ends: (e) => e.call === 'openat' && e.text.includes(`"${repo}/config"`) },
    { name: 'repository open: lease, index cache', ends: (e) => e.call === 'openat' && new RegExp(`"${repo}/backups/[0-9a-f]{32}"`).test(e.text) },
    { name: 'history, CBT setup: until the first NBD connect', ends: (e) => e.call === 'connect' && /(nbd|backup)\.sock/.test(e.text) },
    { name: 'read: audit, map walk, packs, release of the source', ends: (e) => e.call === 'openat' && e.text.includes(`${repo}/backups/.`) },
    { name: 'commit: record durable', ends: (e) => (e.call === 'fsync' || e.call === 'fdatasync') && e.text.includes(`<${repo}/backups>`) },
    { name: 'finish: old bitmaps or checkpoints', ends: (e) => e.call === 'unlink' && e.text.includes(`${repo}/leases/`) },
    { name: 'close and exit', ends: () => false },
  ];
}

interface PhaseRun {
  phases: number[];
  /** Each tool run: its name, when it began (seconds from the start) and how long it ran. */
  tools: { name: string; at: number; seconds: number }[];
  syncs: number;
}

async function tracedRun(engine: string, args: string[], repo: string, work: string): Promise<PhaseRun> {
  const log = join(work, 'strace.log');
  await run('strace', ['-f', '-tt', '-y', '-o', log, '-e', 'trace=execve,openat,connect,fsync,fdatasync,unlink,exit_group', engine, ...args]);
  const events = parseStrace(await readFile(log, 'utf8'));
  await rm(log);
  const marks = phaseMarks(repo);
  const phases: number[] = [];
  let from = events[0]!.at;
  let mark = 0;
  for (const event of events) {
    if (mark < marks.length - 1 && marks[mark]!.ends(event)) {
      phases.push(event.at - from);
      from = event.at;
      mark += 1;
    }
  }
  while (phases.length < marks.length - 1) phases.push(0);
  phases.push(events.at(-1)!.at - from);
  // Each tool: from its execve to the exit of that process (qemu-nbd --fork: its parent, once the server listens).
  const tools: PhaseRun['tools'] = [];
  for (const event of events) {
    // execve's failures are its search of PATH (ENOENT): the run is the one that succeeded.
    const tool = /^\("[^"]*\/(qemu-img|qemu-nbd|virsh)", \[("[^"]*"(?:, "[^"]*"){0,2})/.exec(event.text);
    if (event.call !== 'execve' || !tool || event.text.includes('ENOENT')) continue;
    const end = events.find((e) => e.pid === event.pid && e.at >= event.at && (e.call === 'exit_group' || e.call === '+++'));
    const words = tool[2]!.split(', ').map((w) => w.replace(/"/g, ''));
    tools.push({ name: words.filter((w) => w !== '-q').slice(0, 2).join(' '), at: event.at - events[0]!.at, seconds: end ? end.at - event.at : NaN });
  }
  const toolPids = new Set(events.filter((e) => e.call === 'execve' && /(qemu-img|qemu-nbd|virsh)"/.test(e.text)).map((e) => e.pid));
  const syncs = events.filter((e) => (e.call === 'fsync' || e.call === 'fdatasync') && !toolPids.has(e.pid) && !e.text.includes('.qcow2>')).length;
  return { phases, tools, syncs };
}

/** --phases: N traced runs of each build's unchanged --image and --libvirt incremental, interleaved; medians. */
async function phaseReport(builds: Build[], runs: number, work: string): Promise<string[]> {
  const lines: string[] = [];
  const kinds: { name: string; args: (b: Build) => string[] | undefined }[] = [
    { name: '--image, unchanged qcow2', args: (b) => ['backup', '--repo', b.repo, '--image', b.qcow2, '--incremental', '--json'] },
    { name: '--libvirt, unchanged running VM', args: (b) => (b.domain ? ['backup', '--repo', b.repo, '--libvirt', b.domain, '--incremental', '--json'] : undefined) },
  ];
  for (const kind of kinds) {
    const results = new Map<string, PhaseRun[]>();
    const loads: string[] = [];
    for (let i = 0; i < runs; i += 1) {
      loads.push(await loadAverage());
      for (const build of i % 2 === 0 ? builds : [...builds].reverse()) {
        const args = kind.args(build);
        if (!args) continue;
        results.set(build.name, [...(results.get(build.name) ?? []), await tracedRun(build.engine, args, build.repo, work)]);
      }
    }
    if (results.size === 0) continue;
    const names = [...results.keys()];
    lines.push('', `## Phases of an incremental ${kind.name} (strace -f -tt, ${runs} runs each, medians in ms; loads ${loads.join('; ')})`, '');
    lines.push(`| phase | ${names.join(' | ')} |`, `|---|${names.map(() => '---|').join('')}`);
    const marks = phaseMarks('');
    marks.forEach((mark, p) => lines.push(`| ${mark.name} | ${names.map((n) => (median(results.get(n)!.map((r) => r.phases[p]!)) * 1000).toFixed(0)).join(' | ')} |`));
    lines.push(`| **total** | ${names.map((n) => (median(results.get(n)!.map((r) => r.phases.reduce((a, b) => a + b, 0))) * 1000).toFixed(0)).join(' | ')} |`);
    lines.push(`| fsync/fdatasync calls of the engine (not the tools') | ${names.map((n) => median(results.get(n)!.map((r) => r.syncs))).join(' | ')} |`);
    for (const name of names) {
      // The last run: a chain's steady state (the first incremental after a full has no old bitmap to remove).
      const last = results.get(name)!.at(-1)!;
      const each = last.tools.map((tool) => `${tool.name.replace(/ engine-\S+/, ' DOMAIN')} at ${(tool.at * 1000).toFixed(0)} for ${(tool.seconds * 1000).toFixed(0)}`);
      lines.push('', `Tools run by ${name} in its last run (${last.tools.length}, in order; ms from the start, ms run): ${each.join('; ')}.`);
    }
  }
  return lines;
}

/** Writes `bytes` (1% of the disk) in pieces of 64 KiB to 1 MiB at 64 KiB-aligned offsets, through `write`. */
async function onePercent(size: number, random: SeededRandom, write: (command: string) => Promise<unknown>): Promise<number> {
  let written = 0;
  while (written < size / 100) {
    const length = 65536 * (1 + random.below(16));
    const offset = random.below(Math.floor((size - length) / 65536)) * 65536;
    await write(`write -q -P ${1 + random.below(250)} ${offset} ${length}`);
    written += length;
  }
  return written;
}

/**
 * --ratio: full then incremental of 1% of a 1 GiB disk, cold, via --image and --libvirt. With a baseline, both builds
 * back up the same disk, each into its own repository (bitmaps and checkpoints carry the repository's id, so the two
 * chains do not meet): both fulls, the writes, both incrementals, in turn (order reversed every other round).
 */
async function ratioReport(builds: Build[], rounds: number, work: string, libvirt: boolean): Promise<string[]> {
  const size = 1024 * MiB;
  const image = join(work, 'ratio.qcow2');
  // 1 GiB of data: random (no compression or deduplication shortcut for the full).
  await run('sh', ['-c', `head -c ${size} /dev/urandom > ${work}/ratio.raw && qemu-img convert -f raw -O qcow2 ${work}/ratio.raw ${image} && rm ${work}/ratio.raw`]);
  const repos = new Map<string, string>();
  for (const build of builds) {
    repos.set(build.name, join(work, `repo-ratio-${build.name}`));
    await run(build.engine, ['init', repos.get(build.name)!]);
  }
  const random = new SeededRandom('fixed-costs-ratio');
  const lines = [
    '',
    `## Incremental of 1% of a 1 GiB disk against its full (cold: page cache dropped before each backup; ${rounds} rounds)`,
    '',
    '| source | build | full s (median) | incremental s (median) | incremental CPU-s (median) | MiB written a round | incremental/full (median of rounds) |',
    '|---|---|---|---|---|---|---|',
  ];
  const kinds: { name: string; target: string[]; write: (command: string) => Promise<unknown> }[] = [
    { name: '--image', target: ['--image', image], write: (command) => run('qemu-io', ['-f', 'qcow2', '-c', command, image]) },
  ];
  if (libvirt) {
    const domain = await startDomain(`engine-fixed-costs-ratio-${process.pid}`, image, work);
    kinds.push({ name: '--libvirt', target: ['--libvirt', domain], write: (command) => run('virsh', ['qemu-monitor-command', domain, '--hmp', `qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "${command}"`]) });
  }
  const loads: string[] = [];
  for (const kind of kinds) {
    const fulls = new Map<string, Measured[]>();
    const incs = new Map<string, Measured[]>();
    let written = 0;
    for (let round = 0; round < rounds; round += 1) {
      loads.push(await loadAverage());
      const order = round % 2 === 0 ? builds : [...builds].reverse();
      for (const build of order) fulls.set(build.name, [...(fulls.get(build.name) ?? []), await coldTimed(build.engine, ['backup', '--repo', repos.get(build.name)!, ...kind.target, '--full', '--json'])]);
      written = await onePercent(size, random, kind.write);
      for (const build of order) {
        const inc = await coldTimed(build.engine, ['backup', '--repo', repos.get(build.name)!, ...kind.target, '--incremental', '--json']);
        const mode = (JSON.parse(inc.stdout) as { type: string }).type;
        if (mode !== 'incremental') throw new Error(`${kind.name}, ${build.name}: the incremental was a ${mode}`);
        incs.set(build.name, [...(incs.get(build.name) ?? []), inc]);
      }
      log(`ratio ${kind.name} round ${round + 1}/${rounds}: ${builds.map((b) => `${b.name} full ${fulls.get(b.name)!.at(-1)!.seconds} s, incremental ${incs.get(b.name)!.at(-1)!.seconds} s`).join('; ')} (load ${loads.at(-1)})`);
    }
    for (const build of builds) {
      const f = fulls.get(build.name)!;
      const i = incs.get(build.name)!;
      lines.push(
        `| ${kind.name} | ${build.name} | ${median(f.map((m) => m.seconds)).toFixed(2)} | ${median(i.map((m) => m.seconds)).toFixed(2)} | ${median(i.map((m) => m.cpuSeconds)).toFixed(2)} | ${(written / MiB).toFixed(1)} | ${(median(i.map((m, n) => m.seconds / f[n]!.seconds)) * 100).toFixed(1)}% |`,
      );
    }
  }
  lines.push('', `Load averages at the rounds' starts: ${loads.join('; ')}.`);
  return lines;
}

async function main(): Promise<void> {
  const rounds = Number(arg('--rounds') ?? 10);
  const baseline = arg('--baseline');
  const cold = process.argv.includes('--cold');
  const out = arg('--out');
  const phaseRuns = Number(arg('--phases') ?? 0);
  const ratioRounds = Number(arg('--ratio') ?? 0);
  const libvirt = await libvirtdRunning();
  const steps = STEPS.filter((step) => (libvirt || !step.libvirt) && (!process.argv.includes('--only-libvirt') || step.libvirt));
  const cache = await privateEngineCache();
  const work = await mkdtemp(join(tmpdir(), 'engine-fixed-costs-'));
  try {
    // The disk: 8 MiB of data in a 64 MiB sparse file; the same disk as a qcow2 for the CBT path.
    const disk = join(work, 'disk.raw');
    await run('truncate', ['-s', `${64 * MiB}`, disk]);
    await run('sh', ['-c', `head -c ${4 * MiB} /dev/urandom | dd of=${disk} conv=notrunc status=none && (find /usr/share/doc -type f -name '*.gz' -prune -o -type f -print | head -2000 | xargs cat 2>/dev/null | head -c ${4 * MiB}) | dd of=${disk} bs=1M seek=16 conv=notrunc status=none`]);
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', disk, join(work, 'disk.qcow2')]);
    const builds = [await setUp('this', ENGINE, work, libvirt)];
    if (baseline) builds.push(await setUp('baseline', baseline, work, libvirt));

    const samples = new Map<string, Measured[]>();
    const loads: string[] = [];
    for (let round = 1; round <= rounds; round += 1) {
      loads.push(await loadAverage());
      for (const step of steps) {
        const order = round % 2 === 0 ? [...builds].reverse() : builds;
        for (const build of order) {
          const args = step.args(build, round, work);
          const measured = cold ? await coldTimed(build.engine, args) : await timed(build.engine, args);
          const key = `${step.name}|${build.name}`;
          samples.set(key, [...(samples.get(key) ?? []), measured]);
        }
      }
      await run('sh', ['-c', `rm -f ${work}/restored-*.raw`]);
      log(`round ${round}/${rounds} (load ${loads.at(-1)})`);
    }

    const lines = [
      `# Fixed costs per CLI call (${cold ? 'cold: page cache dropped before each step' : 'warm page cache'})`,
      '',
      `Machine: ${machineLine()}. ${rounds} rounds${baseline ? `, this build and the baseline (${baseline}) in turn, order reversed every other round` : ''}. Load averages at the rounds' starts: ${loads.join('; ')}.`,
      '',
      baseline ? '| step | CPU-s this | CPU-s baseline | CPU ratio (median of pairs) | wall s this | wall s baseline | wall ratio |' : '| step | CPU-s | wall s | peak RSS MiB |',
      baseline ? '|---|---|---|---|---|---|---|' : '|---|---|---|---|',
    ];
    // --rounds 0: only the phases or the ratio.
    for (const step of rounds > 0 ? steps : []) {
      const mine = samples.get(`${step.name}|this`)!;
      if (!baseline) {
        lines.push(`| ${step.name} | ${median(mine.map((m) => m.cpuSeconds)).toFixed(3)} | ${median(mine.map((m) => m.seconds)).toFixed(3)} | ${median(mine.map((m) => m.peakRssMiB)).toFixed(0)} |`);
        continue;
      }
      const theirs = samples.get(`${step.name}|baseline`)!;
      const ratio = (pick: (m: Measured) => number): string => median(mine.map((m, i) => pick(m) / pick(theirs[i]!))).toFixed(3);
      lines.push(
        `| ${step.name} | ${median(mine.map((m) => m.cpuSeconds)).toFixed(3)} | ${median(theirs.map((m) => m.cpuSeconds)).toFixed(3)} | ${ratio((m) => m.cpuSeconds)} | ${median(mine.map((m) => m.seconds)).toFixed(3)} | ${median(theirs.map((m) => m.seconds)).toFixed(3)} | ${ratio((m) => m.seconds)} |`,
      );
    }
    if (!libvirt) lines.push('', 'No libvirtd answered (virsh version): the --libvirt rows are left out.');
    if (phaseRuns > 0) lines.push(...(await phaseReport(builds, phaseRuns, work)));
    if (ratioRounds > 0) lines.push(...(await ratioReport(builds, ratioRounds, work, libvirt)));
    const report = `${lines.join('\n')}\n`;
    process.stdout.write(report);
    if (out) {
      await mkdir(out, { recursive: true });
      await writeFile(join(out, `fixed-costs-${new Date().toISOString().slice(0, 16).replace(/:/g, '')}.md`), report);
    }
  } finally {
    await removeDomains();
    await rm(work, { recursive: true, force: true });
    await cache.remove();
  }
}

await main();
