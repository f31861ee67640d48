/** Image transfers (download for backups, upload for restores): start, wait, finalize. */
import { OvirtFaultError } from '../errors.js';
import type { OvirtClient } from './client.js';
import type { Wait } from './common.js';
import { attribute, child, text } from './xml.js';

function phaseOf(client: OvirtClient, id: string): Promise<string | undefined> {
  return client.get(`imagetransfers/${id}`).then((r) => text(child(r.xml, 'image_transfer'), 'phase'));
}

/** Creates a transfer; `onCreated` runs as soon as its id is known (to journal it). Returns its data URL. */
export async function startTransfer(
  client: OvirtClient,
  body: { disk: string; backup?: string; direction: 'download' | 'upload' },
  onCreated: (id: string) => Promise<void>,
  wait: Wait,
): Promise<{ id: string; url: string }> {
  const answer = child(
    (await client.post('imagetransfers', 'image_transfer', {
      disk: { '@_id': body.disk },
      ...(body.backup ? { backup: { '@_id': body.backup } } : {}),
      direction: body.direction,
      format: 'raw',
    })).xml,
    'image_transfer',
  );
  const id = attribute(answer, 'id')!;
  await onCreated(id);
  const ready = await client.waitFor(`image transfer ${id} to start`, async () => {
    const transfer = child((await client.get(`imagetransfers/${id}`)).xml, 'image_transfer');
    const phase = text(transfer, 'phase');
    if (phase === 'transferring') return transfer;
    if (phase === 'paused_system' || phase?.startsWith('finished') || phase?.startsWith('cancelled')) {
      throw new OvirtFaultError(`image transfer ${id}`, 200, `the transfer went to phase ${phase}`, 'the engine or the host stopped it');
    }
    return undefined;
  }, wait);
  // transfer_url (the host's daemon) first, proxy_url (through the engine host) next: whichever keeps https.
  const url = client.followable(`image transfer ${id}`, [text(ready, 'transfer_url'), text(ready, 'proxy_url')]);
  if (!url) throw new OvirtFaultError(`image transfer ${id}`, 200, 'the transfer has no transfer_url', '');
  return { id, url };
}

/** Finalizes a transfer and waits for its end phase ('gone' when the engine already forgot it). */
export async function finalizeTransfer(client: OvirtClient, id: string, wait: Wait): Promise<string> {
  await client.post(`imagetransfers/${id}/finalize`, 'action', {}).catch((error: unknown) => {
    if (!(error instanceof OvirtFaultError && error.status === 404)) throw error;
  });
  return client.waitFor(`image transfer ${id} to finish`, async () => {
    try {
      const phase = await phaseOf(client, id);
      return phase?.startsWith('finished') || phase?.startsWith('cancelled') ? phase : undefined;
    } catch (error) {
      if (error instanceof OvirtFaultError && error.status === 404) return 'gone';
      throw error;
    }
  }, wait);
}
