/**
 * Encrypted repositories (SPEC.md, section 18): key file, keyed chunk ids, AES-256-GCM frames and records,
 * through the real CLI. Round trips are byte-exact (cmp, qemu-img compare); a marker written into the disk
 * must appear nowhere in the repository; a wrong passphrase writes nothing; a tampered ciphertext is named
 * by backup, disk and offset by verify and refused by restore; a config rewritten as plain cannot make a
 * backup that was given a passphrase write plaintext.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { copyFile, open, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import { Repository, scanPack, KIND_DATA, FLAG_ENCRYPTED, FRAME_HEADER_SIZE, KIND_MAP_LEAF, ovirtApplianceBackup, ovirtIncrementalBackup } from '../dist/engine/index.js';
import { createKeyFile, decodeKeyFile, encodeKeyFile, unlockKeyFile, type KeyFile } from '../dist/repo-format/key-file.js';
import { newRepositoryKeys } from '../dist/repo-format/crypto.js';
import { AUTHENTICATION_FAILED, blobId, openBlob, sealBlobToBuffer } from '../dist/repo-format/blob-codec.js';
import { LZ4 } from '../dist/repo-format/compression.js';
import { openMetadata, sealMetadata } from '../dist/repo-format/sealed-metadata.js';
import { checksum64, initChecksum } from '../dist/repo-format/checksum.js';
import { decodeConfig, encodeConfig, newConfig } from '../dist/repo-format/config.js';
import { filesIdentical, parseJson, runEngine, sh, sparseFile, tempDir, writeRegion, type BackupJson, withoutProgress } from './helpers.js';
import { qcow2, qemuImgCompare, qemuIo } from './qemu.js';

// About the pipeline: its blocks run in the worker pool whatever the disk's size (a small job otherwise runs them on
// the main thread; inline-blocks.test.ts checks the two agree).
process.env.ENGINE_TEST_BLOCK_WORKERS = 'pool';

const MiB = 1024 * 1024;
const PASSPHRASE = 'correct horse battery staple';
const MARKER = 'ENGINE-PLAINTEXT-MARKER-7f3a9c';

let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-enc-'));
  await initChecksum();
});
afterAll(async () => {
  await cleanup();
});

const withPass = (passphrase = PASSPHRASE): { env: Record<string, string> } => ({ env: { ENGINE_PASSWORD: passphrase } });

async function encryptedRepo(name: string): Promise<string> {
  const repo = join(dir, name);
  // Format 2: its config, key file, LevelDB index and lock are what these cases look at (format 3 encrypted:
  // v3-backup, v3-repair, crash-v3).
  const result = await runEngine(['init', repo, '--format', '2', '--encrypt', '--json'], withPass());
  expect(withoutProgress(result.stderr)).toBe('');
  expect(result.code).toBe(0);
  return repo;
}

async function backupOk(repo: string, args: string[]): Promise<BackupJson & { disks: { mode: string; modeReason: string | null }[] }> {
  const result = await runEngine(['backup', '--repo', repo, '--json', ...args], withPass());
  expect(withoutProgress(result.stderr)).toBe('');
  expect(result.code).toBe(0);
  return parseJson(result.stdout);
}

/** 8 MiB of random data, 4 MiB of a repeated ASCII marker, 2 MiB of zeros, 3 MiB + 4097 of text. */
async function markedImage(name: string): Promise<string> {
  const image = join(dir, name);
  const size = 17 * MiB + 4097;
  await sparseFile(image, size);
  await writeRegion(image, 0, 8 * MiB, 'random', name);
  await writeFile(join(dir, `${name}.marker`), Buffer.alloc(4 * MiB, `${MARKER}\n`));
  const handle = await open(image, 'r+');
  await handle.write(await readFile(join(dir, `${name}.marker`)), 0, 4 * MiB, 8 * MiB);
  await handle.close();
  await writeRegion(image, 14 * MiB, 3 * MiB + 4097, 'text', name);
  return image;
}

/** Every file under `root` with its size and content hash: "nothing written" is this listing unchanged. */
async function snapshot(root: string): Promise<Map<string, string>> {
  const files = new Map<string, string>();
  const walk = async (path: string): Promise<void> => {
    for (const entry of await readdir(path, { withFileTypes: true })) {
      const full = join(path, entry.name);
      if (entry.isDirectory()) {
        files.set(`${relative(root, full)}/`, 'dir');
        await walk(full);
      } else {
        files.set(relative(root, full), createHash('sha256').update(await readFile(full)).digest('hex'));
      }
    }
  };
  await walk(root);
  return files;
}

