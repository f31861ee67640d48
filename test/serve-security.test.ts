/**
 * `engine serve` is safe by default (issue 11, item 5): a private Unix socket unless told otherwise; TCP only
 * with TLS and client authentication (X.509 client certificates or TLS-PSK) unless --insecure, with a loud
 * warning off loopback; a TLS server refuses NBD_OPT_GO and NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS.
 * Checked with the clients people use: nbdinfo and nbdcopy (libnbd), qemu-img (qemu's NBD client), and the
 * engine's own client, which also speaks TLS to nbdkit and qemu-nbd. Certificates and keys are made here by
 * openssl, never committed. Also: what `--socket` does with a file, a live or stale socket, or a missing
 * directory.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { connect, type Socket } from 'node:net';
import { chmod, mkdir, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { SocketReader } from '../dist/engine/nbd/socket-reader.js';
import { encodeOptionHeader } from '../dist/engine/nbd/wire.js';
import { loadTlsCredentials, startTls } from '../dist/engine/nbd/tls.js';
import { ENGINE_BIN, exitOf, filesIdentical, parseJson, runEngine, sh, sparseFile, spawnEngine, tempDir, writeRegion, type BackupJson, withoutProgress, backUp, initRepository, waitFor } from './helpers.js';
import { makePskFile, makeTestPki, type TestPki } from './tls.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
let dir: string;
let cleanup: () => Promise<void>;
let repo: string;
let image: string;
let backupId: string;
let pki: TestPki;
let pskFile: string;
const running: ChildProcess[] = [];

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-serve-security-'));
  repo = join(dir, 'repo');
  image = join(dir, 'disk.raw');
  await sparseFile(image, SIZE);
  await writeRegion(image, 0, 5 * MiB, 'random', 'a');
  await writeRegion(image, 40 * MiB, 3 * MiB + 123, 'text');
  // Format 1: the server's registration in readers/ is checked (format 3's lease: v3-readers).
  await initRepository(repo, ['--format', '1']);
  backupId = (await backUp(repo, ['--source', image, '--disk-name', 'os'])).id;
  pki = await makeTestPki(join(dir, 'tls'));
  pskFile = join(dir, 'tls', 'keys.psk');
  await makePskFile(pskFile, ['alice', 'bob']);
});
afterAll(async () => {
  for (const child of running) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  await cleanup();
});

interface ServeJson {
  socket: string | null;
  host: string | null;
  port: number | null;
  tls: string | null;
  warnings: string[];
  readerToken: string;
  exports: { name: string; uri: string }[];
}

/** Starts `engine serve ARGS --json`; resolves once it listens, with its JSON and its stderr so far. */
async function startServe(args: string[], env: Record<string, string> = {}): Promise<{ child: ChildProcess; ready: ServeJson; stderr: () => string }> {
  const child = spawnEngine(['serve', '--repo', repo, backupId.slice(0, 10), ...args, '--json'], env);
  running.push(child);
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (chunk: Buffer) => {
    stdout += chunk.toString();
  });
  child.stderr!.on('data', (chunk: Buffer) => {
    stderr += chunk.toString();
  });
  while (!stdout.trim().endsWith('}')) {
    if (child.exitCode !== null) throw new Error(`engine serve exited ${child.exitCode}: ${stdout} ${stderr}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  return { child, ready: parseJson<ServeJson>(stdout), stderr: () => stderr };
}

/** Waits (up to 5 s) until `text()` matches `pattern` `count` times: a server logs a refusal just after the client has gone. */
async function logged(text: () => string, pattern: RegExp, count = 1): Promise<void> {
  const global = new RegExp(pattern.source, `${pattern.flags.replace('g', '')}g`);
  // Until the lines are there, however loaded the machine (the test's timeout bounds it); then exactly `count`.
  while ((text().match(global)?.length ?? 0) < count) await new Promise((r) => setTimeout(r, 25));
  expect(text().match(global)?.length ?? 0).toBe(count);
}

async function stopServe(child: ChildProcess): Promise<void> {
  child.kill('SIGTERM');
  expect((await exitOf(child)).code).toBe(0);
}

async function readers(): Promise<string[]> {
  return (await readdir(join(repo, 'readers')).catch(() => [] as string[])).filter((n) => n.endsWith('.json'));
}

/** Runs a command; resolves with its exit code and output (never rejects). */
function run(command: string, args: string[]): Promise<{ code: number; output: string }> {
  return new Promise((resolve) => {
    const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (c: Buffer) => (output += c.toString()));
    child.stderr.on('data', (c: Buffer) => (output += c.toString()));
    child.on('close', (code) => resolve({ code: code ?? -1, output }));
  });
}

describe('the default: a private Unix socket', () => {
  test('without --socket or --port: <ENGINE_RUN_DIR>/serve-<id>.sock, mode 0600 even under umask 000; another user cannot connect', async () => {
    const runDir = join(dir, 'run');
    await mkdir(runDir, { mode: 0o755 });
    await chmod(runDir, 0o755); // traversable by others: only the socket's own mode keeps them out
    // Under umask 000 a socket bound plainly would be 0777: open to every local user.
    const child = spawn('sh', ['-c', `umask 000; exec "${process.execPath}" "${ENGINE_BIN}" serve --repo "${repo}" ${backupId} --json`], {
      env: { ...process.env, ENGINE_RUN_DIR: runDir },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    running.push(child);
    let stdout = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    await waitFor('serve is ready', () => stdout.trim().endsWith('}'), { child });
    const ready = parseJson<ServeJson>(stdout);
    const socket = join(runDir, `serve-${backupId.slice(0, 16)}.sock`);
    expect(ready.socket).toBe(socket);
    expect(ready.exports[0]!.uri).toBe(`nbd+unix:///os?socket=${socket}`);
    expect((await stat(socket)).mode & 0o777).toBe(0o600);
    expect((await readdir(runDir)).sort()).toEqual([`serve-${backupId.slice(0, 16)}.sock`]);
    expect((await run('nbdinfo', ['--size', ready.exports[0]!.uri])).output.trim()).toBe(String(SIZE));
    const stranger = await run('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', 'nbdinfo', '--size', ready.exports[0]!.uri]);
    expect(stranger.code).not.toBe(0);
    expect(stranger.output).toMatch(/Permission denied/);
    await stopServe(child);
    await expect(stat(socket)).rejects.toThrow();
  });
});

