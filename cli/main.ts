#!/usr/bin/env node
/**
 * `engine`: argument parsing and printing only; every action is one call into engine/.
 */
import { Command, CommanderError, Option } from 'commander';
import { EngineError, InvalidArgumentError } from '../repo-format/errors.js';
import { setNoticeSink } from '../repo-format/notices.js';
import { displayText } from '../repo-format/display-text.js';
import { forTerminal, terminalLine } from './terminal.js';
import { checkLocalPath } from '../repo-format/local-path.js';
import { ENGINE_VERSION } from '../engine/version.js';
import { formatBytes, parseSize } from '../engine/units.js';
import { KEEP_RULES, type RetentionPolicy } from '../engine/retention.js';
import { EXIT, exitCodeFor } from './exit-codes.js';
import { createProgress } from './progress.js';
import { interruptSignal as processInterruptSignal } from './interrupt.js';
import { backupJson, count, printBackup, printGc, printInit, printJson, printList, printMount, printProtect, printPrune, printRepair, printRestore, printServe, printShow, printVerify, restoreJson, serveJson } from './output.js';

/**
 * Each command loads only the engine modules it runs: the whole engine (oVirt XML, NBD server, mount, gc …)
 * costs start-up time that a nightly `backup` of a disk should not pay.
 */
type AnyFunction = (...args: never[]) => unknown;
function lazy<M, K extends keyof M>(importer: () => Promise<M>, name: K): M[K] extends AnyFunction ? (...args: Parameters<M[K]>) => Promise<Awaited<ReturnType<M[K]>>> : never {
  const call = async (...args: unknown[]): Promise<unknown> => ((await importer())[name] as (...a: unknown[]) => unknown)(...args);
  return call as never;
}

const engine = {
  initRepository: lazy(() => import('../engine/init.js'), 'initRepository'),
  ovirtApplianceBackup: lazy(() => import('../engine/ovirt/appliance-backup.js'), 'ovirtApplianceBackup'),
  ovirtIncrementalBackup: lazy(() => import('../engine/ovirt/incremental-backup.js'), 'ovirtIncrementalBackup'),
  backup: lazy(() => import('../engine/backup.js'), 'backup'),
  listBackups: lazy(() => import('../engine/catalogue.js'), 'listBackups'),
  showBackup: lazy(() => import('../engine/catalogue.js'), 'showBackup'),
  ovirtRestoreVm: lazy(() => import('../engine/ovirt/restore-vm.js'), 'ovirtRestoreVm'),
  restore: lazy(() => import('../engine/restore/restore.js'), 'restore'),
  verify: lazy(() => import('../engine/verify.js'), 'verify'),
  serve: lazy(() => import('../engine/serve/serve.js'), 'serve'),
  mount: lazy(() => import('../engine/mount/mount.js'), 'mount'),
  umount: lazy(() => import('../engine/mount/mount.js'), 'umount'),
  prune: lazy(() => import('../engine/prune.js'), 'prune'),
  setProtection: lazy(() => import('../engine/protect.js'), 'setProtection'),
  gc: lazy(() => import('../engine/gc.js'), 'gc'),
  repair: lazy(() => import('../engine/repair.js'), 'repair'),
  unlock: lazy(() => import('../engine/unlock.js'), 'unlock'),
  forget: lazy(() => import('../engine/forget.js'), 'forget'),
  ovirtCleanup: lazy(() => import('../engine/ovirt/cleanup.js'), 'ovirtCleanup'),
  primitivesReport: lazy(() => import('../engine/primitives-bench.js'), 'primitivesReport'),
  runDemo: lazy(() => import('../engine/demo.js'), 'runDemo'),
};

interface GlobalOptions {
  debug?: boolean;
}

interface RestoreCliOptions {
  repo?: string;
  passwordFile?: string;
  disk?: string;
  to?: string;
  toQcow2?: string;
  onlyChanged?: boolean;
  sinceBitmap?: string;
  force?: boolean;
  ovirt?: string;
  newVm?: string;
  toVm?: string;
  cluster?: string;
  storageDomain?: string;
  keepDiskIds?: boolean;
  appliance?: string;
  deviceRoot?: string;
  via?: string;
  ovirtCredentials?: string;
  caFile?: string;
  insecureHttp?: boolean;
  json?: boolean;
  workers?: number;
}

interface BackupCliOptions {
  repo?: string;
  passwordFile?: string;
  source?: string[];
  image?: string[];
  libvirt?: string;
  ovirt?: string;
  vm?: string;
  appliance?: string;
  deviceRoot?: string;
  ovirtCredentials?: string;
  caFile?: string;
  insecureHttp?: boolean;
  diskName?: string[];
  name?: string;
  full?: boolean;
  incremental?: boolean;
  differential?: boolean;
  auto?: boolean;
  json?: boolean;
  workers?: number;
}

let jsonMode = false;

function repoOption(): Option {
  return new Option('--repo <path>', 'repository path (default: $ENGINE_REPO)').env('ENGINE_REPO');
}

function requireRepo(repo: string | undefined): string {
  if (!repo) throw new InvalidArgumentError('no repository: give --repo PATH or set ENGINE_REPO');
  return repo;
}

