/**
 * verify's check of the verification records (boot tests, SPEC.md 9.2): each one reads, opens (encrypted
 * repositories) and decodes; one that does not is `VERIFICATION_DAMAGED` (a problem: the record of a test
 * cannot be trusted). One whose backup is gone (a prune stopped between the backup's record and the last
 * of its verification records) is a warning, `VERIFICATION_ORPHANED`: it speaks of no backup that exists.
 */
import type { VerifyRun } from './run.js';

export async function checkVerifications(run: VerifyRun, backupIds: ReadonlySet<string>): Promise<void> {
  const { records, damaged } = await run.repo.listVerifications();
  for (const { key, backup, error } of damaged) run.problem({ code: 'VERIFICATION_DAMAGED', message: error.message, backup, path: key });
  for (const { key, record } of records) {
    await run.interruption.tick();
    if (!backupIds.has(record.backup)) run.report.warnings.push({ code: 'VERIFICATION_ORPHANED', message: `${key} records a boot test of backup ${record.backup}, which is gone (a prune stopped half-way): harmless; the next gc removes it`, path: key });
  }
  run.report.verifications = records.length;
}
