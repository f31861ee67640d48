/** Keeping a repository healthy: verify, prune, gc, repair. */
import { Command, Option } from 'commander';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { KEEP_RULES, policyIsEmpty, type RetentionPolicy } from '../../engine/retention/policy.js';
import { createProgress } from '../progress.js';
import { printBootVerification, printGc, printPrune, printRepair, printVerify } from '../output.js';
import { engine } from '../engine-calls.js';
import { output, printNotice, interruptSignal, printResult } from '../context.js';
import * as opt from '../options.js';
import { EXIT } from '../exit-codes.js';
import { isRemote, refuseLocalOnly, remoteRepository, runRemote } from '../remote.js';

export function registerMaintenanceCommands(program: Command): void {
  registerVerify(program);
  registerPrune(program);
  registerGc(program);
  registerRepair(program);
}

function registerVerify(program: Command): void {
  program
    .command('verify')
    .description('check the repository; exits 4 and names every problem it finds')
    .addOption(opt.repoOption())
    .option('--read-data', 're-read and re-hash every chunk of every pack')
    .addOption(opt.percentOption('--subset <percent>', 'with --read-data: read only this share of the packs (e.g. 10%), chosen by --seed', false))
    .option('--seed <text>', 'with --subset: what chooses the packs (default: random, printed)')
    .option('--json', 'print JSON')
    .addOption(opt.workersOption('re-read and check the chunks with --read-data'))
    .addOption(opt.passwordFileOption())
    .addOption(opt.asOfOption())
    .option('--boot [backup-id]', 'boot the backup in a throw-away QEMU VM and record whether it comes up (SPEC 9.2); with --latest, the newest backup')
    .option('--latest', 'with --boot: the newest backup (of --name, when given)')
    .option('--name <name>', 'with --boot --latest: the newest backup of this name')
    .addOption(new Option('--timeout <seconds>', 'with --boot: how long the guest has to show proof of life (default: 300)').argParser(opt.integerParser('--timeout', 1, 86_400)))
    .option('--memory <size>', "with --boot: the VM's memory (default: 1G)")
    .option('--expect-agent', 'with --boot: proof of life is the guest agent answering guest-ping and listing a mounted file system (the default)')
    .option('--expect-console <regex>', 'with --boot: proof of life is a console line matching REGEX')
    .option('--machine <type>', "with --boot: QEMU machine type (default: the backup's, else q35)")
    .addOption(new Option('--firmware <kind>', "with --boot: bios or uefi (default: the backup's, else bios)").choices(['bios', 'uefi']))
    .addOption(new Option('--accel <kind>', 'with --boot: auto (KVM when usable, TCG when KVM fails), kvm or tcg (default: $ENGINE_ACCEL, else auto)').choices(['auto', 'kvm', 'tcg']))
    .action(async (opts: VerifyFlags) => {
      output.json = opts.json === true;
      if (opts.boot !== undefined && opts.asOf !== undefined) throw new InvalidArgumentError('--as-of verifies the repository as it was; --boot records a boot test, a write: not together');
      if (opts.boot !== undefined && isRemote()) throw new InvalidArgumentError('--boot: not with --server (a local run only)');
      if (opts.boot !== undefined) return verifyBoot(opts);
      const bootOnly = (['latest', 'name', 'timeout', 'memory', 'expectAgent', 'expectConsole', 'machine', 'firmware', 'accel'] as const).filter((k) => opts[k] !== undefined);
      if (bootOnly.length > 0) throw new InvalidArgumentError(`--${bootOnly[0]!.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)} goes with --boot`);
      if ((opts.subset !== undefined || opts.seed !== undefined) && !opts.readData) throw new InvalidArgumentError('--subset and --seed choose which packs --read-data reads: give --read-data too');
      if (isRemote()) {
        refuseLocalOnly({ ...opts }, ['passwordFile', 'asOf']);
        return runRemote({ kind: 'verify', repository: remoteRepository(opts.repo), readData: opts.readData === true, ...JSON.parse(JSON.stringify({ subset: opts.subset, seed: opts.seed, workers: opts.workers })) });
      }
      const progress = createProgress({ json: output.json });
      const report = await engine.verify({
        repo: opt.requireRepo(opts.repo),
        passphrase: await opt.loadPassphrase(opts.passwordFile),
        readData: opts.readData,
        subset: opts.subset,
        seed: opts.seed,
        workers: opts.workers,
        asOf: opts.asOf,
        signal: interruptSignal(),
        onProgress: (p) => progress.update(p.phase, p.done, p.total, 'items'),
      });
      progress.done();
      await printResult(report, printVerify);
      if (!report.ok) process.exitCode = EXIT.integrity;
    });
}

interface VerifyFlags {
  repo?: string;
  asOf?: number;
  readData?: boolean;
  subset?: number;
  seed?: string;
  json?: boolean;
  workers?: number;
  passwordFile?: string;
  boot?: string | true;
  latest?: boolean;
  name?: string;
  timeout?: number;
  memory?: string;
  expectAgent?: boolean;
  expectConsole?: string;
  machine?: string;
  firmware?: 'bios' | 'uefi';
  accel?: 'auto' | 'kvm' | 'tcg';
}

