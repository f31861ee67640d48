/**
 * Live restore (issue 17, item 4): `node dist/bench/live-restore.js [--rounds 3] [--guest-image IMG] [--dir DIR]
 * [--out bench/results]`.
 *
 * The tests' tiny guest (128 MiB disk; see bench/quiesce.ts for where its image comes from) as a TCG libvirt
 * domain, backed up once with `backup --libvirt`. Each round, page cache dropped before each restore:
 * - time to a running domain: `restore --live --libvirt` (its `readyMs`: from the call to `virsh start` returned)
 *   against a full restore first (`restore --to-qcow2`, then `virsh define` + `virsh start`), both also to the guest
 *   agent's first answer (the guest booted);
 * - the guest's read latency: `dd` of 4 MiB with O_DIRECT (cache dropped in the guest) of a region not yet hydrated
 *   (the stream paced at 1 KiB/s, so that it stays unhydrated), then of the same region after hydration.
 */
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ensureLibvirtd } from './libvirt-scenario.js';
import { reportMarkdown, writeReport } from './report.js';
import { agentGuestXml } from '../test/guest/libvirt-guest.js';
import { agent, guestImage } from './guest.js';
import { arg, dropCaches, ENGINE, initRepository, loadAverage, logger, machineLine, privateEngineCache, sh } from './tools.js';
import { spawn } from 'node:child_process';

const log = logger('live-restore-bench');
async function untilAgent(domain: string): Promise<void> {
  while (!(await agent(domain, 'guest-ping').then(() => true, () => false))) await new Promise((resolve) => setTimeout(resolve, 200));
}

