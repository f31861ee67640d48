/**
 * An oVirt engine simulator, written from oVirt's own sources (the API model, the engine's REST layer and
 * BLL commands, ovirt-imageio, the Python SDK); BEHAVIOUR.md lists each behaviour with the file and commit
 * it follows. It serves real HTTP (or HTTPS), and everything under it is real: every disk is a qcow2 file,
 * a snapshot is a real qcow2 overlay (`qemu-img commit` merges it back), a checkpoint is a persistent dirty
 * bitmap `sim-<checkpoint id>` in the disk's image, a backup disk or an upload is a qemu-nbd export served by
 * imageio.ts, a disk on block storage lives in a fixed-size "logical volume" it cannot outgrow.
 *
 * The simulator answers as oVirt would, not as the engine under test would like: `to_checkpoint_id` only
 * once the backup has it, 404s with empty bodies, finalize refused outside `ready`, idle transfers
 * cancelled, cancelled uploads deleting their disk, OVF imports keeping the OVF's VM id unless asked not to.
 *
 * Attaching a disk to a running appliance VM makes its data readable the way the appliance would see a
 * hot-plugged virtio disk, at `<deviceRoot>/virtio-<first 20 characters of the disk id>`: an nbdfuse file
 * (libnbd-bin) serving the image through qemu-nbd. Detaching unmounts it.
 *
 * Faults to inject are listed in OvirtSim.faults. Runnable on its own: `npm run ovirt-sim` (main.ts).
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { randomUUID } from 'node:crypto';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { AddressInfo } from 'node:net';
import { XMLParser } from 'fast-xml-parser';
import { stopProcess } from '../../engine/host/process.js';
import { startImageio, type ImageioService } from './imageio.js';
import { readOvf, writeOvf } from './ovf.js';

/** oVirt's DiskInterface enum as the REST API spells it (types/DiskInterface.java). */
export type SimInterface = 'virtio' | 'virtio_scsi' | 'ide' | 'sata' | 'spapr_vscsi';

export interface SimDisk {
  id: string;
  /** The disk's (single) volume id: the OVF's `ovf:diskId`. */
  imageId: string;
  alias: string;
  size: number;
  format: 'cow' | 'raw';
  /** The active (writable) layer. */
  image: string;
  status: 'locked' | 'ok' | 'illegal';
  storageDomain: string;
  /** On block storage: the size of the logical volume holding the image (it cannot grow past it). */
  lvSize: number | undefined;
  /** Set while a backup holds the disk (types/Disk.java `backup_mode`, "visible only when the disk backup is in progress"). */
  backupMode: 'full' | 'incremental' | undefined;
}

export interface SimSnapshot {
  id: string;
  description: string;
  status: 'locked' | 'ok';
  /** Per disk id: the frozen image at snapshot time (the overlay's backing file). */
  frozen: Map<string, string>;
  ovf: string;
  removing: boolean;
  /** The guest's file systems were frozen when VDSM's snapshot job ran libvirt's snapshot (the API does not show it). */
  quiesced: boolean;
}

export interface SimAttachment {
  diskId: string;
  snapshotId: string | undefined;
  active: boolean;
  bootable: boolean;
  interface: SimInterface;
  device: string | undefined;
  fuse: ChildProcess | undefined;
}

export interface SimVm {
  id: string;
  name: string;
  status: 'up' | 'down';
  cluster: string;
  /** The OVF the VM was imported from, if it was. */
  importedOvf: string | undefined;
  /** The disks the VM owns (removed with it). */
  disks: string[];
  /** Every disk attached to the VM (its own ones and others, e.g. snapshot disks on the appliance). */
  attachments: Map<string, SimAttachment>;
  snapshots: Map<string, SimSnapshot>;
  checkpoints: SimCheckpoint[];
  /**
   * The QEMU guest agent: `running` freezes and thaws; `none`: not installed or not started (libvirt: "QEMU
   * guest agent is not connected"); `refuses`: it answers, but the freeze fails in the guest; `late`: the call
   * to VDSM times out (the engine's fault), and the agent's freeze lands `lateFreezeMs` later all the same (libvirt's
   * fsFreeze has no cancel: the command sits in the agent's channel); `stuck`: every thaw fails (VDSM's `nonresp`).
   */
  agent: 'running' | 'none' | 'refuses' | 'late' | 'stuck';
  /** A `late` agent's freeze landed (after its call had failed). */
  lateFreezeLanded?: boolean;
  /** The guest's file systems are frozen now. */
  frozen: boolean;
  /** How many freezes the guest carried out (VDSM's and the API's). */
  freezes: number;
  /**
   * How each snapshot of the VM was taken, in order (snapshots go; this stays): the guest already frozen when
   * VDSM's job began (`api`: through freezefilesystems), frozen by VDSM's job itself (`vdsm`), or not frozen.
   */
  snapshotsQuiesced: ('api' | 'vdsm' | 'no')[];
}

export interface SimCheckpoint {
  id: string;
  parentId: string | undefined;
  state: 'created' | 'invalid';
  creationDate: Date;
  /** The qcow2 disks the checkpoint covers (VmCheckpointDao.addDiskToCheckpoint). */
  disks: string[];
}

/** VmBackupPhase (ovirt-engine common/businessentities/VmBackupPhase.java), lower case. */
export type SimBackupPhase =
  | 'initializing'
  | 'creating_scratch_disks'
  | 'adding_bitmaps'
  | 'waiting_for_bitmaps'
  | 'starting'
  | 'ready'
  | 'finalizing'
  | 'finalizing_failure'
  | 'removing_snapshot'
  | 'succeeded'
  | 'failed';

export interface SimBackup {
  id: string;
  vmId: string;
  /** VmBackupType: live (VM up), cold (VM down), hybrid (cluster >= 4.7: a snapshot-based backup). */
  kind: 'live' | 'cold' | 'hybrid';
  phase: SimBackupPhase;
  from: string | undefined;
  /** The backup entity's to_checkpoint_id: unset until the checkpoint exists on the host. */
  to: string | undefined;
  /** The checkpoint this backup creates (known to the command from the start, not to the entity). */
  checkpointId: string;
  disks: string[];
  modes: Map<string, 'full' | 'incremental'>;
  exports: Map<string, { socket: string; pid: number }>;
  /** The "Auto-generated for Backup VM" snapshot of a hybrid backup. */
  snapshotId: string | undefined;
  stopped: boolean;
  /** `?require_consistency=true` was given (a live backup honours it; REST drops it for a hybrid one). */
  requireConsistency: boolean;
  /** The guest was frozen at the backup's point in time (backupBegin, or the hybrid backup's snapshot). */
  quiesced: boolean;
}

/** ImageTransferPhase (types/ImageTransferPhase.java), as the REST API spells it. */
export type SimTransferPhase =
  | 'unknown'
  | 'initializing'
  | 'transferring'
  | 'resuming'
  | 'paused_system'
  | 'paused_user'
  | 'cancelled_system'
  | 'cancelled_user'
  | 'finalizing_success'
  | 'finalizing_failure'
  | 'finalizing_cleanup'
  | 'finished_success'
  | 'finished_failure'
  | 'finished_cleanup';

export interface SimTransfer {
  id: string;
  diskId: string;
  /** The backup a download belongs to; empty for an upload. */
  backupId: string;
  direction: 'download' | 'upload';
  /** An upload's own writable export. */
  upload?: { socket: string; pid: number };
  phase: SimTransferPhase;
  ticket: string;
  /** Seconds (types/ImageTransfer.java `inactivity_timeout`); undefined: the engine's default. */
  inactivityTimeout: number | undefined;
  timeoutPolicy: 'legacy' | 'pause' | 'cancel';
  /** True once the session started (the URLs exist from then on). */
  started: boolean;
}

export interface SimRequest {
  method: string;
  /** Path and query, as received. */
  path: string;
  headers: IncomingMessage['headers'];
  body: string;
  status: number;
}

export interface SimEvent {
  /** Strictly increasing (MODEL services/EventsService.java List `from`). */
  id: number;
  code: number;
  description: string;
}

export interface SimOptions {
  /** Where disk images and the appliance's device files live. */
  dir: string;
  username?: string;
  password?: string;
  port?: number;
  /** How long one step of an asynchronous command takes (snapshot creation, a backup phase, …). */
  lockMs?: number;
  /** Serve the API and imageio over HTTPS with this key and certificate (PEM), as a real engine does. */
  tls?: { key: string; cert: string };
  /**
   * Serve imageio over plain http even when the API is https: not something oVirt does (TLS is always enabled
   * on the engine host's proxy, ovirt-engine packaging/setup/ovirt_engine_setup/ovirt_imageio/constants.py,
   * and "TLS is required for vdsm" on the hosts, vdsm's ovirt-imageio drop-in), but what a misconfigured
   * proxy or a forged answer offers; the engine must refuse to follow it (no downgrade).
   */
  imageioPlainHttp?: boolean;
  /** The engine version reported and followed: before 4.4.7 a finished transfer is deleted at once. */
  version?: string;
  /** TransferImageClientInactivityTimeoutInSeconds, in ms (default 60 s), for transfers that set none. */
  inactivityTimeoutMs?: number;
  /** vdsm's volume_utilization_chunk_mb in bytes (default 2560 MiB): a sparse block volume's size without initial_size. */
  blockChunkBytes?: number;
  /** Succeeded/FailedBackupCleanupTimeInMinutes and …ImageTransferCleanupTimeInMinutes, in ms (default 15 and 30 minutes). */
  purgeSucceededMs?: number;
  purgeFailedMs?: number;
}

export interface OvirtSim {
  url: string;
  /** imageio on the host (transfer_url) and on the engine host (proxy_url). */
  imageioUrl: string;
  imageioProxyUrl: string;
  imageio: ImageioService;
  backups: Map<string, SimBackup>;
  transfers: Map<string, SimTransfer>;
  deviceRoot: string;
  vms: Map<string, SimVm>;
  disks: Map<string, SimDisk>;
  clusters: Map<string, { id: string; name: string; version: [number, number]; dataCenter: string }>;
  dataCenters: Map<string, { id: string; name: string }>;
  storageDomains: Map<string, { id: string; name: string; type: 'data' | 'iso' | 'export'; storage: 'nfs' | 'iscsi' | 'fcp' | 'localfs'; dataCenter: string | undefined; status: 'active' | 'maintenance' | 'inactive'; available: number }>;
  requests: SimRequest[];
  events: SimEvent[];
  /** Tokens revoked through sso-logout. */
  loggedOut: string[];
  faults: {
    /** The next `count` requests matching method and path answer 409 with an oVirt conflict fault. */
    conflict(method: string, path: RegExp, count: number): void;
    /** Every token issued so far stops working (as after the engine's token lifetime). */
    expireTokens(): void;
    /** The next snapshot creation fails: the snapshot disappears while locked, as the engine reports it. */
    failNextSnapshot(): void;
    /** After `count` more API requests, every token expires (in the middle of a run). */
    expireTokensAfter(count: number): void;
    /** The next image transfer is stopped by the system as it starts (a download cancelled, an upload paused). */
    stopNextTransfer(): void;
    /** The next incremental backup of a running VM cannot redefine its checkpoints (event 10791). */
    failNextCheckpointRedefinition(): void;
    /** The next hybrid backup's snapshot cannot be removed at finalize (event 10813: a leftover). */
    failNextBackupSnapshotRemoval(): void;
    /**
     * A checkpoint's bitmap disappears from its disks' images while oVirt still lists the checkpoint and the
     * running VM's libvirt still has it defined (below cluster level 4.6 oVirt does not redefine, so does not
     * validate, a checkpoint libvirt already has): an incremental from it fails when the host starts the
     * backup (phase failed), and deleting it on the running VM fails (event 10798). Real: the bitmap is removed.
     */
    loseCheckpointBitmap(vm: SimVm, checkpointId: string): Promise<void>;
    /** Each GET of the data of this disk's download waits `ms` first (a slow disk). */
    slowReads(diskId: string, ms: number): void;
    /** The engine restarts: tokens are gone, running backups fail (and stop being monitored). */
    restartEngine(): Promise<void>;
    /** The engine restarts after `count` more API requests whose path matches. */
    restartEngineAfter(path: RegExp, count: number): void;
  };
  addVm(name: string, disks: { alias: string; size: string; active?: boolean; interface?: SimInterface; bootable?: boolean }[], status?: SimVm['status'], options?: { cluster?: string }): Promise<SimVm>;
  /** A new disk for an existing VM (a disk added between backups). */
  addDisk(vm: SimVm, alias: string, size: string): Promise<SimDisk>;
  addCluster(name: string, version: [number, number], dataCenter?: string): string;
  addDataCenter(name: string): string;
  addStorageDomain(spec: { name: string; storage: 'nfs' | 'iscsi' | 'fcp'; dataCenter?: string | undefined; status?: 'active' | 'maintenance' | 'inactive'; available?: number }): string;
  /** The qemu filename of a disk's image (a `json:` spec for a logical volume on block storage). */
  imageSpec(disk: SimDisk): string;
  stop(): Promise<void>;
}

