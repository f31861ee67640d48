/**
 * Passphrases and the files that hold them (SPEC.md 14 and 18.2): bounded reads (a device, an endless FIFO,
 * a huge file are refused without being read whole), warnings on files other users can read, a minimum
 * length for new repositories counted in characters, an empty file said to be empty, $ENGINE_PASSWORD_FILE,
 * and the passphrase's bytes used as given, with repositories keyed by the older UTF-8 decoding still opening.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmod, cp, mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ENGINE_BIN, exitOf, parseJson, runEngine, sh, tempDir, writeRegion, type BackupJson, type RunResult, withoutProgress } from './helpers.js';

const FIXTURE = fileURLToPath(new URL('./legacy-passphrase-fixture/', import.meta.url));
const GOOD = 'correct horse battery staple';

let dir: string;
let cleanup: () => Promise<void>;
let image: string;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-passphrase-'));
  image = join(dir, 'disk.img');
  await writeRegion(image, 0, 300 * 1024, 'random', 'passphrase');
});
afterAll(async () => {
  await cleanup();
});

/** A file holding exactly `bytes`, owner-only unless `mode` says otherwise. */
async function secretFile(name: string, bytes: Buffer | string, mode = 0o600): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, bytes);
  await chmod(path, mode);
  return path;
}

/** Runs the CLI through sh, so that an environment variable can hold bytes that are not UTF-8 (`printf` octal escapes). */
function runWithShellEnv(assignments: string, args: string[]): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile('sh', ['-c', `${assignments} exec "$0" "$@"`, process.execPath, ENGINE_BIN, ...args], { env: { ...process.env, ENGINE_PASSWORD: '', ENGINE_PASSWORD_FILE: '' } }, (error, stdout, stderr) => {
      resolve({ code: error ? (typeof error.code === 'number' ? error.code : 1) : 0, stdout, stderr });
    });
  });
}

const noEnv = { ENGINE_PASSWORD: '', ENGINE_PASSWORD_FILE: '' };

async function encryptedRepo(name: string, passwordFile: string): Promise<string> {
  const repo = join(dir, name);
  const init = await runEngine(['init', repo, '--block-size', '64K', '--encrypt', '--password-file', passwordFile, '--json'], { env: noEnv });
  expect(withoutProgress(init.stderr)).toBe('');
  expect(init.code).toBe(0);
  return repo;
}

