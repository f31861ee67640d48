/**
 * The fault campaign's counts (test/fault-campaign.ts), apart from the test helpers so that the global
 * set-up, which runs outside the test workers, can sum them: every fault adds to `injected` and to one kind
 * (kill -9, damage, a full disk, a second process at work); `encrypted` counts those in an encrypted
 * repository; `v3` those in a version-3 repository (folder or S3); `noSpace` the full disks an operation failed on with ENGINE_NO_SPACE; `lost` committed backups
 * that no longer restore.
 */
export interface CampaignCounts {
  injected: number;
  crashes: number;
  damage: number;
  fullDisk: number;
  concurrent: number;
  encrypted: number;
  v3: number;
  detected: number;
  repaired: number;
  harmless: number;
  noSpace: number;
  lost: number;
}

export function noFaults(): CampaignCounts {
  return { injected: 0, crashes: 0, damage: 0, fullDisk: 0, concurrent: 0, encrypted: 0, v3: 0, detected: 0, repaired: 0, harmless: 0, noSpace: 0, lost: 0 };
}

/** The campaign's one line. */
export function campaignLine(c: CampaignCounts): string {
  return (
    `fault campaign: ${c.injected} faults injected (${c.crashes} kill -9, ${c.damage} damage, ${c.fullDisk} full disk, ` +
    `${c.concurrent} two processes at once; ${c.encrypted} in an encrypted repository, ${c.v3} in a version-3 one on a folder or S3), ` +
    `${c.detected} detected by verify, ${c.repaired} repaired, ${c.harmless} damage faults harmless (verify found nothing and everything restored), ` +
    `${c.noSpace} full disks reported as ENGINE_NO_SPACE, ${c.lost} backups lost`
  );
}

/** Where the test files' counts meet: a directory the global set-up provides. */
declare module 'vitest' {
  export interface ProvidedContext {
    campaignCountsDir: string;
  }
}
