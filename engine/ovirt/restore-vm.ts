/**
 * Restore of an oVirt backup:
 * create each disk (qcow2, sparse, same size, `initial_size` as `qemu-img measure` would give it — a sparse
 * volume on block storage is allocated up front and cannot grow while nothing runs it; optionally the
 * original disk ids, so that the OVF import attaches them by itself) on an active data domain of the
 * target cluster's data centre → write the restore point onto it, through the backup appliance (attach,
 * write the device, detach) or an imageio upload → create the VM from the saved OVF with new ids
 * (`regenerate_ids`: the original VM usually still exists) and overrides (name, cluster) → attach the disks
 * the import did not, with the interface and boot flag the OVF gives them.
 * Or: one disk of the backup into a new disk of an existing VM.
 *
 * Everything created is journaled; a failed restore removes what it created (disks, attachments, the new
 * VM), and `engine ovirt cleanup` finishes that after a crash. In the code, the phases in order:
 * planRestore → placeRestore → per disk createDisk and writeThroughAppliance / writeThroughImageio →
 * createVm → attachRestoredDisks → clean up (journal.clear or undoAll).
 */
import type { JournalEntry } from '../../repo-format/journal.js';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import type { BackupRecord, DiskRecord } from '../../repo-format/backup-record.js';
import { showBackup } from '../catalogue/catalogue.js';
import { restore } from '../restore/restore.js';
import { runToolJson } from '../cbt/run-tool.js';
import { readCaFile, type OvirtClient, type OvirtClientOptions } from './client.js';
import { createdId, diskAttachmentList, diskStatus, storageDomainList, type StorageDomainSummary } from './answers.js';
import { ImageioTarget } from './imageio-target.js';
import { cancelTransfer, finalizeTransfer, startTransfer } from './transfers.js';
import { InterruptedError, OvirtFaultError } from '../errors.js';
import { Interruption } from '../host/interrupt.js';
import { RunJournal, undo, withOvirt } from './cleanup.js';
import { clusterByName, clusterOfVm, findDevice, isNotFound, requireRunning, vmIdByName, type OvirtCluster, type OvirtDisk, type Wait } from './common.js';
import { ovfDiskPlacements, type OvfDiskPlacement } from './ovf.js';
import { ConfigurationType, DiskFormat, DiskInterface, DiskStatus, StorageDomainStatus, StorageDomainType, StorageType } from './vocabulary.js';
import type { Passphrase } from '../../repo-format/passphrase.js';
import { nameMatches } from '../../repo-format/names.js';

export interface OvirtRestoreOptions {
  repo: string;
  /** The passphrase of an encrypted repository. */
  passphrase?: Passphrase | undefined;
  ovirt: OvirtClientOptions;
  backupId: string;
  /** Write the disks through this backup appliance (attach, write the device, detach)… */
  appliance?: string | undefined;
  /** …or upload them through imageio transfers ('transfer'). */
  via?: 'appliance' | 'transfer' | undefined;
  /** A new VM from the backup's OVF… */
  newVm?: string | undefined;
  cluster?: string | undefined;
  /** …or one disk into a new disk of an existing VM. */
  toVm?: string | undefined;
  disk?: string | undefined;
  storageDomain?: string | undefined;
  /** Disaster recovery: the original disk ids, and the VM keeps the OVF's id (it must no longer exist). */
  keepDiskIds?: boolean | undefined;
  deviceRoot?: string | undefined;
  timeoutMs?: number | undefined;
  pollMs?: number | undefined;
  /** SIGINT/SIGTERM: the restore of a disk stops (ENGINE_INTERRUPTED), and what this run created in oVirt is removed. */
  signal?: AbortSignal | undefined;
  onNotice?: ((message: string) => void) | undefined;
}

export interface OvirtRestoreResult {
  backup: string;
  vm: { id: string; name: string };
  disks: { name: string; id: string; size: number }[];
}

