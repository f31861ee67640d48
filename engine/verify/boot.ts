/**
 * `engine verify --boot`: proves a backup boots. Its disks are served in-process (serve/) over a private
 * Unix socket with a writable throw-away overlay, a QEMU VM (vm/) boots from them with no network, and
 * the test passes on proof of life: the guest agent answers `guest-ping` and `guest-get-fsinfo` lists a
 * mounted file system (`expect: agent`), or a console line matches a regex (`expect: console`). Then the
 * VM is powered off (the agent's guest-shutdown, then QMP quit, then SIGKILL) and every write it made goes
 * with the overlay. A test that fails says why with a stable code (SPEC.md 9.2); the console log of a
 * failed test is kept on the host and its end in the record. The result is a verification record
 * stored next to the backup (Repository.commitVerification).
 *
 * Fails fast on what the console proves: SeaBIOS's "No bootable device." (graphics=off sends it to the
 * serial console), a Linux "Kernel panic", a VM that stops before proof of life (a guest that powers off
 * or resets: -no-reboot). Everything else waits for the timeout.
 *
 * Interruption (SIGINT/SIGTERM): the VM is killed, the server and overlay closed, the run's folder
 * removed, within a second; nothing is recorded. A run killed with -9 takes its VM along (pdeathsig,
 * vm/qemu.ts) and leaves its folder, registration or lease: the next run cleans them up (vm/journal.ts).
 */
import { copyFile, mkdir } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { Repository } from '../../repo-format/repository.js';
import type { BackupRecord } from '../../repo-format/backup-record.js';
import type { Passphrase } from '../../repo-format/passphrase.js';
import { BackupNotFoundError, EngineError, InvalidArgumentError } from '../../repo-format/errors.js';
import { nameMatches } from '../../repo-format/names.js';
import { defaultCacheRoot } from '../../repo-format/v3/session.js';
import { CONSOLE_ATTACHMENT_LIMIT, type BootChecks, type BootFailureCode, type BootVerification } from '../../repo-format/verification-record.js';
import { Interruption } from '../host/interrupt.js';
import { ENGINE_VERSION } from '../version.js';
import { serve, type ServeHandle } from '../serve/serve.js';
import { GuestAgentClient } from '../vm/agent.js';
import { cleanLine, ConsoleFollower, fileTail } from '../vm/console.js';
import { uefiFirmware } from '../vm/firmware.js';
import { cleanedNotice, VmRunJournal, type CleanedRun } from '../vm/journal.js';
import { acceleratorChoice, withAccelerator, type AcceleratorChoice } from '../vm/accelerator.js';
import { findQemu, qemuVersion, VirtualMachine } from '../vm/qemu.js';
import type { VmSpec } from '../vm/qemu-args.js';
import { bootTarget } from './boot-target.js';

export const DEFAULT_BOOT_TIMEOUT_SECONDS = 300;
export const DEFAULT_BOOT_MEMORY = 1024 * 1024 * 1024;
/** How long a guest is given to power off after guest-shutdown before QEMU is told to quit. */
const SHUTDOWN_GRACE_MS = 10_000;
const AGENT_PORT = 'org.qemu.guest_agent.0';

/** Console lines that prove the boot failed, whatever else may follow. */
const FATAL_LINES: { pattern: RegExp; code: BootFailureCode; says: string }[] = [
  { pattern: /No bootable device/, code: 'BOOT_NO_BOOTABLE_DISK', says: 'the firmware found no bootable disk' },
  { pattern: /Kernel panic - not syncing/, code: 'BOOT_KERNEL_PANIC', says: 'the guest kernel panicked' },
];

