import { execFile } from 'node:child_process';
import { EngineError } from '../../repo-format/errors.js';

export class ToolError extends EngineError {
  constructor(tool: string, args: string[], why: string, readonly timedOut = false) {
    super('ENGINE_TOOL_FAILED', `${tool} ${args.join(' ')} failed: ${why}`, { tool, args, why, ...(timedOut ? { timedOut } : {}) });
  }
}

/** The Debian package of each system tool the engine runs, for the one line that says how to get it. */
const DEBIAN_PACKAGES: Readonly<Record<string, string>> = {
  'qemu-img': 'qemu-utils',
  'qemu-nbd': 'qemu-utils',
  'qemu-io': 'qemu-utils',
  losetup: 'mount',
  mount: 'mount',
  umount: 'mount',
  blkid: 'util-linux',
  virsh: 'libvirt-clients',
  nbdfuse: 'libnbd-bin',
  id: 'coreutils',
};

/** "X is not installed", with the Debian package that provides it when known. */
export function notInstalled(tool: string): string {
  const found = DEBIAN_PACKAGES[tool];
  return found ? `${tool} is not installed (Debian: apt-get install ${found})` : `${tool} is not installed (it is not on PATH)`;
}

/**
 * Runs a system tool (qemu-img, qemu-nbd, virsh, losetup, mount …); its stderr becomes the error message. With
 * LC_ALL=C: the engine reads the tools' words (virsh's "Thawed N file system(s)", libvirt's errors), in English.
 */
export async function runTool(tool: string, args: string[], options: { timeoutMs?: number } = {}): Promise<string> {
  return (await runToolOutput(tool, args, options)).stdout;
}

/** runTool, with what the tool wrote to stderr when it succeeded (virsh runs a batch of commands and exits 0 when some failed). */
export function runToolOutput(tool: string, args: string[], options: { timeoutMs?: number } = {}): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const timeoutMs = options.timeoutMs ?? 120_000;
    execFile(tool, args, { maxBuffer: 16 * 1024 * 1024, timeout: timeoutMs, env: { ...process.env, LC_ALL: 'C' } }, (error, stdout, stderr) => {
      if (!error) return resolve({ stdout, stderr });
      const code = (error as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return reject(new ToolError(tool, args, notInstalled(tool)));
      // Killed at its timeout: said so, not as "Command failed: …".
      if (error.killed) return reject(new ToolError(tool, args, `it did not end within ${timeoutMs / 1000} s (killed)`, true));
      reject(new ToolError(tool, args, (stderr || error.message).trim().split('\n').slice(-3).join(' ')));
    });
  });
}

/** Runs a tool that answers JSON (qemu-img info, measure); an answer that is not JSON is the tool's failure. */
export async function runToolJson(tool: string, args: string[], options: { timeoutMs?: number } = {}): Promise<unknown> {
  const output = await runTool(tool, args, options);
  try {
    return JSON.parse(output) as unknown;
  } catch {
    throw new ToolError(tool, args, `its output is not JSON: ${JSON.stringify(output.slice(0, 120))}`);
  }
}
