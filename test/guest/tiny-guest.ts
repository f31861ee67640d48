/**
 * The tests' real Linux guest (test/guest/build-tiny-guest.sh): a self-booting 128 MiB raw disk with Debian's
 * cloud kernel, busybox and a QEMU guest agent, plus the kernel and initramfs for direct boot. Built once per
 * version of the script and kept in a cache folder between runs (~5 s to build, from Debian's packages), so the
 * suite pays for it once per machine. Callers copy `image` before writing to it: the cached one is shared.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, readdir, readFile, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface TinyGuest {
  /** Raw disk that boots by itself (MBR, SYSLINUX, ext3 root on the first partition). Shared: copy before writing. */
  image: string;
  kernel: string;
  initrd: string;
  /** Printed on the serial console once the agent has been started. */
  readyMarker: string;
  /** The virtio-serial port name the agent listens on. */
  agentPort: string;
}

const SCRIPT = fileURLToPath(new URL('./build-tiny-guest.sh', import.meta.url));
/** The tests' cache folder of things built once per machine (this guest, files-tree.ts's disks). */
export const CACHE_ROOT = process.env.ENGINE_TEST_CACHE ?? '/var/cache/engine-test';

let building: Promise<TinyGuest> | undefined;

/** The cached guest, built first if this version of the script has not built one on this machine. */
export function tinyGuest(): Promise<TinyGuest> {
  building ??= buildOnce();
  return building;
}

async function buildOnce(): Promise<TinyGuest> {
  const version = createHash('sha256').update(await readFile(SCRIPT)).digest('hex').slice(0, 16);
  const dir = join(CACHE_ROOT, `tiny-guest-${version}`);
  const guest: TinyGuest = {
    image: join(dir, 'guest.img'),
    kernel: join(dir, 'vmlinuz'),
    initrd: join(dir, 'initrd.gz'),
    readyMarker: 'TINY-GUEST-READY',
    agentPort: 'org.qemu.guest_agent.0',
  };
  if (await stat(join(dir, 'kernel-release')).then(() => true, () => false)) return guest;
  await mkdir(CACHE_ROOT, { recursive: true });
  // Built aside and renamed into place: test files running at once never see a half-built guest (the loser of a
  // race finds the folder there and throws its own copy away).
  const aside = `${dir}.${process.pid}.${Date.now()}.tmp`;
  await new Promise<void>((resolve, reject) =>
    execFile('bash', [SCRIPT, aside], { maxBuffer: 16 * 1024 * 1024 }, (error, _stdout, stderr) =>
      error ? reject(new Error(`building the tiny guest failed: ${stderr.trim() || error.message}`)) : resolve(),
    ),
  );
  await rename(aside, dir).catch(async (error: NodeJS.ErrnoException) => {
    await rm(aside, { recursive: true, force: true });
    if (error.code !== 'ENOTEMPTY' && error.code !== 'EEXIST') throw error;
  });
  // Guests of older versions of the script are of no further use (~170 MB each).
  for (const name of await readdir(CACHE_ROOT)) {
    if (name.startsWith('tiny-guest-') && name !== `tiny-guest-${version}` && !name.endsWith('.tmp')) {
      await rm(join(CACHE_ROOT, name), { recursive: true, force: true });
    }
  }
  return guest;
}
