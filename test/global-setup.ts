/**
 * Once per test run: the run leaves the machine as it found it. Daemons a test had to start (libvirtd and
 * virtlogd, when none was running) are stopped at the end; a daemon that was already running is left alone.
 */
import { libvirtdRunning, stopStartedDaemons } from './libvirt.js';
import { createRunRoot, destroyRunRoot, RGW_RUN_ROOT_ENV } from './rgw.js';

export default async function setup(): Promise<() => Promise<void>> {
  const libvirtdWasRunning = await libvirtdRunning();
  // Ceph test clusters (test/rgw.ts) live under one folder per run: the teardown stops what a file that
  // crashed left running, and the next run clears the folders of a run that was killed. The test files'
  // processes are forked after this and inherit the variable.
  const rgwRoot = await createRunRoot();
  process.env[RGW_RUN_ROOT_ENV] = rgwRoot;
  return async () => {
    await destroyRunRoot(rgwRoot);
    if (!libvirtdWasRunning) await stopStartedDaemons();
  };
}
