/**
 * Cron schedules (SPEC.md 23.1): the five fields of crontab(5) — minute, hour, day of month, month, day of
 * week — each `*`, a number, a name (jan…dec, sun…sat), a range `a-b`, a step `*\/n`, `a-b/n` or `a/n`
 * (a to the field's end), or a comma list of these; `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`
 * (`@annually`, `@midnight`) as crontab(5) defines them. Day of week 0 and 7 are Sunday. As in Vixie cron,
 * when both day fields are restricted (neither starts with `*`) a day matches when either does.
 *
 * Slots are wall-clock times of a time zone (IANA name, through Intl). Daylight saving time, as RFC 5545
 * and Temporal's `compatible` resolve local times:
 * - a wall time that does not exist (the hour skipped in spring) runs shifted forward by the gap's length
 *   (02:30 Europe/Berlin on the last Sunday of March runs at 03:30 CEST); a slot landing on one that exists
 *   already runs once;
 * - a wall time that exists twice (the hour repeated in autumn) runs once, at its first occurrence.
 *
 * Pure: no I/O, no clock of its own (the scheduler gives the instants).
 */
import { InvalidArgumentError } from '../../../repo-format/errors.js';

export interface CronSchedule {
  /** The expression as written. */
  source: string;
  minutes: readonly number[];
  hours: readonly number[];
  days: ReadonlySet<number>;
  months: ReadonlySet<number>;
  weekdays: ReadonlySet<number>;
  /** Whether the day-of-month and day-of-week fields were restricted (not starting with `*`). */
  daysRestricted: boolean;
  weekdaysRestricted: boolean;
}

const MONTHS = ['jan', 'feb', 'mar', 'apr', 'may', 'jun', 'jul', 'aug', 'sep', 'oct', 'nov', 'dec'];
const WEEKDAYS = ['sun', 'mon', 'tue', 'wed', 'thu', 'fri', 'sat'];
const MACROS: Record<string, string> = {
  '@yearly': '0 0 1 1 *',
  '@annually': '0 0 1 1 *',
  '@monthly': '0 0 1 * *',
  '@weekly': '0 0 * * 0',
  '@daily': '0 0 * * *',
  '@midnight': '0 0 * * *',
  '@hourly': '0 * * * *',
};
/** The most days each month can have (February: 29, in leap years). */
const MONTH_DAYS = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

interface Field {
  name: string;
  min: number;
  max: number;
  names?: readonly string[];
  /** Names count from this number (months from 1). */
  nameBase?: number;
}

const FIELDS: readonly Field[] = [
  { name: 'minute', min: 0, max: 59 },
  { name: 'hour', min: 0, max: 23 },
  { name: 'day of month', min: 1, max: 31 },
  { name: 'month', min: 1, max: 12, names: MONTHS, nameBase: 1 },
  { name: 'day of week', min: 0, max: 7, names: WEEKDAYS, nameBase: 0 },
];

function bad(expression: string, message: string): never {
  throw new InvalidArgumentError(`schedule ${JSON.stringify(expression.slice(0, 100))}: ${message}`, { field: 'schedule' });
}

function parseField(expression: string, text: string, field: Field): Set<number> {
  const values = new Set<number>();
  const value = (word: string): number => {
    const at = field.names?.indexOf(word.toLowerCase()) ?? -1;
    if (at >= 0) return at + field.nameBase!;
    if (!/^\d{1,2}$/.test(word)) bad(expression, `${field.name} ${JSON.stringify(word)} is not a number${field.names ? ' or a name' : ''}`);
    const n = Number(word);
    if (n < field.min || n > field.max) bad(expression, `${field.name} ${n} is outside ${field.min}-${field.max}`);
    return n;
  };
  for (const part of text.split(',')) {
    const match = /^([^/]+)(?:\/(\d{1,2}))?$/.exec(part);
    if (!match) bad(expression, `${field.name} ${JSON.stringify(part)}: expected *, a value, a range a-b, or one of these /step`);
    const [, range, stepText] = match;
    const step = stepText === undefined ? 1 : Number(stepText);
    if (step < 1) bad(expression, `${field.name} step ${stepText}: a step is 1 or more`);
    let from: number;
    let to: number;
    if (range === '*') [from, to] = [field.min, field.max];
    else if (range!.includes('-')) {
      const [a, b, ...rest] = range!.split('-');
      if (rest.length > 0 || a === '' || b === '') bad(expression, `${field.name} ${JSON.stringify(part)} is not a range a-b`);
      [from, to] = [value(a!), value(b!)];
      if (from > to) bad(expression, `${field.name} range ${range} runs backwards`);
    } else {
      from = value(range!);
      // `a/n`: from a to the field's end, every n (cronie's reading).
      to = stepText === undefined ? from : field.max;
    }
    for (let n = from; n <= to; n += step) values.add(n);
  }
  return values;
}