/** What an oVirt backup keeps besides its disks: the VM's OVF and the disks as oVirt knew them. */
function ovirtMetadata(record: BackupRecord): { ovf: string; disks: OvirtDisk[] } {
  const ovf = record.attachments.find((a) => a.name === 'ovf')?.data;
  const meta = record.attachments.find((a) => a.name === 'ovirt-vm')?.data;
  if (!ovf || !meta) throw new InvalidArgumentError(`backup ${record.id} was not made from oVirt: it keeps no OVF`);
  let disks: unknown;
  try {
    disks = (JSON.parse(meta) as { disks?: unknown } | null)?.disks;
  } catch {
    disks = undefined;
  }
  const known = (d: unknown): d is OvirtDisk => typeof d === 'object' && d !== null && typeof (d as OvirtDisk).id === 'string' && typeof (d as OvirtDisk).alias === 'string';
  if (!Array.isArray(disks) || !disks.every(known)) throw new InvalidArgumentError(`backup ${record.id}'s ovirt-vm attachment does not list its disks: it cannot be restored to oVirt`);
  return { ovf, disks };
}

/**
 * The qcow2 size the restore point needs, computed as the SDK's upload example does with `qemu-img
 * measure` (examples/upload_disk.py: `initial_size` = measure's `required`): the metadata of an empty qcow2
 * image of this size, plus the data rounded up to whole clusters. The data is bounded by every block the
 * backup did not find zero, each counted as whole 64 KiB clusters; never more than a fully allocated image.
 */
export async function qcow2InitialSize(disk: DiskRecord, blockSize: number): Promise<number> {
  const measured = (await runToolJson('qemu-img', ['measure', '-O', 'qcow2', '--size', String(disk.size), '--output', 'json'])) as { required: number; 'fully-allocated': number };
  const cluster = 65536;
  const perBlock = Math.ceil(Math.max(blockSize, cluster) / cluster) * cluster;
  const data = Math.max(0, disk.stats.blocksTotal - disk.stats.blocksZero) * perBlock;
  return Math.min(measured.required + data, measured['fully-allocated']);
}

interface StorageChoice {
  id: string;
  name: string;
  block: boolean;
}

/**
 * The data domain the new disks go to: named, or the active data domain of the cluster's data centre with
 * the most free space. A domain's status exists only within a data centre (the top-level list shows at
 * most "unattached": BackendStorageDomainsResource.mapCollection), so the data centre's list is read.
 */
async function chooseStorageDomain(client: OvirtClient, cluster: OvirtCluster, name: string | undefined, needed: number): Promise<StorageChoice> {
  const domains = (await client.read(`datacenters/${cluster.dataCenter}/storagedomains`, storageDomainList)).filter((d) => d.type === StorageDomainType.data);
  const describe = (d: StorageDomainSummary): StorageChoice => ({ id: d.id, name: d.name, block: d.storage === StorageType.iscsi || d.storage === StorageType.fcp });
  if (name !== undefined) {
    const found = domains.find((d) => d.name === name);
    if (!found) throw new InvalidArgumentError(`oVirt has no data storage domain "${name}" in the data centre of cluster ${cluster.name}`);
    if (found.status !== StorageDomainStatus.active) throw new InvalidArgumentError(`storage domain "${name}" is ${found.status ?? 'in no known state'}, not active`);
    if (found.available < needed) throw new InvalidArgumentError(`storage domain "${name}" has ${found.available} bytes free, the restore needs up to ${needed}`);
    return describe(found);
  }
  const active = domains.filter((d) => d.status === StorageDomainStatus.active).sort((a, b) => b.available - a.available);
  if (active.length === 0) throw new InvalidArgumentError(`the data centre of cluster ${cluster.name} has no active data storage domain`);
  if (active[0]!.available < needed) throw new InvalidArgumentError(`no active data storage domain of cluster ${cluster.name}'s data centre has ${needed} bytes free (the most: ${active[0]!.available} on "${active[0]!.name}")`);
  return describe(active[0]!);
}

