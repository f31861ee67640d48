/**
 * SPEC.md against the code, statement by statement, where an independent reading found it under-specified
 * (issue 11): what `init` creates, the required fields of a backup record, the zero-block map, blobs whose
 * frame is of another kind than the reference's role, and the radix of quarantine file names. Where a
 * statement lists things (directories, fields), the list is read from SPEC.md itself, so that the document
 * and the code cannot drift apart unnoticed. (The passphrase's bytes: test/passphrase.test.ts.)
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createHash } from 'node:crypto';
import { chmod, lstat, open, readdir, readFile, truncate, writeFile } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { decodeBackupRecord } from '../dist/repo-format/backup-record.js';
import { Repository } from '../dist/repo-format/repository.js';
import { KIND_DATA, KIND_MAP_LEAF, ZERO_ID } from '../dist/repo-format/constants.js';
import { filesIdentical, parseJson, runEngine, sparseFile, tempDir, writeRegion, type BackupJson } from './helpers.js';

const SPEC = fileURLToPath(new URL('../SPEC.md', import.meta.url));
const KiB = 1024;
const BLOCK = 64 * KiB;

let dir: string;
let cleanup: () => Promise<void>;
let spec: string;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-spec-'));
  spec = await readFile(SPEC, 'utf8');
});
afterAll(async () => {
  await cleanup();
});

/** The text of SPEC.md between two markers. */
function between(start: string, end: string): string {
  const from = spec.indexOf(start);
  const to = spec.indexOf(end, from + start.length);
  expect([from >= 0, to > from]).toEqual([true, true]);
  return spec.slice(from, to);
}

const sha256 = (data: Buffer): Buffer => createHash('sha256').update(data).digest();

async function init(name: string, args: string[] = [], env: Record<string, string> = {}): Promise<string> {
  const repo = join(dir, name);
  const result = await runEngine(['init', repo, '--block-size', '64K', ...args], { env });
  expect([result.code, result.stderr]).toEqual([0, '']);
  return repo;
}

async function backupOf(repo: string, args: string[]): Promise<BackupJson> {
  const result = await runEngine(['backup', '--repo', repo, ...args, '--json']);
  expect([result.code, result.stderr]).toEqual([0, '']);
  return parseJson<BackupJson>(result.stdout);
}

async function restoredIdentical(repo: string, id: string, original: string): Promise<boolean> {
  const target = join(dir, `restored-${id}`);
  const result = await runEngine(['restore', '--repo', repo, id, '--to', target, '--json']);
  expect([result.code, result.stderr]).toEqual([0, '']);
  return filesIdentical(original, target);
}

async function verifyReadData(repo: string): Promise<{ ok: boolean; blobs: number; problems: { code: string; message: string }[] }> {
  return parseJson((await runEngine(['verify', '--repo', repo, '--read-data', '--json'])).stdout);
}

async function recordOf(repo: string, id: string): Promise<Record<string, unknown>> {
  return JSON.parse(await readFile(join(repo, 'backups', id), 'utf8')) as Record<string, unknown>;
}

/** Writes a record file into a plain repository as a crafted one would be (the catalogue follows on the next open). */
async function writeRecord(repo: string, record: Record<string, unknown>): Promise<void> {
  const path = join(repo, 'backups', record.id as string);
  await writeFile(path, JSON.stringify(record));
  await chmod(path, 0o400);
}

