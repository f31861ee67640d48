/**
 * Once per test run: the run leaves the machine as it found it. Daemons a test had to start (libvirtd and
 * virtlogd, when none was running) are stopped at the end of the last run alive; a daemon that was already
 * running is left alone. Ceph test clusters (test/rgw.ts) are each run's own and are stopped at its end.
 * The fault campaign runs in several files (test/crash-*.test.ts): each adds its counts to a directory
 * provided here, and the campaign's one line is printed when the run ends. Every process of the run shares one
 * private Node compile cache, and one host cache folder of format 3 (ENGINE_CACHE_DIR), removed at the end:
 * the caches of the format-3 repositories the tests create must not stay in /var/cache/engine.
 */
import type { TestProject } from 'vitest/node';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { enterRun, leaveRun, stopStartedDaemons } from './libvirt.js';
import { createRunRoot, destroyRunRoot, RGW_RUN_ROOT_ENV } from './rgw.js';
import { campaignLine, noFaults, type CampaignCounts } from './fault-campaign-counts.js';

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  await enterRun();
  // Ceph test clusters live under one folder per run: the teardown stops what a file that crashed left
  // running, and the next run clears the folders of a run that was killed. The test files' processes are
  // forked after this and inherit the variable.
  const rgwRoot = await createRunRoot();
  process.env[RGW_RUN_ROOT_ENV] = rgwRoot;
  // Node's compile cache for every process of the run (the engine CLI is started some thousands of times):
  // V8's compiled code of dist/ is kept between starts, ~8% of a short command's CPU. The folder is this
  // run's own (mkdtemp: 0700), so no other user can plant code in it; it goes at the end.
  const compileCache = await mkdtemp(join(tmpdir(), 'engine-test-compile-cache-'));
  process.env.NODE_COMPILE_CACHE = compileCache;
  // A test that needs its own cache folder (another simulated host) sets ENGINE_CACHE_DIR itself.
  const hostCache = await mkdtemp(join(tmpdir(), 'engine-test-host-cache-'));
  process.env.ENGINE_CACHE_DIR = hostCache;
  const countsDir = await mkdtemp(join(tmpdir(), 'engine-campaign-counts-'));
  project.provide('campaignCountsDir', countsDir);
  return async () => {
    await destroyRunRoot(rgwRoot);
    // Only what a test run started is stopped (its pid files say which), and only by the last run alive:
    // another run (another worktree's tests) may be using the daemons this one or that one started.
    if (await leaveRun()) await stopStartedDaemons();
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
    // The forked test workers may still be flushing their compiled code into it as they exit (ENOTEMPTY): retried.
    await rm(compileCache, { recursive: true, force: true, maxRetries: 10, retryDelay: 200 });
    await rm(hostCache, { recursive: true, force: true, maxRetries: 10, retryDelay: 200 });
  };
}