export function parseCron(expression: string): CronSchedule {
  const source = expression.trim();
  const text = MACROS[source.toLowerCase()] ?? source;
  if (text.startsWith('@')) bad(expression, `unknown macro (known: ${Object.keys(MACROS).join(', ')})`);
  const parts = text.split(/\s+/);
  if (parts.length !== 5 || parts[0] === '') bad(expression, `expected 5 fields (minute hour day-of-month month day-of-week), got ${parts[0] === '' ? 0 : parts.length}`);
  const [minutes, hours, days, months, weekdaysRaw] = parts.map((part, i) => parseField(expression, part, FIELDS[i]!));
  const weekdays = new Set([...weekdaysRaw!].map((d) => d % 7));
  const schedule: CronSchedule = {
    source,
    minutes: [...minutes!].sort((a, b) => a - b),
    hours: [...hours!].sort((a, b) => a - b),
    days: days!,
    months: months!,
    weekdays,
    daysRestricted: !parts[2]!.startsWith('*'),
    weekdaysRestricted: !parts[4]!.startsWith('*'),
  };
  // A schedule that can never run (31 February) is a mistake, not a policy that waits forever.
  const possible = [...schedule.months].some((m) => [...schedule.days].some((d) => d <= MONTH_DAYS[m - 1]!));
  if (!possible && !(schedule.daysRestricted && schedule.weekdaysRestricted)) bad(expression, 'no month of it has such a day: it would never run');
  return schedule;
}

/** Whether a calendar day (month 1-12) is one of the schedule's. */
function dayMatches(schedule: CronSchedule, year: number, month: number, day: number): boolean {
  if (!schedule.months.has(month)) return false;
  const weekday = new Date(Date.UTC(year, month - 1, day)).getUTCDay();
  const byDay = schedule.days.has(day);
  const byWeekday = schedule.weekdays.has(weekday);
  if (schedule.daysRestricted && schedule.weekdaysRestricted) return byDay || byWeekday;
  return byDay && byWeekday;
}

/** Whether a wall-clock time matches (the level rules' test of a slot). */
export function cronMatches(schedule: CronSchedule, wall: WallTime): boolean {
  return schedule.minutes.includes(wall.minute) && schedule.hours.includes(wall.hour) && dayMatches(schedule, wall.year, wall.month, wall.day);
}

// ---- Time zones ----

export interface WallTime {
  year: number;
  /** 1-12 */
  month: number;
  day: number;
  hour: number;
  minute: number;
  /** 0 Sunday … 6 Saturday */
  weekday: number;
}

const formatters = new Map<string, Intl.DateTimeFormat>();

function formatter(zone: string): Intl.DateTimeFormat {
  let f = formatters.get(zone);
  if (!f) {
    f = new Intl.DateTimeFormat('en-US', { timeZone: zone, hourCycle: 'h23', year: 'numeric', month: 'numeric', day: 'numeric', hour: 'numeric', minute: 'numeric', second: 'numeric' });
    formatters.set(zone, f);
  }
  return f;
}

/** Throws when Intl does not know the zone; its canonical name. */
export function checkTimeZone(zone: string): string {
  try {
    return new Intl.DateTimeFormat('en-US', { timeZone: zone }).resolvedOptions().timeZone;
  } catch {
    throw new InvalidArgumentError(`time zone ${JSON.stringify(zone.slice(0, 64))} is not one this system knows (an IANA name such as Europe/Berlin, or UTC)`, { field: 'timeZone' });
  }
}

/** The server's own time zone (TZ, else the system's). */
export function localTimeZone(): string {
  return new Intl.DateTimeFormat().resolvedOptions().timeZone;
}

export function wallTime(instant: number, zone: string): WallTime {
  const parts: Record<string, number> = {};
  for (const part of formatter(zone).formatToParts(new Date(instant))) if (part.type !== 'literal') parts[part.type] = Number(part.value);
  const { year, month, day, hour, minute } = parts as { year: number; month: number; day: number; hour: number; minute: number };
  return { year, month, day, hour, minute, weekday: new Date(Date.UTC(year, month - 1, day)).getUTCDay() };
}

/**
 * Offsets by zone and minute: Intl's formatToParts costs tens of microseconds, and the slot searches ask for
 * the same few minutes (a day's first and last) again and again. Offsets change only at whole minutes.
 */
const offsets = new Map<string, number>();
const MAX_CACHED_OFFSETS = 100_000;

