import { readFile } from 'node:fs/promises';
import type { EngineError } from '../../repo-format/errors.js';

/**
 * Major and minor of a Linux dev_t: major = bits 8..19 and 32..43, minor = bits 0..7 and 20..31
 * (arithmetic, not bit operators: dev_t can exceed 32 bits).
 */
export function deviceNumbers(dev: number | bigint): { major: number; minor: number } {
  const value = Number(dev);
  const low = value % 2 ** 32;
  const high = Math.floor(value / 2 ** 32);
  return { major: (Math.floor(low / 256) % 4096) + Math.floor(high / 4096) * 4096, minor: (low % 256) + Math.floor(low / 2 ** 20) * 256 };
}

/**
 * Size in bytes of a block device, from sysfs (/sys/dev/block/MAJOR:MINOR/size counts 512-byte sectors).
 * Node has no BLKGETSIZE64 ioctl, and stat() reports 0 for devices. When sysfs cannot tell (the device
 * went away, no sysfs in this container), `fail` makes the error of the caller's role: an unreadable
 * source, an unwritable target.
 */
export async function blockDeviceSize(rdev: number | bigint, fail: (why: string) => EngineError): Promise<number> {
  const { major, minor } = deviceNumbers(rdev);
  const path = `/sys/dev/block/${major}:${minor}/size`;
  const text = await readFile(path, 'utf8').catch((error: NodeJS.ErrnoException) => {
    throw fail(`its size cannot be read from ${path} (${error.code ?? error.message})`);
  });
  const sectors = Number(text.trim());
  if (text.trim() === '' || !Number.isSafeInteger(sectors) || sectors < 0) throw fail(`${path} holds no size`);
  return sectors * 512;
}
