/**
 * The thaw watchdog of an oVirt quiesce (quiesce.ts), run as its own process: started detached (its own
 * session, so that it outlives the engine killed with -9 or its process group) right before the engine asks
 * oVirt to freeze the guest; it reads its orders as JSON on stdin — the engine's connection options
 * (credentials included: stdin, unlike argv, is not visible to other users), the VM and the freeze timeout —
 * sleeps until the timeout, then logs in, POSTs vms/{id}/thawfilesystems (retrying a few times), logs out and
 * exits. The engine kills it (SIGTERM, by pid) once its own thaw succeeded; when the engine is gone, the guest
 * is thawed by it all the same.
 */
import { OvirtClient, type OvirtClientOptions } from './client.js';

interface Orders {
  ovirt: OvirtClientOptions;
  vm: string;
  afterMs: number;
}

const ATTEMPTS = 5;
const RETRY_MS = 2000;

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

async function readOrders(): Promise<Orders> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return JSON.parse(Buffer.concat(chunks).toString('utf8')) as Orders;
}

async function thaw(orders: Orders): Promise<void> {
  const client = new OvirtClient(orders.ovirt);
  await client.login();
  try {
    await client.post(`vms/${orders.vm}/thawfilesystems`, 'action', {});
  } finally {
    await client.logout().catch(() => undefined);
  }
}

const orders = await readOrders();
await sleep(orders.afterMs);
for (let attempt = 1; attempt <= ATTEMPTS; attempt += 1) {
  try {
    await thaw(orders);
    process.exit(0);
  } catch (error) {
    process.stderr.write(`thaw of VM ${orders.vm} failed (attempt ${attempt}): ${(error as Error).message}\n`);
    if (attempt < ATTEMPTS) await sleep(RETRY_MS);
  }
}
process.exit(1);
