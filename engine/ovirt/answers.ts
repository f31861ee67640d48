/**
 * The oVirt answers the flows read, each decoded into what the flow needs (element names from oVirt's API
 * model, types/<Name>.java; test/ovirt-contract checks every name read here). An answer that lacks what a
 * flow cannot do without (an id, a size) is an OvirtFaultError naming the request — never an undefined id
 * sent back to oVirt, a NaN size, or a TypeError. Optional fields stay optional; values are compared with
 * vocabulary.ts by the flows.
 */
import { OvirtFaultError } from '../errors.js';
import { CheckpointState } from './vocabulary.js';
import { attribute, child, children, text, type XmlElement } from './xml.js';

/** The answer of `what` (e.g. "GET vms/123/checkpoints") lacks something: HTTP 200, and what is missing. */
function incomplete(what: string, missing: string): OvirtFaultError {
  return new OvirtFaultError(what, 200, `the answer ${missing}`, '');
}

function idOf(element: XmlElement | undefined, what: string, of: string): string {
  const id = attribute(element, 'id');
  if (id === undefined || id === '') throw incomplete(what, `names no ${of} id`);
  return id;
}

/** A size in bytes: a non-negative whole number within 2^53 (oVirt sends them as decimal text). */
function bytesOf(value: string | undefined, what: string, of: string): number {
  const size = value !== undefined && /^\d{1,16}$/.test(value) ? Number(value) : Number.NaN;
  if (!Number.isSafeInteger(size)) throw incomplete(what, `gives no usable ${of} (${value === undefined ? 'none' : JSON.stringify(value.slice(0, 40))})`);
  return size;
}

/** A count of bytes that may be absent (a storage domain's free space): absent or unreadable is 0. */
function optionalBytes(value: string | undefined): number {
  return value !== undefined && /^\d{1,16}$/.test(value) ? Number(value) : 0;
}

export interface VmSummary {
  id: string;
  name: string | undefined;
}

/** GET vms?search=name=…: the VMs found (oVirt's search matches more loosely than equality: callers compare names). */
export function vmList(xml: XmlElement | undefined, what: string): VmSummary[] {
  return children(child(xml, 'vms'), 'vm').map((vm) => ({ id: idOf(vm, what, 'VM'), name: text(vm, 'name') }));
}

export interface VmDetails {
  status: string | undefined;
  clusterId: string | undefined;
  /** The OVF of `all_content=true` (initialization/configuration/data). */
  ovf: string | undefined;
}

export function vmOf(xml: XmlElement | undefined): VmDetails {
  const vm = child(xml, 'vm');
  return { status: text(vm, 'status'), clusterId: attribute(child(vm, 'cluster'), 'id'), ovf: ovfOf(vm) };
}

function ovfOf(element: XmlElement | undefined): string | undefined {
  return text(child(child(element, 'initialization'), 'configuration'), 'data');
}

/** The engine's version (GET the API root: api/product_info/version): [major, minor, revision], 0 when absent. */
export function productVersion(xml: XmlElement | undefined): [number, number, number] {
  const version = child(child(child(xml, 'api'), 'product_info'), 'version');
  const number = (value: string | undefined): number => (value !== undefined && /^\d{1,4}$/.test(value) ? Number(value) : 0);
  return [number(text(version, 'major')), number(text(version, 'minor')), number(text(version, 'revision'))];
}

export interface ClusterSummary {
  id: string | undefined;
  name: string | undefined;
  version: [number, number];
  dataCenter: string | undefined;
}

/** A cluster (from GET clusters/{id}, or one of GET clusters?search=…), its version as numbers (0 when absent). */
export function clusterSummary(cluster: XmlElement | undefined): ClusterSummary {
  const version = child(cluster, 'version');
  const number = (value: string | undefined): number => (value !== undefined && /^\d{1,4}$/.test(value) ? Number(value) : 0);
  return {
    id: attribute(cluster, 'id'),
    name: text(cluster, 'name'),
    version: [number(text(version, 'major')), number(text(version, 'minor'))],
    dataCenter: attribute(child(cluster, 'data_center'), 'id'),
  };
}

export function clusterOf(xml: XmlElement | undefined): ClusterSummary {
  return clusterSummary(child(xml, 'cluster'));
}

export function clusterList(xml: XmlElement | undefined): ClusterSummary[] {
  return children(child(xml, 'clusters'), 'cluster').map(clusterSummary);
}

export interface DiskAttachment {
  /** The attached disk's id (the attachment's own id is the disk's, too). */
  diskId: string;
  active: boolean;
  logicalName: string | undefined;
}

function attachmentOf(attachment: XmlElement | undefined, what: string): DiskAttachment {
  const named = attribute(child(attachment, 'disk'), 'id');
  const diskId = named !== undefined && named !== '' ? named : idOf(attachment, what, 'disk attachment');
  return { diskId, active: text(attachment, 'active') === 'true', logicalName: text(attachment, 'logical_name') };
}

export function diskAttachmentList(xml: XmlElement | undefined, what: string): DiskAttachment[] {
  return children(child(xml, 'disk_attachments'), 'disk_attachment').map((a) => attachmentOf(a, what));
}

export function diskAttachmentOf(xml: XmlElement | undefined, what: string): DiskAttachment {
  return attachmentOf(child(xml, 'disk_attachment'), what);
}

export interface DiskSummary {
  id: string;
  /** The alias (the disk's name in oVirt's UI), else its name, else its id. */
  alias: string;
  size: number;
}

