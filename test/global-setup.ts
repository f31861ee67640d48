/**
 * Once per test run: the run leaves the machine as it found it. Daemons a test had to start (libvirtd and
 * virtlogd, when none was running) are stopped at the end; a daemon that was already running is left alone.
 */
import { libvirtdRunning, stopStartedDaemons } from './libvirt.js';

export default async function setup(): Promise<() => Promise<void>> {
  const libvirtdWasRunning = await libvirtdRunning();
  return async () => {
    if (!libvirtdWasRunning) await stopStartedDaemons();
  };
}
