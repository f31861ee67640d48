/** UEFI firmware for a throw-away VM: OVMF's code (read-only) and a private copy of its variable store. */
import { access, copyFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ToolError } from '../cbt/run-tool.js';

/** Debian's ovmf package (4M builds first), then older and other distributions' names. */
const CANDIDATES: [string, string][] = [
  ['/usr/share/OVMF/OVMF_CODE_4M.fd', '/usr/share/OVMF/OVMF_VARS_4M.fd'],
  ['/usr/share/OVMF/OVMF_CODE.fd', '/usr/share/OVMF/OVMF_VARS.fd'],
  ['/usr/share/edk2/ovmf/OVMF_CODE.fd', '/usr/share/edk2/ovmf/OVMF_VARS.fd'],
  ['/usr/share/edk2-ovmf/x64/OVMF_CODE.fd', '/usr/share/edk2-ovmf/x64/OVMF_VARS.fd'],
];

/** The firmware files, the variables copied into `dir` (the guest writes them; the copy goes with the run). */
export async function uefiFirmware(dir: string, env: NodeJS.ProcessEnv = process.env): Promise<{ code: string; vars: string }> {
  const candidates: [string, string][] = env.ENGINE_OVMF_CODE && env.ENGINE_OVMF_VARS ? [[env.ENGINE_OVMF_CODE, env.ENGINE_OVMF_VARS]] : CANDIDATES;
  for (const [code, vars] of candidates) {
    if ((await access(code).then(() => true, () => false)) && (await access(vars).then(() => true, () => false))) {
      const copy = join(dir, 'uefi-vars.fd');
      await copyFile(vars, copy);
      return { code, vars: copy };
    }
  }
  throw new ToolError('OVMF', [], 'UEFI firmware (OVMF) is not installed (Debian: apt-get install ovmf; or set ENGINE_OVMF_CODE and ENGINE_OVMF_VARS); give --firmware bios for a BIOS guest');
}