/** `verify --boot`: exits 0 when the backup booted, 4 when it did not (the record says why). */
async function verifyBoot(opts: VerifyFlags): Promise<void> {
  if (opts.readData || opts.subset !== undefined || opts.seed !== undefined) throw new InvalidArgumentError('--boot boots one backup; --read-data, --subset and --seed check the repository: run them apart');
  if (opts.expectAgent && opts.expectConsole !== undefined) throw new InvalidArgumentError('give --expect-agent or --expect-console, not both');
  const latest = opts.latest === true;
  if (latest === (typeof opts.boot === 'string')) throw new InvalidArgumentError(latest ? '--boot --latest boots the newest backup: give no backup id with it' : '--boot needs a backup id, or --latest');
  if (opts.name !== undefined && !latest) throw new InvalidArgumentError('--name goes with --boot --latest');
  const result = await engine.verifyBoot({
    repo: opt.requireRepo(opts.repo),
    backupId: typeof opts.boot === 'string' ? opts.boot : undefined,
    latest,
    name: opts.name,
    timeoutSeconds: opts.timeout,
    memoryBytes: opts.memory === undefined ? undefined : opt.sizeArgument('--memory', opts.memory, 16 * 1024 * 1024, 1024 ** 4),
    expect: opts.expectConsole !== undefined ? { kind: 'console', regex: opts.expectConsole } : { kind: 'agent' },
    machine: opts.machine,
    firmware: opts.firmware,
    accelerator: opts.accel,
    passphrase: await opt.loadPassphrase(opts.passwordFile),
    signal: interruptSignal(),
    onLog: printNotice,
  });
  await printResult({ ...result.record, key: result.key }, printBootVerification);
  if (result.record.result !== 'passed') process.exitCode = EXIT.integrity;
}

function registerPrune(program: Command): void {
  const prunes = program
    .command('prune')
    .description('remove the backups a retention policy does not keep (per backup name); gc then reclaims their space')
    .addOption(opt.repoOption());
  for (const rule of KEEP_RULES) prunes.addOption(opt.countOption(rule));
  prunes
    .option('--dry-run', 'say what would be removed, remove nothing')
    .addOption(opt.passwordFileOption())
    .option('--json', 'print JSON')
    .action(async (opts: { repo?: string; dryRun?: boolean; json?: boolean; passwordFile?: string } & Record<string, unknown>) => {
      output.json = opts.json === true;
      const policy: RetentionPolicy = {};
      for (const rule of KEEP_RULES) {
        const value = opts[`keep${rule[0]!.toUpperCase()}${rule.slice(1)}`];
        if (typeof value === 'number') policy[rule] = value;
      }
      if (policyIsEmpty(policy)) throw new InvalidArgumentError('no --keep-* option given: prune would remove every unprotected backup; say what to keep');
      if (isRemote()) {
        refuseLocalOnly({ ...opts }, ['passwordFile']);
        return runRemote({ kind: 'prune', repository: remoteRepository(opts.repo), keep: policy, dryRun: opts.dryRun === true });
      }
      const report = await engine.prune({ repo: opt.requireRepo(opts.repo), policy, dryRun: opts.dryRun, passphrase: await opt.loadPassphrase(opts.passwordFile), signal: interruptSignal() });
      await printResult(report, printPrune);
    });
}

function registerGc(program: Command): void {
  program
    .command('gc')
    .description('delete chunks no backup references and rewrite sparse packs; safe while a backup runs')
    .addOption(opt.repoOption())
    .addOption(opt.percentOption('--rewrite-below <percent>', 'rewrite packs whose live share is under this (default 50%)', true))
    .option('--dry-run', 'say what would be deleted and rewritten, change nothing')
    .addOption(opt.passwordFileOption())
    .option('--json', 'print JSON')
    .action(async (opts: { repo?: string; rewriteBelow?: number; dryRun?: boolean; json?: boolean; passwordFile?: string }) => {
      output.json = opts.json === true;
      if (isRemote()) {
        refuseLocalOnly({ ...opts }, ['passwordFile']);
        return runRemote({ kind: 'gc', repository: remoteRepository(opts.repo), dryRun: opts.dryRun === true, ...(opts.rewriteBelow !== undefined ? { rewriteBelow: opts.rewriteBelow } : {}) });
      }
      // With --json stderr stays empty: what gc says (the lost packs of SPEC.md 19.8 among it) is in `notices`.
      const notices: string[] = [];
      const report = await engine.gc({
        repo: opt.requireRepo(opts.repo),
        passphrase: await opt.loadPassphrase(opts.passwordFile),
        rewriteBelow: opts.rewriteBelow,
        dryRun: opts.dryRun,
        signal: interruptSignal(),
        onNotice: (message) => {
          notices.push(message);
          printNotice(message);
        },
      });
      await printResult(output.json ? { ...report, notices } : report, printGc);
    });
}

function registerRepair(program: Command): void {
  program
    .command('repair')
    .description('re-read every frame, rebuild the index from the good ones, set damaged chunks aside; exits 4 if a backup still references damaged data')
    .addOption(opt.repoOption())
    .addOption(opt.passwordFileOption())
    .option('--json', 'print JSON')
    .addOption(opt.workersOption('re-read and check every frame', 'one per core'))
    .action(async (opts: { repo?: string; json?: boolean; workers?: number; passwordFile?: string }) => {
      output.json = opts.json === true;
      const progress = createProgress({ json: output.json });
      const report = await engine.repair({ repo: opt.requireRepo(opts.repo), passphrase: await opt.loadPassphrase(opts.passwordFile), workers: opts.workers, signal: interruptSignal(), onNotice: printNotice, onProgress: (p) => progress.update(p.phase, p.done, p.total, 'items') });
      progress.done();
      await printResult(report, printRepair);
      if (!report.ok) process.exitCode = EXIT.integrity;
    });
}
