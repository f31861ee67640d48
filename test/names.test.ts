/**
 * One rule for every name that reaches a terminal or a file name (SPEC.md, section 9.1): user-given names
 * that break it are refused, names from outside are mapped to safe ones (chains keep working), and whatever
 * a record holds — an older engine's name, a crafted one — is listed, shown, pruned and restored with every
 * string escaped and bounded.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { chmod, mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { filesIdentical, parseJson, runEngine, sh, tempDir, writeRegion, type BackupJson } from './helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let repo: string;
let image: string;

/** Anything a terminal would act on instead of showing. */
const TERMINAL_CONTROLS = /[\u0000-\u0009\u000b-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-names-'));
  repo = join(dir, 'repo');
  expect((await runEngine(['init', repo, '--block-size', '64K'])).code).toBe(0);
  image = join(dir, 'disk.img');
  await writeRegion(image, 0, 200 * 1024, 'random', 'names');
});
afterAll(async () => {
  await cleanup();
});

describe('the name rule', () => {
  test('what it refuses: empty, over 255 bytes of UTF-8 (bytes, not characters), C0, DEL, C1, separators, bidi controls, lone surrogates; disks also ".", "..", "/", "\\"', async () => {
    const { nameProblem } = await import('../dist/repo-format/names.js');
    expect(nameProblem('', 'backup')).toBe('it is empty');
    expect(nameProblem('é'.repeat(127) + 'a', 'disk')).toBeUndefined(); // 255 bytes, 128 characters
    expect(nameProblem('é'.repeat(128), 'disk')).toBe('it has 256 bytes of UTF-8, more than 255');
    expect(nameProblem('a'.repeat(255), 'backup')).toBeUndefined();
    for (const [c, what] of [['\n', 'a control character (U+000A)'], ['\u001b', 'a control character (U+001B)'], ['\u007f', 'a control character (U+007F)'], ['\u009b', 'a control character (U+009B)'], ['\u2028', 'a line or paragraph separator (U+2028)'], ['\u202e', 'a bidirectional formatting character (U+202E)'], ['\u2066', 'a bidirectional formatting character (U+2066)']]) {
      expect(nameProblem(`vm${c}42`, 'backup')).toBe(`it contains ${what}`);
    }
    expect(nameProblem('vm\ud800', 'backup')).toBe('it is not valid Unicode (a lone surrogate U+D800)');
    expect(nameProblem('a/b', 'backup')).toBeUndefined();
    expect(nameProblem('a/b', 'disk')).toBe('a disk name must not contain "/" or "\\" (it becomes a file name)');
    expect(nameProblem('..', 'disk')).toBe('a disk name must not be "." or ".." (it becomes a file name)');
    expect(nameProblem('日本語 ✓ vm-01', 'disk')).toBeUndefined();
  });

  test('the mapping of names from outside: deterministic, "_" for what is forbidden, cut at 255 bytes on a character boundary', async () => {
    const { displayText, safeName } = await import('../dist/repo-format/names.js');
    expect(safeName('disk\u001b[2J.img', 'disk')).toBe('disk_[2J.img');
    expect(safeName('a/b\\c', 'disk')).toBe('a_b_c');
    expect(safeName('..', 'disk')).toBe('disk');
    const long = safeName('é'.repeat(200), 'backup');
    expect(Buffer.byteLength(long)).toBe(254);
    expect(long).toBe('é'.repeat(127));
    expect(displayText('x\u001b]0;title\u0007\n\u009b\u202e', 64)).toBe('x\\x1b]0;title\\x07\\x0a\\x9b\\u202e');
    expect(displayText('n'.repeat(10240), 64)).toBe(`${'n'.repeat(64)}…(10240 bytes)`);
  });
});

