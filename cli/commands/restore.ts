/** engine restore: to files, devices, directories, NBD exports, qcow2 images and oVirt. */
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { Command, Option } from 'commander';
import { forTerminal } from '../terminal.js';
import { createProgress } from '../progress.js';
import { printJson, printRestore, restoreJson } from '../output.js';
import { engine } from '../engine-calls.js';
import { output, printNotice, interruptSignal } from '../context.js';
import * as opt from '../options.js';
import { checkOvirtRestoreFlags, restoreRequest } from './restore-request.js';
import { isRemote, refuseLocalOnly, remoteRepository, runRemote } from '../remote.js';

interface RestoreCliOptions {
  repo?: string;
  passwordFile?: string;
  disk?: string;
  to?: string;
  toQcow2?: string;
  onlyChanged?: boolean;
  sinceBitmap?: string;
  force?: boolean;
  ovirt?: string;
  newVm?: string;
  toVm?: string;
  cluster?: string;
  storageDomain?: string;
  keepDiskIds?: boolean;
  appliance?: string;
  deviceRoot?: string;
  via?: string;
  ovirtCredentials?: string;
  caFile?: string;
  insecureHttp?: boolean;
  json?: boolean;
  workers?: number;
  asOf?: number;
  live?: boolean;
  libvirt?: string;
  resume?: boolean;
  bandwidth?: number;
}

export function registerRestoreCommand(program: Command): void {
  program
    .command('restore')
    .description('restore a backup to a new raw file, an existing file or a block device')
    .addOption(opt.repoOption())
    .argument('[backup-id]', 'backup id or a unique prefix of it (not with --live --resume)')
    .option('--disk <name>', 'the disk to restore (needed when the backup has several, unless --to is a directory)')
    .option('--to <path|uri>', 'target: a new file (created sparse), an existing file or block device at least as large, a directory, or an NBD URI (nbd://host[:port]/export, nbd+unix:///export?socket=PATH) of an existing export')
    .option('--to-qcow2 <file>', 'restore into a new qcow2 image (created at the disk\'s size, written through qemu-nbd)')
    .option('--only-changed', 'rollback: read the existing target back and write only the blocks that differ from the backup')
    .option('--since-bitmap <name>', 'with --only-changed and an NBD target: write only the blocks this dirty bitmap (the checkpoint of a backup of this disk) and the maps say changed, without reading the target')
    .option('--force', 'overwrite what holds data: a block device with a filesystem, partition table or volume signature, same-named files in the directory restored into, the backup\'s own source')
    .option('--ovirt <url>', 'restore into oVirt through this backup appliance (with --new-vm or --to-vm)')
    .option('--new-vm <name>', 'with --ovirt: create this VM from the backup\'s OVF, with new disks holding the restore point')
    .option('--to-vm <name>', 'with --ovirt and --disk: restore one disk into a new disk of this existing VM')
    .option('--cluster <name>', 'with --new-vm: the cluster (default: Default)')
    .option('--storage-domain <name>', 'with --ovirt: where the new disks go (default: the active data domain with the most room in the data centre of the cluster)')
    .option('--keep-disk-ids', 'with --new-vm: give the new disks their original ids (the OVF import then attaches them itself)')
    .option('--appliance <name>', 'with --ovirt: the name of this backup appliance VM')
    .addOption(new Option('--device-root <dir>', 'with --ovirt: where attached disks appear by serial').default('/dev/disk/by-id').argParser(opt.localPath('--device-root')))
    .addOption(new Option('--via <how>', 'with --ovirt: write through the appliance, or upload through an imageio transfer').choices(['appliance', 'transfer']).default('appliance'))
    .addOption(opt.ovirtCredentialsOption())
    .option('--ca-file <pem>', "with --ovirt: the engine's CA certificate", opt.localPath('--ca-file'))
    .addOption(opt.insecureHttpOption())
    .option('--live', 'live restore: serve the backup over NBD, make each target a qcow2 backed by it, run the VM (--libvirt) at once and copy the data in underneath it (with --to PATH.qcow2 or a directory, or --libvirt)')
    .option('--libvirt <new-domain>', 'with --live: define and start this new domain from the backup\'s libvirt definition, its disks new qcow2 images in --to DIR (default /var/lib/libvirt/images)')
    .option('--resume', 'with --live and the same --to or --libvirt: finish a live restore whose engine was stopped or killed (the server started again if it died)')
    .addOption(new Option('--bandwidth <size>', 'with --live --libvirt: the most QEMU\'s stream copies per second (e.g. 50M)').argParser((v) => opt.sizeArgument('--bandwidth', v, 1024, 2 ** 40)))
    .option('--json', 'print only the result, as JSON')
    .addOption(opt.workersOption('read and check the chunks (decrypt, decompress, hash) before they are written'))
    .addOption(opt.passwordFileOption())
    .addOption(opt.asOfOption())
    .action(async (id: string | undefined, opts: RestoreCliOptions) => {
      output.json = opts.json === true;
      if (isRemote()) return remoteRestore(id, opts);
      const passphrase = await opt.loadPassphrase(opts.passwordFile);
      if (opts.asOf !== undefined && opts.ovirt !== undefined) throw new InvalidArgumentError('--as-of restores with --to or --to-qcow2, not into oVirt');
      if (opts.asOf !== undefined && (opts.live === true || opts.resume === true || opts.libvirt !== undefined)) throw new InvalidArgumentError('--as-of restores with --to or --to-qcow2, not live');
      if (opts.live === true || opts.resume === true || opts.libvirt !== undefined) return liveRestore(id, opts, passphrase);
      if (id === undefined) throw new InvalidArgumentError('give the backup id to restore');
      if (opts.ovirt !== undefined) await ovirtRestore(id, { ...opts, ovirt: opts.ovirt }, passphrase);
      else await plainRestore(id, opts, passphrase);
    });
}

