/**
 * The Storage contract (repo-format/storage/storage.ts's header) as test cases any backend runs:
 * `storageContract(name, open)` registers them in the calling test file, each on a fresh, empty storage
 * that `open` makes (and whose `cleanup` removes it). Failures included: what is absent, taken, cut short
 * or too large gets its reason; an aborted call ends with ENGINE_INTERRUPTED.
 */
import { describe, expect, test } from 'vitest';
import { randomBytes } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { ObjectInfo, Storage } from '../dist/repo-format/storage/storage.js';
import { StorageError } from '../dist/repo-format/storage/storage-error.js';
import { tempDir } from './helpers.js';

export interface OpenedStorage {
  storage: Storage;
  cleanup: () => Promise<void>;
}

async function collect(listing: AsyncIterable<ObjectInfo>): Promise<ObjectInfo[]> {
  const all: ObjectInfo[] = [];
  for await (const item of listing) all.push(item);
  return all;
}

async function failure(promise: Promise<unknown>): Promise<StorageError> {
  const error = await promise.then(
    () => undefined,
    (caught: unknown) => caught,
  );
  expect(error, 'the call was expected to fail').toBeInstanceOf(StorageError);
  return error as StorageError;
}

/** Byte order of UTF-8 keys, independently of the code under test. */
function byteOrder(keys: string[]): string[] {
  return [...keys].sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
}

