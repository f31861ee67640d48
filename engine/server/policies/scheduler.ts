/**
 * The scheduler (SPEC.md 23.1): one loop per policy sleeps until its next slot on the injected clock, then
 * starts a run per VM of the policy; each run is a series of jobs of the server's job manager (backup at the
 * slot's level, then prune, verify, boot test, copy), so the server's limits and queue hold for them as for
 * jobs posted to the API. The loop awaits a slot's runs being recorded, not their end: a slot comes when it
 * is due, whatever the last one is doing.
 *
 * One job at a time per VM: a run whose VM is being read (by a run of any policy, or a backup job posted to
 * the API) is recorded `skipped` (ENGINE_VM_BUSY) rather than waiting. Waiting would start a second backup
 * right after the first, reading what changed in minutes, and behind a backup slower than its interval the
 * waiting runs would pile up without end; the next slot comes anyway, and a skipped run is seen (and fires
 * the failure hooks).
 *
 * Downtime: at start, the slots missed since the last slot started (state.json) are caught up once — one run
 * for the newest of them, `missedSlots` saying how many it stands for. A run the previous process was in
 * (kill -9, crash) is marked failed ENGINE_SERVER_RESTARTED and, when it was of the last slot started,
 * run again once for that slot (`resume`); runs of that slot that had finished are not repeated.
 */
import { randomBytes } from 'node:crypto';
import { EngineError, InterruptedError } from '../../../repo-format/errors.js';
import type { ServerConfig } from '../config.js';
import { errorJson } from '../http.js';
import type { JobError, JobRecord } from '../journal.js';
import type { JobManager } from '../jobs.js';
import type { JobRequest } from '../job-requests.js';
import { NotFoundError, VerifyFailedError, VmBusyError } from '../errors.js';
import type { Clock } from './clock.js';
import { countSlots, cronMatches, nextSlot, previousSlot, wallTime } from './cron.js';
import type { Level, Policy } from './config.js';
import { createHooks, redactUrl, type Hooks } from './hooks.js';
import { selectVms, vmKey, type PolicyVm } from './select.js';
import { FINAL_RUN_STATES, PolicyStore, type RunJob, type RunRecord, type RunTrigger } from './store.js';

/** Missed slots are counted up to this (a run's `missedSlots`): beyond, the number says "at least". */
const MISSED_CAP = 10_000;

interface Runtime {
  policy: Policy;
  store: PolicyStore;
  lastSlot: number | null;
  since: number;
  nextSlot: number | null;
}

/** A job of a run that did not succeed: the run's error is the job's. */
class StepFailed extends Error {
  constructor(readonly error: JobError) {
    super(error.message);
  }
}

/** The level of a slot: the first rule whose `when` matches the slot's wall time in the policy's zone; none, `auto`. */
export function levelOf(policy: Policy, slot: number): Level {
  const wall = wallTime(slot, policy.timeZone);
  return policy.levels.find((rule) => cronMatches(rule.when, wall))?.level ?? 'auto';
}

/** A policy as `GET /api/v1/policies` shows it (openapi.json's Policy). */
function policyJson(rt: Runtime) {
  const { policy } = rt;
  const last = rt.store.all().at(-1);
  return {
    name: policy.name,
    repository: policy.repository,
    vms: vmsJson(policy),
    schedule: policy.schedule.source,
    timeZone: policy.timeZone,
    levels: policy.levels.map((l) => ({ when: l.when.source, level: l.level })),
    retention: policy.retention === undefined ? null : { keep: policy.retention },
    verify: policy.verify === undefined ? null : { readData: policy.verify.readData, subset: policy.verify.subset ?? null },
    bootTest: policy.bootTest === undefined ? null : { timeoutSeconds: policy.bootTest.timeoutSeconds ?? null, memoryMiB: policy.bootTest.memoryBytes === undefined ? null : policy.bootTest.memoryBytes / 1024 / 1024, expectConsole: policy.bootTest.expectConsole ?? null },
    copyTo: policy.copyTo ?? null,
    // Where hooks go, not what they carry: a URL without its user, password or query.
    notify: policy.notify === undefined ? null : { on: [...policy.notify.on], command: policy.notify.command?.[0] ?? null, url: policy.notify.url === undefined ? null : redactUrl(policy.notify.url), timeoutSeconds: policy.notify.timeoutMs / 1000 },
    lastSlot: rt.lastSlot === null ? null : new Date(rt.lastSlot).toISOString(),
    nextSlot: rt.nextSlot === null ? null : new Date(rt.nextSlot).toISOString(),
    lastRun: last === undefined ? null : { id: last.id, vm: last.vm, slot: last.slot, state: last.state },
  };
}

