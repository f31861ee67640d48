/**
 * A real S3 endpoint for the tests: a private single-node Ceph cluster (one monitor, one OSD on memstore, the
 * RADOS Gateway) started from Debian's packages as plain processes, no systemd, all of it on 127.0.0.1 on free
 * ports and under one scratch folder. Recipe and pitfalls: ../shared/reference/ceph-rgw-lab.md.
 *
 * Why it starts the way it does (each step measured here):
 * - No `ceph` CLI on the way up: it is Python and costs ~0.4 s a call. The OSD is put into the cluster map
 *   before the monitor exists (`osdmaptool --createsimple 1`, loaded by `ceph-mon --mkfs --osdmap`) and every
 *   key (admin, osd.0, the gateway) is imported into the monitor's keyring at mkfs, so nothing needs `ceph osd
 *   new` or `ceph auth get-or-create`.
 * - The gateway starts only once the OSD is active (asked on its admin socket): a gateway started earlier
 *   sends its first pool writes to PGs that do not exist yet and waits for the objecter's 5 s tick.
 * - Daemons run in the foreground (`-f`) as children of the test process: their pids are known at once (no
 *   pid-file race) and recorded in the cluster folder, so that a run-wide teardown can stop what a crashed
 *   test file left (test/global-setup.ts). A pid is signalled only when /proc/PID/comm names the daemon and
 *   its command line names this cluster's config: a reused pid is never hit.
 * - `osd fast shutdown = false`: a memstore OSD stopped the fast way loses its objects; restarting the
 *   gateway keeps them either way (the objects live in the OSD).
 *
 * One cluster per test file (see startRgwCluster): ~2 s to start, so a file pays little, and a file that kills
 * or restarts its gateway, fills its store or breaks its users disturbs no other file running in parallel.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile, appendFile } from 'node:fs/promises';
import { rmSync } from 'node:fs';
import { connect, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { request } from 'node:http';

/** The daemons a cluster runs; the value is their /proc/PID/comm. */
const DAEMON_COMM = { mon: 'ceph-mon', osd: 'ceph-osd', rgw: 'radosgw' } as const;
type Daemon = keyof typeof DAEMON_COMM;

/** Where run-wide clean-up looks: set by test/global-setup.ts for a vitest run, else each cluster cleans itself. */
export const RGW_RUN_ROOT_ENV = 'ENGINE_TEST_RGW_ROOT';
/** Folders of runs (one per vitest run) are named so; the pid of the run's main process follows. */
const RUN_ROOT_PREFIX = 'engine-test-rgw-run-';

export interface RgwUser {
  uid: string;
  accessKeyId: string;
  secretAccessKey: string;
}

export interface RgwTimings {
  /** From the call to a gateway that answers with a user that can sign in, in milliseconds. */
  startMs: number;
  /** The steps of the start: keys and maps, mon + OSD mkfs, OSD active, gateway answering, users. */
  steps: Record<string, number>;
}

export interface RgwCluster {
  /** http://127.0.0.1:PORT: path-style, region us-east-1. */
  readonly endpoint: string;
  /** https://127.0.0.1:PORT when started with `tls`. */
  readonly tlsEndpoint: string | undefined;
  readonly region: string;
  /** A user with generated keys, owner of whatever buckets the test creates with it. */
  readonly user: RgwUser;
  /** The cluster's scratch folder (config, keys, logs, admin sockets). */
  readonly dir: string;
  readonly timings: RgwTimings;
  /** Another user with generated keys (for permission tests: it owns nothing of `user`'s). */
  createUser(uid: string): Promise<RgwUser>;
  /** kill -9 of the gateway; the monitor and the OSD (and so every object) stay. */
  killGateway(): Promise<void>;
  /** Starts the gateway again (after killGateway) and waits until it answers; resolves with the time it took. */
  startGateway(): Promise<number>;
  /** The gateway's pid while it runs. */
  gatewayPid(): number | undefined;
  /** Stops every daemon of the cluster (by pid, checked) and removes its folder. Safe to call twice. */
  stop(): Promise<void>;
}