export interface BootVerifyOptions {
  repo: string;
  /** The backup (id or unique prefix); or `latest`. */
  backupId?: string | undefined;
  /** The newest backup (of `name`, when given): for schedulers. */
  latest?: boolean | undefined;
  name?: string | undefined;
  timeoutSeconds?: number | undefined;
  memoryBytes?: number | undefined;
  /** Proof of life: the guest agent (default) or a console line matching `regex`. */
  expect?: { kind: 'agent' } | { kind: 'console'; regex: string } | undefined;
  machine?: string | undefined;
  firmware?: 'bios' | 'uefi' | undefined;
  /** `auto`: KVM when /dev/kvm can be used, and TCG again when KVM fails (vm/accelerator.ts); default $ENGINE_ACCEL, else auto. */
  accelerator?: AcceleratorChoice | undefined;
  passphrase?: Passphrase | undefined;
  /** Where runs keep their journals, sockets and console ($ENGINE_RUN_DIR, /run/engine). */
  runDir?: string | undefined;
  /** Where the console log of a failed test is kept (default: <cache root>/boot-logs). */
  logDir?: string | undefined;
  signal?: AbortSignal | undefined;
  onLog?: ((message: string) => void) | undefined;
}

export interface BootVerifyResult {
  record: BootVerification;
  /** The record's key in the repository (verifications/<backup>/<name>). */
  key: string;
  /** What the run cleaned up after earlier runs that were killed. */
  cleaned: CleanedRun[];
}

type Outcome = { passed: true; line?: string } | { passed: false; code: BootFailureCode; message: string };

