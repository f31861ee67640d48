/** oVirt housekeeping: ovirt cleanup. */
import { Command } from 'commander';
import { terminalLine } from '../terminal.js';
import { count, printJson } from '../output.js';
import { engine } from '../engine-calls.js';
import { output } from '../context.js';
import * as opt from '../options.js';

export function registerOvirtCommands(program: Command): void {
  const ovirt = program.command('ovirt').description('oVirt housekeeping');
  ovirt
    .command('cleanup')
    .description('remove the snapshots and disk attachments that interrupted oVirt backups left (from the repository journal)')
    .addOption(opt.repoOption())
    .requiredOption('--ovirt <url>', 'the oVirt engine')
    .addOption(opt.ovirtCredentialsOption())
    .option('--ca-file <pem>', "the engine's CA certificate", opt.localPath('--ca-file'))
    .addOption(opt.insecureHttpOption())
    .option('--json', 'print JSON')
    .action(async (opts: { repo?: string; ovirt: string; ovirtCredentials?: string; caFile?: string; insecureHttp?: boolean; json?: boolean }) => {
      output.json = opts.json === true;
      const messages: string[] = [];
      const removed = await engine.ovirtCleanup({
        repo: opt.requireRepo(opts.repo),
        ovirt: await opt.ovirtConnection(opts),
        onNotice: (m) => messages.push(m),
      });
      if (output.json) printJson({ removed, messages });
      else process.stdout.write(`${[...messages.map(terminalLine), `removed ${count(removed, 'leftover resource')}`].join('\n')}\n`);
    });
}