/** Credentials never come from the command line itself: a file, or the environment. */
function ovirtCredentialsOption(): Option {
  return new Option('--ovirt-credentials <file>', 'file with the oVirt user on its first line and the password on its second (default: $ENGINE_OVIRT_USER and $ENGINE_OVIRT_PASSWORD)');
}

async function loadCredentials(file: string | undefined): Promise<{ username: string; password: string }> {
  if (file) {
    const { readSecretFile } = await import('../engine/secret-file.js');
    const secret = await readSecretFile(file, `--ovirt-credentials ${file}`);
    for (const warning of secret.warnings) printNotice(warning);
    const [username, password] = secret.bytes.toString('utf8').split('\n');
    if (!username || password === undefined) throw new InvalidArgumentError(`${file}: expected the user on the first line and the password on the second`);
    return { username: username.trim(), password: password.replace(/\r$/, '') };
  }
  const username = process.env.ENGINE_OVIRT_USER;
  const password = process.env.ENGINE_OVIRT_PASSWORD;
  if (!username || password === undefined) throw new InvalidArgumentError('oVirt credentials: give --ovirt-credentials FILE or set ENGINE_OVIRT_USER and ENGINE_OVIRT_PASSWORD');
  return { username, password };
}

/** Plain http to oVirt only when the user says so: the flag, or ENGINE_OVIRT_INSECURE_HTTP=1 for a service configured by its environment. */
function insecureHttpOption(): Option {
  return new Option('--insecure-http', 'with --ovirt: allow an http:// engine (the oVirt password and token cross the network in clear text)');
}

/** How to reach oVirt: the URL checked first (a bad one is said before credentials are asked for), then the credentials. */
async function ovirtConnection(opts: { ovirt: string; ovirtCredentials?: string; caFile?: string; insecureHttp?: boolean }): Promise<{ url: string; credentials: { username: string; password: string }; caFile: string | undefined; insecureHttp: boolean }> {
  const insecureHttp = opts.insecureHttp === true || process.env.ENGINE_OVIRT_INSECURE_HTTP === '1';
  (await import('../engine/ovirt/url-policy.js')).checkEngineUrl(opts.ovirt, insecureHttp);
  return { url: opts.ovirt, credentials: await loadCredentials(opts.ovirtCredentials), caFile: opts.caFile, insecureHttp };
}

/** The passphrase of an encrypted repository: never an argument (argv is visible to every user), a file or the environment. */
function passwordFileOption(): Option {
  return new Option('--password-file <file>', 'file holding the passphrase of an encrypted repository (default: $ENGINE_PASSWORD_FILE, else $ENGINE_PASSWORD)');
}

/** The passphrase's bytes (engine/passphrase-source.ts: --password-file, $ENGINE_PASSWORD_FILE, $ENGINE_PASSWORD), or undefined. */
async function loadPassphrase(file: string | undefined): Promise<Buffer | undefined> {
  const { resolvePassphrase } = await import('../engine/passphrase-source.js');
  const resolved = await resolvePassphrase({ file });
  for (const warning of resolved.warnings) printNotice(warning);
  return resolved.passphrase;
}

/** A notice on stderr, one line, escaped; none with --json (stdout carries the one document, stderr nothing). */
function printNotice(message: string): void {
  if (!jsonMode) process.stderr.write(`engine: ${terminalLine(message)}\n`);
}

/** A path option's parser: a URL is refused at parse time (exit 2), never taken for a relative path. */
function localPath(flag: string): (value: string) => string {
  return (value) => {
    checkLocalPath(value, flag);
    return value;
  };
}

function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}

/**
 * A whole number in decimal digits only, within bounds: "1e3", "0x10", "5.0", " 5", "+5" are refused
 * (Number() would take them all), and so is anything past `max`.
 */
function integerParser(flag: string, min: number, max: number): (value: string) => number {
  return (value) => {
    const n = /^[0-9]{1,16}$/.test(value) ? Number(value) : Number.NaN;
    if (!Number.isSafeInteger(n) || n < min || n > max) throw new InvalidArgumentError(`${flag} ${displayText(value, 32)}: give a whole number from ${min} to ${max}, in digits`);
    return n;
  };
}

/** A size (1048576, 256K, 4GiB: parseSize) within bounds, in bytes. */
function sizeArgument(flag: string, value: string, min: number, max: number): number {
  let bytes: number;
  try {
    bytes = parseSize(value);
  } catch (error) {
    throw new InvalidArgumentError(`${flag} ${(error as Error).message}`);
  }
  if (bytes < min || bytes > max) throw new InvalidArgumentError(`${flag} ${displayText(value, 32)}: give a size from ${formatBytes(min)} to ${formatBytes(max)}`);
  return bytes;
}

/** Worker threads; what they do depends on the command. */
function workersOption(work: string, byDefault = 'one per core'): Option {
  return new Option('--workers <n>', `worker threads that ${work} (default: ${byDefault})`).argParser(integerParser('--workers', 1, 64));
}