describe('names the user gives', () => {
  test('--name and --disk-name that break the rule are refused (exit 2), echoed escaped and cut, nothing written', async () => {
    // On version 3 (the default) backups/ appears with its first record: none yet is none.
    const records = (): Promise<string[]> => readdir(join(repo, 'backups')).catch((error: NodeJS.ErrnoException) => (error.code === 'ENOENT' ? [] : Promise.reject(error)));
    const before = await records();
    const escape = await runEngine(['backup', '--repo', repo, '--source', image, '--name', 'vm\u001b[31mred\u001b[0m']);
    expect([escape.code, escape.stderr]).toEqual([2, 'engine: --name "vm\\x1b[31mred\\x1b[0m" is not allowed: it contains a control character (U+001B)\n']);
    const huge = await runEngine(['backup', '--repo', repo, '--source', image, '--name', 'n'.repeat(10240)]);
    expect([huge.code, huge.stderr]).toEqual([2, `engine: --name "${'n'.repeat(64)}…(10240 bytes)" is not allowed: it has 10240 bytes of UTF-8, more than 255\n`]);
    const json = await runEngine(['backup', '--repo', repo, '--source', image, '--name', 'n'.repeat(10240), '--json']);
    expect(json.code).toBe(2);
    expect(parseJson<{ error: { message: string } }>(json.stdout).error.message.length).toBeLessThan(200);
    for (const [name, why] of [['a/b', 'a disk name must not contain "/" or "\\" (it becomes a file name)'], ['é'.repeat(128), 'it has 256 bytes of UTF-8, more than 255'], ['x\u2029y', 'it contains a line or paragraph separator (U+2029)']]) {
      const refused = await runEngine(['backup', '--repo', repo, '--source', image, '--disk-name', name]);
      const shown = name.replace(/\u2029/g, '\\u2029').replace(/^(é{64}).*$/, '$1…(256 bytes)');
      expect([refused.code, refused.stderr]).toEqual([2, `engine: --disk-name "${shown}" is not allowed: ${why}\n`]);
    }
    expect(await records()).toEqual(before);
    const ok = await runEngine(['backup', '--repo', repo, '--source', image, '--disk-name', `${'é'.repeat(127)}a`, '--name', '日本語 vm', '--json']);
    expect(ok.code).toBe(0);
  });
});

describe('names from outside', () => {
  test('a file name with an escape sequence and a newline: recorded in a safe form with a notice; the chain of an --image continues', async () => {
    const weird = join(dir, 'vm\u001b[2J\nnight.qcow2');
    await sh('qemu-img', ['create', '-q', '-f', 'qcow2', weird, '1M']);
    await sh('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 128k', weird]);
    const first = await runEngine(['backup', '--repo', repo, '--image', weird, '--json']);
    expect(first.code).toBe(0);
    const full = parseJson<BackupJson>(first.stdout);
    expect(full.name).toBe('vm_[2J_night.qcow2');
    expect(full.disks[0]!.name).toBe('vm_[2J_night.qcow2');
    const human = await runEngine(['backup', '--repo', repo, '--image', weird]);
    expect(human.code).toBe(0);
    expect(human.stderr).toContain(`engine: the file name of image ${dir}/vm\\x1b[2J\\x0anight.qcow2 "vm\\x1b[2J\\x0anight.qcow2" cannot be a disk name (it contains a control character (U+001B)): recorded as "vm_[2J_night.qcow2"\n`);
    expect(human.stderr).not.toMatch(TERMINAL_CONTROLS);
    expect(human.stdout).not.toMatch(TERMINAL_CONTROLS);
    await sh('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x22 512k 64k', weird]);
    const third = parseJson<BackupJson>((await runEngine(['backup', '--repo', repo, '--image', weird, '--json'])).stdout);
    expect(third.disks[0]!.mode).toBe('incremental');
    expect(third.disks[0]!.bytesRead).toBe(64 * 1024);
  });
});