function diskSummary(disk: XmlElement | undefined, id: string, what: string): DiskSummary {
  return { id, alias: text(disk, 'alias') ?? text(disk, 'name') ?? id, size: bytesOf(text(disk, 'provisioned_size'), what, `provisioned_size for disk ${id}`) };
}

/** GET disks/{id}: the disk asked for. */
export function diskOf(xml: XmlElement | undefined, what: string, id: string): DiskSummary {
  return diskSummary(child(xml, 'disk'), id, what);
}

/** A disk's status only (while it is being created or after an upload). */
export function diskStatus(xml: XmlElement | undefined): string | undefined {
  return text(child(xml, 'disk'), 'status');
}

/** GET vms/{id}/snapshots/{id}/disks: the disks of a snapshot. */
export function diskList(xml: XmlElement | undefined, what: string): DiskSummary[] {
  return children(child(xml, 'disks'), 'disk').map((d) => diskSummary(d, idOf(d, what, 'disk'), what));
}

export interface SnapshotSummary {
  id: string;
  description: string | undefined;
  status: string | undefined;
  ovf: string | undefined;
}

function snapshotSummary(snapshot: XmlElement | undefined, what: string): SnapshotSummary {
  return { id: idOf(snapshot, what, 'snapshot'), description: text(snapshot, 'description'), status: text(snapshot, 'snapshot_status'), ovf: ovfOf(snapshot) };
}

export function snapshotOf(xml: XmlElement | undefined, what: string): SnapshotSummary {
  return snapshotSummary(child(xml, 'snapshot'), what);
}

export function snapshotList(xml: XmlElement | undefined, what: string): SnapshotSummary[] {
  return children(child(xml, 'snapshots'), 'snapshot').map((s) => snapshotSummary(s, what));
}

export interface BackupSummary {
  id: string;
  phase: string | undefined;
  /** A hybrid backup's snapshot (cluster level 4.7+), named from the start. */
  snapshotId: string | undefined;
  /** The checkpoint this backup creates, known once it is ready. */
  toCheckpoint: string | undefined;
}

function backupSummary(backup: XmlElement | undefined, what: string): BackupSummary {
  return { id: idOf(backup, what, 'backup'), phase: text(backup, 'phase'), snapshotId: attribute(child(backup, 'snapshot'), 'id'), toCheckpoint: text(backup, 'to_checkpoint_id') };
}

export function backupOf(xml: XmlElement | undefined, what: string): BackupSummary {
  return backupSummary(child(xml, 'backup'), what);
}

/** A backup's phase only (polled by clean-up, which knows the id). */
export function backupPhase(xml: XmlElement | undefined): string | undefined {
  return text(child(xml, 'backup'), 'phase');
}

export function backupList(xml: XmlElement | undefined): { phase: string | undefined }[] {
  return children(child(xml, 'backups'), 'backup').map((b) => ({ phase: text(b, 'phase') }));
}

/** GET vms/{id}/backups/{id}/disks: each disk's backup_mode (set from cluster level 4.5). */
export function backupDiskModes(xml: XmlElement | undefined, what: string): Map<string, string | undefined> {
  return new Map(children(child(xml, 'disks'), 'disk').map((d) => [idOf(d, what, 'disk'), text(d, 'backup_mode')]));
}

export interface CheckpointSummary {
  id: string;
  /** `created` when oVirt does not say (before 4.5 there is no state). */
  state: string;
}

export function checkpointList(xml: XmlElement | undefined, what: string): CheckpointSummary[] {
  return children(child(xml, 'checkpoints'), 'checkpoint').map((c) => ({ id: idOf(c, what, 'checkpoint'), state: text(c, 'state') ?? CheckpointState.created }));
}

export interface StorageDomainSummary {
  id: string;
  name: string;
  type: string | undefined;
  status: string | undefined;
  /** Free bytes (0 when oVirt does not say). */
  available: number;
  /** The storage type (nfs, iscsi, fcp …). */
  storage: string | undefined;
}

export function storageDomainList(xml: XmlElement | undefined, what: string): StorageDomainSummary[] {
  return children(child(xml, 'storage_domains'), 'storage_domain').map((d) => {
    const id = idOf(d, what, 'storage domain');
    return { id, name: text(d, 'name') ?? id, type: text(d, 'type'), status: text(d, 'status'), available: optionalBytes(text(d, 'available')), storage: text(child(d, 'storage'), 'type') };
  });
}

export interface TransferSummary {
  id: string;
  phase: string | undefined;
  transferUrl: string | undefined;
  proxyUrl: string | undefined;
}

export function transferOf(xml: XmlElement | undefined, what: string): TransferSummary {
  const transfer = child(xml, 'image_transfer');
  return { id: idOf(transfer, what, 'image transfer'), phase: text(transfer, 'phase'), transferUrl: text(transfer, 'transfer_url'), proxyUrl: text(transfer, 'proxy_url') };
}

/** The id of what a POST created (a disk, a VM, a snapshot, a backup, a transfer): `root` is its element. */
export function createdId(xml: XmlElement | undefined, root: string, what: string, of: string): string {
  return idOf(child(xml, root), what, of);
}

export interface EventSummary {
  id: number;
  code: number;
  description: string;
}

/** GET events: the engine's audit log, newest first (types/Event.java; unreadable ids and codes are 0). */
export function eventList(xml: XmlElement | undefined): EventSummary[] {
  const number = (value: string | undefined): number => (value !== undefined && /^\d{1,15}$/.test(value) ? Number(value) : 0);
  return children(child(xml, 'events'), 'event').map((e) => ({ id: number(attribute(e, 'id')), code: number(text(e, 'code')), description: text(e, 'description') ?? '' }));
}