async function packIds(repo: string): Promise<string[]> {
  const ids: string[] = [];
  for (const sub of await readdir(join(repo, 'packs'))) for (const name of await readdir(join(repo, 'packs', sub))) ids.push(name);
  return ids.sort();
}

async function blobIdsOf(repo: string): Promise<Set<string>> {
  const ids = new Set<string>();
  for (const packId of await packIds(repo)) {
    const scan = await scanPack(repo, packId, true);
    expect(scan.damage).toBeUndefined();
    for (const frame of scan.frames) ids.add(frame.header.id.toString('hex'));
  }
  return ids;
}

/**
 * Flips bits of one byte of a frame's payload in its pack. `recomputeChecksum`: as an attacker would (the
 * xxh64 trailer made to match again, so only the GCM tag can tell); otherwise as bad media would.
 */
async function damageFrame(repo: string, packId: string, frame: { offset: number; length: number }, at: number, mask: number, recomputeChecksum: boolean): Promise<void> {
  const handle = await open(join(repo, 'packs', packId.slice(0, 2), packId), 'r+');
  try {
    const data = Buffer.alloc(frame.length);
    await handle.read(data, 0, frame.length, frame.offset);
    data[FRAME_HEADER_SIZE + at] = data[FRAME_HEADER_SIZE + at]! ^ mask;
    if (recomputeChecksum) data.writeBigUInt64LE(checksum64(data.subarray(0, frame.length - 8)), frame.length - 8);
    await handle.write(data, 0, frame.length, frame.offset);
  } finally {
    await handle.close();
  }
}

describe('key file', () => {
  const repositoryId = '0123456789abcdef0123456789abcdef';

  test('encode/decode round trip; the right passphrase unwraps the keys, a wrong one fails the tag', async () => {
    const keys = newRepositoryKeys();
    const file = await createKeyFile(keys, PASSPHRASE, repositoryId, 'a1b2c3d4e5f60718');
    expect(file.kdf).toMatchObject({ name: 'scrypt', N: 32768, r: 8, p: 1 });
    expect(Buffer.from(file.kdf.salt, 'base64')).toHaveLength(32);
    expect(Buffer.from(file.sealed, 'base64')).toHaveLength(64 + 28);
    const decoded = decodeKeyFile(encodeKeyFile(file), 'key file');
    expect(decoded).toEqual(file);
    const unlocked = await unlockKeyFile(decoded, PASSPHRASE, repositoryId, '/r');
    expect(unlocked.dataKey.equals(keys.dataKey)).toBe(true);
    expect(unlocked.idKey.equals(keys.idKey)).toBe(true);
    await expect(unlockKeyFile(decoded, `${PASSPHRASE}!`, repositoryId, '/r')).rejects.toMatchObject({ code: 'ENGINE_WRONG_PASSPHRASE' });
    // The keys are bound to their repository: the same file under another repository id does not open.
    await expect(unlockKeyFile(decoded, PASSPHRASE, 'f'.repeat(32), '/r')).rejects.toMatchObject({ code: 'ENGINE_WRONG_PASSPHRASE' });
  });

  test('a damaged key file is refused before any work, naming what is wrong', async () => {
    const good = await createKeyFile(newRepositoryKeys(), PASSPHRASE, repositoryId, '0000000000000001');
    const edited = (edit: (f: Record<string, unknown>) => void): Buffer => {
      const f = JSON.parse(JSON.stringify(good)) as Record<string, unknown>;
      edit(f);
      return Buffer.from(JSON.stringify(f));
    };
    const reason = (bytes: Buffer): string => {
      try {
        decodeKeyFile(bytes, 'key file k');
        return 'accepted';
      } catch (error) {
        return (error as Error).message;
      }
    };
    expect(reason(Buffer.from('{'))).toBe('key file k is damaged: not valid JSON');
    expect(reason(edited((f) => ((f.kdf as KeyFile['kdf']).N = 1024)))).toBe('key file k is damaged: scrypt N 1024 must be a power of two of at least 32768');
    expect(reason(edited((f) => ((f.kdf as KeyFile['kdf']).N = 2 ** 24)))).toBe('key file k is damaged: scrypt N 16777216 and r 8 need more than 1024 MiB');
    expect(reason(edited((f) => ((f.kdf as KeyFile['kdf']).salt = 'AAAA')))).toBe('key file k is damaged: the salt is not 32 bytes of base64');
    expect(reason(edited((f) => (f.sealed = 'AAAA')))).toBe('key file k is damaged: the sealed keys are not 92 bytes of base64');
    expect(reason(edited((f) => (f.cipher = 'chacha20')))).toBe('key file k is damaged: unknown cipher chacha20');
    await expect(createKeyFile(newRepositoryKeys(), '', repositoryId, '0000000000000002')).rejects.toMatchObject({ code: 'ENGINE_INVALID_ARGUMENT' });
  });
});

