/**
 * The dashboard's pages, rendered on the server (SPEC.md 23, "The dashboard"): every value goes through `html` (html.ts) and
 * is escaped. The page reads only what the API answers (the catalogue, stats, jobs) and is complete without
 * script; the small module /assets/dashboard.js only follows running jobs' event streams.
 *
 * Size: the catalogue is summarised, never listed whole: one row per VM (backup name), at most VMS_PER_PAGE
 * rows a page, and each VM's newest TIMELINE_POINTS restore points; a catalogue of 10,000 backups makes a page
 * of the same size as one of 1,000 (bench/dashboard.ts measures it).
 */
import type { BackupRecord } from '../../../repo-format/backup-record.js';
import type { BootSummary } from '../../catalogue/catalogue.js';
import { consistencyOf } from '../../catalogue/json.js';
import type { Principal } from '../auth.js';
import { chainOf, type Catalogue } from '../catalogue.js';
import type { JobRecord } from '../journal.js';
import { html, type Markup } from './html.js';

export const VMS_PER_PAGE = 50;
export const TIMELINE_POINTS = 12;
/** Restore points offered in a restore form's list (the newest). */
const RESTORE_CHOICES = 200;
const FAILURES_SHOWN = 20;

export interface RepositoryView {
  name: string;
  location: string;
  catalogue: Catalogue | undefined;
  stats: Record<string, unknown> | undefined;
  /** Why the repository could not be read (then catalogue and stats are undefined). */
  error: { code: string; message: string } | undefined;
}

export interface BenchView {
  /** The chart's URL when the checkout has results; else why not. */
  chart: string | undefined;
  caption: string;
}

export interface PageInput {
  principal: Principal;
  csrf: string;
  repositories: RepositoryView[];
  jobs: JobRecord[];
  bench: BenchView;
  now: number;
  vmPage: number;
  notice: string | undefined;
  /** The scheduled policies (policies/scheduler.ts, SPEC.md 23.1), as `GET /api/v1/policies` lists them. */
  policies: PolicyView[];
}

/** What the page shows of a policy: the API's fields it needs. */
export interface PolicyView {
  name: string;
  repository: string;
  schedule: string;
  timeZone: string;
  nextSlot: string | null;
  lastSlot: string | null;
  lastRun: { id: string; vm: string; slot: string; state: string } | null;
}

/**
 * The page around a body. The script element's end tag is written `</${'script'}>`: a template literal holding
 * the text `</script` is one the bundler (rolldown) rewrites with a runtime helper package the engine does not
 * depend on, to keep it safe inside an inline HTML script.
 */
function layout(title: string, body: Markup, csrf?: string): Markup {
  return html`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
${csrf === undefined ? '' : html`<meta name="csrf-token" content="${csrf}">`}
<title>${title}</title>
<link rel="stylesheet" href="/assets/dashboard.css">
<script type="module" src="/assets/dashboard.js"></${'script'}>
</head>
<body>
<a class="skip" href="#main">Skip to content</a>
${body}
</body>
</html>
`;
}

export function loginPage(error: string | undefined): Markup {
  return layout(
    'Sign in — engine server',
    html`<main id="main" class="login">
<h1>engine server</h1>
<form method="post" action="/login">
<p><label for="token">Token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required spellcheck="false" aria-describedby="token-help${error === undefined ? '' : ' login-error'}"></p>
<p id="token-help" class="help">A token of this server (<code>engine server token add</code>). It is sent once; the browser keeps only a session cookie.</p>
${error === undefined ? '' : html`<p id="login-error" class="error" role="alert">${error}</p>`}
<p><button type="submit">Sign in</button></p>
</form>
</main>`,
  );
}

export function messagePage(title: string, message: string): Markup {
  return layout(title, html`<main id="main"><h1>${title}</h1><p class="error" role="alert">${message}</p><p><a href="/">Back to the dashboard</a></p></main>`);
}

