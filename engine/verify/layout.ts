/**
 * verify's warnings about files that are not the repository's (SPEC.md, sections 2 and 14.2): strays in
 * packs/ and backups/ (layout-scan.ts), and a file with a pack's name whose header is not a pack's while
 * no index entry names it. None of them is a problem for any backup: each is named, skipped, and never
 * deleted by gc. And the warning about files and directories other users may use (SPEC.md, 2.1).
 */
import type { PackScan } from '../../repo-format/pack-file.js';
import type { Repository } from '../../repo-format/repository.js';
import type { VerifyReport, VerifyWarning } from './report.js';

export async function strayWarnings(repo: Repository): Promise<VerifyWarning[]> {
  return (await repo.strays()).map((stray) => ({ code: 'STRAY_FILE', message: `${stray.path} is ${stray.why}: not the repository's; skipped, and never deleted by gc`, path: stray.path }));
}

/**
 * A pack-named file whose header is not a pack's (or that is too short for one), for the caller to call
 * when no index entry names it: not a damaged pack any backup needs, but a file that is not the repository's.
 */
export function foreignPackWarning(repo: Repository, packId: string, scan: PackScan): VerifyWarning | undefined {
  if (!scan.damage || scan.damage.offset !== 0) return undefined;
  const path = repo.packDisplayPath(packId);
  return { code: 'NOT_A_PACK', message: `${path} has a pack's name but is not a pack (${scan.damage.why}, ${scan.size} bytes); no index entry names it: skipped, and never deleted by gc`, path };
}

/** A path as one shell word, for a command the user may paste. */
function shellWord(text: string): string {
  return /^[\w@%+=:,./-]+$/.test(text) ? text : `'${text.replace(/'/g, `'\\''`)}'`;
}

/** The warning for files and directories other users may use (SPEC.md, 2.1), with the command that fixes them. */
export function loosePermissionsWarning(permissions: VerifyReport['permissions'], root: string): VerifyWarning {
  const { loose, examples } = permissions;
  const shown = examples.slice(0, 3).map((e) => `${e.path} ${e.mode}`).join(', ');
  return {
    code: 'PERMISSIONS_LOOSE',
    message: `${loose === 1 ? '1 file or directory' : `${loose} files and directories`} of the repository ${loose === 1 ? 'is' : 'are'} open to other users (${shown}${loose > 3 ? ', …' : ''}); make it private with: chmod -R go= ${shellWord(root)}`,
    path: examples[0]!.path,
  };
}