export async function verifyBoot(options: BootVerifyOptions): Promise<BootVerifyResult> {
  const interruption = new Interruption(options.signal, 'verify --boot', () => 'the VM was stopped and its writes discarded; nothing was recorded');
  const timeoutMs = (options.timeoutSeconds ?? DEFAULT_BOOT_TIMEOUT_SECONDS) * 1000;
  const memoryBytes = options.memoryBytes ?? DEFAULT_BOOT_MEMORY;
  const expect = options.expect ?? { kind: 'agent' };
  if (!(timeoutMs > 0) || !Number.isFinite(timeoutMs)) throw new InvalidArgumentError('the boot timeout must be a positive number of seconds');
  if (memoryBytes < 16 * 1024 * 1024) throw new InvalidArgumentError('a boot test needs at least 16 MiB of guest memory');
  let regex: RegExp | undefined;
  if (expect.kind === 'console') {
    try {
      regex = new RegExp(expect.regex);
    } catch (error) {
      throw new InvalidArgumentError(`--expect-console ${JSON.stringify(expect.regex)} is not a regular expression: ${(error as Error).message}`);
    }
  }
  if ((options.backupId === undefined) === (options.latest !== true)) throw new InvalidArgumentError('name the backup to boot, or ask for the latest one (not both)');
  // The tools first: a host that cannot run the test says so before the repository is opened.
  const qemu = await findQemu();
  const version = await qemuVersion(qemu);
  interruption.check();
  const backupId = options.latest ? await latestBackup(options) : options.backupId!;

  const cleanedBefore: CleanedRun[] = [];
  // A host whose KVM cannot run the guest says nothing about the backup: the test starts over under TCG,
  // from the untouched backup.
  return withAccelerator(acceleratorChoice(options.accelerator), bootOnce, (error) => options.onLog?.(`${error.message}; booting again under TCG`));

  async function bootOnce(accelerator: 'kvm' | 'tcg'): Promise<BootVerifyResult> {
    const { journal, cleaned } = await VmRunJournal.begin('verify --boot', { runDir: options.runDir, repo: options.repo });
    cleanedBefore.push(...cleaned);
    for (const run of cleaned) options.onLog?.(cleanedNotice(run));
    const consoleFile = join(journal.dir, 'console.log');
    let handle: ServeHandle | undefined;
    let vm: VirtualMachine | undefined;
    let follower: ConsoleFollower | undefined;
    let agent: GuestAgentClient | undefined;
    let outcome: Outcome | undefined;
    const started = new Date();
    try {
      handle = await serve({ repo: options.repo, backupId, socket: join(journal.dir, 'nbd.sock'), writable: true, overlayDir: journal.dir, passphrase: options.passphrase, signal: options.signal, onLog: options.onLog });
      await journal.update({ readerToken: handle.readerToken, lease: handle.lease });
      interruption.check();
      const backup = handle.backup;
      const target = bootTarget(backup, { machine: options.machine, firmware: options.firmware });
      const spec: VmSpec = {
        machine: target.machine,
        firmware: target.firmware,
        uefi: target.firmware === 'uefi' ? await uefiFirmware(journal.dir) : undefined,
        memoryBytes,
        cpus: 1,
        accelerator,
        disks: handle.exports.map((e) => ({ kind: 'nbd', socket: handle!.address.socket!, exportName: e.name, readOnly: false })),
        serialPorts: [{ name: AGENT_PORT, socket: join(journal.dir, 'qga.sock') }],
        consoleFile,
        qmpSocket: join(journal.dir, 'qmp.sock'),
        logFile: join(journal.dir, 'qemu.log'),
      };

      // Everything that settles the test goes through `settle`; the first word counts.
      let settle!: (o: Outcome) => void;
      const settled = new Promise<Outcome>((resolve) => (settle = resolve));
      const decide = (o: Outcome): void => {
        outcome ??= o;
        settle(outcome);
      };
      const checks: BootChecks = { expect: expect.kind, agentPing: expect.kind === 'agent' ? false : null, filesystems: null, console: regex ? { regex: expect.kind === 'console' ? expect.regex : '', line: null } : null };
      const lastLines: string[] = [];
      follower = new ConsoleFollower(consoleFile, (line) => {
        lastLines.push(line);
        if (lastLines.length > 5) lastLines.shift();
        if (regex && checks.console && checks.console.line === null && regex.test(line)) {
          checks.console.line = line;
          decide({ passed: true, line });
        }
        for (const fatal of FATAL_LINES) if (fatal.pattern.test(line)) decide({ passed: false, code: fatal.code, message: `${fatal.says}: the console says "${line.trim().slice(0, 200)}"` });
      });

      const startedAt = performance.now();
      vm = await VirtualMachine.start(qemu, spec, (process) => journal.update({ vm: process }));
      follower.start();
      options.onLog?.(`booting backup ${backup.id} (${backup.disks.map((d) => d.name).join(', ')}) on ${target.machine} (${target.machineFrom}), ${target.firmware} (${target.firmwareFrom}), ${accelerator.toUpperCase()}`);
      void vm.exited.then(async (e) => {
        await follower!.flush().catch(() => undefined);
        const last = lastLines.filter((l) => l.trim() !== '').slice(-2).join(' | ');
        decide({ passed: false, code: 'BOOT_VM_STOPPED', message: `the VM stopped before proof of life (${e.signal ? `QEMU ended by ${e.signal}` : `the guest powered off or reset; QEMU exit code ${e.code}`})${last ? `; the console's last lines: "${last.slice(0, 300)}"` : ''}` });
      });
      const timer = setTimeout(() => {
        if (checks.agentPing === true) decide({ passed: false, code: 'BOOT_NO_FILESYSTEM', message: `the guest agent answered, but listed no mounted file system within ${timeoutMs / 1000} s` });
        else decide({ passed: false, code: 'BOOT_TIMEOUT', message: expect.kind === 'agent' ? `the guest agent did not answer within ${timeoutMs / 1000} s` : `no console line matched ${JSON.stringify(regex!.source)} within ${timeoutMs / 1000} s` });
      }, timeoutMs);
      // A VM that KVM could not run (stopped with an internal error, or QEMU ended saying so) failed the host.
      let kvmFailed: EngineError | undefined;
      void vm.kvmFailure.then((error) => {
        if (outcome !== undefined) return;
        kvmFailed = error;
        decide({ passed: false, code: 'BOOT_VM_STOPPED', message: error.message });
      });
      const onAbort = (): void => decide({ passed: false, code: 'BOOT_TIMEOUT', message: 'interrupted' });
      options.signal?.addEventListener('abort', onAbort, { once: true });
      if (options.signal?.aborted) onAbort();
      if (expect.kind === 'agent') {
        void (async () => {
          while (outcome === undefined) {
            try {
              agent ??= await GuestAgentClient.connect(join(journal.dir, 'qga.sock'));
              await agent.sync(2000);
              await agent.execute('guest-ping', undefined, 5000);
              checks.agentPing = true;
              const listed = await agent.execute<{ mountpoint: string; type: string; name: string }[]>('guest-get-fsinfo', undefined, 10_000);
              const mounted = listed.filter((f) => typeof f.mountpoint === 'string' && f.mountpoint !== '');
              if (mounted.length > 0) {
                checks.filesystems = mounted.map((f) => ({ mountpoint: f.mountpoint, type: f.type, device: f.name }));
                decide({ passed: true });
              } else {
                checks.filesystems = [];
                await new Promise((r) => setTimeout(r, 1000));
              }
            } catch {
              // Not up yet (or not at all): try again while the test lasts. The pause is a timer, not a
              // microtask: a connection QEMU closed fails at once, and a loop of those would starve the
              // event loop (QEMU's exit, signals, the timeout would never be seen).
              if (!vm!.running || agent?.closed) return;
              await new Promise((r) => setTimeout(r, 250));
            }
          }
        })().catch(() => undefined);
      }
      const result = await settled;
      const proofOfLifeMs = result.passed ? Math.round(performance.now() - startedAt) : null;
      clearTimeout(timer);
      options.signal?.removeEventListener('abort', onAbort);
      interruption.check();
      if (kvmFailed) throw kvmFailed;

      // Power off: the agent's guest-shutdown when it answers, then quit; the writes go with the overlay.
      if (agent && checks.agentPing === true && vm.running) agent.shutdown();
      await vm.stop(agent && checks.agentPing === true ? SHUTDOWN_GRACE_MS : 0, options.signal);
      await follower.stop();
      interruption.check();
      const ended = new Date();
      const failed = result.passed ? undefined : result;
      let consoleLogPath: string | null = null;
      let attachments: BootVerification['attachments'] = [];
      if (failed) {
        const logDir = options.logDir ?? join(defaultCacheRoot(), 'boot-logs');
        await mkdir(logDir, { recursive: true, mode: 0o700 });
        consoleLogPath = join(logDir, `${backup.id}-${started.toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z')}-console.log`);
        await copyFile(consoleFile, consoleLogPath).catch(() => (consoleLogPath = null));
        const tail = await fileTail(consoleFile, CONSOLE_ATTACHMENT_LIMIT);
        attachments = [{ name: 'console', mediaType: 'text/plain', data: tail.text.split('\n').map(cleanLine).join('\n') }];
      }
      const record: BootVerification = {
        version: 1,
        kind: 'boot',
        backup: backup.id,
        started: started.toISOString(),
        ended: ended.toISOString(),
        result: failed ? 'failed' : 'passed',
        reason: failed ? { code: failed.code, message: failed.message } : null,
        proofOfLifeMs,
        checks,
        accelerator,
        machine: target.machine,
        firmware: target.firmware,
        memoryBytes,
        qemuVersion: version,
        engineVersion: ENGINE_VERSION,
        hostname: hostname(),
        consoleLogPath,
        attachments,
      };
      await closeAll();
      const key = await commit(options, record);
      await journal.end();
      return { record, key, cleaned: cleanedBefore };
    } catch (error) {
      await closeAll();
      await journal.end();
      if (options.signal?.aborted) throw interruption.error();
      throw error;
    }

    async function closeAll(): Promise<void> {
      if (vm?.running) {
        vm.kill();
        await vm.exited;
      }
      agent?.close();
      await follower?.stop().catch(() => undefined);
      await handle?.close();
    }
  }
}

/** The newest backup (of `name`), by start time. */
async function latestBackup(options: BootVerifyOptions): Promise<string> {
  const repo = await Repository.open(options.repo, { access: 'read', passphrase: options.passphrase, manyWriters: true });
  try {
    const { backups } = await repo.listBackups();
    const chosen = options.name === undefined ? backups : backups.filter((b: BackupRecord) => nameMatches(b.name, options.name!));
    const newest = chosen[chosen.length - 1];
    if (!newest) throw new BackupNotFoundError(options.name === undefined ? 'the latest backup (the repository has none)' : `the latest backup named ${options.name}`);
    return newest.id;
  } finally {
    await repo.close();
  }
}

async function commit(options: BootVerifyOptions, record: BootVerification): Promise<string> {
  const repo = await Repository.open(options.repo, { access: 'exclusive', command: 'verify', passphrase: options.passphrase, manyWriters: true, signal: options.signal });
  try {
    return await repo.commitVerification(record);
  } finally {
    await repo.close();
  }
}
