/**
 * The policies' pure parts (SPEC.md 23.1): the cron parser, the next and previous slots in a time zone across
 * daylight saving time (the skipped hour shifted forward, the repeated hour once) and month ends (31st, 29
 * February), the level rules of a week, and the refusals of bad policy configs, each one line naming its field.
 */
import { describe, expect, test } from 'vitest';
import { countSlots, cronMatches, nextSlot, parseCron, previousSlot, wallTime } from '../dist/engine/server/policies/cron.js';
import { parseConfig } from '../dist/engine/server/config.js';
import { levelOf } from '../dist/engine/server/policies/scheduler.js';
import { chooseDomains, ovirtSearch } from '../dist/engine/server/policies/select.js';

const at = (iso: string): number => Date.parse(iso);
const iso = (ms: number): string => new Date(ms).toISOString();

/** The first `n` slots after `from`. */
function slots(expression: string, from: string, zone: string, n: number): string[] {
  const schedule = parseCron(expression);
  const out: string[] = [];
  for (let t = at(from); out.length < n; ) out.push(iso((t = nextSlot(schedule, t, zone))));
  return out;
}

describe('cron expressions', () => {
  test('fields: lists, ranges, steps, names; both day fields restricted means either', () => {
    const s = parseCron('*/15 9-17/4 1,15 jan-mar,DEC mon-fri');
    expect(s.minutes).toEqual([0, 15, 30, 45]);
    expect(s.hours).toEqual([9, 13, 17]);
    expect([...s.days].sort((a, b) => a - b)).toEqual([1, 15]);
    expect([...s.months].sort((a, b) => a - b)).toEqual([1, 2, 3, 12]);
    expect([...s.weekdays].sort()).toEqual([1, 2, 3, 4, 5]);
    expect(parseCron('5/20 * * * 7').minutes).toEqual([5, 25, 45]);
    expect([...parseCron('0 0 * * 7').weekdays]).toEqual([0]);
    expect(parseCron('@daily').minutes).toEqual([0]);
    // 1 March 2027 is a Monday: day 1 matches by day of month; Tuesday 2 March by day of week; Sunday 7 March by neither.
    const either = parseCron('0 12 1 * mon,tue');
    expect(slots('0 12 1 * mon,tue', '2027-02-28T00:00:00Z', 'UTC', 3)).toEqual(['2027-03-01T12:00:00.000Z', '2027-03-02T12:00:00.000Z', '2027-03-08T12:00:00.000Z']);
    expect(cronMatches(either, wallTime(at('2027-03-07T12:00:00Z'), 'UTC'))).toBe(false);
    // Only the day of week restricted: every Sunday.
    expect(slots('30 1 * * sun', '2027-03-01T00:00:00Z', 'UTC', 2)).toEqual(['2027-03-07T01:30:00.000Z', '2027-03-14T01:30:00.000Z']);
  });

  test.each([
    ['0 1 * *', 'expected 5 fields'],
    ['60 * * * *', 'minute 60 is outside 0-59'],
    ['* 24 * * *', 'hour 24 is outside 0-23'],
    ['* * 0 * *', 'day of month 0 is outside 1-31'],
    ['* * * 13 *', 'month 13 is outside 1-12'],
    ['* * * * 8', 'day of week 8 is outside 0-7'],
    ['* * * foo *', 'month "foo" is not a number or a name'],
    ['5-1 * * * *', 'range 5-1 runs backwards'],
    ['*/0 * * * *', 'step 0'],
    ['0 0 30 2 *', 'it would never run'],
    ['0 0 31 4,6 *', 'it would never run'],
    ['@often', 'unknown macro'],
    ['1,,2 * * * *', 'minute'],
  ])('%s is refused: %s', (expression, message) => {
    expect(() => parseCron(expression)).toThrow(message);
  });

  test('month ends: the 31st only in months that have one, 29 February only in leap years', () => {
    expect(slots('0 0 31 * *', '2027-01-31T12:00:00Z', 'UTC', 4)).toEqual(['2027-03-31T00:00:00.000Z', '2027-05-31T00:00:00.000Z', '2027-07-31T00:00:00.000Z', '2027-08-31T00:00:00.000Z']);
    expect(slots('0 6 29 2 *', '2027-01-01T00:00:00Z', 'UTC', 2)).toEqual(['2028-02-29T06:00:00.000Z', '2032-02-29T06:00:00.000Z']);
    // 2100 is no leap year: from 2096 the next 29 February is in 2104.
    expect(slots('0 6 29 2 *', '2096-03-01T00:00:00Z', 'UTC', 1)).toEqual(['2104-02-29T06:00:00.000Z']);
    // The last day of a month in another zone: 23:30 on 30 April in New York is 03:30 UTC on 1 May.
    expect(slots('30 23 30 4 *', '2027-01-01T00:00:00Z', 'America/New_York', 1)).toEqual(['2027-05-01T03:30:00.000Z']);
  });

  test('daylight saving time, Europe/Berlin: the skipped 02:30 runs at 03:30 CEST, the repeated 02:30 runs once', () => {
    // 28 March 2027: 02:00 CET becomes 03:00 CEST. 27 March is CET (+1), 29 March CEST (+2).
    expect(slots('30 2 * * *', '2027-03-27T00:00:00Z', 'Europe/Berlin', 3)).toEqual(['2027-03-27T01:30:00.000Z', '2027-03-28T01:30:00.000Z', '2027-03-29T00:30:00.000Z']);
    expect(wallTime(at('2027-03-28T01:30:00Z'), 'Europe/Berlin')).toMatchObject({ hour: 3, minute: 30 });
    // The skipped 02:30 and a real 03:30 of the same schedule: one slot.
    expect(slots('30 2,3 * * *', '2027-03-28T00:00:00Z', 'Europe/Berlin', 2)).toEqual(['2027-03-28T01:30:00.000Z', '2027-03-29T00:30:00.000Z']);
    // 31 October 2027: 03:00 CEST becomes 02:00 CET; 02:30 happens at 00:30 and 01:30 UTC: run at the first.
    expect(slots('30 2 * * *', '2027-10-30T12:00:00Z', 'Europe/Berlin', 2)).toEqual(['2027-10-31T00:30:00.000Z', '2027-11-01T01:30:00.000Z']);
    // Every 30 minutes through the repeated hour: each wall time once (02:00 and 02:30 of CEST), then 03:00 CET.
    expect(slots('*/30 * * * *', '2027-10-30T23:10:00Z', 'Europe/Berlin', 5)).toEqual(['2027-10-30T23:30:00.000Z', '2027-10-31T00:00:00.000Z', '2027-10-31T00:30:00.000Z', '2027-10-31T02:00:00.000Z', '2027-10-31T02:30:00.000Z']);
    // Asked from inside the repeated hour's second pass (01:10 UTC = 02:10 CET): the next is 03:00 CET, nothing twice.
    expect(iso(nextSlot(parseCron('*/30 * * * *'), at('2027-10-31T01:10:00Z'), 'Europe/Berlin'))).toBe('2027-10-31T02:00:00.000Z');
    // Hourly across the spring gap: 01:00 CET, then 03:00 CEST (02:00 does not exist and lands on it).
    expect(slots('0 * * * *', '2027-03-27T23:30:00Z', 'Europe/Berlin', 3)).toEqual(['2027-03-28T00:00:00.000Z', '2027-03-28T01:00:00.000Z', '2027-03-28T02:00:00.000Z']);
  });

  test('previous slot and missed slots: catching up after downtime', () => {
    const nightly = parseCron('0 1 * * *');
    // Down from 2027-03-01 02:00 to 2027-03-04 12:00 UTC: slots of the 2nd, 3rd and 4th missed; the newest is the 4th.
    expect(iso(previousSlot(nightly, at('2027-03-04T12:00:00Z'), 'UTC', at('2027-03-01T02:00:00Z'))!)).toBe('2027-03-04T01:00:00.000Z');
    expect(countSlots(nightly, at('2027-03-01T02:00:00Z'), at('2027-03-04T12:00:00Z'), 'UTC', 100)).toBe(3);
    // A slot exactly at `at` counts; none after notBefore: undefined.
    expect(iso(previousSlot(nightly, at('2027-03-04T01:00:00Z'), 'UTC', 0)!)).toBe('2027-03-04T01:00:00.000Z');
    expect(previousSlot(nightly, at('2027-03-04T00:59:00Z'), 'UTC', at('2027-03-03T01:00:00Z'))).toBeUndefined();
    // A yearly schedule, two years down.
    expect(iso(previousSlot(parseCron('@yearly'), at('2029-06-01T00:00:00Z'), 'UTC', at('2027-02-01T00:00:00Z'))!)).toBe('2029-01-01T00:00:00.000Z');
    expect(countSlots(parseCron('* * * * *'), 0, at('2027-01-01T00:00:00Z'), 'UTC', 1000)).toBe(1000);
    // Counted a day at a time, the same as slot after slot, across both changes of 2027 in Berlin and New York.
    for (const expression of ['30 2 * * *', '30 2,3 * * *', '*/20 * * * *', '0 1 * * sun', '15 0-3 * * *']) {
      for (const [zone, from, to] of [['Europe/Berlin', '2027-03-26T00:00:00Z', '2027-03-30T00:00:00Z'], ['Europe/Berlin', '2027-10-29T00:00:00Z', '2027-11-02T00:00:00Z'], ['America/New_York', '2027-03-12T00:00:00Z', '2027-03-16T00:00:00Z']] as const) {
        const schedule = parseCron(expression);
        let one = 0;
        for (let t = nextSlot(schedule, at(from), zone); t <= at(to); t = nextSlot(schedule, t, zone)) one++;
        expect(countSlots(schedule, at(from), at(to), zone, 100_000), `${expression} ${zone} ${from}`).toBe(one);
      }
    }
    // The skipped 02:30 and the real 03:30 are one slot that day.
    expect(countSlots(parseCron('30 2,3 * * *'), at('2027-03-27T22:00:00Z'), at('2027-03-28T21:59:00Z'), 'Europe/Berlin', 100)).toBe(1);
  });
});

