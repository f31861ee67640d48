/** engine server: the service API (engine/server/), and `server token add` for its tokens file. */
import { Command, Option } from 'commander';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { terminalLine } from '../terminal.js';
import { printJson } from '../output.js';
import { interruptSignal, output } from '../context.js';
import * as opt from '../options.js';

export function registerServerCommand(program: Command): void {
  const server = program
    .command('server')
    .description('run the service API (REST, Server-Sent Events) for the repositories of --config until SIGINT/SIGTERM: jobs, catalogue, statistics')
    .option('--config <file>', 'the server config (JSON): repositories by name, state directory, limits, tokens file', opt.localPath('--config'))
    .option('--listen <host:port>', 'listen on this TCP address (default 127.0.0.1:8400); other than loopback needs --tls-cert, --tls-key and a tokens file, or --insecure')
    .option('--socket <path>', 'listen on this Unix socket instead, created 0600', opt.localPath('--socket'))
    .option('--tls-cert <pem>', "HTTPS: the server's certificate (chain)", opt.localPath('--tls-cert'))
    .option('--tls-key <pem>', "HTTPS: the certificate's private key", opt.localPath('--tls-key'))
    .option('--insecure', 'listen on a non-loopback address without TLS or tokens: said loudly on every start')
    .option('--json', 'print where it listens as JSON once listening')
    .action(async (opts: { config?: string; listen?: string; socket?: string; tlsCert?: string; tlsKey?: string; insecure?: boolean; json?: boolean }) => {
      output.json = opts.json === true;
      if (opts.config === undefined) throw new InvalidArgumentError('engine server needs --config FILE (repositories, state directory, limits)');
      if ((opts.tlsCert === undefined) !== (opts.tlsKey === undefined)) throw new InvalidArgumentError('give --tls-cert and --tls-key together');
      const signal = interruptSignal();
      const { startServer } = await import('../../engine/server/server.js');
      // Tests drive the policies' clock through a file holding the time (engine/server/policies/clock.ts).
      const clockFile = process.env.ENGINE_SERVER_TEST_CLOCK;
      const clock = clockFile ? await (await import('../../engine/server/policies/clock.js')).FileClock.open(clockFile) : undefined;
      const handle = await startServer({
        config: opts.config,
        listen: opts.listen,
        socket: opts.socket,
        tls: opts.tlsCert !== undefined && opts.tlsKey !== undefined ? { cert: opts.tlsCert, key: opts.tlsKey } : undefined,
        insecure: opts.insecure,
        clock,
        // A server's log is its only voice: stderr, with or without --json (warnings included, on every start).
        onLog: (message) => process.stderr.write(`engine server: ${terminalLine(message)}\n`),
      });
      if (output.json) printJson({ url: handle.url, host: handle.host, port: handle.port, socket: handle.socket, tls: handle.tls, warnings: handle.warnings, pid: process.pid });
      else process.stdout.write(`engine server listening on ${handle.url} (pid ${process.pid})\n`);
      await new Promise<void>((resolve) => {
        if (signal.aborted) resolve();
        else signal.addEventListener('abort', () => resolve(), { once: true });
      });
      await handle.close();
    });

  server
    .command('token')
    .description("the server's bearer tokens")
    .command('add')
    .description('make a token, append its SHA-256 to the tokens file (created 0600) and print the token once')
    .addOption(new Option('--role <role>', 'read: the catalogue and jobs; operator: also start and cancel jobs').choices(['read', 'operator']).makeOptionMandatory())
    .requiredOption('--file <tokens>', 'the tokens file (the config\'s tokensFile)', opt.localPath('--file'))
    .option('--label <text>', 'who or what the token is for, shown as a job\'s startedBy', 'token')
    .option('--json', 'print JSON')
    .action(async (opts: { role: 'read' | 'operator'; file: string; label: string; json?: boolean }) => {
      // `server`'s own --json may have taken the flag (commander gives a parent's options precedence): main.ts set output.json from argv.
      if (opts.json) output.json = true;
      const { addToken } = await import('../../engine/server/auth.js');
      const { token } = await addToken(opts.file, opts.role, opts.label);
      if (output.json) printJson({ token, role: opts.role, label: opts.label, file: opts.file });
      else process.stdout.write(`${token}\n`);
      if (!output.json) process.stderr.write(`engine: added a ${opts.role} token to ${opts.file}; it is shown only this once\n`);
    });
}
