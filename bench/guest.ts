/** The tests' tiny guest for the benches that boot it (quiesce, live restore): its image, and its agent through virsh. */
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { arg, sh } from './tools.js';

const CACHE_ROOT = process.env.ENGINE_TEST_CACHE ?? '/var/cache/engine-test';

/** `--guest-image`, else the newest tiny guest the tests built (its folder is named after the builder script's hash). */
export async function guestImage(): Promise<string> {
  const given = arg('--guest-image');
  if (given) return given;
  const found: { path: string; mtime: number }[] = [];
  for (const name of await readdir(CACHE_ROOT).catch(() => [] as string[])) {
    const path = join(CACHE_ROOT, name, 'guest.img');
    if (name.startsWith('tiny-guest-') && !name.endsWith('.tmp')) found.push(...(await stat(path).then((s) => [{ path, mtime: s.mtimeMs }], () => [])));
  }
  const newest = found.sort((a, b) => b.mtime - a.mtime)[0];
  if (!newest) throw new Error(`no tiny guest under ${CACHE_ROOT}: run node_modules/.bin/vitest run test/verify-boot.test.ts once (it builds it), or give --guest-image`);
  return newest.path;
}

/** One guest agent command through `virsh qemu-agent-command`; its `return`. */
export async function agent<T>(domain: string, command: string, args?: Record<string, unknown>, timeoutSeconds = 30): Promise<T> {
  const json = JSON.stringify(args ? { execute: command, arguments: args } : { execute: command });
  return (JSON.parse(await sh('virsh', ['-q', 'qemu-agent-command', domain, json, '--timeout', String(timeoutSeconds)])) as { return: T }).return;
}
