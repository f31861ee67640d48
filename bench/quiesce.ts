/**
 * The cost of `backup --libvirt --quiesce` (issue 16, item 5): `node dist/bench/quiesce.js [--rounds 5]
 * [--guest-image IMG] [--dir DIR] [--out bench/results]`.
 *
 * The tests' tiny guest (test/guest/build-tiny-guest.sh: Debian's cloud kernel, busybox, qemu-ga; the image the
 * tests cache under /var/cache/engine-test, or --guest-image) runs as a TCG libvirt domain with a guest agent
 * channel. Each round: 1 MiB written in the guest (not synced: the freeze flushes it), an incremental backup
 * without quiesce, the same write again, an incremental with --quiesce; each backup with the page cache dropped
 * first. Reported per round: the freeze window the record holds (`consistency.freezeMs`: from the freeze asked to
 * the thaw answered) and the wall time of both backups, paired (their difference is quiesce's whole cost: hooks
 * none, watchdog, freeze, thaw).
 */
import { mkdtemp, rm, writeFile, chmod } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { reportMarkdown, writeReport } from './report.js';
import { agentGuestXml } from '../test/guest/libvirt-guest.js';
import { agent, guestImage } from './guest.js';
import { arg, coldTimed, ENGINE, initRepository, loadAverage, logger, machineLine, privateEngineCache, sh } from './tools.js';

const log = logger('quiesce-bench');

interface Round {
  plainSeconds: number;
  quiescedSeconds: number;
  freezeMs: number;
  level: string;
  loadBefore: string;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

async function main(): Promise<void> {
  const rounds = Number(arg('--rounds') ?? '5');
  const outDir = arg('--out') ?? 'bench/results';
  const dir = await mkdtemp(join(arg('--dir') ?? tmpdir(), 'engine-bench-quiesce-'));
  const cache = await privateEngineCache();
  const domain = `engine-bench-quiesce-${process.pid}`;
  try {
    await chmod(dir, 0o755); // qemu runs as libvirt-qemu and must reach the image
    const image = join(dir, 'guest.qcow2');
    await sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', await guestImage(), image]);
    await sh('chown', ['libvirt-qemu:kvm', image]).catch(() => undefined);
    const xml = join(dir, 'domain.xml');
    await writeFile(xml, agentGuestXml({ name: domain, image }));
    log('defining and starting the guest domain');
    await sh('virsh', ['define', xml]);
    await sh('virsh', ['start', domain]);
    for (;;) {
      if (await agent(domain, 'guest-ping', undefined, 10).then(() => true, () => false)) break;
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
    const repo = join(dir, 'repo');
    await initRepository(repo);
    await sh(ENGINE, ['backup', '--repo', repo, '--libvirt', domain, '--json']); // the full; rounds are incrementals
    const write = (n: string): Promise<unknown> => agent(domain, 'guest-exec', { path: '/bin/sh', arg: ['-c', `dd if=/dev/urandom of=/data/bench-${n} bs=1M count=1 2>/dev/null`] });
    const results: Round[] = [];
    for (let i = 0; i < rounds; i += 1) {
      await write(`${i}-plain`);
      const plain = await coldTimed(ENGINE, ['backup', '--repo', repo, '--libvirt', domain, '--json']);
      await write(`${i}-quiesced`);
      const quiesced = await coldTimed(ENGINE, ['backup', '--repo', repo, '--libvirt', domain, '--json', '--quiesce']);
      const consistency = (JSON.parse(quiesced.stdout) as { consistency: { level: string; freezeMs: number } }).consistency;
      results.push({ plainSeconds: plain.seconds, quiescedSeconds: quiesced.seconds, freezeMs: consistency.freezeMs, level: consistency.level, loadBefore: `${plain.load} / ${quiesced.load}` });
      log(`round ${i + 1}: freeze ${consistency.freezeMs} ms, plain ${plain.seconds} s, quiesced ${quiesced.seconds} s (load ${quiesced.load})`);
    }
    const lines = ['| round | freeze window (ms) | level | backup without quiesce (s) | with --quiesce (s) | difference (s) | load before (plain / quiesced) |', '| --- | --- | --- | --- | --- | --- | --- |'];
    results.forEach((r, i) => lines.push(`| ${i + 1} | ${r.freezeMs} | ${r.level} | ${r.plainSeconds.toFixed(2)} | ${r.quiescedSeconds.toFixed(2)} | ${(r.quiescedSeconds - r.plainSeconds).toFixed(2)} | ${r.loadBefore} |`));
    const freeze = median(results.map((r) => r.freezeMs));
    const overhead = median(results.map((r) => r.quiescedSeconds - r.plainSeconds));
    lines.push('', `Median freeze window ${freeze} ms (min ${Math.min(...results.map((r) => r.freezeMs))}, max ${Math.max(...results.map((r) => r.freezeMs))}); median paired overhead of --quiesce on the backup's wall time ${overhead.toFixed(2)} s.`);
    const markdown = reportMarkdown(
      'backup --libvirt --quiesce: the freeze window',
      [
        `Machine: ${machineLine()}; load at the end ${await loadAverage()}.`,
        "The tests' tiny guest (128 MiB disk, ext3 root mounted as ext4, qemu-ga) as a TCG libvirt domain; incremental backups after 1 MiB written in the guest, page cache dropped before each; without and with --quiesce, paired per round.",
      ],
      lines.join('\n'),
      [`freeze window below the default --freeze-timeout (10 000 ms): ${results.every((r) => r.freezeMs < 10_000) ? 'PASS' : 'MISS'} (max ${Math.max(...results.map((r) => r.freezeMs))} ms)`],
      [],
    );
    await writeReport(outDir, 'quiesce', markdown, { rounds: results, medianFreezeMs: freeze, medianOverheadSeconds: overhead });
  } finally {
    await sh('virsh', ['destroy', domain]).catch(() => undefined);
    for (const checkpoint of (await sh('virsh', ['-q', 'checkpoint-list', domain, '--name']).catch(() => '')).split('\n').filter(Boolean)) {
      await sh('virsh', ['checkpoint-delete', domain, checkpoint.trim(), '--metadata']).catch(() => undefined);
    }
    await sh('virsh', ['undefine', domain, '--checkpoints-metadata']).catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
    await cache.remove();
  }
}

main().catch((error: unknown) => {
  process.stderr.write(`${(error as Error).stack ?? String(error)}\n`);
  process.exitCode = 1;
});
