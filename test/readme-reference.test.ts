/**
 * README's CLI reference names every option of every command: the options are read from the CLI's own
 * `--help`, so a new flag that the reference does not mention fails here (as `restore --storage-domain` once
 * went unmentioned). An option counts as named when a reference row of its command names it, or a row that
 * covers every command of its kind (`--ovirt URL … (every oVirt command)`), or the README says it holds for
 * every command (`--password-file`).
 */
import { readFile } from 'node:fs/promises';
import { describe, expect, test } from 'vitest';
import { runEngine } from './helpers.js';

const README = new URL('../README.md', import.meta.url);

async function optionsOf(command: string[]): Promise<string[]> {
  const help = await runEngine([...command, '--help']);
  expect(help.code).toBe(0);
  const options = [...help.stdout.matchAll(/^\s+(?:-\w, )?(--[a-z][a-z-]*)/gm)].map((m) => m[1]!);
  return [...new Set(options)].filter((o) => o !== '--help');
}

async function commands(): Promise<string[][]> {
  const help = (await runEngine(['--help'])).stdout;
  const names = [...help.split('Commands:')[1]!.matchAll(/^ {2}([a-z]+)/gm)].map((m) => m[1]!).filter((n) => n !== 'help');
  const out: string[][] = [];
  for (const name of names) {
    const sub = (await runEngine([name, '--help'])).stdout;
    const subcommands = sub.includes('Commands:') ? [...sub.split('Commands:')[1]!.matchAll(/^ {2}([a-z]+)/gm)].map((m) => m[1]!).filter((n) => n !== 'help') : [];
    if (subcommands.length === 0) out.push([name]);
    else for (const s of subcommands) out.push([name, s]);
  }
  return out;
}

describe("README's CLI reference", () => {
  test('names every option of every command', async () => {
    const readme = await readFile(README, 'utf8');
    const reference = readme.split('\n## CLI reference')[1]!.split('\n## ')[0]!;
    const rows = reference.split('\n').filter((line) => line.startsWith('| '));
    const forEvery = (option: string): boolean => new RegExp(`\`${option} [A-Z]+\` \\(every command`).test(readme);
    const missing: string[] = [];
    const all = await commands();
    expect(all.length).toBeGreaterThan(15);
    for (const command of all) {
      const name = command.join(' ');
      const own = rows.filter((row) => new RegExp(`\`engine ${name}[ \`]`).test(row.split(' | ')[0]!));
      expect(own.length, `a reference row for engine ${name}`).toBeGreaterThan(0);
      const options = await optionsOf(command);
      const oVirt = options.includes('--ovirt') ? rows.filter((row) => row.includes('(every oVirt command)')) : [];
      for (const option of options) {
        const named = [...own, ...oVirt].some((row) => new RegExp(`${option}(?![a-z-])`).test(row)) || forEvery(option);
        if (!named) missing.push(`engine ${name} ${option}`);
      }
    }
    expect(missing).toEqual([]);
  });
});