describe('section 3: init creates exactly the directories the spec lists', () => {
  test('plain and encrypted', async () => {
    const statement = between('In it, exactly these directories:', 'then `config`, last');
    const named = [...statement.matchAll(/`([a-z0-9/]+)`/g)].map((m) => m[1]!.replace(/\/$/, ''));
    expect(named).toEqual(['packs', 'packs/00', 'packs/ff', 'backups', 'tmp', 'readers', 'index', 'keys']);
    const expectedPlain = new Set(['.', 'packs', ...Array.from({ length: 256 }, (_, i) => `packs/${i.toString(16).padStart(2, '0')}`), 'backups', 'tmp', 'readers', 'index']);
    for (const [name, encrypted] of [['init-plain', false], ['init-encrypted', true]] as const) {
      // Section 3's list is that of formats 1 and 2 (format 3 creates no directory at init: v3-backup).
      const repo = await init(name, encrypted ? ['--format', '2', '--encrypt'] : ['--format', '1'], { ENGINE_PASSWORD: 'a long enough passphrase' });
      const directories = new Set<string>();
      const files: string[] = [];
      const walk = async (path: string): Promise<void> => {
        const s = await lstat(path);
        const rel = relative(repo, path) || '.';
        if (s.isDirectory()) {
          directories.add(rel);
          for (const entry of await readdir(path)) await walk(join(path, entry));
        } else files.push(rel);
      };
      await walk(repo);
      const expected = new Set(expectedPlain);
      if (encrypted) expected.add('keys');
      expect([...directories].sort()).toEqual([...expected].sort());
      const outsideIndex = files.filter((f) => !f.startsWith('index/')).sort();
      // Files: config, the space reserve (12.6), and the key file of an encrypted one.
      expect(outsideIndex).toEqual(encrypted ? ['config', expect.stringMatching(/^keys\/[0-9a-f]{16}\.json$/), 'reserve'] : ['config', 'reserve']);
      expect(spec).toContain('It writes the space reserve, the file `reserve` (section 12.6).');
      // The index holds the metadata entry repository-id = the config's id.
      const opened = await Repository.open(repo, { access: 'exclusive', passphrase: encrypted ? 'a long enough passphrase' : undefined });
      try {
        expect(await opened.index.getMeta('repository-id')).toBe(opened.config.id);
      } finally {
        await opened.close();
      }
    }
  });
});

