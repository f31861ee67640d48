/**
 * `engine mount --vm` (SPEC 16.3): the backup's files as `engine files ls` names them, browsable under a
 * directory through FUSE. One background process (fuse-daemon.ts) serves the backup on a private socket,
 * runs the appliance VM for as long as the mount lives, and answers the kernel's FUSE requests with the
 * appliance's listings and reads. The mount is recorded as `engine mount`'s are (engine/mount/mount.ts,
 * state.json: the process with its boot id and start time, the FUSE mount with its source name), so
 * `engine umount` removes it the same way, after a kill -9 of the process too.
 */
import { basename, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { processIdentity } from '../host/process.js';
import { prepareMount, saveState, startDaemon, teardown, type MountOptions, type VmMountResult } from '../mount/mount.js';

export async function mountVm(options: MountOptions): Promise<VmMountResult> {
  const { dir, stateDir, state } = await prepareMount(options);
  // Unique to this mount: teardown unmounts only a FUSE mount of this name at the directory.
  state.fuseSource = `engine-files-${basename(stateDir)}`;
  // Recorded before it exists: a mount command killed while its process mounts still leaves it in the state.
  state.mounts.push(dir);
  await saveState(stateDir, state);
  try {
    const daemon = await startDaemon(
      fileURLToPath(new URL('./fuse-daemon.js', import.meta.url)),
      { repo: options.repo, backupId: options.backupId, disk: options.disk, cacheBytes: options.cacheBytes, passphrase: options.passphrase, mountpoint: dir, stateDir, source: state.fuseSource },
      join(stateDir, 'mount.log'),
    );
    state.server = { pid: daemon.pid, identity: processIdentity(daemon.pid), readerToken: daemon.readerToken, lease: daemon.lease };
    const result: VmMountResult = { backup: daemon.backupId, dir, mode: 'vm', volumes: daemon.volumes ?? [], serverPid: daemon.pid, readerToken: daemon.readerToken, lease: daemon.lease };
    state.result = result;
    await saveState(stateDir, state);
    return result;
  } catch (error) {
    await teardown(stateDir, state).catch(() => undefined);
    throw error;
  }
}
