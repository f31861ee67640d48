/**
 * The thaw watchdog of a quiesce (libvirt: ../cbt/guest-quiesce.ts; oVirt: ../ovirt/quiesce.ts), run as its own
 * process, one for both. Started detached (its own session, so that it outlives the engine killed with -9 or its
 * process group) right before the engine asks for the freeze; its orders come as JSON on stdin (the oVirt
 * connection carries credentials: stdin, unlike argv, is not visible to other users). It sleeps `afterMs`, then
 * thaws the guest, and keeps trying (a bounded backoff, no fixed count: a libvirtd or oVirt engine restarting, a
 * freeze that lands late because the agent was slow, an agent that answers late) until a thaw succeeded AND the
 * guest says it is thawed (libvirt: the agent's guest-fsfreeze-status; oVirt: its thawfilesystems succeeding,
 * VDSM's thaw being the agent's), or the guest is gone (the domain undefined or shut off; the VM not up).
 *
 * Signals: SIGUSR2 is the engine's "my own thaw succeeded, you may go" (thaw-watchdog-control.ts); SIGTERM, SIGINT
 * and SIGHUP are ignored — a systemd unit or container stopping sends SIGTERM to its whole cgroup, and that is no
 * reason to leave a guest frozen. A SIGKILL of the whole cgroup (systemd's KillMode=control-group, the default,
 * after its stop timeout) kills it all the same: SPEC.md 11.2 says so.
 */
import { OvirtClient, type OvirtClientOptions } from '../ovirt/client.js';
import { OvirtFaultError } from '../errors.js';
import { runToolOutput } from '../cbt/run-tool.js';

export type ThawOrders =
  | { afterMs: number; libvirt: string }
  | { afterMs: number; ovirt: OvirtClientOptions; vm: string };

/**
 * The first retry a second after a failed try, then twice as long each time, never more than 30 s apart. For the
 * tests only, like ENGINE_CRASH_AT: ENGINE_TEST_THAW_RETRY_MS=n starts the retries at n ms (the longest 30 n), so
 * that a test of many failed tries or of a late freeze waits for the event, not for the back-off.
 */
const testRetryMs = Number(process.env.ENGINE_TEST_THAW_RETRY_MS);
const FIRST_RETRY_MS = testRetryMs > 0 ? testRetryMs : 1000;
const LONGEST_RETRY_MS = 30 * FIRST_RETRY_MS;
/** How long one virsh call may take: libvirt waits up to 30 s for a domain's job lock, then fails. */
const VIRSH_MS = 60_000;

type Outcome = { done: true; how: string } | { done: false; why: string };

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

async function readOrders(): Promise<ThawOrders> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return JSON.parse(Buffer.concat(chunks).toString('utf8')) as ThawOrders;
}

/** `virsh domfsthaw`, then the agent's own word; or the domain gone (undefined, shut off: no guest left frozen). */
async function thawLibvirt(domain: string): Promise<Outcome> {
  const thawed = await runToolOutput('virsh', ['-q', 'domfsthaw', domain], { timeoutMs: VIRSH_MS }).then(
    () => undefined,
    (error: unknown) => (error as Error).message,
  );
  if (thawed === undefined) {
    // A thaw that succeeded may have thawed nothing while a freeze was still on its way (it lands after): the
    // agent's status is asked after the thaw, and the agent answers in order.
    const status = await runToolOutput('virsh', ['-q', 'qemu-agent-command', domain, '{"execute":"guest-fsfreeze-status"}', '--timeout', '10'], { timeoutMs: VIRSH_MS }).then(
      ({ stdout }) => (JSON.parse(stdout) as { return?: string }).return ?? stdout.trim(),
      (error: unknown) => `unknown (${(error as Error).message})`,
    );
    if (status === 'thawed') return { done: true, how: 'thawed' };
    return { done: false, why: `thawed, but the agent's status is ${status}` };
  }
  const state = await runToolOutput('virsh', ['-q', 'domstate', domain], { timeoutMs: VIRSH_MS }).then(
    ({ stdout }) => stdout.trim(),
    (error: unknown) => ((error as Error).message.includes('failed to get domain') ? 'undefined' : undefined),
  );
  if (state === 'undefined' || state === 'shut off') return { done: true, how: `domain ${state}` };
  return { done: false, why: thawed };
}

/** POST vms/{id}/thawfilesystems (VDSM's thaw through the agent); a 409 says the VM is not up (no guest to thaw). */
async function thawOvirt(ovirt: OvirtClientOptions, vm: string): Promise<Outcome> {
  const client = new OvirtClient(ovirt);
  try {
    await client.login();
    await client.post(`vms/${vm}/thawfilesystems`, 'action', {});
    return { done: true, how: 'thawed' };
  } catch (error) {
    if (error instanceof OvirtFaultError && error.status === 409) return { done: true, how: 'VM not up' };
    return { done: false, why: (error as Error).message };
  } finally {
    await client.logout().catch(() => undefined);
  }
}

for (const signal of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) process.on(signal, () => undefined);
process.on('SIGUSR2', () => process.exit(0));

const orders = await readOrders();
const what = 'libvirt' in orders ? `domain ${orders.libvirt}` : `VM ${orders.vm}`;
await sleep(orders.afterMs);
for (let attempt = 1, wait = FIRST_RETRY_MS; ; attempt += 1, wait = Math.min(wait * 2, LONGEST_RETRY_MS)) {
  const outcome = 'libvirt' in orders ? await thawLibvirt(orders.libvirt) : await thawOvirt(orders.ovirt, orders.vm);
  if (outcome.done) {
    process.stderr.write(`${what}: ${outcome.how} (try ${attempt})\n`);
    process.exit(0);
  }
  process.stderr.write(`${what}: not thawed yet (try ${attempt}): ${outcome.why}\n`);
  await sleep(wait);
}
