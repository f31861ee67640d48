/** What the benchmarks that time whole commands share: arguments, logging, commands under /usr/bin/time, sizes on disk. */
import { execFile } from 'node:child_process';
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';

export function arg(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

export function logger(name: string): (message: string) => void {
  return (message) => process.stderr.write(`[${name} ${new Date().toISOString().slice(11, 19)}] ${message}\n`);
}

export interface Measured {
  seconds: number;
  cpuSeconds: number;
  peakRssMiB: number;
}

export function sh(command: string, args: string[], env: Record<string, string> = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(command, args, { maxBuffer: 64 * 1024 * 1024, env: { ...process.env, ...env } }, (error, stdout, stderr) => {
      if (error) reject(new Error(`${command} ${args.join(' ')}: ${(stderr || error.message).trim().split('\n').slice(-2).join(' ')}`));
      else resolve(stdout);
    });
  });
}

/** Runs a command under /usr/bin/time (stdout discarded): wall seconds, user+sys CPU, peak RSS. */
export async function timed(command: string, args: string[], env: Record<string, string> = {}): Promise<Measured> {
  const quoted = [command, ...args].map((a) => `'${a.replace(/'/g, "'\\''")}'`).join(' ');
  const stderr = await new Promise<string>((resolve, reject) => {
    execFile('bash', ['-c', `/usr/bin/time -f '@@%e %U %S %M' ${quoted} > /dev/null 2> >(cat >&2)`], { maxBuffer: 64 * 1024 * 1024, env: { ...process.env, ...env } }, (error, _stdout, err) => {
      if (error) reject(new Error(`${command} ${args.slice(0, 3).join(' ')}…: ${err.trim().split('\n').slice(-2).join(' ')}`));
      else resolve(err);
    });
  });
  const line = stderr.split('\n').find((l) => l.startsWith('@@'));
  if (!line) throw new Error(`no timing from ${command}`);
  const [e, u, s, m] = line.slice(2).trim().split(/\s+/).map(Number);
  return { seconds: e!, cpuSeconds: u! + s!, peakRssMiB: m! / 1024 };
}

export async function duBytes(path: string): Promise<number> {
  let total = 0;
  const walk = async (p: string): Promise<void> => {
    const info = await stat(p);
    if (info.isDirectory()) for (const name of await readdir(p)) await walk(join(p, name));
    else total += info.size;
  };
  await walk(path);
  return total;
}