describe('section 9: every field of the record tables is required, with its type; other fields are ignored', () => {
  let valid: Record<string, unknown>;
  let recordId: string;
  beforeAll(async () => {
    const repo = await init('fields');
    const image = join(dir, 'fields.img');
    await writeRegion(image, 0, 3 * BLOCK, 'random', 'fields');
    const made = await backupOf(repo, ['--source', image]);
    recordId = made.id;
    valid = await recordOf(repo, made.id);
    // Give the disk a CBT state so that its fields are checked too.
    (valid.disks as Record<string, unknown>[])[0]!.cbt = { checkpoint: 'engine-1-a', base: null, chainFull: made.id, chainCheckpoint: 'engine-1-a', granularity: 65536, audited: 0 };
  });

  const decode = (record: Record<string, unknown>): string | undefined => {
    try {
      decodeBackupRecord(Buffer.from(JSON.stringify(record)), 'record');
      return undefined;
    } catch (error) {
      return (error as { code?: string }).code;
    }
  };
  const fieldsOf = (table: string): string[] => [...table.matchAll(/^\| ((?:`[A-Za-z]+`(?:, )?)+) \|/gm)].flatMap((m) => [...m[1]!.matchAll(/`([A-Za-z]+)`/g)].map((f) => f[1]!));

  test('record fields, disk fields, and the fields of source, map, cbt and stats, as SPEC.md names them', () => {
    const recordFields = fieldsOf(between('## 9. Backup record', 'Disk object:'));
    const diskFields = fieldsOf(between('Disk object:', 'Integers are JSON numbers'));
    expect(recordFields).toEqual(['version', 'id', 'name', 'type', 'parent', 'startTime', 'endTime', 'hostname', 'engineVersion', 'blockSize', 'disks', 'attachments', 'consistency', 'copiedFrom']);
    // The fields marked optional: a record without them is read (older engines), one with them of another type is not.
    expect(between('| `consistency` |', '\n')).toMatch(/^\| `consistency` \| object, \*\*optional\*\* \|/); // between() keeps its start marker
    expect(between('| `copiedFrom` |', '\n')).toMatch(/^\| `copiedFrom` \| object, \*\*optional\*\* \|/);
    const required = recordFields.filter((f) => f !== 'consistency' && f !== 'copiedFrom');
    expect(diskFields).toEqual(['name', 'size', 'source', 'mode', 'modeReason', 'parent', 'cbt', 'map', 'stats']);
    const statsRow = between('| `stats` | object |', '\n');
    const statsFields = [...statsRow.matchAll(/`([A-Za-z]+)`/g)].map((m) => m[1]!).filter((f) => f !== 'stats');
    expect(statsFields).toHaveLength(9);
    const cbtFields = [...between('| `cbt` | object or null |', '\n').matchAll(/`([A-Za-z]+)`/g)].map((m) => m[1]!).filter((f) => f !== 'cbt' && f !== 'null');
    expect(cbtFields).toEqual(['checkpoint', 'base', 'chainFull', 'chainCheckpoint', 'granularity', 'audited']);

    expect(decode(valid)).toBeUndefined();
    const withoutConsistency = { ...valid };
    delete withoutConsistency.consistency;
    expect(decode(withoutConsistency)).toBeUndefined();
    expect(decode({ ...valid, unknownField: { anything: 1 } })).toBeUndefined();
    expect(decode({ ...valid, copiedFrom: { repository: 'a'.repeat(32), backup: 'b'.repeat(32) } })).toBeUndefined();
    const disk = (r: Record<string, unknown>): Record<string, unknown> => (r.disks as Record<string, unknown>[])[0]!;
    const copy = (): Record<string, unknown> => JSON.parse(JSON.stringify(valid)) as Record<string, unknown>;
    const cases: [string, (r: Record<string, unknown>) => void][] = [];
    for (const field of required) {
      cases.push([`record ${field} missing`, (r) => delete r[field]]);
      cases.push([`record ${field} of another type`, (r) => (r[field] = { wrong: true })]);
    }
    cases.push(['record consistency of another type', (r) => (r.consistency = 'crash')]);
    cases.push(['record consistency with an unknown level', (r) => ((r.consistency as Record<string, unknown>).level = 'perfect')]);
    cases.push(['record copiedFrom of another type', (r) => (r.copiedFrom = 'elsewhere')]);
    cases.push(['record copiedFrom whose backup is not an id', (r) => (r.copiedFrom = { repository: 'a'.repeat(32), backup: 'b' })]);
    cases.push(['record copiedFrom without its repository', (r) => (r.copiedFrom = { backup: 'b'.repeat(32) })]);
    for (const field of diskFields) {
      cases.push([`disk ${field} missing`, (r) => delete disk(r)[field]]);
      cases.push([`disk ${field} of another type`, (r) => (disk(r)[field] = [1])]);
    }
    for (const field of ['kind', 'path']) cases.push([`source ${field} missing`, (r) => delete (disk(r).source as Record<string, unknown>)[field]]);
    for (const field of ['root', 'depth', 'blocks']) cases.push([`map ${field} missing`, (r) => delete (disk(r).map as Record<string, unknown>)[field]]);
    for (const field of cbtFields) cases.push([`cbt ${field} missing`, (r) => delete (disk(r).cbt as Record<string, unknown>)[field]]);
    for (const field of statsFields) {
      cases.push([`stats ${field} missing`, (r) => delete (disk(r).stats as Record<string, unknown>)[field]]);
      cases.push([`stats ${field} not an integer`, (r) => ((disk(r).stats as Record<string, unknown>)[field] = 1.5)]);
    }
    cases.push(['record parent not an id', (r) => (r.parent = 'previous')]);
    cases.push(['startTime not ISO 8601 UTC', (r) => (r.startTime = '2026-12-06 09:00:00')]);
    cases.push(['endTime with an offset instead of Z', (r) => (r.endTime = '2026-12-06T09:00:00+01:00')]);
    cases.push(['no disks', (r) => (r.disks = [])]);
    cases.push(['an attachment without a name', (r) => (r.attachments = [{ name: '', mediaType: 'text/plain', data: '' }])]);
    for (const [what, edit] of cases) {
      const record = copy();
      edit(record);
      expect([what, decode(record)]).toEqual([what, 'ENGINE_CORRUPT_METADATA']);
    }
    expect(recordId).toMatch(/^[0-9a-f]{32}$/);
  });
});