describe('config of an encrypted repository', () => {
  const id = '0123456789abcdef0123456789abcdef';
  const created = new Date('2024-05-06T07:08:09.010Z');
  const encryption = { cipher: 'aes-256-gcm' as const, keyFile: 'keys/0011223344556677.json' };

  function edited(edit: (c: Record<string, unknown>) => void): Buffer {
    const c = JSON.parse(encodeConfig(newConfig(id, MiB, created, encryption)).toString('utf8')) as Record<string, unknown>;
    edit(c);
    return Buffer.from(JSON.stringify(c));
  }

  test('round trip and exact content: version 2, keyed hash, the key file named', () => {
    const config = newConfig(id, MiB, created, encryption);
    expect(JSON.parse(encodeConfig(config).toString('utf8'))).toEqual({
      format: 'vm-backup-engine repository',
      version: 2,
      id,
      created: '2024-05-06T07:08:09.010Z',
      blockSize: MiB,
      hash: 'hmac-sha256',
      checksum: 'xxh64',
      compression: 'lz4-block',
      mapPageEntries: 1024,
      encryption: { cipher: 'aes-256-gcm', keyFile: 'keys/0011223344556677.json' },
    });
    expect(decodeConfig(encodeConfig(config))).toEqual(config);
  });

  test('inconsistent encryption parameters are refused; a newer encrypted version is too new', () => {
    expect(decodeConfig(edited((c) => (c.version = 1)))).toBe('config has encryption parameters but version 1');
    expect(decodeConfig(edited((c) => (c.hash = 'sha256')))).toBe('config names a hash, checksum or compression this engine does not know');
    expect(decodeConfig(edited((c) => ((c.encryption as Record<string, unknown>).cipher = 'aes-128-cbc')))).toBe('config names a cipher this engine does not know');
    expect(decodeConfig(edited((c) => ((c.encryption as Record<string, unknown>).keyFile = '../key.json')))).toBe('config names no valid key file');
    // Version 3 (many writers) is read, and needs its lease timing (SPEC.md 19.1); 4 is a future format.
    expect(decodeConfig(edited((c) => (c.version = 3)))).toBe('config of version 3 names no lease timing');
    const newer = decodeConfig(edited((c) => (c.version = 4)));
    expect(typeof newer === 'string' ? newer : newer.version).toBe(4);
    // Without encryption, version 2 is a plain repository of a future format.
    const plain2 = decodeConfig(edited((c) => {
      delete c.encryption;
      c.version = 2;
    }));
    expect(typeof plain2 === 'string' ? plain2 : plain2.version).toBe(2);
  });
});

describe('encrypted frames and records', () => {
  test('seal/open round trip; the header is authenticated, so a frame cannot move under another id', () => {
    const keys = newRepositoryKeys();
    for (const raw of [Buffer.alloc(64 * 1024, 'compressible text '), randomBytes(64 * 1024)]) {
      const id = blobId(raw, keys);
      expect(id.equals(createHash('sha256').update(raw).digest())).toBe(false);
      const frame = sealBlobToBuffer(KIND_DATA, id, raw, keys, LZ4);
      const flags = frame.readUInt8(5);
      expect(flags & FLAG_ENCRYPTED).toBe(FLAG_ENCRYPTED);
      const opened = openBlob(frame, id, keys);
      if (typeof opened === 'string') throw new Error(opened);
      expect(opened.plaintext.equals(raw)).toBe(true);
      expect(frame.includes(raw.subarray(0, 32))).toBe(false);
      // Without the keys (a plain repository's reader) the frame is refused, not misread.
      expect(openBlob(frame, id)).toBe(`unknown frame flags 0x${flags.toString(16)}`);
      // The same frame relabelled as a map page, with a valid checksum: the tag fails.
      const moved = Buffer.from(frame);
      moved.writeUInt8(KIND_MAP_LEAF, 4);
      moved.writeBigUInt64LE(checksum64(moved.subarray(0, moved.length - 8)), moved.length - 8);
      expect(openBlob(moved, id, keys)).toBe(AUTHENTICATION_FAILED);
      // Another repository's keys do not open it.
      expect(openBlob(frame, id, newRepositoryKeys())).toBe(AUTHENTICATION_FAILED);
    }
    // A plaintext frame has no place in an encrypted repository.
    const raw = randomBytes(1000);
    expect(openBlob(sealBlobToBuffer(KIND_DATA, blobId(raw, keys), raw, undefined, LZ4), undefined, keys)).toBe('frame is not encrypted, in an encrypted repository');
  });

  test('sealed metadata: round trip, bound to its name', () => {
    const key = newRepositoryKeys().dataKey;
    const text = Buffer.from('{"version": 1, "name": "vm42"}');
    const sealed = sealMetadata(key, text, 'backups/aa');
    expect(sealed.subarray(0, 5).equals(Buffer.from('EENC\x01', 'latin1'))).toBe(true);
    expect(sealed).toHaveLength(5 + 12 + text.length + 16);
    expect(openMetadata(key, sealed, 'backups/aa')).toEqual(text);
    expect(openMetadata(key, sealed, 'backups/bb')).toMatch(/^authentication failed/);
    expect(openMetadata(key, text, 'backups/aa')).toBe('not encrypted (no EENC magic), in an encrypted repository');
  });
});