export function storageContract(name: string, open: () => Promise<OpenedStorage>): void {
  const withStorage = (title: string, body: (storage: Storage) => Promise<void>, timeout?: number): void => {
    test(
      title,
      async () => {
        const { storage, cleanup } = await open();
        try {
          await body(storage);
        } finally {
          await storage.close();
          await cleanup();
        }
      },
      timeout,
    );
  };

  describe(`Storage contract: ${name}`, () => {
    withStorage('put then get returns the same bytes; stat gives the size; an empty object is an object', async (storage) => {
      const bytes = randomBytes(100_000);
      await storage.put('packs/ab/ab01', bytes);
      expect((await storage.get('packs/ab/ab01')).equals(bytes)).toBe(true);
      const info = await storage.stat('packs/ab/ab01');
      expect(info).toMatchObject({ key: 'packs/ab/ab01', size: bytes.length });
      // `modified`, where a backend tells it, is the store's clock: near this host's on a healthy test machine.
      if (info.modified !== undefined) expect(Math.abs(info.modified - Date.now())).toBeLessThan(10 * 60_000);
      await storage.put('empty', new Uint8Array(0));
      expect((await storage.get('empty')).length).toBe(0);
      expect((await storage.stat('empty')).size).toBe(0);
    });

    withStorage('put replaces a whole object; put ifAbsent refuses a taken key (exists) and keeps the first', async (storage) => {
      await storage.put('leases/a.json', Buffer.from('one'));
      await storage.put('leases/a.json', Buffer.from('second version'));
      expect((await storage.get('leases/a.json')).toString()).toBe('second version');
      await storage.put('backups/r1', Buffer.from('first'), { ifAbsent: true });
      const taken = await failure(storage.put('backups/r1', Buffer.from('other'), { ifAbsent: true }));
      expect(taken.reason).toBe('exists');
      expect(taken.transient).toBe(false);
      expect((await storage.get('backups/r1')).toString()).toBe('first');
    });

    withStorage('of 16 concurrent creators of one key exactly one succeeds, and its bytes are the object', async (storage) => {
      const bodies = Array.from({ length: 16 }, (_, i) => Buffer.from(`creator ${i} `.repeat(1000 + i)));
      const outcomes = await Promise.allSettled(bodies.map((body) => storage.put('backups/race', body, { ifAbsent: true })));
      const won = outcomes.flatMap((outcome, i) => (outcome.status === 'fulfilled' ? [i] : []));
      expect(won.length).toBe(1);
      for (const outcome of outcomes) if (outcome.status === 'rejected') expect((outcome.reason as StorageError).reason).toBe('exists');
      expect((await storage.get('backups/race')).equals(bodies[won[0]!]!)).toBe(true);
    });

    withStorage('put from a local file uploads its bytes', async (storage) => {
      const dir = await tempDir('storage-source-');
      try {
        const file = join(dir.path, 'pack');
        const bytes = randomBytes(3 * 1024 * 1024 + 17);
        await writeFile(file, bytes);
        await storage.put('packs/cd/cd02', { file });
        expect((await storage.get('packs/cd/cd02')).equals(bytes)).toBe(true);
        await storage.put('packs/cd/cd03', { file }, { ifAbsent: true });
        expect((await failure(storage.put('packs/cd/cd03', { file }, { ifAbsent: true }))).reason).toBe('exists');
      } finally {
        await dir.cleanup();
      }
    });

    withStorage('ranged get returns exactly the bytes asked; past the end is out-of-range, never short', async (storage) => {
      const bytes = randomBytes(70_000);
      await storage.put('packs/ef/ef03', bytes);
      expect((await storage.get('packs/ef/ef03', { range: { offset: 0, length: 1 } })).equals(bytes.subarray(0, 1))).toBe(true);
      expect((await storage.get('packs/ef/ef03', { range: { offset: 12_345, length: 40_000 } })).equals(bytes.subarray(12_345, 52_345))).toBe(true);
      expect((await storage.get('packs/ef/ef03', { range: { offset: 69_999, length: 1 } })).equals(bytes.subarray(69_999))).toBe(true);
      expect((await failure(storage.get('packs/ef/ef03', { range: { offset: 69_999, length: 2 } }))).reason).toBe('out-of-range');
      expect((await failure(storage.get('packs/ef/ef03', { range: { offset: 70_000, length: 1 } }))).reason).toBe('out-of-range');
      expect((await failure(storage.get('packs/ef/ef03', { maxSize: 69_999 }))).reason).toBe('too-large');
      expect((await storage.get('packs/ef/ef03', { maxSize: 70_000 })).length).toBe(70_000);
      await expect(storage.get('packs/ef/ef03', { range: { offset: -1, length: 2 } })).rejects.toMatchObject({ code: 'ENGINE_INVALID_ARGUMENT' });
      await expect(storage.get('packs/ef/ef03', { range: { offset: 0, length: 0 } })).rejects.toMatchObject({ code: 'ENGINE_INVALID_ARGUMENT' });
    });

    withStorage('an absent object is not-found for get, ranged get and stat; delete of it succeeds', async (storage) => {
      expect((await failure(storage.get('backups/none'))).reason).toBe('not-found');
      expect((await failure(storage.get('backups/none', { range: { offset: 0, length: 1 } }))).reason).toBe('not-found');
      expect((await failure(storage.stat('backups/none'))).reason).toBe('not-found');
      await storage.delete('backups/none');
      await storage.delete('nowhere/at/all');
    });

    withStorage('delete removes the object; a second delete succeeds', async (storage) => {
      await storage.put('quarantine/q1', Buffer.from('x'));
      await storage.delete('quarantine/q1');
      expect((await failure(storage.stat('quarantine/q1'))).reason).toBe('not-found');
      expect(await collect(storage.list('quarantine/'))).toEqual([]);
      await storage.delete('quarantine/q1');
    });

    withStorage('list yields every key under a prefix once, in byte order, with sizes; startAfter resumes', async (storage) => {
      const keys = ['a', 'a-b', 'a.c', 'a0', 'a/b', 'a/b/c', 'a/b-c', 'a_z', 'A', 'b/x', 'packs/00/0001', 'packs/0a/0a02', 'packs/ff/ff03', 'packs/a0/a004', 'packsx'];
      // A folder and a file may not share a name on every backend ("a" and "a/b"): keep only keys no other key extends.
      const objects = keys.filter((key) => !keys.some((other) => other.startsWith(`${key}/`)));
      for (const [i, key] of objects.entries()) await storage.put(key, Buffer.alloc(i + 1, 7));
      const all = await collect(storage.list(''));
      expect(all.map((item) => item.key)).toEqual(byteOrder(objects));
      for (const item of all) expect(item.size).toBe(objects.indexOf(item.key) + 1);
      expect((await collect(storage.list('packs/'))).map((item) => item.key)).toEqual(['packs/00/0001', 'packs/0a/0a02', 'packs/a0/a004', 'packs/ff/ff03']);
      expect((await collect(storage.list('packs/0'))).map((item) => item.key)).toEqual(['packs/00/0001', 'packs/0a/0a02']);
      expect((await collect(storage.list('packs'))).map((item) => item.key)).toEqual(['packs/00/0001', 'packs/0a/0a02', 'packs/a0/a004', 'packs/ff/ff03', 'packsx']);
      expect((await collect(storage.list('a/'))).map((item) => item.key)).toEqual(byteOrder(objects.filter((key) => key.startsWith('a/'))));
      expect((await collect(storage.list('none/'))).map((item) => item.key)).toEqual([]);
      const ordered = byteOrder(objects);
      for (const after of ['a', 'a/b', 'packs/0a/0a02', 'packs/0', 'zzz']) {
        const expected = ordered.filter((key) => Buffer.compare(Buffer.from(key), Buffer.from(after)) > 0);
        expect((await collect(storage.list('', { startAfter: after }))).map((item) => item.key), `after ${after}`).toEqual(expected);
      }
    });

    withStorage(
      'list pages through 2500 objects in one folder: each once, in order',
      async (storage) => {
        const keys = Array.from({ length: 2500 }, (_, i) => `backups/${randomBytes(16).toString('hex')}${i}`);
        for (let i = 0; i < keys.length; i += 100) await Promise.all(keys.slice(i, i + 100).map((key) => storage.put(key, Buffer.from(key))));
        const listed = (await collect(storage.list('backups/'))).map((item) => item.key);
        expect(listed).toEqual(byteOrder(keys));
      },
      120_000,
    );

    withStorage('keys outside the rule are refused as invalid arguments, before the backend', async (storage) => {
      for (const key of ['', '/a', 'a/', 'a//b', '../x', 'a/../b', '.hidden', 'a b', 'a\\b', 'é', 'x'.repeat(1025)]) {
        await expect(storage.put(key, Buffer.from('x')), key).rejects.toMatchObject({ code: 'ENGINE_INVALID_ARGUMENT' });
        await expect(storage.get(key), key).rejects.toMatchObject({ code: 'ENGINE_INVALID_ARGUMENT' });
      }
      await expect(collect(storage.list('../'))).rejects.toMatchObject({ code: 'ENGINE_INVALID_ARGUMENT' });
    });

    withStorage('an aborted signal ends a call with ENGINE_INTERRUPTED and writes nothing', async (storage) => {
      const aborted = AbortSignal.abort();
      await expect(storage.put('backups/x', Buffer.from('x'), { signal: aborted })).rejects.toMatchObject({ code: 'ENGINE_INTERRUPTED' });
      await expect(storage.get('backups/x', { signal: aborted })).rejects.toMatchObject({ code: 'ENGINE_INTERRUPTED' });
      await expect(storage.stat('backups/x', { signal: aborted })).rejects.toMatchObject({ code: 'ENGINE_INTERRUPTED' });
      await expect(collect(storage.list('', { signal: aborted }))).rejects.toMatchObject({ code: 'ENGINE_INTERRUPTED' });
      expect(await collect(storage.list(''))).toEqual([]);
    });
  });
}
