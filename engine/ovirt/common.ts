/** What every oVirt flow shares: options, waits, VM lookup, 404s, and finding attached disks in the appliance. */
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import type { BackupOptions } from '../backup/backup.js';
import { OvirtFaultError } from '../errors.js';
import { blockDeviceSize } from '../sources/device-size.js';
import type { OvirtClient, OvirtClientOptions } from './client.js';
import { VmStatus } from './vocabulary.js';
import { clusterList, clusterOf, diskAttachmentOf, vmList, vmOf, type ClusterSummary } from './answers.js';
import type { Passphrase } from '../../repo-format/passphrase.js';

/** Options of every oVirt backup run. */
export interface OvirtBackupRunOptions {
  repo: string;
  /** The passphrase of an encrypted repository. */
  passphrase?: Passphrase | undefined;
  ovirt: OvirtClientOptions;
  vm: string;
  /** Bounds on the waits (snapshots, hot-plug, backup and transfer phases). */
  timeoutMs?: number | undefined;
  pollMs?: number | undefined;
  workers?: number | undefined;
  sharedPool?: BackupOptions['sharedPool'];
  signal?: AbortSignal | undefined;
  onProgress?: BackupOptions['onProgress'];
  onNotice?: ((message: string) => void) | undefined;
}

/** A disk as the engine knows it: id, name (alias) and provisioned size. */
export interface OvirtDisk {
  id: string;
  alias: string;
  size: number;
}

export function waitOf(options: { timeoutMs?: number | undefined; pollMs?: number | undefined }): Wait {
  return { timeoutMs: options.timeoutMs ?? 600_000, intervalMs: options.pollMs ?? 1000 };
}

export type Wait = { timeoutMs: number; intervalMs: number };

export async function vmIdByName(client: OvirtClient, name: string): Promise<string> {
  const found = (await client.read('vms', vmList, { search: `name=${name}` })).filter((vm) => vm.name === name);
  if (found.length !== 1) throw new InvalidArgumentError(found.length === 0 ? `oVirt has no VM named "${name}"` : `oVirt has ${found.length} VMs named "${name}"`);
  return found[0]!.id;
}

/** A cluster: its compatibility level (features depend on it) and its data centre (where its storage is). */
export interface OvirtCluster {
  id: string;
  name: string;
  version: [number, number];
  dataCenter: string;
}

function clusterFrom(cluster: ClusterSummary | undefined, what: string): OvirtCluster {
  const { id, dataCenter } = cluster ?? {};
  if (!cluster || !id || !dataCenter) throw new InvalidArgumentError(`oVirt's answer for ${what} names no cluster id or data centre`);
  return { id, name: cluster.name ?? id, version: cluster.version, dataCenter };
}

/** The cluster a VM runs in. */
export async function clusterOfVm(client: OvirtClient, vmId: string): Promise<OvirtCluster> {
  const { clusterId } = await client.read(`vms/${vmId}`, vmOf);
  if (!clusterId) throw new InvalidArgumentError(`oVirt names no cluster for VM ${vmId}`);
  return clusterFrom(await client.read(`clusters/${clusterId}`, clusterOf), `cluster ${clusterId}`);
}

export async function clusterByName(client: OvirtClient, name: string): Promise<OvirtCluster> {
  const found = (await client.read('clusters', clusterList, { search: `name=${name}` })).filter((c) => c.name === name);
  if (found.length !== 1) throw new InvalidArgumentError(found.length === 0 ? `oVirt has no cluster named "${name}"` : `oVirt has ${found.length} clusters named "${name}"`);
  return clusterFrom(found[0], `cluster ${name}`);
}

export function atLeast(version: [number, number], major: number, minor: number): boolean {
  return version[0] > major || (version[0] === major && version[1] >= minor);
}

/**
 * A VM that must be running (the backup appliance: disks are hot-plugged into it). A Down VM would take
 * the attachment without ever showing a device; say so at once instead of waiting for one.
 */
export async function requireRunning(client: OvirtClient, vmId: string, name: string): Promise<void> {
  const { status } = await client.read(`vms/${vmId}`, vmOf);
  if (status !== VmStatus.up) throw new InvalidArgumentError(`the appliance VM "${name}" is ${status ?? 'in no known state'}, not up: disks can only be hot-plugged into a running appliance`);
}

export function isNotFound(error: unknown): boolean {
  return error instanceof OvirtFaultError && error.status === 404;
}

/** Size of a block device (sysfs) or a file (the simulator's nbdfuse files); -1 if it is not there. */
async function deviceSize(path: string): Promise<number> {
  const info = await stat(path).catch(() => undefined);
  if (!info) return -1;
  if (info.isBlockDevice()) return blockDeviceSize(info.rdev, (why) => new InvalidArgumentError(`${path}: ${why}`)).catch(() => -1);
  return info.isFile() ? info.size : -1;
}

/**
 * The attached disk inside the appliance: /dev/disk/by-id/virtio-<first 20 characters of the disk id>
 * (the virtio serial oVirt sets), checked against the disk's size; the guest agent's logical_name is the
 * fallback. Polled: hot-plug takes a moment.
 */
export async function findDevice(client: OvirtClient, applianceId: string, disk: OvirtDisk, deviceRoot: string, wait: Wait): Promise<string> {
  const byId = join(deviceRoot, `virtio-${disk.id.slice(0, 20)}`);
  return client.waitFor(`disk ${disk.id} to appear in the appliance`, async () => {
    const size = await deviceSize(byId);
    if (size === disk.size) return byId;
    const logical = (await client.read(`vms/${applianceId}/diskattachments/${disk.id}`, diskAttachmentOf)).logicalName;
    if (logical && (await deviceSize(logical)) === disk.size) return logical;
    if (size > 0) throw new InvalidArgumentError(`${byId} holds ${size} bytes, disk ${disk.id} has ${disk.size}: not the disk that was attached`);
    return undefined;
  }, wait);
}