describe('an encrypted repository through the CLI', () => {
  let repo: string;
  let image: string;
  let first: BackupJson;

  test('init --encrypt writes a format-2 config naming its key file; backup and restore are byte-exact', async () => {
    repo = await encryptedRepo('repo-a');
    const config = JSON.parse(await readFile(join(repo, 'config'), 'utf8')) as Record<string, unknown>;
    expect(config).toMatchObject({ version: 2, hash: 'hmac-sha256', encryption: { cipher: 'aes-256-gcm' } });
    const keyFile = (config.encryption as { keyFile: string }).keyFile;
    expect(keyFile).toMatch(/^keys\/[0-9a-f]{16}\.json$/);
    expect((await stat(join(repo, keyFile))).isFile()).toBe(true);
    // Readable by its owner only (anyone who reads it can try passphrases offline), and written once (SPEC.md, 2.1).
    expect((await stat(join(repo, keyFile))).mode % 0o1000).toBe(0o400);

    image = await markedImage('marked.img');
    first = await backupOk(repo, ['--source', image]);
    expect(first.disks[0]).toMatchObject({ blocksTotal: 18, blocksZero: 2 });
    const restored = join(dir, 'marked.restored');
    const result = await runEngine(['restore', '--repo', repo, first.id, '--to', restored], withPass());
    expect(withoutProgress(result.stderr)).toBe('');
    expect(result.code).toBe(0);
    expect(await filesIdentical(image, restored)).toBe(true);
    const list = await runEngine(['list', '--repo', repo, '--json'], withPass());
    expect(parseJson<{ backups: { id: string }[] }>(list.stdout).backups.map((b) => b.id)).toEqual([first.id]);
    const verify = await runEngine(['verify', '--repo', repo, '--read-data', '--json'], withPass());
    expect(verify.code).toBe(0);
    expect(parseJson<{ ok: boolean; blobs: number }>(verify.stdout)).toMatchObject({ ok: true });
  });

  test('the marker written into the disk appears nowhere in the repository (packs, records, index)', async () => {
    const marker = Buffer.from(MARKER);
    expect((await readFile(image)).includes(marker)).toBe(true);
    // grep -r exits 1 when nothing matches, 0 on a match.
    await expect(sh('grep', ['-r', '-l', '-F', MARKER, repo])).rejects.toThrow();
    for (const [path, kind] of await snapshot(repo)) {
      if (kind === 'dir') continue;
      const bytes = await readFile(join(repo, path));
      expect(bytes.includes(marker), path).toBe(false);
      expect(bytes.includes(Buffer.from('marked.img')), path).toBe(false); // the disk name is in the encrypted record only
    }
    const record = await readFile(join(repo, 'backups', first.id));
    expect(record.subarray(0, 4).toString('latin1')).toBe('EENC');
  });

  test('the same data in two repositories with different keys gives different chunk ids, none of them SHA-256', async () => {
    const other = await encryptedRepo('repo-b');
    await backupOk(other, ['--source', image]);
    const idsA = await blobIdsOf(repo);
    const idsB = await blobIdsOf(other);
    expect(idsA.size).toBeGreaterThan(10);
    expect(idsB.size).toBe(idsA.size);
    expect([...idsA].filter((id) => idsB.has(id))).toEqual([]);
    const bytes = await readFile(image);
    const sha = new Set<string>();
    for (let at = 0; at < bytes.length; at += MiB) sha.add(createHash('sha256').update(bytes.subarray(at, at + MiB)).digest('hex'));
    expect([...idsA, ...idsB].filter((id) => sha.has(id))).toEqual([]);
    // And the ids are exactly HMAC-SHA256 of the blocks under each repository's own id key.
    const opened = await Repository.open(repo, { access: 'read', passphrase: PASSPHRASE });
    for (let at = 0; at < 8 * MiB; at += MiB) expect(idsA.has(opened.blobId(bytes.subarray(at, at + MiB)).toString('hex'))).toBe(true);
  });

  test('a wrong or missing passphrase: its own error and exit code, and nothing written', async () => {
    const before = await snapshot(repo);
    for (const args of [['backup', '--source', image], ['list'], ['restore', first.id, '--to', join(dir, 'never.raw')], ['verify']]) {
      const wrong = await runEngine([...args, '--repo', repo, '--json'], withPass('not the passphrase'));
      expect(wrong.code).toBe(6);
      expect(parseJson<{ error: { code: string; message: string } }>(wrong.stdout).error).toMatchObject({
        code: 'ENGINE_WRONG_PASSPHRASE',
        message: `wrong passphrase for repository ${repo}: it does not unlock the repository's key file (or the key file was altered)`,
      });
      const missing = await runEngine([...args, '--repo', repo], { env: { ENGINE_PASSWORD: '' } });
      expect(missing.code).toBe(6);
    }
    const none = await runEngine(['list', '--repo', repo]);
    expect(none.code).toBe(6);
    expect(none.stderr.trim()).toBe(`engine: repository ${repo} is encrypted, and no passphrase was given: give its passphrase with --password-file FILE, in a file named by ENGINE_PASSWORD_FILE, or in ENGINE_PASSWORD`);
    await expect(stat(join(dir, 'never.raw'))).rejects.toThrow();
    expect(await snapshot(repo)).toEqual(before);
    // --password-file: the passphrase from a file, one trailing newline ignored.
    const file = join(dir, 'pass.txt');
    await writeFile(file, `${PASSPHRASE}\n`, { mode: 0o600 });
    const viaFile = await runEngine(['list', '--repo', repo, '--password-file', file, '--json']);
    expect(viaFile.code).toBe(0);
  });

  test('a record copied under another name is damaged (its name is authenticated)', async () => {
    const repoC = await encryptedRepo('repo-c');
    const backup = await backupOk(repoC, ['--source', image]);
    const forged = 'f'.repeat(32);
    await copyFile(join(repoC, 'backups', backup.id), join(repoC, 'backups', forged));
    const list = await runEngine(['list', '--repo', repoC, '--json'], withPass());
    const parsed = parseJson<{ backups: { id: string }[]; damaged: { id: string; message: string }[] }>(list.stdout);
    expect(parsed.backups.map((b) => b.id)).toEqual([backup.id]);
    expect(parsed.damaged).toEqual([{ id: forged, message: `backup record ${forged} is damaged: authentication failed (AES-256-GCM tag): the file was altered, or belongs to another name or repository` }]);
  });

  test('a key file whose id is not its file name is refused before unlocking (its id is authenticated data)', async () => {
    const repoK = await encryptedRepo('repo-keyid');
    const config = JSON.parse(await readFile(join(repoK, 'config'), 'utf8')) as { encryption: { keyFile: string } };
    const keyPath = join(repoK, config.encryption.keyFile);
    const file = JSON.parse(await readFile(keyPath, 'utf8')) as KeyFile;
    const other = file.id === '0123456789abcdef' ? 'fedcba9876543210' : '0123456789abcdef';
    await writeFile(keyPath, encodeKeyFile({ ...file, id: other }));
    const result = await runEngine(['list', '--repo', repoK, '--json'], withPass());
    expect(result.code).toBe(4);
    expect(parseJson<{ error: { code: string; message: string } }>(result.stdout).error).toMatchObject({
      code: 'ENGINE_CORRUPT_METADATA',
      message: `key file ${config.encryption.keyFile} is damaged: it names itself ${other}`,
    });
  });

  test('a lost index is rebuilt from the encrypted packs', async () => {
    const repoD = await encryptedRepo('repo-d');
    const backup = await backupOk(repoD, ['--source', image]);
    await rm(join(repoD, 'index'), { recursive: true });
    const verify = await runEngine(['verify', '--repo', repoD, '--json'], withPass());
    expect(verify.code).toBe(0);
    const restored = join(dir, 'rebuilt.restored');
    expect((await runEngine(['restore', '--repo', repoD, backup.id, '--to', restored], withPass())).code).toBe(0);
    expect(await filesIdentical(image, restored)).toBe(true);
  });
});

