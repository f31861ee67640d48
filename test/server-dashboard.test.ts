/**
 * The web dashboard of engine server (SPEC.md 23, "The dashboard"), in a real browser: Debian's Chromium (/usr/bin/chromium,
 * scripts/setup.sh installs it) driven by playwright-core, against a real server on 127.0.0.1 with a tokens file
 * and a real format-3 repository holding small qcow2 backups made by the test.
 *
 * It signs in with an operator token, sees the VMs and a chain's timeline, starts a backup from the page's form
 * and watches its progress reach the end over the job's event stream, sees a failed job listed with its code,
 * starts a restore from the page (its bytes compared with the image), sees a hostile backup name as text,
 * signs in with a read-only token (no start form; the server refuses its
 * form and its API call all the same), checks the Content-Security-Policy (an inline script is refused) and that
 * the browser logged no error, and signs out. Screenshots go to test-output/dashboard/ (its path is printed).
 *
 * The slow source is nbdkit's pattern plugin behind its delay filter, one thread: 24 MiB, each read answered
 * after 150 ms, so the page sees the job running before it ends.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { access, mkdir } from 'node:fs/promises';
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium, type Browser, type Page } from 'playwright-core';
import { initRepository, runEngine, tempDir, waitFor } from './helpers.js';
import { qcow2, qemuImgCompare, qemuIo } from './qemu.js';
import { call, jobEnd, startServer, writeConfig, type RunningServer } from './server-helpers.js';

const CHROMIUM = '/usr/bin/chromium';
const SCREENSHOTS = fileURLToPath(new URL('../test-output/dashboard/', import.meta.url));
const HOSTILE = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">&amp;"\'';
const CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

let dir: string;
let cleanup: () => Promise<void>;
let server: RunningServer;
let nbdkit: ChildProcess;
let slowUri: string;
let operator: string;
let reader: string;
let browser: Browser;
let failed: { id: string; error: { code: string; message: string } };
let vm1: string[];
const consoleErrors: string[] = [];

type Job = { id: string; state: string; result: { id: string; parent: string | null; type: string } | null; error: { code: string; message: string } | null };

async function token(role: string, label: string): Promise<string> {
  const made = await runEngine(['server', 'token', 'add', '--role', role, '--file', join(dir, 'tokens'), '--label', label]);
  expect(made.code, made.stderr).toBe(0);
  return made.stdout.trim();
}

async function backupJob(body: Record<string, unknown>): Promise<Job> {
  const answer = await call(server, 'POST', '/api/v1/jobs', { repository: 'main', kind: 'backup', ...body }, { token: operator });
  expect(answer.status, answer.text).toBe(202);
  return (await jobEnd(server, (answer.json as Job).id, { token: operator })) as unknown as Job;
}

async function newPage(): Promise<Page> {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.on('console', (message) => {
    if (message.type() === 'error') consoleErrors.push(message.text());
  });
  page.on('pageerror', (error) => consoleErrors.push(error.message));
  return page;
}

async function signIn(page: Page, secret: string): Promise<void> {
  await page.goto(`${server.url}/`);
  expect(new URL(page.url()).pathname).toBe('/login');
  await page.getByLabel('Token').fill(secret);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.waitForURL(`${server.url}/`);
}

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-dashboard-'));
  const repo = join(dir, 'repo');
  await initRepository(repo);
  operator = await token('operator', 'ops');
  reader = await token('read', 'viewer');
  const socket = join(dir, 'slow.sock');
  nbdkit = spawn('nbdkit', ['-f', '--exit-with-parent', '-t', '1', '-U', socket, '--filter=delay', 'pattern', '24M', 'rdelay=150ms'], { stdio: 'ignore' });
  await waitFor('nbdkit listens', () => access(socket).then(() => true, () => false), { child: nbdkit });
  slowUri = `nbd+unix:///?socket=${socket}`;
  // A policy whose one slot a year is far from any run of this test: the page shows it, nothing runs.
  const policies = { yearly: { vms: { sources: [{ name: 'vm1', disks: [{ kind: 'image', path: join(dir, 'vm1.qcow2'), name: 'vda' }] }] }, repository: 'main', schedule: '0 3 1 1 *', timeZone: 'UTC' } };
  const config = await writeConfig(dir, { stateDir: join(dir, 'state'), tokensFile: join(dir, 'tokens'), repositories: { main: { location: repo } }, policies });
  server = await startServer(['--config', config, '--listen', '127.0.0.1:0']);
  // A VM of two restore points (a full backup and one on top of it), and one with a hostile name.
  const image = join(dir, 'vm1.qcow2');
  await qcow2(image, '8M');
  await qemuIo(image, ['write -P 0x11 0 3M']);
  const full = await backupJob({ name: 'vm1', disks: [{ kind: 'image', path: image, name: 'vda' }] });
  await qemuIo(image, ['write -P 0x22 4M 1M']);
  const second = await backupJob({ name: 'vm1', disks: [{ kind: 'image', path: image, name: 'vda' }] });
  expect([full.state, second.state], JSON.stringify([full.error, second.error])).toEqual(['succeeded', 'succeeded']);
  vm1 = [full.result!.id, second.result!.id];
  expect(second.result!.parent).toBe(full.result!.id);
  const hostile = await backupJob({ name: HOSTILE, disks: [{ kind: 'image', path: image, name: 'vdb' }] });
  expect(hostile.state).toBe('succeeded');
  failed = (await backupJob({ name: 'gone', disks: [{ kind: 'image', path: join(dir, 'no-such-disk.qcow2') }] })) as typeof failed;
  expect(failed.error?.code).toMatch(/^ENGINE_/);
  await mkdir(SCREENSHOTS, { recursive: true });
  console.log(`dashboard screenshots: ${SCREENSHOTS}`);
  // Debian's Chromium, never a downloaded build; as root it runs without its sandbox.
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox'] });
});

afterAll(async () => {
  await browser?.close();
  await server?.stop();
  if (nbdkit && nbdkit.exitCode === null) nbdkit.kill('SIGTERM');
  await cleanup?.();
});

describe('engine server: the dashboard in Chromium', () => {
  test('an operator signs in, sees the VMs and a chain, a failure and a hostile name as text, starts a backup and watches it finish, signs out', async () => {
    const page = await newPage();
    const first = await page.goto(`${server.url}/`);
    expect(first!.url()).toBe(`${server.url}/login`);
    await page.screenshot({ path: join(SCREENSHOTS, '1-login.png') });
    await page.getByLabel('Token').fill('engine_not-a-token');
    await page.getByRole('button', { name: 'Sign in' }).click();
    await expect(page.getByRole('alert').textContent()).resolves.toContain('not known');
    // The wrong token's answer is a 401 page, which the browser logs; nothing else may be logged.
    expect(consoleErrors.splice(0)).toEqual(['Failed to load resource: the server responded with a status of 401 (Unauthorized)']);
    await signIn(page, operator);
    const cookies = await page.context().cookies();
    expect(cookies.map((c) => ({ name: c.name, httpOnly: c.httpOnly, sameSite: c.sameSite }))).toEqual([{ name: 'engine_session', httpOnly: true, sameSite: 'Strict' }]);
    expect(cookies[0]!.value).not.toContain(operator);

    // The VMs: vm1 with a chain of 2, its disk, consistency, never boot-tested.
    const row = page.locator('table.protection tr[data-vm="vm1"]');
    const cells = await row.locator('td').allTextContents();
    expect(cells[0]).toContain('vda');
    expect(cells[1]).toContain(vm1[1]!.slice(0, 8));
    expect(cells[3]).toBe('2 (full + 1)');
    expect(cells[4]).toContain('crash');
    expect(cells[5]).toBe('not tested');
    expect(cells[6]).toBe('2');
    // The policies: the yearly one, its schedule and next slot (1 January, 03:00 UTC), no run yet.
    const policy = await page.locator('#policies-table tr[data-policy="yearly"] td').allTextContents();
    expect(policy.slice(0, 3)).toEqual(['yearly', 'main', '0 3 1 1 * (UTC)']);
    const year = new Date().getUTCFullYear();
    expect(policy[3]).toBe(`${Date.now() < Date.UTC(year, 0, 1, 3) ? year : year + 1}-01-01 03:00:00 UTC`);
    expect(policy[5]).toBe('none yet');
    // Its timeline: the full backup starts the chain, the second links to it.
    const points = page.locator(`li#b-${vm1[1]!}`);
    expect(await points.getAttribute('class')).toContain('linked');
    expect(await points.locator('.link a').getAttribute('href')).toBe(`#b-${vm1[0]!}`);
    expect(await page.locator(`li#b-${vm1[0]!} .link`).textContent()).toBe('starts a chain');

    // The hostile name is text: no script of its own ran, no element came from it.
    expect(await page.locator('table.protection th[scope="row"]').allTextContents()).toEqual([HOSTILE, 'vm1'].sort());
    expect(await page.evaluate('typeof window.__xss')).toBe('undefined');
    expect(await page.locator('script').count()).toBe(1);
    expect(await page.locator('img').count()).toBe(1); // the bench chart's

    // The failure, with its code and message.
    const failure = page.locator(`#failures-table tr[data-job="${failed.id}"] td`);
    expect(await failure.nth(4).textContent()).toBe(failed.error.code);
    expect(await failure.nth(5).textContent()).toBe(failed.error.message);
    await page.screenshot({ path: join(SCREENSHOTS, '2-dashboard.png'), fullPage: true });

    // A backup started from the page's form: its row follows the job's event stream to the end.
    await page.getByLabel('Name').fill('slow');
    await page.getByLabel('Disk kind').selectOption('nbd');
    await page.getByLabel('Disk (path on the server, or URI)').fill(slowUri);
    await page.getByRole('button', { name: 'Start backup' }).click();
    await page.waitForURL(/\/\?started=[0-9a-f]{32}#jobs$/);
    const id = new URL(page.url()).searchParams.get('started')!;
    const job = page.locator(`#running-jobs tr[data-job="${id}"]`);
    await job.locator('td.state', { hasText: 'running' }).waitFor({ timeout: 30_000 });
    // A function, not a string: the page's CSP refuses the eval that polling a string would need. Typed for
    // Node, so the page's document is described here.
    await page.waitForFunction((jobId) => {
      const page = globalThis as unknown as { document: { querySelector(selector: string): { value: number; max: number } | null } };
      const bar = page.document.querySelector(`tr[data-job="${jobId}"] progress`);
      return bar !== null && bar.value > 0 && bar.value < bar.max;
    }, id);
    await page.screenshot({ path: join(SCREENSHOTS, '3-running.png') });
    await job.locator('td.state', { hasText: 'succeeded' }).waitFor({ timeout: 60_000 });
    expect(await job.getAttribute('data-state')).toBe('succeeded');
    const bar = [Number(await job.locator('progress').getAttribute('value')), Number(await job.locator('progress').getAttribute('max'))];
    expect(bar).toEqual([24 * 1024 * 1024, 24 * 1024 * 1024]);
    expect(await job.locator('.progress-text').textContent()).toMatch(/^100% \(24\.0 MiB of 24\.0 MiB\)/);
    const done = (await call(server, 'GET', `/api/v1/jobs/${id}`, undefined, { token: operator })).json as Job & { startedBy: string };
    expect(done).toMatchObject({ state: 'succeeded', startedBy: 'ops', result: { name: 'slow', type: 'full' } });
    await page.screenshot({ path: join(SCREENSHOTS, '4-done.png') });

    // A restore started from the page: vm1's newest restore point to a raw file, the guest's bytes back.
    const restored = join(dir, 'vm1-restored.raw');
    await page.getByLabel('Restore point').selectOption(`main/${vm1[1]!}`);
    await page.getByLabel('Target kind').selectOption('file');
    await page.getByLabel('Target (path on the server, or URI)').fill(restored);
    await page.getByRole('button', { name: 'Start restore' }).click();
    await page.waitForURL(/\/\?started=[0-9a-f]{32}#jobs$/);
    const restoreId = new URL(page.url()).searchParams.get('started')!;
    await page.locator(`tr[data-job="${restoreId}"] td.state`, { hasText: 'succeeded' }).waitFor({ timeout: 60_000 });
    expect(await qemuImgCompare(join(dir, 'vm1.qcow2'), 'qcow2', restored, 'raw')).toBe(true);
    // The picture in README (docs/dashboard.png is a copy of it): the top of the page, as a person first sees it.
    await page.setViewportSize({ width: 1100, height: 760 });
    await page.goto(`${server.url}/`);
    await page.screenshot({ path: join(SCREENSHOTS, 'readme.png') });

    // No error in the browser so far: every script, style and image came from the server, as the CSP allows.
    expect(consoleErrors).toEqual([]);
    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.waitForURL(`${server.url}/login`);
    await page.goto(`${server.url}/`);
    expect(new URL(page.url()).pathname).toBe('/login');
    await page.context().close();
  });

  test('a read-only token sees no start form, and the server refuses it anyway; the CSP refuses inline script; another origin cannot post', async () => {
    const page = await newPage();
    await signIn(page, reader);
    expect(await page.locator('form#start-backup').count()).toBe(0);
    expect(await page.getByRole('button', { name: /Start/ }).count()).toBe(0);
    expect(await page.locator('.who').textContent()).toContain('viewer (read)');
    const csrf = (await page.locator('meta[name="csrf-token"]').getAttribute('content'))!;
    // The page's own session, with its CSRF token: the form's path and the API both say no.
    const refused = await page.evaluate(async (token) => {
      const form = await fetch('/ui/jobs', { method: 'POST', headers: { 'content-type': 'application/x-www-form-urlencoded' }, body: new URLSearchParams({ csrf: token, kind: 'backup', repository: 'main', disk: '/etc/hostname' }) });
      const api = await fetch('/api/v1/jobs', { method: 'POST', headers: { 'content-type': 'application/json', 'x-csrf-token': token }, body: JSON.stringify({ kind: 'backup', repository: 'main', disks: [{ kind: 'raw', path: '/etc/hostname' }] }) });
      const noCsrf = await fetch('/api/v1/jobs?state=running');
      return [form.status, ((await form.json()) as { error: { code: string } }).error.code, api.status, noCsrf.status];
    }, csrf);
    expect(refused).toEqual([403, 'ENGINE_FORBIDDEN', 403, 200]);
    expect(consoleErrors.splice(0)).toEqual(Array(2).fill('Failed to load resource: the server responded with a status of 403 (Forbidden)'));

    // The Content-Security-Policy of the page, and the browser keeps it: an inline script does not run.
    const answer = await page.goto(`${server.url}/`);
    expect(answer!.headers()['content-security-policy']).toBe(CSP);
    expect(consoleErrors).toEqual([]);
    // (Strings run in the page: the tests are typed for Node, not the DOM.)
    await page.evaluate(`(() => {
      const script = document.createElement('script');
      script.textContent = 'window.__inline = 1';
      document.body.append(script);
    })()`);
    expect(await page.evaluate('typeof window.__inline')).toBe('undefined');
    expect(consoleErrors.some((e) => /Content Security Policy/.test(e))).toBe(true);
    await page.screenshot({ path: join(SCREENSHOTS, '5-read-only.png'), fullPage: true });
    await page.context().close();

    // A page of another origin posting the operator's form: refused by its Origin (and it has no cookie: SameSite).
    const operatorPage = await newPage();
    await signIn(operatorPage, operator);
    const cookie = (await operatorPage.context().cookies())[0]!;
    const foreign = await call(server, 'POST', '/ui/jobs', 'kind=backup&repository=main&disk=/etc/hostname', { headers: { 'content-type': 'application/x-www-form-urlencoded', origin: 'http://evil.example', cookie: `${cookie.name}=${cookie.value}` } });
    expect(foreign.status).toBe(403);
    // The API with the session cookie but without its CSRF token: refused.
    const noToken = await call(server, 'POST', '/api/v1/jobs', { kind: 'backup', repository: 'main', disks: [{ kind: 'raw', path: '/etc/hostname' }] }, { headers: { cookie: `${cookie.name}=${cookie.value}` } });
    expect(noToken.status).toBe(403);
    expect((noToken.json as { error: { code: string } }).error.code).toBe('ENGINE_FORBIDDEN');
    await operatorPage.context().close();
  });
});