export async function ovirtRestoreVm(options: OvirtRestoreOptions): Promise<OvirtRestoreResult> {
  const via = checkRestoreOptions(options);
  const notice = options.onNotice ?? (() => undefined);
  const wait: Wait = { timeoutMs: options.timeoutMs ?? 600_000, intervalMs: options.pollMs ?? 1000 };
  const plan = await planRestore(options);
  return withOvirt(options.repo, options.ovirt, wait, notice, async (client) => {
    const place = await placeRestore(client, options, via, plan);
    const journal = await RunJournal.create(options.repo, { flow: 'ovirt-restore', backup: plan.record.id });
    let succeeded = false;
    // SIGINT/SIGTERM: checked before each disk and before the VM is made (a disk's own restore stops within
    // it); whatever the run created is then undone below, like after any failure, and said so.
    const interruption = new Interruption(options.signal, 'restore', () => 'what it created in oVirt was removed');
    try {
      const restored: RestoredDisk[] = [];
      for (const item of plan.disks) {
        interruption.check();
        const diskId = await createDisk(client, journal, { options, item, domain: place.domain }, wait);
        if (via === 'appliance') await writeThroughAppliance(client, journal, { options, plan, item, diskId, applianceId: place.applianceId }, wait, notice);
        else await writeThroughImageio(client, journal, { options, plan, item, diskId }, wait);
        restored.push({ name: item.disk.name, id: diskId, size: item.disk.size, original: item.meta.id });
      }
      interruption.check();
      const vm = await createVm(client, journal, options, plan.ovf, place);
      await attachRestoredDisks(client, vm, restored, plan.placements, options.newVm !== undefined, notice);
      succeeded = true;
      return { backup: plan.record.id, vm, disks: restored.map(({ name, id, size }) => ({ name, id, size })) };
    } catch (error) {
      // The restore of one disk says what it left of its target; here the whole run is undone instead.
      throw error instanceof InterruptedError ? interruption.error() : error;
    } finally {
      // The disks and the VM are the result: nothing to undo. Otherwise, in reverse: the new VM, then
      // attachments, then disks.
      if (succeeded) await journal.clear();
      else await journal.undoAll(client, wait, notice);
    }
  });
}

/** The options that must go together; the way the disks are written ('appliance' by default). */
function checkRestoreOptions(options: OvirtRestoreOptions): 'appliance' | 'transfer' {
  if ((options.newVm === undefined) === (options.toVm === undefined)) throw new InvalidArgumentError('restore to oVirt needs either newVm or toVm');
  if (options.toVm !== undefined && options.disk === undefined) throw new InvalidArgumentError('a restore into an existing VM (toVm) restores one disk: name it (disk)');
  const via = options.via ?? 'appliance';
  if (via === 'appliance' && !options.appliance) throw new InvalidArgumentError("restore through the appliance needs the appliance's name (or via: 'transfer')");
  return via;
}

/** One disk of the backup to restore, as recorded and as oVirt knew it, and the qcow2 size it needs. */
interface RestoreItem {
  disk: DiskRecord;
  meta: OvirtDisk;
  initialSize: number;
}

/** Phase 1, before oVirt is asked anything: the backup, its OVF, the disks to restore and their sizes. */
interface RestorePlan {
  record: BackupRecord;
  ovf: string;
  disks: RestoreItem[];
  placements: Map<string, OvfDiskPlacement>;
  ca: Buffer | undefined;
}

async function planRestore(options: OvirtRestoreOptions): Promise<RestorePlan> {
  const record = await showBackup(options.repo, options.backupId, { passphrase: options.passphrase });
  const { ovf, disks: backedUp } = ovirtMetadata(record);
  const selected = record.disks
    .filter((d) => options.disk === undefined || nameMatches(d.name, options.disk))
    .map((disk, i) => ({ disk, meta: backedUp.find((m) => m.alias === disk.name || m.id === disk.name) ?? backedUp[i]! }));
  if (selected.length === 0) throw new InvalidArgumentError(`backup ${record.id} has no disk "${options.disk}"`);
  const initialSizes = await Promise.all(selected.map(({ disk }) => qcow2InitialSize(disk, record.blockSize)));
  const disks = selected.map((item, i) => ({ ...item, initialSize: initialSizes[i]! }));
  const ca = options.ovirt.caFile ? await readCaFile(options.ovirt.caFile) : undefined;
  return { record, ovf, disks, placements: ovfDiskPlacements(ovf), ca };
}

