/** Instant access: serve a backup over NBD, mount its filesystems, umount. */
import { Command } from 'commander';
import { forTerminal, terminalLine } from '../terminal.js';
import { count, printJson, printMount, printServe, printVmMount, serveJson } from '../output.js';
import { engine } from '../engine-calls.js';
import { interruptSignal, output, printResult } from '../context.js';
import * as opt from '../options.js';

export function registerInstantAccessCommands(program: Command): void {
  registerServe(program);
  registerMount(program);
  registerUmount(program);
}

function registerServe(program: Command): void {
  program
    .command('serve')
    .description('serve a backup\'s disks over NBD (one export per disk, named after it) until SIGINT/SIGTERM; a private Unix socket by default, TCP only with TLS')
    .addOption(opt.repoOption())
    .argument('<backup-id>', 'backup id or a unique prefix of it')
    .option('--disk <name>', 'serve only this disk')
    .option('--socket <path>', 'listen on this Unix socket, created 0600 (default: $ENGINE_RUN_DIR/serve-<id>.sock, ENGINE_RUN_DIR defaulting to /run/engine)', opt.localPath('--socket'))
    .option('--port <n>', 'listen on this TCP port (0: any free port); needs --tls-certificates or --tls-psk-file, or --insecure', opt.integerParser('--port', 0, 65535))
    .option('--host <address>', 'with --port: the address to listen on (default 127.0.0.1)')
    .option('--tls-certificates <dir>', 'TLS with client certificates: DIR holds ca-cert.pem, server-cert.pem and server-key.pem (the layout of qemu and nbdkit); clients need a certificate signed by ca-cert.pem', opt.localPath('--tls-certificates'))
    .option('--tls-psk-file <file>', 'TLS with pre-shared keys: FILE holds username:hexkey lines (psktool\'s format, as qemu and nbdkit read it)', opt.localPath('--tls-psk-file'))
    .option('--insecure', 'with --port: serve without TLS; anyone who can connect reads (and with --writable writes) the disks')
    .option('--writable', 'accept writes into a temporary copy-on-write overlay (instant recovery); the backup is never changed')
    .option('--overlay-dir <dir>', 'with --writable: where the overlay file lives (default: the system temporary directory)', opt.localPath('--overlay-dir'))
    .option('--cache <size>', 'chunk cache size (default 64M)')
    .option('--json', 'print the exports as JSON once listening')
    .addOption(opt.workersOption('read and check the chunks before they are served', '2'))
    .addOption(opt.passwordFileOption())
    .action(async (id: string, opts: { repo?: string; disk?: string; socket?: string; port?: number; host?: string; tlsCertificates?: string; tlsPskFile?: string; insecure?: boolean; writable?: boolean; overlayDir?: string; cache?: string; json?: boolean; workers?: number; passwordFile?: string }) => {
      output.json = opts.json === true;
      // SIGINT/SIGTERM while the repository is opened (a wait for the lease, the cache's catch-up) stops that too.
      const signal = interruptSignal();
      const handle = await engine.serve({
        signal,
        repo: opt.requireRepo(opts.repo),
        backupId: id,
        disk: opts.disk,
        socket: opts.socket,
        port: opts.port,
        host: opts.host,
        tls: { certificates: opts.tlsCertificates, pskFile: opts.tlsPskFile },
        insecure: opts.insecure,
        writable: opts.writable,
        overlayDir: opts.overlayDir,
        cacheBytes: opts.cache === undefined ? undefined : opt.sizeArgument('--cache', opts.cache, 0, opt.MAX_CACHE_BYTES),
        workers: opts.workers,
        passphrase: await opt.loadPassphrase(opts.passwordFile),
        // A server's log is its only voice: stderr, with or without --json.
        onLog: (message) => process.stderr.write(`engine serve: ${terminalLine(message)}\n`),
      });
      if (output.json) printJson(serveJson(handle));
      else printServe(forTerminal(handle));
      const signalled = new Promise<undefined>((resolve) => {
        if (signal.aborted) resolve(undefined);
        else signal.addEventListener('abort', () => resolve(undefined), { once: true });
      });
      // Version 3: a lost lease stops the server on its own (SPEC 19.9); the command then fails with it.
      const lost = await Promise.race([signalled, handle.lost]);
      await handle.close();
      if (lost) throw lost;
    });
}

function registerMount(program: Command): void {
  program
    .command('mount')
    .description('mount a backup\'s filesystems read-only under a directory (file-level restore); undo with engine umount')
    .addOption(opt.repoOption())
    .argument('<backup-id>', 'backup id or a unique prefix of it')
    .argument('<dir>', 'an empty (or new) directory: <dir>/<disk>/ or <dir>/<disk>/p<N>/ per filesystem')
    .option('--vm', 'through the file-restore appliance VM and FUSE (every filesystem engine files reads, LVM included; names as engine files ls)')
    .option('--disk <name>', 'mount only this disk')
    .option('--cache <size>', 'chunk cache of the background server (default 64M)')
    .addOption(opt.passwordFileOption())
    .option('--json', 'print JSON')
    .action(async (id: string, dir: string, opts: { repo?: string; vm?: boolean; disk?: string; cache?: string; json?: boolean; passwordFile?: string }) => {
      output.json = opts.json === true;
      const passphrase = await opt.loadPassphrase(opts.passwordFile);
      const options = { repo: opt.requireRepo(opts.repo), backupId: id, dir, disk: opts.disk, cacheBytes: opts.cache === undefined ? undefined : opt.sizeArgument('--cache', opts.cache, 0, opt.MAX_CACHE_BYTES), passphrase };
      if (opts.vm === true) await printResult(await engine.mountVm(options), printVmMount);
      else await printResult(await engine.mount(options), printMount);
    });
}

function registerUmount(program: Command): void {
  program
    .command('umount')
    .description('undo engine mount: filesystems, loop devices, nbdfuse, the background server (with --vm: the FUSE mount, its process and VM) and its registration')
    .argument('<dir>', 'the directory given to engine mount')
    .option('--json', 'print JSON')
    .action(async (dir: string, opts: { json?: boolean }) => {
      output.json = opts.json === true;
      const result = await engine.umount({ dir });
      if (output.json) printJson(result);
      else process.stdout.write(`unmounted ${terminalLine(result.dir)}: ${count(result.unmounted, 'filesystem')}, ${count(result.loopDevicesDetached, 'loop device')}, ${count(result.fuseStopped, 'disk file')}, server ${result.serverStopped ? 'stopped' : 'was not running'}\n`);
    });
}
