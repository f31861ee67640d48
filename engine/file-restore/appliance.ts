/**
 * The file-restore appliance's kernel and initramfs (appliance/build-appliance.sh, SPEC 16.3): built on this
 * host from Debian's packages the first time `engine files` needs them (~10 s), into a cache folder named
 * after a hash of the build script and the agent's source, so a new version of either builds a new appliance
 * and never runs a stale one. The folder is $ENGINE_APPLIANCE_CACHE, /var/cache/engine by default.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readdir, readFile, rename, rm, stat, utimes } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { EngineError } from '../../repo-format/errors.js';

export interface Appliance {
  kernel: string;
  initrd: string;
  /** The cache folder it lives in. */
  dir: string;
  /** True when this call built it. */
  built: boolean;
}

/**
 * The appliance's sources sit beside this module in the source tree (engine/file-restore/appliance/); the
 * compiled module (dist/engine/file-restore/) and the bundle (dist/bundle/) find them by walking up to the
 * package root that holds them.
 */
function sourcesDir(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i += 1) {
    const candidate = join(dir, 'engine', 'file-restore', 'appliance');
    if (existsSync(join(candidate, 'build-appliance.sh'))) return candidate;
    if (existsSync(join(dir, 'appliance', 'build-appliance.sh'))) return join(dir, 'appliance');
    dir = dirname(dir);
  }
  throw new EngineError('ENGINE_INTERNAL', 'the file-restore appliance\'s sources (engine/file-restore/appliance/) are not installed');
}

export function applianceCacheRoot(): string {
  return process.env.ENGINE_APPLIANCE_CACHE ?? '/var/cache/engine';
}

let building: Promise<Appliance> | undefined;

/** The cached appliance, built first when this version has not been built on this host. */
export function ensureAppliance(onNotice?: (message: string) => void): Promise<Appliance> {
  building ??= buildOnce(onNotice).finally(() => {
    building = undefined;
  });
  return building;
}

async function buildOnce(onNotice?: (message: string) => void): Promise<Appliance> {
  const sources = sourcesDir();
  const script = join(sources, 'build-appliance.sh');
  const agent = join(sources, 'agent.c');
  const version = createHash('sha256').update(await readFile(script)).update(await readFile(agent)).digest('hex').slice(0, 16);
  const root = applianceCacheRoot();
  const dir = join(root, `appliance-${version}`);
  const appliance = { kernel: join(dir, 'vmlinuz'), initrd: join(dir, 'initrd'), dir };
  if (await stat(join(dir, 'kernel-release')).then(() => true, () => false)) {
    await markUsed(dir);
    return { ...appliance, built: false };
  }
  onNotice?.(`building the file-restore appliance into ${dir} (once per version, from Debian's packages)`);
  await mkdir(root, { recursive: true, mode: 0o755 });
  // Built aside and renamed into place: runs at once never see a half-built appliance; the loser of a race
  // finds the folder there and throws its own copy away.
  const aside = `${dir}.${process.pid}.${Date.now()}.tmp`;
  await new Promise<void>((resolve, reject) =>
    execFile('bash', [script, agent, aside], { maxBuffer: 16 * 1024 * 1024 }, (error, _stdout, stderr) =>
      error ? reject(new EngineError('ENGINE_TOOL_FAILED', `building the file-restore appliance failed: ${stderr.trim() || error.message}`, { tool: 'build-appliance.sh' })) : resolve(),
    ),
  ).catch(async (error: unknown) => {
    await rm(aside, { recursive: true, force: true });
    throw error;
  });
  await rename(aside, dir).catch(async (error: NodeJS.ErrnoException) => {
    await rm(aside, { recursive: true, force: true });
    if (error.code !== 'ENOTEMPTY' && error.code !== 'EEXIST') throw error;
  });
  await markUsed(dir);
  await removeUnusedVersions(root, version);
  return { ...appliance, built: true };
}

/** How long an appliance of another version is kept after its last use. */
const UNUSED_VERSION_KEPT_MS = 7 * 24 * 3600 * 1000;

/**
 * The folder's modification time says when a run last used it: another checkout or installation of another
 * engine version on this host (a CI clone beside a working tree) keeps its own appliance, which a build of
 * this version must not delete under it (it could be starting a VM from it) nor make it rebuild each time.
 */
async function markUsed(dir: string): Promise<void> {
  const now = new Date();
  await utimes(dir, now, now).catch(() => undefined);
}

/** Appliances of other versions unused for a week are of no further use (~40 MB each). */
async function removeUnusedVersions(root: string, version: string): Promise<void> {
  for (const name of await readdir(root)) {
    if (!name.startsWith('appliance-') || name === `appliance-${version}` || name.endsWith('.tmp')) continue;
    const used = await stat(join(root, name)).then((s) => s.mtimeMs, () => undefined);
    if (used !== undefined && Date.now() - used > UNUSED_VERSION_KEPT_MS) await rm(join(root, name), { recursive: true, force: true });
  }
}
