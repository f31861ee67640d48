/**
 * Time to proof of life of `verify --boot` (issue 16, item 5): the tests' tiny guest (test/guest/, a 128 MiB
 * self-booting Debian disk with a guest agent) backed up once, then booted N times from the repository by
 * verifyBoot (the agent answering guest-ping and listing a mounted file system), each run paired with a boot
 * of a copy of the same raw image as a plain file by the same VM machinery (engine/vm/, same QEMU arguments
 * but the disk) — the floor this machine sets, without the NBD server, the chunk reads and the overlay. The
 * two alternate (every other round in reverse order) so that a shared machine's load falls on both alike;
 * the load average is given with every round. TCG unless KVM works here (the accelerator is reported).
 *
 *   npm run build && node dist/bench/boot.js [--rounds 5] [--image /var/cache/engine-test/tiny-guest-*\/guest.img]
 */
import { copyFile, mkdtemp, readdir, rm } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { backup, findQemu, GuestAgentClient, initRepository, kvmUsable, verifyBoot, VirtualMachine, type VmSpec } from '../engine/index.js';
import { arg, logger, machineLine } from './tools.js';

const log = logger('boot');

async function tinyGuestImage(): Promise<string> {
  const given = arg('--image');
  if (given) return given;
  const cache = process.env.ENGINE_TEST_CACHE ?? '/var/cache/engine-test';
  const built = (await readdir(cache).catch(() => [] as string[])).filter((n) => n.startsWith('tiny-guest-') && !n.endsWith('.tmp'));
  if (built.length === 0) throw new Error(`no tiny guest in ${cache}: run test/verify-boot.test.ts once (it builds it), or give --image`);
  return join(cache, built[0]!, 'guest.img');
}

/** The same guest booted from a plain copy of its disk: ms from QEMU's start to the agent listing a mounted file system. */
async function bootPlainFile(image: string, dir: string): Promise<{ ms: number; accelerator: string }> {
  const disk = join(dir, 'plain.img');
  await copyFile(image, disk);
  const spec: VmSpec = {
    machine: 'q35',
    firmware: 'bios',
    memoryBytes: 1024 ** 3,
    cpus: 1,
    accelerator: 'tcg',
    disks: [{ kind: 'file', path: disk, format: 'raw', readOnly: false }],
    serialPorts: [{ name: 'org.qemu.guest_agent.0', socket: join(dir, 'qga.sock') }],
    consoleFile: join(dir, 'console.log'),
    qmpSocket: join(dir, 'qmp.sock'),
    logFile: join(dir, 'qemu.log'),
  };
  const start = performance.now();
  const vm = await VirtualMachine.start(await findQemu(), spec, async () => undefined);
  try {
    const agent = await GuestAgentClient.connect(spec.serialPorts[0]!.socket);
    for (;;) {
      try {
        await agent.sync(2000);
        const listed = await agent.execute<{ mountpoint: string }[]>('guest-get-fsinfo');
        if (listed.some((f) => f.mountpoint !== '')) break;
      } catch {
        if (!vm.running) throw new Error('the plain VM stopped');
      }
    }
    const ms = performance.now() - start;
    agent.shutdown();
    agent.close();
    return { ms, accelerator: await vm.accelerator().catch(() => 'tcg') };
  } finally {
    await vm.stop(10_000);
    await rm(disk, { force: true });
  }
}

async function main(): Promise<void> {
  const rounds = Number(arg('--rounds') ?? '5');
  const image = await tinyGuestImage();
  const dir = await mkdtemp(join(tmpdir(), 'engine-bench-boot-'));
  process.env.ENGINE_RUN_DIR = join(dir, 'run');
  try {
    log(machineLine());
    log(`KVM usable: ${await kvmUsable()} (the plain boot uses TCG; verify --boot falls back to TCG when KVM fails)`);
    const repo = join(dir, 'repo');
    await initRepository(repo, { blockSize: 1024 * 1024 });
    const source = join(dir, 'guest.img');
    await copyFile(image, source);
    const backed = await backup({ repo, from: { kind: 'disks', disks: [{ kind: 'raw', path: source }] } });
    const id = backed.record.id;
    const engineMs: number[] = [];
    const plainMs: number[] = [];
    for (let round = 0; round < rounds; round += 1) {
      const runEngine = async (): Promise<void> => {
        const load = loadavg()[0]!.toFixed(2);
        const result = await verifyBoot({ repo, backupId: id, logDir: join(dir, 'logs'), onLog: () => undefined });
        if (result.record.result !== 'passed') throw new Error(`round ${round}: ${result.record.reason?.code}: ${result.record.reason?.message}`);
        engineMs.push(result.record.proofOfLifeMs!);
        log(`round ${round + 1}: verify --boot proof of life ${result.record.proofOfLifeMs} ms (${result.record.accelerator}), load ${load}`);
      };
      const runPlain = async (): Promise<void> => {
        const load = loadavg()[0]!.toFixed(2);
        const plain = await bootPlainFile(image, dir);
        plainMs.push(Math.round(plain.ms));
        log(`round ${round + 1}: plain file boot ${Math.round(plain.ms)} ms (${plain.accelerator}), load ${load}`);
      };
      if (round % 2 === 0) {
        await runEngine();
        await runPlain();
      } else {
        await runPlain();
        await runEngine();
      }
    }
    const median = (values: number[]): number => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;
    const ratios = engineMs.map((ms, i) => ms / plainMs[i]!);
    const summary = { rounds, engineMs, plainMs, engineMedianMs: median(engineMs), plainMedianMs: median(plainMs), medianRatio: Number(median(ratios).toFixed(2)), load: loadavg().map((l) => Number(l.toFixed(2))) };
    process.stdout.write(`${JSON.stringify(summary, null, 2)}\n`);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
