/**
 * Leases between real OS processes on one folder repository (the local backend): exclusivity holds whatever
 * the scheduler of the machine does, and a holder killed with SIGKILL is broken at once by the next acquirer
 * on this host (its lease would otherwise hold for 10 minutes). Each process appends enter/exit lines to one
 * O_APPEND log, which gives one order of events to check.
 */
import { describe, expect, test } from 'vitest';
import { spawn } from 'node:child_process';
import { mkdtemp, readFile, rm, mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

const NODE = resolve('node_modules/.bin/node');
const CHILD = resolve('test/v3-support/lease-child.ts');

function runChild(args: string[], env: Record<string, string> = {}): Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }> {
  return new Promise((done) => {
    const child = spawn(NODE, ['--no-warnings', CHILD, ...args], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, ...env } });
    let stderr = '';
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    child.on('exit', (code, signal) => done({ code, signal, stderr }));
  });
}

/** Replays the log: an exclusive holder enters only when no one holds, and no one enters beside it. */
function violations(lines: string[]): string[] {
  const problems: string[] = [];
  const inside = new Map<string, string>();
  for (const line of lines) {
    const [event, kind, pid] = line.split(' ');
    if (event === 'enter') {
      const exclusive = [...inside.values()].includes('exclusive');
      if (kind === 'exclusive' && inside.size > 0) problems.push(`${line} while ${inside.size} held`);
      if (kind === 'shared' && exclusive) problems.push(`${line} beside an exclusive holder`);
      inside.set(pid!, kind!);
    } else if (event === 'exit') inside.delete(pid!);
  }
  return problems;
}

async function scratch(): Promise<{ dir: string; root: string; log: string; cache: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'v3-leases-'));
  const root = join(dir, 'repo');
  await mkdir(root, { mode: 0o700 });
  return { dir, root, log: join(dir, 'events.log'), cache: join(dir, 'cache') };
}

describe('leases between processes', () => {
  test('6 processes, 2 exclusive and 4 shared, 12 rounds each: no exclusive holder ever overlaps another', async () => {
    const { dir, root, log, cache } = await scratch();
    try {
      const kinds = ['exclusive', 'shared', 'shared', 'exclusive', 'shared', 'shared'];
      const results = await Promise.all(kinds.map((kind) => runChild([root, log, cache, kind, '12'])));
      for (const result of results) expect(result, result.stderr).toMatchObject({ code: 0 });
      const lines = (await readFile(log, 'utf8')).trim().split('\n');
      expect(lines.filter((l) => l.startsWith('enter')).length).toBe(6 * 12);
      expect(lines.filter((l) => l.startsWith('exit')).length).toBe(6 * 12);
      expect(violations(lines)).toEqual([]);
      // The check can see a violation: a log in which a shared holder entered inside an exclusive one is caught.
      expect(violations(['enter exclusive 1 0', 'enter shared 2 0'])).not.toEqual([]);
      // Every lease released: nothing left under leases/.
      const { readdir } = await import('node:fs/promises');
      expect(await readdir(join(root, 'leases')).catch(() => [])).toEqual([]);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  test('a holder killed with SIGKILL is broken at once by the next acquirer on this host', async () => {
    const { dir, root, log, cache } = await scratch();
    try {
      const dying = await runChild([root, log, cache, 'exclusive', '1', 'die-holding']);
      expect(dying.signal).toBe('SIGKILL');
      const { readdir } = await import('node:fs/promises');
      expect((await readdir(join(root, 'leases'))).length).toBe(1); // its lease is still there
      // A 10-minute lease, and 2 minutes to wait: only seeing the holder dead lets this through.
      const next = await runChild([root, log, cache, 'shared', '1']);
      expect(next, next.stderr).toMatchObject({ code: 0 });
      const lines = (await readFile(log, 'utf8')).trim().split('\n');
      expect(lines[0]).toMatch(/^enter exclusive \d+ 0$/);
      expect(lines[1]).toMatch(/^broken exclusive \d+ dead by \d+$/);
      expect(lines.slice(2)).toEqual([expect.stringMatching(/^enter shared/), expect.stringMatching(/^exit shared/)]);
      expect(await readdir(join(root, 'leases'))).toEqual([]);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  test('a holder on another host (another host id) killed with SIGKILL is broken only once its lease expired', async () => {
    const { dir, root, log, cache } = await scratch();
    try {
      // Short leases, so that expiry comes within the test: T = 4 s, B = 0.5 s.
      const short = { LEASE_MS: '4000', SKEW_MS: '500' };
      const dying = await runChild([root, log, join(dir, 'other-host-cache'), 'exclusive', '1', 'die-holding'], short);
      expect(dying.signal).toBe('SIGKILL');
      const next = await runChild([root, log, cache, 'shared', '1'], short);
      expect(next, next.stderr).toMatchObject({ code: 0 });
      const lines = (await readFile(log, 'utf8')).trim().split('\n');
      // Its pid is dead here too, but a pid of another host means nothing: it was judged by its expiry.
      expect(lines[1]).toMatch(/^broken exclusive \d+ expired by \d+$/);
      expect(lines.slice(2)).toEqual([expect.stringMatching(/^enter shared/), expect.stringMatching(/^exit shared/)]);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