export function dashboardPage(input: PageInput): Markup {
  const operator = input.principal.role === 'operator';
  const running = input.jobs.filter((j) => j.state === 'running' || j.state === 'queued');
  const recent = input.jobs.filter((j) => j.state === 'succeeded' || j.state === 'cancelled').slice(-5).reverse();
  const failures = input.jobs.filter((j) => j.state === 'failed').slice(-FAILURES_SHOWN).reverse();
  return layout(
    'engine server',
    html`<header>
<h1>engine server</h1>
<p class="who">Signed in as <strong>${input.principal.label}</strong> (${input.principal.role})</p>
<form method="post" action="/logout" class="logout"><input type="hidden" name="csrf" value="${input.csrf}"><button type="submit">Sign out</button></form>
<nav aria-label="Sections"><ul>
<li><a href="#protection">Protection</a></li><li><a href="#jobs">Jobs</a></li><li><a href="#failures">Failures</a></li>
<li><a href="#usage">Usage</a></li><li><a href="#policies">Policies</a></li><li><a href="#bench">Bench</a></li>
</ul></nav>
</header>
<main id="main">
${input.notice === undefined ? '' : html`<p class="notice" role="status">${input.notice}</p>`}
<section id="protection" aria-labelledby="protection-h">
<h2 id="protection-h">Protection</h2>
${input.repositories.map((r) => repositorySection(r, input.now, input.vmPage))}
</section>
<section id="jobs" aria-labelledby="jobs-h">
<h2 id="jobs-h">Running jobs</h2>
${jobsTable(running, 'running-jobs', 'No job is running or queued.')}
${recent.length === 0 ? '' : html`<h3>Recently finished</h3>${jobsTable(recent, 'recent-jobs', '')}`}
${operator ? startForms(input.repositories, input.csrf) : html`<p class="help">This token may read only: starting a backup or a restore needs an operator token.</p>`}
</section>
<section id="failures" aria-labelledby="failures-h">
<h2 id="failures-h">Recent failures</h2>
${failures.length === 0 ? html`<p>No job failed among the jobs this server keeps (the newest 200 finished).</p>` : failuresTable(failures)}
</section>
<section id="usage" aria-labelledby="usage-h">
<h2 id="usage-h">Repository usage</h2>
${input.repositories.map((r) => usage(r))}
</section>
<section id="policies" aria-labelledby="policies-h">
<h2 id="policies-h">Policies</h2>
${input.policies.length === 0 ? html`<p>This server's config names no policy: backups run when a job is posted.</p>` : policiesTable(input.policies)}
</section>
<section id="bench" aria-labelledby="bench-h">
<h2 id="bench-h">Bench</h2>
${input.bench.chart === undefined ? html`<p>${input.bench.caption}</p>` : html`<figure><img src="${input.bench.chart}" alt="Bar chart of the newest bench results: MB/s of the engine and its peers per scenario" width="900"><figcaption>${input.bench.caption}</figcaption></figure>`}
</section>
</main>`,
    input.csrf,
  );
}

function jobsTable(jobs: JobRecord[], id: string, empty: string): Markup {
  if (jobs.length === 0) return html`<p id="${id}-empty">${empty}</p><table id="${id}" hidden><tbody></tbody></table>`;
  return html`<table id="${id}">
<thead><tr><th scope="col">Job</th><th scope="col">Kind</th><th scope="col">Repository</th><th scope="col">What</th><th scope="col">State</th><th scope="col">Progress</th><th scope="col">Started by</th></tr></thead>
<tbody>${jobs.map((j) => jobRow(j))}</tbody>
</table>`;
}

function jobRow(job: JobRecord): Markup {
  const p = job.progress;
  const what = jobSubject(job);
  return html`<tr id="job-${job.id}" data-job="${job.id}" data-state="${job.state}">
<td><code title="${job.id}">${job.id.slice(0, 8)}</code></td><td>${job.kind}</td><td>${job.repository}</td><td>${what}</td>
<td class="state">${job.state}</td>
<td class="progress"><progress max="${p?.total ?? 1}" value="${p?.done ?? 0}" aria-label="Progress of job ${job.id.slice(0, 8)}"></progress> <span class="progress-text">${progressText(p)}</span></td>
<td>${job.startedBy}</td>
</tr>`;
}

function jobSubject(job: JobRecord): string {
  const r = job.request as Record<string, unknown>;
  if (job.kind === 'backup') return typeof r.name === 'string' ? r.name : 'backup';
  if (job.kind === 'restore') return `backup ${String(r.backup).slice(0, 12)}`;
  return '';
}

function progressText(p: JobRecord['progress']): string {
  if (!p) return '';
  const pct = p.total > 0 ? Math.floor((p.done * 100) / p.total) : 0;
  return p.unit === 'bytes' ? `${pct}% (${mib(p.done)} of ${mib(p.total)}) ${p.phase}` : `${pct}% (${p.done} of ${p.total} ${p.unit}) ${p.phase}`;
}

function mib(bytes: number): string {
  return `${(bytes / 1048576).toFixed(1)} MiB`;
}

function policiesTable(policies: PolicyView[]): Markup {
  return html`<table id="policies-table">
<thead><tr><th scope="col">Policy</th><th scope="col">Repository</th><th scope="col">Schedule</th><th scope="col">Next slot</th><th scope="col">Last slot</th><th scope="col">Last run</th></tr></thead>
<tbody>${policies.map(
    (p) => html`<tr data-policy="${p.name}"><td>${p.name}</td><td>${p.repository}</td><td><code>${p.schedule}</code> (${p.timeZone})</td><td>${timeEl(p.nextSlot)}</td><td>${timeEl(p.lastSlot)}</td><td>${p.lastRun === null ? 'none yet' : html`${p.lastRun.vm}: <span class="state-${p.lastRun.state}">${p.lastRun.state}</span>`}</td></tr>`,
  )}</tbody>
</table>`;
}

function failuresTable(jobs: JobRecord[]): Markup {
  return html`<table id="failures-table">
<thead><tr><th scope="col">Ended</th><th scope="col">Kind</th><th scope="col">Repository</th><th scope="col">What</th><th scope="col">Code</th><th scope="col">Message</th></tr></thead>
<tbody>${jobs.map(
    (j) => html`<tr data-job="${j.id}"><td>${timeEl(j.endedAt)}</td><td>${j.kind}</td><td>${j.repository}</td><td>${jobSubject(j)}</td><td><code>${j.error?.code ?? ''}</code></td><td>${j.error?.message ?? ''}</td></tr>`,
  )}</tbody>
</table>`;
}

function timeEl(iso: string | null): Markup {
  if (iso === null) return html``;
  const d = new Date(iso);
  return html`<time datetime="${d.toISOString()}">${d.toISOString().slice(0, 19).replace('T', ' ')} UTC</time>`;
}

export function age(ms: number): string {
  const minutes = Math.max(0, Math.floor(ms / 60000));
  if (minutes < 60) return `${minutes} min`;
  const hours = Math.floor(minutes / 60);
  if (hours < 48) return `${hours} h ${minutes % 60} min`;
  return `${Math.floor(hours / 24)} days`;
}

interface VmSummary {
  name: string;
  backups: BackupRecord[];
}

function vmsOf(backups: readonly BackupRecord[]): VmSummary[] {
  const byName = new Map<string, BackupRecord[]>();
  for (const b of backups) {
    let list = byName.get(b.name);
    if (!list) byName.set(b.name, (list = []));
    list.push(b);
  }
  return [...byName.entries()].sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0)).map(([name, list]) => ({ name, backups: list }));
}

function repositorySection(view: RepositoryView, now: number, vmPage: number): Markup {
  const heading = html`<h3 id="repo-${view.name}">Repository ${view.name} <span class="location">${view.location}</span></h3>`;
  if (!view.catalogue) return html`${heading}<p class="error">Cannot read it: <code>${view.error?.code ?? ''}</code> ${view.error?.message ?? ''}</p>`;
  const { backups, damaged, boots } = view.catalogue;
  const byId = new Map(backups.map((b) => [b.id, b]));
  const vms = vmsOf(backups);
  const pages = Math.max(1, Math.ceil(vms.length / VMS_PER_PAGE));
  const page = Math.min(vmPage, pages - 1);
  const shown = vms.slice(page * VMS_PER_PAGE, (page + 1) * VMS_PER_PAGE);
  return html`${heading}
<p>${backups.length} backups of ${vms.length} VMs${damaged.length > 0 ? html`; <strong class="error">${damaged.length} damaged records</strong> (<code>engine verify</code> says more)` : ''}.</p>
${vms.length === 0 ? html`<p>No backup yet.</p>` : html`<table class="protection" data-repository="${view.name}">
<caption>VMs of ${view.name}${pages > 1 ? `, page ${page + 1} of ${pages}` : ''}</caption>
<thead><tr><th scope="col">VM</th><th scope="col">Disks</th><th scope="col">Last good backup</th><th scope="col">Age</th><th scope="col">Chain</th><th scope="col">Consistency</th><th scope="col">Boot test</th><th scope="col">Restore points</th></tr></thead>
<tbody>${shown.map((vm) => vmRow(vm, byId, boots, now))}</tbody>
</table>
${pages > 1 ? pager(page, pages) : ''}
<h4>Restore points</h4>
${shown.map((vm) => timeline(vm, byId))}`}`;
}

function pager(page: number, pages: number): Markup {
  return html`<nav class="pager" aria-label="VM pages"><ul>
${page > 0 ? html`<li><a href="/?vmPage=${page - 1}#protection" rel="prev">Previous VMs</a></li>` : ''}
<li aria-current="page">Page ${page + 1} of ${pages}</li>
${page + 1 < pages ? html`<li><a href="/?vmPage=${page + 1}#protection" rel="next">Next VMs</a></li>` : ''}
</ul></nav>`;
}

function vmRow(vm: VmSummary, byId: ReadonlyMap<string, BackupRecord>, boots: Record<string, BootSummary>, now: number): Markup {
  // Last good: the newest restore point whose chain reaches its full backup (a record is all or nothing).
  let good: BackupRecord | undefined;
  let chain: ReturnType<typeof chainOf> | undefined;
  for (let i = vm.backups.length - 1; i >= 0 && !good; i--) {
    const c = chainOf(vm.backups[i]!, byId);
    if (c.full !== null) [good, chain] = [vm.backups[i]!, c];
  }
  const newest = vm.backups.at(-1)!;
  const disks = (good ?? newest).disks;
  const boot = good ? boots[good.id] : undefined;
  const consistency = good ? consistencyOf(good) : undefined;
  const ageMs = good ? now - Date.parse(good.endTime) : 0;
  return html`<tr data-vm="${vm.name}">
<th scope="row"><a href="#tl-${anchor(vm.name)}">${vm.name}</a></th>
<td>${disks.map((d, i) => html`${i > 0 ? ', ' : ''}${d.name} <span class="size">(${gib(d.size)})</span>`)}</td>
<td>${good ? html`${timeEl(good.endTime)} <code title="${good.id}">${good.id.slice(0, 8)}</code> ${good.type}` : html`<span class="error">none: every chain is broken</span>`}</td>
<td class="${good && ageMs > 26 * 3600_000 ? 'stale' : ''}">${good ? age(ageMs) : ''}</td>
<td>${chain ? `${chain.length} (${chain.length === 1 ? 'full' : `full + ${chain.length - 1}`})` : ''}</td>
<td>${consistency ? html`${consistency.level} <span class="help">${consistency.method}</span>` : ''}</td>
<td>${boot ? html`<span class="${boot.result === 'passed' ? 'ok' : 'error'}">${boot.result}</span> ${timeEl(boot.ended)}` : 'not tested'}</td>
<td>${vm.backups.length}</td>
</tr>`;
}

/** An id for a VM's timeline: names are free text, so the anchor is their hex. */
function anchor(name: string): string {
  return Buffer.from(name, 'utf8').toString('hex').slice(0, 64);
}

function gib(bytes: number): string {
  return bytes >= 1073741824 ? `${(bytes / 1073741824).toFixed(1)} GiB` : `${(bytes / 1048576).toFixed(1)} MiB`;
}

function timeline(vm: VmSummary, byId: ReadonlyMap<string, BackupRecord>): Markup {
  const points = vm.backups.slice(-TIMELINE_POINTS);
  const older = vm.backups.length - points.length;
  return html`<div class="timeline" id="tl-${anchor(vm.name)}">
<h5>${vm.name}</h5>
${older > 0 ? html`<p class="help">${older} older restore points are not shown (<code>GET /api/v1/repositories/…/backups?name=</code> lists them all).</p>` : ''}
<ol>${points.map((b, i) => {
    const linked = b.parent !== null && points[i - 1]?.id === b.parent;
    const broken = b.parent !== null && !byId.has(b.parent);
    return html`<li id="b-${b.id}" class="point ${b.type}${linked ? ' linked' : ''}${broken ? ' broken' : ''}">
<span class="type">${b.type}</span> ${timeEl(b.startTime)} <code title="${b.id}">${b.id.slice(0, 8)}</code>
${b.parent === null ? html`<span class="link">starts a chain</span>` : broken ? html`<span class="link error">parent ${b.parent.slice(0, 8)} is missing: broken chain</span>` : html`<span class="link">after <a href="#b-${b.parent}">${b.parent.slice(0, 8)}</a></span>`}
</li>`;
  })}</ol>
</div>`;
}

function usage(view: RepositoryView): Markup {
  const s = view.stats;
  if (!s) return html`<h3>${view.name}</h3><p class="error">${view.error?.message ?? 'no statistics'}</p>`;
  const bars: [string, number, string][] = [
    ['Logical (disks summed over backups)', Number(s.logicalBytes), 'logical'],
    ['Data (without all-zero blocks)', Number(s.dataBytes), 'data'],
    ['New (after deduplication)', Number(s.newBytes), 'new'],
    ['Stored (packs, after compression)', Number(s.storedBytes), 'stored'],
  ];
  const max = Math.max(1, ...bars.map((b) => b[1]));
  const width = 560;
  const left = 250;
  return html`<figure class="usage" data-repository="${view.name}">
<figcaption>${view.name}: ${String(s.backups)} backups, ${String(s.packs)} packs; dedupe ${s.dedupeRatio === null ? 'n/a' : `${String(s.dedupeRatio)}×`}, compression ${s.compressionRatio === null ? 'n/a' : `${String(s.compressionRatio)}×`} (estimates)</figcaption>
<svg role="img" aria-labelledby="usage-title-${view.name}" width="${left + width + 120}" height="${bars.length * 28 + 8}" viewBox="0 0 ${left + width + 120} ${bars.length * 28 + 8}">
<title id="usage-title-${view.name}">Bytes of ${view.name}: ${bars.map(([label, value]) => `${label} ${gib(value)}`).join('; ')}</title>
${bars.map(([label, value, cls], i) => {
    const w = Math.max(1, (width * value) / max);
    return html`<text x="${left - 8}" y="${i * 28 + 22}" text-anchor="end">${label}</text><rect class="${cls}" x="${left}" y="${i * 28 + 6}" width="${w.toFixed(1)}" height="20"></rect><text x="${(left + w + 6).toFixed(1)}" y="${i * 28 + 22}">${gib(value)}</text>`;
  })}
</svg>
</figure>`;
}

function startForms(repositories: RepositoryView[], csrf: string): Markup {
  const repoOptions = repositories.map((r) => html`<option value="${r.name}">${r.name}</option>`);
  const restorable = repositories.flatMap((r) => (r.catalogue?.backups.slice(-RESTORE_CHOICES).reverse() ?? []).map((b) => ({ repo: r.name, b })));
  return html`<div class="start">
<form method="post" action="/ui/jobs" id="start-backup" aria-labelledby="start-backup-h">
<h3 id="start-backup-h">Start a backup</h3>
<input type="hidden" name="csrf" value="${csrf}"><input type="hidden" name="kind" value="backup">
<p><label for="b-repo">Repository</label> <select id="b-repo" name="repository">${repoOptions}</select></p>
<p><label for="b-name">Name</label> <input id="b-name" name="name" placeholder="the disk's file name"></p>
<p><label for="b-disk-kind">Disk kind</label> <select id="b-disk-kind" name="diskKind"><option value="image">image (qcow2, raw file)</option><option value="raw">raw (file or device)</option><option value="nbd">NBD URI</option></select></p>
<p><label for="b-disk">Disk (path on the server, or URI)</label> <input id="b-disk" name="disk" required></p>
<p><label for="b-mode">Mode</label> <select id="b-mode" name="mode"><option>auto</option><option>full</option><option>incremental</option><option>differential</option></select></p>
<p><button type="submit">Start backup</button></p>
</form>
<form method="post" action="/ui/jobs" id="start-restore" aria-labelledby="start-restore-h">
<h3 id="start-restore-h">Start a restore</h3>
<input type="hidden" name="csrf" value="${csrf}"><input type="hidden" name="kind" value="restore">
<p><label for="r-backup">Restore point</label> <select id="r-backup" name="backup" required>${restorable.map(({ repo, b }) => html`<option value="${repo}/${b.id}">${repo}: ${b.name} — ${b.startTime.slice(0, 19).replace('T', ' ')} (${b.type}, ${b.id.slice(0, 8)})</option>`)}</select></p>
<p><label for="r-target-kind">Target kind</label> <select id="r-target-kind" name="targetKind"><option value="file">file (raw)</option><option value="qcow2">qcow2</option><option value="path">path (device or file)</option><option value="nbd">NBD URI</option></select></p>
<p><label for="r-target">Target (path on the server, or URI)</label> <input id="r-target" name="target" required></p>
<p><input type="checkbox" id="r-force" name="force" value="yes"> <label for="r-force">Overwrite an existing target</label></p>
<p><button type="submit">Start restore</button></p>
</form>
</div>`;
}
