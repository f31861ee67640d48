/**
 * The retention policy: which backups `prune` keeps. restic's semantics (`forget --keep-*`), per group of
 * backups with the same name, newest first:
 *
 * - keep-last N keeps the N newest backups;
 * - keep-hourly/daily/weekly/monthly/yearly N: walking from the newest, a backup is kept when its period
 *   (UTC hour, day, ISO week, month, year of its start time) differs from that of the last backup this
 *   rule kept, until the rule has kept N; so the newest backup of each of the N newest periods that
 *   have one;
 * - when a period rule has kept fewer than N after the walk, the oldest backup of the group is kept too
 *   ("oldest daily" …), so that a young chain keeps its history (restic ≥ 0.16);
 * - a backup kept by several rules carries every reason; a protected backup is always kept ("protected").
 *
 * Pure: no I/O, so that it is tested on its own.
 */
export type PeriodRule = 'hourly' | 'daily' | 'weekly' | 'monthly' | 'yearly';
export type KeepRule = 'last' | PeriodRule;

export type RetentionPolicy = Partial<Record<KeepRule, number>>;

export const KEEP_RULES: readonly KeepRule[] = ['last', 'hourly', 'daily', 'weekly', 'monthly', 'yearly'];

export interface RetentionCandidate {
  id: string;
  name: string;
  startTime: string;
}

export interface RetentionDecision<T extends RetentionCandidate> {
  backup: T;
  keep: boolean;
  reasons: string[];
}

/** ISO 8601 week-numbering year and week of a UTC date, as "YYYY-Www". */
export function isoWeek(date: Date): string {
  const day = new Date(Date.UTC(date.getUTCFullYear(), date.getUTCMonth(), date.getUTCDate()));
  const weekday = day.getUTCDay() === 0 ? 7 : day.getUTCDay();
  // The Thursday of this week decides the year the week belongs to.
  day.setUTCDate(day.getUTCDate() + 4 - weekday);
  const yearStart = Date.UTC(day.getUTCFullYear(), 0, 1);
  const week = Math.ceil(((day.getTime() - yearStart) / 86_400_000 + 1) / 7);
  return `${day.getUTCFullYear()}-W${String(week).padStart(2, '0')}`;
}

export function periodOf(rule: PeriodRule, time: Date): string {
  const iso = time.toISOString();
  switch (rule) {
    case 'hourly':
      return iso.slice(0, 13);
    case 'daily':
      return iso.slice(0, 10);
    case 'weekly':
      return isoWeek(time);
    case 'monthly':
      return iso.slice(0, 7);
    case 'yearly':
      return iso.slice(0, 4);
  }
}

export function policyIsEmpty(policy: RetentionPolicy): boolean {
  return KEEP_RULES.every((rule) => (policy[rule] ?? 0) <= 0);
}

/** Decides every backup of every group. Output order: groups by name, each newest first. */
export function applyRetention<T extends RetentionCandidate>(backups: readonly T[], policy: RetentionPolicy, protectedIds: ReadonlySet<string>): RetentionDecision<T>[] {
  const groups = new Map<string, T[]>();
  for (const backup of backups) {
    const group = groups.get(backup.name) ?? [];
    group.push(backup);
    groups.set(backup.name, group);
  }
  const decisions: RetentionDecision<T>[] = [];
  for (const name of [...groups.keys()].sort()) {
    const group = groups.get(name)!.slice().sort((a, b) => b.startTime.localeCompare(a.startTime) || b.id.localeCompare(a.id));
    const left = new Map<KeepRule, number>(KEEP_RULES.map((rule) => [rule, Math.max(0, policy[rule] ?? 0)]));
    const lastPeriod = new Map<PeriodRule, string>();
    group.forEach((backup, n) => {
      const reasons: string[] = [];
      if (protectedIds.has(backup.id)) reasons.push('protected');
      if (left.get('last')! > 0) {
        reasons.push('last');
        left.set('last', left.get('last')! - 1);
      }
      const time = new Date(backup.startTime);
      const oldest = n === group.length - 1;
      for (const rule of KEEP_RULES) {
        if (rule === 'last' || left.get(rule)! <= 0) continue;
        const period = periodOf(rule, time);
        if (period !== lastPeriod.get(rule)) {
          reasons.push(rule);
          lastPeriod.set(rule, period);
          left.set(rule, left.get(rule)! - 1);
        } else if (oldest) {
          reasons.push(`oldest ${rule}`);
        }
      }
      decisions.push({ backup, keep: reasons.length > 0, reasons });
    });
  }
  return decisions;
}
