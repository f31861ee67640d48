/**
 * Change sets: `fraction` of a disk rewritten with seeded random data in 4 KiB–1 MiB writes (4 KiB
 * aligned, as a guest filesystem writes). The same writes can go to a qcow2 image through a writable
 * qemu-nbd (so its persistent dirty bitmaps record them) and to a raw copy of the same disk (what the
 * peers back up), keeping the two byte-identical.
 */
import { open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { NbdClient, SeededRandom, stopProcess } from '../engine/index.js';
import { run } from './tools.js';

/** Runs `use` against a writable qemu-nbd export of `image`; stops qemu-nbd (and waits for it) afterwards. */
export async function withQemuNbd<T>(image: string, format: 'qcow2' | 'raw', workDir: string, use: (uri: string) => Promise<T>): Promise<T> {
  const tag = `${process.pid}-${Math.random().toString(16).slice(2, 8)}`;
  const socket = join(workDir, `nbd-${tag}.sock`);
  const pidFile = join(workDir, `nbd-${tag}.pid`);
  await run('qemu-nbd', ['-f', format, '--socket', socket, '--persistent', '--fork', '--pid-file', pidFile, image]);
  const pid = Number((await readFile(pidFile, 'utf8')).trim());
  try {
    return await use(`nbd+unix:///?socket=${socket}`);
  } finally {
    await stopProcess(pid);
  }
}

/** Applies one change set to every target (NBD URIs and raw files); returns the bytes written to each. */
export async function applyChangeSet(targets: { nbd?: string[]; raw?: string[] }, size: number, fraction: number, seed: string): Promise<number> {
  const clients = await Promise.all((targets.nbd ?? []).map((uri) => NbdClient.connect(uri)));
  const files = await Promise.all((targets.raw ?? []).map((path) => open(path, 'r+')));
  const random = new SeededRandom(seed);
  const budget = Math.floor(size * fraction);
  let written = 0;
  try {
    while (written < budget) {
      const length = Math.min(budget - written, 4096 * (1 + random.below(256)));
      const offset = random.below(Math.floor((size - length) / 4096)) * 4096;
      const data = random.bytes(length);
      await Promise.all([...clients.map((c) => c.write(data, offset)), ...files.map((f) => f.write(data, 0, length, offset))]);
      written += length;
    }
    await Promise.all([...clients.map((c) => c.flush()), ...files.map((f) => f.sync())]);
  } finally {
    await Promise.all(clients.map((c) => c.close().catch(() => undefined)));
    await Promise.all(files.map((f) => f.close()));
  }
  return written;
}
