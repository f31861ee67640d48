/**
 * The repository lock file: exclusive creation, a refusal that names the holder, breaking a stale lock
 * left by a dead process on this host, never breaking another host's lock, and release() removing
 * only the lock it created.
 */
import { afterAll, beforeAll, beforeEach, describe, expect, test } from 'vitest';
import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { acquireLock, isStale, readLockHolder } from '../dist/repo-format/lock.js';
import { RepositoryLockedError, type LockHolder } from '../dist/repo-format/errors.js';
import { isProcessAlive } from '../dist/repo-format/process-alive.js';

const ISO_TIME = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;

let scratch: string;
let counter = 0;
let root: string;

beforeAll(async () => {
  scratch = await mkdtemp(join(tmpdir(), 'engine-lock-test-'));
});

afterAll(async () => {
  if (scratch) await rm(scratch, { recursive: true, force: true });
});

beforeEach(async () => {
  counter += 1;
  root = join(scratch, `repo-${counter}`);
  await mkdir(join(root, 'tmp'), { recursive: true });
});

/** The pid of a process that has started and exited (and been reaped) on this host. */
async function deadPid(): Promise<number> {
  const child = spawn(process.execPath, ['-e', ''], { stdio: 'ignore' });
  const pid = child.pid;
  if (pid === undefined) throw new Error('could not spawn node');
  await new Promise<void>((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', () => resolve());
  });
  return pid;
}

async function writeLock(holder: LockHolder): Promise<void> {
  await writeFile(join(root, 'lock'), JSON.stringify(holder));
}

async function lockedError(promise: Promise<unknown>): Promise<RepositoryLockedError> {
  const error = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(RepositoryLockedError);
  return error as RepositoryLockedError;
}

async function exists(path: string): Promise<boolean> {
  return readFile(path).then(
    () => true,
    () => false,
  );
}