export type PolicyJson = ReturnType<typeof policyJson>;

export class Scheduler {
  private readonly runtimes = new Map<string, Runtime>();
  /** VM key -> what reads it (a run's description). */
  private readonly busy = new Map<string, string>();
  private readonly controller = new AbortController();
  private readonly loops: Promise<void>[] = [];
  private readonly inFlight = new Set<Promise<void>>();
  private readonly hooks: Hooks;

  private constructor(
    private readonly config: ServerConfig,
    private readonly jobs: JobManager,
    private readonly clock: Clock,
    private readonly log: (message: string) => void,
  ) {
    this.hooks = createHooks(log);
  }

  static async start(config: ServerConfig, jobs: JobManager, clock: Clock, log: (message: string) => void): Promise<Scheduler> {
    const scheduler = new Scheduler(config, jobs, clock, log);
    for (const policy of config.policies.values()) {
      const store = await PolicyStore.open(config.stateDir, policy.name);
      let state = await store.state();
      if (!state) {
        // First seen now: slots before this moment are not this policy's to catch up.
        state = { lastSlot: null, since: new Date(clock.now()).toISOString() };
        await store.setState(state);
      }
      const runtime: Runtime = { policy, store, lastSlot: state.lastSlot === null ? null : Date.parse(state.lastSlot), since: Date.parse(state.since), nextSlot: null };
      scheduler.runtimes.set(policy.name, runtime);
    }
    for (const runtime of scheduler.runtimes.values()) scheduler.loops.push(scheduler.loop(runtime));
    return scheduler;
  }

  private async loop(rt: Runtime): Promise<void> {
    const { policy } = rt;
    const signal = this.controller.signal;
    try {
      const interrupted = await this.recover(rt);
      const now = this.clock.now();
      const floor = Math.max(rt.lastSlot ?? -Infinity, rt.since);
      const due = previousSlot(policy.schedule, now, policy.timeZone, floor);
      if (due !== undefined) {
        const missed = countSlots(policy.schedule, floor, now, policy.timeZone, MISSED_CAP);
        this.log(`policy ${policy.name}: ${missed} slot${missed === 1 ? '' : 's'} missed while the server was down; one catch-up run for ${new Date(due).toISOString()}`);
        await this.startSlot(rt, due, 'catch-up', missed);
      } else if (rt.lastSlot !== null) {
        const again = interrupted.filter((r) => Date.parse(r.slot) === rt.lastSlot && r.trigger !== 'manual');
        if (again.length > 0) await this.startSlot(rt, rt.lastSlot, 'resume', 0, again);
      }
      // Never a slot again that was started already, even when the clock was set back since.
      let after = Math.max(now, due ?? -Infinity, rt.lastSlot ?? -Infinity);
      while (!signal.aborted) {
        const next = nextSlot(policy.schedule, after, policy.timeZone);
        rt.nextSlot = next;
        await this.clock.sleepUntil(next, signal);
        if (signal.aborted) break;
        // Woken late (a suspended machine, a clock set forward): the newest slot due, once, as at start.
        const latest = previousSlot(policy.schedule, this.clock.now(), policy.timeZone, next - 1) ?? next;
        const missed = latest === next ? 1 : countSlots(policy.schedule, next - 1, this.clock.now(), policy.timeZone, MISSED_CAP);
        await this.startSlot(rt, latest, missed > 1 ? 'catch-up' : 'schedule', missed > 1 ? missed : 0);
        after = latest;
      }
    } catch (error) {
      if (!signal.aborted) this.log(`policy ${policy.name}: the scheduler stopped for it: ${(error as Error).message}`);
    }
  }