export const STORAGE_DOMAIN_ID = '5e7d0f3a-0000-4000-8000-00000000da7a';
export const CLUSTER_ID = 'c1a55e00-0000-4000-8000-0000000000c1';
export const DATA_CENTER_ID = 'dc000000-0000-4000-8000-0000000000dc';
/** StorageConstants.BACKUP_VM_AUTO_GENERATED_SNAPSHOT_DESCRIPTION. */
export const BACKUP_SNAPSHOT_DESCRIPTION = 'Auto-generated for Backup VM';
const MiB = 1024 * 1024;
/** The one host the simulated VMs run on, as events name it. */
const HOST_NAME = 'sim-host-1';

function tool(command: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(command, args, (error, stdout, stderr) => (error ? reject(new Error(`${command} ${args.join(' ')}: ${stderr || error.message}`)) : resolve(stdout)));
  });
}

function xmlEscape(value: string): string {
  return value.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

export function faultXml(reason: string, detail: string): string {
  return `<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<fault>\n    <detail>${xmlEscape(detail)}</detail>\n    <reason>${xmlEscape(reason)}</reason>\n</fault>\n`;
}

const API = '/ovirt-engine/api';
const bodyParser = new XMLParser({ ignoreAttributes: false, attributeNamePrefix: '@_', parseTagValue: false, parseAttributeValue: false, trimValues: true, processEntities: true });
type Node = { [name: string]: string | Node | (string | Node)[] };

/** The parsed request body's root element (`<backup>…</backup>` → its children and attributes). */
function parseBody(xml: string, root: string): Node | undefined {
  if (!xml.trim()) return undefined;
  const parsed = bodyParser.parse(xml) as Node;
  const value = parsed[root];
  return typeof value === 'object' && !Array.isArray(value) ? value : value === '' ? {} : undefined;
}
function node(parent: Node | undefined, name: string): Node | undefined {
  const value = parent?.[name];
  const first = Array.isArray(value) ? value[0] : value;
  return typeof first === 'object' ? first : first === '' ? {} : undefined;
}
function nodes(parent: Node | undefined, name: string): Node[] {
  const value = parent?.[name];
  if (value === undefined) return [];
  return (Array.isArray(value) ? value : [value]).map((v) => (typeof v === 'object' ? v : {}));
}
function value(parent: Node | undefined, name: string): string | undefined {
  const v = parent?.[name];
  const first = Array.isArray(v) ? v[0] : v;
  if (typeof first === 'string') return first;
  const inner = first?.['#text'];
  return typeof inner === 'string' ? inner : undefined;
}
function id(element: Node | undefined): string | undefined {
  const v = element?.['@_id'];
  return typeof v === 'string' ? v : undefined;
}

const DISK_INTERFACES: Record<string, SimInterface> = { VirtIO: 'virtio', VirtIO_SCSI: 'virtio_scsi', IDE: 'ide', SATA: 'sata', SPAPR_VSCSI: 'spapr_vscsi' };
const OVF_INTERFACES = Object.fromEntries(Object.entries(DISK_INTERFACES).map(([k, v]) => [v, k])) as Record<SimInterface, string>;

/** BackupPhase as the REST API shows it (restapi types VmBackupMapper.map). */
function restPhase(phase: SimBackupPhase): string {
  switch (phase) {
    case 'initializing':
    case 'creating_scratch_disks':
    case 'adding_bitmaps':
    case 'waiting_for_bitmaps':
      return 'initializing';
    case 'finalizing':
    case 'finalizing_failure':
    case 'removing_snapshot':
      return 'finalizing';
    default:
      return phase;
  }
}

const versionAtLeast = (v: [number, number], major: number, minor: number): boolean => v[0] > major || (v[0] === major && v[1] >= minor);

export async function startOvirtSim(options: SimOptions): Promise<OvirtSim> {
  const username = options.username ?? 'admin@internal';
  const password = options.password ?? 'secret';
  const lockMs = options.lockMs ?? 300;
  const version = (options.version ?? '4.5.5').split('.').map(Number);
  /** VDSM before 4.4.4 ignores require_consistency (the engine's version stands for its hosts' here). */
  const honoursRequireConsistency = version[0]! > 4 || (version[0] === 4 && (version[1]! > 4 || (version[1] === 4 && (version[2] ?? 0) >= 4)));
  /** Engines before 4.4.7 delete a transfer's entity as soon as it ends (SDK helpers/imagetransfer.py). */
  const deletesFinishedTransfers = version[0]! < 4 || (version[0] === 4 && (version[1]! < 4 || (version[1] === 4 && (version[2] ?? 0) < 7)));
  const inactivityDefaultMs = options.inactivityTimeoutMs ?? 60_000;
  const blockChunk = options.blockChunkBytes ?? 2560 * MiB;
  const purgeSucceededMs = options.purgeSucceededMs ?? 15 * 60_000;
  const purgeFailedMs = options.purgeFailedMs ?? 30 * 60_000;
  const imagesDir = join(options.dir, 'images');
  const deviceRoot = join(options.dir, 'dev', 'disk', 'by-id');
  await mkdir(imagesDir, { recursive: true });
  await mkdir(deviceRoot, { recursive: true });
  const tokens = new Set<string>();
  const loggedOut: string[] = [];
  const vms = new Map<string, SimVm>();
  const disks = new Map<string, SimDisk>();
  const dataCenters: OvirtSim['dataCenters'] = new Map([[DATA_CENTER_ID, { id: DATA_CENTER_ID, name: 'Default' }]]);
  const clusters: OvirtSim['clusters'] = new Map([[CLUSTER_ID, { id: CLUSTER_ID, name: 'Default', version: [4, 5], dataCenter: DATA_CENTER_ID }]]);
  const storageDomains: OvirtSim['storageDomains'] = new Map([
    [STORAGE_DOMAIN_ID, { id: STORAGE_DOMAIN_ID, name: 'data', type: 'data', storage: 'nfs', dataCenter: DATA_CENTER_ID, status: 'active', available: 1024 * 1024 * MiB }],
  ]);
  const requests: SimRequest[] = [];
  const events: SimEvent[] = [];
  const conflicts: { method: string; path: RegExp; left: number }[] = [];
  let failNextSnapshot = false;
  let restartAfter: { path: RegExp; left: number } | undefined;
  let stopNextTransfer = false;
  let failNextRedefinition = false;
  let failNextBackupSnapshotRemoval = false;
  const slowDisks = new Map<string, number>();
  const backups = new Map<string, SimBackup>();
  const transfers = new Map<string, SimTransfer>();
  let expireAfter = -1;
  const timers = new Set<NodeJS.Timeout>();
  let stopped = false;
  const later = (ms: number, work: () => Promise<void>): void => {
    if (stopped) return;
    const timer = setTimeout(() => {
      timers.delete(timer);
      void work().catch((error: unknown) => process.stderr.write(`ovirt-sim: ${String(error)}\n`));
    }, ms);
    timers.add(timer);
  };
  const imageio = await startImageio({ tls: options.imageioPlainHttp ? undefined : options.tls });

  /** A qemu filename for the disk: on block storage, the image inside its logical volume, which cannot grow past the LV's size. */
  const imageSpec = (disk: SimDisk): string =>
    disk.lvSize === undefined
      ? disk.image
      : `json:${JSON.stringify({ driver: disk.format === 'cow' ? 'qcow2' : 'raw', file: { driver: 'raw', size: disk.lvSize, file: { driver: 'file', filename: disk.image } } })}`;
  const imageFormatArgs = (disk: SimDisk): string[] => (disk.lvSize === undefined ? ['-f', disk.format === 'cow' ? 'qcow2' : 'raw'] : []);

  const ovfFor = (vm: SimVm): string =>
    writeOvf(
      vm,
      vm.disks.filter((d) => disks.has(d)).map((d) => {
        const disk = disks.get(d)!;
        const a = vm.attachments.get(d);
        return { diskId: d, imageId: disk.imageId, alias: disk.alias, size: disk.size, diskInterface: OVF_INTERFACES[a?.interface ?? 'virtio'], boot: a?.bootable ?? false };
      }),
    );

  // ---- XML of the entities (element names from the API model's types/*.java) ----
  const vmXml = (vm: SimVm, allContent: boolean): string =>
    `<vm href="${API}/vms/${vm.id}" id="${vm.id}"><name>${xmlEscape(vm.name)}</name><status>${vm.status}</status>` +
    (allContent ? `<initialization><configuration><type>ovf</type><data>${xmlEscape(ovfFor(vm))}</data></configuration></initialization>` : '') +
    `<cluster href="${API}/clusters/${vm.cluster}" id="${vm.cluster}"/>` +
    `<link href="${API}/vms/${vm.id}/snapshots" rel="snapshots"/><link href="${API}/vms/${vm.id}/diskattachments" rel="diskattachments"/><link href="${API}/vms/${vm.id}/backups" rel="backups"/><link href="${API}/vms/${vm.id}/checkpoints" rel="checkpoints"/></vm>`;

  const snapshotXml = (vm: SimVm, s: SimSnapshot, allContent: boolean): string =>
    `<snapshot href="${API}/vms/${vm.id}/snapshots/${s.id}" id="${s.id}"><description>${xmlEscape(s.description)}</description>` +
    `<snapshot_status>${s.status}</snapshot_status><snapshot_type>regular</snapshot_type><persist_memorystate>false</persist_memorystate>` +
    (allContent ? `<initialization><configuration><type>ovf</type><data>${xmlEscape(s.ovf)}</data></configuration></initialization>` : '') +
    `<vm href="${API}/vms/${vm.id}" id="${vm.id}"/></snapshot>`;

  /** The active snapshot ("Active VM"): every VM has one, with a GUID of its own. */
  const activeSnapshots = new Map<string, string>();
  const activeSnapshotXml = (vm: SimVm): string => {
    if (!activeSnapshots.has(vm.id)) activeSnapshots.set(vm.id, randomUUID());
    const sid = activeSnapshots.get(vm.id)!;
    return `<snapshot href="${API}/vms/${vm.id}/snapshots/${sid}" id="${sid}"><description>Active VM</description><snapshot_status>ok</snapshot_status><snapshot_type>active</snapshot_type><vm href="${API}/vms/${vm.id}" id="${vm.id}"/></snapshot>`;
  };

  const backupXml = (vm: SimVm, b: SimBackup): string =>
    `<backup href="${API}/vms/${vm.id}/backups/${b.id}" id="${b.id}"><actions><link href="${API}/vms/${vm.id}/backups/${b.id}/finalize" rel="finalize"/></actions>` +
    `<link href="${API}/vms/${vm.id}/backups/${b.id}/disks" rel="disks"/>${b.from ? `<from_checkpoint_id>${b.from}</from_checkpoint_id>` : ''}${b.to ? `<to_checkpoint_id>${b.to}</to_checkpoint_id>` : ''}` +
    `<phase>${restPhase(b.phase)}</phase>${b.snapshotId ? `<snapshot href="${API}/vms/${vm.id}/snapshots/${b.snapshotId}" id="${b.snapshotId}"/>` : ''}<vm href="${API}/vms/${vm.id}" id="${vm.id}"/></backup>`;

  const transferXml = (t: SimTransfer): string =>
    `<image_transfer href="${API}/imagetransfers/${t.id}" id="${t.id}"><actions>${['cancel', 'extend', 'finalize', 'pause', 'resume'].map((a) => `<link href="${API}/imagetransfers/${t.id}/${a}" rel="${a}"/>`).join('')}</actions>` +
    `<active>${(imageio.tickets.get(t.ticket)?.ongoing ?? 0) > 0}</active><direction>${t.direction}</direction><format>raw</format>` +
    `<inactivity_timeout>${t.inactivityTimeout ?? Math.round(inactivityDefaultMs / 1000)}</inactivity_timeout><phase>${t.phase}</phase>` +
    (t.started ? `<proxy_url>${imageio.proxyUrl}/images/${t.ticket}</proxy_url><transfer_url>${imageio.daemonUrl}/images/${t.ticket}</transfer_url>` : '') +
    `<timeout_policy>${t.timeoutPolicy}</timeout_policy>${t.backupId ? `<backup href="${API}/vms/${backups.get(t.backupId)?.vmId ?? ''}/backups/${t.backupId}" id="${t.backupId}"/>` : ''}<disk href="${API}/disks/${t.diskId}" id="${t.diskId}"/></image_transfer>`;

  const diskXml = (disk: SimDisk, extra = ''): string =>
    `<disk href="${API}/disks/${disk.id}" id="${disk.id}"><alias>${xmlEscape(disk.alias)}</alias><name>${xmlEscape(disk.alias)}</name><format>${disk.format}</format>` +
    `<image_id>${disk.imageId}</image_id><provisioned_size>${disk.size}</provisioned_size><status>${disk.status}</status>` +
    (disk.backupMode ? `<backup_mode>${disk.backupMode}</backup_mode>` : '') +
    `<storage_domains><storage_domain href="${API}/storagedomains/${disk.storageDomain}" id="${disk.storageDomain}"/></storage_domains>${extra}</disk>`;

  const attachmentXml = (vm: SimVm, a: SimAttachment): string =>
    `<disk_attachment href="${API}/vms/${vm.id}/diskattachments/${a.diskId}" id="${a.diskId}"><active>${a.active}</active><bootable>${a.bootable}</bootable><interface>${a.interface}</interface>` +
    (a.device ? `<logical_name>${a.device}</logical_name>` : '') +
    `<pass_discard>false</pass_discard><read_only>${a.snapshotId !== undefined}</read_only><disk href="${API}/disks/${a.diskId}" id="${a.diskId}"/><vm href="${API}/vms/${vm.id}" id="${vm.id}"/></disk_attachment>`;

  const checkpointXml = (vm: SimVm, c: SimCheckpoint): string =>
    `<checkpoint href="${API}/vms/${vm.id}/checkpoints/${c.id}" id="${c.id}"><link href="${API}/vms/${vm.id}/checkpoints/${c.id}/disks" rel="disks"/>` +
    `<creation_date>${c.creationDate.toISOString()}</creation_date>${c.parentId ? `<parent_id>${c.parentId}</parent_id>` : ''}<state>${c.state}</state><vm href="${API}/vms/${vm.id}" id="${vm.id}"/></checkpoint>`;

  /** In the collection, a domain's status is only "unattached" or absent (BackendStorageDomainsResource.mapCollection). */
  const storageDomainXml = (sd: OvirtSim['storageDomains'] extends Map<string, infer T> ? T : never, inDataCenter: boolean): string =>
    `<storage_domain href="${API}/storagedomains/${sd.id}" id="${sd.id}"><name>${xmlEscape(sd.name)}</name><available>${sd.available}</available>` +
    (sd.dataCenter ? `<data_centers><data_center href="${API}/datacenters/${sd.dataCenter}" id="${sd.dataCenter}"/></data_centers>` : '') +
    (inDataCenter ? `<status>${sd.status}</status>` : sd.dataCenter ? '' : '<status>unattached</status>') +
    `<storage><type>${sd.storage}</type></storage><type>${sd.type}</type></storage_domain>`;

  const clusterXml = (c: OvirtSim['clusters'] extends Map<string, infer T> ? T : never): string =>
    `<cluster href="${API}/clusters/${c.id}" id="${c.id}"><name>${xmlEscape(c.name)}</name><version><major>${c.version[0]}</major><minor>${c.version[1]}</minor></version>` +
    `<data_center href="${API}/datacenters/${c.dataCenter}" id="${c.dataCenter}"/></cluster>`;

  const event = (code: number, description: string): void => {
    events.push({ id: events.length + 1, code, description });
  };

  // ---- the guest agent, as VDSM drives it (lib/vdsm/virt/vm.py `freeze`, `thaw`) ----
  /**
   * VDSM's freeze: libvirt's fsFreeze through the agent. No agent: VIR_ERR_AGENT_UNRESPONSIVE, VDSM's
   * `nonresp`; a guest that cannot freeze, or one already frozen (qemu-ga then refuses every command but
   * thaw and status): `freezeErr`. The message is libvirt's.
   */
  const vdsmFreeze = (vm: SimVm): { ok: true } | { ok: false; name: 'nonresp' | 'freezeErr'; message: string } => {
    if (vm.agent === 'none' || vm.agent === 'stuck') return { ok: false, name: 'nonresp', message: 'Guest agent is not responding: QEMU guest agent is not connected' };
    if (vm.agent === 'refuses') return { ok: false, name: 'freezeErr', message: "internal error: unable to execute QEMU agent command 'guest-fsfreeze-freeze': failed to freeze /: Operation not supported" };
    if (vm.frozen) return { ok: false, name: 'freezeErr', message: "internal error: unable to execute QEMU agent command 'guest-fsfreeze-freeze': Command guest-fsfreeze-freeze has been disabled: the agent is in frozen state" };
    vm.frozen = true;
    vm.freezes += 1;
    return { ok: true };
  };
  /** VDSM's thaw: a guest that is not frozen thaws nothing and succeeds (qemu-ga guest-fsfreeze-thaw answers 0). */
  const vdsmThaw = (vm: SimVm): { ok: boolean } => {
    if (vm.agent === 'none' || vm.agent === 'stuck') return { ok: false };
    vm.frozen = false;
    return { ok: true };
  };
  /** How long after its timed-out call a `late` agent's freeze lands. */
  const LATE_FREEZE_MS = 1500;
  /** VdsmErrors.properties: what the engine says of VDSM's error names. */
  const VDSM_ERRORS = { nonresp: 'Guest agent non responsive', freezeErr: 'Unable to freeze guest filesystems' } as const;

  // ---- helpers of the commands ----
  const stopExport = async (pid: number, socket: string): Promise<void> => {
    await stopProcess(pid);
    await rm(socket, { force: true });
  };
  const stopExports = async (backup: SimBackup): Promise<void> => {
    for (const { socket, pid } of backup.exports.values()) await stopExport(pid, socket);
    backup.exports.clear();
  };
  const startExport = async (name: string, image: string, format: string[], extra: string[]): Promise<{ socket: string; pid: number }> => {
    const socket = join(options.dir, `${name}.sock`);
    const pidFile = `${socket}.pid`;
    await tool('qemu-nbd', [...format, '--socket', socket, '--persistent', '--shared', '8', '--fork', '--pid-file', pidFile, ...extra, image]);
    return { socket, pid: Number((await readFile(pidFile, 'utf8')).trim()) };
  };
  const bitmapsWithFlags = async (image: string): Promise<{ name: string; flags: string[] }[]> => {
    const info = JSON.parse(await tool('qemu-img', ['info', '-U', '--output=json', image])) as { 'format-specific'?: { data?: { bitmaps?: { name: string; flags?: string[] }[] } } };
    return (info['format-specific']?.data?.bitmaps ?? []).map((b) => ({ name: b.name, flags: b.flags ?? [] }));
  };
  const bitmapsOf = async (image: string): Promise<string[]> => (await bitmapsWithFlags(image)).map((b) => b.name);
  /** The bitmaps libvirt would use: present, persistent and not inconsistent (`in-use` in a closed image). */
  const usableBitmapsOf = async (image: string): Promise<string[]> => (await bitmapsWithFlags(image)).filter((b) => !b.flags.includes('in-use')).map((b) => b.name);

  /** An engine restart: sessions are gone; backups it was running fail (event 10814), their transfers end. */
  const restart = async (): Promise<void> => {
    tokens.clear();
    for (const backup of backups.values()) {
      if (backup.phase !== 'succeeded' && backup.phase !== 'failed') {
        backup.phase = 'failed'; // VM_BACKUP_FAILED_UNMONITORED: "cleanup may be required"
        event(10814, `Backup ${backup.id} was marked as failed since it is no longer monitored, cleanup may be required.`);
        await stopExports(backup);
        releaseBackupDisks(backup);
      }
    }
    for (const transfer of transfers.values()) {
      if (!transfer.phase.startsWith('finished')) transfer.phase = 'finished_failure';
      await imageio.remove(transfer.ticket);
    }
  };

  const releaseBackupDisks = (backup: SimBackup): void => {
    for (const id of backup.disks) {
      const disk = disks.get(id);
      if (disk) {
        disk.backupMode = undefined;
        if (disk.status === 'locked') disk.status = 'ok';
      }
    }
  };

  /** A finished backup or transfer is purged after Succeeded/Failed…CleanupTimeInMinutes (0000_config.sql). */
  const purgeLater = (succeeded: boolean, purge: () => void): void => later(succeeded ? purgeSucceededMs : purgeFailedMs, async () => purge());

  // ---- snapshots: a real qcow2 overlay per disk; removal commits it back ----
  const createSnapshot = (vm: SimVm, description: string, onDone?: (snapshot: SimSnapshot) => Promise<void>): SimSnapshot => {
    const snapshot: SimSnapshot = { id: randomUUID(), description, status: 'locked', frozen: new Map(), ovf: ovfFor(vm), removing: false, quiesced: false };
    vm.snapshots.set(snapshot.id, snapshot);
    const fails = failNextSnapshot && description !== BACKUP_SNAPSHOT_DESCRIPTION;
    if (fails) failNextSnapshot = false;
    later(lockMs, async () => {
      if (fails) {
        vm.snapshots.delete(snapshot.id); // USER_CREATE_SNAPSHOT_FINISHED_FAILURE: the snapshot disappears
        event(69, `Failed to complete snapshot '${description}' creation for VM '${vm.name}'.`);
        return;
      }
      await onDone?.(snapshot);
      // A live snapshot without memory: the engine sends frozen=false (LiveSnapshotPerformFreezeInEngine is
      // false from 4.4), so VDSM's snapshot job freezes, ignoring a failure, takes libvirt's snapshot and
      // always thaws (lib/vdsm/virt/jobs/snapshot.py `_should_freeze`, `_thaw_vm`).
      const live = vm.status === 'up';
      const before = vm.frozen;
      if (live) vdsmFreeze(vm);
      snapshot.quiesced = vm.frozen;
      vm.snapshotsQuiesced.push(before ? 'api' : vm.frozen ? 'vdsm' : 'no');
      if (live) vdsmThaw(vm);
      for (const id of vm.disks) {
        const disk = disks.get(id);
        if (!disk || disk.lvSize !== undefined) continue;
        const overlay = join(imagesDir, `${id}.${snapshot.id}.qcow2`);
        await tool('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', disk.image, '-F', 'qcow2', overlay]);
        snapshot.frozen.set(id, disk.image);
        disk.image = overlay;
      }
      snapshot.status = 'ok';
    });
    return snapshot;
  };
  const removeSnapshot = (vm: SimVm, snapshot: SimSnapshot, onDone?: () => void): void => {
    snapshot.status = 'locked';
    snapshot.removing = true;
    later(lockMs, async () => {
      // The merge: the overlay's data goes down into the frozen image, which becomes active again. Enabled
      // bitmaps of the frozen image record what the commit writes, so checkpoints stay exact.
      for (const [id, base] of snapshot.frozen) {
        const disk = disks.get(id);
        if (!disk) continue;
        await tool('qemu-img', ['commit', '-q', '-f', 'qcow2', disk.image]);
        await rm(disk.image, { force: true });
        disk.image = base;
      }
      vm.snapshots.delete(snapshot.id);
      onDone?.();
    });
  };

  // ---- backups (StartVmBackupCommand, HybridBackupCommand, StopVmBackupCommand) ----
  const startBackupExports = async (backup: SimBackup, images: Map<string, string>): Promise<void> => {
    for (const id of backup.disks) {
      const disk = disks.get(id)!;
      const image = images.get(id) ?? imageSpec(disk);
      const incremental = backup.modes.get(id) === 'incremental' && backup.from !== undefined;
      backup.exports.set(id, await startExport(`nbd-${backup.id.slice(0, 8)}-${id.slice(0, 8)}`, image, images.has(id) ? ['-f', 'qcow2'] : imageFormatArgs(disk), ['-r', ...(incremental ? ['-B', `sim-${backup.from}`] : [])]));
    }
  };
  const addCheckpointBitmaps = async (backup: SimBackup): Promise<void> => {
    for (const id of backup.disks) {
      const disk = disks.get(id)!;
      if (disk.format !== 'cow') continue;
      if (!(await bitmapsOf(disk.image)).includes(`sim-${backup.checkpointId}`)) await tool('qemu-img', ['bitmap', '--add', '--enable', disk.image, `sim-${backup.checkpointId}`]);
    }
  };
  const removeCheckpointBitmaps = async (backup: SimBackup): Promise<void> => {
    for (const id of backup.disks) {
      const disk = disks.get(id)!;
      if (disk.format === 'cow') await tool('qemu-img', ['bitmap', '--remove', disk.image, `sim-${backup.checkpointId}`]).catch(() => undefined);
    }
  };
  const createCheckpoint = (vm: SimVm, backup: SimBackup): void => {
    vm.checkpoints.push({ id: backup.checkpointId, parentId: vm.checkpoints.at(-1)?.id, state: 'created', creationDate: new Date(), disks: backup.disks.filter((d) => disks.get(d)?.format === 'cow') });
  };
  const setModes = (vm: SimVm, backup: SimBackup): void => {
    // setDiskBackupModeIfSupported: cluster level 4.5 and later; full for a disk the from-checkpoint does not cover.
    if (!versionAtLeast(clusters.get(vm.cluster)!.version, 4, 5)) return;
    const covered = new Set(vm.checkpoints.find((c) => c.id === backup.from)?.disks ?? []);
    for (const id of backup.disks) {
      const mode = backup.from && covered.has(id) ? 'incremental' : 'full';
      backup.modes.set(id, mode);
      disks.get(id)!.backupMode = mode;
    }
  };
  /** endWithFailure: the backup fails; StartVmBackup removes the checkpoint it created from the database. */
  const failBackup = async (vm: SimVm, backup: SimBackup): Promise<void> => {
    await stopExports(backup);
    releaseBackupDisks(backup);
    backup.phase = 'failed';
    if (backup.kind !== 'hybrid') vm.checkpoints = vm.checkpoints.filter((c) => c.id !== backup.checkpointId);
    event(10792, `Backup ${backup.id} for VM ${vm.name} failed`);
    if (backup.snapshotId && vm.snapshots.get(backup.snapshotId)?.status === 'ok') removeSnapshot(vm, vm.snapshots.get(backup.snapshotId)!);
    purgeLater(false, () => backups.delete(backup.id));
  };
  const succeedBackup = (vm: SimVm, backup: SimBackup): void => {
    releaseBackupDisks(backup);
    backup.phase = 'succeeded';
    event(10793, `Backup ${backup.id} for VM ${vm.name} completed successfully`);
    purgeLater(true, () => backups.delete(backup.id));
  };
  /** HybridBackupCommand in READY once stopped: remove the snapshot (REMOVING_SNAPSHOT), then succeed. */
  const finishHybrid = (vm: SimVm, backup: SimBackup): void => {
    backup.phase = 'removing_snapshot';
    later(lockMs, async () => {
      await stopExports(backup);
      const snapshot = backup.snapshotId ? vm.snapshots.get(backup.snapshotId) : undefined;
      if (snapshot && failNextBackupSnapshotRemoval) {
        failNextBackupSnapshotRemoval = false;
        // endWithFailure in REMOVING_SNAPSHOT: VM_BACKUP_SNAPSHOT_POSSIBLE_LEFTOVER, and the backup succeeds.
        event(10813, `Backup ${backup.id} for VM ${vm.name} succeeded, but snapshot ${BACKUP_SNAPSHOT_DESCRIPTION} may remain`);
        succeedBackup(vm, backup);
        return;
      }
      if (snapshot) removeSnapshot(vm, snapshot, () => succeedBackup(vm, backup));
      else succeedBackup(vm, backup);
    });
  };

  const postBackup = async (req: IncomingMessage, res: ServerResponse, vm: SimVm, url: URL): Promise<void> => {
    const body = parseBody(await readBody(req), 'backup');
    const cluster = clusters.get(vm.cluster)!;
    const from = value(body, 'from_checkpoint_id');
    const wanted = nodes(node(body, 'disks'), 'disk').map((d) => id(d)!).filter(Boolean);
    const fault = (status: number, detail: string): void => send(req, res, status, faultXml('Operation Failed', `[Cannot backup VM. ${detail}]`));
    if (wanted.length === 0) return send(req, res, 400, faultXml('Incomplete parameters', 'Backup [disks] required for add'));
    const missing = wanted.filter((d) => !disks.has(d));
    if (missing.length > 0) return fault(400, `The following disks do not exist: ${missing.join(', ')}.`);
    if (wanted.some((d) => disks.get(d)!.status === 'locked')) return fault(409, 'Disk is locked. Please try again later.');
    const unplugged = wanted.filter((d) => !vm.attachments.get(d)?.active);
    if (unplugged.length > 0) return fault(409, `The following disks are not active on VM ${vm.name}: ${unplugged.join(', ')}`);
    if (from) {
      if (!versionAtLeast(cluster.version, 4, 5)) return fault(400, 'Incremental backup is not supported for this cluster compatibility version.');
      const checkpoint = vm.checkpoints.find((c) => c.id === from);
      if (!checkpoint) return fault(400, `Checkpoint ID ${from} doesn't exist.`);
      if (checkpoint.state === 'invalid') return fault(400, `Checkpoint ID ${from} is invalid and should be removed.`);
    }
    if ([...backups.values()].some((b) => b.vmId === vm.id && b.phase !== 'succeeded' && b.phase !== 'failed')) return fault(409, 'The VM is during a backup operation.');
    const requestedId = id(body);
    if (requestedId && backups.has(requestedId)) return fault(400, `Backup ID ${requestedId} already exists.`);
    const legacy = url.searchParams.get('legacy') === 'true';
    const kind: SimBackup['kind'] = !legacy && versionAtLeast(cluster.version, 4, 7) ? 'hybrid' : vm.status === 'up' ? 'live' : 'cold';
    // BackendVmBackupsResource.add: require_consistency reaches StartVmBackup only; HybridBackup is built without it.
    const requireConsistency = kind !== 'hybrid' && url.searchParams.get('require_consistency') === 'true';
    const backup: SimBackup = { id: requestedId ?? randomUUID(), vmId: vm.id, kind, phase: 'initializing', from, to: undefined, checkpointId: randomUUID(), disks: wanted, modes: new Map(), exports: new Map(), snapshotId: undefined, stopped: false, requireConsistency, quiesced: false };
    backups.set(backup.id, backup);
    for (const d of wanted) disks.get(d)!.status = 'locked';
    event(10790, `Backup ${backup.id} for VM ${vm.name} started`);

    if (kind === 'hybrid') {
      // HybridBackupCommand.executeCommand: the snapshot is taken at once; the answer is already STARTING.
      const snapshot = createSnapshot(vm, BACKUP_SNAPSHOT_DESCRIPTION, async () => {
        // The new checkpoint's bitmap is added as the snapshot freezes the disks (CreateSnapshotForVm with a bitmap).
        await addCheckpointBitmaps(backup);
      });
      backup.snapshotId = snapshot.id;
      backup.phase = 'starting';
      const waitReady = async (): Promise<void> => {
        if (snapshot.status === 'locked') return later(lockMs / 2, waitReady);
        if (!vm.snapshots.has(snapshot.id)) return failBackup(vm, backup);
        // STARTING: disk backup modes, the checkpoint, to_checkpoint_id, READY.
        backup.quiesced = snapshot.quiesced;
        setModes(vm, backup);
        createCheckpoint(vm, backup);
        backup.to = backup.checkpointId;
        await startBackupExports(backup, snapshot.frozen);
        backup.phase = 'ready';
        if (backup.stopped) finishHybrid(vm, backup);
      };
      later(lockMs, waitReady);
      return send(req, res, 201, backupXml(vm, backup));
    }

    // From cluster level 4.6 the from-checkpoint is redefined with REDEFINE_VALIDATE (RedefineVmCheckpointCommand
    // .redefineFromCheckpoint; vdsm redefine_checkpoints): libvirt refuses a bitmap that is missing or
    // inconsistent (qemuBlockBitmapChainIsValid). Below 4.6 a checkpoint libvirt already has is not redefined.
    const validated = kind === 'live' && from !== undefined && versionAtLeast(cluster.version, 4, 6);
    let invalid = false;
    for (const d of validated ? (vm.checkpoints.find((c) => c.id === from)?.disks ?? []) : []) {
      const disk = disks.get(d);
      if (disk && !(await usableBitmapsOf(disk.image)).includes(`sim-${from}`)) invalid = true;
    }
    if (kind === 'live' && from && (failNextRedefinition || invalid)) {
      failNextRedefinition = false;
      // RedefineVmCheckpointCommand fails: the chain is removed, event 10791, the command fails in execute.
      for (const c of vm.checkpoints) for (const d of c.disks) await tool('qemu-img', ['bitmap', '--remove', disks.get(d)!.image, `sim-${c.id}`]).catch(() => undefined);
      vm.checkpoints = [];
      event(10791, `Backup ${backup.id} for VM ${vm.name} failed, a full VM backup is needed`);
      await failBackup(vm, backup);
      return send(req, res, 500, faultXml('Operation Failed', ''));
    }
    // StartVmBackupCommand.executeCommand: the checkpoint row exists at once, the entity learns it later.
    createCheckpoint(vm, backup);
    setModes(vm, backup);
    if (kind === 'cold') {
      later(lockMs, async () => {
        if (backup.phase !== 'initializing') return;
        backup.phase = 'adding_bitmaps';
        await addCheckpointBitmaps(backup);
        backup.to = backup.checkpointId; // startAddBitmapJobs → updateVmBackupCheckpoint
        backup.phase = 'waiting_for_bitmaps';
        later(lockMs, async () => {
          if (backup.phase !== 'waiting_for_bitmaps') return;
          await startBackupExports(backup, new Map());
          backup.phase = 'ready';
        });
      });
    } else {
      later(lockMs, async () => {
        if (backup.phase !== 'initializing') return;
        backup.phase = 'creating_scratch_disks';
        later(lockMs / 2, async () => {
          if (backup.phase !== 'creating_scratch_disks') return;
          backup.phase = 'starting';
          later(lockMs, async () => {
            if (backup.phase !== 'starting') return;
            // VDSM start_backup (lib/vdsm/virt/backup.py): freeze; with require_consistency a failed freeze is a
            // BackupError ("Failed freeze VM: …"), the StartVmBackup VDS command fails (event 10802 with VDSM's
            // message, VdsBrokerCommand.logToAudit), runLiveVmBackup fails: FINALIZING_FAILURE, failed. The
            // guest is thawed whatever happened.
            const freeze = vdsmFreeze(vm);
            // require_consistency is VDSM's from 4.4.4 (vdsm commit 677d4c31b, 2020-11-12, "backup: add
            // require_consistency"): an older one ignores it, and a failed freeze does not fail the backup.
            if (!freeze.ok && backup.requireConsistency && honoursRequireConsistency) {
              vdsmThaw(vm);
              // ContextException.__str__: "Backup Error: " and the context dict's repr (the reason added last).
              const reason = `Failed freeze VM: ${freeze.message}`;
              const repr = reason.includes("'") ? `"${reason}"` : `'${reason}'`;
              event(10802, `VDSM ${HOST_NAME} command StartVmBackupVDS failed: Backup Error: {'vm_id': '${vm.id}', 'backup': <vdsm.virt.backup.BackupConfig object at 0x7f2c1e0b5d30>, 'reason': ${repr}}`);
              await removeCheckpointBitmaps(backup);
              await failBackup(vm, backup);
              return;
            }
            backup.quiesced = vm.frozen;
            await addCheckpointBitmaps(backup);
            try {
              await startBackupExports(backup, new Map());
            } catch {
              // runLiveVmBackup fails: VDSM start_backup → libvirt backupBegin refuses an incremental whose
              // from-checkpoint bitmap is missing or inconsistent in a disk (VIR_ERR_CHECKPOINT_INCONSISTENT,
              // vdsm InconsistentCheckpointError); here qemu-nbd refuses the export for the same reason. The
              // backup goes FINALIZING_FAILURE → failed (event 10792), its new checkpoint row removed, and the
              // new bitmap never existed on the host.
              vdsmThaw(vm);
              await removeCheckpointBitmaps(backup);
              await failBackup(vm, backup);
              return;
            }
            vdsmThaw(vm);
            backup.to = backup.checkpointId; // runLiveVmBackup → updateVmBackupCheckpoint
            backup.phase = 'ready';
          });
        });
      });
    }
    return send(req, res, 201, backupXml(vm, backup));
  };

  const finalizeBackup = (req: IncomingMessage, res: ServerResponse, vm: SimVm, backup: SimBackup): void => {
    if ([...transfers.values()].some((t) => t.backupId === backup.id && t.phase !== 'finished_success' && t.phase !== 'finished_failure')) {
      return send(req, res, 409, faultXml('Operation Failed', '[Cannot stop VM backup. There is an active image transfer for VM backup]'));
    }
    const phase = backup.phase;
    if (restPhase(phase) === 'finalizing' || phase === 'succeeded' || phase === 'failed' || backup.stopped) {
      return send(req, res, 400, faultXml('Operation Failed', `VM '${vm.id}' backup '${backup.id}' is already in '${phase.toUpperCase()}' phase, no need to stop the backup again`));
    }
    if (backup.kind === 'hybrid') {
      backup.stopped = true;
      event(10816, `Backup ${backup.id} for VM ${vm.name} was stopped`);
      if (phase === 'ready') finishHybrid(vm, backup);
      return send(req, res, 200, '<action><status>complete</status></action>');
    }
    if (phase === 'ready') {
      backup.phase = 'finalizing';
      event(10794, `Backup ${backup.id} for VM ${vm.name} finalized`);
      later(lockMs, async () => {
        await stopExports(backup);
        succeedBackup(vm, backup);
      });
      return send(req, res, 200, '<action><status>complete</status></action>');
    }
    // A premature stop: FINALIZING_FAILURE, the command reports an execute failure.
    backup.phase = 'finalizing_failure';
    later(lockMs, () => failBackup(vm, backup));
    return send(req, res, 400, faultXml('Operation Failed', `Backup '${backup.id}' is in '${phase.toUpperCase()}' phase, premature backup stop was initiated.`));
  };

  // ---- image transfers (TransferDiskImageCommand, TransferImageStatusCommand, ImageTransferUpdater) ----
  const transferStep = lockMs / 2;
  const setTransferPhase = (t: SimTransfer, phase: SimTransferPhase): void => {
    t.phase = phase;
    later(transferStep, () => advanceTransfer(t));
  };
  /** The engine's callback for a transfer: one state handler per phase (TransferDiskImageCommand.executeStateHandler). */
  const advanceTransfer = async (t: SimTransfer): Promise<void> => {
    if (!transfers.has(t.id)) return;
    const disk = disks.get(t.diskId);
    const endSession = async (): Promise<void> => {
      await imageio.remove(t.ticket);
      if (t.upload) {
        await stopExport(t.upload.pid, t.upload.socket);
        t.upload = undefined;
      }
    };
    const finish = async (phase: 'finished_success' | 'finished_failure'): Promise<void> => {
      if (phase === 'finished_failure' && t.direction === 'upload' && disk) {
        // endWithFailure: an upload's disk is removed (RemoveDisk).
        disks.delete(disk.id);
        await rm(disk.image, { force: true });
      }
      t.phase = phase;
      event(phase === 'finished_success' ? 1032 : 1034, `Image ${t.direction} of disk ${t.diskId} ${phase === 'finished_success' ? 'succeeded' : 'failed'}`);
      if (deletesFinishedTransfers) later(transferStep, async () => void transfers.delete(t.id));
      else purgeLater(phase === 'finished_success', () => transfers.delete(t.id));
    };
    switch (t.phase) {
      case 'cancelled_system': // handleCancelledSystem
        return setTransferPhase(t, 'finalizing_failure');
      case 'cancelled_user': // handleCancelledUser
        return setTransferPhase(t, 'finalizing_cleanup');
      case 'finalizing_failure': // handleFinalizingFailure: cleanup, the command fails
        await endSession();
        if (disk && t.direction === 'upload') disk.status = 'illegal';
        return finish('finished_failure');
      case 'finalizing_cleanup': // cleanup, then FINISHED_CLEANUP
        await endSession();
        if (disk) disk.status = t.direction === 'upload' ? 'illegal' : disk.status;
        return setTransferPhase(t, 'finished_cleanup');
      case 'finished_cleanup': // handleFinishedCleanup: the command fails → endWithFailure
        return finish('finished_failure');
      case 'finalizing_success': {
        await endSession();
        if (t.direction === 'upload' && disk) {
          // verifyImage: the uploaded volume must be a valid image.
          const ok = await tool('qemu-img', ['check', '-q', ...imageFormatArgs(disk), imageSpec(disk)]).then(() => true, () => false);
          if (!ok) return setTransferPhase(t, 'finalizing_failure');
          disk.status = 'ok';
        }
        return finish('finished_success');
      }
      default:
        return;
    }
  };
  /** stopTransferIfNecessary: an idle transfer (no operation running) past its inactivity timeout is stopped. */
  const inactivityMonitor = setInterval(() => {
    for (const t of transfers.values()) {
      if (t.phase !== 'transferring') continue;
      const limit = t.inactivityTimeout !== undefined ? t.inactivityTimeout * 1000 : inactivityDefaultMs;
      if (limit <= 0 || imageio.idleMs(t.ticket) <= limit) continue;
      if (t.timeoutPolicy === 'pause' || (t.timeoutPolicy === 'legacy' && t.direction === 'upload')) {
        t.phase = 'paused_system';
        event(t.timeoutPolicy === 'pause' ? 1077 : 1078, `Transfer of disk ${t.diskId} paused after ${limit / 1000} s without activity`);
      } else {
        event(t.timeoutPolicy === 'cancel' ? 1076 : 1079, `Transfer of disk ${t.diskId} cancelled after ${limit / 1000} s without activity`);
        setTransferPhase(t, 'cancelled_system');
        void imageio.remove(t.ticket);
      }
    }
  }, 50);

  const postTransfer = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const body = parseBody(await readBody(req), 'image_transfer');
    const diskId = id(node(body, 'disk'));
    const direction = value(body, 'direction') === 'download' ? 'download' : 'upload'; // upload is the default direction
    const format = value(body, 'format');
    const inactivity = value(body, 'inactivity_timeout');
    const policy = value(body, 'timeout_policy') ?? 'legacy';
    const fault = (status: number, detail: string): void => send(req, res, status, faultXml('Operation Failed', `[Cannot transfer Virtual Disk. ${detail}]`));
    if (!diskId) return send(req, res, 400, faultXml('Incomplete parameters', 'ImageTransfer [disk.id|image.id|snapshot.id] required for add'));
    if (policy !== 'legacy' && policy !== 'pause' && policy !== 'cancel') return send(req, res, 400, faultXml('Invalid value', `timeout_policy ${policy}`));
    const disk = disks.get(diskId);
    if (!disk) return fault(400, 'The disk does not exist.');
    if (disk.status === 'illegal') return fault(409, 'Disk is illegal.');
    const transfer: SimTransfer = {
      id: randomUUID(),
      diskId,
      backupId: '',
      direction,
      phase: 'initializing',
      ticket: randomUUID(),
      inactivityTimeout: inactivity !== undefined ? Number(inactivity) : undefined,
      timeoutPolicy: policy,
      started: false,
    };
    let exportSocket: string;
    const backupId = id(node(body, 'backup'));
    if (backupId) {
      const backup = backups.get(backupId);
      if (!backup) return fault(400, 'VM backup does not exist.');
      if (backup.phase !== 'ready') return fault(409, `The VM backup is not in READY phase, backup phase is ${backup.phase.toUpperCase()}.`);
      if (format === 'cow') return fault(400, 'The specified format is not applicable for VM backup.');
      if (!backup.disks.includes(diskId)) return fault(400, 'The disk is not part of the VM backup.');
      if (backup.snapshotId && !vms.get(backup.vmId)?.snapshots.has(backup.snapshotId)) return fault(409, "The VM snapshot doesn't exist.");
      transfer.backupId = backup.id;
      exportSocket = backup.exports.get(diskId)!.socket;
    } else if (direction === 'download') {
      return fault(400, 'The simulator downloads disks of backups only.');
    } else {
      if (disk.status === 'locked') return fault(409, 'Disk is locked. Please try again later.');
      if ([...vms.values()].some((v) => v.status === 'up' && v.attachments.get(diskId)?.active)) return fault(409, 'The disk is plugged to a running VM.');
      if (format !== 'raw') return fault(400, 'The simulator uploads raw guest data only (format=raw: the NBD backend).');
      disk.status = 'locked';
      exportSocket = '';
    }
    transfers.set(transfer.id, transfer);
    const stop = stopNextTransfer;
    stopNextTransfer = false;
    later(transferStep, async () => {
      if (transfer.phase !== 'initializing') return;
      if (stop) {
        // updateEntityPhaseToStoppedBySystem: a download is cancelled, an upload paused.
        event(1034, `Transfer of disk ${diskId} stopped by the system: failed to add the image ticket`);
        if (direction === 'download') return setTransferPhase(transfer, 'cancelled_system');
        transfer.phase = 'paused_system';
        return;
      }
      if (direction === 'upload') {
        try {
          transfer.upload = await startExport(`up-${transfer.id.slice(0, 8)}`, imageSpec(disk), imageFormatArgs(disk), []);
        } catch (error) {
          // The host could not serve the image: TRANSFER_IMAGE_STOPPED_BY_SYSTEM_FAILED_TO_CREATE_TICKET, paused.
          event(1034, `Transfer of disk ${diskId} stopped by the system: ${(error as Error).message}`);
          transfer.phase = 'paused_system';
          return;
        }
        exportSocket = transfer.upload.socket;
      }
      const backup = backups.get(transfer.backupId);
      const ticket = imageio.add({
        id: transfer.ticket,
        transferId: transfer.id,
        ops: direction === 'download' ? ['read'] : ['write'],
        size: disk.size,
        socket: exportSocket,
        dirtyBitmap: backup && backup.modes.get(diskId) === 'incremental' && backup.from ? `sim-${backup.from}` : undefined,
      });
      ticket.readDelayMs = slowDisks.get(diskId) ?? 0;
      transfer.started = true;
      transfer.phase = 'transferring';
    });
    return send(req, res, 201, transferXml(transfer));
  };

  const transferAction = (req: IncomingMessage, res: ServerResponse, transferId: string, action: string): void => {
    const t = transfers.get(transferId);
    const ok = (): void => send(req, res, 200, '<action><status>complete</status></action>');
    // TransferImageStatusCommand: a missing entity is not an error (phase UNKNOWN), and any phase change
    // is accepted unless the transfer has finished (ImageTransferPhase.isValidTransition).
    if (!t) return ok();
    const finished = t.phase === 'finished_success' || t.phase === 'finished_failure';
    if (action === 'finalize' && !finished) setTransferPhase(t, 'finalizing_success');
    else if (action === 'cancel' && !finished) setTransferPhase(t, 'cancelled_user');
    else if (action === 'pause') {
      if (t.direction === 'download') return send(req, res, 400, faultXml('Operation Failed', '[Cannot pause image download.]'));
      if (!finished) t.phase = 'paused_user';
    } else if (action === 'resume') {
      if (t.phase !== 'paused_system' && t.phase !== 'paused_user') return send(req, res, 400, faultXml('Operation Failed', '[Cannot resume image transfer: it is not paused.]'));
      t.phase = 'resuming';
      later(transferStep, async () => {
        if (t.phase === 'resuming') t.phase = 'transferring';
      });
    }
    return ok();
  };

  // ---- disks (AddDisk; vdsm blockVolume.calculate_volume_alloc_size for block storage) ----
  const postDisk = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const body = parseBody(await readBody(req), 'disk');
    const format = value(body, 'format');
    const size = Number(value(body, 'provisioned_size'));
    const initialSize = value(body, 'initial_size') !== undefined ? Number(value(body, 'initial_size')) : undefined;
    const sparse = value(body, 'sparse') !== undefined ? value(body, 'sparse') === 'true' : format === 'cow';
    const domainRef = node(node(body, 'storage_domains'), 'storage_domain');
    const domain = [...storageDomains.values()].find((sd) => sd.id === id(domainRef) || (id(domainRef) === undefined && sd.name === value(domainRef, 'name')));
    const name = value(body, 'name') ?? value(body, 'alias');
    if (format !== 'cow' && format !== 'raw') return send(req, res, 400, faultXml('Incomplete parameters', 'Disk [format] required for add'));
    if (!Number.isSafeInteger(size) || size <= 0) return send(req, res, 400, faultXml('Incomplete parameters', 'Disk [provisionedSize] required for add'));
    if (!domain) return send(req, res, 400, faultXml('Operation Failed', `[Cannot add Virtual Disk. Storage Domain doesn't exist.]`));
    if (!domain.dataCenter || domain.status !== 'active') return send(req, res, 409, faultXml('Operation Failed', `[Cannot add Virtual Disk. The relevant Storage Domain's status is ${domain.dataCenter ? domain.status : 'unattached'}.]`));
    const block = domain.storage === 'iscsi' || domain.storage === 'fcp';
    if (block && format === 'raw' && sparse) return send(req, res, 400, faultXml('Operation Failed', '[Cannot add Virtual Disk. Sparse raw disks are not supported on block storage.]'));
    const diskId = id(body) ?? randomUUID();
    if (disks.has(diskId)) return send(req, res, 409, faultXml('Operation Failed', `[Cannot add Virtual Disk. Disk ${diskId} already exists.]`));
    const image = join(imagesDir, `${diskId}.${format === 'cow' ? 'qcow2' : 'raw'}`);
    // A sparse qcow2 volume on block storage starts as initial_size × 1.1, or one extension chunk.
    // (Logical volumes come in whole extents; here whole MiB.)
    const lvBytes = !block ? undefined : format === 'cow' && sparse ? (initialSize !== undefined ? Math.ceil(initialSize * 1.1) : Math.min(blockChunk, size)) : size;
    const lvSize = lvBytes === undefined ? undefined : Math.ceil(lvBytes / MiB) * MiB;
    const disk: SimDisk = { id: diskId, imageId: value(body, 'image_id') ?? randomUUID(), alias: name ?? `disk-${diskId.slice(0, 8)}`, size, format, image, status: 'locked', storageDomain: domain.id, lvSize, backupMode: undefined };
    disks.set(diskId, disk);
    later(lockMs, async () => {
      // vdsm refuses an initial size above the volume's maximum (InvalidParameterException): the disk ends illegal.
      if (block && initialSize !== undefined && (format === 'raw' || initialSize > Math.ceil(size * 1.1) + MiB)) {
        disk.status = 'illegal';
        return;
      }
      await tool('qemu-img', ['create', '-q', '-f', format === 'cow' ? 'qcow2' : 'raw', image, String(size)]);
      if (lvSize !== undefined && format === 'cow') await tool('truncate', ['-s', String(lvSize), image]);
      disk.status = 'ok';
    });
    return send(req, res, 202, diskXml(disk));
  };

  // ---- VM import from an OVF (BackendVmsResource.importVmFromConfiguration, ImportVmFromConfigurationCommand) ----
  const postVm = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const body = parseBody(await readBody(req), 'vm');
    const initialization = node(body, 'initialization');
    const configuration = node(initialization, 'configuration');
    const data = value(configuration, 'data');
    if (!data || !value(configuration, 'type')) {
      return send(req, res, 400, faultXml('Incomplete parameters', 'Vm [initialization.configuration.type, initialization.configuration.data] required for add'));
    }
    if (value(configuration, 'type') !== 'ovf') return send(req, res, 400, faultXml('Operation Failed', 'The simulator imports oVirt OVF configurations only.'));
    const ovf = readOvf(data);
    const clusterRef = node(body, 'cluster');
    const cluster = [...clusters.values()].find((c) => c.id === id(clusterRef) || (id(clusterRef) === undefined && c.name === value(clusterRef, 'name')));
    if (!cluster) return send(req, res, 400, faultXml('Operation Failed', `[Cannot add VM. Cluster ${value(clusterRef, 'name') ?? id(clusterRef) ?? ''} doesn't exist.]`));
    const vmName = value(body, 'name') ?? ovf.name;
    if (!vmName) return send(req, res, 400, faultXml('Incomplete parameters', 'Vm [name] required for add'));
    const regenerate = value(initialization, 'regenerate_ids') === 'true';
    // validateNoDuplicateVm: without regenerate_ids the VM keeps the OVF's id, which must be free.
    const existing = ovf.vmId ? vms.get(ovf.vmId) : undefined;
    if (!regenerate && existing) {
      return send(req, res, 409, faultXml('Operation Failed', `[Import VM failed - VM ID already exists in the system. Please remove the VM (${existing.name}) from the system first]`));
    }
    if ([...vms.values()].some((v) => v.name === vmName)) return send(req, res, 409, faultXml('Operation Failed', '[Cannot add VM. The VM name is already in use, please choose a unique name and try again.]'));
    const created: SimVm = { id: regenerate || !ovf.vmId ? randomUUID() : ovf.vmId, name: vmName, status: 'down', cluster: cluster.id, importedOvf: data, disks: [], snapshots: new Map(), attachments: new Map(), checkpoints: [], agent: 'running', frozen: false, freezes: 0, snapshotsQuiesced: [] };
    // attemptToAttachDisksToImportedVm: each OVF disk that exists is attached with the OVF's interface and
    // boot flag. Its DiskVmElement still names the OVF's VM id, so with regenerate_ids the attachment goes to
    // that (old) VM and fails: event 175, and the disks are left to the caller.
    const failed: string[] = [];
    for (const d of ovf.disks) {
      const disk = disks.get(d.diskId);
      if (!disk) continue;
      const taken = [...vms.values()].some((v) => v.attachments.has(d.diskId));
      if (regenerate || taken) {
        failed.push(disk.alias);
        continue;
      }
      created.disks.push(disk.id);
      created.attachments.set(disk.id, { diskId: disk.id, snapshotId: undefined, active: true, bootable: d.boot, interface: DISK_INTERFACES[d.diskInterface] ?? 'ide', device: undefined, fuse: undefined });
    }
    vms.set(created.id, created);
    if (failed.length > 0) event(175, `VM ${vmName} has been imported from the given configuration but the following disk(s) failed to attach: ${failed.join(',')}.`);
    else event(174, `VM ${vmName} has been successfully imported from the given configuration.`);
    return send(req, res, 201, vmXml(created, false));
  };

  // ---- the appliance's view of hot-plugged disks ----
  const plug = async (a: SimAttachment, disk: SimDisk, image: string | undefined, readOnly: boolean): Promise<void> => {
    const device = join(deviceRoot, `virtio-${a.diskId.slice(0, 20)}`);
    await writeFile(device, '');
    const source = image ? ['-f', 'qcow2', image] : [...imageFormatArgs(disk), imageSpec(disk)];
    const fuse = spawn('nbdfuse', [...(readOnly ? ['-r'] : []), device, '--socket-activation', 'qemu-nbd', ...(readOnly ? ['-r'] : []), ...source], { stdio: 'ignore' });
    a.fuse = fuse;
    for (let i = 0; i < 200; i += 1) {
      if ((await stat(device).then((s) => s.size, () => 0)) > 0) break;
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
    a.device = device;
  };
  const unplug = async (a: SimAttachment): Promise<void> => {
    if (!a.device) return;
    const fuse = a.fuse;
    await tool('umount', [a.device]).catch(() => undefined);
    if (fuse && fuse.exitCode === null) await new Promise((resolve) => fuse.once('exit', resolve));
    await rm(a.device, { force: true });
    a.device = undefined;
    a.fuse = undefined;
  };
  const attachedElsewhere = (snapshot: SimSnapshot): boolean => {
    for (const vm of vms.values()) for (const a of vm.attachments.values()) if (a.snapshotId === snapshot.id) return true;
    return false;
  };

  // ---- HTTP ----
  const send = (req: IncomingMessage & { recordedBody?: string }, res: ServerResponse, status: number, body: string, type = 'application/xml'): void => {
    const correlation = req.headers['correlation-id'];
    res.writeHead(status, { 'Content-Type': type, 'Content-Length': String(Buffer.byteLength(body)), ...(typeof correlation === 'string' ? { 'Correlation-Id': correlation.replace(/[^0-9a-zA-Z_-]/g, '') } : {}) });
    res.end(body);
    requests.push({ method: req.method ?? '', path: req.url ?? '', headers: req.headers, body: req.recordedBody ?? '', status });
  };
  /** A missing entity: 404 with no body (BaseBackendResource.handleError, AbstractBackendSubResource.performGet). */
  const notFound = (req: IncomingMessage, res: ServerResponse): void => send(req, res, 404, '', 'text/html');
  const readBody = async (req: IncomingMessage & { recordedBody?: string }): Promise<string> => {
    const chunks: Buffer[] = [];
    for await (const chunk of req) chunks.push(chunk as Buffer);
    req.recordedBody = Buffer.concat(chunks).toString('utf8');
    return req.recordedBody;
  };

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const url = new URL(req.url ?? '/', 'http://sim');
    const method = req.method ?? 'GET';
    if (url.pathname === '/ovirt-engine/sso/oauth/token' && method === 'POST') {
      const form = new URLSearchParams(await readBody(req));
      if (form.get('grant_type') !== 'password' || form.get('scope') !== 'ovirt-app-api') {
        return send(req, res, 400, JSON.stringify({ error: 'invalid_request', error_description: 'grant_type=password and scope=ovirt-app-api are required' }), 'application/json');
      }
      if (form.get('username') !== username || form.get('password') !== password) {
        return send(req, res, 400, JSON.stringify({ error: 'access_denied', error_description: 'Cannot authenticate user: Invalid credentials' }), 'application/json');
      }
      const token = randomUUID();
      tokens.add(token);
      return send(req, res, 200, JSON.stringify({ access_token: token, token_type: 'bearer', scope: 'ovirt-app-api', exp: String(Date.now() + 3_600_000) }), 'application/json');
    }
    if (url.pathname === '/ovirt-engine/services/sso-logout' && method === 'POST') {
      // SsoLogoutServlet: revoke `token` for `scope`, answer the revoke response as JSON.
      const form = new URLSearchParams(await readBody(req));
      const token = form.get('token') ?? '';
      if (form.get('scope') !== 'ovirt-app-api' || !tokens.has(token)) return send(req, res, 200, JSON.stringify({ error: 'invalid_grant', error_description: 'The token is not valid' }), 'application/json');
      tokens.delete(token);
      loggedOut.push(token);
      return send(req, res, 200, '{}', 'application/json');
    }
    if (!url.pathname.startsWith(API)) return notFound(req, res);
    const auth = req.headers.authorization ?? '';
    const authorized = (): boolean => auth.startsWith('Bearer ') && tokens.has(auth.slice(7));
    if (!authorized()) {
      res.setHeader('WWW-Authenticate', 'Bearer');
      return send(req, res, 401, '', 'text/html');
    }
    if (expireAfter >= 0 && expireAfter-- === 0) tokens.clear();
    if (restartAfter && restartAfter.path.test(url.pathname) && restartAfter.left-- === 0) {
      restartAfter = undefined;
      await restart();
    }
    if (!authorized()) {
      res.setHeader('WWW-Authenticate', 'Bearer');
      return send(req, res, 401, '', 'text/html');
    }
    const requestedVersion = req.headers.version;
    if (requestedVersion !== undefined && requestedVersion !== '4') return send(req, res, 400, faultXml('Operation Failed', `Version ${String(requestedVersion)} is not supported`));
    const path = url.pathname.slice(API.length).replace(/\/$/, '');
    const allContent = req.headers['all-content'] === 'true' || url.searchParams.get('all_content') === 'true';
    const conflict = conflicts.find((c) => c.method === method && c.path.test(path) && c.left > 0);
    if (conflict) {
      conflict.left -= 1;
      return send(req, res, 409, faultXml('Operation Failed', '[Cannot perform action. Related operation is currently in progress. Please try again later.]'));
    }
    const search = /^name=(.+)$/.exec(url.searchParams.get('search') ?? '')?.[1];

    if (path === '' && method === 'GET') {
      return send(req, res, 200, `<api><product_info><name>oVirt Engine</name><vendor>ovirt.org</vendor><version><build>${version[3] ?? 0}</build><full_version>${version.join('.')}-sim</full_version><major>${version[0]}</major><minor>${version[1]}</minor><revision>${version[2] ?? 0}</revision></version></product_info></api>`);
    }
    if (path === '/vms' && method === 'GET') {
      const list = [...vms.values()].filter((vm) => search === undefined || vm.name === search);
      return send(req, res, 200, `<vms>${list.map((vm) => vmXml(vm, allContent)).join('')}</vms>`);
    }
    if (path === '/vms' && method === 'POST') return postVm(req, res);
    // EventsService.List: newest first; `from`: only the events with greater ids; `max`: at most that many.
    if (path === '/events' && method === 'GET') {
      const from = Number(url.searchParams.get('from') ?? '0');
      const max = Number(url.searchParams.get('max') ?? String(events.length));
      const listed = events.filter((e) => e.id > from).reverse().slice(0, max);
      return send(req, res, 200, `<events>${listed.map((e) => `<event href="${API}/events/${e.id}" id="${e.id}"><code>${e.code}</code><description>${xmlEscape(e.description)}</description><origin>oVirt</origin><severity>normal</severity></event>`).join('')}</events>`);
    }
    if (path === '/clusters' && method === 'GET') {
      return send(req, res, 200, `<clusters>${[...clusters.values()].filter((c) => search === undefined || c.name === search).map(clusterXml).join('')}</clusters>`);
    }
    const clusterPath = /^\/clusters\/([^/]+)$/.exec(path);
    if (clusterPath && method === 'GET') {
      const c = clusters.get(clusterPath[1]!);
      return c ? send(req, res, 200, clusterXml(c)) : notFound(req, res);
    }
    if (path === '/datacenters' && method === 'GET') {
      return send(req, res, 200, `<data_centers>${[...dataCenters.values()].map((dc) => `<data_center href="${API}/datacenters/${dc.id}" id="${dc.id}"><name>${xmlEscape(dc.name)}</name><status>up</status></data_center>`).join('')}</data_centers>`);
    }
    const dcDomains = /^\/datacenters\/([^/]+)\/storagedomains$/.exec(path);
    if (dcDomains && method === 'GET') {
      if (!dataCenters.has(dcDomains[1]!)) return notFound(req, res);
      const list = [...storageDomains.values()].filter((sd) => sd.dataCenter === dcDomains[1]);
      return send(req, res, 200, `<storage_domains>${list.map((sd) => storageDomainXml(sd, true)).join('')}</storage_domains>`);
    }
    if (path === '/storagedomains' && method === 'GET') {
      return send(req, res, 200, `<storage_domains>${[...storageDomains.values()].filter((sd) => search === undefined || sd.name === search).map((sd) => storageDomainXml(sd, false)).join('')}</storage_domains>`);
    }
    const domainPath = /^\/storagedomains\/([^/]+)$/.exec(path);
    if (domainPath && method === 'GET') {
      const sd = storageDomains.get(domainPath[1]!);
      return sd ? send(req, res, 200, storageDomainXml(sd, false)) : notFound(req, res);
    }
    if (path === '/disks' && method === 'POST') return postDisk(req, res);
    const diskMatch = /^\/disks\/([^/]+)$/.exec(path);
    if (diskMatch && method === 'GET') {
      const disk = disks.get(diskMatch[1]!);
      return disk ? send(req, res, 200, diskXml(disk)) : notFound(req, res);
    }
    if (diskMatch && method === 'DELETE') {
      const disk = disks.get(diskMatch[1]!);
      if (!disk) return notFound(req, res);
      if (disk.status === 'locked') return send(req, res, 409, faultXml('Operation Failed', '[Cannot remove Virtual Disk: Disk is locked. Please try again later.]'));
      for (const owner of vms.values()) {
        if (owner.attachments.has(disk.id)) return send(req, res, 409, faultXml('Operation Failed', `[Cannot remove Virtual Disk. The disk is attached to VM ${owner.name}.]`));
      }
      disks.delete(disk.id);
      await rm(disk.image, { force: true });
      return send(req, res, 200, '<action><status>complete</status></action>');
    }
    if (path === '/imagetransfers' && method === 'POST') return postTransfer(req, res);
    const transferPath = /^\/imagetransfers\/([^/]+)(?:\/(finalize|cancel|extend|pause|resume))?$/.exec(path);
    if (transferPath && transferPath[2] && method === 'POST') {
      await readBody(req);
      return transferAction(req, res, transferPath[1]!, transferPath[2]);
    }
    if (transferPath && !transferPath[2] && method === 'GET') {
      const transfer = transfers.get(transferPath[1]!);
      return transfer ? send(req, res, 200, transferXml(transfer)) : notFound(req, res);
    }

    const vmPath = /^\/vms\/([^/]+)(\/.*)?$/.exec(path);
    if (!vmPath) return notFound(req, res);
    const vm = vms.get(vmPath[1]!);
    if (!vm) return notFound(req, res);
    const rest = vmPath[2] ?? '';

    if (rest === '' && method === 'GET') return send(req, res, 200, vmXml(vm, allContent));
    if (rest === '' && method === 'DELETE') {
      if (vm.status === 'up') return send(req, res, 409, faultXml('Operation Failed', '[Cannot remove VM. VM is running.]'));
      // Removing a VM removes its disks too (unless detach_only), as the engine does.
      for (const a of vm.attachments.values()) await unplug(a);
      for (const d of vm.disks) {
        const disk = disks.get(d);
        if (disk) await rm(disk.image, { force: true });
        disks.delete(d);
      }
      vms.delete(vm.id);
      return send(req, res, 200, '<action><status>complete</status></action>');
    }

    // FreezeVmCommand / ThawVmCommand (REST BackendVmResource.freezeFilesystems, thawFilesystems): the VM must
    // be up (ACTION_TYPE_FAILED_VM_STATUS_ILLEGAL, CONFLICT); VDSM's answer decides; a VDS error fails the
    // command in execute, said with VdsmErrors' text (400). Events FREEZE_VM_SUCCESS 10767 /
    // USER_FAILED_TO_FREEZE_VM 10769, THAW_VM_SUCCESS 10768 / USER_FAILED_TO_THAW_VM 10770.
    if ((rest === '/freezefilesystems' || rest === '/thawfilesystems') && method === 'POST') {
      await readBody(req);
      const freeze = rest === '/freezefilesystems';
      if (vm.status !== 'up') return send(req, res, 409, faultXml('Operation Failed', `[Cannot ${freeze ? 'freeze' : 'thaw'} VM because the VM is in ${vm.status === 'down' ? 'Down' : vm.status} status.]`));
      if (freeze && vm.agent === 'late') {
        // The engine's call to VDSM timed out (VdsmErrors/AppErrors VDS_NETWORK_ERROR); the freeze lands later.
        setTimeout(() => {
          vm.frozen = true;
          vm.freezes += 1;
          vm.lateFreezeLanded = true;
        }, LATE_FREEZE_MS);
        event(10769, `Failed to freeze guest filesystems on ${vm.name} (Host: ${HOST_NAME}, User: admin@internal).`);
        return send(req, res, 400, faultXml('Operation Failed', '[Message timeout which can be caused by communication issues]'));
      }
      if (freeze) {
        const result = vdsmFreeze(vm);
        if (!result.ok) {
          event(10769, `Failed to freeze guest filesystems on ${vm.name} (Host: ${HOST_NAME}, User: admin@internal).`);
          return send(req, res, 400, faultXml('Operation Failed', `[${VDSM_ERRORS[result.name]}]`));
        }
        event(10767, `Guest filesystems on VM ${vm.name} have been frozen successfully.`);
      } else {
        if (!vdsmThaw(vm).ok) {
          event(10770, `Failed to thaw guest filesystems on ${vm.name} (Host: ${HOST_NAME}, User: admin@internal).`);
          return send(req, res, 400, faultXml('Operation Failed', `[${VDSM_ERRORS.nonresp}]`));
        }
        event(10768, `Guest filesystems on VM ${vm.name} have been thawed successfully.`);
      }
      return send(req, res, 200, '<action><status>complete</status></action>');
    }
    if (rest === '/snapshots' && method === 'GET') {
      return send(req, res, 200, `<snapshots>${activeSnapshotXml(vm)}${[...vm.snapshots.values()].map((s) => snapshotXml(vm, s, false)).join('')}</snapshots>`);
    }
    if (rest === '/snapshots' && method === 'POST') {
      const body = parseBody(await readBody(req), 'snapshot');
      const description = value(body, 'description');
      if (!description) return send(req, res, 400, faultXml('Incomplete parameters', 'Snapshot [description] required for add'));
      if ([...vm.snapshots.values()].some((s) => s.status === 'locked')) {
        return send(req, res, 409, faultXml('Operation Failed', `[Cannot create Snapshot. Snapshot is currently being created for VM ${vm.name}.]`));
      }
      const snapshot = createSnapshot(vm, description);
      return send(req, res, 202, snapshotXml(vm, snapshot, false).replace('</snapshot>', '<creation_status>pending</creation_status></snapshot>'));
    }
    const snapPath = /^\/snapshots\/([^/]+)(\/disks)?$/.exec(rest);
    if (snapPath) {
      const snapshot = vm.snapshots.get(snapPath[1]!);
      if (!snapshot) return notFound(req, res);
      if (snapPath[2] && method === 'GET') {
        const items = [...snapshot.frozen.keys()].filter((d) => disks.has(d)).map((d) => diskXml(disks.get(d)!, `<snapshot id="${snapshot.id}"/>`));
        return send(req, res, 200, `<disks>${items.join('')}</disks>`);
      }
      if (!snapPath[2] && method === 'GET') return send(req, res, 200, snapshotXml(vm, snapshot, allContent));
      if (!snapPath[2] && method === 'DELETE') {
        if (attachedElsewhere(snapshot)) {
          return send(req, res, 409, faultXml('Operation Failed', `[Cannot remove Snapshot: The following disks snapshots are attached to other VMs. Please detach them from those VMs and try again.]`));
        }
        // RemoveSnapshotCommand: refused while the VM is during a backup (but for the hybrid backup's own removal).
        if ([...backups.values()].some((b) => b.vmId === vm.id && b.phase !== 'succeeded' && b.phase !== 'failed')) {
          return send(req, res, 409, faultXml('Operation Failed', '[Cannot remove Snapshot. The VM is during a backup operation.]'));
        }
        if (snapshot.status === 'locked') return send(req, res, 409, faultXml('Operation Failed', '[Cannot remove Snapshot. Snapshot is currently being created or removed.]'));
        removeSnapshot(vm, snapshot);
        return send(req, res, 200, '<action><status>complete</status></action>');
      }
    }

    if (rest === '/checkpoints' && method === 'GET') {
      return send(req, res, 200, `<checkpoints>${vm.checkpoints.map((c) => checkpointXml(vm, c)).join('')}</checkpoints>`);
    }
    const checkpointPath = /^\/checkpoints\/([^/]+)$/.exec(rest);
    if (checkpointPath) {
      const checkpoint = vm.checkpoints.find((c) => c.id === checkpointPath[1]);
      if (!checkpoint) return notFound(req, res);
      if (method === 'GET') return send(req, res, 200, checkpointXml(vm, checkpoint));
      if (method === 'DELETE') {
        // DeleteVmCheckpointCommand: refused during a backup; removes the bitmaps, then re-parents the child;
        // live (VM up) and cold (VM down) take different paths.
        if ([...backups.values()].some((b) => b.vmId === vm.id && b.phase !== 'succeeded' && b.phase !== 'failed')) {
          return send(req, res, 409, faultXml('Operation Failed', '[Cannot remove VM checkpoint. The VM is during a backup operation.]'));
        }
        if (vm.status === 'up') {
          // liveDeleteVmCheckpoint, within the request: VDSM delete_checkpoints → libvirt deletes the
          // checkpoint, whichever of the chain it is (not only the oldest), removing its own bitmap from each
          // disk (qemuCheckpointDiscardBitmaps), and oVirt re-parents its child. A bitmap missing from a disk
          // fails it ("bitmap … not found in backing chain"): event 10798, the checkpoint stays, and the
          // command fails without a message (500, as BaseBackendResource.handleError answers that).
          const lost: string[] = [];
          for (const d of checkpoint.disks) {
            const disk = disks.get(d);
            if (disk && !(await bitmapsOf(disk.image)).includes(`sim-${checkpoint.id}`)) lost.push(disk.alias);
          }
          if (lost.length > 0) {
            event(10798, `Failed to delete checkpoint ${checkpoint.id} for VM ${vm.name}: bitmap not found in ${lost.join(', ')}`);
            return send(req, res, 500, faultXml('Operation Failed', ''));
          }
          for (const d of checkpoint.disks) {
            const disk = disks.get(d);
            if (disk) await tool('qemu-img', ['bitmap', '--remove', disk.image, `sim-${checkpoint.id}`]);
          }
          for (const child of vm.checkpoints) if (child.parentId === checkpoint.id) child.parentId = checkpoint.parentId;
          vm.checkpoints = vm.checkpoints.filter((c) => c !== checkpoint);
          event(10797, `Checkpoint ${checkpoint.id} for VM ${vm.name} deleted`);
          return send(req, res, 200, '<action><status>complete</status></action>');
        }
        checkpoint.state = 'invalid'; // a cold delete invalidates first
        later(lockMs, async () => {
          for (const d of checkpoint.disks) {
            const disk = disks.get(d);
            if (disk) await tool('qemu-img', ['bitmap', '--remove', disk.image, `sim-${checkpoint.id}`]).catch(() => undefined);
          }
          for (const child of vm.checkpoints) if (child.parentId === checkpoint.id) child.parentId = checkpoint.parentId;
          vm.checkpoints = vm.checkpoints.filter((c) => c !== checkpoint);
          event(10797, `Checkpoint ${checkpoint.id} for VM ${vm.name} deleted`);
        });
        return send(req, res, 200, '<action><status>complete</status></action>');
      }
    }
    if (rest === '/backups' && method === 'GET') {
      return send(req, res, 200, `<backups>${[...backups.values()].filter((b) => b.vmId === vm.id).map((b) => backupXml(vm, b)).join('')}</backups>`);
    }
    if (rest === '/backups' && method === 'POST') return postBackup(req, res, vm, url);
    const backupPath = /^\/backups\/([^/]+)(\/disks|\/finalize)?$/.exec(rest);
    if (backupPath) {
      const backup = backups.get(backupPath[1]!);
      if (!backup || backup.vmId !== vm.id) return notFound(req, res);
      if (!backupPath[2] && method === 'GET') return send(req, res, 200, backupXml(vm, backup));
      if (backupPath[2] === '/disks' && method === 'GET') {
        return send(req, res, 200, `<disks>${backup.disks.filter((d) => disks.has(d)).map((d) => diskXml(disks.get(d)!)).join('')}</disks>`);
      }
      if (backupPath[2] === '/finalize' && method === 'POST') {
        await readBody(req);
        return finalizeBackup(req, res, vm, backup);
      }
    }

    if (rest === '/diskattachments' && method === 'GET') {
      return send(req, res, 200, `<disk_attachments>${[...vm.attachments.values()].map((a) => attachmentXml(vm, a)).join('')}</disk_attachments>`);
    }
    if (rest === '/diskattachments' && method === 'POST') {
      const body = parseBody(await readBody(req), 'disk_attachment');
      const diskNode = node(body, 'disk');
      const diskId = id(diskNode);
      const snapshotId = id(node(diskNode, 'snapshot'));
      const active = value(body, 'active') === 'true';
      const diskInterface = value(body, 'interface');
      if (!diskId) return send(req, res, 400, faultXml('Incomplete parameters', 'DiskAttachment [disk.id] required for add'));
      if (!diskInterface || !Object.values(DISK_INTERFACES).includes(diskInterface as SimInterface)) return send(req, res, 400, faultXml('Incomplete parameters', 'DiskAttachment [interface] required for add'));
      const disk = disks.get(diskId);
      if (!disk) return notFound(req, res);
      if (vm.attachments.has(diskId)) return send(req, res, 409, faultXml('Operation Failed', '[Cannot attach Virtual Disk. The disk is already attached to VM.]'));
      let frozen: string | undefined;
      if (snapshotId) {
        const snapshot = [...vms.values()].find((v) => v.snapshots.has(snapshotId))?.snapshots.get(snapshotId);
        frozen = snapshot?.frozen.get(diskId);
        if (!snapshot || !frozen || snapshot.status !== 'ok') return send(req, res, 400, faultXml('Operation Failed', `[Cannot attach Virtual Disk. Snapshot ${snapshotId} of disk ${diskId} is not available.]`));
      }
      if (!snapshotId && disk.status !== 'ok') return send(req, res, 409, faultXml('Operation Failed', '[Cannot attach Virtual Disk. Disk is locked.]'));
      if (!snapshotId && [...vms.values()].some((v) => v !== vm && v.attachments.has(diskId))) {
        return send(req, res, 409, faultXml('Operation Failed', '[Cannot attach Virtual Disk. The disk is not shareable and is already attached to a VM.]'));
      }
      const attachment: SimAttachment = { diskId, snapshotId, active, bootable: value(body, 'bootable') === 'true', interface: diskInterface as SimInterface, device: undefined, fuse: undefined };
      vm.attachments.set(diskId, attachment);
      if (!snapshotId && !vm.disks.includes(diskId)) vm.disks.push(diskId);
      // A disk of a running VM is hot-plugged; a stopped VM only records the attachment.
      if (active && vm.status === 'up') await plug(attachment, disk, frozen, snapshotId !== undefined);
      return send(req, res, 201, attachmentXml(vm, attachment));
    }
    const attachPath = /^\/diskattachments\/([^/]+)$/.exec(rest);
    if (attachPath) {
      const attachment = vm.attachments.get(attachPath[1]!);
      if (!attachment) return notFound(req, res);
      if (method === 'GET') return send(req, res, 200, attachmentXml(vm, attachment));
      if (method === 'DELETE') {
        if (url.searchParams.get('detach_only') === 'false' && attachment.snapshotId) {
          return send(req, res, 400, faultXml('Operation Failed', '[Cannot remove a disk snapshot attachment with detach_only=false.]'));
        }
        await unplug(attachment);
        vm.attachments.delete(attachment.diskId);
        vm.disks = vm.disks.filter((d) => d !== attachment.diskId);
        return send(req, res, 200, '<action><status>complete</status></action>');
      }
    }
    return notFound(req, res);
  };

  const onRequest = (req: IncomingMessage, res: ServerResponse): void => {
    handle(req, res).catch((error: unknown) => send(req, res, 500, faultXml('Internal Server Error', String(error))));
  };
  const server: Server = options.tls ? createHttpsServer({ key: options.tls.key, cert: options.tls.cert }, onRequest) : createServer(onRequest);
  await new Promise<void>((resolve) => server.listen(options.port ?? 0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;

  const newDisk = async (spec: { alias: string; size: string }): Promise<SimDisk> => {
    const diskId = randomUUID();
    const image = join(imagesDir, `${diskId}.qcow2`);
    await tool('qemu-img', ['create', '-q', '-f', 'qcow2', image, spec.size]);
    const size = (JSON.parse(await tool('qemu-img', ['info', '--output=json', image])) as { 'virtual-size': number })['virtual-size'];
    const disk: SimDisk = { id: diskId, imageId: randomUUID(), alias: spec.alias, size, format: 'cow', image, status: 'ok', storageDomain: STORAGE_DOMAIN_ID, lvSize: undefined, backupMode: undefined };
    disks.set(diskId, disk);
    return disk;
  };
  const attachOwn = (vm: SimVm, disk: SimDisk, spec: { active?: boolean; interface?: SimInterface; bootable?: boolean }, first: boolean): void => {
    vm.disks.push(disk.id);
    vm.attachments.set(disk.id, { diskId: disk.id, snapshotId: undefined, active: spec.active ?? true, bootable: spec.bootable ?? first, interface: spec.interface ?? 'virtio', device: undefined, fuse: undefined });
  };

  return {
    url: `${options.tls ? 'https' : 'http'}://127.0.0.1:${port}`,
    imageioUrl: imageio.daemonUrl,
    imageioProxyUrl: imageio.proxyUrl,
    imageio,
    backups,
    transfers,
    deviceRoot,
    vms,
    disks,
    clusters,
    dataCenters,
    storageDomains,
    requests,
    events,
    loggedOut,
    faults: {
      conflict: (method, path, count) => conflicts.push({ method, path, left: count }),
      expireTokens: () => tokens.clear(),
      failNextSnapshot: () => {
        failNextSnapshot = true;
      },
      expireTokensAfter: (count) => {
        expireAfter = count;
      },
      stopNextTransfer: () => {
        stopNextTransfer = true;
      },
      failNextCheckpointRedefinition: () => {
        failNextRedefinition = true;
      },
      failNextBackupSnapshotRemoval: () => {
        failNextBackupSnapshotRemoval = true;
      },
      loseCheckpointBitmap: async (vm, checkpointId) => {
        const checkpoint = vm.checkpoints.find((c) => c.id === checkpointId);
        if (!checkpoint) throw new Error(`VM ${vm.name} has no checkpoint ${checkpointId}`);
        for (const d of checkpoint.disks) await tool('qemu-img', ['bitmap', '--remove', disks.get(d)!.image, `sim-${checkpointId}`]);
      },
      slowReads: (diskId, ms) => {
        slowDisks.set(diskId, ms);
      },
      restartEngine: () => restart(),
      restartEngineAfter: (path, count) => {
        restartAfter = { path, left: count };
      },
    },
    async addDisk(vm, alias, size) {
      const disk = await newDisk({ alias, size });
      attachOwn(vm, disk, {}, false);
      return disk;
    },
    async addVm(name, diskSpecs, status = 'up', vmOptions = {}) {
      const cluster = vmOptions.cluster ? [...clusters.values()].find((c) => c.name === vmOptions.cluster)?.id : CLUSTER_ID;
      if (!cluster) throw new Error(`no cluster ${vmOptions.cluster}`);
      const vm: SimVm = { id: randomUUID(), name, status, cluster, importedOvf: undefined, disks: [], snapshots: new Map(), attachments: new Map(), checkpoints: [], agent: 'running', frozen: false, freezes: 0, snapshotsQuiesced: [] };
      for (const [i, spec] of diskSpecs.entries()) attachOwn(vm, await newDisk(spec), spec, i === 0);
      vms.set(vm.id, vm);
      return vm;
    },
    addCluster(name, clusterVersion, dataCenter = DATA_CENTER_ID) {
      const clusterId = randomUUID();
      clusters.set(clusterId, { id: clusterId, name, version: clusterVersion, dataCenter });
      return clusterId;
    },
    addDataCenter(name) {
      const dcId = randomUUID();
      dataCenters.set(dcId, { id: dcId, name });
      return dcId;
    },
    addStorageDomain(spec) {
      const sdId = randomUUID();
      storageDomains.set(sdId, { id: sdId, name: spec.name, type: 'data', storage: spec.storage, dataCenter: spec.dataCenter, status: spec.status ?? 'active', available: spec.available ?? 1024 * 1024 * MiB });
      return sdId;
    },
    imageSpec,
    stop: async () => {
      stopped = true;
      clearInterval(inactivityMonitor);
      for (const timer of timers) clearTimeout(timer);
      for (const backup of backups.values()) await stopExports(backup);
      for (const t of transfers.values()) if (t.upload) await stopExport(t.upload.pid, t.upload.socket);
      await imageio.close();
      for (const vm of vms.values()) for (const a of vm.attachments.values()) await unplug(a);
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