describe('repository lock', () => {
  test('acquire writes the holder as JSON', async () => {
    const lock = await acquireLock(root, 'backup');
    expect(lock.holder.pid).toBe(process.pid);
    expect(lock.holder.hostname).toBe(hostname());
    expect(lock.holder.command).toBe('backup');
    expect(lock.holder.since).toMatch(ISO_TIME);
    expect(lock.brokeStale).toBeUndefined();
    const onDisk = JSON.parse(await readFile(join(root, 'lock'), 'utf8')) as LockHolder & { token: string };
    expect(onDisk).toEqual({ ...lock.holder, token: expect.stringMatching(/^[0-9a-f]{16}$/) });
    expect(await readLockHolder(root)).toEqual(lock.holder);
    await lock.release();
  });

  test('acquiring twice is RepositoryLockedError naming pid, host and time', async () => {
    const first = await acquireLock(root, 'backup');
    const error = await lockedError(acquireLock(root, 'verify'));
    expect(error.code).toBe('ENGINE_REPOSITORY_LOCKED');
    expect(error.message).toContain(`locked by pid ${process.pid} on host ${hostname()} since ${first.holder.since}`);
    expect(error.message).toContain('(backup)');
    expect(first.holder.since).toMatch(ISO_TIME);
    expect(error.details.holder).toEqual(first.holder);
    expect(error.details.path).toBe(root);
    // The refused attempt did not touch the holder's lock.
    expect(await readLockHolder(root)).toEqual(first.holder);
    await first.release();
    expect(await exists(join(root, 'lock'))).toBe(false);
    const again = await acquireLock(root, 'verify');
    expect(again.brokeStale).toBeUndefined();
    await again.release();
  });

  test('a lock left by a dead pid on this host is broken and reported in brokeStale', async () => {
    const pid = await deadPid();
    const stale: LockHolder = { pid, hostname: hostname(), since: '2020-01-02T03:04:05.006Z', command: 'backup' };
    expect(isStale(stale)).toBe(true);
    await writeLock(stale);
    const lock = await acquireLock(root, 'restore');
    expect(lock.brokeStale).toEqual(stale);
    expect(lock.holder.pid).toBe(process.pid);
    expect(await readLockHolder(root)).toEqual(lock.holder);
    // The stale lock was moved aside and removed, not left in tmp/.
    expect(await readdir(join(root, 'tmp'))).toEqual([]);
    await lock.release();
    expect(await exists(join(root, 'lock'))).toBe(false);
  });

  test('a lock from another hostname is never broken, even with a dead pid', async () => {
    const pid = await deadPid();
    const foreign: LockHolder = { pid, hostname: `not-${hostname()}.invalid`, since: '2021-06-07T08:09:10.011Z', command: 'backup' };
    expect(isStale(foreign)).toBe(false);
    await writeLock(foreign);
    const before = await readFile(join(root, 'lock'));
    const error = await lockedError(acquireLock(root, 'backup'));
    expect(error.message).toContain(`locked by pid ${pid} on host ${foreign.hostname} since ${foreign.since}`);
    expect(error.details.holder).toEqual(foreign);
    expect((await readFile(join(root, 'lock'))).equals(before)).toBe(true);
    expect(await readdir(join(root, 'tmp'))).toEqual([]);
  });

  test('a lock held by a live process on this host is not broken', async () => {
    const holder: LockHolder = { pid: process.ppid, hostname: hostname(), since: '2022-01-01T00:00:00.000Z', command: 'verify' };
    expect(isStale(holder)).toBe(false);
    await writeLock(holder);
    const error = await lockedError(acquireLock(root, 'backup'));
    expect(error.details.holder).toEqual(holder);
    expect(await readLockHolder(root)).toEqual(holder);
  });

  test('a lock file that cannot be read is a refusal that says so, not broken', async () => {
    await writeFile(join(root, 'lock'), '{"pid": ');
    const error = await lockedError(acquireLock(root, 'backup'));
    expect(error.message).toContain('locked by another process (its lock file could not be read)');
    expect(await readFile(join(root, 'lock'), 'utf8')).toBe('{"pid": ');
  });

  test('release() removes only its own lock', async () => {
    const lock = await acquireLock(root, 'backup');
    // Someone else's lock replaced ours (e.g. ours was broken as stale by mistake).
    const other: LockHolder = { pid: process.pid, hostname: hostname(), since: '1999-12-31T23:59:59.999Z', command: 'other' };
    await writeLock(other);
    await lock.release();
    expect(await readLockHolder(root)).toEqual(other);

    const foreign: LockHolder = { pid: 12345, hostname: 'elsewhere.invalid', since: lock.holder.since, command: 'backup' };
    await writeLock(foreign);
    await lock.release();
    expect(await readLockHolder(root)).toEqual(foreign);
  });

  test('release() twice, or after the lock file is gone, is harmless', async () => {
    const lock = await acquireLock(root, 'backup');
    await lock.release();
    await lock.release();
    expect(await exists(join(root, 'lock'))).toBe(false);
    // A lock is identified by pid + `since` (millisecond resolution): make sure the next one has a later time.
    while (new Date().toISOString() === lock.holder.since) await new Promise((resolve) => setTimeout(resolve, 1));
    const next = await acquireLock(root, 'backup');
    expect(next.holder.since).not.toBe(lock.holder.since);
    // The first lock's release must not remove the second one.
    await lock.release();
    expect(await readLockHolder(root)).toEqual(next.holder);
    await next.release();
  });
});

describe('process liveness', () => {
  test('a zombie counts as dead (a lock held by an exited, unreaped process is stale)', async () => {
    // bash starts a short sleep in the background, prints its pid and becomes a long `sleep`, which never reaps it.
    const parent = spawn('bash', ['-c', 'sleep 0.2 & echo $!; exec sleep 10'], { stdio: ['ignore', 'pipe', 'ignore'] });
    try {
      const pid = Number(await new Promise<string>((resolve) => parent.stdout.once('data', (chunk: Buffer) => resolve(chunk.toString()))));
      let zombie = false;
      for (let i = 0; !zombie; i += 1) {
        zombie = (await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '')).includes(') Z ');
        if (!zombie) await new Promise((resolve) => setTimeout(resolve, 10));
      }
      expect(zombie).toBe(true);
      expect(() => process.kill(pid, 0)).not.toThrow(); // what a kill(0)-only check would call alive
      expect(isProcessAlive(pid)).toBe(false);
      expect(isStale({ pid, hostname: hostname() })).toBe(true);
      expect(isProcessAlive(parent.pid!)).toBe(true);
    } finally {
      parent.kill('SIGKILL');
    }
  });
});
