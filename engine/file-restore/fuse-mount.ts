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

/**
 * The server's chunk cache when --cache is not given: half of `mount`'s. The appliance's page cache is in front
 * of it, and the mount's process holds its own caches too (files-fs.ts: 8 MiB of listings, 16 MiB of file
 * blocks); a sequential reader only needs the chunk being read in small pieces by the guest's kernel.
 */
export const VM_MOUNT_CACHE_BYTES = 32 * 1024 * 1024;

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
      { repo: options.repo, backupId: options.backupId, disk: options.disk, cacheBytes: options.cacheBytes ?? VM_MOUNT_CACHE_BYTES, passphrase: options.passphrase, mountpoint: dir, stateDir, source: state.fuseSource },
      join(stateDir, 'mount.log'),
      // V8's young generation (up to 3 × 32 MiB by default) is most of what a short-lived buffer per FUSE
      // request costs in RSS: with 4 MiB semi-spaces a find of 74,000 files and 260 MiB of reads peaked at
      // 254 MiB instead of 300 MiB (measured; README).
      ['--max-semi-space-size=4'],
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