  /** A slot of the loop: a failure to record its runs (a full disk) is logged, and the loop goes on to the next slot. */
  private async startSlot(rt: Runtime, slot: number, trigger: RunTrigger, missedSlots: number, resume: RunRecord[] = []): Promise<void> {
    await this.runSlot(rt, slot, trigger, missedSlots, resume).catch((error: unknown) => this.log(`policy ${rt.policy.name}: cannot start the runs of slot ${new Date(slot).toISOString()}: ${(error as Error).message}`));
  }

  private background(run: Promise<unknown>): void {
    const tracked: Promise<void> = run.then(
      () => undefined,
      (error: unknown) => this.log(`a policy run failed outside its record: ${(error as Error).message}`),
    );
    void tracked.finally(() => this.inFlight.delete(tracked));
    this.inFlight.add(tracked);
  }

  /** Runs the previous process left `running`: failed ENGINE_SERVER_RESTARTED, their jobs' ends as the job journal has them. */
  private async recover(rt: Runtime): Promise<RunRecord[]> {
    const interrupted = rt.store.all().filter((r) => !FINAL_RUN_STATES.includes(r.state));
    for (const run of interrupted) {
      for (const job of run.jobs) {
        const record = this.jobRecord(job.id);
        if (record) Object.assign(job, { state: record.state, error: record.error });
      }
      run.state = 'failed';
      run.endedAt = new Date(this.clock.now()).toISOString();
      run.error = errorJson(new EngineError('ENGINE_SERVER_RESTARTED', `the server stopped while this run was at its ${run.jobs.at(-1)?.step ?? 'start'}; ${run.trigger === 'manual' ? 'a manual run is not run again' : 'its VM is run again for its slot when that slot is the last one started'}`, { run: run.id, jobs: run.jobs.map((j) => j.id) }));
      await rt.store.save(run);
      this.log(`policy ${rt.policy.name}: run ${run.id} (${run.vm}, slot ${run.slot}) was running when the server stopped: marked failed, ENGINE_SERVER_RESTARTED`);
      if (rt.policy.notify) this.hooks.fire(rt.policy.notify, run);
    }
    return interrupted;
  }

  private jobRecord(id: string): JobRecord | undefined {
    try {
      return this.jobs.get(id);
    } catch {
      return undefined;
    }
  }

  /** Who reads this VM now, if anyone: a run of a policy, or a backup job posted to the API. */
  private busyWith(key: string): string | undefined {
    const mine = this.busy.get(key);
    if (mine !== undefined) return mine;
    for (const state of ['running', 'queued']) {
      for (const job of this.jobs.list({ state })) {
        const from = (job.request as { from?: Record<string, unknown> }).from;
        if (job.kind === 'backup' && from !== undefined && vmKey(from) === key) return `job ${job.id}`;
      }
    }
    return undefined;
  }

  /**
   * One slot: the VMs chosen, a run each recorded (skipped ones too), then the slot named in state.json
   * (for a scheduled slot); returns then, the runs going on in the background, each VM on its own (the
   * loop sleeps to the next slot meanwhile). `resume`: only the VMs of those runs.
   */
  private async runSlot(rt: Runtime, slot: number, trigger: RunTrigger, missedSlots: number, resume: RunRecord[] = []): Promise<RunRecord[]> {
    const { policy } = rt;
    const level = levelOf(policy, slot);
    const now = (): string => new Date(this.clock.now()).toISOString();
    const newRun = (vm: string): RunRecord => ({
      id: randomBytes(16).toString('hex'),
      policy: policy.name,
      vm,
      slot: new Date(slot).toISOString(),
      trigger,
      missedSlots,
      level,
      state: 'running',
      startedAt: now(),
      endedAt: null,
      jobs: [],
      backup: null,
      error: null,
      resumes: null,
    });
    let vms: PolicyVm[];
    try {
      vms = await selectVms(policy, (m) => this.log(`policy ${policy.name}: ${m}`));
      if (resume.length > 0) vms = vms.filter((vm) => resume.some((r) => r.vm === vm.name));
    } catch (error) {
      // No VM list, no runs: one failed run says so (and fires the hooks); the slot counts as started.
      const run = { ...newRun('*'), state: 'failed' as const, endedAt: now(), error: errorJson(error) };
      await rt.store.save(run);
      await this.slotStarted(rt, slot, trigger);
      this.ended(rt, run);
      return [run];
    }
    const started: { run: RunRecord; vm: PolicyVm }[] = [];
    const runs: RunRecord[] = [];
    for (const vm of vms) {
      const run = newRun(vm.name);
      run.resumes = resume.find((r) => r.vm === vm.name)?.id ?? null;
      const by = this.busyWith(vm.key);
      if (by !== undefined) {
        Object.assign(run, { state: 'skipped', endedAt: run.startedAt, error: errorJson(new VmBusyError(vm.name, by)) });
      } else {
        this.busy.set(vm.key, `policy ${policy.name} run ${run.id}`);
        started.push({ run, vm });
      }
      runs.push(run);
    }
    try {
      for (const run of runs) await rt.store.save(run);
      await this.slotStarted(rt, slot, trigger);
    } catch (error) {
      for (const { vm } of started) this.busy.delete(vm.key);
      throw error;
    }
    for (const run of runs) if (run.state === 'skipped') this.ended(rt, run);
    // As many VMs at once as the server runs jobs: the rest wait here rather than fill the job queue.
    const queue = [...started];
    const worker = async (): Promise<void> => {
      for (let next = queue.shift(); next !== undefined; next = queue.shift()) await this.execute(rt, next.run, next.vm);
    };
    this.background(Promise.all(Array.from({ length: Math.min(queue.length, this.config.jobs) }, worker)));
    return runs;
  }