describe('reading a passphrase file is bounded', () => {
  let repo: string;
  beforeAll(async () => {
    repo = await encryptedRepo('bounded', await secretFile('good.pass', `${GOOD}\n`));
  });

  test('/dev/zero, a directory, a file over 4 KiB: refused at once with what it is (exit 2)', async () => {
    const zero = await runEngine(['list', '--repo', repo, '--password-file', '/dev/zero'], { env: noEnv });
    expect([zero.code, zero.stderr]).toEqual([2, 'engine: --password-file /dev/zero: is a character device (a terminal, /dev/zero …), not a file; the engine never prompts: put the secret in a file\n']);
    const directory = await runEngine(['list', '--repo', repo, '--password-file', dir], { env: noEnv });
    expect([directory.code, directory.stderr]).toEqual([2, `engine: --password-file ${dir}: is a directory, not a file\n`]);
    const huge = await secretFile('huge.pass', Buffer.alloc(5000, 0x61));
    const big = await runEngine(['list', '--repo', repo, '--password-file', huge], { env: noEnv });
    expect([big.code, big.stderr]).toEqual([2, `engine: --password-file ${huge}: holds 5000 bytes; a secret file holds at most 4096 bytes (is it the right file?)\n`]);
  });

  test('a FIFO that never ends is refused after 4 KiB; one that delivers and closes works; process substitution works', async () => {
    const fifo = join(dir, 'endless.fifo');
    await sh('mkfifo', [fifo]);
    const writer = spawn('sh', ['-c', `exec yes > '${fifo}'`], { stdio: 'ignore' });
    const endless = await runEngine(['list', '--repo', repo, '--password-file', fifo], { env: noEnv });
    writer.kill('SIGKILL');
    await exitOf(writer);
    expect([endless.code, endless.stderr]).toEqual([2, `engine: --password-file ${fifo}: holds more than 4096 bytes; a secret file holds at most 4096 bytes (is it the right file?)\n`]);

    const fifo2 = join(dir, 'once.fifo');
    await sh('mkfifo', [fifo2]);
    await chmod(fifo2, 0o600);
    const once = spawn('sh', ['-c', `sleep 0.2; printf '%s\\n' '${GOOD}' > '${fifo2}'`], { stdio: 'ignore' });
    const viaFifo = await runEngine(['list', '--repo', repo, '--password-file', fifo2, '--json'], { env: noEnv });
    await exitOf(once);
    expect([viaFifo.code, viaFifo.stderr]).toEqual([0, '']);

    const substituted = await new Promise<RunResult>((resolve) => {
      execFile('bash', ['-c', `exec "$0" "$@" --password-file <(printf '%s' '${GOOD}')`, process.execPath, ENGINE_BIN, 'list', '--repo', repo, '--json'], { env: { ...process.env, ...noEnv } }, (error, stdout, stderr) =>
        resolve({ code: error ? 1 : 0, stdout, stderr }),
      );
    });
    expect([substituted.code, substituted.stderr]).toEqual([0, '']);
  });

  test('a FIFO nobody writes: given up after the timeout, with a message, not a hang', async () => {
    const fifo = join(dir, 'silent.fifo');
    await sh('mkfifo', [fifo]);
    const { resolvePassphrase } = await import('../dist/engine/host/passphrase-source.js');
    await expect(resolvePassphrase({ file: fifo, env: {}, timeoutMs: 300 })).rejects.toMatchObject({
      code: 'ENGINE_INVALID_ARGUMENT',
      message: `passphrase file ${fifo}: is a pipe that delivered no complete secret within 0.3 s (nothing wrote it, or the writer did not close it)`,
    });
  });

  test('an empty file (or a newline only) is said to be empty, not a wrong passphrase', async () => {
    for (const [name, content, suffix] of [['empty.pass', '', ''], ['newline.pass', '\n', ' (a newline only)']] as const) {
      const file = await secretFile(name, content);
      const result = await runEngine(['list', '--repo', repo, '--password-file', file], { env: noEnv });
      expect([result.code, result.stderr]).toEqual([2, `engine: --password-file ${file} is empty${suffix}: it must hold the passphrase\n`]);
    }
  });

  test('a passphrase file or key file other users can read: used, with a warning (none with --json)', async () => {
    const loose = await secretFile('loose.pass', `${GOOD}\n`, 0o644);
    const warned = await runEngine(['list', '--repo', repo, '--password-file', loose], { env: noEnv });
    expect(warned.code).toBe(0);
    expect(warned.stderr).toBe(`engine: --password-file ${loose} is open to other users (mode 0644): make it private, chmod 600 ${loose}\n`);
    expect((await runEngine(['list', '--repo', repo, '--password-file', loose, '--json'], { env: noEnv })).stderr).toBe('');

    const [keyName] = await readdir(join(repo, 'keys'));
    const keyFile = join(repo, 'keys', keyName!);
    await chmod(keyFile, 0o644);
    const good = await secretFile('good2.pass', GOOD);
    const keyWarned = await runEngine(['list', '--repo', repo, '--password-file', good], { env: noEnv });
    expect(keyWarned.code).toBe(0);
    expect(keyWarned.stderr).toBe(`engine: the key file keys/${keyName} of repository ${repo} is open to other users (mode 0644), who can try passphrases against it offline: chmod 400 ${keyFile}\n`);
    await chmod(keyFile, 0o400);
    expect((await runEngine(['list', '--repo', repo, '--password-file', good], { env: noEnv })).stderr).toBe('');
  });
});

