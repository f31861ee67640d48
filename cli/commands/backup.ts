/** engine backup: disks, images, libvirt domains and oVirt VMs; the flags become one engine call. */
import { Command, Option } from 'commander';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { forTerminal } from '../terminal.js';
import { createProgress } from '../progress.js';
import { backupJson, printBackup, printJson } from '../output.js';
import { engine } from '../engine-calls.js';
import { output, printNotice, interruptSignal } from '../context.js';
import * as opt from '../options.js';
import type { BackupRecord } from '../../repo-format/backup-record.js';
import { backupRequest, chainPolicy } from './backup-request.js';
import { backupBody, isRemote, refuseLocalOnly, remoteRepository, runRemote } from '../remote.js';

interface BackupCliOptions {
  repo?: string;
  passwordFile?: string;
  source?: string[];
  image?: string[];
  libvirt?: string;
  ovirt?: string;
  vm?: string;
  appliance?: string;
  deviceRoot?: string;
  ovirtCredentials?: string;
  caFile?: string;
  insecureHttp?: boolean;
  diskName?: string[];
  name?: string;
  full?: boolean;
  incremental?: boolean;
  differential?: boolean;
  auto?: boolean;
  json?: boolean;
  workers?: number;
  quiesce?: string | true;
  freezeTimeout?: number;
  hookTimeout?: number;
  preFreeze?: string;
  postThaw?: string;
  preFreezeHost?: string;
  postThawHost?: string;
}

export function registerBackupCommand(program: Command): void {
  program
    .command('backup')
    .description('back up one or more disks of a VM as one backup')
    .addOption(opt.repoOption())
    .option('--source <path|uri>', 'raw image, block device or NBD URI, read whole; repeat for each disk', opt.collect)
    .option('--image <qcow2>', "qcow2 image of a stopped VM: incremental and differential backups from its dirty bitmaps; repeat for each disk", opt.collect)
    .option('--libvirt <domain>', 'a running libvirt domain: all its disks, through checkpoints and a pull-mode backup')
    .addOption(new Option('--quiesce [mode]', "with --libvirt or --ovirt: freeze the guest's file systems through its guest agent at the backup's point in time; required (the default) fails the backup if it cannot, try falls back to crash-consistent and records why").choices(['required', 'try']))
    .addOption(new Option('--freeze-timeout <seconds>', 'with --quiesce: the longest the guest stays frozen; a watchdog thaws it then, even if the engine died (default: 10)').argParser(opt.integerParser('--freeze-timeout', 1, 600)))
    .addOption(new Option('--hook-timeout <seconds>', 'with --quiesce: the longest each hook may run (default: 60)').argParser(opt.integerParser('--hook-timeout', 1, 3600)))
    .option('--pre-freeze <command>', 'with --quiesce: a shell command run in the guest by its agent before the freeze')
    .option('--post-thaw <command>', 'with --quiesce: a shell command run in the guest by its agent after the thaw')
    .option('--pre-freeze-host <command>', 'with --quiesce: a shell command run on this host before the freeze (ENGINE_DOMAIN set)')
    .option('--post-thaw-host <command>', 'with --quiesce: a shell command run on this host after the thaw (ENGINE_DOMAIN set)')
    .option('--ovirt <url>', 'an oVirt engine (https://engine.example.org): back up --vm through its incremental backup API, or with --appliance through this backup appliance')
    .option('--vm <name>', 'with --ovirt: the VM to back up')
    .option('--appliance <name>', 'with --ovirt: the name of this backup appliance VM (the disk-attachment flow: full backups)')
    .addOption(new Option('--device-root <dir>', 'with --ovirt: where attached disks appear by serial').default('/dev/disk/by-id').argParser(opt.localPath('--device-root')))
    .addOption(opt.ovirtCredentialsOption())
    .addOption(new Option('--ca-file <pem>', "with --ovirt: the engine's CA certificate").argParser(opt.localPath('--ca-file')))
    .addOption(opt.insecureHttpOption())
    .option('--disk-name <name>', 'name of each disk in the backup, for every --source then every --image (default: the file name)', opt.collect)
    .option('--name <name>', 'name of the backup; a chain continues from the newest backup of the same name (default: the file name)')
    .addOption(new Option('--full', 'read every disk whole and start a new chain').conflicts(['incremental', 'differential', 'auto']))
    .addOption(new Option('--incremental', 'read the blocks changed since the previous backup').conflicts(['differential', 'auto']))
    .addOption(new Option('--differential', 'read the blocks changed since the last full backup').conflicts(['auto']))
    .option('--auto', 'incremental where a valid chain exists, full otherwise (the default)')
    .option('--json', 'print only the result, as JSON')
    .addOption(opt.workersOption('hash and compress the blocks read'))
    .addOption(opt.passwordFileOption())
    .action(async (opts: BackupCliOptions) => {
      output.json = opts.json === true;
      if (isRemote()) return remoteBackup(opts);
      const passphrase = await opt.loadPassphrase(opts.passwordFile);
      const record = opts.ovirt !== undefined ? await ovirtBackup({ ...opts, ovirt: opts.ovirt }, passphrase) : await plainBackup(opts, passphrase);
      if (output.json) printJson(backupJson(record));
      else printBackup(forTerminal(record));
    });
}