/** Phase 2: where the restore goes in oVirt: the appliance, the target VM (--to-vm), the cluster, the storage domain. */
interface RestorePlace {
  applianceId: string;
  targetVmId: string | undefined;
  cluster: OvirtCluster;
  domain: StorageChoice;
}

async function placeRestore(client: OvirtClient, options: OvirtRestoreOptions, via: 'appliance' | 'transfer', plan: RestorePlan): Promise<RestorePlace> {
  const applianceId = via === 'appliance' ? await vmIdByName(client, options.appliance!) : '';
  if (via === 'appliance') await requireRunning(client, applianceId, options.appliance!);
  const targetVmId = options.toVm !== undefined ? await vmIdByName(client, options.toVm) : undefined;
  const cluster = targetVmId !== undefined ? await clusterOfVm(client, targetVmId) : await clusterByName(client, options.cluster ?? 'Default');
  const domain = await chooseStorageDomain(client, cluster, options.storageDomain, plan.disks.reduce((sum, d) => sum + d.initialSize, 0));
  return { applianceId, targetVmId, cluster, domain };
}

/**
 * Phase 3, per disk: a new disk, same size, sparse qcow2, allocated for what the restore point holds; with
 * the original id if asked (the OVF import then finds it). Journaled as soon as its id is known; waited for
 * until oVirt has made it.
 */
async function createDisk(client: OvirtClient, journal: RunJournal, run: { options: OvirtRestoreOptions; item: RestoreItem; domain: StorageChoice }, wait: Wait): Promise<string> {
  const { options, item, domain } = run;
  const keepId = options.keepDiskIds === true && options.newVm !== undefined;
  const answer = (
    await client.post('disks', 'disk', {
      ...(keepId ? { '@_id': item.meta.id } : {}),
      name: item.disk.name,
      provisioned_size: item.disk.size,
      initial_size: item.initialSize,
      format: DiskFormat.cow,
      sparse: true,
      storage_domains: { storage_domain: { '@_id': domain.id } },
    })
  ).xml;
  const diskId = createdId(answer, 'disk', 'POST disks', 'disk');
  await journal.track({ kind: 'disk', disk: diskId });
  await client.waitFor(`disk ${diskId} to be created`, async () => {
    let status: string | undefined;
    try {
      status = await client.read(`disks/${diskId}`, diskStatus);
    } catch (error) {
      if (isNotFound(error)) throw new OvirtFaultError(`disk ${diskId}`, 404, 'oVirt removed the disk while creating it', 'see the engine events');
      throw error;
    }
    if (status === DiskStatus.illegal) throw new OvirtFaultError(`disk ${diskId}`, 200, 'oVirt could not create the disk (status illegal)', `on storage domain ${domain.name}`);
    return status === DiskStatus.ok ? true : undefined;
  }, wait);
  return diskId;
}

interface DiskWrite {
  options: OvirtRestoreOptions;
  plan: RestorePlan;
  item: RestoreItem;
  diskId: string;
}

/** Phase 4, through the appliance: attach the disk writable, find it by serial, write it, detach. */
async function writeThroughAppliance(client: OvirtClient, journal: RunJournal, run: DiskWrite & { applianceId: string }, wait: Wait, notice: (m: string) => void): Promise<void> {
  const { options, plan: { record }, item: { disk }, diskId, applianceId } = run;
  const attachEntry: JournalEntry = { kind: 'attachment', vm: applianceId, disk: diskId };
  await journal.track(attachEntry);
  await client.post(`vms/${applianceId}/diskattachments`, 'disk_attachment', { disk: { '@_id': diskId }, interface: DiskInterface.virtio, bootable: false, active: true });
  const device = await findDevice(client, applianceId, { id: diskId, alias: disk.name, size: disk.size }, options.deviceRoot ?? '/dev/disk/by-id', wait);
  // A new disk reads as zeros: zero blocks are skipped; restore flushes what it wrote.
  await restore({ repo: options.repo, passphrase: options.passphrase, backupId: record.id, disk: disk.name, target: { kind: 'device', path: device, blank: true }, signal: options.signal });
  await undo(client, attachEntry, wait, notice);
  await journal.forget(attachEntry);
}