describe('section 8: the zero-block map', () => {
  test('all-zero disks: root ZERO_ID at the depth blocks give, no page stored; a 0-byte disk: 0 blocks, depth 0, root ZERO_ID', async () => {
    const repo = await init('zero');
    const small = join(dir, 'zero-small.img');
    await sparseFile(small, 10 * BLOCK + 1);
    const large = join(dir, 'zero-large.img');
    await sparseFile(large, 1500 * BLOCK); // more than 1024 blocks: depth 1
    const empty = join(dir, 'zero-empty.img');
    await sparseFile(empty, 0);
    const zero = ZERO_ID.toString('hex');
    const made = await backupOf(repo, ['--source', small, '--source', large, '--source', empty, '--disk-name', 'small', '--disk-name', 'large', '--disk-name', 'empty']);
    const record = await recordOf(repo, made.id);
    expect((record.disks as { map: unknown }[]).map((d) => d.map)).toEqual([
      { root: zero, depth: 0, blocks: 11 },
      { root: zero, depth: 1, blocks: 1500 },
      { root: zero, depth: 0, blocks: 0 },
    ]);
    const verified = await verifyReadData(repo);
    expect([verified.ok, verified.blobs]).toEqual([true, 0]); // no chunk, no page
    for (const [disk, original] of [['small', small], ['large', large], ['empty', empty]]) {
      const target = join(dir, `zero-restored-${disk}`);
      expect((await runEngine(['restore', '--repo', repo, made.id, '--disk', disk!, '--to', target, '--json'])).code).toBe(0);
      expect(await filesIdentical(original!, target)).toBe(true);
    }
  });

  test('a stored all-zero page is read as zeros; a 0-block map with another root is damaged', async () => {
    // Format 1: the page is stored through the one-writer API (Repository.open, exclusive).
    const repo = await init('zero-pages', ['--format', '1']);
    const image = join(dir, 'zero-pages.img');
    await sparseFile(image, 4 * BLOCK);
    const made = await backupOf(repo, ['--source', image]);
    // A writer must not store an all-zero page, but a reader accepts one: store it through the library.
    const opened = await Repository.open(repo, { access: 'exclusive' });
    let pageId: Buffer;
    try {
      const writer = opened.createBlobWriter();
      pageId = await opened.pageStore(writer)(KIND_MAP_LEAF, Buffer.alloc(4 * 32));
      await writer.flush();
    } finally {
      await opened.close();
    }
    const record = await recordOf(repo, made.id);
    const storedPage: Record<string, unknown> = { ...record, id: 'a'.repeat(32) };
    (storedPage.disks as { map: { root: string } }[])[0]!.map.root = pageId.toString('hex');
    await writeRecord(repo, storedPage);
    expect(await restoredIdentical(repo, storedPage.id as string, image)).toBe(true);

    const emptyDisk: Record<string, unknown> = { ...record, id: 'b'.repeat(32) };
    const disk = (emptyDisk.disks as Record<string, unknown>[])[0]!;
    disk.size = 0;
    disk.map = { root: pageId.toString('hex'), depth: 0, blocks: 0 };
    await writeRecord(repo, emptyDisk);
    const restore = await runEngine(['restore', '--repo', repo, emptyDisk.id as string, '--to', join(dir, 'never.img')]);
    const damage = `backup record ${emptyDisk.id} is damaged: disk zero-pages.img: an empty disk's map root must be the zero id`;
    expect([restore.code, restore.stderr]).toEqual([4, `engine: ${damage}\n`]);
    const verified = await verifyReadData(repo);
    expect(verified.problems).toEqual([expect.objectContaining({ code: 'RECORD_DAMAGED', backup: emptyDisk.id, message: expect.stringContaining(damage) })]);
    // The map reader refuses such a map too, wherever it comes from.
    const { readMap } = await import('../dist/repo-format/block-map.js');
    const walk = async (): Promise<void> => {
      for await (const _ of readMap({ root: pageId, depth: 0, blocks: 0 }, async () => Buffer.alloc(0))) void _;
    };
    await expect(walk()).rejects.toMatchObject({ code: 'ENGINE_CORRUPT_METADATA', message: 'block map is damaged: a map of 0 blocks must have the zero root' });
  });
});

