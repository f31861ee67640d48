/**
 * A path argument that looks like a URL (`s3://…`, `sftp:host:/…`, `rest:https://…`) is refused with exit
 * code 2 and a clear message, never taken as a relative path (SPEC.md, section 14): nothing is created in the
 * current directory. Every path argument of every command, and $ENGINE_REPO.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { parseJson, runEngine, tempDir, writeRegion, type BackupJson } from './helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let repo: string;
let backupId: string;
let cwd: string;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-urls-'));
  repo = join(dir, 'repo');
  expect((await runEngine(['init', repo])).code).toBe(0);
  const image = join(dir, 'disk.img');
  await writeRegion(image, 0, 256 * 1024, 'random', 'urls');
  backupId = parseJson<BackupJson>((await runEngine(['backup', '--repo', repo, '--source', image, '--json'])).stdout).id;
  cwd = join(dir, 'cwd');
  await import('node:fs/promises').then((fs) => fs.mkdir(cwd));
});
afterAll(async () => {
  await cleanup();
});

async function refused(args: string[], flag: string, url: string, env: Record<string, string> = {}): Promise<void> {
  const result = await runEngine(args, { cwd, env: { ENGINE_PASSWORD: '', ENGINE_PASSWORD_FILE: '', ...env } });
  expect([args.join(' '), result.code]).toEqual([args.join(' '), 2]);
  const literal = (text: string): string => text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  expect(result.stderr).toMatch(new RegExp(`^engine: ${literal(flag)} ${literal(url)}: (looks like a URL \\([a-z0-9+.-]+:\\), and this argument takes only|is a file: URL)`));
  expect(await readdir(cwd)).toEqual([]);
}

describe('URLs where a local path is expected', () => {
  test('init: s3://, sftp:, rest:, b2:, file://, any scheme:// — refused, nothing created; ./s3:name is a local directory', async () => {
    for (const url of ['sftp:backup@host:/srv/repo', 'rest:https://host:8000/', 'b2:bucket:repo', 'file:///srv/repo', 'webdav+https://host/repo', 's3:bucket/repo']) {
      await refused(['init', url], 'repository', url);
    }
    // s3:// is an S3 repository (SPEC.md 20.2): taken as one, never as a path. Without credentials it stops
    // before any request, and nothing is created here.
    for (const url of ['s3://bucket/repo', 'S3://BUCKET']) {
      const s3 = await runEngine(['init', url], { cwd, env: { AWS_ACCESS_KEY_ID: '', AWS_SECRET_ACCESS_KEY: '', AWS_PROFILE: '', AWS_SHARED_CREDENTIALS_FILE: join(dir, 'none'), AWS_CONFIG_FILE: join(dir, 'none') } });
      expect([url, s3.code]).toEqual([url, 1]);
      expect(s3.stderr).not.toMatch(/looks like a URL/);
      expect(s3.stderr).toMatch(/credentials/i);
      expect(await readdir(cwd)).toEqual([]);
    }
    const result = await runEngine(['init', './s3:local'], { cwd });
    expect(result.code).toBe(0);
    expect((await stat(join(cwd, 's3:local', 'config'))).isFile()).toBe(true);
    await import('node:fs/promises').then((fs) => fs.rm(join(cwd, 's3:local'), { recursive: true }));
  });

  test('--repo and $ENGINE_REPO of every command that opens a repository', async () => {
    for (const args of [['list'], ['show', backupId], ['verify'], ['gc'], ['repair'], ['prune', '--keep-last', '1'], ['protect', backupId], ['restore', backupId, '--to', join(dir, 'x.raw')], ['backup', '--source', join(dir, 'disk.img')], ['serve', backupId, '--socket', join(dir, 'serve.sock')]]) {
      await refused([...args, '--repo', 'sftp://host/repo'], 'repository', 'sftp://host/repo');
      await refused(args, 'repository', 'rest:https://host/repo', { ENGINE_REPO: 'rest:https://host/repo' });
      // s3:// is a repository (format version 3): the commands that work on it go to the store (here without
      // credentials: stopped before any request), the others refuse it by name; never a path.
      const noCredentials = { AWS_ACCESS_KEY_ID: '', AWS_SECRET_ACCESS_KEY: '', AWS_PROFILE: '', AWS_SHARED_CREDENTIALS_FILE: join(dir, 'none'), AWS_CONFIG_FILE: join(dir, 'none') };
      const refusesV3 = args[0] === 'gc' || args[0] === 'repair';
      for (const env of [{}, { ENGINE_REPO: 's3://bucket/repo' }] as Record<string, string>[]) {
        const s3 = await runEngine(Object.keys(env).length === 0 ? [...args, '--repo', 's3://bucket/repo'] : args, { cwd, env: { ...noCredentials, ...env } });
        expect([args.join(' '), s3.code]).toEqual([args.join(' '), refusesV3 ? 5 : 1]);
        expect(s3.stderr).not.toMatch(/looks like a URL/);
        expect(s3.stderr).toMatch(refusesV3 ? /^engine: repository s3:\/\/bucket\/repo has format version 3/ : /credentials/i);
        expect(await readdir(cwd)).toEqual([]);
      }
    }
  });

  test('--source, --image, --to, --to-qcow2, mount and umount directories, --socket, --overlay-dir, --password-file, --ovirt-credentials, --ca-file, --device-root, demo --dir', async () => {
    await refused(['backup', '--repo', repo, '--source', 's3://bucket/disk.img'], '--source', 's3://bucket/disk.img');
    await refused(['backup', '--repo', repo, '--image', 'https://host/vm.qcow2'], '--image', 'https://host/vm.qcow2');
    await refused(['restore', '--repo', repo, backupId, '--to', 'sftp://host/disk.raw'], '--to', 'sftp://host/disk.raw');
    await refused(['restore', '--repo', repo, backupId, '--to-qcow2', 's3://bucket/disk.qcow2'], '--to-qcow2', 's3://bucket/disk.qcow2');
    await refused(['mount', '--repo', repo, backupId, 's3://bucket/mnt'], 'mount directory', 's3://bucket/mnt');
    await refused(['umount', 'sftp://host/mnt'], 'mount directory', 'sftp://host/mnt');
    await refused(['serve', '--repo', repo, backupId, '--socket', 'unix:///run/x.sock'], '--socket', 'unix:///run/x.sock');
    await refused(['serve', '--repo', repo, backupId, '--socket', join(dir, 'x.sock'), '--writable', '--overlay-dir', 's3://bucket/overlay'], '--overlay-dir', 's3://bucket/overlay');
    await refused(['list', '--repo', repo, '--password-file', 'https://vault/secret'], '--password-file', 'https://vault/secret');
    await refused(['list', '--repo', repo], '$ENGINE_PASSWORD_FILE', 'https://vault/secret', { ENGINE_PASSWORD_FILE: 'https://vault/secret' });
    await refused(['backup', '--repo', repo, '--ovirt', 'https://engine', '--vm', 'vm1', '--ovirt-credentials', 's3://bucket/creds'], '--ovirt-credentials', 's3://bucket/creds');
    await refused(['backup', '--repo', repo, '--ovirt', 'https://engine', '--vm', 'vm1', '--ca-file', 'https://engine/ca.pem'], '--ca-file', 'https://engine/ca.pem');
    await refused(['backup', '--repo', repo, '--ovirt', 'https://engine', '--vm', 'vm1', '--appliance', 'a', '--device-root', 'sftp://x/dev'], '--device-root', 'sftp://x/dev');
    await refused(['demo', '--dir', 's3://bucket/demo'], '--dir', 's3://bucket/demo');
    // NBD URIs stay what --source and --to accept: refused for another reason (nothing listens), not as a URL.
    const nbd = await runEngine(['restore', '--repo', repo, backupId, '--to', `nbd+unix:///x?socket=${join(dir, 'none.sock')}`], { cwd });
    expect(nbd.stderr).not.toMatch(/looks like a URL/);
  });
});