export interface RgwOptions {
  /** memstore's size, held in RAM as objects are written: size it to the test. Default 1 GiB. */
  memstoreBytes?: number;
  /** Extra `[client.rgw.gw]` settings (name = value). */
  gatewaySettings?: Record<string, string>;
  /** The gateway also answers https on another port, with this certificate (PEM files). */
  tls?: { certificate: string; privateKey: string };
  /**
   * beast's `tcp_nodelay=1` (off by default in Ceph 16.2): without it a small GET waits ~50 ms here for
   * Nagle's algorithm on the gateway's side (measured with curl as with our client). On unless set false:
   * the README tells users to set it, and the tests' many small GETs (leases, segments, records) pay for it.
   */
  tcpNoDelay?: boolean;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** A free TCP port on 127.0.0.1 (bound, read, released: the daemon binds it a moment later). */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => (typeof address === 'object' && address ? resolve(address.port) : reject(new Error('no port'))));
    });
  });
}

/** Runs a Ceph tool to its end; rejects with its stderr. */
function run(command: string, args: string[], options: { timeoutMs?: number; input?: string } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 60_000);
    child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    child.on('error', (error) => {
      clearTimeout(timer);
      reject(new Error(`${command} cannot be run (${(error as NodeJS.ErrnoException).code ?? error.message}): install Ceph with scripts/setup.sh`));
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolve(stdout);
      else reject(new Error(`${command} ${args.join(' ')} failed (${signal ?? `exit ${code}`}): ${stderr.trim().split('\n').slice(-3).join(' | ')}`));
    });
    // A tool that exits without reading its input (or before it is written) is judged by its exit, not by an EPIPE.
    child.stdin.on('error', () => undefined);
    child.stdin.end(options.input ?? '');
  });
}

/**
 * One command on a daemon's admin socket: the command as JSON ending in a NUL, the answer as a 4-byte
 * big-endian length and that many bytes of JSON (Ceph's AdminSocket). Undefined while the socket is absent.
 */
function adminSocket(path: string, prefix: string): Promise<unknown> {
  return new Promise((resolve) => {
    const socket = connect(path);
    const chunks: Buffer[] = [];
    socket.setTimeout(2_000, () => socket.destroy());
    socket.on('connect', () => socket.write(`${JSON.stringify({ prefix })}\0`));
    socket.on('data', (chunk: Buffer) => chunks.push(chunk));
    socket.on('error', () => resolve(undefined));
    socket.on('close', () => {
      const answer = Buffer.concat(chunks);
      if (answer.length < 4 || answer.length < 4 + answer.readUInt32BE(0)) return resolve(undefined);
      try {
        resolve(JSON.parse(answer.subarray(4, 4 + answer.readUInt32BE(0)).toString('utf8')));
      } catch {
        resolve(undefined);
      }
    });
  });
}

/** The gateway's status answer, or undefined while nothing listens. */
function httpStatus(endpoint: string): Promise<number | undefined> {
  return new Promise((resolve) => {
    const req = request(endpoint, { method: 'GET', timeout: 2_000 }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode));
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(undefined));
    req.end();
  });
}

async function waitFor<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs: number, dir: string): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`RGW test cluster in ${dir}: ${what} did not happen within ${timeoutMs / 1000} s (logs in ${join(dir, 'log')})`);
    await sleep(25);
  }
}

/** True when PID is `daemon` of the cluster whose config is `conf` (never a reused pid). */
async function isOurs(pid: number, comm: string, conf: string): Promise<boolean> {
  const [actual, cmdline] = await Promise.all([
    readFile(`/proc/${pid}/comm`, 'utf8').catch(() => ''),
    readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => ''),
  ]);
  return actual.trim() === comm && cmdline.split('\0').includes(conf);
}

/** SIGKILL to a recorded daemon if it is still ours; waits until it is gone (a zombie counts as gone). */
async function killRecorded(pid: number, comm: string, conf: string): Promise<boolean> {
  if (!(await isOurs(pid, comm, conf))) return false;
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    return false;
  }
  // Until it is gone (a loaded machine may take longer than any fixed budget): a gateway restarted while the
  // killed one still holds its port would not come up.
  for (;;) {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
    // Field 3 is the state; Z: exited, not yet reaped by its parent (the test process reaps its children).
    if (stat === '' || / Z /.test(stat.slice(stat.lastIndexOf(')')))) return true;
    await sleep(10);
  }
}

