import { execFile } from 'node:child_process';
import { EngineError } from '../../repo-format/errors.js';

export class ToolError extends EngineError {
  constructor(tool: string, args: string[], why: string) {
    super('ENGINE_TOOL_FAILED', `${tool} ${args.join(' ')} failed: ${why}`, { tool, args, why });
  }
}

/** Runs a system tool (qemu-img, qemu-nbd, virsh); its stderr becomes the error message. */
export function runTool(tool: string, args: string[], options: { timeoutMs?: number } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(tool, args, { maxBuffer: 16 * 1024 * 1024, timeout: options.timeoutMs ?? 120_000 }, (error, stdout, stderr) => {
      if (!error) return resolve(stdout);
      const code = (error as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return reject(new ToolError(tool, args, `${tool} is not installed (Debian: apt-get install qemu-utils)`));
      reject(new ToolError(tool, args, (stderr || error.message).trim().split('\n').slice(-3).join(' ')));
    });
  });
}