describe('a record holding names the rule refuses (an older engine, or crafted)', () => {
  test('list, show, prune, verify and restore work; every string is escaped and bounded, --json carries it exactly', async () => {
    const own = join(dir, 'legacy-repo');
    expect((await runEngine(['init', own, '--block-size', '64K'])).code).toBe(0);
    const made = parseJson<BackupJson>((await runEngine(['backup', '--repo', own, '--source', image, '--disk-name', 'plain', '--json'])).stdout);
    const path = join(own, 'backups', made.id);
    const record = JSON.parse(await readFile(path, 'utf8')) as { name: string; hostname: string; disks: { name: string; source: { path: string } }[] };
    const hostileName = `evil\u001b]0;owned\u0007\nsecond line ${'x'.repeat(10240)}`;
    // DEL and C1 were allowed in disk names by the engine before the rule; the reader keeps reading them.
    const oldDiskName = 'd\u007f\u009b31m';
    record.name = hostileName;
    record.hostname = 'host\u001b[2J';
    record.disks[0]!.name = oldDiskName;
    record.disks[0]!.source.path = '/dev/\u202eevil';
    await chmod(path, 0o600);
    await writeFile(path, JSON.stringify(record));

    const list = await runEngine(['list', '--repo', own]);
    expect(list.code).toBe(0);
    expect(list.stdout).not.toMatch(TERMINAL_CONTROLS);
    expect(list.stdout.split('\n')).toHaveLength(3); // header, one row, the final newline
    expect(list.stdout).toContain('evil\\x1b]0;owned\\x07\\x0asecond line');
    expect(list.stdout).toContain('…(10267 bytes)');
    const listJson = await runEngine(['list', '--repo', own, '--json']);
    expect(listJson.stdout).not.toMatch(TERMINAL_CONTROLS);
    const parsed = parseJson<{ backups: { name: string; disks: { name: string }[] }[] }>(listJson.stdout);
    expect(parsed.backups[0]!.name).toBe(hostileName);
    expect(parsed.backups[0]!.disks[0]!.name).toBe(oldDiskName);

    const show = await runEngine(['show', '--repo', own, made.id.slice(0, 8)]);
    expect(show.code).toBe(0);
    expect(show.stdout).not.toMatch(TERMINAL_CONTROLS);
    expect(show.stdout).toContain('host:      host\\x1b[2J');
    expect(show.stdout).toContain('disk d\\x7f\\x9b31m: 200 KiB (204800 bytes) from file /dev/\\u202eevil');

    const prune = await runEngine(['prune', '--repo', own, '--keep-last', '1', '--dry-run']);
    expect(prune.code).toBe(0);
    expect(prune.stdout).not.toMatch(TERMINAL_CONTROLS);
    const verify = await runEngine(['verify', '--repo', own, '--read-data', '--json']);
    expect(parseJson<{ ok: boolean }>(verify.stdout).ok).toBe(true);

    // Restored into a directory: the file takes the name's safe form. --disk takes the name or its escaped form.
    const into = join(dir, 'legacy-restore');
    await mkdir(into);
    const restored = await runEngine(['restore', '--repo', own, made.id, '--to', into]);
    expect(restored.code).toBe(0);
    expect(restored.stdout).not.toMatch(TERMINAL_CONTROLS);
    expect(await readdir(into)).toEqual(['d__31m']);
    expect(await filesIdentical(join(into, 'd__31m'), image)).toBe(true);
    for (const [given, file] of [[oldDiskName, 'raw.img'], ['d\\x7f\\x9b31m', 'escaped.img']]) {
      const one = await runEngine(['restore', '--repo', own, made.id, '--disk', given!, '--to', join(dir, file!), '--json']);
      expect(one.code).toBe(0);
      expect(await filesIdentical(join(dir, file!), image)).toBe(true);
    }
    const missing = await runEngine(['restore', '--repo', own, made.id, '--disk', `no\u001b${'y'.repeat(5000)}`, '--to', join(dir, 'none.img')]);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toBe(`engine: backup ${made.id} has no disk "no\\x1b${'y'.repeat(58)}…(5003 bytes)" (it has: d\\x7f\\x9b31m)\n`);
  });
});
