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
 * VM), and `engine ovirt cleanup` finishes that after a crash.
 */
import { Journal, type JournalEntry } from '../../repo-format/journal.js';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import type { BackupRecord, DiskRecord } from '../../repo-format/backup-record.js';
import { showBackup } from '../catalogue/catalogue.js';
import { restore } from '../restore/restore.js';
import { runTool } from '../cbt/run-tool.js';
import { readCaFile, type OvirtClient, type OvirtClientOptions } from './client.js';
import { attribute, child, children, text } from './xml.js';
import { ImageioTarget } from './imageio-target.js';
import { cancelTransfer, finalizeTransfer, startTransfer } from './transfers.js';
import { OvirtFaultError } from '../errors.js';
import { undo, undoCreated, withOvirt } from './cleanup.js';
import { clusterByName, clusterOfVm, findDevice, isNotFound, requireRunning, vmIdByName, type OvirtCluster, type OvirtDisk, type Wait } from './common.js';
import { ovfDiskPlacements } from './ovf.js';
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

function ovirtMetadata(record: BackupRecord): { ovf: string; disks: OvirtDisk[] } {
  const ovf = record.attachments.find((a) => a.name === 'ovf')?.data;
  const meta = record.attachments.find((a) => a.name === 'ovirt-vm')?.data;
  if (!ovf || !meta) throw new InvalidArgumentError(`backup ${record.id} was not made from oVirt: it keeps no OVF`);
  return { ovf, disks: (JSON.parse(meta) as { disks: OvirtDisk[] }).disks };
}

/**
 * The qcow2 size the restore point needs, computed as the SDK's upload example does with `qemu-img
 * measure` (examples/upload_disk.py: `initial_size` = measure's `required`): the metadata of an empty qcow2
 * image of this size, plus the data rounded up to whole clusters. The data is bounded by every block the
 * backup did not find zero, each counted as whole 64 KiB clusters; never more than a fully allocated image.
 */
export async function qcow2InitialSize(disk: DiskRecord, blockSize: number): Promise<number> {
  const measured = JSON.parse(await runTool('qemu-img', ['measure', '-O', 'qcow2', '--size', String(disk.size), '--output', 'json'])) as { required: number; 'fully-allocated': number };
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
  const domains = children(child((await client.get(`datacenters/${cluster.dataCenter}/storagedomains`)).xml, 'storage_domains'), 'storage_domain').filter((d) => text(d, 'type') === StorageDomainType.data);
  const describe = (d: (typeof domains)[number]): StorageChoice => {
    const storage = text(child(d, 'storage'), 'type');
    return { id: attribute(d, 'id')!, name: text(d, 'name') ?? attribute(d, 'id')!, block: storage === StorageType.iscsi || storage === StorageType.fcp };
  };
  const available = (d: (typeof domains)[number]): number => Number(text(d, 'available') ?? 0);
  if (name !== undefined) {
    const found = domains.find((d) => text(d, 'name') === name);
    if (!found) throw new InvalidArgumentError(`oVirt has no data storage domain "${name}" in the data centre of cluster ${cluster.name}`);
    if (text(found, 'status') !== StorageDomainStatus.active) throw new InvalidArgumentError(`storage domain "${name}" is ${text(found, 'status') ?? 'in no known state'}, not active`);
    if (available(found) < needed) throw new InvalidArgumentError(`storage domain "${name}" has ${available(found)} bytes free, the restore needs up to ${needed}`);
    return describe(found);
  }
  const active = domains.filter((d) => text(d, 'status') === StorageDomainStatus.active).sort((a, b) => available(b) - available(a));
  if (active.length === 0) throw new InvalidArgumentError(`the data centre of cluster ${cluster.name} has no active data storage domain`);
  if (available(active[0]!) < needed) throw new InvalidArgumentError(`no active data storage domain of cluster ${cluster.name}'s data centre has ${needed} bytes free (the most: ${available(active[0]!)} on "${text(active[0], 'name')}")`);
  return describe(active[0]!);
}

