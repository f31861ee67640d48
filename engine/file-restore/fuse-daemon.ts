/**
 * The background process of `engine mount --vm` (fuse-mount.ts): started detached with its options as one
 * JSON argument (the passphrase in the environment, as for serve-daemon.ts). It opens a file-restore session
 * (the backup served on a socket in the mount's state directory, the appliance VM booted), mounts the FUSE
 * view at the mount point, reports over IPC ({ready, readerToken, lease, backupId, volumes} or {error}), and
 * serves until the mount is gone (umount: the kernel ends the connection) or SIGTERM/SIGINT (then it
 * unmounts itself if it can). Either way it stops the VM and the server and releases its registration or
 * lease before it exits. Killed (-9), its VM dies with it (pdeathsig) and `engine umount` does the rest.
 */
import { spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { setNoticeSink } from '../../repo-format/notices.js';
import { MOUNT_PASSPHRASE_VARIABLE } from '../mount/serve-daemon-env.js';
import { openFileRestore } from './files.js';
import { FilesFileSystem } from './files-fs.js';
import { serveFuse } from './fuse.js';

interface DaemonOptions {
  repo: string;
  backupId: string;
  disk?: string | undefined;
  cacheBytes?: number | undefined;
  mountpoint: string;
  stateDir: string;
  source: string;
}

const options = JSON.parse(process.argv[2] ?? '{}') as DaemonOptions;
const passphrase = process.env[MOUNT_PASSPHRASE_VARIABLE] ? Buffer.from(process.env[MOUNT_PASSPHRASE_VARIABLE], 'base64') : undefined;
delete process.env[MOUNT_PASSPHRASE_VARIABLE];
const report = (message: unknown): void => {
  if (process.send) process.send(message);
};
const log = (message: string): void => {
  process.stderr.write(`${new Date().toISOString()} ${message}\n`);
};
const notices: string[] = [];
setNoticeSink((message) => {
  notices.push(message);
  log(message);
});

/** Whether our FUSE mount is still at the mount point (its source names this mount). */
async function stillMounted(): Promise<boolean> {
  const mounts = await readFile('/proc/mounts', 'utf8');
  return mounts.split('\n').some((line) => line.split(' ')[0] === options.source);
}

const controller = new AbortController();
let stopping = false;
/** Set once the mount is gone and the VM and server are being stopped: a signal then changes nothing. */
let closing = false;
const stop = (signal: NodeJS.Signals): void => {
  if (stopping || closing) return;
  stopping = true;
  controller.abort(signal);
  // Unmounting ends the FUSE connection, and so the wait below; a busy mount point stays (umount says so).
  void stillMounted().then((mounted) => {
    if (mounted) spawn('umount', [options.mountpoint], { stdio: 'ignore' }).once('exit', (code) => code === 0 || process.exit(1));
    else process.exit(1);
  });
};
process.once('SIGTERM', () => stop('SIGTERM'));
process.once('SIGINT', () => stop('SIGINT'));

try {
  const { session, close } = await openFileRestore({ repo: options.repo, backupId: options.backupId, disk: options.disk, cacheBytes: options.cacheBytes, passphrase, signal: controller.signal, purpose: 'mount' });
  let served: { done: Promise<void> };
  try {
    served = await serveFuse(new FilesFileSystem(session), options.mountpoint, options.source, (error) => log(`FUSE: ${error.message}`));
  } catch (error) {
    await close();
    throw error;
  }
  report({ ready: true, readerToken: session.readerToken, lease: session.lease, backupId: session.backupId, volumes: session.volumes, notices });
  process.disconnect?.();
  await served.done;
  closing = true;
  log('the mount is gone: stopping the appliance and the server');
  await close();
  process.exit(0);
} catch (error) {
  log(`${(error as { code?: string }).code ?? 'error'}: ${(error as Error).message}`);
  report({ error: { message: (error as Error).message, code: (error as { code?: string }).code, details: (error as { details?: unknown }).details } });
  process.exit(1);
}