/** The pid records of a cluster folder: "daemon pid" lines, appended as daemons start. */
async function recordedPids(dir: string): Promise<{ daemon: Daemon; pid: number }[]> {
  const text = await readFile(join(dir, 'pids'), 'utf8').catch(() => '');
  return text
    .split('\n')
    .map((line) => line.split(' '))
    .filter((parts): parts is [Daemon, string] => parts.length === 2 && parts[0]! in DAEMON_COMM)
    .map(([daemon, pid]) => ({ daemon, pid: Number(pid) }))
    .filter((entry) => Number.isSafeInteger(entry.pid) && entry.pid > 1);
}

/** Stops every daemon recorded in a cluster folder and removes the folder; returns how many were running. */
export async function destroyClusterDir(dir: string): Promise<number> {
  const conf = join(dir, 'ceph.conf');
  let killed = 0;
  // The gateway first, the monitor last: nothing waits on a peer that is already gone.
  const order: Daemon[] = ['rgw', 'osd', 'mon'];
  const records = (await recordedPids(dir)).sort((a, b) => order.indexOf(a.daemon) - order.indexOf(b.daemon));
  for (const { daemon, pid } of records) if (await killRecorded(pid, DAEMON_COMM[daemon], conf)) killed += 1;
  await rm(dir, { recursive: true, force: true });
  return killed;
}

/**
 * Run-wide clean-up (test/global-setup.ts): every cluster folder under `root` is destroyed, daemons first.
 * `abandoned: true` also clears the folders of earlier runs whose main process is gone (a run killed -9).
 */
export async function destroyRunRoot(root: string): Promise<number> {
  let killed = 0;
  for (const entry of await readdir(root).catch(() => [] as string[])) killed += await destroyClusterDir(join(root, entry));
  await rm(root, { recursive: true, force: true });
  return killed;
}

/** A folder for one vitest run's clusters, after clearing those of runs that died without their teardown. */
export async function createRunRoot(): Promise<string> {
  for (const entry of await readdir(tmpdir()).catch(() => [] as string[])) {
    if (!entry.startsWith(RUN_ROOT_PREFIX)) continue;
    const owner = Number(entry.slice(RUN_ROOT_PREFIX.length).split('-')[0]);
    const alive = Number.isSafeInteger(owner) && (await readFile(`/proc/${owner}/comm`, 'utf8').then(() => true, () => false));
    if (!alive) await destroyRunRoot(join(tmpdir(), entry));
  }
  return mkdtemp(join(tmpdir(), `${RUN_ROOT_PREFIX}${process.pid}-`));
}

function cephConf(dir: string, fsid: string, monPorts: [number, number], rgwPort: number, tlsPort: number | undefined, options: RgwOptions): string {
  const gateway = Object.entries(options.gatewaySettings ?? {}).map(([key, value]) => `${key} = ${value}`);
  const tls = options.tls && tlsPort ? ` ssl_endpoint=127.0.0.1:${tlsPort} ssl_certificate=${options.tls.certificate} ssl_private_key=${options.tls.privateKey}` : '';
  const noDelay = options.tcpNoDelay === false ? '' : ' tcp_nodelay=1';
  return [
    '[global]',
    `fsid = ${fsid}`,
    'mon initial members = a',
    `mon host = [v2:127.0.0.1:${monPorts[0]},v1:127.0.0.1:${monPorts[1]}]`,
    'public addr = 127.0.0.1',
    'cluster addr = 127.0.0.1',
    'ms bind ipv6 = false',
    'auth cluster required = cephx',
    'auth service required = cephx',
    'auth client required = cephx',
    `run dir = ${dir}/run`,
    `admin socket = ${dir}/run/$cluster-$name.asok`,
    `pid file = ${dir}/run/$cluster-$name.pid`,
    `log file = ${dir}/log/$cluster-$name.log`,
    `crash dir = ${dir}/crash`,
    `mon data = ${dir}/data/mon/$cluster-$id`,
    `osd data = ${dir}/data/osd/$cluster-$id`,
    'osd objectstore = memstore',
    `memstore device bytes = ${options.memstoreBytes ?? 1024 ** 3}`,
    'osd fast shutdown = false',
    'osd client watch timeout = 5',
    'osd pool default size = 1',
    'osd pool default min size = 1',
    'osd pool default pg num = 8',
    'osd pool default pgp num = 8',
    'osd pool default pg autoscale mode = off',
    'osd crush chooseleaf type = 0',
    'mon allow pool size one = true',
    'mon warn on pool no redundancy = false',
    'mon max pg per osd = 1000',
    'mon data avail warn = 1',
    'mon data avail crit = 0',
    'paxos propose interval = 0.05',
    'paxos min wait = 0.01',
    '[client]',
    `keyring = ${dir}/keys/$cluster.$name.keyring`,
    `log file = ${dir}/log/$cluster-$name.log`,
    '[client.rgw.gw]',
    `rgw frontends = beast endpoint=127.0.0.1:${rgwPort}${tls}${noDelay}`,
    `rgw data = ${dir}/data/rgw/$cluster-$id`,
    ...gateway,
    '',
  ].join('\n');
}