describe('section 8: ids name content, not roles', () => {
  test('a block equal to a map page (and a page equal to a chunk) deduplicates across kinds; restore and verify accept it', async () => {
    // Format 1: the kinds are then read through the one-writer API (Repository.open, exclusive); the
    // deduplication across kinds itself behaves alike on format 3 (seen with the default flipped).
    const repo = await init('kinds', ['--format', '1']);
    const a = join(dir, 'kinds-a.img');
    await writeRegion(a, 0, 3 * BLOCK, 'random', 'kinds-a');
    const aBytes = await readFile(a);
    const leafA = Buffer.concat([0, 1, 2].map((i) => sha256(aBytes.subarray(i * BLOCK, (i + 1) * BLOCK))));
    await backupOf(repo, ['--source', a]);
    // B's last, short block is A's leaf page: it deduplicates against that page's frame (kind 2).
    const b = join(dir, 'kinds-b.img');
    await writeRegion(b, 0, BLOCK, 'random', 'kinds-b');
    await writeFile(b, Buffer.concat([await readFile(b), leafA]));
    const madeB = await backupOf(repo, ['--source', b]);
    expect(madeB.disks[0]).toMatchObject({ blocksNew: 1, blocksDeduplicated: 1 });

    // D's leaf page equals C's last block, stored first as a data chunk (kind 1): D stores no page of its own.
    const d = join(dir, 'kinds-d.img');
    await writeRegion(d, 0, 2 * BLOCK, 'random', 'kinds-d');
    const dBytes = await readFile(d);
    const leafD = Buffer.concat([sha256(dBytes.subarray(0, BLOCK)), sha256(dBytes.subarray(BLOCK))]);
    const c = join(dir, 'kinds-c.img');
    await writeRegion(c, 0, BLOCK, 'random', 'kinds-c');
    await writeFile(c, Buffer.concat([await readFile(c), leafD]));
    await backupOf(repo, ['--source', c]);
    const madeD = await backupOf(repo, ['--source', d]);
    expect(madeD.disks[0]).toMatchObject({ blocksNew: 2 });
    expect(((await recordOf(repo, madeD.id)).disks as { map: { root: string } }[])[0]!.map.root).toBe(sha256(leafD).toString('hex'));

    const opened = await Repository.open(repo, { access: 'exclusive' });
    try {
      const [pageAsChunk, chunkAsPage] = await opened.lookup([sha256(leafA), sha256(leafD)]);
      expect([pageAsChunk?.kind, chunkAsPage?.kind]).toEqual([KIND_MAP_LEAF, KIND_DATA]);
    } finally {
      await opened.close();
    }
    expect(await restoredIdentical(repo, madeB.id, b)).toBe(true);
    expect(await restoredIdentical(repo, madeD.id, d)).toBe(true);
    expect(await verifyReadData(repo)).toMatchObject({ ok: true, problems: [] });

    // What matters is the length: a map entry naming that 96-byte blob where a whole block is due is damage.
    const record = await recordOf(repo, madeB.id);
    const wrongLength: Record<string, unknown> = { ...record, id: 'c'.repeat(32) };
    (wrongLength.disks as { size: number }[])[0]!.size = 2 * BLOCK;
    await writeRecord(repo, wrongLength);
    const restore = await runEngine(['restore', '--repo', repo, wrongLength.id as string, '--to', join(dir, 'wrong-length.img')]);
    expect(restore.code).toBe(4);
    expect(restore.stderr).toContain(`chunk holds 96 bytes, the block needs ${BLOCK}`);
    const verified = await verifyReadData(repo);
    expect(verified.problems).toEqual([expect.objectContaining({ code: 'CHUNK_DAMAGED', backup: wrongLength.id, offset: BLOCK, message: expect.stringContaining(`holds 96 bytes, the block needs ${BLOCK}`) })]);
  });
});

describe('section 12.5: quarantine file names carry the offset in decimal', () => {
  test('the name is <pack>-<decimal offset>.json and names the same offset as the record', async () => {
    expect(between('`engine repair` records each damaged frame in', 'UTF-8 JSON')).toContain('in decimal, without leading zeros');
    const repo = await init('quarantine');
    const image = join(dir, 'quarantine.img');
    await writeRegion(image, 0, 6 * BLOCK, 'random', 'quarantine');
    await backupOf(repo, ['--source', image]);
    // The data pack is the larger one; damage its third frame's payload (offset well past 9, where radixes differ).
    const packs: { path: string; size: number }[] = [];
    for (const sub of await readdir(join(repo, 'packs'))) {
      for (const name of await readdir(join(repo, 'packs', sub))) packs.push({ path: join(repo, 'packs', sub, name), size: (await lstat(join(repo, 'packs', sub, name))).size });
    }
    const data = packs.sort((x, y) => y.size - x.size)[0]!;
    const frameLength = 56 + BLOCK; // random blocks are stored uncompressed
    const offset = 32 + 2 * frameLength;
    await chmod(data.path, 0o600);
    const handle = await open(data.path, 'r+');
    await handle.write(Buffer.from([0xff]), 0, 1, offset + 48 + 100);
    await handle.close();
    const repair = await runEngine(['repair', '--repo', repo, '--json']);
    expect(repair.code).toBe(4);
    const names = await readdir(join(repo, 'quarantine'));
    expect(names).toEqual([`${data.path.split('/').pop()}-${offset}.json`]);
    expect(names[0]).toMatch(/^[0-9a-f]{32}-(0|[1-9][0-9]*)\.json$/);
    expect(JSON.parse(await readFile(join(repo, 'quarantine', names[0]!), 'utf8'))).toMatchObject({ offset });
    await truncate(image, 6 * BLOCK);
  });
});