/** "10%", "10" or "12.5%" → 0.1 …; digits and one decimal point only; bounds (0, 100] or [0, 100]. */
function percentOption(flags: string, description: string, allowZero: boolean): Option {
  const flag = flags.split(' ')[0]!;
  return new Option(flags, description).argParser((v) => {
    const digits = v.endsWith('%') ? v.slice(0, -1) : v;
    const n = /^[0-9]{1,3}(\.[0-9]{1,6})?$/.test(digits) ? Number(digits) : Number.NaN;
    if (!Number.isFinite(n) || n > 100 || n < 0 || (!allowZero && n === 0)) throw new InvalidArgumentError(`${flag} ${displayText(v, 32)}: give a percentage ${allowZero ? 'from 0' : 'above 0'} up to 100%, in digits (e.g. 10% or 12.5%)`);
    return n / 100;
  });
}

/** The chunk cache of serve and mount: up to 64 GiB (0: none). */
const MAX_CACHE_BYTES = 64 * 1024 ** 3;

/** A retention count: bounded far above any real policy, so that a typo is caught rather than kept. */
const MAX_KEEP = 1_000_000;

function countOption(rule: string): Option {
  return new Option(`--keep-${rule} <n>`, `keep ${rule === 'last' ? 'the n newest backups' : `the newest backup of each of the n newest ${rule === 'daily' ? 'days' : rule.replace(/ly$/, 's')} that have one (UTC)`}`).argParser(integerParser(`--keep-${rule}`, 0, MAX_KEEP));
}

/** SIGINT/SIGTERM stop the running operation cleanly (cli/interrupt.ts); exit code 130. */
function interruptSignal(): AbortSignal {
  return processInterruptSignal({ json: () => jsonMode });
}