const policyConfig = (policy: Record<string, unknown>): string =>
  JSON.stringify({ stateDir: '/var/lib/x', repositories: { main: { location: '/srv/main' }, other: { location: '/srv/other' } }, policies: { nightly: { vms: { sources: [{ name: 'web', disks: [{ kind: 'image', path: '/vm/web.qcow2' }] }] }, repository: 'main', schedule: '0 1 * * *', ...policy } } });

describe('policy configs', () => {
  test('a full policy is read; levels follow the slot\'s wall time in the policy\'s zone across a week', () => {
    const config = parseConfig('/etc/engine/server.json', policyConfig({ timeZone: 'Europe/Berlin', levels: [{ when: '* * * * sun', level: 'full' }, { when: '* * * * wed', level: 'differential' }, { when: '* * * * *', level: 'incremental' }], retention: { keep: { last: 3, daily: 7 } }, verify: { readData: true, subset: 0.1 }, copyTo: 'other', notify: { on: ['failure', 'success'], command: ['/usr/local/bin/page', '--team'], url: 'https://hooks.example/x', timeoutSeconds: 5 } }));
    const policy = config.policies.get('nightly')!;
    expect(policy.timeZone).toBe('Europe/Berlin');
    expect(policy.retention).toEqual({ last: 3, daily: 7 });
    // Sunday 00:30 UTC on 7 March 2027 is Sunday 01:30 in Berlin; Saturday 23:30 UTC is Sunday 00:30 there.
    const week = ['2027-03-06T23:30:00Z', '2027-03-08T00:00:00Z', '2027-03-09T00:00:00Z', '2027-03-10T00:00:00Z', '2027-03-11T00:00:00Z', '2027-03-12T00:00:00Z', '2027-03-12T23:30:00Z'];
    expect(week.map((t) => levelOf(policy, at(t)))).toEqual(['full', 'incremental', 'incremental', 'differential', 'incremental', 'incremental', 'incremental']);
    expect(levelOf({ ...policy, levels: [] }, at('2027-03-07T00:00:00Z'))).toBe('auto');
  });

  test.each([
    [{ schedule: '0 1 * *' }, 'policies.nightly.schedule is not a cron schedule: schedule "0 1 * *": expected 5 fields'],
    [{ repository: 'elsewhere' }, 'policies.nightly.repository names no repository of this config: "elsewhere"'],
    [{ copyTo: 'main' }, "policies.nightly.copyTo is the policy's own repository"],
    [{ timeZone: 'Mars/Olympus' }, 'policies.nightly.timeZone is refused: time zone "Mars/Olympus" is not one this system knows'],
    [{ levels: [{ when: '* * * * sun', level: 'weekly' }] }, 'policies.nightly.levels[0].level must be one of auto, full, incremental, differential'],
    [{ retention: { keep: { lats: 3 } } }, 'policies.nightly.retention.keep has unknown field "lats"'],
    [{ retention: { keep: {} } }, 'policies.nightly.retention.keep names no rule'],
    [{ verify: { subset: 0.1 } }, 'policies.nightly.verify.subset chooses which packs readData reads'],
    [{ notify: { command: ['hook.sh'] } }, 'policies.nightly.notify.command[0] must be an absolute path'],
    [{ notify: { url: 'ftp://x/' } }, 'policies.nightly.notify.url must be http:// or https://'],
    [{ notify: { on: ['failure'] } }, 'policies.nightly.notify needs command or url'],
    [{ scedule: '0 1 * * *' }, 'policies.nightly has unknown field "scedule"'],
    [{ vms: { sources: [{ name: 'a', disks: [{ kind: 'qcow2', path: '/x' }] }] } }, 'policies.nightly.vms.sources[0].disks[0].kind must be one of raw, image, nbd'],
    [{ vms: { sources: [], libvirt: { pattern: '*' } } }, 'policies.nightly.vms must name one of'],
    [{ vms: { libvirt: {} } }, 'policies.nightly.vms.libvirt needs domains'],
    [{ vms: { ovirt: { url: 'https://e', credentialsFile: '/c', cluster: 'a b' } } }, 'policies.nightly.vms.ovirt.cluster must not hold spaces'],
  ])('refused: %j', (policy, message) => {
    let error: Error | undefined;
    try {
      parseConfig('/etc/engine/server.json', policyConfig(policy));
    } catch (e) {
      error = e as Error;
    }
    expect(error?.message).toContain(`server config /etc/engine/server.json: ${message}`);
    expect(error?.message).not.toContain('\n');
    expect((error as { code?: string }).code).toBe('ENGINE_INVALID_ARGUMENT');
  });

  test('selectors: libvirt domains listed and by pattern; the oVirt search', () => {
    expect(chooseDomains({ kind: 'libvirt', domains: ['db', 'gone'], pattern: 'web-*', quiesce: undefined }, ['web-2', 'db', 'web-1', 'mail', 'webmail'])).toEqual(['db', 'gone', 'web-1', 'web-2']);
    expect(ovirtSearch({ kind: 'ovirt', url: 'https://e', credentialsFile: '/c', caFile: undefined, insecureHttp: false, cluster: 'Default', tag: 'gold', pattern: 'web*', quiesce: undefined })).toBe('cluster=Default and tag=gold and name=web*');
  });
});