describe('tampering', () => {
  test('a flipped ciphertext byte: verify --read-data names backup, disk and offset; restore refuses', async () => {
    const repo = await encryptedRepo('repo-tamper');
    const image = join(dir, 'tamper.img');
    await sparseFile(image, 12 * MiB);
    await writeRegion(image, 0, 12 * MiB, 'random', 'tamper');
    const backup = await backupOk(repo, ['--source', image]);
    const opened = await Repository.open(repo, { access: 'read', passphrase: PASSPHRASE });
    const bytes = await readFile(image);
    const offsetOf = (id: string): number => {
      for (let at = 0; at < bytes.length; at += MiB) if (opened.blobId(bytes.subarray(at, at + MiB)).toString('hex') === id) return at;
      return -1;
    };
    // Two data frames: one flipped as an attacker would (checksum recomputed, so only the GCM tag can tell),
    // one flipped as bad media would (the xxh64 checksum tells first).
    let packId = '';
    let dataFrames: Awaited<ReturnType<typeof scanPack>>['frames'] = [];
    for (const id of await packIds(repo)) {
      const frames = (await scanPack(repo, id, true)).frames.filter((f) => f.header.kind === KIND_DATA);
      if (frames.length >= 2) [packId, dataFrames] = [id, frames];
    }
    const [forged, rotten] = dataFrames;
    await damageFrame(repo, packId, forged!, 500, 0x01, true);
    await damageFrame(repo, packId, rotten!, 500, 0x01, false);
    const forgedId = forged!.header.id.toString('hex');
    const rottenId = rotten!.header.id.toString('hex');
    expect(offsetOf(forgedId)).toBeGreaterThanOrEqual(0);
    expect(offsetOf(rottenId)).toBeGreaterThanOrEqual(0);

    const verify = await runEngine(['verify', '--repo', repo, '--read-data', '--json'], withPass());
    expect(verify.code).toBe(4);
    const report = parseJson<{ ok: boolean; problems: { code: string; message: string; backup?: string; disk?: string; offset?: number; blob?: string; pack?: string }[] }>(verify.stdout);
    expect(report.ok).toBe(false);
    expect(report.problems.filter((p) => p.code === 'FRAME_DAMAGED').map((p) => [p.blob, p.message.endsWith(AUTHENTICATION_FAILED)])).toEqual(
      expect.arrayContaining([
        [forgedId, true],
        [rottenId, false],
      ]),
    );
    for (const id of [forgedId, rottenId]) {
      expect(report.problems).toContainEqual(expect.objectContaining({ code: 'CHUNK_DAMAGED', backup: backup.id, disk: 'tamper.img', offset: offsetOf(id), blob: id, pack: packId }));
    }
    expect(report.problems).toHaveLength(4);

    const target = join(dir, 'tamper.restored');
    const restore = await runEngine(['restore', '--repo', repo, backup.id, '--to', target, '--json'], withPass());
    expect(restore.code).toBe(4);
    const error = parseJson<{ error: { code: string; message: string; details: { backupId: string; disk: string; diskOffset: number; chunk: string } } }>(restore.stdout).error;
    expect(error.code).toBe('ENGINE_CORRUPT_FRAME');
    expect([forgedId, rottenId]).toContain(error.details.chunk);
    expect(error.details).toMatchObject({ backupId: backup.id, disk: 'tamper.img', diskOffset: offsetOf(error.details.chunk) });
    await expect(stat(target)).rejects.toThrow();
  });
});