function buildProgram(): Command {
  const program = new Command('engine')
    .description('Block-level, deduplicating backups of VM disks (oVirt, KVM/libvirt)')
    .version(ENGINE_VERSION)
    .option('--debug', 'print stack traces with errors')
    .exitOverride()
    // Commander's own errors follow the same rules as ours: one line "engine: …", nothing on stderr with --json.
    .configureOutput({
      writeErr: (text) => {
        if (!jsonMode) process.stderr.write(text);
      },
      outputError: (text, write) => write(`engine: ${text.replace(/^error: /, '')}`),
    });

  program
    .command('init')
    .description('create a repository')
    .argument('<repo>', 'directory to create (must be new or empty)')
    .option('--block-size <size>', 'fixed block size, a power of two from 64K to 16M (default 1M)')
    .option('--encrypt', 'encrypt the repository (AES-256-GCM, keyed chunk ids) under a passphrase of 8 characters or more from --password-file, $ENGINE_PASSWORD_FILE or $ENGINE_PASSWORD')
    .addOption(passwordFileOption())
    .option('--json', 'print the repository config as JSON')
    .action(async (repo: string, opts: { blockSize?: string; encrypt?: boolean; passwordFile?: string; json?: boolean }) => {
      jsonMode = opts.json === true;
      if (!opts.encrypt && opts.passwordFile !== undefined) throw new InvalidArgumentError('--password-file is for an encrypted repository: add --encrypt');
      const passphrase = opts.encrypt ? await loadPassphrase(opts.passwordFile) : undefined;
      if (opts.encrypt && passphrase === undefined) throw new InvalidArgumentError('--encrypt needs a passphrase: give --password-file FILE, or set ENGINE_PASSWORD_FILE or ENGINE_PASSWORD');
      const config = await engine.initRepository(repo, { blockSize: opts.blockSize === undefined ? undefined : sizeArgument('--block-size', opts.blockSize, 0, Number.MAX_SAFE_INTEGER), passphrase });
      if (jsonMode) printJson(config);
      else printInit(repo, config);
    });

  program
    .command('backup')
    .description('back up one or more disks of a VM as one backup')
    .addOption(repoOption())
    .option('--source <path|uri>', 'raw image, block device or NBD URI, read whole; repeat for each disk', collect)
    .option('--image <qcow2>', "qcow2 image of a stopped VM: incremental and differential backups from its dirty bitmaps; repeat for each disk", collect)
    .option('--libvirt <domain>', 'a running libvirt domain: all its disks, through checkpoints and a pull-mode backup')
    .option('--ovirt <url>', 'an oVirt engine (https://engine.example.org): back up --vm through its incremental backup API, or with --appliance through this backup appliance')
    .option('--vm <name>', 'with --ovirt: the VM to back up')
    .option('--appliance <name>', 'with --ovirt: the name of this backup appliance VM (the disk-attachment flow: full backups)')
    .addOption(new Option('--device-root <dir>', 'with --ovirt: where attached disks appear by serial').default('/dev/disk/by-id').argParser(localPath('--device-root')))
    .addOption(ovirtCredentialsOption())
    .addOption(new Option('--ca-file <pem>', "with --ovirt: the engine's CA certificate").argParser(localPath('--ca-file')))
    .addOption(insecureHttpOption())
    .option('--disk-name <name>', 'name of each disk in the backup, for every --source then every --image (default: the file name)', collect)
    .option('--name <name>', 'name of the backup; a chain continues from the newest backup of the same name (default: the file name)')
    .addOption(new Option('--full', 'read every disk whole and start a new chain').conflicts(['incremental', 'differential', 'auto']))
    .addOption(new Option('--incremental', 'read the blocks changed since the previous backup').conflicts(['differential', 'auto']))
    .addOption(new Option('--differential', 'read the blocks changed since the last full backup').conflicts(['auto']))
    .option('--auto', 'incremental where a valid chain exists, full otherwise (the default)')
    .option('--json', 'print only the result, as JSON')
    .addOption(workersOption('hash and compress the blocks read'))
    .addOption(passwordFileOption())
    .action(async (opts: BackupCliOptions) => {
      jsonMode = opts.json === true;
      const passphrase = await loadPassphrase(opts.passwordFile);
      if (opts.ovirt !== undefined) {
        if ((opts.source ?? []).length + (opts.image ?? []).length > 0 || opts.libvirt !== undefined) {
          throw new InvalidArgumentError('--ovirt backs up a VM through its snapshot: do not combine it with --source, --image or --libvirt');
        }
        if (!opts.vm) throw new InvalidArgumentError('--ovirt needs --vm NAME (the VM to back up)');
        const progress = createProgress({ json: jsonMode });
        const common = {
          repo: requireRepo(opts.repo),
          passphrase,
          ovirt: await ovirtConnection({ ...opts, ovirt: opts.ovirt }),
          vm: opts.vm,
          workers: opts.workers,
          signal: interruptSignal(),
          onProgress: (p: { disk: string; diskIndex: number; diskCount: number; bytesDone: number; bytesTotal: number }) =>
            progress.update(`backup ${p.disk} (${p.diskIndex + 1}/${p.diskCount})`, p.bytesDone, p.bytesTotal),
          onNotice: printNotice,
        };
        if (opts.appliance !== undefined && (opts.incremental || opts.differential)) {
          throw new InvalidArgumentError('the disk-attachment flow (--appliance) makes full backups; leave out --appliance for incremental ones');
        }
        const { record } =
          opts.appliance !== undefined
            ? await engine.ovirtApplianceBackup({ ...common, appliance: opts.appliance, deviceRoot: opts.deviceRoot })
            : await engine.ovirtIncrementalBackup({ ...common, mode: opts.full ? 'full' : opts.incremental ? 'incremental' : opts.differential ? 'differential' : 'auto' });
        progress.done();
        if (jsonMode) printJson(backupJson(record));
        else printBackup(forTerminal(record));
        return;
      }
      if ((opts.source ?? []).length + (opts.image ?? []).length === 0 && opts.libvirt === undefined) {
        throw new InvalidArgumentError('name at least one disk: --source PATH|URI, --image QCOW2 or --libvirt DOMAIN');
      }
      const progress = createProgress({ json: jsonMode });
      const { record } = await engine.backup({
        repo: requireRepo(opts.repo),
        passphrase,
        sources: opts.source,
        images: opts.image,
        libvirt: opts.libvirt,
        mode: opts.full ? 'full' : opts.incremental ? 'incremental' : opts.differential ? 'differential' : 'auto',
        diskNames: opts.diskName,
        name: opts.name,
        workers: opts.workers,
        signal: interruptSignal(),
        onProgress: (p) => progress.update(`backup ${p.disk} (${p.diskIndex + 1}/${p.diskCount})`, p.bytesDone, p.bytesTotal),
        onNotice: printNotice,
      });
      progress.done();
      if (jsonMode) printJson(backupJson(record));
      else printBackup(forTerminal(record));
    });

  program
    .command('list')
    .description('list the backups in a repository, oldest first')
    .addOption(repoOption())
    .addOption(passwordFileOption())
    .option('--json', 'print JSON')
    .action(async (opts: { repo?: string; passwordFile?: string; json?: boolean }) => {
      jsonMode = opts.json === true;
      const { backups, damaged } = await engine.listBackups(requireRepo(opts.repo), { passphrase: await loadPassphrase(opts.passwordFile) });
      if (jsonMode) printJson({ backups: backups.map(backupJson), damaged });
      else printList(forTerminal(backups), forTerminal(damaged));
    });

  program
    .command('show')
    .description('show one backup')
    .addOption(repoOption())
    .argument('<backup-id>', 'backup id or a unique prefix of it')
    .addOption(passwordFileOption())
    .option('--json', 'print JSON')
    .action(async (id: string, opts: { repo?: string; passwordFile?: string; json?: boolean }) => {
      jsonMode = opts.json === true;
      const record = await engine.showBackup(requireRepo(opts.repo), id, { passphrase: await loadPassphrase(opts.passwordFile) });
      if (jsonMode) printJson(backupJson(record));
      else printShow(forTerminal(record));
    });

  program
    .command('restore')
    .description('restore a backup to a new raw file, an existing file or a block device')
    .addOption(repoOption())
    .argument('<backup-id>', 'backup id or a unique prefix of it')
    .option('--disk <name>', 'the disk to restore (needed when the backup has several, unless --to is a directory)')
    .option('--to <path|uri>', 'target: a new file (created sparse), an existing file or block device at least as large, a directory, or an NBD URI (nbd://host[:port]/export, nbd+unix:///export?socket=PATH) of an existing export')
    .option('--to-qcow2 <file>', 'restore into a new qcow2 image (created at the disk\'s size, written through qemu-nbd)')
    .option('--only-changed', 'rollback: read the existing target back and write only the blocks that differ from the backup')
    .option('--since-bitmap <name>', 'with --only-changed and an NBD target: write only the blocks this dirty bitmap (the checkpoint of a backup of this disk) and the maps say changed, without reading the target')
    .option('--force', 'overwrite what holds data: a block device with a filesystem, partition table or volume signature, same-named files in the directory restored into, the backup\'s own source')
    .option('--ovirt <url>', 'restore into oVirt through this backup appliance (with --new-vm or --to-vm)')
    .option('--new-vm <name>', 'with --ovirt: create this VM from the backup\'s OVF, with new disks holding the restore point')
    .option('--to-vm <name>', 'with --ovirt and --disk: restore one disk into a new disk of this existing VM')
    .option('--cluster <name>', 'with --new-vm: the cluster (default: Default)')
    .option('--storage-domain <name>', 'with --ovirt: where the new disks go (default: the active data domain with the most room in the data centre of the cluster)')
    .option('--keep-disk-ids', 'with --new-vm: give the new disks their original ids (the OVF import then attaches them itself)')
    .option('--appliance <name>', 'with --ovirt: the name of this backup appliance VM')
    .addOption(new Option('--device-root <dir>', 'with --ovirt: where attached disks appear by serial').default('/dev/disk/by-id').argParser(localPath('--device-root')))
    .addOption(new Option('--via <how>', 'with --ovirt: write through the appliance, or upload through an imageio transfer').choices(['appliance', 'transfer']).default('appliance'))
    .addOption(ovirtCredentialsOption())
    .option('--ca-file <pem>', "with --ovirt: the engine's CA certificate", localPath('--ca-file'))
    .addOption(insecureHttpOption())
    .option('--json', 'print only the result, as JSON')
    .addOption(workersOption('read and check the chunks (decrypt, decompress, hash) before they are written'))
    .addOption(passwordFileOption())
    .action(async (id: string, opts: RestoreCliOptions) => {
      jsonMode = opts.json === true;
      const passphrase = await loadPassphrase(opts.passwordFile);
      if (opts.ovirt !== undefined) {
        if (opts.via !== 'transfer' && !opts.appliance) throw new InvalidArgumentError('--ovirt needs --appliance NAME (this backup appliance), or --via transfer');
        const result = await engine.ovirtRestoreVm({
          repo: requireRepo(opts.repo),
          passphrase,
          ovirt: await ovirtConnection({ ...opts, ovirt: opts.ovirt }),
          backupId: id,
          appliance: opts.appliance,
          via: opts.via === 'transfer' ? 'transfer' : 'appliance',
          newVm: opts.newVm,
          toVm: opts.toVm,
          disk: opts.disk,
          cluster: opts.cluster,
          storageDomain: opts.storageDomain,
          keepDiskIds: opts.keepDiskIds,
          deviceRoot: opts.deviceRoot,
          signal: interruptSignal(),
          onNotice: printNotice,
        });
        if (jsonMode) printJson(result);
        else {
          const shown = forTerminal(result);
          process.stdout.write(`restored backup ${shown.backup} into VM ${shown.vm.name} (${shown.vm.id}): ${shown.disks.map((d) => `${d.name} → disk ${d.id}`).join(', ')}\n`);
        }
        return;
      }
      if ((opts.to === undefined) === (opts.toQcow2 === undefined)) throw new InvalidArgumentError('give exactly one target: --to PATH|URI or --to-qcow2 FILE');
      const progress = createProgress({ json: jsonMode });
      const result = await engine.restore({
        repo: requireRepo(opts.repo),
        passphrase,
        backupId: id,
        disk: opts.disk,
        to: opts.to ?? '',
        toQcow2: opts.toQcow2,
        onlyChanged: opts.onlyChanged,
        sinceBitmap: opts.sinceBitmap,
        force: opts.force,
        workers: opts.workers,
        signal: interruptSignal(),
        onProgress: (p) => progress.update(`restore ${p.disk}`, p.bytesDone, p.bytesTotal),
      });
      progress.done();
      if (jsonMode) printJson(restoreJson(result));
      else printRestore(forTerminal(result));
    });

  program
    .command('verify')
    .description('check the repository; exits 4 and names every problem it finds')
    .addOption(repoOption())
    .option('--read-data', 're-read and re-hash every chunk of every pack')
    .addOption(percentOption('--subset <percent>', 'with --read-data: read only this share of the packs (e.g. 10%), chosen by --seed', false))
    .option('--seed <text>', 'with --subset: what chooses the packs (default: random, printed)')
    .option('--json', 'print JSON')
    .addOption(workersOption('re-read and check the chunks with --read-data'))
    .addOption(passwordFileOption())
    .action(async (opts: { repo?: string; readData?: boolean; subset?: number; seed?: string; json?: boolean; workers?: number; passwordFile?: string }) => {
      jsonMode = opts.json === true;
      if ((opts.subset !== undefined || opts.seed !== undefined) && !opts.readData) throw new InvalidArgumentError('--subset and --seed choose which packs --read-data reads: give --read-data too');
      const progress = createProgress({ json: jsonMode });
      const report = await engine.verify({
        repo: requireRepo(opts.repo),
        passphrase: await loadPassphrase(opts.passwordFile),
        readData: opts.readData,
        subset: opts.subset,
        seed: opts.seed,
        workers: opts.workers,
        signal: interruptSignal(),
        onProgress: (p) => progress.update(p.phase, p.done, p.total, 'items'),
      });
      progress.done();
      if (jsonMode) printJson(report);
      else printVerify(forTerminal(report));
      if (!report.ok) process.exitCode = EXIT.integrity;
    });

  program
    .command('serve')
    .description('serve a backup\'s disks over NBD (one export per disk, named after it) until SIGINT/SIGTERM; a private Unix socket by default, TCP only with TLS')
    .addOption(repoOption())
    .argument('<backup-id>', 'backup id or a unique prefix of it')
    .option('--disk <name>', 'serve only this disk')
    .option('--socket <path>', 'listen on this Unix socket, created 0600 (default: $ENGINE_RUN_DIR/serve-<id>.sock, ENGINE_RUN_DIR defaulting to /run/engine)')
    .option('--port <n>', 'listen on this TCP port (0: any free port); needs --tls-certificates or --tls-psk-file, or --insecure', integerParser('--port', 0, 65535))
    .option('--host <address>', 'with --port: the address to listen on (default 127.0.0.1)')
    .option('--tls-certificates <dir>', 'TLS with client certificates: DIR holds ca-cert.pem, server-cert.pem and server-key.pem (the layout of qemu and nbdkit); clients need a certificate signed by ca-cert.pem')
    .option('--tls-psk-file <file>', 'TLS with pre-shared keys: FILE holds username:hexkey lines (psktool\'s format, as qemu and nbdkit read it)')
    .option('--insecure', 'with --port: serve without TLS; anyone who can connect reads (and with --writable writes) the disks')
    .option('--writable', 'accept writes into a temporary copy-on-write overlay (instant recovery); the backup is never changed')
    .option('--overlay-dir <dir>', 'with --writable: where the overlay file lives (default: the system temporary directory)')
    .option('--cache <size>', 'chunk cache size (default 64M)')
    .option('--json', 'print the exports as JSON once listening')
    .addOption(workersOption('read and check the chunks before they are served', '2'))
    .addOption(passwordFileOption())
    .action(async (id: string, opts: { repo?: string; disk?: string; socket?: string; port?: number; host?: string; tlsCertificates?: string; tlsPskFile?: string; insecure?: boolean; writable?: boolean; overlayDir?: string; cache?: string; json?: boolean; workers?: number; passwordFile?: string }) => {
      jsonMode = opts.json === true;
      const handle = await engine.serve({
        repo: requireRepo(opts.repo),
        backupId: id,
        disk: opts.disk,
        socket: opts.socket,
        port: opts.port,
        host: opts.host,
        tls: { certificates: opts.tlsCertificates, pskFile: opts.tlsPskFile },
        insecure: opts.insecure,
        writable: opts.writable,
        overlayDir: opts.overlayDir,
        cacheBytes: opts.cache === undefined ? undefined : sizeArgument('--cache', opts.cache, 0, MAX_CACHE_BYTES),
        workers: opts.workers,
        passphrase: await loadPassphrase(opts.passwordFile),
        // A server's log is its only voice: stderr, with or without --json.
        onLog: (message) => process.stderr.write(`engine serve: ${terminalLine(message)}\n`),
      });
      if (jsonMode) printJson(serveJson(handle));
      else printServe(forTerminal(handle));
      await new Promise<void>((resolve) => {
        process.once('SIGINT', resolve);
        process.once('SIGTERM', resolve);
      });
      await handle.close();
    });

  program
    .command('mount')
    .description('mount a backup\'s filesystems read-only under a directory (file-level restore); undo with engine umount')
    .addOption(repoOption())
    .argument('<backup-id>', 'backup id or a unique prefix of it')
    .argument('<dir>', 'an empty (or new) directory: <dir>/<disk>/ or <dir>/<disk>/p<N>/ per filesystem')
    .option('--disk <name>', 'mount only this disk')
    .option('--cache <size>', 'chunk cache of the background server (default 64M)')
    .addOption(passwordFileOption())
    .option('--json', 'print JSON')
    .action(async (id: string, dir: string, opts: { repo?: string; disk?: string; cache?: string; json?: boolean; passwordFile?: string }) => {
      jsonMode = opts.json === true;
      const passphrase = await loadPassphrase(opts.passwordFile);
      const result = await engine.mount({ repo: requireRepo(opts.repo), backupId: id, dir, disk: opts.disk, cacheBytes: opts.cache === undefined ? undefined : sizeArgument('--cache', opts.cache, 0, MAX_CACHE_BYTES), passphrase });
      if (jsonMode) printJson(result);
      else printMount(forTerminal(result));
    });

  program
    .command('umount')
    .description('undo engine mount: filesystems, loop devices, nbdfuse, the background server and its registration')
    .argument('<dir>', 'the directory given to engine mount')
    .option('--json', 'print JSON')
    .action(async (dir: string, opts: { json?: boolean }) => {
      jsonMode = opts.json === true;
      const result = await engine.umount({ dir });
      if (jsonMode) printJson(result);
      else process.stdout.write(`unmounted ${terminalLine(result.dir)}: ${count(result.unmounted, 'filesystem')}, ${count(result.loopDevicesDetached, 'loop device')}, ${count(result.fuseStopped, 'disk file')}, server ${result.serverStopped ? 'stopped' : 'was not running'}\n`);
    });

  const prunes = program
    .command('prune')
    .description('remove the backups a retention policy does not keep (per backup name); gc then reclaims their space')
    .addOption(repoOption());
  for (const rule of KEEP_RULES) prunes.addOption(countOption(rule));
  prunes
    .option('--dry-run', 'say what would be removed, remove nothing')
    .addOption(passwordFileOption())
    .option('--json', 'print JSON')
    .action(async (opts: { repo?: string; dryRun?: boolean; json?: boolean; passwordFile?: string } & Record<string, unknown>) => {
      jsonMode = opts.json === true;
      const policy: RetentionPolicy = {};
      for (const rule of KEEP_RULES) {
        const value = opts[`keep${rule[0]!.toUpperCase()}${rule.slice(1)}`];
        if (typeof value === 'number') policy[rule] = value;
      }
      const report = await engine.prune({ repo: requireRepo(opts.repo), policy, dryRun: opts.dryRun, passphrase: await loadPassphrase(opts.passwordFile), signal: interruptSignal() });
      if (jsonMode) printJson(report);
      else printPrune(forTerminal(report));
    });

  for (const wanted of [true, false]) {
    program
      .command(wanted ? 'protect' : 'unprotect')
      .description(wanted ? 'protect a backup: prune never removes it' : 'let prune remove a backup again')
      .addOption(repoOption())
      .argument('<backup-id>', 'backup id or a unique prefix of it')
      .addOption(passwordFileOption())
      .option('--json', 'print JSON')
      .action(async (id: string, opts: { repo?: string; json?: boolean; passwordFile?: string }) => {
        jsonMode = opts.json === true;
        const result = await engine.setProtection(requireRepo(opts.repo), id, wanted, { passphrase: await loadPassphrase(opts.passwordFile) });
        if (jsonMode) printJson(result);
        else printProtect(forTerminal(result));
      });
  }

  program
    .command('gc')
    .description('delete chunks no backup references and rewrite sparse packs; safe while a backup runs')
    .addOption(repoOption())
    .addOption(percentOption('--rewrite-below <percent>', 'rewrite packs whose live share is under this (default 50%)', true))
    .option('--dry-run', 'say what would be deleted and rewritten, change nothing')
    .addOption(passwordFileOption())
    .option('--json', 'print JSON')
    .action(async (opts: { repo?: string; rewriteBelow?: number; dryRun?: boolean; json?: boolean; passwordFile?: string }) => {
      jsonMode = opts.json === true;
      const report = await engine.gc({
        repo: requireRepo(opts.repo),
        passphrase: await loadPassphrase(opts.passwordFile),
        rewriteBelow: opts.rewriteBelow,
        dryRun: opts.dryRun,
        signal: interruptSignal(),
        onNotice: printNotice,
      });
      if (jsonMode) printJson(report);
      else printGc(forTerminal(report));
    });

  program
    .command('repair')
    .description('re-read every frame, rebuild the index from the good ones, set damaged chunks aside; exits 4 if a backup still references damaged data')
    .addOption(repoOption())
    .addOption(passwordFileOption())
    .option('--json', 'print JSON')
    .addOption(workersOption('re-read and check every frame'))
    .action(async (opts: { repo?: string; json?: boolean; workers?: number; passwordFile?: string }) => {
      jsonMode = opts.json === true;
      const progress = createProgress({ json: jsonMode });
      const report = await engine.repair({ repo: requireRepo(opts.repo), passphrase: await loadPassphrase(opts.passwordFile), workers: opts.workers, signal: interruptSignal(), onProgress: (p) => progress.update(p.phase, p.done, p.total, 'items') });
      progress.done();
      if (jsonMode) printJson(report);
      else printRepair(forTerminal(report));
      if (!report.ok) process.exitCode = EXIT.integrity;
    });

  program
    .command('unlock')
    .description('say what holds the repository and remove stale locks and registrations; --force also those that cannot be proven stale (another host\'s, an older engine\'s)')
    .addOption(repoOption())
    .option('--force', 'also remove a lock whose holder cannot be proven gone (another host, an older engine, even a running process): only when you know it no longer works on the repository')
    .option('--json', 'print JSON')
    .action(async (opts: { repo?: string; force?: boolean; json?: boolean }) => {
      jsonMode = opts.json === true;
      const report = await engine.unlock({ repo: requireRepo(opts.repo), force: opts.force });
      if (jsonMode) printJson(report);
      else (await import('./output-resilience.js')).printUnlock(forTerminal(report));
      if (report.locked) process.exitCode = EXIT.locked;
    });

  program
    .command('forget')
    .description('remove one backup by id, also one whose record is damaged (prune removes by policy); gc then reclaims its space')
    .addOption(repoOption())
    .argument('<backup-id>', 'backup id or a unique prefix of it')
    .option('--force', 'forget a damaged record even when the index holds a good copy that engine repair would restore')
    .addOption(passwordFileOption())
    .option('--json', 'print JSON')
    .action(async (id: string, opts: { repo?: string; force?: boolean; json?: boolean; passwordFile?: string }) => {
      jsonMode = opts.json === true;
      const result = await engine.forget({ repo: requireRepo(opts.repo), backupId: id, force: opts.force, passphrase: await loadPassphrase(opts.passwordFile) });
      if (jsonMode) printJson(result);
      else (await import('./output-resilience.js')).printForget(forTerminal(result));
    });

  const ovirt = program.command('ovirt').description('oVirt housekeeping');
  ovirt
    .command('cleanup')
    .description('remove the snapshots and disk attachments that interrupted oVirt backups left (from the repository journal)')
    .addOption(repoOption())
    .requiredOption('--ovirt <url>', 'the oVirt engine')
    .addOption(ovirtCredentialsOption())
    .option('--ca-file <pem>', "the engine's CA certificate", localPath('--ca-file'))
    .addOption(insecureHttpOption())
    .option('--json', 'print JSON')
    .action(async (opts: { repo?: string; ovirt: string; ovirtCredentials?: string; caFile?: string; insecureHttp?: boolean; json?: boolean }) => {
      jsonMode = opts.json === true;
      const messages: string[] = [];
      const removed = await engine.ovirtCleanup({
        repo: requireRepo(opts.repo),
        ovirt: await ovirtConnection(opts),
        onNotice: (m) => messages.push(m),
      });
      if (jsonMode) printJson({ removed, messages });
      else process.stdout.write(`${[...messages.map(terminalLine), `removed ${count(removed, 'leftover resource')}`].join('\n')}\n`);
    });

  program
    .command('bench')
    .description('micro-benchmark of the primitives on this machine (SHA-256, xxh64, lz4, zero check, HMAC-SHA256, AES-256-GCM) per thread, and of the pipeline with 1..N workers, in MB/s')
    .option('--json', 'print JSON')
    .action(async (opts: { json?: boolean }) => {
      jsonMode = opts.json === true;
      const { rows, pipeline, markdown } = await engine.primitivesReport();
      if (jsonMode) printJson({ rows, pipeline });
      else process.stdout.write(markdown);
    });

  program
    .command('demo')
    .description('the quick start: generate a VM-like disk, back it up twice, restore, compare, verify')
    .option('--dir <path>', 'work directory to keep (default: a temporary one, removed afterwards)')
    .option('--size <size>', 'image size (default 512M + 4097 bytes)')
    .action(async (opts: { dir?: string; size?: string }) => {
      const result = await engine.runDemo({
        dir: opts.dir,
        size: opts.size === undefined ? undefined : sizeArgument('--size', opts.size, 1, 1024 ** 4),
        signal: interruptSignal(),
        onStep: (message) => process.stdout.write(`demo: ${terminalLine(message)}\n`),
      });
      process.stdout.write(`demo: done; ${count(result.backups.length, 'backup')} restored byte for byte, repository verified\n`);
    });

  program
    .command('completion')
    .description('print a shell completion script (engine completion bash > /etc/bash_completion.d/engine)')
    .argument('<shell>', 'bash')
    .action(async (shell: string) => {
      if (shell !== 'bash') throw new InvalidArgumentError(`completion for ${JSON.stringify(shell)} is not available; only bash is`);
      const { bashCompletion } = await import('./completion.js');
      process.stdout.write(bashCompletion(program));
    });

  return program;
}

