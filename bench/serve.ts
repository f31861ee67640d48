/**
 * Instant access benchmark: `node dist/bench/serve.js [--size 1G] [--dir DIR] [--out bench/results]`.
 *
 * 1. Sequential read through `engine serve` (a fresh server, cold cache: nbdcopy to null:, 4 connections,
 *    zero blocks skipped through base:allocation as any client would) against `engine restore` of the same
 *    backup to a new file (+ fsync), on a generated VM-like image.
 * 2. Time from `engine mount` to the first byte of a file inside an ext4 filesystem of the backup (mke2fs -d),
 *    then `engine umount`.
 * Figures are wall times of separate processes; MB = 10^6 B, rates over the disk's logical size.
 */
import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { formatBytes, generateImage, parseSize } from '../engine/index.js';
import { reportMarkdown, writeReport } from './report.js';
import { arg, ENGINE, initRepository, logger, machineLine, MB, privateEngineCache, run } from './tools.js';

const log = logger('serve-bench');

async function backup(repo: string, source: string, name: string): Promise<string> {
  const { stdout } = await run(ENGINE, ['backup', '--repo', repo, '--source', source, '--disk-name', name, '--json']);
  return (JSON.parse(stdout) as { id: string }).id;
}

/** Starts `engine serve` and resolves with the export URI and a stop function once it listens. */
async function startServe(repo: string, id: string, socket: string): Promise<{ uri: string; stop: () => Promise<void> }> {
  const child = spawn(ENGINE, ['serve', '--repo', repo, id, '--socket', socket, '--json'], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.on('data', (chunk: Buffer) => {
    out += chunk.toString();
  });
  for (let i = 0; i < 400 && !out.trim().endsWith('}'); i += 1) await new Promise((r) => setTimeout(r, 25));
  const ready = JSON.parse(out) as { exports: { uri: string }[] };
  return {
    uri: ready.exports[0]!.uri,
    stop: () =>
      new Promise((resolve) => {
        child.once('exit', () => resolve());
        child.kill('SIGTERM');
      }),
  };
}

async function main(): Promise<void> {
  const size = parseSize(arg('--size') ?? '1G');
  const outDir = arg('--out') ?? fileURLToPath(new URL('../../bench/results', import.meta.url));
  const work = arg('--dir') ?? (await mkdtemp(join(tmpdir(), 'engine-serve-bench-')));
  await mkdir(work, { recursive: true });
  const machine = machineLine();
  const cache = await privateEngineCache();
  try {
    const repo = join(work, 'repo');
    // engine init's default format, as users get it; the report says which.
    const format = await initRepository(repo);
    const image = join(work, 'disk.raw');
    log(`generating a ${formatBytes(size)} VM-like image`);
    const generated = await generateImage(image, size, 'serve-bench');
    const id = await backup(repo, image, 'disk');

    const rows: { measure: string; seconds: number; mbPerS: number | null; note: string }[] = [];
    const served = await startServe(repo, id, join(work, 'serve.sock'));
    log('nbdcopy through engine serve');
    const copy = await run('nbdcopy', [served.uri, 'null:']);
    await served.stop();
    rows.push({ measure: 'sequential read through engine serve (nbdcopy to null:, cold cache)', seconds: copy.seconds, mbPerS: size / MB / copy.seconds, note: `${formatBytes(generated.dataBytes)} of data, zero blocks skipped` });
    log('restore to a new file');
    const restored = await run(ENGINE, ['restore', '--repo', repo, id, '--to', join(work, 'restored.raw')]);
    rows.push({ measure: 'engine restore to a new file (+ fsync)', seconds: restored.seconds, mbPerS: size / MB / restored.seconds, note: 'zero blocks left as holes' });
    await rm(join(work, 'restored.raw'));

    log('mount to first byte');
    const content = join(work, 'content');
    await mkdir(content);
    await writeFile(join(content, 'wanted.txt'), 'the file from last Tuesday\n');
    const fsImage = join(work, 'fs.raw');
    await run('mke2fs', ['-q', '-t', 'ext4', '-d', content, fsImage, '256M']);
    const fsId = await backup(repo, fsImage, 'root');
    const mountDir = join(work, 'mnt');
    const env = { ENGINE_RUN_DIR: join(work, 'run') };
    const started = performance.now();
    await run(ENGINE, ['mount', '--repo', repo, fsId, mountDir], env);
    const file = await open(join(mountDir, 'root', 'wanted.txt'), 'r');
    const first = Buffer.alloc(1);
    await file.read(first, 0, 1, 0);
    await file.close();
    const toFirstByte = (performance.now() - started) / 1000;
    const umounted = await run(ENGINE, ['umount', mountDir], env);
    rows.push({ measure: 'engine mount → first byte of a file (ext4, 256 MiB disk)', seconds: toFirstByte, mbPerS: null, note: `umount ${umounted.seconds.toFixed(2)} s` });

    const ratio = rows[0]!.mbPerS! / rows[1]!.mbPerS!;
    const body = [
      '| measure | wall s | MB/s | note |',
      '|---|---|---|---|',
      ...rows.map((r) => `| ${r.measure} | ${r.seconds.toFixed(2)} | ${r.mbPerS === null ? '' : r.mbPerS.toFixed(0)} | ${r.note} |`),
    ].join('\n');
    const markdown = reportMarkdown(
      'Instant access: engine serve and engine mount',
      [
        `Machine: ${machine}. Image: ${formatBytes(size)} VM-like (generateImage, seed "serve-bench").`,
        `The repository: a format ${format} folder (what \`engine init\` creates by default), the host index cache of the run's own (ENGINE_CACHE_DIR), the CLI run as users run it (bin/engine).`,
        'The machine was shared with other work while this ran: the figures are indicative.',
      ],
      body,
      [`sequential read through serve vs restore to a file: ${ratio.toFixed(2)}×`, `mount to first byte: ${toFirstByte.toFixed(2)} s (a user wants one file in seconds)`],
      [],
    );
    const data = { machine, size, repositoryFormat: format, rows, serveVsRestore: ratio, sharedMachine: true };
    await writeReport(outDir, 'serve', markdown, data);
    await writeFile(join(outDir, 'serve-latest.md'), markdown);
    await writeFile(join(outDir, 'serve-latest.json'), JSON.stringify(data, null, 2));
  } finally {
    if (!arg('--dir')) await rm(work, { recursive: true, force: true });
    await cache.remove();
  }
}

await main();