export async function ovirtRestoreVm(options: OvirtRestoreOptions): Promise<OvirtRestoreResult> {
  if ((options.newVm === undefined) === (options.toVm === undefined)) throw new InvalidArgumentError('restore to oVirt needs either newVm or toVm');
  if (options.toVm !== undefined && options.disk === undefined) throw new InvalidArgumentError('a restore into an existing VM (toVm) restores one disk: name it (disk)');
  const via = options.via ?? 'appliance';
  if (via === 'appliance' && !options.appliance) throw new InvalidArgumentError("restore through the appliance needs the appliance's name (or via: 'transfer')");
  const notice = options.onNotice ?? (() => undefined);
  const wait: Wait = { timeoutMs: options.timeoutMs ?? 600_000, intervalMs: options.pollMs ?? 1000 };
  const record = await showBackup(options.repo, options.backupId, { passphrase: options.passphrase });
  const { ovf, disks: backedUp } = ovirtMetadata(record);
  const selected: { disk: DiskRecord; meta: OvirtDisk }[] = record.disks
    .filter((d) => options.disk === undefined || nameMatches(d.name, options.disk))
    .map((disk, i) => ({ disk, meta: backedUp.find((m) => m.alias === disk.name || m.id === disk.name) ?? backedUp[i]! }));
  if (selected.length === 0) throw new InvalidArgumentError(`backup ${record.id} has no disk "${options.disk}"`);
  const initialSizes = await Promise.all(selected.map(({ disk }) => qcow2InitialSize(disk, record.blockSize)));
  const placements = ovfDiskPlacements(ovf);
  const ca = options.ovirt.caFile ? await readCaFile(options.ovirt.caFile) : undefined;

  return withOvirt(options.repo, options.ovirt, wait, notice, async (client) => {
    const applianceId = via === 'appliance' ? await vmIdByName(client, options.appliance!) : '';
    if (via === 'appliance') await requireRunning(client, applianceId, options.appliance!);
    const targetVmId = options.toVm !== undefined ? await vmIdByName(client, options.toVm) : undefined;
    const cluster = targetVmId !== undefined ? await clusterOfVm(client, targetVmId) : await clusterByName(client, options.cluster ?? 'Default');
    const domain = await chooseStorageDomain(client, cluster, options.storageDomain, initialSizes.reduce((a, b) => a + b, 0));
    const journal = await Journal.create(options.repo, { flow: 'ovirt-restore', backup: record.id });
    const created: JournalEntry[] = [];
    const track = async (entry: JournalEntry): Promise<void> => {
      await journal.add(entry);
      created.push(entry);
    };
    const forget = async (entry: JournalEntry): Promise<void> => {
      await journal.remove((e) => e === entry);
      created.splice(created.indexOf(entry), 1);
    };
    let succeeded = false;
    try {
      const restored: (OvirtRestoreResult['disks'][number] & { original: string })[] = [];
      for (const [i, { disk, meta }] of selected.entries()) {
        // 1. A new disk, same size, sparse qcow2, allocated for what the restore point holds; with the
        //    original id if asked (the OVF import then finds it).
        const keepId = options.keepDiskIds === true && options.newVm !== undefined;
        const answer = child(
          (await client.post('disks', 'disk', {
            ...(keepId ? { '@_id': meta.id } : {}),
            name: disk.name,
            provisioned_size: disk.size,
            initial_size: initialSizes[i]!,
            format: DiskFormat.cow,
            sparse: true,
            storage_domains: { storage_domain: { '@_id': domain.id } },
          })).xml,
          'disk',
        );
        const diskId = attribute(answer, 'id');
        if (!diskId) throw new OvirtFaultError('POST disks', 200, 'the answer names no disk id', '');
        const diskEntry: JournalEntry = { kind: 'disk', disk: diskId };
        await track(diskEntry);
        await client.waitFor(`disk ${diskId} to be created`, async () => {
          let status: string | undefined;
          try {
            status = text(child((await client.get(`disks/${diskId}`)).xml, 'disk'), 'status');
          } catch (error) {
            if (isNotFound(error)) throw new OvirtFaultError(`disk ${diskId}`, 404, 'oVirt removed the disk while creating it', 'see the engine events');
            throw error;
          }
          if (status === DiskStatus.illegal) throw new OvirtFaultError(`disk ${diskId}`, 200, 'oVirt could not create the disk (status illegal)', `on storage domain ${domain.name}`);
          return status === DiskStatus.ok ? true : undefined;
        }, wait);
        if (via === 'appliance') {
          // 2. Attach it to the appliance, writable, and find it by serial.
          const attachEntry: JournalEntry = { kind: 'attachment', vm: applianceId, disk: diskId };
          await track(attachEntry);
          await client.post(`vms/${applianceId}/diskattachments`, 'disk_attachment', { disk: { '@_id': diskId }, interface: DiskInterface.virtio, bootable: false, active: true });
          const device = await findDevice(client, applianceId, { id: diskId, alias: disk.name, size: disk.size }, options.deviceRoot ?? '/dev/disk/by-id', wait);
          // 3. Write the restore point (a new disk reads as zeros: zero blocks are skipped), flushed by restore.
          await restore({ repo: options.repo, passphrase: options.passphrase, backupId: record.id, disk: disk.name, target: { kind: 'device', path: device, blank: true }, signal: options.signal });
          // 4. Detach.
          await undo(client, attachEntry, wait, notice);
          await forget(attachEntry);
        } else {
          // 2–4 through imageio: an upload transfer, written with PUTs, flushed, finalized.
          let transferEntry: JournalEntry | undefined;
          const transfer = await startTransfer(client, { disk: diskId, direction: 'upload' }, async (id) => {
            transferEntry = { kind: 'transfer', transfer: id };
            await track(transferEntry);
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
          await forget(transferEntry!);
        }
        restored.push({ name: disk.name, id: diskId, size: disk.size, original: meta.id });
      }

      // 5. The VM: from the OVF (with overrides and new ids), or the existing one.
      let vm: { id: string; name: string };
      if (options.newVm !== undefined) {
        const answer = child(
          (await client.post('vms', 'vm', {
            name: options.newVm,
            cluster: { '@_id': cluster.id },
            // Without regenerate_ids oVirt keeps the OVF's VM id and refuses it while the original VM exists
            // (ImportVmCommandBase.validateNoDuplicateVm: 409). Only a disaster recovery keeps the ids.
            initialization: { configuration: { type: ConfigurationType.ovf, data: ovf }, regenerate_ids: options.keepDiskIds !== true },
          })).xml,
          'vm',
        );
        const vmId = attribute(answer, 'id');
        if (!vmId) throw new OvirtFaultError('POST vms', 200, 'the answer names no VM id', '');
        vm = { id: vmId, name: options.newVm };
        await track({ kind: 'vm', vm: vm.id });
      } else {
        vm = { id: targetVmId!, name: options.toVm! };
      }
      // 6. Attach what the import did not (everything, unless the original disk ids were kept), as the OVF
      //    had each disk: its interface and, for a new VM, its boot flag.
      const attached = new Set(children(child((await client.get(`vms/${vm.id}/diskattachments`)).xml, 'disk_attachments'), 'disk_attachment').map((a) => attribute(a, 'id')));
      for (const [i, disk] of restored.entries()) {
        if (attached.has(disk.id)) continue;
        const placement = placements.get(disk.original);
        if (!placement) notice(`the backup's OVF does not describe disk ${disk.name}: attached as virtio${options.newVm !== undefined && i === 0 ? ', bootable' : ''}`);
        await client.post(`vms/${vm.id}/diskattachments`, 'disk_attachment', {
          disk: { '@_id': disk.id },
          interface: placement?.interface ?? DiskInterface.virtio,
          bootable: options.newVm !== undefined && (placement ? placement.bootable : i === 0),
          active: true,
        });
      }
      succeeded = true;
      return { backup: record.id, vm, disks: restored.map(({ name, id, size }) => ({ name, id, size })) };
    } finally {
      if (succeeded) {
        // The disks and the VM are the result: nothing to undo.
        await journal.remove(() => true);
      } else {
        // Undo in reverse: the new VM, then attachments, then disks.
        await undoCreated(client, journal, created, wait, notice);
      }
    }
  });
}
