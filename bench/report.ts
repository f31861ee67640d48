/** The shape every benchmark report shares: intro, body, targets, skipped peers; written as .md and .json. */
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

export function reportMarkdown(title: string, intro: string[], body: string, targets: string[], skipped: string[]): string {
  return [
    `# ${title} (${new Date().toISOString()})`,
    '',
    ...intro,
    '',
    body,
    '',
    '## Targets (reported, never enforced)',
    '',
    ...targets.map((t) => `- ${t}`),
    ...(skipped.length > 0 ? ['', '## Skipped', '', ...skipped.map((s) => `- ${s}`)] : []),
    '',
  ].join('\n');
}

/**
 * Prints the markdown and writes <prefix>-<time>.md, .json and any extra files into `outDir`, and the same
 * again as <prefix>-latest.* (what the README and SPEC link to; committed, the dated ones are not).
 */
export async function writeReport(outDir: string, prefix: string, markdown: string, data: unknown, extra: Record<string, string> = {}): Promise<void> {
  process.stdout.write(markdown);
  await mkdir(outDir, { recursive: true });
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  await writeFile(join(outDir, `${prefix}-${stamp}.json`), JSON.stringify(data, null, 2));
  await writeFile(join(outDir, `${prefix}-${stamp}.md`), markdown);
  for (const [extension, content] of Object.entries(extra)) await writeFile(join(outDir, `${prefix}-${stamp}.${extension}`), content);
  await writeFile(join(outDir, `${prefix}-latest.json`), JSON.stringify(data, null, 2));
  await writeFile(join(outDir, `${prefix}-latest.md`), markdown);
  for (const [extension, content] of Object.entries(extra)) await writeFile(join(outDir, `${prefix}-latest.${extension}`), content);
}

/**
 * The verdict of a target measured once or in several rounds: PASS only when every round meets it. A median
 * would let one round in two miss and still print PASS; a round that missed is never averaged away.
 * `rounds` holds the measured value of each round; `meets` says whether one value meets the target.
 */
export function verdict(rounds: readonly number[], meets: (value: number) => boolean): string {
  if (rounds.length === 0) return 'not measured';
  const met = rounds.filter((value) => meets(value)).length;
  if (rounds.length === 1) return met === 1 ? 'PASS' : 'MISS';
  return met === rounds.length ? `PASS (all ${rounds.length} rounds)` : `MISS (${met} of ${rounds.length} rounds)`;
}