describe('lifecycle of an encrypted repository', () => {
  test('prune, gc, repair of a forged chunk, and the next backup heals it: every kept backup restores exactly', async () => {
    const repo = await encryptedRepo('repo-lifecycle');
    const image = join(dir, 'lifecycle.img');
    await sparseFile(image, 16 * MiB);
    await writeRegion(image, 0, 16 * MiB, 'random', 'life-1');
    const first = await backupOk(repo, ['--source', image, '--name', 'vm']);
    const firstCopy = join(dir, 'lifecycle.v1');
    await runEngine(['restore', '--repo', repo, first.id, '--to', firstCopy], withPass());
    await writeRegion(image, 0, 8 * MiB, 'random', 'life-2');
    const second = await backupOk(repo, ['--source', image, '--name', 'vm']);

    const prune = await runEngine(['prune', '--repo', repo, '--keep-last', '1', '--json'], withPass());
    expect(prune.code).toBe(0);
    expect(parseJson<{ removed: number }>(prune.stdout).removed).toBe(1);
    const gc = await runEngine(['gc', '--repo', repo, '--rewrite-below', '100%', '--json'], withPass());
    expect(gc.code).toBe(0);
    expect(parseJson<{ chunks: { removed: number } }>(gc.stdout).chunks.removed).toBeGreaterThanOrEqual(8);
    expect((await runEngine(['verify', '--repo', repo, '--read-data'], withPass())).code).toBe(0);

    // An attacker's flip in one data frame, checksum recomputed: only the GCM tag can tell.
    let packId: string | undefined;
    let frame: Awaited<ReturnType<typeof scanPack>>['frames'][number] | undefined;
    for (const id of await packIds(repo)) {
      frame ??= (await scanPack(repo, id, true)).frames.find((f) => f.header.kind === KIND_DATA);
      if (frame && packId === undefined) packId = id;
    }
    if (!frame || !packId) throw new Error('no data frame in any pack');
    await damageFrame(repo, packId, frame, 100, 0x40, true);

    const repair = await runEngine(['repair', '--repo', repo, '--json'], withPass());
    expect(repair.code).toBe(4);
    const repaired = parseJson<{ quarantined: { why: string }[] }>(repair.stdout);
    expect(repaired.quarantined).toHaveLength(1);
    expect(repaired.quarantined[0]!.why).toContain(AUTHENTICATION_FAILED);
    await backupOk(repo, ['--source', image, '--name', 'vm']); // the source still has the block
    expect((await runEngine(['verify', '--repo', repo, '--read-data'], withPass())).code).toBe(0);
    const restored = join(dir, 'lifecycle.restored');
    expect((await runEngine(['restore', '--repo', repo, second.id, '--to', restored], withPass())).code).toBe(0);
    expect(await filesIdentical(restored, image)).toBe(true);
    expect(await filesIdentical(firstCopy, image)).toBe(false);
  });
});

