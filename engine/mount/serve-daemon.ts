/**
 * The background `serve` of a mount or a live restore: started detached by mount.ts with its options as one JSON argument,
 * it reports over IPC once listening ({ready, readerToken, lease}) or failing ({error}), then serves until
 * SIGTERM/SIGINT, when it closes the server and releases its reader registration or lease; or until its
 * lease is lost (version 3), when it stops serving and exits 1.
 */
import { serve, type ServeOptions } from '../serve/serve.js';
import { MOUNT_PASSPHRASE_VARIABLE } from './serve-daemon-env.js';
import { setNoticeSink } from '../../repo-format/notices.js';

const options = JSON.parse(process.argv[2] ?? '{}') as ServeOptions;
// The passphrase of an encrypted repository comes in the environment (mount.ts), never in argv: base64 of its bytes.
const passphrase = process.env[MOUNT_PASSPHRASE_VARIABLE] ? Buffer.from(process.env[MOUNT_PASSPHRASE_VARIABLE], 'base64') : undefined;
delete process.env[MOUNT_PASSPHRASE_VARIABLE];
const report = (message: unknown): void => {
  if (process.send) process.send(message);
};

// What the repository says on its own (a stale lock broken, a read-only repository read without the
// lock) goes back to the mount, which says it to its user, and to the log.
const notices: string[] = [];
setNoticeSink((message) => {
  notices.push(message);
  process.stderr.write(`${new Date().toISOString()} ${message}\n`);
});

try {
  // A live restore's server (engine/restore/live-restore.ts) says `serve`; a mount's, `mount`.
  const handle = await serve({ ...options, passphrase, holder: options.holder ?? 'mount', onLog: (message) => process.stderr.write(`${new Date().toISOString()} ${message}\n`) });
  const stop = (): void => {
    void handle.close().finally(() => process.exit(0));
  };
  process.once('SIGTERM', stop);
  process.once('SIGINT', stop);
  // Version 3: a lost lease has stopped the server (its reason is in the log): the mount's disks read EIO
  // from then on, and `engine umount` finds the server gone (SPEC 19.9).
  void handle.lost.then((error) => {
    process.stderr.write(`${new Date().toISOString()} ${error.code}: ${error.message}\n`);
    process.exit(1);
  });
  // The domain definition the backup kept: what a live restore defines its new domain from.
  const domainXml = handle.backup.attachments.find((a) => a.name === 'libvirt-domain')?.data ?? null;
  report({ ready: true, readerToken: handle.readerToken, lease: handle.lease, backupId: handle.backup.id, exports: handle.exports, domainXml, notices });
  process.disconnect?.();
} catch (error) {
  // The details go along: they carry what the caller can do about it (details.remedies).
  report({ error: { message: (error as Error).message, code: (error as { code?: string }).code, details: (error as { details?: unknown }).details } });
  process.exitCode = 1;
}