/** An S3 access key: 20 upper-case letters and digits, as AWS and RGW make them; the secret: 40 base64 characters. */
function generatedUser(uid: string): RgwUser {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789';
  const accessKeyId = Array.from(randomBytes(20), (byte) => alphabet[byte % alphabet.length]).join('');
  return { uid, accessKeyId, secretAccessKey: randomBytes(30).toString('base64') };
}

/**
 * Starts a private cluster and a user. The caller stops it (`stop()`, in afterAll); inside a vitest run the
 * global teardown stops whatever a crashed file left.
 */
export async function startRgwCluster(options: RgwOptions = {}): Promise<RgwCluster> {
  const started = performance.now();
  const steps: Record<string, number> = {};
  let mark = started;
  const step = (name: string): void => {
    const now = performance.now();
    steps[name] = Math.round(now - mark);
    mark = now;
  };
  const root = process.env[RGW_RUN_ROOT_ENV];
  if (root) await mkdir(root, { recursive: true });
  const dir = await mkdtemp(join(root ?? tmpdir(), root ? 'cluster-' : 'engine-test-rgw-'));
  const conf = join(dir, 'ceph.conf');
  const children = new Map<Daemon, ChildProcess>();
  const keys = join(dir, 'keys');
  const osdData = join(dir, 'data', 'osd', 'ceph-0');

  const launch = async (daemon: Daemon, args: string[]): Promise<ChildProcess> => {
    const child = spawn(DAEMON_COMM[daemon], [...args, '-f', '-c', conf], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr!.on('data', (chunk: Buffer) => (stderr = (stderr + chunk.toString()).slice(-2000)));
    child.on('exit', (code, signal) => {
      if (children.get(daemon) === child) children.delete(daemon);
      if (code !== 0 && signal === null) void appendFile(join(dir, 'log', 'exits'), `${daemon} exit ${code}: ${stderr}\n`).catch(() => undefined);
    });
    await new Promise<void>((resolve, reject) => {
      child.once('spawn', resolve);
      child.once('error', (error) => reject(new Error(`${DAEMON_COMM[daemon]} cannot be run (${(error as NodeJS.ErrnoException).code ?? error.message}): install Ceph with scripts/setup.sh`)));
    });
    children.set(daemon, child);
    await appendFile(join(dir, 'pids'), `${daemon} ${child.pid}\n`);
    return child;
  };

  // A process that ends without stop() (an uncaught error in a script) takes its daemons with it: they run
  // in the foreground as its children, and 'exit' handlers may only do synchronous work, which kill is.
  const killOnExit = (): void => {
    for (const child of children.values()) child.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  };
  process.once('exit', killOnExit);
  const stop = async (): Promise<void> => {
    process.removeListener('exit', killOnExit);
    await destroyClusterDir(dir);
    children.clear();
  };

  try {
    for (const sub of ['keys', 'run', 'log', 'crash', 'data/mon', 'data/rgw', 'data/osd/ceph-0']) await mkdir(join(dir, sub), { recursive: true, mode: 0o700 });
    const [monV2, monV1, rgwPort] = [await freePort(), await freePort(), await freePort()];
    const tlsPort = options.tls ? await freePort() : undefined;
    const fsid = randomUUID();
    await writeFile(conf, cephConf(dir, fsid, [monV2, monV1], rgwPort, tlsPort, options), { mode: 0o600 });
    const monKeyring = join(keys, 'mon.keyring');
    const keyrings: [string, string, string[]][] = [
      [join(keys, 'ceph.client.admin.keyring'), 'client.admin', ['mon', 'allow *', 'osd', 'allow *', 'mds', 'allow *', 'mgr', 'allow *']],
      [join(osdData, 'keyring'), 'osd.0', ['mon', 'allow profile osd', 'mgr', 'allow profile osd', 'osd', 'allow *']],
      [join(keys, 'ceph.client.rgw.gw.keyring'), 'client.rgw.gw', ['mon', 'allow rw', 'osd', 'allow rwx', 'mgr', 'allow rw']],
    ];
    const caps = (list: string[]): string[] => list.flatMap((value, i) => (i % 2 === 0 ? ['--cap', value] : [value]));
    await run('ceph-authtool', ['--create-keyring', monKeyring, '--gen-key', '-n', 'mon.', '--cap', 'mon', 'allow *']);
    await Promise.all(keyrings.map(([path, name, list]) => run('ceph-authtool', ['--create-keyring', path, '--gen-key', '-n', name, ...caps(list)])));
    for (const [path] of keyrings) await run('ceph-authtool', [monKeyring, '--import-keyring', path]);
    const monmap = join(keys, 'monmap');
    const osdmap = join(keys, 'osdmap');
    await Promise.all([
      run('monmaptool', ['--create', '--addv', 'a', `[v2:127.0.0.1:${monV2},v1:127.0.0.1:${monV1}]`, '--fsid', fsid, monmap]),
      run('osdmaptool', ['--createsimple', '1', '--clobber', osdmap]),
    ]);
    await run('ceph-mon', ['-c', conf, '--mkfs', '-i', 'a', '--monmap', monmap, '--osdmap', osdmap, '--keyring', monKeyring]);
    step('keys, maps, mon mkfs');
    await launch('mon', ['-i', 'a']);
    // The OSD's mkfs asks the monitor for the cluster's maps: it waits for the monitor to answer.
    await run('ceph-osd', ['-c', conf, '-i', '0', '--mkfs', '--osd-uuid', randomUUID()], { timeoutMs: 30_000 });
    step('mon up, osd mkfs');
    await launch('osd', ['-i', '0']);
    const osdSocket = join(dir, 'run', 'ceph-osd.0.asok');
    await waitFor('OSD active', async () => ((await adminSocket(osdSocket, 'status')) as { state?: string } | undefined)?.state === 'active' || undefined, 30_000, dir);
    step('osd active');
    const endpoint = `http://127.0.0.1:${rgwPort}`;
    const startGateway = async (): Promise<number> => {
      const begin = performance.now();
      if (children.has('rgw')) throw new Error('the gateway is already running');
      await launch('rgw', ['-n', 'client.rgw.gw']);
      await waitFor('the gateway answering', async () => ((await httpStatus(endpoint)) === 200 ? true : undefined), 60_000, dir);
      return Math.round(performance.now() - begin);
    };
    await startGateway();
    step('gateway answering');
    const createUser = async (uid: string): Promise<RgwUser> => {
      const user = generatedUser(uid);
      await run('radosgw-admin', ['-c', conf, 'user', 'create', `--uid=${uid}`, `--display-name=${uid}`, `--access-key=${user.accessKeyId}`, `--secret-key=${user.secretAccessKey}`]);
      return user;
    };
    const user = await createUser('engine-test');
    step('user');
    return {
      endpoint,
      tlsEndpoint: tlsPort ? `https://127.0.0.1:${tlsPort}` : undefined,
      region: 'us-east-1',
      user,
      dir,
      timings: { startMs: Math.round(performance.now() - started), steps },
      createUser,
      killGateway: async () => {
        const child = children.get('rgw');
        if (!child?.pid) throw new Error('the gateway is not running');
        const exited = new Promise((resolve) => child.once('exit', resolve));
        await killRecorded(child.pid, DAEMON_COMM.rgw, conf);
        await exited;
      },
      startGateway,
      gatewayPid: () => children.get('rgw')?.pid,
      stop,
    };
  } catch (error) {
    const exits = await readFile(join(dir, 'log', 'exits'), 'utf8').catch(() => '');
    await stop();
    throw exits ? new Error(`${(error as Error).message}; daemons that exited: ${exits.trim()}`) : error;
  }
}