describe('large offsets', () => {
  test('a sparse 5 GiB disk with data past 2^32: exact restore; a forged chunk there is named at its offset', async () => {
    const GiB = 1024 * MiB;
    const repo = await encryptedRepo('repo-big');
    const image = join(dir, 'big.img');
    const size = 5 * GiB + 123;
    await sparseFile(image, size);
    await writeRegion(image, 2 ** 32 - MiB - 5, 3 * MiB, 'random', 'straddle');
    await writeRegion(image, size - 2 * MiB, 2 * MiB, 'random', 'tail');
    const backup = await backupOk(repo, ['--source', image]);
    const restored = join(dir, 'big.restored');
    expect((await runEngine(['restore', '--repo', repo, backup.id, '--to', restored], withPass())).code).toBe(0);
    expect(await filesIdentical(image, restored)).toBe(true);
    await rm(restored);

    // The block at 4 GiB + 1 MiB (block 4097), wholly past 2^32: find its frame by its keyed id, forge it.
    const blockOffset = 4 * GiB + MiB;
    const block = Buffer.alloc(MiB);
    const source = await open(image, 'r');
    await source.read(block, 0, MiB, blockOffset);
    await source.close();
    const opened = await Repository.open(repo, { access: 'read', passphrase: PASSPHRASE });
    const id = opened.blobId(block).toString('hex');
    let forged = false;
    for (const packId of await packIds(repo)) {
      const frame = (await scanPack(repo, packId, true)).frames.find((f) => f.header.id.toString('hex') === id);
      if (!frame) continue;
      await damageFrame(repo, packId, frame, 100, 0x80, true);
      forged = true;
    }
    expect(forged).toBe(true);
    const verify = await runEngine(['verify', '--repo', repo, '--read-data', '--json'], withPass());
    expect(verify.code).toBe(4);
    const problems = parseJson<{ problems: { code: string; offset?: number; blob?: string }[] }>(verify.stdout).problems;
    expect(problems.filter((p) => p.code === 'CHUNK_DAMAGED')).toEqual([expect.objectContaining({ offset: blockOffset, blob: id })]);
  });
});

describe('changed-block tracking on an encrypted repository', () => {
  test('qcow2 --image: full then incremental read only the dirty blocks, pass the CBT audit, restore exactly', async () => {
    const repo = await encryptedRepo('repo-cbt');
    const image = join(dir, 'vm.qcow2');
    await qcow2(image, '1G');
    await qemuIo(image, ['write -P 0xab 0 8M', 'write -P 0xcd 300M 2M']);
    const full = await backupOk(repo, ['--image', image]);
    const frozenFull = join(dir, 'vm-full.qcow2');
    await copyFile(image, frozenFull);
    expect(full.disks[0]).toMatchObject({ mode: 'full', bytesRead: 10 * MiB });

    await qemuIo(image, ['write -P 0x11 1M 64k', 'write -P 0x22 700M 1M']);
    const incremental = await backupOk(repo, ['--image', image, '--incremental']);
    // The audit re-reads clean blocks and compares their keyed ids with the parent's map: a SHA-256 id
    // would differ from every entry and force a full read.
    expect(incremental.disks[0]).toMatchObject({ mode: 'incremental', modeReason: null, bytesRead: 2 * MiB, blocksUnchanged: 1024 - 2 });

    for (const [id, frozen] of [[full.id, frozenFull], [incremental.id, image]] as const) {
      const target = join(dir, `vm-${id}.raw`);
      const result = await runEngine(['restore', '--repo', repo, id, '--to', target], withPass());
      expect(result.code).toBe(0);
      expect(await qemuImgCompare(target, 'raw', frozen, 'qcow2')).toBe(true);
      await rm(target);
    }
  });
});

