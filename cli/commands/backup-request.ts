/**
 * The backup command's flags as the engine's typed request (engine/backup/request.ts): the one place that
 * knows what --source, --image, --libvirt, --disk-name, --name and --full/--incremental/--differential/--auto
 * mean. Pure: a combination that makes no sense is refused here, in the flags' own words (exit code 2),
 * before anything is opened.
 */
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { checkLocalPath } from '../../repo-format/local-path.js';
import { checkName } from '../../repo-format/names.js';
import { isNbdUri } from '../../engine/nbd/uri.js';
import type { BackupDisk, BackupFrom, ChainPolicy, QuiesceRequest } from '../../engine/backup/request.js';

export interface ChainFlags {
  full?: boolean | undefined;
  incremental?: boolean | undefined;
  differential?: boolean | undefined;
  auto?: boolean | undefined;
}

export interface BackupFlags extends ChainFlags {
  source?: string[] | undefined;
  image?: string[] | undefined;
  libvirt?: string | undefined;
  diskName?: string[] | undefined;
  name?: string | undefined;
  quiesce?: string | true | undefined;
  freezeTimeout?: number | undefined;
  hookTimeout?: number | undefined;
  preFreeze?: string | undefined;
  postThaw?: string | undefined;
  preFreezeHost?: string | undefined;
  postThawHost?: string | undefined;
}

export interface BackupRequest {
  from: BackupFrom;
  chain: ChainPolicy;
  name: string | undefined;
}

/** --full, --incremental, --differential or --auto (the default). */
export function chainPolicy(flags: ChainFlags): ChainPolicy {
  return { mode: flags.full ? 'full' : flags.incremental ? 'incremental' : flags.differential ? 'differential' : 'auto' };
}

export function backupRequest(flags: BackupFlags): BackupRequest {
  const sources = flags.source ?? [];
  const images = flags.image ?? [];
  const names = flags.diskName ?? [];
  if (sources.length + images.length === 0 && flags.libvirt === undefined) throw new InvalidArgumentError('name at least one disk: --source PATH|URI, --image QCOW2 or --libvirt DOMAIN');
  if (flags.libvirt !== undefined && sources.length + images.length > 0) throw new InvalidArgumentError('--libvirt backs up all disks of the domain: do not combine it with --source or --image');
  if (flags.libvirt !== undefined && names.length > 0) throw new InvalidArgumentError('--libvirt names each disk after its target (vda, sdb…): --disk-name does not apply');
  // Names the user gives must keep the name rule (names.ts): refused before anything is opened.
  for (const name of names) checkName(name, 'disk', '--disk-name');
  if (flags.name !== undefined) checkName(flags.name, 'backup', '--name');
  if (names.length > 0 && names.length !== sources.length + images.length) {
    throw new InvalidArgumentError(`${names.length} disk names for ${sources.length + images.length} disks: give one --disk-name per --source and --image, in that order`);
  }
  const base = { chain: chainPolicy(flags), name: flags.name };
  const quiesce = quiesceRequest(flags);
  if (quiesce && flags.libvirt === undefined) throw new InvalidArgumentError('--quiesce and its hooks and timeouts apply to --libvirt DOMAIN (the guest agent of a running VM)');
  if (flags.libvirt !== undefined) return { ...base, from: { kind: 'libvirt', domain: flags.libvirt, quiesce } };
  const disks: BackupDisk[] = [...sources.map(sourceDisk), ...images.map(imageDisk)];
  return { ...base, from: { kind: 'disks', disks: disks.map((disk, i) => (names.length > 0 ? { ...disk, name: names[i]! } : disk)) } };
}

/** --quiesce[=required|try] (bare: required) and what goes with it; a hook or timeout without --quiesce is refused. */
function quiesceRequest(flags: BackupFlags): QuiesceRequest | undefined {
  const extras = (
    [
      ['--freeze-timeout', flags.freezeTimeout],
      ['--hook-timeout', flags.hookTimeout],
      ['--pre-freeze', flags.preFreeze],
      ['--post-thaw', flags.postThaw],
      ['--pre-freeze-host', flags.preFreezeHost],
      ['--post-thaw-host', flags.postThawHost],
    ] as const
  ).filter(([, value]) => value !== undefined);
  if (flags.quiesce === undefined) {
    if (extras.length > 0) throw new InvalidArgumentError(`${extras.map(([flag]) => flag).join(', ')} ${extras.length === 1 ? 'goes' : 'go'} with --quiesce`);
    return undefined;
  }
  return {
    mode: flags.quiesce === 'try' ? 'try' : 'required',
    freezeTimeoutMs: flags.freezeTimeout === undefined ? undefined : flags.freezeTimeout * 1000,
    hookTimeoutMs: flags.hookTimeout === undefined ? undefined : flags.hookTimeout * 1000,
    preFreeze: flags.preFreeze,
    postThaw: flags.postThaw,
    preFreezeHost: flags.preFreezeHost,
    postThawHost: flags.postThawHost,
  };
}

/** --source: an NBD URI, or a raw image or block device (a URL is never taken for a relative path). */
function sourceDisk(spec: string): BackupDisk {
  if (isNbdUri(spec)) return { kind: 'nbd', uri: spec };
  checkLocalPath(spec, '--source', 'nbd:// and nbd+unix:// URIs');
  return { kind: 'raw', path: spec };
}

function imageDisk(path: string): BackupDisk {
  checkLocalPath(path, '--image');
  return { kind: 'image', path };
}