  private async slotStarted(rt: Runtime, slot: number, trigger: RunTrigger): Promise<void> {
    if (trigger === 'manual' || (rt.lastSlot !== null && rt.lastSlot >= slot)) return;
    rt.lastSlot = slot;
    await rt.store.setState({ lastSlot: new Date(slot).toISOString(), since: new Date(rt.since).toISOString() });
  }

  private async execute(rt: Runtime, run: RunRecord, vm: PolicyVm): Promise<void> {
    const { policy } = rt;
    const repository = policy.repository;
    try {
      const backup = await this.step(rt, run, 'backup', {
        kind: 'backup',
        repository,
        // An oVirt backup is named after its VM by the flow itself.
        name: vm.from.kind === 'ovirt' ? undefined : vm.name,
        chain: { mode: run.level },
        workers: policy.workers,
        from: vm.from,
      });
      run.backup = String(backup.result?.id);
      await rt.store.save(run);
      const name = String(backup.result?.name ?? vm.name);
      if (policy.retention) await this.step(rt, run, 'prune', { kind: 'prune', repository, policy: policy.retention, dryRun: false, names: [name] });
      if (policy.verify) {
        const verify = await this.step(rt, run, 'verify', { kind: 'verify', repository, readData: policy.verify.readData, subset: policy.verify.subset, seed: undefined, workers: policy.workers });
        if (verify.result?.ok === false) throw new VerifyFailedError(verify.id, Array.isArray(verify.result.problems) ? verify.result.problems.length : 0);
      }
      if (policy.bootTest) await this.step(rt, run, 'boot', { kind: 'boot', repository, backup: run.backup, ...policy.bootTest });
      if (policy.copyTo) await this.step(rt, run, 'copy', { kind: 'copy', repository, to: policy.copyTo, selection: { kind: 'ids', ids: [run.backup] } });
      run.state = 'succeeded';
    } catch (error) {
      run.state = 'failed';
      run.error = error instanceof StepFailed ? error.error : errorJson(error);
    } finally {
      this.busy.delete(vm.key);
    }
    if (run.state === 'failed' && this.controller.signal.aborted) {
      // Stopped with the server (SIGTERM): its record stays `running` on disk, so the next start treats it
      // as one a kill cut short, failed and run again for its slot, exactly as after a kill -9.
      this.log(`policy ${policy.name}: run ${run.id} (${run.vm}) stopped with the server: the next start runs it again for its slot`);
      return;
    }
    run.endedAt = new Date(this.clock.now()).toISOString();
    // Stopping (SIGTERM): the run's jobs were cancelled; its end is recorded all the same.
    await rt.store.save(run).catch((error: unknown) => this.log(`policy ${policy.name}: cannot record the end of run ${run.id}: ${(error as Error).message}`));
    this.ended(rt, run);
  }

