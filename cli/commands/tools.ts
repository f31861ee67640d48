/** The built-in jobs: bench, demo, completion. */
import { Command } from 'commander';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { terminalLine } from '../terminal.js';
import { count, printJson } from '../output.js';
import { engine } from '../engine-calls.js';
import { output, interruptSignal } from '../context.js';
import * as opt from '../options.js';

export function registerToolCommands(program: Command): void {
  program
    .command('bench')
    .description('micro-benchmark of the primitives on this machine (SHA-256, xxh64, lz4, zero check, HMAC-SHA256, AES-256-GCM) per thread, and of the pipeline with 1..N workers, in MB/s')
    .option('--json', 'print JSON')
    .option('--trial-ms <ms>', 'length of each of the 3 trials per row, in milliseconds (default 400; shorter is quicker and noisier)', opt.integerParser('--trial-ms', 10, 60_000))
    .action(async (opts: { json?: boolean; trialMs?: number }) => {
      output.json = opts.json === true;
      const { rows, pipeline, markdown } = await engine.primitivesReport(opts.trialMs);
      if (output.json) printJson({ rows, pipeline });
      else process.stdout.write(markdown);
    });

  program
    .command('demo')
    .description('the quick start: generate a VM-like disk, back it up twice, restore, compare, verify')
    .option('--dir <path>', 'work directory to keep (default: a temporary one, removed afterwards)', opt.localPath('--dir'))
    .option('--size <size>', 'image size (default 512M + 4097 bytes)')
    .action(async (opts: { dir?: string; size?: string }) => {
      const result = await engine.runDemo({
        dir: opts.dir,
        size: opts.size === undefined ? undefined : opt.sizeArgument('--size', opts.size, 1, 1024 ** 4),
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
      const { bashCompletion } = await import('../completion.js');
      process.stdout.write(bashCompletion(program));
    });
}
