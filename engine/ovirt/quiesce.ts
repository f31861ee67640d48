/**
 * Quiesce in the oVirt flows (`backup --ovirt … --quiesce[=required|try]`): what oVirt offers in each flow,
 * and how the engine reads back whether the guest was frozen. From oVirt's sources (ENGINE = ovirt-engine
 * @ 0111fc63, BLL = its backend/manager/modules/bll/…/core/bll; VDSM = vdsm @ fd4b0df2; MODEL =
 * ovirt-engine-api-model @ 4fb1a804):
 *
 * - A snapshot (POST vms/{id}/snapshots) has no quiesce parameter (MODEL services/SnapshotsService.java,
 *   types/Snapshot.java). By default the engine leaves the freeze to VDSM (BLL snapshots/
 *   CreateSnapshotForVmCommand.shouldFreezeOrThawVm: LiveSnapshotPerformFreezeInEngine is false from 4.4,
 *   packaging/dbscripts/upgrade/pre_upgrade/0000_config.sql), and VDSM's snapshot job freezes through the
 *   guest agent and drops the result (lib/vdsm/virt/jobs/snapshot.py: `self._vm.freeze()`; virt/vm.py
 *   `freeze` only logs "Unable to freeze guest filesystems"): nothing in the API says whether a snapshot was
 *   quiesced. So the engine freezes the guest itself with the VM's `freezefilesystems` action — what oVirt
 *   says to do where the manager does not freeze (MODEL services/VmService.java FreezeFilesystems: "must be
 *   executed manually with the API for virtual machines using OpenStack Volume (Cinder) disks"), and the
 *   window oVirt's own freeze-in-engine mode holds (CreateSnapshotForVmCommand.freezeVm before the disks'
 *   snapshots, CreateLiveSnapshotForVmCommand.thawVm after) — and reads the answer: success (BLL
 *   FreezeVmCommand, event FREEZE_VM_SUCCESS 10767) or a fault (USER_FAILED_TO_FREEZE_VM 10769: no agent
 *   "Guest agent non responsive", a guest that cannot freeze "Unable to freeze guest filesystems",
 *   VdsmErrors.properties). VDSM's snapshot job then asks for a freeze again (refused by the frozen guest's
 *   agent, ignored) and always thaws right after libvirt's snapshot (snapshot.py `_thaw_vm`: "Must always
 *   thaw, even if freeze failed"); the engine's `thawfilesystems` once the snapshot is made is the backstop.
 * - A live backup (BLL storage/backup/StartVmBackupCommand: cluster below 4.7, VM up) takes
 *   `require_consistency` (MODEL services/VmBackupsService.java Add, since 4.4.4): VDSM freezes the guest
 *   right before backupBegin and, with it, fails the backup when the freeze fails (lib/vdsm/virt/backup.py
 *   start_backup: "Failed freeze VM"), thawing always. A backup that reaches `ready` with it was frozen; one
 *   that fails says why in the engine's events (VDS_BROKER_COMMAND_FAILURE 10802 carries VDSM's message:
 *   vdsbroker/VdsBrokerCommand.logToAudit). Without it VDSM still tries the freeze and ignores a failure.
 * - A hybrid backup (cluster 4.7+, BLL storage/backup/HybridBackupCommand) ignores `require_consistency`
 *   (REST resource/BackendVmBackupsResource.add builds its VmBackupParameters without it) and takes its point
 *   in time by a snapshot (CreateSnapshotForVm): frozen around like a snapshot, until the backup is ready.
 * - A VM that is down has no guest to freeze (FreezeVmCommand.validate wants status Up): `required` fails,
 *   `try` records crash consistency and why.
 */
import { NO_QUIESCE, type Consistency } from '../../repo-format/backup-record.js';
import { crashPoint } from '../../repo-format/crash-points.js';
import type { JournalEntry } from '../../repo-format/journal.js';
import { OvirtFaultError, QuiesceFailedError } from '../errors.js';
import type { OvirtClient, OvirtClientOptions } from './client.js';
import type { RunJournal } from './cleanup.js';
import { VmStatus } from './vocabulary.js';
import { eventList, productVersion } from './answers.js';
import { startThawWatchdog } from '../quiesce/thaw-watchdog-control.js';

/** `required`: a backup whose guest cannot be frozen fails (ENGINE_QUIESCE_FAILED); `try`: it is taken crash-consistent, the reason recorded. */
export type OvirtQuiesceMode = 'required' | 'try';

export { NO_QUIESCE };

