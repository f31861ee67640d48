/**
 * Who this process is, for leases (lease.ts): the host's id, its boot, the process and its start time.
 *
 * The host id is drawn once and kept in the host's cache directory (`<cache>/host-id`, 0600): the hostname
 * cannot serve (two appliances cloned from one image share it, and then each would judge the other's
 * processes dead by pid), nor can /etc/machine-id (cloned images share it too). Two hosts that share a
 * cache directory on purpose are one host to the protocol only if they also share a boot id, which they
 * cannot; so the worst a copied cache directory does is make a same-host lease wait for its expiry.
 */
import { randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { writeFileDurably } from '../durable-file.js';
import { ensurePrivateDirectory, MUTABLE_FILE_MODE } from '../file-modes.js';
import { isErrnoException } from '../errors.js';
import { bootId, isProcessAlive, procStatFields } from '../process-alive.js';
import type { LeaseHolder, ProcessProbe } from './lease.js';

const HOST_ID = /^[0-9a-f]{32}$/;

/** This host's id from `cacheDir`, drawn and stored on first use (of two first users, one id wins). */
export async function hostIdOf(cacheDir: string): Promise<string> {
  const file = join(cacheDir, 'host-id');
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const text = (await readFile(file, 'utf8')).trim();
      if (HOST_ID.test(text)) return text;
      throw new Error(`${file} does not hold a host id`);
    } catch (error) {
      if (!isErrnoException(error) || error.code !== 'ENOENT') throw error;
    }
    await ensurePrivateDirectory(cacheDir);
    try {
      await writeFileDurably(file, Buffer.from(`${randomBytes(16).toString('hex')}\n`), { exclusive: true, mode: MUTABLE_FILE_MODE });
    } catch (error) {
      // Another process drew it first: read theirs.
      if (!isErrnoException(error) || error.code !== 'EEXIST') throw error;
    }
  }
  throw new Error(`cannot establish a host id in ${cacheDir}`);
}

/** The holder fields of this process on the host `hostId`. */
export function thisProcess(hostId: string): LeaseHolder {
  return {
    host: hostId,
    hostname: hostname(),
    boot: bootId() ?? '',
    pid: process.pid,
    start: procStatFields(process.pid)?.[19] ?? '',
  };
}

/** The production probe: the pid runs, and it is the same process (start time), not a reused pid. */
export const processProbe: ProcessProbe = (pid, start) => {
  if (pid === process.pid) return start === '' || start === procStatFields(pid)?.[19] ? 'alive' : 'dead';
  if (!isProcessAlive(pid)) return 'dead';
  if (start === '') return 'unknown';
  const now = procStatFields(pid)?.[19];
  if (now === undefined) return 'unknown';
  return now === start ? 'alive' : 'dead';
};
