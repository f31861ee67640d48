/**
 * What every command shares while it runs: whether output is JSON (one document on stdout, nothing on stderr),
 * notices on stderr, and the interruption signal of SIGINT/SIGTERM.
 */
import { forTerminal, terminalLine } from './terminal.js';
import { printJson } from './output.js';
import { interruptSignal as processInterruptSignal } from './interrupt.js';

export const output = { json: false };

/** A notice on stderr, one line, escaped; none with --json (stdout carries the one document, stderr nothing). */
export function printNotice(message: string): void {
  if (!output.json) process.stderr.write(`engine: ${terminalLine(message)}\n`);
}

/** SIGINT/SIGTERM stop the running operation cleanly (cli/interrupt.ts); exit code 130. */
export function interruptSignal(): AbortSignal {
  return processInterruptSignal({ json: () => output.json });
}

/** A command's result: the one JSON document with --json, else `print` given the result made safe for a terminal. */
export async function printResult<T>(result: T, print: (safe: T) => void | Promise<void>): Promise<void> {
  if (output.json) printJson(result);
  else await print(forTerminal(result));
}
