/**
 * Once per test run: the run leaves the machine as it found it. Daemons a test had to start (libvirtd and
 * virtlogd, when none was running) are stopped at the end; a daemon that was already running is left alone.
 * The fault campaign runs in several files (test/crash-*.test.ts): each adds its counts to a directory
 * provided here, and the campaign's one line is printed when the run ends.
 */
import type { TestProject } from 'vitest/node';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { libvirtdRunning, stopStartedDaemons } from './libvirt.js';
import { campaignLine, noFaults, type CampaignCounts } from './fault-campaign-counts.js';

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const libvirtdWasRunning = await libvirtdRunning();
  const countsDir = await mkdtemp(join(tmpdir(), 'engine-campaign-counts-'));
  project.provide('campaignCountsDir', countsDir);
  return async () => {
    if (!libvirtdWasRunning) await stopStartedDaemons();
    const files = await readdir(countsDir);
    if (files.length > 0) {
      const total = noFaults();
      for (const name of files) {
        const counts = JSON.parse(await readFile(join(countsDir, name), 'utf8')) as CampaignCounts;
        for (const key of Object.keys(total) as (keyof CampaignCounts)[]) total[key] += counts[key];
      }
      console.log(campaignLine(total));
    }
    await rm(countsDir, { recursive: true, force: true });
  };
}
