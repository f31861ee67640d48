/**
 * The benches' one verdict helper: a target is PASS only when every round meets it. Before, bench/v3-s3 took
 * the median of the rounds, so with two rounds one round well under the target still printed PASS.
 */
import { describe, expect, test } from 'vitest';
import { verdict } from '../dist/bench/report.js';

describe('bench verdicts', () => {
  const atLeast80 = (share: number): boolean => share >= 0.8;

  test('one round under the target makes the target a MISS, with how many rounds met it', () => {
    // The median of 0.95 and 0.70 is 0.825: the old verdict printed PASS.
    expect(verdict([0.95, 0.7], atLeast80)).toBe('MISS (1 of 2 rounds)');
    expect(verdict([0.7, 0.79, 0.9], atLeast80)).toBe('MISS (1 of 3 rounds)');
  });

  test('every round meeting the target is a PASS that says so', () => {
    expect(verdict([0.8, 0.95], atLeast80)).toBe('PASS (all 2 rounds)');
  });

  test('one measurement reads PASS or MISS; none reads "not measured"', () => {
    expect(verdict([0.81], atLeast80)).toBe('PASS');
    expect(verdict([0.79], atLeast80)).toBe('MISS');
    expect(verdict([], atLeast80)).toBe('not measured');
  });
});