  private ended(rt: Runtime, run: RunRecord): void {
    if (run.state !== 'succeeded') this.log(`policy ${rt.policy.name}: run ${run.id} (${run.vm}, slot ${run.slot}) ${run.state}: ${run.error?.code ?? ''} ${run.error?.message ?? ''}`.trim());
    if (rt.policy.notify) this.hooks.fire(rt.policy.notify, structuredClone(run));
  }

  /** One job of a run through the job manager, awaited; a job that does not succeed fails the run with its error. */
  private async step(rt: Runtime, run: RunRecord, step: RunJob['step'], request: JobRequest): Promise<JobRecord> {
    if (this.controller.signal.aborted) throw new StepFailed(errorJson(stopping()));
    const job = await this.jobs.submit(request, `policy ${rt.policy.name}`);
    // Followed at once, before anything else is awaited: a job that ends meanwhile is still in memory.
    const ended = new Promise<JobRecord>((resolve) => {
      let last: JobRecord | undefined;
      this.jobs.subscribe(
        job.id,
        0,
        (event) => {
          if (event.type === 'end') last = event.data.job as JobRecord;
        },
        () => resolve(last ?? this.jobs.get(job.id)),
      );
    });
    const entry: RunJob = { step, id: job.id, state: job.state, error: null };
    run.jobs.push(entry);
    await rt.store.save(run);
    const { state, error } = await ended;
    Object.assign(entry, { state, error });
    await rt.store.save(run);
    if (state !== 'succeeded') throw new StepFailed(error ?? { code: 'ENGINE_INTERNAL', message: `job ${job.id} ended ${state}`, details: {} });
    return ended;
  }

  // ---- The API's view ----

  private runtime(name: string): Runtime {
    const rt = this.runtimes.get(name);
    if (!rt) throw new NotFoundError(`no policy named ${JSON.stringify(name.slice(0, 64))} in this server's config`, { policy: name.slice(0, 64) });
    return rt;
  }

  list(): PolicyJson[] {
    return [...this.runtimes.values()].map((rt) => policyJson(rt));
  }

  get(name: string): PolicyJson {
    return policyJson(this.runtime(name));
  }

  /** The policy's runs, newest first. */
  runs(name: string, filter: { state?: string | undefined; vm?: string | undefined; limit: number }): RunRecord[] {
    const all = this.runtime(name).store.all();
    const out: RunRecord[] = [];
    for (let i = all.length - 1; i >= 0 && out.length < filter.limit; i--) {
      const run = all[i]!;
      if ((filter.state === undefined || run.state === filter.state) && (filter.vm === undefined || run.vm === filter.vm)) out.push(run);
    }
    return out;
  }

  /** `POST /policies/{p}/run`: a run per VM now (its slot the time asked), busy VMs skipped; the runs as started. */
  async runNow(name: string): Promise<RunRecord[]> {
    const rt = this.runtime(name);
    if (this.controller.signal.aborted) throw stopping();
    return (await this.runSlot(rt, this.clock.now(), 'manual', 0)).map((r) => structuredClone(r));
  }

  /** Stops the loops; runs in flight end as their jobs do (the job manager cancels those when the server stops). */
  async stop(): Promise<void> {
    this.controller.abort();
    await Promise.all(this.loops);
  }

  /** Every run started has ended and recorded its end (after the job manager stopped), and every hook has ended. */
  async settled(): Promise<void> {
    while (this.inFlight.size > 0) await Promise.all([...this.inFlight]);
    await this.hooks.settled();
  }
}

function stopping(): InterruptedError {
  return new InterruptedError('the policy run', 'the server is stopping: no further job of it was started');
}

function vmsJson(policy: Policy): Record<string, unknown> {
  const vms = policy.vms;
  switch (vms.kind) {
    case 'sources':
      return { sources: vms.vms.map((vm) => ({ name: vm.name, disks: vm.disks.map((d) => ({ ...d })) })) };
    case 'libvirt':
      return { libvirt: { domains: vms.domains, pattern: vms.pattern ?? null } };
    case 'ovirt':
      return { ovirt: { url: redactUrl(vms.url), cluster: vms.cluster ?? null, tag: vms.tag ?? null, pattern: vms.pattern ?? null } };
  }
}