describe('where the passphrase comes from', () => {
  test('$ENGINE_PASSWORD_FILE (a systemd credential), and the order --password-file, $ENGINE_PASSWORD_FILE, $ENGINE_PASSWORD', async () => {
    const repo = await encryptedRepo('sources', await secretFile('sources.pass', GOOD));
    // A credentials directory as systemd makes it: the directory 0500, the file 0400.
    const credentials = join(dir, 'credentials');
    await mkdir(credentials);
    await writeFile(join(credentials, 'passphrase'), `${GOOD}\n`);
    await chmod(join(credentials, 'passphrase'), 0o400);
    await chmod(credentials, 0o500);
    const wrong = await secretFile('wrong.pass', 'not the passphrase at all');
    const viaEnvFile = await runEngine(['list', '--repo', repo, '--json'], { env: { ENGINE_PASSWORD_FILE: join(credentials, 'passphrase'), ENGINE_PASSWORD: 'wrong passphrase here' } });
    expect([viaEnvFile.code, viaEnvFile.stderr]).toEqual([0, '']);
    const flagWins = await runEngine(['list', '--repo', repo, '--password-file', wrong, '--json'], { env: { ENGINE_PASSWORD_FILE: join(credentials, 'passphrase') } });
    expect(flagWins.code).toBe(6);
    const emptyFileVariable = await runEngine(['list', '--repo', repo, '--json'], { env: { ENGINE_PASSWORD_FILE: '', ENGINE_PASSWORD: GOOD } });
    expect([emptyFileVariable.code, emptyFileVariable.stderr]).toEqual([0, '']);
    const missing = await runEngine(['list', '--repo', repo], { env: { ENGINE_PASSWORD_FILE: join(dir, 'nowhere'), ENGINE_PASSWORD: '' } });
    expect([missing.code, missing.stderr]).toEqual([2, `engine: $ENGINE_PASSWORD_FILE ${join(dir, 'nowhere')}: cannot be read (no such file)\n`]);
    const none = await runEngine(['list', '--repo', repo], { env: noEnv });
    expect([none.code, none.stderr]).toEqual([6, `engine: repository ${repo} is encrypted, and no passphrase was given: give its passphrase with --password-file FILE, in a file named by ENGINE_PASSWORD_FILE, or in ENGINE_PASSWORD\n`]);
  });

  test('examples/engine-serve@.service passes the passphrase as a systemd credential that ENGINE_PASSWORD_FILE names; systemd-analyze accepts it', async () => {
    const unit = await readFile(fileURLToPath(new URL('../examples/engine-serve@.service', import.meta.url)), 'utf8');
    expect(unit).toMatch(/^#LoadCredential=passphrase:\/etc\/engine\/passphrase$/m);
    expect(unit).toMatch(/^#Environment=ENGINE_PASSWORD_FILE=%d\/passphrase$/m);
    const enabled = unit
      .replace(/^#(LoadCredential=|Environment=ENGINE_PASSWORD_FILE=)/gm, '$1')
      .replace('/usr/local/bin/engine', fileURLToPath(new URL('../bin/engine', import.meta.url)));
    const units = join(dir, 'units');
    await mkdir(units);
    await writeFile(join(units, 'engine-serve@3fa2c1d0.service'), enabled);
    const verified = await new Promise<{ code: number; stderr: string }>((resolve) => {
      execFile('systemd-analyze', ['verify', '--man=no', join(units, 'engine-serve@3fa2c1d0.service')], (error, _stdout, stderr) => resolve({ code: error ? 1 : 0, stderr }));
    });
    expect(verified).toEqual({ code: 0, stderr: '' });
  });
});

describe('a new repository needs a passphrase of at least 8 characters', () => {
  test('counted in characters (code points), not bytes; invalid UTF-8 bytes count one each', async () => {
    const cases: [string, Buffer, number][] = [
      ['ascii-7', Buffer.from('seven77'), 2],
      ['ascii-8', Buffer.from('eight888'), 0],
      ['accents-7', Buffer.from('ééééééé'), 2], // 14 bytes, 7 characters
      ['cjk-8', Buffer.from('日本語のパスワー'), 0], // 24 bytes, 8 characters
      ['invalid-8', Buffer.from([0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0xfa, 0xf9, 0xf8]), 0],
    ];
    for (const [name, bytes, expected] of cases) {
      const file = await secretFile(`${name}.pass`, bytes);
      const result = await runEngine(['init', join(dir, `min-${name}`), '--encrypt', '--password-file', file], { env: noEnv });
      expect([name, result.code]).toEqual([name, expected]);
      if (expected === 2) expect(result.stderr).toBe('engine: the passphrase has 7 characters: an encrypted repository needs at least 8 (a long passphrase is what stops offline guessing)\n');
    }
  });
});

describe('the passphrase is its bytes, as given', () => {
  test('passphrases that differ only in bytes that are not UTF-8 are different passphrases; $ENGINE_PASSWORD gives bytes too', async () => {
    const repo = await encryptedRepo('bytes', await secretFile('bytes-a.pass', Buffer.from('long enough \xff\xfe\n', 'latin1')));
    const other = await secretFile('bytes-b.pass', Buffer.from('long enough \xfe\xff\n', 'latin1'));
    expect((await runEngine(['list', '--repo', repo, '--password-file', other, '--json'], { env: noEnv })).code).toBe(6);
    // Before, both decoded to "long enough \uFFFD\uFFFD": either opened the repository.
    expect((await runEngine(['list', '--repo', repo, '--json'], { env: { ...noEnv, ENGINE_PASSWORD: 'long enough \uFFFD\uFFFD' } })).code).toBe(6);
    const sameBytes = await runWithShellEnv(`ENGINE_PASSWORD=$(printf 'long enough \\377\\376')`, ['list', '--repo', repo, '--json']);
    expect([sameBytes.code, sameBytes.stderr]).toEqual([0, '']);
    const otherBytes = await runWithShellEnv(`ENGINE_PASSWORD=$(printf 'long enough \\376\\377')`, ['list', '--repo', repo, '--json']);
    expect(otherBytes.code).toBe(6);
  });

  test('a repository keyed by the engine before (21ba75d) with a passphrase that is not UTF-8 still opens, says why it is weaker, and restores', async () => {
    const repo = join(dir, 'legacy');
    await cp(join(FIXTURE, 'repo'), repo, { recursive: true });
    // git keeps no empty directories: add what the engine of that time created.
    for (const sub of ['tmp', 'readers', ...Array.from({ length: 256 }, (_, i) => `packs/${i.toString(16).padStart(2, '0')}`)]) await mkdir(join(repo, sub), { recursive: true });
    // Private, as the engine of that time left it (git checks files out 0644, which the engine would warn about).
    await sh('chmod', ['-R', 'go=', repo]);
    const expected = parseJson<{ backup: string; sha256: string }>(await readFile(join(FIXTURE, 'expected.json'), 'utf8'));
    // Owner-only, as the user keeps it (git checks files out 0644).
    const passphrase = await secretFile('legacy.pass', await readFile(join(FIXTURE, 'passphrase')));
    const listed = await runEngine(['list', '--repo', repo, '--password-file', passphrase, '--json'], { env: noEnv });
    expect(listed.code).toBe(0);
    expect(parseJson<{ backups: { id: string }[] }>(listed.stdout).backups.map((b) => b.id)).toEqual([expected.backup]);
    const human = await runEngine(['list', '--repo', repo, '--password-file', passphrase], { env: noEnv });
    expect(human.stderr).toMatch(/^engine: repository .* was created with a passphrase that is not valid UTF-8, by an engine that replaced its invalid bytes with U\+FFFD before deriving the key: any passphrase that differs from it only in those bytes opens it\. Back up into a new repository created with this passphrase, which now counts every byte\n$/);
    const restored = join(dir, 'legacy.raw');
    const restore = await runEngine(['restore', '--repo', repo, expected.backup, '--to', restored, '--password-file', passphrase, '--json'], { env: noEnv });
    expect([restore.code, restore.stderr]).toEqual([0, '']);
    expect(createHash('sha256').update(await readFile(restored)).digest('hex')).toBe(expected.sha256);
    // What the notice says: other invalid bytes in the same places open it too (that is how it was keyed)…
    const collision = await secretFile('legacy-collision.pass', Buffer.from('golden fixture \xe8t\xe8 \xfe\n', 'latin1'));
    expect((await runEngine(['list', '--repo', repo, '--password-file', collision, '--json'], { env: noEnv })).code).toBe(0);
    // … but a passphrase that differs in any valid character is wrong.
    const wrong = await secretFile('legacy-wrong.pass', Buffer.from('Golden fixture \xe9t\xe9 \xff\n', 'latin1'));
    expect((await runEngine(['list', '--repo', repo, '--password-file', wrong], { env: noEnv })).code).toBe(6);
    await rm(restored);
  });

  test('a repository made now is never opened through that fallback: its key file says the passphrase is bytes', async () => {
    // Valid UTF-8 that holds U+FFFD: what "golden \xff…" decoded to before; the fallback would turn \xff into it.
    const repo = await encryptedRepo('no-fallback', await secretFile('fffd.pass', 'golden passphrase \uFFFD\n'));
    const [keyName] = await readdir(join(repo, 'keys'));
    expect(JSON.parse(await readFile(join(repo, 'keys', keyName!), 'utf8'))).toMatchObject({ passphrase: 'bytes' });
    const invalid = await secretFile('ff.pass', Buffer.from('golden passphrase \xff\n', 'latin1'));
    expect((await runEngine(['list', '--repo', repo, '--password-file', invalid], { env: noEnv })).code).toBe(6);
    const backup = await runEngine(['backup', '--repo', repo, '--source', image, '--password-file', join(dir, 'fffd.pass'), '--json'], { env: noEnv });
    expect(backup.code).toBe(0);
    expect(parseJson<BackupJson>(backup.stdout).disks[0]!.size).toBe(300 * 1024);
  });
});
