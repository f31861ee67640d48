/**
 * The tests' real guest (test/guest/): it boots under plain QEMU (TCG here) from its own disk, its agent answers
 * and freezes and thaws the root file system, and what the guest writes is on the disk after it powers off.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { copyFile, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { exitOf, sh, tempDir, waitFor } from './helpers.js';
import { GuestAgent } from './guest/agent.js';
import { tinyGuest, type TinyGuest } from './guest/tiny-guest.js';

describe('the tiny guest', () => {
  let dir: { path: string; cleanup: () => Promise<void> };
  let guest: TinyGuest;
  let qemu: ChildProcess | undefined;

  beforeAll(async () => {
    dir = await tempDir('engine-tiny-guest-');
    guest = await tinyGuest();
  }, 300_000);

  afterAll(async () => {
    if (qemu && qemu.exitCode === null && qemu.signalCode === null) {
      qemu.kill('SIGKILL');
      await exitOf(qemu);
    }
    await dir.cleanup();
  });

  it('boots from its own disk, answers through its agent, freezes, thaws, and keeps what it wrote', async () => {
    const image = join(dir.path, 'guest.img');
    await copyFile(guest.image, image);
    const console = join(dir.path, 'console.log');
    const agentSocket = join(dir.path, 'qga.sock');
    qemu = spawn('qemu-system-x86_64', [
      '-machine', 'q35,accel=tcg', '-m', '256', '-display', 'none', '-no-reboot', '-nodefaults',
      '-serial', `file:${console}`,
      '-drive', `file=${image},format=raw,if=virtio`,
      '-chardev', `socket,path=${agentSocket},server=on,wait=off,id=qga0`,
      '-device', 'virtio-serial', '-device', `virtserialport,chardev=qga0,name=${guest.agentPort}`,
    ], { stdio: 'ignore' });
    await waitFor('the guest to start its agent', async () => (await readFile(console, 'utf8').catch(() => '')).includes(guest.readyMarker), { everyMs: 200 });

    const agent = await GuestAgent.connect(agentSocket);
    expect(await agent.execute('guest-ping')).toEqual({});
    const filesystems = await agent.execute<{ mountpoint: string; type: string; name: string }[]>('guest-get-fsinfo');
    expect(filesystems.map((f) => [f.mountpoint, f.type, f.name])).toEqual([['/', 'ext4', 'vda1']]);
    expect(await agent.execute('guest-fsfreeze-freeze')).toBe(1);
    expect(await agent.execute('guest-fsfreeze-status')).toBe('frozen');
    expect(await agent.execute('guest-fsfreeze-thaw')).toBe(1);
    expect(await agent.execute('guest-fsfreeze-status')).toBe('thawed');
    expect(await agent.shell('echo written-in-the-guest > /data/proof && sync && cat /data/proof')).toEqual({ exitcode: 0, stdout: 'written-in-the-guest\n' });

    await agent.execute('guest-shutdown').catch(() => undefined); // the agent may go before it answers
    agent.close();
    expect(await exitOf(qemu)).toEqual({ code: 0, signal: null });
    // The root file system, read by the host's own tools: clean, and holding the guest's file.
    const root = join(dir.path, 'root.img');
    await sh('dd', [`if=${image}`, `of=${root}`, 'bs=1M', 'skip=1', 'status=none']);
    await sh('e2fsck', ['-n', '-f', root]);
    expect(await sh('debugfs', ['-R', 'cat /data/proof', root])).toBe('written-in-the-guest\n');
  }, 300_000);
});