describe('a config rewritten to plain (downgrade)', () => {
  test('backup with a passphrase into a repository whose config names no encryption: refused, nothing written', async () => {
    const repo = await encryptedRepo('repo-downgrade');
    const image = await markedImage('downgrade.img');
    const first = await backupOk(repo, ['--source', image]);
    // An attacker with write access to the storage rewrites config as a plain (version 1) repository's.
    const config = JSON.parse(await readFile(join(repo, 'config'), 'utf8')) as Record<string, unknown>;
    delete config.encryption;
    config.version = 1;
    config.hash = 'sha256';
    await writeFile(join(repo, 'config'), `${JSON.stringify(config, null, 2)}\n`);
    const before = await snapshot(repo);
    const result = await runEngine(['backup', '--repo', repo, '--source', image, '--json'], withPass());
    expect(parseJson<{ error: { code: string; message: string } }>(result.stdout).error).toEqual({
      code: 'ENGINE_NOT_ENCRYPTED',
      message: `a passphrase was given, but repository ${repo} is not encrypted (its config names no encryption): backup refuses to write plaintext where encryption is expected. Give no passphrase for a plain repository; if this one was created encrypted, its config was altered`,
      details: { path: repo },
    });
    expect(result.code).toBe(6);
    expect(await snapshot(repo)).toEqual(before);
    await expect(sh('grep', ['-r', '-l', '-F', MARKER, repo])).rejects.toThrow();
    // Reading stays harmless: the encrypted record is reported damaged, never trusted.
    const list = parseJson<{ backups: unknown[]; damaged: { id: string }[] }>((await runEngine(['list', '--repo', repo, '--json'], withPass())).stdout);
    expect(list).toMatchObject({ backups: [], damaged: [{ id: first.id }] });
  });

  test('a plain repository: a backup without a passphrase works, with one it is refused', async () => {
    const repo = join(dir, 'repo-plain');
    expect((await runEngine(['init', repo, '--format', '1'], { env: { ENGINE_PASSWORD: '' } })).code).toBe(0);
    const image = join(dir, 'plain-small.img');
    await sparseFile(image, 3 * MiB);
    await writeRegion(image, 0, 3 * MiB, 'random', 'plain-small');
    const refused = await runEngine(['backup', '--repo', repo, '--source', image, '--json'], withPass());
    expect(refused.code).toBe(6);
    expect(parseJson<{ error: { code: string } }>(refused.stdout).error.code).toBe('ENGINE_NOT_ENCRYPTED');
    expect(await readdir(join(repo, 'backups'))).toEqual([]);
    const plain = await runEngine(['backup', '--repo', repo, '--source', image, '--json'], { env: { ENGINE_PASSWORD: '' } });
    expect(plain.code).toBe(0);
    // Reading a plain repository with a passphrase set is harmless and still works.
    expect((await runEngine(['list', '--repo', repo, '--json'], withPass())).code).toBe(0);
  });

  test('the oVirt backup flows refuse it before they contact oVirt or journal anything', async () => {
    const repo = join(dir, 'repo-plain-ovirt');
    expect((await runEngine(['init', repo, '--format', '1'], { env: { ENGINE_PASSWORD: '' } })).code).toBe(0);
    const before = await snapshot(repo);
    // Nothing listens on port 9 of localhost: reaching oVirt would fail with ENGINE_OVIRT_CONNECT instead.
    const common = { repo, passphrase: PASSPHRASE, ovirt: { url: 'https://127.0.0.1:9', credentials: { username: 'u', password: 'p' } }, vm: 'vm1' };
    await expect(ovirtIncrementalBackup(common)).rejects.toMatchObject({ code: 'ENGINE_NOT_ENCRYPTED' });
    await expect(ovirtApplianceBackup({ ...common, appliance: 'app' })).rejects.toMatchObject({ code: 'ENGINE_NOT_ENCRYPTED' });
    expect(await snapshot(repo)).toEqual(before);
  });
});