/** `engine --server URL restore ID --to …`: --to or --to-qcow2, run by the server (cli/remote.ts). */
async function remoteRestore(id: string | undefined, opts: RestoreCliOptions): Promise<void> {
  refuseLocalOnly({ ...opts }, ['passwordFile', 'asOf', 'onlyChanged', 'sinceBitmap', 'ovirt', 'newVm', 'toVm', 'live', 'libvirt', 'resume', 'bandwidth']);
  if (id === undefined) throw new InvalidArgumentError('give the backup id to restore');
  const { target, write } = restoreRequest(opts);
  await runRemote({ kind: 'restore', repository: remoteRepository(opts.repo), backup: id, target, force: write.force, ...(opts.disk !== undefined ? { disk: opts.disk } : {}), ...(opts.workers !== undefined ? { workers: opts.workers } : {}) });
}

/** --to or --to-qcow2: one engine call with the typed request. */
async function plainRestore(id: string, opts: RestoreCliOptions, passphrase: Buffer | undefined): Promise<void> {
  const request = restoreRequest(opts);
  const progress = createProgress({ json: output.json });
  const result = await engine.restore({
    repo: opt.requireRepo(opts.repo),
    passphrase,
    backupId: id,
    disk: opts.disk,
    asOf: opts.asOf,
    ...request,
    workers: opts.workers,
    signal: interruptSignal(),
    onProgress: (p) => progress.update(`restore ${p.disk}`, p.bytesDone, p.bytesTotal),
  });
  progress.done();
  if (output.json) printJson(restoreJson(result));
  else printRestore(forTerminal(result));
}

/** --live: a VM (or an image) usable at once, its data copied in underneath (engine/restore/live-restore.ts). */
async function liveRestore(id: string | undefined, opts: RestoreCliOptions, passphrase: Buffer | undefined): Promise<void> {
  if (opts.live !== true) throw new InvalidArgumentError('--libvirt and --resume go with --live');
  if (opts.toQcow2 !== undefined || opts.onlyChanged || opts.ovirt !== undefined) throw new InvalidArgumentError('--live makes new qcow2 images: give --to PATH.qcow2 (or a directory) or --libvirt NEW-DOMAIN');
  if (opts.bandwidth !== undefined && opts.libvirt === undefined) throw new InvalidArgumentError('--bandwidth limits QEMU\'s stream: it goes with --libvirt');
  const progress = createProgress({ json: output.json });
  const common = {
    to: opts.libvirt === undefined ? opts.to : undefined,
    libvirt: opts.libvirt,
    bandwidth: opts.bandwidth,
    passphrase,
    signal: interruptSignal(),
    onNotice: printNotice,
    onProgress: (p: { disk: string; bytesDone: number; bytesTotal: number }) => progress.update(`hydrate ${p.disk}`, p.bytesDone, p.bytesTotal),
  };
  let result;
  if (opts.resume === true) {
    if (id !== undefined) throw new InvalidArgumentError('--resume finds the backup in the live restore\'s journal: leave out the backup id');
    result = await engine.liveRestoreResume(common);
  } else {
    if (id === undefined) throw new InvalidArgumentError('give the backup id to restore');
    result = await engine.liveRestore({ ...common, repo: opt.requireRepo(opts.repo), backupId: id, disk: opts.disk, imageDir: opts.libvirt !== undefined ? opts.to : undefined });
  }
  progress.done();
  if (output.json) printJson(result);
  else {
    const shown = forTerminal(result);
    const where = shown.domain !== null ? `domain ${shown.domain}` : shown.disks.map((d) => d.path).join(', ');
    const ready = shown.readyMs === null ? '' : `running after ${(shown.readyMs / 1000).toFixed(1)} s, `;
    process.stdout.write(`live-restored backup ${shown.backup} into ${where} (${ready}hydrated in ${(shown.hydrationMs / 1000).toFixed(1)} s${shown.resumed ? ', resumed' : ''}): ${shown.disks.map((d) => `${d.name} → ${d.path}`).join(', ')}\n`);
  }
}

/** --ovirt: a new VM from the backup's OVF, or one disk into an existing VM. */
async function ovirtRestore(id: string, opts: RestoreCliOptions & { ovirt: string }, passphrase: Buffer | undefined): Promise<void> {
  checkOvirtRestoreFlags(opts);
  const result = await engine.ovirtRestoreVm({
    repo: opt.requireRepo(opts.repo),
    passphrase,
    ovirt: await opt.ovirtConnection(opts),
    backupId: id,
    appliance: opts.appliance,
    via: opts.via === 'transfer' ? 'transfer' : 'appliance',
    newVm: opts.newVm,
    toVm: opts.toVm,
    disk: opts.disk,
    cluster: opts.cluster,
    storageDomain: opts.storageDomain,
    keepDiskIds: opts.keepDiskIds,
    deviceRoot: opts.deviceRoot,
    signal: interruptSignal(),
    onNotice: printNotice,
  });
  if (output.json) printJson(result);
  else {
    const shown = forTerminal(result);
    process.stdout.write(`restored backup ${shown.backup} into VM ${shown.vm.name} (${shown.vm.id}): ${shown.disks.map((d) => `${d.name} → disk ${d.id}`).join(', ')}\n`);
  }
}
