/**
 * Image transfers (a download of a backup disk, an upload for a restore): start, finalize, cancel, with the
 * phases oVirt really goes through (ovirt-engine TransferDiskImageCommand's state handlers):
 *   initializing → transferring → (finalize) finalizing_success → finished_success
 *   cancelled_system → finalizing_failure → finished_failure          (stopped by oVirt, e.g. idle too long)
 *   cancelled_user → finalizing_cleanup → finished_cleanup → finished_failure     (cancelled by a client)
 * Only finished_success and finished_failure are final; a failed upload deletes its disk. Engines before
 * 4.4.7 delete the transfer as soon as it ends, so a 404 after finalize means "look at the disk" (the SDK's
 * helpers/imagetransfer.py `finalize_transfer`). Anything but initializing or transferring while starting
 * is cancelled at once (the SDK's `create_transfer`), not waited on.
 */
import { OvirtFaultError } from '../errors.js';
import type { OvirtClient } from './client.js';
import { isNotFound, type Wait } from './common.js';
import type { ImageioUrls } from './imageio-connection.js';
import { DiskFormat, DiskStatus, ImageTransferDirection, ImageTransferPhase, ImageTransferTimeoutPolicy, type ImageTransferDirectionValue } from './vocabulary.js';
import { createdId, diskStatus, transferOf, type TransferSummary } from './answers.js';

/**
 * Seconds a transfer may sit without a request before oVirt stops it (types/ImageTransfer.java
 * `inactivity_timeout`; oVirt's own default is TransferImageClientInactivityTimeoutInSeconds = 60). A
 * transfer is opened right before its disk is read, but the reading may stall behind a slow repository:
 * 300 s by default, ENGINE_OVIRT_INACTIVITY_TIMEOUT (seconds) overrides.
 */
export function transferInactivityTimeout(): number {
  const value = process.env.ENGINE_OVIRT_INACTIVITY_TIMEOUT;
  return value !== undefined && /^[1-9]\d*$/.test(value) ? Number(value) : 300;
}

const final = (phase: string | undefined): boolean => phase === ImageTransferPhase.finishedSuccess || phase === ImageTransferPhase.finishedFailure;

async function currentTransfer(client: OvirtClient, id: string): Promise<TransferSummary | 'gone'> {
  try {
    return await client.read(`imagetransfers/${id}`, transferOf);
  } catch (error) {
    if (isNotFound(error)) return 'gone';
    throw error;
  }
}

/** Asks oVirt to cancel a transfer (a missing one is fine: TransferImageStatus answers for it anyway). */
async function requestCancel(client: OvirtClient, id: string): Promise<void> {
  await client.post(`imagetransfers/${id}/cancel`, 'action', {}).catch((error: unknown) => {
    if (!isNotFound(error)) throw error;
  });
}

/**
 * Creates a transfer; `onCreated` runs as soon as its id is known (to journal it). Waits for
 * `transferring`; any other phase, or the transfer vanishing, cancels it and fails.
 */
