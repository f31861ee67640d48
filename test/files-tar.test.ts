/**
 * The tar side of a file restore (engine/file-restore/tar.ts) against archives crafted to attack the host: a
 * guest's file system may hold anything, and the appliance that archives it runs the guest's code paths.
 * Extraction into DIR must never write outside DIR; --tar output carries only sanitized names.
 */
import { afterAll, beforeAll, expect, test } from 'vitest';
import { lstat, mkdir, readdir, readFile, readlink, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { DirectorySink, readTar, sanitizePath, TarWriterSink } from '../dist/engine/file-restore/tar.js';
import { sh, tempDir } from './helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-test-files-tar-'));
});
afterAll(async () => {
  await cleanup();
});

/** One ustar member, built by hand so that it can say what no honest tar says. */
function member(name: string, type: string, body = '', linkname = '', mode = 0o644): Buffer {
  const header = Buffer.alloc(512);
  header.write(name, 0, 100, 'utf8');
  header.write(`${mode.toString(8).padStart(7, '0')}\0`, 100, 'latin1');
  header.write('0000000\0', 108, 'latin1');
  header.write('0000000\0', 116, 'latin1');
  header.write(`${Buffer.byteLength(body).toString(8).padStart(11, '0')}\0`, 124, 'latin1');
  header.write(`${(1700000000).toString(8).padStart(11, '0')}\0`, 136, 'latin1');
  header.write('        ', 148, 'latin1');
  header.write(type, 156, 'latin1');
  header.write(linkname, 157, 100, 'utf8');
  header.write('ustar\u000000', 257, 'latin1');
  let sum = 0;
  for (const byte of header) sum += byte;
  header.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148, 'latin1');
  const data = Buffer.from(body);
  return Buffer.concat([header, data, Buffer.alloc((512 - (data.length % 512)) % 512)]);
}

async function* chunks(buffer: Buffer, size = 700): AsyncGenerator<Buffer> {
  for (let at = 0; at < buffer.length; at += size) yield buffer.subarray(at, at + size);
}

test('sanitizePath: control characters escaped, "." and empty parts dropped, a leading / dropped, ".." refused', () => {
  expect(sanitizePath('/etc/pass\nwd')).toBe('etc/pass%0awd');
  expect(sanitizePath('a/./b//c')).toBe('a/b/c');
  expect(sanitizePath('a/../../b')).toBeNull();
  expect(sanitizePath('..')).toBeNull();
  expect(sanitizePath('ünïcødé 日本/with space')).toBe('ünïcødé 日本/with space');
  expect(sanitizePath('\u001b[31mred')).toBe('%1b[31mred');
});

test('a hostile archive extracted into DIR writes nothing outside DIR', async () => {
  const target = join(dir, 'target');
  const outside = join(dir, 'outside');
  await mkdir(target);
  await mkdir(outside);
  await writeFile(join(outside, 'victim'), 'untouched\n');
  const members = [
    member('../escaped-by-dotdot', '0', 'dotdot\n'),
    member('ok/../../escaped-by-inner-dotdot', '0', 'inner\n'),
    member('/absolute', '0', 'absolute made relative\n'),
    // A symlink out of DIR, then a file "through" it: refused, the symlink is not followed.
    member('link', '2', '', outside),
    member('link/victim', '0', 'overwritten!\n'),
    member('link/new', '0', 'created outside!\n'),
    // A hard link to a file outside DIR: refused.
    member('hard', '1', '', `../outside/victim`),
    // A file where a symlink to the outside already stands: O_EXCL|O_NOFOLLOW refuse it.
    member('link', '0', 'replace the link?\n'),
    member('name\nwith\u0007bell', '0', 'bell\n'),
  ];
  const sink = new DirectorySink(target);
  const failures: string[] = [];
  // Each member on its own, so that one refusal does not hide the others.
  for (const one of members) {
    await readTar(chunks(one), sink).catch((error: Error) => failures.push(error.message));
  }
  await sink.finish();
  expect(await readFile(join(outside, 'victim'), 'utf8')).toBe('untouched\n');
  expect((await readdir(outside)).sort()).toEqual(['victim']);
  expect((await readdir(dir)).sort()).toEqual(['outside', 'target']);
  expect((await readdir(target)).sort()).toEqual(['absolute', 'link', 'name%0awith%07bell']);
  expect(await readlink(join(target, 'link'))).toBe(outside);
  expect(sink.counts.skipped.map((s) => `${s.name}: ${s.why}`)).toEqual([
    '../escaped-by-dotdot: a ".." in its name',
    'ok/../../escaped-by-inner-dotdot: a ".." in its name',
    'hard: a hard link to a name with ".."',
  ]);
  expect(failures).toEqual([
    expect.stringMatching(/refusing to extract through .*link: it is not a directory/),
    expect.stringMatching(/refusing to extract through .*link: it is not a directory/),
    expect.stringMatching(/link exists: a file restore never overwrites/),
  ]);
});

test('--tar output: pax names sanitized, bytes, modes and times kept; GNU tar reads it back', async () => {
  const out = new PassThrough();
  const parts: Buffer[] = [];
  out.on('data', (chunk: Buffer) => parts.push(chunk));
  const long = `${'deep/'.repeat(40)}file with a long ünïcødé name.txt`;
  const sink = new TarWriterSink(out);
  await readTar(chunks(Buffer.concat([member('dir', '5', '', '', 0o750), member('dir/x\ny', '0', 'payload\n', '', 0o4755), member('../bad', '0', 'no\n')])), sink);
  // A member with a name longer than ustar holds goes through pax.
  await sink.entry({ path: long, type: 'file', mode: 0o600, uid: 1000, gid: 1000, mtime: '1700000000.123456789', size: 3, linkname: '' }, chunks(Buffer.from('abc')));
  await sink.finish();
  out.end();
  const file = join(dir, 'written.tar');
  await writeFile(file, Buffer.concat(parts));
  const listing = await sh('tar', ['-tvf', file, '--full-time', '--numeric-owner']);
  expect(listing).toMatch(/^drwxr-x--- 0\/0 +0 2023-11-14 22:13:20 dir\/$/m);
  expect(listing).toMatch(/^-rwsr-xr-x 0\/0 +8 2023-11-14 22:13:20 dir\/x%0ay$/m);
  expect(listing).toMatch(new RegExp(`^-rw------- 1000/1000 +3 2023-11-14 22:13:20\\.123456789 ${long.replace(/[.]/g, '\\.')}$`, 'm'));
  expect(listing).not.toMatch(/bad/);
  expect(sink.counts.skipped).toEqual([{ name: '../bad', why: 'a ".." in its name' }]);
  const unpacked = join(dir, 'unpacked');
  await mkdir(unpacked);
  await sh('tar', ['-xf', file, '-C', unpacked]);
  expect(await readFile(join(unpacked, 'dir', 'x%0ay'), 'utf8')).toBe('payload\n');
  expect(await readFile(join(unpacked, long), 'utf8')).toBe('abc');
  expect((await stat(join(unpacked, long), { bigint: true })).mtimeNs).toBe(1700000000123456789n);
  expect((await lstat(join(unpacked, 'dir'))).isDirectory()).toBe(true);
});
