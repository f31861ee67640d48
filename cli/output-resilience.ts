/** Printing of `unlock` and `forget` (the JSON shapes are in SPEC.md, section 14.2). */
import type { UnlockReport } from '../engine/catalogue/unlock.js';
import type { ForgetResult } from '../engine/catalogue/forget.js';

export function printUnlock(report: UnlockReport): void {
  const lines: string[] = [];
  if (!report.lock) lines.push(`repository ${report.repo} is not locked`);
  else lines.push(report.lock.message);
  for (const r of report.registrations) lines.push(r.message);
  process.stdout.write(`${lines.join('\n')}\n`);
}

export function printForget(result: ForgetResult): void {
  const what = result.damaged === null ? `backup ${result.backup} ("${result.name}", ${result.startTime})` : `damaged backup ${result.backup} (its record: ${result.damaged})`;
  process.stdout.write(`forgot ${what}; \`engine gc\` reclaims the space of the chunks only it used\n`);
}