function reportError(error: unknown, debug: boolean): number {
  if (error instanceof CommanderError) {
    if (error.exitCode === 0) return EXIT.ok;
    if (jsonMode) printJson({ error: { code: 'ENGINE_INVALID_ARGUMENT', message: error.message.replace(/^error: /, ''), details: {} } });
    return EXIT.usage;
  }
  const engineError = error instanceof EngineError ? error : undefined;
  const code = engineError?.code;
  // One line whatever the source (a tool's stderr, a library's multi-line text): the contract of SPEC 14.
  const message = (error instanceof Error ? error.message : String(error)).replace(/\s*\n\s*/g, ' ').trim();
  if (jsonMode) {
    printJson({ error: { code: code ?? 'ENGINE_INTERNAL', message, details: engineError?.details ?? {} } });
  } else {
    process.stderr.write(`engine: ${terminalLine(message)}\n`);
    if (debug && error instanceof Error && error.stack) process.stderr.write(`${error.stack}\n`);
  }
  return exitCodeFor(code);
}

export async function main(argv: string[]): Promise<number> {
  // Known before parsing, so that even a usage error is reported as JSON.
  jsonMode = argv.includes('--json');
  // What the repository does on its own (a stale lock broken, a read-only repository read without the
  // lock, the space reserve used, a key file others can read) is said by every command, on stderr, escaped;
  // with --json, stderr stays empty.
  setNoticeSink(printNotice);
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return typeof process.exitCode === 'number' ? process.exitCode : EXIT.ok;
  } catch (error) {
    return reportError(error, (program.opts() as GlobalOptions).debug === true);
  }
}

process.exitCode = await main(process.argv);