/** The zone's offset from UTC at an instant, in ms (whole minutes). */
function offsetAt(instant: number, zone: string): number {
  const minute = instant - (((instant % 60_000) + 60_000) % 60_000);
  const key = `${zone} ${minute}`;
  let offset = offsets.get(key);
  if (offset === undefined) {
    const w = wallTime(minute, zone);
    offset = Date.UTC(w.year, w.month - 1, w.day, w.hour, w.minute) - minute;
    if (offsets.size >= MAX_CACHED_OFFSETS) offsets.clear();
    offsets.set(key, offset);
  }
  return offset;
}

/**
 * The instant of a wall-clock time (ms of Date.UTC(wall)): of two, the earlier (a repeated hour); of none (a
 * skipped hour), the wall time read with the offset before the gap, that is shifted forward by the gap.
 */
export function instantOf(naive: number, zone: string): number {
  const before = offsetAt(naive - 86_400_000, zone);
  const after = offsetAt(naive + 86_400_000, zone);
  const valid = [naive - before, naive - after].filter((instant) => offsetAt(instant, zone) === naive - instant);
  if (valid.length > 0) return Math.min(...valid);
  return naive - before;
}

const DAY = 86_400_000;
/** Leap days come at least every 8 years (2096 → 2104): a schedule that can run runs within 9. */
const SEARCH_DAYS = 366 * 9;

/** The first slot of the schedule strictly after `after` (ms since the epoch), in `zone`. */
export function nextSlot(schedule: CronSchedule, after: number, zone: string): number {
  const start = wallTime(after, zone);
  // From the day before: a slot of yesterday's wall date can lie after `after` when the offset changes.
  let day = Date.UTC(start.year, start.month - 1, start.day) - DAY;
  for (let i = 0; i < SEARCH_DAYS; i++, day += DAY) {
    const date = new Date(day);
    if (!dayMatches(schedule, date.getUTCFullYear(), date.getUTCMonth() + 1, date.getUTCDate())) continue;
    const first = instantOf(day, zone);
    const last = instantOf(day + DAY - 60_000, zone);
    // No change of offset this day: instants follow the wall times, the first one after `after` is the next.
    const steady = last - first === DAY - 60_000;
    let best = Infinity;
    for (const hour of schedule.hours) {
      for (const minute of schedule.minutes) {
        const naive = day + hour * 3_600_000 + minute * 60_000;
        const instant = steady ? first + (naive - day) : instantOf(naive, zone);
        if (instant > after && instant < best) {
          best = instant;
          if (steady) break;
        }
      }
      if (steady && best < Infinity) break;
    }
    if (best < Infinity) return best;
  }
  throw new InvalidArgumentError(`schedule ${JSON.stringify(schedule.source)} has no slot within ${SEARCH_DAYS / 366} years`, { field: 'schedule' });
}

/** The last slot at or before `at`, or undefined when none lies after `notBefore` (exclusive). */
export function previousSlot(schedule: CronSchedule, at: number, zone: string, notBefore: number): number | undefined {
  // Windows growing backwards until one holds a slot, then forwards through it: few steps for any schedule.
  for (const span of [3_600_000, DAY, 8 * DAY, 32 * DAY, 367 * DAY, SEARCH_DAYS * DAY]) {
    const from = Math.max(at - span, notBefore);
    let slot = nextSlot(schedule, from, zone);
    if (slot > at) {
      if (from === notBefore) return undefined;
      continue;
    }
    for (let next = nextSlot(schedule, slot, zone); next <= at; next = nextSlot(schedule, slot, zone)) slot = next;
    return slot;
  }
  return undefined;
}

/** Slots in (after, until], counted up to `cap`: a day at a time (a year of a minute's schedule in milliseconds). */
export function countSlots(schedule: CronSchedule, after: number, until: number, zone: string, cap: number): number {
  if (until <= after) return 0;
  const start = wallTime(after, zone);
  const end = wallTime(until, zone);
  const lastDay = Date.UTC(end.year, end.month - 1, end.day) + DAY;
  let n = 0;
  for (let day = Date.UTC(start.year, start.month - 1, start.day) - DAY; day <= lastDay && n < cap; day += DAY) {
    const date = new Date(day);
    if (!dayMatches(schedule, date.getUTCFullYear(), date.getUTCMonth() + 1, date.getUTCDate())) continue;
    const first = instantOf(day, zone);
    const steady = instantOf(day + DAY - 60_000, zone) - first === DAY - 60_000;
    // A day with a change of offset may map two wall times to one instant (the skipped hour): counted once.
    const seen = new Set<number>();
    for (const hour of schedule.hours) {
      for (const minute of schedule.minutes) {
        const naive = day + hour * 3_600_000 + minute * 60_000;
        const instant = steady ? first + (naive - day) : instantOf(naive, zone);
        if (instant <= after || instant > until) continue;
        if (!steady) {
          if (seen.has(instant)) continue;
          seen.add(instant);
        }
        if (++n >= cap) return n;
      }
    }
  }
  return n;
}
