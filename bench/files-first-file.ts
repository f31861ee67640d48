/**
 * Issue 16, item 5: the time to the first file of a file-level restore through the appliance VM (engine files,
 * SPEC 16.3), cold: every run boots a new appliance (the VMs' accelerator rule, vm/accelerator.ts: auto, or $ENGINE_ACCEL; the row says which ran), serves the backup,
 * mounts every volume and extracts one small file. The guest disks are the tests' (test/guest/
 * build-files-disks.sh: vfat + xfs on LVM on GPT, ext4 + NTFS on MBR, btrfs), backed up once, untimed; the
 * appliance is built (cached) before the first timed run. Per run: wall time of the CLI call, and the engine's own
 * split (--json timings): appliance ready (served + booted + every volume mounted) and first byte of the file.
 * Page cache dropped before each run (root). Load average printed with every row.
 *
 *   npm run build && node dist/bench/files-first-file.js [--runs 3] [--path vdb/p1/etc/hostname] [--disk vdb] [--out FILE]
 *
 * --disk attaches only that disk to the appliance (vdb: ext4 and NTFS, no LVM, xfs or btrfs to load).
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { arg, ENGINE, loadAverage, logger, machineLine, run } from './tools.js';

const log = logger('files-first-file');

/** Like run(), but a failure says the engine's JSON error (stdout with --json), not only stderr. */
function runJson(command: string, args: string[], env: Record<string, string>): Promise<{ stdout: string; seconds: number }> {
  const started = performance.now();
  return new Promise((resolve, reject) =>
    execFile(command, args, { maxBuffer: 64 * 1024 * 1024, env: { ...process.env, ...env } }, (error, stdout, stderr) => {
      if (error) reject(new Error(`${command} ${args.join(' ')}: ${stdout.trim()} ${stderr.trim()}`));
      else resolve({ stdout, seconds: (performance.now() - started) / 1000 });
    }),
  );
}
const BUILD = fileURLToPath(new URL('../../test/guest/build-files-disks.sh', import.meta.url));

const runs = Number(arg('--runs') ?? 3);
const path = arg('--path') ?? 'vdb/p1/etc/hostname';
const disk = arg('--disk');
const work = await mkdtemp(join(tmpdir(), 'engine-bench-files-'));
const env = { ENGINE_RUN_DIR: join(work, 'run'), ENGINE_CACHE_DIR: join(work, 'cache') };
try {
  log(`guest disks and their backup (untimed) in ${work}`);
  await run('bash', [BUILD, join(work, 'guest')]);
  const repo = join(work, 'repo');
  await run(ENGINE, ['init', repo], env);
  const disks = ['vda', 'vdb', 'vdc'];
  const backup = JSON.parse((await run(ENGINE, ['backup', '--repo', repo, ...disks.flatMap((d) => ['--source', join(work, 'guest', `${d}.img`)]), ...disks.flatMap((d) => ['--disk-name', d]), '--json'], env)).stdout) as { id: string };
  // The appliance is built once per version, before the first run (that is not what is measured).
  await run(ENGINE, ['files', 'ls', '--repo', repo, backup.id, 'vdb'], env);
  const rows: string[] = [];
  for (let i = 1; i <= runs; i += 1) {
    await run('sh', ['-c', 'sync; echo 3 > /proc/sys/vm/drop_caches']);
    const before = await loadAverage();
    const out = join(work, `out-${i}`);
    const { stdout, seconds } = await runJson(ENGINE, ['files', 'extract', '--repo', repo, backup.id, path, '--to', out, '--json', ...(disk ? ['--disk', disk] : [])], env);
    const result = JSON.parse(stdout) as { files: number; timings: { applianceReadyMs: number; firstByteMs: number; accel: string } };
    if (result.files !== 1) throw new Error(`run ${i}: ${result.files} files extracted, not 1`);
    const row = `| ${i} | ${result.timings.accel} | ${seconds.toFixed(1)} | ${(result.timings.applianceReadyMs / 1000).toFixed(1)} | ${(result.timings.firstByteMs / 1000).toFixed(1)} | ${before} |`;
    log(row);
    rows.push(row);
  }
  const report = [
    `# Time to the first file (engine files extract ${path}${disk ? ` --disk ${disk}` : ', every disk attached'}), cold appliance`,
    '',
    machineLine(),
    '',
    '| run | accel | wall s (CLI call) | appliance ready s | first byte s | load before (1/5/15 min) |',
    '|---|---|---|---|---|---|',
    ...rows,
    '',
  ].join('\n');
  process.stdout.write(report);
  const outFile = arg('--out');
  if (outFile) await writeFile(outFile, report);
} finally {
  await rm(work, { recursive: true, force: true });
}
