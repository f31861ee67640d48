/**
 * The guard of a live restore into a domain (SPEC 16.4), run as its own process (like ../quiesce/thaw-watchdog.ts): started
 * detached (its own session, so that it outlives the engine killed with -9 or its process group) before QEMU's
 * streams start, its orders as JSON on stdin, recorded (pid and start time) in the live restore's journal.
 *
 * Why it exists: QEMU 7.2's block-stream reads the guest's requests through a copy-on-read filter that, when the
 * backing's block status fails (the NBD server gone), ends the read early and reports success: the guest would get
 * zeros for what is not hydrated yet, not EIO. Without the job (and its filter) the same reads fail with EIO. So
 * when the server dies before hydration ends, every stream job of the domain is aborted, all at once, and the guard
 * exits. It polls the server every POLL_MS (its pid and start time: a pid reused by another process counts as the
 * server gone); Node has no pidfd, and the server is not its child, so no pipe of the server's can reach it.
 *
 * It also exits when there is nothing left to guard: the engine says hydration ended (SIGUSR2), or it sees every
 * image without its backing link, or the domain gone or shut off (no QEMU, no filter). SIGTERM, SIGINT and SIGHUP
 * are ignored: a unit or container stopping sends SIGTERM to its whole cgroup, and the server may outlive it.
 */
import { isProcessAlive, processIdentity } from '../../repo-format/process-alive.js';
import { runToolJson, runToolOutput } from '../cbt/run-tool.js';

export interface LiveGuardOrders {
  domain: string;
  /** The domain's target devices of the disks still hydrating (vda …). */
  devices: string[];
  /** Their images: once none has a backing file left, there is nothing to guard. */
  images: string[];
  server: { pid: number; identity: string | undefined };
}

/** The server's death is seen within this; reading /proc/PID/stat this often costs next to nothing. */
const POLL_MS = 50;
/** How often the guard asks whether hydration ended on its own (qemu-img and virsh are processes: not every poll). */
const DONE_CHECK_MS = 1000;
const VIRSH_MS = 60_000;

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

function log(message: string): void {
  process.stderr.write(`${new Date().toISOString()} ${message}\n`);
}

async function readOrders(): Promise<LiveGuardOrders> {
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return JSON.parse(Buffer.concat(chunks).toString('utf8')) as LiveGuardOrders;
}

/** Whether the server still runs (a zombie does not) and is still that process (a reused pid is another's). */
function serverAlive(server: LiveGuardOrders['server']): boolean {
  if (!isProcessAlive(server.pid)) return false;
  return server.identity === undefined || processIdentity(server.pid) === server.identity;
}

async function hasBacking(path: string): Promise<boolean> {
  const info = (await runToolJson('qemu-img', ['info', '-U', '--output=json', path], { timeoutMs: VIRSH_MS })) as { 'backing-filename'?: string };
  return typeof info['backing-filename'] === 'string' && info['backing-filename'] !== '';
}

/** Why there is nothing left to guard, or undefined while there is. A failed look counts as "still something". */
async function nothingToGuard(orders: LiveGuardOrders): Promise<string | undefined> {
  const state = await runToolOutput('virsh', ['-q', 'domstate', orders.domain], { timeoutMs: VIRSH_MS }).then(
    ({ stdout }) => stdout.trim(),
    (error: unknown) => ((error as Error).message.includes('failed to get domain') ? 'undefined' : undefined),
  );
  if (state === 'undefined' || state === 'shut off') return `domain ${orders.domain} ${state}`;
  const backed = await Promise.all(orders.images.map((image) => hasBacking(image).catch(() => true)));
  if (!backed.includes(true)) return 'every image hydrated (no backing link left)';
  return undefined;
}

for (const signal of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) process.on(signal, () => undefined);
process.on('SIGUSR2', () => {
  log('the engine says hydration ended: exiting');
  process.exit(0);
});

const orders = await readOrders();
log(`guarding domain ${orders.domain} (${orders.devices.join(', ')}) against the death of server ${orders.server.pid}`);
let nextDoneCheck = Date.now() + DONE_CHECK_MS;
let doneCheck: Promise<string | undefined> | undefined;
for (;;) {
  if (!serverAlive(orders.server)) {
    const seen = Date.now();
    log(`server ${orders.server.pid} gone: aborting the streams of ${orders.devices.join(', ')}`);
    // All at once: each abort waits for its job to end, and every ms of a job left runs the guest's reads through the filter.
    const outcomes = await Promise.all(
      orders.devices.map((device) =>
        runToolOutput('virsh', ['-q', 'blockjob', orders.domain, device, '--abort'], { timeoutMs: VIRSH_MS }).then(
          () => `${device} aborted`,
          (error: unknown) => `${device}: ${(error as Error).message.trim().split('\n').pop() ?? ''}`,
        ),
      ),
    );
    log(`streams stopped ${Date.now() - seen} ms after the server was seen gone (polled every ${POLL_MS} ms): ${outcomes.join('; ')}`);
    process.exit(0);
  }
  if (doneCheck === undefined && Date.now() >= nextDoneCheck) {
    doneCheck = nothingToGuard(orders);
    void doneCheck.then((why) => {
      if (why !== undefined && serverAlive(orders.server)) {
        log(`${why}: exiting`);
        process.exit(0);
      }
      doneCheck = undefined;
      nextDoneCheck = Date.now() + DONE_CHECK_MS;
    });
  }
  await sleep(POLL_MS);
}