export async function startTransfer(
  client: OvirtClient,
  body: { disk: string; backup?: string; direction: ImageTransferDirectionValue },
  onCreated: (id: string) => Promise<void>,
  wait: Wait,
): Promise<{ id: string } & ImageioUrls> {
  const answer = (
    await client.post('imagetransfers', 'image_transfer', {
      disk: { '@_id': body.disk },
      ...(body.backup ? { backup: { '@_id': body.backup } } : {}),
      direction: body.direction,
      // format=raw: the NBD backend, raw guest data whatever the disk's format (the SDK's create_transfer).
      format: DiskFormat.raw,
      inactivity_timeout: transferInactivityTimeout(),
      timeout_policy: ImageTransferTimeoutPolicy.cancel,
    })
  ).xml;
  const id = createdId(answer, 'image_transfer', 'POST imagetransfers', 'transfer');
  await onCreated(id);
  const ready = await client.waitFor(`image transfer ${id} to start`, async () => {
    const transfer = await currentTransfer(client, id);
    if (transfer === 'gone') throw new OvirtFaultError(`image transfer ${id}`, 404, 'the transfer was removed while it started', 'see the engine events');
    const { phase } = transfer;
    if (phase === ImageTransferPhase.transferring) return transfer;
    if (phase === ImageTransferPhase.initializing) return undefined;
    if (!final(phase)) await requestCancel(client, id);
    throw new OvirtFaultError(`image transfer ${id}`, 200, `the transfer went to phase ${phase ?? '(none)'} instead of transferring`, final(phase) ? 'the engine or the host stopped it' : 'cancelled');
  }, wait);
  const offered = [ready.transferUrl, ready.proxyUrl] as const;
  if (!offered[0] && !offered[1]) throw new OvirtFaultError(`image transfer ${id}`, 200, 'the transfer has neither transfer_url nor proxy_url', '');
  // Only a URL that keeps the engine's security is followed (https from an https engine, url-policy.ts): a
  // downgraded one is dropped here, and when both are, followable() refuses the transfer (it is journaled,
  // so the run's clean-up cancels it).
  const keep = (url: string | undefined): string | undefined => {
    if (!url) return undefined;
    try {
      return client.followable(`image transfer ${id}`, [url]);
    } catch {
      return undefined;
    }
  };
  const transferUrl = keep(offered[0]);
  const proxyUrl = keep(offered[1]);
  if (!transferUrl && !proxyUrl) client.followable(`image transfer ${id}`, [...offered]);
  return { id, transferUrl, proxyUrl };
}

/**
 * Finalizes a transfer and waits for finished_success. finished_failure, or paused_system (oVirt could not
 * finalize it; the disk is illegal), fails. A transfer that vanished (engines before 4.4.7) is judged by its
 * disk: `ok` is success, a missing or other disk a failure; for a download there is nothing to judge.
 */
export async function finalizeTransfer(client: OvirtClient, transfer: { id: string; disk: string; direction: ImageTransferDirectionValue }, wait: Wait): Promise<void> {
  const { id } = transfer;
  await client.post(`imagetransfers/${id}/finalize`, 'action', {}).catch((error: unknown) => {
    if (!isNotFound(error)) throw error;
  });
  const outcome = await client.waitFor(`image transfer ${id} to finish`, async () => {
    const current = await currentTransfer(client, id);
    if (current === 'gone') return 'gone';
    const { phase } = current;
    if (phase === ImageTransferPhase.finishedSuccess) return 'done';
    if (phase === ImageTransferPhase.finishedFailure) throw new OvirtFaultError(`image transfer ${id}`, 200, 'the transfer ended in phase finished_failure', transfer.direction === ImageTransferDirection.upload ? 'oVirt removes the disk of a failed upload' : '');
    if (phase === ImageTransferPhase.pausedSystem) throw new OvirtFaultError(`image transfer ${id}`, 200, 'oVirt could not finalize the transfer (phase paused_system)', 'the disk is left illegal');
    return undefined;
  }, wait);
  if (outcome === 'done' || transfer.direction === ImageTransferDirection.download) return;
  let status: string | undefined;
  try {
    status = await client.read(`disks/${transfer.disk}`, diskStatus);
  } catch (error) {
    if (isNotFound(error)) throw new OvirtFaultError(`image transfer ${id}`, 404, `the transfer failed: oVirt removed disk ${transfer.disk}`, '');
    throw error;
  }
  if (status !== DiskStatus.ok) throw new OvirtFaultError(`image transfer ${id}`, 200, `the transfer failed: disk ${transfer.disk} is ${status ?? 'in no status'}`, '');
}

/** Cancels a transfer and waits until it has really ended (finished_*, or gone). */
export async function cancelTransfer(client: OvirtClient, id: string, wait: Wait): Promise<void> {
  await requestCancel(client, id);
  await client.waitFor(`image transfer ${id} to end`, async () => {
    const current = await currentTransfer(client, id);
    return current === 'gone' || final(current.phase) ? true : undefined;
  }, wait);
}
