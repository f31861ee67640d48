/**
 * Once per test run: the run leaves the machine as it found it. Daemons a test had to start (libvirtd and
 * virtlogd, when none was running) are stopped at the end of the last run alive; a daemon that was already
 * running is left alone.
 */
import { enterRun, leaveRun, stopStartedDaemons } from './libvirt.js';

export default async function setup(): Promise<() => Promise<void>> {
  await enterRun();
  return async () => {
    // Only what a test run started is stopped (its pid files say which), and only by the last run alive:
    // another run (another worktree's tests) may be using the daemons this one or that one started.
    if (await leaveRun()) await stopStartedDaemons();
  };
}