/**
 * How long the guest may stay frozen: the thaw watchdog thaws it then, whatever became of the engine, and a
 * snapshot not made by then is not counted as quiesced. 60 s: a snapshot's creation (a volume per disk on
 * the SPM, then VDSM's job) takes seconds, not minutes, and applications stall their writes for as long as
 * the freeze lasts; oVirt's own bound on a freeze in VDSM's snapshot job is 8 minutes (LiveSnapshotFreezeTimeout,
 * 0000_config.sql), far too long for that. Not measured on a real oVirt. `$ENGINE_OVIRT_FREEZE_TIMEOUT`
 * (seconds) overrides it.
 */
export function freezeTimeoutMs(): number {
  const seconds = Number(process.env.ENGINE_OVIRT_FREEZE_TIMEOUT);
  return Number.isFinite(seconds) && seconds > 0 ? seconds * 1000 : 60_000;
}

/** What a quiesce needs besides the client: the mode, and the connection the thaw watchdog logs in with. */
export interface QuiesceRequest {
  mode: OvirtQuiesceMode;
  ovirt: OvirtClientOptions;
  /** `backup --freeze-timeout`; default freezeTimeoutMs(). */
  freezeTimeoutMs?: number | undefined;
}

/** The VM to quiesce, as the flow read it. */
export interface QuiesceTarget {
  id: string;
  name: string;
  status: string | undefined;
}

/** A quiesce that could not be had: `required` fails, `try` records why. */
function fallBack(vm: QuiesceTarget, mode: OvirtQuiesceMode, method: string, why: string, notice: (m: string) => void): Consistency {
  if (mode === 'required') throw new QuiesceFailedError(vm.name, why);
  notice(`VM ${vm.name} could not be quiesced (${why}): the backup is crash-consistent`);
  return { level: 'crash', method, freezeMs: null, reason: why };
}

/** Down (or any state but up): nothing runs to freeze; undefined when the VM is up. */
export function notRunning(vm: QuiesceTarget, mode: OvirtQuiesceMode, notice: (m: string) => void): Consistency | undefined {
  if (vm.status === VmStatus.up) return undefined;
  return fallBack(vm, mode, 'no running guest to freeze', `the VM is ${vm.status ?? 'in no known state'}, not up: oVirt freezes only a running guest`, notice);
}

/** POST vms/{id}/thawfilesystems: a guest that is not frozen thaws nothing and succeeds (VDSM vm.py `thaw`). */
export async function thawGuest(client: OvirtClient, vmId: string): Promise<void> {
  await client.post(`vms/${vmId}/thawfilesystems`, 'action', {});
}

/**
 * `act` (a snapshot asked for and made, a hybrid backup started until ready) with the guest's file systems
 * frozen through the VM's freezefilesystems action, thawed after whatever happened. Before the freeze a thaw
 * watchdog is started and the freeze journaled: a run killed while the guest is frozen is outlived by the
 * watchdog, which thaws it after the freeze timeout, and `engine ovirt cleanup` or the next run thaws it too
 * (and VDSM's snapshot job, once it ran). `freezeMs` is measured from the freeze's answer to the
 * thaw's: VDSM thaws as soon as libvirt's snapshot returns, so the guest was frozen at most that long.
 */
export async function frozenAround<T>(client: OvirtClient, journal: RunJournal, vm: QuiesceTarget, request: QuiesceRequest, act: () => Promise<T>, notice: (m: string) => void): Promise<{ value: T; consistency: Consistency }> {
  const { mode } = request;
  const down = notRunning(vm, mode, notice);
  if (down) return { value: await act(), consistency: down };
  const timeoutMs = request.freezeTimeoutMs ?? freezeTimeoutMs();
  const entry: JournalEntry = await journal.track({ kind: 'freeze', vm: vm.id });
  const watchdog = await startThawWatchdog({ afterMs: timeoutMs, ovirt: request.ovirt, vm: vm.id });
  let frozenAt: number;
  try {
    await client.post(`vms/${vm.id}/freezefilesystems`, 'action', {});
    frozenAt = performance.now();
  } catch (error) {
    // Only two faults say the freeze never reached the guest: the VM not up (409, FreezeVmCommand.validate) and
    // no agent (400 "Guest agent non responsive", VDSM's `nonresp`: libvirt refused before sending). Any other
    // (a VDSM timeout reaches the caller as a fault too, the engine unreachable) may hide a freeze the agent
    // carries out later: thawed once now, as VDSM does (backup.py: "Must always thaw, even if freeze failed"),
    // and the watchdog and the journal entry stay (the watchdog thaws until a thaw succeeds).
    if (neverSent(error)) {
      await watchdog.stop();
      await journal.forget(entry);
    } else {
      await thawGuest(client, vm.id).catch(() => undefined);
    }
    if (!(error instanceof OvirtFaultError)) throw error;
    const consistency = fallBack(vm, mode, 'oVirt freezefilesystems failed', `oVirt could not freeze the guest's file systems: ${error.message}`, notice);
    return { value: await act(), consistency };
  }
  crashPoint('guest-frozen');
  let value: T;
  let freezeMs: number;
  let madeAt: number;
  try {
    value = await act();
    madeAt = performance.now();
  } finally {
    const thawed = await thawGuest(client, vm.id).then(
      () => true,
      (error: unknown) => (notice(`could not thaw VM ${vm.name}: ${(error as Error).message}; its watchdog, \`engine ovirt cleanup\` or the next run will`), false),
    );
    freezeMs = Math.round(performance.now() - frozenAt);
    if (thawed) {
      await watchdog.stop();
      await journal.forget(entry);
    }
  }
  // The watchdog may have thawed the guest before the snapshot was made: then nothing says it was frozen.
  if (madeAt - watchdog.startedAt >= timeoutMs) {
    const why = `the snapshot took longer than the freeze timeout (${timeoutMs / 1000} s, $ENGINE_OVIRT_FREEZE_TIMEOUT): the guest may have been thawed before it`;
    return { value, consistency: fallBack(vm, mode, 'oVirt freezefilesystems outlasted its timeout', why, notice) };
  }
  return { value, consistency: { level: 'filesystem', method: "oVirt freezefilesystems (the guest agent's fsfreeze) around the snapshot", freezeMs, reason: null } };
}