/** `engine --server URL backup …`: the same request, run by the server (cli/remote.ts). */
async function remoteBackup(opts: BackupCliOptions): Promise<void> {
  refuseLocalOnly({ ...opts }, ['passwordFile', 'freezeTimeout', 'hookTimeout', 'preFreeze', 'postThaw', 'preFreezeHost', 'postThawHost']);
  const repository = remoteRepository(opts.repo);
  if (opts.ovirt === undefined) return runRemote(backupBody(repository, backupRequest(opts), opts.workers));
  if (!opts.vm) throw new InvalidArgumentError('--ovirt needs --vm NAME (the VM to back up)');
  if (!opts.ovirtCredentials) throw new InvalidArgumentError("with --server, --ovirt needs --ovirt-credentials FILE: a file on the server's host");
  const quiesce = opts.quiesce === undefined ? undefined : opts.quiesce === 'try' ? 'try' : 'required';
  const ovirt = { url: opts.ovirt, vm: opts.vm, credentialsFile: opts.ovirtCredentials, caFile: opts.caFile, insecureHttp: opts.insecureHttp, appliance: opts.appliance, deviceRoot: opts.deviceRoot, quiesce };
  return runRemote({ kind: 'backup', repository, mode: chainPolicy(opts).mode, ...(opts.workers !== undefined ? { workers: opts.workers } : {}), ovirt: JSON.parse(JSON.stringify(ovirt)) as Record<string, unknown> });
}

/** The progress of a backup, disk by disk; `done` once the record is committed. */
function diskProgress(): { onProgress: (p: { disk: string; diskIndex: number; diskCount: number; bytesDone: number; bytesTotal: number }) => void; done: () => void } {
  const progress = createProgress({ json: output.json });
  return { onProgress: (p) => progress.update(`backup ${p.disk} (${p.diskIndex + 1}/${p.diskCount})`, p.bytesDone, p.bytesTotal), done: () => progress.done() };
}

/** --source, --image or --libvirt: one engine call with the typed request. */
async function plainBackup(opts: BackupCliOptions, passphrase: Buffer | undefined): Promise<BackupRecord> {
  const request = backupRequest(opts);
  const progress = diskProgress();
  const { record } = await engine.backup({ repo: opt.requireRepo(opts.repo), passphrase, ...request, workers: opts.workers, signal: interruptSignal(), onProgress: progress.onProgress, onNotice: printNotice });
  progress.done();
  return record;
}

/** --ovirt: the incremental backup API, or with --appliance the disk-attachment flow. */
async function ovirtBackup(opts: BackupCliOptions & { ovirt: string }, passphrase: Buffer | undefined): Promise<BackupRecord> {
  if ((opts.source ?? []).length + (opts.image ?? []).length > 0 || opts.libvirt !== undefined) {
    throw new InvalidArgumentError('--ovirt backs up a VM through its snapshot: do not combine it with --source, --image or --libvirt');
  }
  if (!opts.vm) throw new InvalidArgumentError('--ovirt needs --vm NAME (the VM to back up)');
  const hooks = [['--pre-freeze', opts.preFreeze], ['--post-thaw', opts.postThaw], ['--pre-freeze-host', opts.preFreezeHost], ['--post-thaw-host', opts.postThawHost], ['--hook-timeout', opts.hookTimeout]].filter(([, v]) => v !== undefined);
  if (hooks.length > 0) throw new InvalidArgumentError(`${hooks.map(([flag]) => flag).join(', ')}: hooks run with --libvirt only (oVirt freezes the guest itself, SPEC.md 11.3)`);
  if (opts.freezeTimeout !== undefined && opts.quiesce === undefined) throw new InvalidArgumentError('--freeze-timeout goes with --quiesce');
  const quiesce = opts.quiesce === undefined ? undefined : opts.quiesce === 'try' ? 'try' : 'required';
  const freezeTimeoutMs = opts.freezeTimeout === undefined ? undefined : opts.freezeTimeout * 1000;
  const progress = diskProgress();
  const common = { repo: opt.requireRepo(opts.repo), passphrase, ovirt: await opt.ovirtConnection(opts), vm: opts.vm, workers: opts.workers, signal: interruptSignal(), onProgress: progress.onProgress, onNotice: printNotice };
  if (opts.appliance !== undefined && (opts.incremental || opts.differential)) {
    throw new InvalidArgumentError('the disk-attachment flow (--appliance) makes full backups; leave out --appliance for incremental ones');
  }
  const { record } =
    opts.appliance !== undefined
      ? await engine.ovirtApplianceBackup({ ...common, appliance: opts.appliance, deviceRoot: opts.deviceRoot, quiesce, freezeTimeoutMs })
      : await engine.ovirtIncrementalBackup({ ...common, mode: chainPolicy(opts).mode, quiesce, freezeTimeoutMs });
  progress.done();
  return record;
}