async function guestShell(domain: string, script: string): Promise<string> {
  const { pid } = await agent<{ pid: number }>(domain, 'guest-exec', { path: '/bin/sh', arg: ['-c', `${script} 2>&1`], 'capture-output': true });
  for (;;) {
    const status = await agent<{ exited: boolean; exitcode?: number; 'out-data'?: string }>(domain, 'guest-exec-status', { pid });
    if (status.exited) {
      const out = Buffer.from(status['out-data'] ?? '', 'base64').toString();
      if (status.exitcode !== 0) throw new Error(`guest: ${script}: ${out}`);
      return out;
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** Seconds the guest's dd of 4 MiB at `mib` took, as the guest measured it (its own clock, around dd only). */
async function guestRead(domain: string, mib: number): Promise<number> {
  const out = await guestShell(domain, `sync; echo 3 > /proc/sys/vm/drop_caches; a=$(cat /proc/uptime); dd if=/dev/vda of=/dev/null bs=1M skip=${mib} count=4 iflag=direct 2>/dev/null; b=$(cat /proc/uptime); echo "$a $b"`);
  const [a, , b] = out.trim().split(/\s+/).map(Number);
  return b! - a!;
}

async function destroy(domain: string): Promise<void> {
  await sh('virsh', ['destroy', domain]).catch(() => undefined);
  for (const checkpoint of (await sh('virsh', ['-q', 'checkpoint-list', domain, '--name']).catch(() => '')).split('\n').filter(Boolean)) {
    await sh('virsh', ['checkpoint-delete', domain, checkpoint.trim(), '--metadata']).catch(() => undefined);
  }
  await sh('virsh', ['undefine', domain, '--checkpoints-metadata', '--nvram']).catch(() => sh('virsh', ['undefine', domain]).catch(() => undefined));
}

interface Round {
  liveRunningS: number;
  liveBootedS: number;
  fullRunningS: number;
  fullBootedS: number;
  readHydratingS: number;
  readHydratedS: number;
  load: string;
}

async function main(): Promise<void> {
  const rounds = Number(arg('--rounds') ?? '3');
  const outDir = arg('--out') ?? 'bench/results';
  const dir = await mkdtemp(join(arg('--dir') ?? tmpdir(), 'engine-bench-live-'));
  const cache = await privateEngineCache();
  const source = `engine-bench-live-src-${process.pid}`;
  const env = { ...process.env, ENGINE_RUN_DIR: join(dir, 'run') };
  const made: string[] = [source];
  // The daemons as the libvirt scenarios start them (none was running on a fresh machine): stopped at the end.
  const stopDaemons = await ensureLibvirtd(dir, log);
  if (typeof stopDaemons === 'string') throw new Error(stopDaemons);
  try {
    await chmod(dir, 0o755);
    const image = join(dir, 'guest.qcow2');
    await sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', await guestImage(), image]);
    await sh('chown', ['libvirt-qemu:kvm', image]).catch(() => undefined);
    const xml = join(dir, 'domain.xml');
    await writeFile(xml, agentGuestXml({ name: source, image }));
    await sh('virsh', ['define', xml]);
    await sh('virsh', ['start', source]);
    await untilAgent(source);
    const repo = join(dir, 'repo');
    await initRepository(repo);
    const id = (JSON.parse(await sh(ENGINE, ['backup', '--repo', repo, '--libvirt', source, '--json'])) as { id: string }).id;
    await destroy(source);
    const results: Round[] = [];
    for (let i = 0; i < rounds; i += 1) {
      const load = await loadAverage();
      // Live: the stream paced at 1 KiB/s until the reads are measured, then resumed at full speed.
      const live = `engine-bench-live-${process.pid}-${i}`;
      made.push(live);
      await dropCaches();
      let started = performance.now();
      // Without --json: the notice that the domain runs comes on stderr.
      const child = spawn(ENGINE, ['restore', '--repo', repo, id, '--live', '--libvirt', live, '--to', dir, '--bandwidth', '1K'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
      let stderr = '';
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      while (!/runs on backup \S+ after/.test(stderr)) {
        if (child.exitCode !== null) throw new Error(`live restore failed: ${stderr}`);
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
      const liveRunningS = (performance.now() - started) / 1000;
      await untilAgent(live);
      const liveBootedS = (performance.now() - started) / 1000;
      const readHydratingS = await guestRead(live, 100);
      child.kill('SIGINT');
      await new Promise((resolve) => child.once('exit', resolve));
      await sh(ENGINE, ['restore', '--live', '--resume', '--libvirt', live, '--json'], { ENGINE_RUN_DIR: join(dir, 'run') });
      const readHydratedS = await guestRead(live, 104);
      await destroy(live);
      await rm(join(dir, `${live}-vda.qcow2`), { force: true });

      // Full restore first, then the domain defined and started on it.
      const full = `engine-bench-full-${process.pid}-${i}`;
      made.push(full);
      const target = join(dir, `${full}.qcow2`);
      await dropCaches();
      started = performance.now();
      await sh(ENGINE, ['restore', '--repo', repo, id, '--to-qcow2', target]);
      await writeFile(join(dir, `${full}.xml`), agentGuestXml({ name: full, image: target }));
      await sh('virsh', ['define', join(dir, `${full}.xml`)]);
      await sh('virsh', ['start', full]);
      const fullRunningS = (performance.now() - started) / 1000;
      await untilAgent(full);
      const fullBootedS = (performance.now() - started) / 1000;
      await destroy(full);
      await rm(target, { force: true });
      const round = { liveRunningS, liveBootedS, fullRunningS, fullBootedS, readHydratingS, readHydratedS, load };
      results.push(round);
      log(`round ${i + 1}: ${JSON.stringify(round)}`);
    }
    const f = (n: number): string => n.toFixed(2);
    const lines = [
      '| round | live: domain running (s) | live: agent answers (s) | full restore + start: running (s) | full: agent answers (s) | guest dd 4 MiB O_DIRECT while hydrating (s) | after hydration (s) | load before |',
      '| --- | --- | --- | --- | --- | --- | --- | --- |',
      ...results.map((r, i) => `| ${i + 1} | ${f(r.liveRunningS)} | ${f(r.liveBootedS)} | ${f(r.fullRunningS)} | ${f(r.fullBootedS)} | ${r.readHydratingS.toFixed(3)} | ${r.readHydratedS.toFixed(3)} | ${r.load} |`),
    ];
    const markdown = reportMarkdown(
      'restore --live: time to a running domain, and the guest\'s reads while hydrating',
      [
        `Machine: ${machineLine()}; load at the end ${await loadAverage()}.`,
        "The tests' tiny guest (128 MiB disk, ~23 MiB of data) as a TCG libvirt domain, backed up once with backup --libvirt into a local format-3 repository. Host page cache dropped before each restore. Live: the stream paced at 1 KiB/s while the guest's read is measured (the region then reads through the NBD server), then resumed unpaced; the after-hydration read is of the next 4 MiB, read from the image. Full: restore --to-qcow2, then virsh define and start. The guest's dd is timed by the guest's clock (/proc/uptime, 10 ms resolution) with its page cache dropped and O_DIRECT.",
        'The disk is small: the full restore\'s cost grows with the disk, the live restore\'s time to running does not.',
      ],
      lines.join('\n'),
      [],
      [],
    );
    await writeReport(outDir, 'live-restore', markdown, { rounds: results });
  } finally {
    for (const domain of made) await destroy(domain);
    await stopDaemons();
    await rm(dir, { recursive: true, force: true });
    await cache.remove();
  }
}

main().catch((error: unknown) => {
  process.stderr.write(`${(error as Error).stack ?? String(error)}\n`);
  process.exitCode = 1;
});