describe('TCP without TLS', () => {
  test('is refused (exit 2, one line), before the repository is opened: no reader registration, no lock', async () => {
    for (const extra of [[], ['--host', '0.0.0.0'], ['--host', '127.0.0.1', '--writable']]) {
      const result = await runEngine(['serve', '--repo', repo, backupId, '--port', '0', ...extra]);
      expect(result.code).toBe(2);
      expect(result.stderr).toMatch(/^engine: serving over TCP \(.* port 0\) needs TLS with client authentication: give --tls-certificates DIR .* or --tls-psk-file FILE, .* or add --insecure/);
      expect(result.stderr.trim().split('\n')).toHaveLength(1);
    }
    expect(await readers()).toEqual([]);
    await expect(stat(join(repo, 'lock'))).rejects.toThrow();
  });

  test('--insecure on loopback serves, with a warning on stderr and in the JSON', async () => {
    const { child, ready, stderr } = await startServe(['--port', '0', '--insecure']);
    expect(ready.host).toBe('127.0.0.1');
    expect(ready.tls).toBe(null);
    expect(ready.warnings).toEqual([`WARNING: serving without TLS or authentication on 127.0.0.1 port ${ready.port}: every user of this host can read the backup's disks`]);
    expect(stderr()).toContain(`engine serve: ${ready.warnings[0]}`);
    expect((await run('nbdinfo', ['--size', ready.exports[0]!.uri])).output.trim()).toBe(String(SIZE));
    await stopServe(child);
  });

  test('--host 0.0.0.0 --writable --insecure: a loud warning', async () => {
    const { child, ready, stderr } = await startServe(['--port', '0', '--host', '0.0.0.0', '--writable', '--insecure']);
    expect(ready.warnings).toHaveLength(1);
    expect(ready.warnings[0]).toMatch(/^WARNING: serving WITHOUT TLS OR AUTHENTICATION on 0\.0\.0\.0 port \d+: ANYONE WHO CAN REACH THIS HOST CAN READ AND WRITE THE BACKUP'S DISKS, in clear text on the network; serve with TLS and client authentication \(certificates or pre-shared keys\) instead/);
    expect(stderr()).toContain(ready.warnings[0]);
    await stopServe(child);
  });

  test('contradictions are usage errors: --insecure with TLS or with a socket, --host without --port, both TLS kinds', async () => {
    const cases: [string[], RegExp][] = [
      [['--port', '0', '--insecure', '--tls-psk-file', pskFile], /--insecure serves without TLS/],
      [['--socket', join(dir, 'x.sock'), '--insecure'], /--insecure is for a TCP server/],
      [['--host', '127.0.0.1'], /--host is the address of a TCP server/],
      [['--port', '0', '--tls-psk-file', pskFile, '--tls-certificates', pki.serverDir], /not both/],
      [['--port', '1e3', '--insecure'], /--port 1e3: give a whole number from 0 to 65535, in digits/],
    ];
    for (const [args, message] of cases) {
      const result = await runEngine(['serve', '--repo', repo, backupId, ...args]);
      expect(result.code).toBe(2);
      expect(result.stderr).toMatch(message);
    }
  });
});

/** A raw client over TCP that speaks the negotiation step by step (and TLS when told). */
class RawClient {
  reader: SocketReader;
  private constructor(public socket: Socket) {
    this.reader = new SocketReader(socket, () => new Error('closed'));
  }

  static async open(port: number): Promise<RawClient> {
    const socket = connect(port, '127.0.0.1');
    socket.on('error', () => undefined);
    const client = new RawClient(socket);
    expect((await client.reader.read(18)).readBigUInt64BE(0)).toBe(0x4e42444d41474943n);
    socket.write(Buffer.from([0, 0, 0, 1]));
    return client;
  }

  option(option: number, data: Buffer = Buffer.alloc(0)): void {
    this.socket.write(Buffer.concat([encodeOptionHeader({ option, length: data.length }), data]));
  }

  async reply(): Promise<{ option: number; type: number; data: Buffer }> {
    const header = Buffer.from(await this.reader.read(20));
    return { option: header.readUInt32BE(8), type: header.readUInt32BE(12), data: Buffer.from(await this.reader.read(header.readUInt32BE(16))) };
  }

  async startTls(clientDir: string): Promise<void> {
    this.option(5);
    expect((await this.reply()).type).toBe(1);
    this.reader.detach();
    const credentials = await loadTlsCredentials({ certificates: clientDir }, 'client');
    this.socket = await startTls(this.socket, { credentials, hostname: '127.0.0.1' });
    this.reader = new SocketReader(this.socket, () => new Error('closed'));
  }

  closed(): Promise<boolean> {
    return new Promise((resolve) => {
      if (this.socket.destroyed || this.socket.readableEnded) resolve(true);
      this.socket.once('close', () => resolve(true));
      setTimeout(() => resolve(false), 10_000);
    });
  }
}

const NBD_REP_ACK = 1;
const NBD_REP_ERR_INVALID = 2 ** 31 + 3;
const NBD_REP_ERR_TLS_REQD = 2 ** 31 + 5;

function goData(name: string): Buffer {
  const bytes = Buffer.from(name);
  const data = Buffer.alloc(4 + bytes.length + 2);
  data.writeUInt32BE(bytes.length, 0);
  bytes.copy(data, 4);
  return data;
}

describe('TLS with client certificates (--tls-certificates)', () => {
  let child: ChildProcess;
  let ready: ServeJson;
  let stderr: () => string;
  let tcpUri: string;

  beforeAll(async () => {
    ({ child, ready, stderr } = await startServe(['--port', '0', '--tls-certificates', pki.serverDir]));
    tcpUri = `nbds://127.0.0.1:${ready.port}/os`;
  });
  afterAll(async () => {
    await stopServe(child);
  });

  test('listens on 127.0.0.1 with nbds:// URIs and no warning', () => {
    expect(ready).toMatchObject({ host: '127.0.0.1', tls: 'x509', warnings: [] });
    expect(ready.exports[0]!.uri).toBe(tcpUri);
  });

  test('nbdinfo and nbdcopy with the client certificate read the disk byte for byte', async () => {
    expect((await run('nbdinfo', ['--size', `${tcpUri}?tls-certificates=${pki.clientDir}`])).output.trim()).toBe(String(SIZE));
    const copy = join(dir, 'nbdcopy-x509.raw');
    const copied = await run('nbdcopy', [`${tcpUri}?tls-certificates=${pki.clientDir}`, copy]);
    expect(copied.code).toBe(0);
    expect(await filesIdentical(copy, image)).toBe(true);
  });

  test('qemu-img (tls-creds-x509, endpoint=client) converts the export byte for byte', async () => {
    const out = join(dir, 'qemu-x509.raw');
    const result = await run('qemu-img', ['convert', '--object', `tls-creds-x509,id=tls0,dir=${pki.clientDir},endpoint=client`, '--image-opts', `driver=nbd,host=127.0.0.1,port=${ready.port},export=os,tls-creds=tls0`, '-O', 'raw', out]);
    expect(result.output).toBe('');
    expect(await filesIdentical(out, image)).toBe(true);
  });

  test('the engine backs up from the nbds:// export and restores it identically', async () => {
    const backup = await runEngine(['backup', '--repo', repo, '--source', `${tcpUri}?tls-certificates=${pki.clientDir}`, '--disk-name', 'over-tls', '--json']);
    expect(withoutProgress(backup.stderr)).toBe('');
    const id = parseJson<BackupJson>(backup.stdout).id;
    const out = join(dir, 'engine-over-tls.raw');
    expect((await runEngine(['restore', '--repo', repo, id, '--to', out])).code).toBe(0);
    expect(await filesIdentical(out, image)).toBe(true);
  });

  test('refused: no TLS at all, no client certificate, a certificate of another CA', async () => {
    const plain = await run('nbdinfo', ['--size', `nbd://127.0.0.1:${ready.port}/os`]);
    expect(plain.code).not.toBe(0);
    expect(plain.output).toMatch(/requires TLS/);
    const noCert = await run('nbdinfo', ['--size', `${tcpUri}?tls-certificates=${join(dir, 'tls', 'pki-server')}`]);
    expect(noCert.code).not.toBe(0);
    const stranger = await run('nbdinfo', ['--size', `${tcpUri}?tls-certificates=${pki.strangerDir}`]);
    expect(stranger.code).not.toBe(0);
    // libnbd offers no certificate the server's CA did not sign: both are "no certificate" to the server.
    await logged(stderr, /dropped a client: TLS handshake failed: the peer presented no certificate/, 2);
    expect(stderr()).not.toMatch(/opened by certificate CN=stranger/);
    // The engine's client offers it anyway: the server finds it is not signed by its CA.
    const strangerEngine = await runEngine(['backup', '--repo', repo, '--source', `${tcpUri}?tls-certificates=${pki.strangerDir}`, '--disk-name', 'x']);
    expect(strangerEngine.code).toBe(1);
    expect(strangerEngine.stderr).toBe(`engine: NBD ${tcpUri}?tls-certificates=${pki.strangerDir}: the server ended the connection right after the TLS handshake: it does not accept our credentials (${pki.strangerDir})\n`);
    await logged(stderr, /dropped a client: TLS handshake failed: the peer certificate is not signed by a trusted CA/);
    expect(stderr()).not.toMatch(/opened by certificate CN=stranger/);
    // Without tls-certificates the engine checks the server against the system's CAs, which do not know this one.
    const systemCas = await runEngine(['backup', '--repo', repo, '--source', tcpUri, '--disk-name', 'x']);
    expect(systemCas.code).toBe(1);
    expect(systemCas.stderr).toMatch(new RegExp(`^engine: NBD ${tcpUri.replace(/[.]/g, '\\.')}: TLS handshake failed: the peer certificate (chains to a CA that is not trusted|is not signed by a trusted CA) \\(.*\\)\n$`));
    // The engine's client says what happened in one line naming the URI, and exits 1.
    const engine = await runEngine(['backup', '--repo', repo, '--source', `nbd://127.0.0.1:${ready.port}/os`, '--disk-name', 'x']);
    expect(engine.code).toBe(1);
    expect(engine.stderr).toBe(`engine: NBD nbd://127.0.0.1:${ready.port}/os: the server requires TLS: connect with an nbds:// URI and its credentials (tls-certificates=DIR or tls-psk-file=FILE)\n`);
  });

  test('before NBD_OPT_STARTTLS: NBD_OPT_GO and every other option get NBD_REP_ERR_TLS_REQD, NBD_OPT_EXPORT_NAME ends the connection', async () => {
    const client = await RawClient.open(ready.port!);
    client.option(7, goData('os'));
    expect(await client.reply()).toMatchObject({ option: 7, type: NBD_REP_ERR_TLS_REQD });
    for (const option of [3, 6, 8, 9, 10, 99]) {
      client.option(option, option === 6 ? goData('os') : Buffer.alloc(0));
      expect((await client.reply()).type).toBe(NBD_REP_ERR_TLS_REQD);
    }
    client.option(1, Buffer.from('os'));
    expect(await client.closed()).toBe(true);
  });

  test('after the upgrade the negotiation goes on over TLS; a second STARTTLS is NBD_REP_ERR_INVALID', async () => {
    const client = await RawClient.open(ready.port!);
    await client.startTls(pki.clientDir);
    client.option(5);
    expect((await client.reply()).type).toBe(NBD_REP_ERR_INVALID);
    client.option(8);
    expect((await client.reply()).type).toBe(NBD_REP_ACK);
    client.socket.destroy();
  });
});

describe('TLS with pre-shared keys (--tls-psk-file)', () => {
  let child: ChildProcess;
  let ready: ServeJson;
  let stderr: () => string;

  beforeAll(async () => {
    ({ child, ready, stderr } = await startServe(['--port', '0', '--tls-psk-file', pskFile]));
  });
  afterAll(async () => {
    await stopServe(child);
  });

  test('nbdcopy and qemu-img (tls-creds-psk) with a user of the keys file read the disk byte for byte; the log names the identity', async () => {
    expect(ready.tls).toBe('psk');
    const copy = join(dir, 'nbdcopy-psk.raw');
    expect((await run('nbdcopy', [`nbds://bob@127.0.0.1:${ready.port}/os?tls-psk-file=${pskFile}`, copy])).code).toBe(0);
    expect(await filesIdentical(copy, image)).toBe(true);
    // qemu reads <dir>/keys.psk.
    const out = join(dir, 'qemu-psk.raw');
    const result = await run('qemu-img', ['convert', '--object', `tls-creds-psk,id=tls0,dir=${join(dir, 'tls')},username=alice,endpoint=client`, '--image-opts', `driver=nbd,host=127.0.0.1,port=${ready.port},export=os,tls-creds=tls0`, '-O', 'raw', out]);
    expect(result.output).toBe('');
    expect(await filesIdentical(out, image)).toBe(true);
    expect(stderr()).toMatch(/export os opened by PSK identity "bob", TLSv1\.3/);
    expect(stderr()).toMatch(/export os opened by PSK identity "alice", TLSv1\.3/);
  });

  test('an unknown user or a wrong key is refused', async () => {
    const strangers = join(dir, 'tls', 'strangers.psk');
    await makePskFile(strangers, ['mallory', 'alice']);
    const unknown = await run('nbdinfo', ['--size', `nbds://mallory@127.0.0.1:${ready.port}/os?tls-psk-file=${strangers}`]);
    expect(unknown.code).not.toBe(0);
    const wrongKey = await run('nbdinfo', ['--size', `nbds://alice@127.0.0.1:${ready.port}/os?tls-psk-file=${strangers}`]);
    expect(wrongKey.code).not.toBe(0);
    await logged(stderr, /TLS handshake failed: unknown PSK identity "mallory"/);
    await logged(stderr, /TLS handshake failed: the pre-shared keys differ/);
    const engine = await runEngine(['backup', '--repo', repo, '--source', `nbds://mallory@127.0.0.1:${ready.port}/os?tls-psk-file=${strangers}`, '--disk-name', 'x']);
    expect(engine.code).toBe(1);
    expect(engine.stderr).toMatch(new RegExp(`^engine: NBD nbds://mallory@127\\.0\\.0\\.1:${ready.port}/os\\?tls-psk-file=.*: TLS handshake failed: the peer refused the handshake`));
  });

  test('a malformed keys file is a one-line usage error naming its line', async () => {
    const bad = join(dir, 'tls', 'bad.psk');
    await writeFile(bad, `alice:${'ab'.repeat(32)}\nbob:not-hex\n`, { mode: 0o600 });
    const result = await runEngine(['serve', '--repo', repo, backupId, '--port', '0', '--tls-psk-file', bad]);
    expect(result.code).toBe(2);
    expect(result.stderr).toBe(`engine: ${bad} line 2: the key of bob is not an even number of hex digits\n`);
    // A keys file other users can read is used, and said.
    const loose = join(dir, 'tls', 'loose.psk');
    await makePskFile(loose, ['alice']);
    await chmod(loose, 0o644);
    const server = await startServe(['--socket', join(dir, 'loose.sock'), '--tls-psk-file', loose]);
    expect(server.stderr()).toBe(`engine serve: TLS PSK keys file: ${loose} is open to other users (mode 0644): make it private, chmod 600 ${loose}\n`);
    await stopServe(server.child);
  });
});

describe('the engine as a TLS client of other servers', () => {
  test('restore --to nbds+unix:// into nbdkit --tls=require with client certificates, then nbdcopy reads back the same bytes', async () => {
    const socket = join(dir, 'nbdkit-tls.sock');
    const kit = spawn('nbdkit', ['-f', '-U', socket, '--tls=require', `--tls-certificates=${pki.serverDir}`, '--tls-verify-peer', 'memory', String(SIZE)], { stdio: 'ignore' });
    running.push(kit);
    await waitFor('nbdkit listens', () => stat(socket).then(() => true, () => false), { child: kit });
    const uri = `nbds+unix:///?socket=${socket}&tls-certificates=${pki.clientDir}`;
    const restored = await runEngine(['restore', '--repo', repo, backupId, '--to', uri, '--json']);
    expect(withoutProgress(restored.stderr)).toBe('');
    expect(restored.code).toBe(0);
    const copy = join(dir, 'from-nbdkit.raw');
    expect((await run('nbdcopy', [uri, copy])).code).toBe(0);
    expect(await filesIdentical(copy, image)).toBe(true);
    // Without credentials the engine refuses to fall back to plain text.
    const plain = await runEngine(['restore', '--repo', repo, backupId, '--to', `nbd+unix:///?socket=${socket}`]);
    expect(plain.code).toBe(1);
    expect(plain.stderr).toMatch(/the server requires TLS/);
    kit.kill('SIGTERM');
    await exitOf(kit);
  });

  test('backup --source nbds:// from qemu-nbd with tls-creds-x509 (verify-peer=on): the certificate names 127.0.0.1', async () => {
    const port = 20000 + Math.floor(Math.random() * 20000);
    const qemu = spawn('qemu-nbd', ['-t', '-r', '-f', 'raw', '-x', 'os', '-b', '127.0.0.1', '-p', String(port), '--object', `tls-creds-x509,id=tls0,dir=${pki.serverDir},endpoint=server,verify-peer=on`, '--tls-creds', 'tls0', image], { stdio: 'ignore' });
    running.push(qemu);
    const uri = `nbds://127.0.0.1:${port}/os?tls-certificates=${pki.clientDir}`;
    await waitFor('qemu-nbd answers', async () => (await run('nbdinfo', ['--size', uri])).code === 0, { child: qemu, everyMs: 50 });
    const backup = await runEngine(['backup', '--repo', repo, '--source', uri, '--disk-name', 'from-qemu', '--json']);
    expect(withoutProgress(backup.stderr)).toBe('');
    const out = join(dir, 'from-qemu.raw');
    expect((await runEngine(['restore', '--repo', repo, parseJson<BackupJson>(backup.stdout).id, '--to', out])).code).toBe(0);
    expect(await filesIdentical(out, image)).toBe(true);
    // A certificate for another name is refused (here: the URI asks for a host name the certificate lacks).
    const wrongName = await runEngine(['backup', '--repo', repo, '--source', `${uri}&tls-hostname=backup.example.org`, '--disk-name', 'x']);
    expect(wrongName.code).toBe(1);
    expect(wrongName.stderr).toMatch(/TLS handshake failed: the peer certificate is for another host name/);
    expect(wrongName.stderr.trim().split('\n')).toHaveLength(1);
    qemu.kill('SIGTERM');
    await exitOf(qemu);
  });
});

describe('--socket PATH', () => {
  test('a regular file there is refused and left alone', async () => {
    const path = join(dir, 'precious.txt');
    await writeFile(path, 'keep me');
    const result = await runEngine(['serve', '--repo', repo, backupId, '--socket', path]);
    expect(result.code).toBe(2);
    expect(result.stderr).toBe(`engine: ${path} exists and is not a socket; it is left alone: choose another --socket path\n`);
    expect(await readFile(path, 'utf8')).toBe('keep me');
    expect(await readers()).toEqual([]);
  });

  test('the socket of a running server is refused; a stale one (its server killed) is replaced', async () => {
    const path = join(dir, 'shared.sock');
    const first = await startServe(['--socket', path]);
    const second = await runEngine(['serve', '--repo', repo, backupId, '--socket', path]);
    expect(second.code).toBe(2);
    expect(second.stderr).toBe(`engine: ${path} is the socket of a running server: stop it or choose another --socket path\n`);
    expect((await run('nbdinfo', ['--size', first.ready.exports[0]!.uri])).output.trim()).toBe(String(SIZE));
    first.child.kill('SIGKILL');
    await exitOf(first.child);
    expect((await stat(path)).isSocket()).toBe(true);
    const third = await startServe(['--socket', path]);
    expect(third.stderr()).toContain(`engine serve: ${path}: replacing a stale socket (no server listens on it)`);
    expect((await run('nbdinfo', ['--size', third.ready.exports[0]!.uri])).output.trim()).toBe(String(SIZE));
    await stopServe(third.child);
    // The killed server's registration is stale; the stopped one removed its own.
    expect(await readers()).toEqual([`${first.ready.readerToken}.json`]);
    await sh('rm', [join(repo, 'readers', `${first.ready.readerToken}.json`)]);
  });

  test('a missing directory, or one other users can write to, is refused with one line', async () => {
    const missing = join(dir, 'no-such-dir', 'x.sock');
    const result = await runEngine(['serve', '--repo', repo, backupId, '--socket', missing]);
    expect(result.code).toBe(2);
    expect(result.stderr).toBe(`engine: cannot create a socket in ${join(dir, 'no-such-dir')}: the directory does not exist\n`);
    const open = join(dir, 'open-dir');
    await mkdir(open);
    await chmod(open, 0o777);
    const shared = await runEngine(['serve', '--repo', repo, backupId, '--socket', join(open, 'x.sock')]);
    expect(shared.code).toBe(2);
    expect(shared.stderr).toBe(`engine: cannot create a socket in ${open}: other users can write to the directory (mode 777) and could replace the socket\n`);
    expect(await readers()).toEqual([]);
  });
});