/** Phase 4, through imageio: an upload transfer, written with PUTs, flushed, finalized. */
async function writeThroughImageio(client: OvirtClient, journal: RunJournal, run: DiskWrite, wait: Wait): Promise<void> {
  const { options, plan: { record, ca }, item: { disk }, diskId } = run;
  let transferEntry: JournalEntry | undefined;
  const transfer = await startTransfer(client, { disk: diskId, direction: 'upload' }, async (id) => {
    transferEntry = await journal.track({ kind: 'transfer', transfer: id });
  }, wait);
  try {
    const target = await ImageioTarget.open(transfer, ca);
    await restore({ repo: options.repo, passphrase: options.passphrase, backupId: record.id, disk: disk.name, target: { kind: 'custom', describe: target.path, open: async () => target }, signal: options.signal });
    await finalizeTransfer(client, { id: transfer.id, disk: diskId, direction: 'upload' }, wait);
  } catch (error) {
    // A failed upload is cancelled; oVirt then removes its disk (TransferDiskImageCommand.endWithFailure).
    await cancelTransfer(client, transfer.id, wait).catch(() => undefined);
    throw error;
  }
  await journal.forget(transferEntry!);
}

interface RestoredDisk {
  name: string;
  id: string;
  size: number;
  /** The disk's id in the backed-up VM (the OVF names disks by it). */
  original: string;
}

/** Phase 5: the VM, from the OVF with overrides and new ids (--new-vm), or the existing one (--to-vm). */
async function createVm(client: OvirtClient, journal: RunJournal, options: OvirtRestoreOptions, ovf: string, place: RestorePlace): Promise<{ id: string; name: string }> {
  if (options.newVm === undefined) return { id: place.targetVmId!, name: options.toVm! };
  const answer = (
    await client.post('vms', 'vm', {
      name: options.newVm,
      cluster: { '@_id': place.cluster.id },
      // Without regenerate_ids oVirt keeps the OVF's VM id and refuses it while the original VM exists
      // (ImportVmCommandBase.validateNoDuplicateVm: 409). Only a disaster recovery keeps the ids.
      initialization: { configuration: { type: ConfigurationType.ovf, data: ovf }, regenerate_ids: options.keepDiskIds !== true },
    })
  ).xml;
  const vm = { id: createdId(answer, 'vm', 'POST vms', 'VM'), name: options.newVm };
  await journal.track({ kind: 'vm', vm: vm.id });
  return vm;
}

/**
 * Phase 6: attach what the import did not (everything, unless the original disk ids were kept), as the OVF
 * had each disk: its interface and, for a new VM, its boot flag.
 */
async function attachRestoredDisks(client: OvirtClient, vm: { id: string }, restored: RestoredDisk[], placements: Map<string, OvfDiskPlacement>, newVm: boolean, notice: (m: string) => void): Promise<void> {
  const attached = new Set((await client.read(`vms/${vm.id}/diskattachments`, diskAttachmentList)).map((a) => a.diskId));
  for (const [i, disk] of restored.entries()) {
    if (attached.has(disk.id)) continue;
    const placement = placements.get(disk.original);
    if (!placement) notice(`the backup's OVF does not describe disk ${disk.name}: attached as virtio${newVm && i === 0 ? ', bootable' : ''}`);
    await client.post(`vms/${vm.id}/diskattachments`, 'disk_attachment', {
      disk: { '@_id': disk.id },
      interface: placement?.interface ?? DiskInterface.virtio,
      bootable: newVm && (placement ? placement.bootable : i === 0),
      active: true,
    });
  }
}