/** A freezefilesystems fault that says nothing reached the guest: the VM not up, or no agent. */
function neverSent(error: unknown): boolean {
  return error instanceof OvirtFaultError && (error.status === 409 || (error.status === 400 && error.message.includes('Guest agent non responsive')));
}

/**
 * The newest event's id: the failures of what is asked after it are the events with greater ids (MODEL
 * services/EventsService.java List: "The indexes of events are strictly increasing"; `max=1` gives the newest).
 */
export async function newestEvent(client: OvirtClient): Promise<number> {
  return (await client.read('events', eventList, { max: '1' }))[0]?.id ?? 0;
}

/**
 * Why a live backup asked with `require_consistency` failed, if it was the freeze: VDSM's BackupError
 * "Failed freeze VM: …" naming the VM, in the VDS_BROKER_COMMAND_FAILURE (10802) event the engine logs for
 * the failed StartVmBackup command (lib/vdsm/virt/backup.py start_backup; ENGINE AuditLogType.java,
 * AuditLogMessages.properties "VDSM ${VdsName} command ${CommandName} failed: ${message}").
 */
export async function freezeFailure(client: OvirtClient, vmId: string, since: number): Promise<string | undefined> {
  const events = await client.read('events', eventList, { from: String(since) });
  const found = events.find((e) => e.code === VDS_BROKER_COMMAND_FAILURE && e.description.includes('Failed freeze VM') && e.description.includes(vmId));
  if (!found) return undefined;
  const reason = /Failed freeze VM: ([^'"]*)/.exec(found.description)?.[1]?.trim();
  return `oVirt's host could not freeze the guest's file systems (event ${found.id}: ${reason ?? found.description})`;
}

const VDS_BROKER_COMMAND_FAILURE = 10802;

/** A live backup that reached `ready` with require_consistency: VDSM froze the guest around backupBegin. */
export const LIVE_BACKUP_FROZEN: Consistency = {
  level: 'filesystem',
  method: "oVirt live backup with require_consistency (VDSM froze the guest through its agent around backupBegin)",
  freezeMs: null,
  reason: null,
};

/** A live backup retried without require_consistency after its freeze failed (`try`). */
export function liveBackupUnfrozen(why: string): Consistency {
  return { level: 'crash', method: 'oVirt live backup without require_consistency after the freeze failed', freezeMs: null, reason: why };
}

/**
 * Why a live backup's `ready` does not say the guest was frozen on this oVirt, if it does not: VDSM honours
 * `require_consistency` from 4.4.4 (vdsm commit 677d4c31b, 2020-11-12, "backup: add require_consistency"); an
 * older one ignores it and a failed freeze does not fail the backup. The hosts' VDSM version is not in the
 * backup API: the engine's (GET the API root, product_info/version) stands for it (a 4.4.4 engine ships with
 * 4.4.4 hosts; an older host under a newer engine is not detected).
 */
export async function consistencyIgnored(client: OvirtClient): Promise<string | undefined> {
  const version = await client.read('', productVersion);
  const [major, minor, revision] = version;
  if (major > 4 || (major === 4 && (minor > 4 || (minor === 4 && revision >= 4)))) return undefined;
  return `oVirt ${version.join('.')} is older than 4.4.4: its VDSM ignores require_consistency, so a live backup does not say whether the guest was frozen`;
}

/** A live backup whose `ready` does not say the guest was frozen (an oVirt before 4.4.4, a VM no longer up). */
export function liveBackupUnproven(why: string): Consistency {
  return { level: 'crash', method: 'oVirt live backup, its freeze not proven', freezeMs: null, reason: why };
}
