/**
 * verify's warnings about files that are not the repository's (SPEC.md, sections 2 and 14.2): strays in
 * packs/ and backups/ (layout-scan.ts), and a file with a pack's name whose header is not a pack's while
 * no index entry names it. None of them is a problem for any backup: each is named, skipped, and never
 * deleted by gc.
 */
import { scanPackFiles, scanRecordFiles } from '../../repo-format/layout-scan.js';
import { LAYOUT } from '../../repo-format/constants.js';
import type { PackScan } from '../../repo-format/pack-file.js';
import type { VerifyWarning } from './verify.js';

export async function strayWarnings(root: string): Promise<VerifyWarning[]> {
  const [packs, records] = await Promise.all([scanPackFiles(root), scanRecordFiles(root)]);
  return [...packs.strays, ...records.strays].map((stray) => ({ code: 'STRAY_FILE', message: `${stray.path} is ${stray.why}: not the repository's; skipped, and never deleted by gc`, path: stray.path }));
}

/**
 * A pack-named file whose header is not a pack's (or that is too short for one), for the caller to call
 * when no index entry names it: not a damaged pack any backup needs, but a file that is not the repository's.
 */
export function foreignPackWarning(packId: string, scan: PackScan): VerifyWarning | undefined {
  if (!scan.damage || scan.damage.offset !== 0) return undefined;
  const path = `${LAYOUT.packs}/${packId.slice(0, 2)}/${packId}`;
  return { code: 'NOT_A_PACK', message: `${path} has a pack's name but is not a pack (${scan.damage.why}, ${scan.size} bytes); no index entry names it: skipped, and never deleted by gc`, path };
}
