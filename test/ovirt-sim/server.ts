/**
 * An oVirt engine simulator: real HTTP, the documented element names, status codes and async states
 * (../shared/reference/ovirt-rest-api.md). No oVirt engine can run here; this is the one simulated part of
 * the test set-up, and everything under it is real: every disk is a qcow2 file, a snapshot is a real qcow2
 * overlay (the frozen image stays below it), removing a snapshot merges the overlay back with
 * `qemu-img commit`.
 *
 * Attaching a disk to the appliance VM makes its data readable the way the appliance would see a hot-plugged
 * virtio disk, at `<deviceRoot>/virtio-<first 20 characters of the disk id>`: no real device node can exist
 * here, so the path is an nbdfuse file (libnbd-bin) serving the image through qemu-nbd — a read-only frozen
 * snapshot image for backups, the writable disk for restores. Detaching unmounts it.
 *
 * The 4.4+ backup API is a cold backup: a checkpoint is a qcow2 bitmap `sim-<checkpoint id>` in each disk,
 * each backup disk is a read-only qemu-nbd export (with `-B` of the base checkpoint for incremental disks),
 * and imageio's data plane (OPTIONS, ranged GET, /extents?context=zero|dirty) is served from those exports
 * through the engine's NBD client.
 *
 * Fault injection: snapshot creation fails, N × 409 on a request, every token expires (now, or after N
 * requests), an image transfer goes paused_system, the engine restarts in the middle of a backup.
 * Runnable on its own: `npm run ovirt-sim` (main.ts).
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { randomUUID } from 'node:crypto';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdir, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { AddressInfo } from 'node:net';
import { NbdClient } from '../../engine/nbd/client.js';
import { stopProcess } from '../../engine/process.js';

export interface SimDisk {
  id: string;
  alias: string;
  size: number;
  /** The active (writable) layer. */
  image: string;
  status: 'locked' | 'ok';
  storageDomain: string;
}

export const STORAGE_DOMAIN_ID = '5e7d0f3a-0000-4000-8000-00000000da7a';
export const CLUSTER_ID = 'c1a55e00-0000-4000-8000-0000000000c1';

export interface SimSnapshot {
  id: string;
  description: string;
  status: 'locked' | 'ok';
  /** Per disk id: the frozen image at snapshot time (the overlay's backing file). */
  frozen: Map<string, string>;
  ovf: string;
  removing: boolean;
}

export interface SimAttachment {
  diskId: string;
  snapshotId: string | undefined;
  active: boolean;
  device: string | undefined;
  fuse: ChildProcess | undefined;
}

export interface SimVm {
  id: string;
  name: string;
  status: 'up' | 'down';
  cluster: string;
  /** The OVF the VM was imported from, if it was. */
  importedOvf: string | undefined;
  disks: string[];
  snapshots: Map<string, SimSnapshot>;
  attachments: Map<string, SimAttachment>;
  checkpoints: SimCheckpoint[];
}

export interface SimCheckpoint {
  id: string;
  parentId: string | undefined;
  state: 'created' | 'invalid';
}

export interface SimBackup {
  id: string;
  vmId: string;
  phase: 'initializing' | 'ready' | 'finalizing' | 'succeeded' | 'failed';
  from: string | undefined;
  to: string;
  disks: string[];
  /** Per disk: 'full' | 'incremental', and its read-only export. */
  modes: Map<string, 'full' | 'incremental'>;
  exports: Map<string, { socket: string; pid: number }>;
}

export interface SimTransfer {
  id: string;
  diskId: string;
  /** The backup a download belongs to; empty for an upload. */
  backupId: string;
  direction: 'download' | 'upload';
  /** An upload's own writable export. */
  upload?: { socket: string; pid: number };
  phase: 'initializing' | 'transferring' | 'paused_system' | 'finished_success' | 'finished_failure' | 'cancelled_user';
  ticket: string;
}

export interface SimRequest {
  method: string;
  path: string;
  headers: IncomingMessage['headers'];
  status: number;
}

export interface SimOptions {
  /** Where disk images and the appliance's device files live. */
  dir: string;
  username?: string;
  password?: string;
  port?: number;
  /** How long snapshots stay locked (creation and removal). */
  lockMs?: number;
  /** Serve the API over HTTPS with this key and certificate (PEM), as a real engine does. */
  tls?: { key: string; cert: string };
}

export interface OvirtSim {
  url: string;
  imageioUrl: string;
  backups: Map<string, SimBackup>;
  transfers: Map<string, SimTransfer>;
  deviceRoot: string;
  vms: Map<string, SimVm>;
  disks: Map<string, SimDisk>;
  requests: SimRequest[];
  faults: {
    /** The next `count` requests matching method and path answer 409 with an oVirt conflict fault. */
    conflict(method: string, path: RegExp, count: number): void;
    /** Every token issued so far stops working (as after the engine's token lifetime). */
    expireTokens(): void;
    /** The next snapshot creation fails: the snapshot disappears while locked, as the engine reports it. */
    failNextSnapshot(): void;
    /** After `count` more API requests, every token expires (in the middle of a run). */
    expireTokensAfter(count: number): void;
    /** The next image transfer goes to paused_system instead of transferring. */
    pauseNextTransfer(): void;
    /** The engine restarts: tokens are gone, running backups fail (and stop being monitored). */
    restartEngine(): Promise<void>;
    /** The engine restarts after `count` more API requests whose path matches. */
    restartEngineAfter(path: RegExp, count: number): void;
  };
  addVm(name: string, disks: { alias: string; size: string }[], status?: SimVm['status']): Promise<SimVm>;
  /** A new disk for an existing VM (a disk added between backups). */
  addDisk(vm: SimVm, alias: string, size: string): Promise<SimDisk>;
  stop(): Promise<void>;
}

function tool(command: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(command, args, (error, stdout, stderr) => (error ? reject(new Error(`${command} ${args.join(' ')}: ${stderr || error.message}`)) : resolve(stdout)));
  });
}

function xmlEscape(value: string): string {
  return value.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

function xmlUnescape(value: string): string {
  return value
    .replace(/&lt;/g, '<')
    .replace(/&gt;/g, '>')
    .replace(/&quot;/g, '"')
    .replace(/&apos;/g, "'")
    .replace(/&#(\d+);/g, (_, n: string) => String.fromCodePoint(Number(n)))
    .replace(/&#x([0-9a-f]+);/gi, (_, n: string) => String.fromCodePoint(parseInt(n, 16)))
    .replace(/&amp;/g, '&');
}

export function faultXml(reason: string, detail: string): string {
  return `<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<fault>\n    <detail>${xmlEscape(detail)}</detail>\n    <reason>${xmlEscape(reason)}</reason>\n</fault>\n`;
}

const API = '/ovirt-engine/api';

function ovfFor(vm: SimVm, disks: Map<string, SimDisk>): string {
  const diskItems = vm.disks
    .map((id) => `<Disk ovf:diskId="${id}" ovf:size="${Math.ceil(disks.get(id)!.size / 2 ** 30)}" ovf:fileRef="${id}" ovf:format="http://www.gnome.org/~markmc/qcow-image-format.html"/>`)
    .join('');
  return `<?xml version='1.0' encoding='UTF-8'?><ovf:Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1/" ovf:version="4.5"><References/><Section xsi:type="ovf:DiskSection_Type" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">${diskItems}</Section><Content ovf:id="out" xsi:type="ovf:VirtualSystem_Type" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><Name>${xmlEscape(vm.name)}</Name><VmId>${vm.id}</VmId></Content></ovf:Envelope>`;
}

async function readBodyBuffer(req: IncomingMessage): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

async function readBody(req: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

function tagText(xml: string, tag: string): string | undefined {
  return new RegExp(`<${tag}>([^<]*)</${tag}>`).exec(xml)?.[1];
}

export async function startOvirtSim(options: SimOptions): Promise<OvirtSim> {
  const username = options.username ?? 'admin@internal';
  const password = options.password ?? 'secret';
  const lockMs = options.lockMs ?? 300;
  const imagesDir = join(options.dir, 'images');
  const deviceRoot = join(options.dir, 'dev', 'disk', 'by-id');
  await mkdir(imagesDir, { recursive: true });
  await mkdir(deviceRoot, { recursive: true });
  const tokens = new Set<string>();
  const vms = new Map<string, SimVm>();
  const disks = new Map<string, SimDisk>();
  const requests: SimRequest[] = [];
  const conflicts: { method: string; path: RegExp; left: number }[] = [];
  let failNextSnapshot = false;
  let restartAfter: { path: RegExp; left: number } | undefined;
  let pauseNextTransfer = false;
  const backups = new Map<string, SimBackup>();
  const transfers = new Map<string, SimTransfer>();
  const tickets = new Map<string, { socket: string; size: number; dirtyBitmap: string | undefined; writable?: boolean }>();
  let expireAfter = -1;
  const timers = new Set<NodeJS.Timeout>();
  const later = (ms: number, work: () => Promise<void>): void => {
    const timer = setTimeout(() => {
      timers.delete(timer);
      void work().catch((error: unknown) => process.stderr.write(`ovirt-sim: ${String(error)}\n`));
    }, ms);
    timers.add(timer);
  };

  const vmXml = (vm: SimVm, allContent: boolean): string =>
    `<vm href="${API}/vms/${vm.id}" id="${vm.id}"><name>${xmlEscape(vm.name)}</name><status>${vm.status}</status>` +
    (allContent ? `<initialization><configuration><type>ovf</type><data>${xmlEscape(ovfFor(vm, disks))}</data></configuration></initialization>` : '') +
    `<link href="${API}/vms/${vm.id}/snapshots" rel="snapshots"/><link href="${API}/vms/${vm.id}/diskattachments" rel="diskattachments"/></vm>`;

  const snapshotXml = (vm: SimVm, s: SimSnapshot, allContent: boolean): string =>
    `<snapshot href="${API}/vms/${vm.id}/snapshots/${s.id}" id="${s.id}"><description>${xmlEscape(s.description)}</description>` +
    `<snapshot_status>${s.status}</snapshot_status><snapshot_type>regular</snapshot_type><persist_memorystate>false</persist_memorystate>` +
    (allContent ? `<initialization><configuration><type>ovf</type><data>${xmlEscape(s.ovf)}</data></configuration></initialization>` : '') +
    `<vm href="${API}/vms/${vm.id}" id="${vm.id}"/></snapshot>`;

  /*
   * ovirt-imageio's data plane (IMAGEIO docs/images.md): OPTIONS, GET with a Range, and
   * /extents?context=zero|dirty, served from the backup's qemu-nbd export through an NBD client.
   */
  let imageioUrl = '';
  const nbdClients = new Map<string, Promise<NbdClient>>();
  const nbdFor = (ticket: string, t: { socket: string; dirtyBitmap: string | undefined }): Promise<NbdClient> => {
    let client = nbdClients.get(ticket);
    if (!client) {
      client = NbdClient.connect(`nbd+unix:///?socket=${t.socket}`, { metaContexts: ['base:allocation', ...(t.dirtyBitmap ? [`qemu:dirty-bitmap:${t.dirtyBitmap}`] : [])] });
      nbdClients.set(ticket, client);
    }
    return client;
  };
  const imageio: Server = createServer((req, res) => {
    void (async () => {
      const url = new URL(req.url ?? '/', 'http://imageio');
      const match = /^\/images\/([^/]+)(\/extents)?$/.exec(url.pathname);
      const t = match ? tickets.get(match[1]!) : undefined;
      if (!match || !t) {
        res.writeHead(403, { 'Content-Type': 'text/plain' });
        return res.end('You are not allowed to access this resource: the ticket does not exist, has expired, or was canceled');
      }
      if (req.method === 'OPTIONS') {
        res.writeHead(200, { Allow: 'GET,PUT,PATCH,OPTIONS', 'Content-Type': 'application/json' });
        return res.end(JSON.stringify({ unix_socket: null, features: ['extents', 'zero', 'flush'], max_readers: 4, max_writers: 4 }));
      }
      const client = await nbdFor(match[1]!, t);
      if (req.method === 'PUT' || req.method === 'PATCH') {
        if (!t.writable) {
          res.writeHead(403, { 'Content-Type': 'text/plain' });
          return res.end('This ticket does not allow writing');
        }
        const body = await readBodyBuffer(req);
        if (req.method === 'PATCH') {
          const op = JSON.parse(body.toString('utf8')) as { op: string; offset?: number; size?: number };
          if (op.op === 'flush') await client.flush();
          else if (op.op === 'zero') await client.writeZeroes(op.offset ?? 0, op.size ?? 0);
          res.writeHead(200);
          return res.end();
        }
        const start = Number(/^bytes (\d+)-/.exec(String(req.headers['content-range'] ?? ''))?.[1] ?? 0);
        if (start + body.length > t.size) {
          res.writeHead(416);
          return res.end();
        }
        await client.write(body, start);
        if (url.searchParams.get('flush') !== 'n') await client.flush();
        res.writeHead(200);
        return res.end();
      }
      if (match[2]) {
        const context = url.searchParams.get('context') ?? 'zero';
        if (context === 'dirty' && !t.dirtyBitmap) {
          res.writeHead(404, { 'Content-Type': 'text/plain' });
          return res.end('Ticket does not support dirty extents');
        }
        const zero: { start: number; length: number; zero: boolean }[] = [];
        for await (const e of client.blockStatus('base:allocation')) zero.push({ start: e.offset, length: e.length, zero: (e.flags & 2) !== 0 });
        let body: unknown = zero.map((e) => ({ ...e, hole: false }));
        if (context === 'dirty') {
          const dirty: { start: number; length: number; dirty: boolean; zero: boolean }[] = [];
          for await (const e of client.blockStatus(`qemu:dirty-bitmap:${t.dirtyBitmap}`)) dirty.push({ start: e.offset, length: e.length, dirty: (e.flags & 1) !== 0, zero: false });
          body = dirty;
        }
        res.writeHead(200, { 'Content-Type': 'application/json' });
        return res.end(JSON.stringify(body));
      }
      const range = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '');
      const start = range ? Number(range[1]) : 0;
      const end = range ? Number(range[2]) : t.size - 1;
      if (start > end || end >= t.size) {
        res.writeHead(416, { 'Content-Range': `bytes */${t.size}` });
        return res.end();
      }
      const data = Buffer.alloc(end - start + 1);
      await client.read(data, start);
      res.writeHead(range ? 206 : 200, { 'Content-Type': 'application/octet-stream', 'Content-Length': String(data.length), ...(range ? { 'Content-Range': `bytes ${start}-${end}/*` } : {}) });
      res.end(data);
    })().catch((error: unknown) => {
      res.writeHead(500, { 'Content-Type': 'text/plain' });
      res.end(String(error));
    });
  });

  const backupXml = (vm: SimVm, b: SimBackup): string =>
    `<backup href="${API}/vms/${vm.id}/backups/${b.id}" id="${b.id}"><actions><link href="${API}/vms/${vm.id}/backups/${b.id}/finalize" rel="finalize"/></actions>` +
    `<link href="${API}/vms/${vm.id}/backups/${b.id}/disks" rel="disks"/>${b.from ? `<from_checkpoint_id>${b.from}</from_checkpoint_id>` : ''}<to_checkpoint_id>${b.to}</to_checkpoint_id>` +
    `<phase>${b.phase}</phase><disks>${b.disks.map((id) => `<disk id="${id}"/>`).join('')}</disks><vm href="${API}/vms/${vm.id}" id="${vm.id}"/></backup>`;

  const transferXml = (t: SimTransfer): string =>
    `<image_transfer href="${API}/imagetransfers/${t.id}" id="${t.id}"><direction>${t.direction}</direction><format>raw</format><phase>${t.phase}</phase>` +
    `<transfer_url>${imageioUrl}/images/${t.ticket}</transfer_url><proxy_url>${imageioUrl}/images/${t.ticket}</proxy_url><disk id="${t.diskId}"/><backup id="${t.backupId}"/></image_transfer>`;

  const stopExport = async (pid: number, socket: string): Promise<void> => {
    await stopProcess(pid);
    await rm(socket, { force: true });
  };

  const stopExports = async (backup: SimBackup): Promise<void> => {
    for (const { socket, pid } of backup.exports.values()) await stopExport(pid, socket);
    backup.exports.clear();
  };

  /** An engine restart: sessions are gone; backups it was running fail, their transfers and exports end. */
  const restart = async (): Promise<void> => {
    tokens.clear();
    for (const backup of backups.values()) {
      if (backup.phase === 'initializing' || backup.phase === 'ready') {
        backup.phase = 'failed'; // VM_BACKUP_FAILED_UNMONITORED: "cleanup may be required"
        await stopExports(backup);
      }
    }
    for (const transfer of transfers.values()) {
      if (transfer.phase === 'transferring' || transfer.phase === 'initializing' || transfer.phase === 'paused_system') transfer.phase = 'finished_failure';
      tickets.delete(transfer.ticket);
      const client = nbdClients.get(transfer.ticket);
      nbdClients.delete(transfer.ticket);
      await client?.then((c) => c.close(), () => undefined);
    }
  };

  const activeSnapshotXml = (vm: SimVm): string =>
    `<snapshot href="${API}/vms/${vm.id}/snapshots/active-${vm.id}" id="active-${vm.id}"><description>Active VM</description><snapshot_status>ok</snapshot_status><snapshot_type>active</snapshot_type></snapshot>`;

  const diskXml = (disk: SimDisk, extra = ''): string =>
    `<disk href="${API}/disks/${disk.id}" id="${disk.id}"><alias>${xmlEscape(disk.alias)}</alias><name>${xmlEscape(disk.alias)}</name><format>cow</format><provisioned_size>${disk.size}</provisioned_size><status>${disk.status}</status>` +
    `<storage_domains><storage_domain id="${disk.storageDomain}"/></storage_domains>${extra}</disk>`;

  const attachmentXml = (vm: SimVm, a: SimAttachment): string =>
    `<disk_attachment href="${API}/vms/${vm.id}/diskattachments/${a.diskId}" id="${a.diskId}"><active>${a.active}</active><bootable>false</bootable><interface>virtio</interface>` +
    (a.device ? `<logical_name>${a.device}</logical_name>` : '') +
    `<disk href="${API}/disks/${a.diskId}" id="${a.diskId}"/><vm href="${API}/vms/${vm.id}" id="${vm.id}"/></disk_attachment>`;

  /** Hot-plug: the image appears as a virtio disk of the appliance (an nbdfuse file). */
  const plug = async (a: SimAttachment, image: string, readOnly: boolean): Promise<void> => {
    const device = join(deviceRoot, `virtio-${a.diskId.slice(0, 20)}`);
    await writeFile(device, '');
    const fuse = spawn('nbdfuse', [...(readOnly ? ['-r'] : []), device, '--socket-activation', 'qemu-nbd', ...(readOnly ? ['-r'] : []), '-f', 'qcow2', image], { stdio: 'ignore' });
    a.fuse = fuse;
    for (let i = 0; i < 200; i += 1) {
      if ((await stat(device).then((s) => s.size, () => 0)) > 0) break;
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
    a.device = device;
  };

  const unplug = async (a: SimAttachment): Promise<void> => {
    if (!a.device) return;
    const fuse = a.fuse;
    await tool('umount', [a.device]).catch(() => undefined);
    if (fuse && fuse.exitCode === null) await new Promise((resolve) => fuse.once('exit', resolve));
    await rm(a.device, { force: true });
    a.device = undefined;
    a.fuse = undefined;
  };

  const attachedElsewhere = (snapshot: SimSnapshot): boolean => {
    for (const vm of vms.values()) for (const a of vm.attachments.values()) if (a.snapshotId === snapshot.id) return true;
    return false;
  };

  const send = (req: IncomingMessage, res: ServerResponse, status: number, body: string, type = 'application/xml'): void => {
    const correlation = req.headers['correlation-id'];
    res.writeHead(status, { 'Content-Type': type, ...(typeof correlation === 'string' ? { 'Correlation-Id': correlation.replace(/[^0-9a-zA-Z_-]/g, '') } : {}) });
    res.end(body);
    requests.push({ method: req.method ?? '', path: req.url ?? '', headers: req.headers, status });
  };
  const notFound = (req: IncomingMessage, res: ServerResponse, what: string): void => send(req, res, 404, faultXml('Operation Failed', `Entity not found: ${what}`));

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const url = new URL(req.url ?? '/', 'http://sim');
    const method = req.method ?? 'GET';
    if (url.pathname === '/ovirt-engine/sso/oauth/token' && method === 'POST') {
      const form = new URLSearchParams(await readBody(req));
      if (form.get('grant_type') !== 'password' || form.get('scope') !== 'ovirt-app-api') {
        return send(req, res, 400, JSON.stringify({ error: 'invalid_request', error_description: 'grant_type=password and scope=ovirt-app-api are required' }), 'application/json');
      }
      if (form.get('username') !== username || form.get('password') !== password) {
        return send(req, res, 400, JSON.stringify({ error: 'access_denied', error_description: 'Cannot authenticate user: Invalid credentials' }), 'application/json');
      }
      const token = randomUUID();
      tokens.add(token);
      return send(req, res, 200, JSON.stringify({ access_token: token, token_type: 'bearer', scope: 'ovirt-app-api', exp: String(Date.now() + 3_600_000) }), 'application/json');
    }
    if (!url.pathname.startsWith(API)) return send(req, res, 404, faultXml('Not Found', url.pathname));
    const auth = req.headers.authorization ?? '';
    if (!auth.startsWith('Bearer ') || !tokens.has(auth.slice(7))) {
      res.setHeader('WWW-Authenticate', 'Bearer');
      return send(req, res, 401, '', 'text/html');
    }
    if (expireAfter >= 0 && expireAfter-- === 0) tokens.clear();
    if (restartAfter && restartAfter.path.test(url.pathname) && restartAfter.left-- === 0) {
      restartAfter = undefined;
      await restart();
    }
    if (!auth.startsWith('Bearer ') || !tokens.has(auth.slice(7))) {
      res.setHeader('WWW-Authenticate', 'Bearer');
      return send(req, res, 401, '', 'text/html');
    }
    const version = req.headers.version;
    if (version !== undefined && version !== '4') return send(req, res, 400, faultXml('Operation Failed', `Version ${String(version)} is not supported`));
    const path = url.pathname.slice(API.length).replace(/\/$/, '');
    const allContent = req.headers['all-content'] === 'true' || url.searchParams.get('all_content') === 'true';
    const conflict = conflicts.find((c) => c.method === method && c.path.test(path) && c.left > 0);
    if (conflict) {
      conflict.left -= 1;
      return send(req, res, 409, faultXml('Operation Failed', '[Cannot perform action. Related operation is currently in progress. Please try again later.]'));
    }
    if (path === '' && method === 'GET') {
      return send(req, res, 200, '<api><product_info><name>oVirt Engine</name><vendor>ovirt.org</vendor><version><build>0</build><full_version>4.5.5-sim</full_version><major>4</major><minor>5</minor><revision>5</revision></version></product_info></api>');
    }
    if (path === '/vms' && method === 'GET') {
      const search = url.searchParams.get('search');
      const nameMatch = search ? /^name=(.+)$/.exec(search) : null;
      const list = [...vms.values()].filter((vm) => !nameMatch || vm.name === nameMatch[1]);
      return send(req, res, 200, `<vms>${list.map((vm) => vmXml(vm, allContent)).join('')}</vms>`);
    }
    if (path === '/clusters' && method === 'GET') {
      return send(req, res, 200, `<clusters><cluster href="${API}/clusters/${CLUSTER_ID}" id="${CLUSTER_ID}"><name>Default</name></cluster></clusters>`);
    }
    if (path === '/storagedomains' && method === 'GET') {
      return send(req, res, 200, `<storage_domains><storage_domain href="${API}/storagedomains/${STORAGE_DOMAIN_ID}" id="${STORAGE_DOMAIN_ID}"><name>data</name><type>data</type><status>active</status></storage_domain></storage_domains>`);
    }
    if (path === '/disks' && method === 'POST') {
      const body = await readBody(req);
      const format = tagText(body, 'format');
      const size = Number(tagText(body, 'provisioned_size'));
      const domain = /<storage_domain id="([^"]+)"/.exec(body)?.[1];
      const name = tagText(body, 'name') ?? tagText(body, 'alias');
      if (format !== 'cow' && format !== 'raw') return send(req, res, 400, faultXml('Incomplete parameters', 'Disk [format] required for add'));
      if (!Number.isSafeInteger(size) || size <= 0) return send(req, res, 400, faultXml('Incomplete parameters', 'Disk [provisionedSize] required for add'));
      if (domain !== STORAGE_DOMAIN_ID) return send(req, res, 400, faultXml('Operation Failed', `[Cannot add Virtual Disk. Storage Domain doesn't exist.]`));
      const id = /^<disk id="([^"]+)"/.exec(body.trim())?.[1] ?? randomUUID();
      if (disks.has(id)) return send(req, res, 409, faultXml('Operation Failed', `[Cannot add Virtual Disk. Disk ${id} already exists.]`));
      const image = join(imagesDir, `${id}.qcow2`);
      const disk: SimDisk = { id, alias: name ?? `disk-${id.slice(0, 8)}`, size, image, status: 'locked', storageDomain: domain };
      disks.set(id, disk);
      later(lockMs, async () => {
        await tool('qemu-img', ['create', '-q', '-f', format === 'cow' ? 'qcow2' : 'raw', image, String(size)]);
        disk.status = 'ok';
      });
      return send(req, res, 202, diskXml(disk));
    }
    const diskMatch = /^\/disks\/([^/]+)$/.exec(path);
    if (diskMatch && method === 'GET') {
      const disk = disks.get(diskMatch[1]!);
      return disk ? send(req, res, 200, diskXml(disk)) : notFound(req, res, diskMatch[1]!);
    }
    if (diskMatch && method === 'DELETE') {
      const disk = disks.get(diskMatch[1]!);
      if (!disk) return notFound(req, res, diskMatch[1]!);
      for (const owner of vms.values()) {
        if (owner.attachments.has(disk.id) || owner.disks.includes(disk.id)) {
          return send(req, res, 409, faultXml('Operation Failed', `[Cannot remove Virtual Disk. The disk is attached to VM ${owner.name}.]`));
        }
      }
      disks.delete(disk.id);
      await rm(disk.image, { force: true });
      return send(req, res, 200, '<action><status>complete</status></action>');
    }
    if (path === '/vms' && method === 'POST') {
      const body = await readBody(req);
      const name = tagText(body.replace(/<cluster>[\s\S]*?<\/cluster>/, '').replace(/<data>[\s\S]*?<\/data>/, ''), 'name');
      const data = /<data>(?:<!\[CDATA\[)?([\s\S]*?)(?:\]\]>)?<\/data>/.exec(body)?.[1];
      const type = tagText(body, 'type');
      if (!data || type !== 'ovf') return send(req, res, 400, faultXml('Incomplete parameters', 'Vm [initialization.configuration.type, initialization.configuration.data] required for add'));
      const ovf = body.includes('<![CDATA[') ? data : xmlUnescape(data);
      const vmName = name ?? /<Name>([^<]*)<\/Name>/.exec(ovf)?.[1];
      if (!vmName) return send(req, res, 400, faultXml('Incomplete parameters', 'Vm [name] required for add'));
      if ([...vms.values()].some((v) => v.name === vmName)) return send(req, res, 409, faultXml('Operation Failed', `[Cannot add VM. The VM name is already in use.]`));
      const clusterName = /<cluster>\s*<name>([^<]*)<\/name>/.exec(body)?.[1];
      if (clusterName !== undefined && clusterName !== 'Default') return send(req, res, 400, faultXml('Operation Failed', `[Cannot add VM. Cluster ${clusterName} doesn't exist.]`));
      const created: SimVm = { id: randomUUID(), name: vmName, status: 'down', cluster: CLUSTER_ID, importedOvf: ovf, disks: [], snapshots: new Map(), attachments: new Map(), checkpoints: [] };
      // ImportVmFromConfiguration attaches the OVF's disks that exist (by id) and are free.
      for (const [, diskId] of ovf.matchAll(/ovf:diskId="([^"]+)"/g)) {
        const disk = disks.get(diskId!);
        const taken = [...vms.values()].some((v) => v.disks.includes(diskId!) || v.attachments.has(diskId!));
        if (disk && !taken) {
          created.disks.push(disk.id);
          created.attachments.set(disk.id, { diskId: disk.id, snapshotId: undefined, active: true, device: undefined, fuse: undefined });
        }
      }
      vms.set(created.id, created);
      return send(req, res, 201, vmXml(created, false));
    }
    if (path === '/imagetransfers' && method === 'POST') {
      const body = await readBody(req);
      const diskId = /<disk id="([^"]+)"/.exec(body)?.[1];
      if (tagText(body, 'direction') === 'upload') {
        const disk = diskId ? disks.get(diskId) : undefined;
        if (!disk) return send(req, res, 404, faultXml('Operation Failed', `Entity not found: ${diskId}`));
        if (disk.status !== 'ok') return send(req, res, 409, faultXml('Operation Failed', '[Cannot transfer Virtual Disk. Disk is locked.]'));
        if (tagText(body, 'format') !== 'raw') return send(req, res, 400, faultXml('Operation Failed', '[Cannot transfer Virtual Disk. Upload format must be raw here.]'));
        const socket = join(options.dir, `up-${disk.id.slice(0, 8)}.sock`);
        await tool('qemu-nbd', ['-f', 'qcow2', '--socket', socket, '--persistent', '--shared', '8', '--fork', '--pid-file', `${socket}.pid`, disk.image]);
        const pid = Number((await (await import('node:fs/promises')).readFile(`${socket}.pid`, 'utf8')).trim());
        const transfer: SimTransfer = { id: randomUUID(), diskId: disk.id, backupId: '', direction: 'upload', upload: { socket, pid }, phase: 'initializing', ticket: randomUUID() };
        transfers.set(transfer.id, transfer);
        tickets.set(transfer.ticket, { socket, size: disk.size, dirtyBitmap: undefined, writable: true });
        disk.status = 'locked';
        later(lockMs / 2, async () => {
          if (transfer.phase === 'initializing') transfer.phase = 'transferring';
        });
        return send(req, res, 201, transferXml(transfer));
      }
      const backupId = /<backup id="([^"]+)"/.exec(body)?.[1];
      if (tagText(body, 'format') !== 'raw') return send(req, res, 400, faultXml('Operation Failed', '[Cannot transfer Virtual Disk. The format is not applicable for backup.]'));
      const backup = backupId ? backups.get(backupId) : undefined;
      if (!diskId || !backup || !backup.disks.includes(diskId)) return send(req, res, 400, faultXml('Operation Failed', '[Cannot transfer Virtual Disk. Backup or disk not found.]'));
      if (backup.phase !== 'ready') return send(req, res, 409, faultXml('Operation Failed', `[Cannot transfer Virtual Disk. The VM backup is not in READY phase, backup phase is ${backup.phase}.]`));
      const exported = backup.exports.get(diskId)!;
      const transfer: SimTransfer = { id: randomUUID(), diskId, backupId: backup.id, direction: 'download', phase: 'initializing', ticket: randomUUID() };
      transfers.set(transfer.id, transfer);
      tickets.set(transfer.ticket, { socket: exported.socket, size: disks.get(diskId)!.size, dirtyBitmap: backup.modes.get(diskId) === 'incremental' ? `sim-${backup.from}` : undefined });
      const paused = pauseNextTransfer;
      pauseNextTransfer = false;
      later(lockMs / 2, async () => {
        if (transfer.phase === 'initializing') transfer.phase = paused ? 'paused_system' : 'transferring';
      });
      return send(req, res, 201, transferXml(transfer));
    }
    const transferPath = /^\/imagetransfers\/([^/]+)(\/finalize|\/cancel)?$/.exec(path);
    if (transferPath) {
      const transfer = transfers.get(transferPath[1]!);
      if (!transfer) return notFound(req, res, transferPath[1]!);
      if (!transferPath[2] && method === 'GET') return send(req, res, 200, transferXml(transfer));
      if (transferPath[2] && method === 'POST') {
        const finalize = transferPath[2] === '/finalize' && transfer.phase === 'transferring';
        tickets.delete(transfer.ticket);
        const client = nbdClients.get(transfer.ticket);
        nbdClients.delete(transfer.ticket);
        await client?.then((c) => c.close(), () => undefined);
        later(lockMs / 2, async () => {
          if (transfer.upload) {
            await stopExport(transfer.upload.pid, transfer.upload.socket);
            disks.get(transfer.diskId)!.status = 'ok';
          }
          transfer.phase = finalize ? 'finished_success' : transferPath[2] === '/cancel' ? 'cancelled_user' : 'finished_failure';
        });
        return send(req, res, 200, '<action><status>complete</status></action>');
      }
    }
    const vmPath = /^\/vms\/([^/]+)(\/.*)?$/.exec(path);
    if (!vmPath) return send(req, res, 404, faultXml('Not Found', `${method} ${url.pathname}`));
    const vm = vms.get(vmPath[1]!);
    if (!vm) return notFound(req, res, vmPath[1]!);
    const rest = vmPath[2] ?? '';

    if (rest === '' && method === 'GET') return send(req, res, 200, vmXml(vm, allContent));
    if (rest === '' && method === 'DELETE') {
      if (vm.status === 'up') return send(req, res, 409, faultXml('Operation Failed', '[Cannot remove VM. VM is running.]'));
      // Removing a VM removes its disks too (unless detach_only), as the engine does.
      for (const a of vm.attachments.values()) await unplug(a);
      for (const id of new Set([...vm.disks, ...vm.attachments.keys()])) {
        const disk = disks.get(id);
        if (disk) await rm(disk.image, { force: true });
        disks.delete(id);
      }
      vms.delete(vm.id);
      return send(req, res, 200, '<action><status>complete</status></action>');
    }

    if (rest === '/snapshots' && method === 'GET') {
      return send(req, res, 200, `<snapshots>${activeSnapshotXml(vm)}${[...vm.snapshots.values()].map((s) => snapshotXml(vm, s, false)).join('')}</snapshots>`);
    }
    if (rest === '/snapshots' && method === 'POST') {
      const body = await readBody(req);
      const description = tagText(body, 'description');
      if (!description) return send(req, res, 400, faultXml('Incomplete parameters', 'Snapshot [description] required for add'));
      if ([...vm.snapshots.values()].some((s) => s.status === 'locked')) {
        return send(req, res, 409, faultXml('Operation Failed', `[Cannot create Snapshot. Snapshot is currently being created for VM ${vm.name}.]`));
      }
      const snapshot: SimSnapshot = { id: randomUUID(), description, status: 'locked', frozen: new Map(), ovf: ovfFor(vm, disks), removing: false };
      vm.snapshots.set(snapshot.id, snapshot);
      const fails = failNextSnapshot;
      failNextSnapshot = false;
      later(lockMs, async () => {
        if (fails) {
          vm.snapshots.delete(snapshot.id); // USER_CREATE_SNAPSHOT_FINISHED_FAILURE: the snapshot disappears
          return;
        }
        // A real overlay per disk: the current image is frozen below a new active layer.
        for (const id of vm.disks) {
          const disk = disks.get(id)!;
          const overlay = join(imagesDir, `${id}.${snapshot.id}.qcow2`);
          await tool('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', disk.image, '-F', 'qcow2', overlay]);
          snapshot.frozen.set(id, disk.image);
          disk.image = overlay;
        }
        snapshot.status = 'ok';
      });
      return send(req, res, 202, snapshotXml(vm, snapshot, false).replace('</snapshot>', '<creation_status>pending</creation_status></snapshot>'));
    }
    const snapPath = /^\/snapshots\/([^/]+)(\/disks)?$/.exec(rest);
    if (snapPath) {
      const snapshot = vm.snapshots.get(snapPath[1]!);
      if (!snapshot) return notFound(req, res, snapPath[1]!);
      if (snapPath[2] && method === 'GET') {
        const items = [...snapshot.frozen.keys()].map((id) => diskXml(disks.get(id)!, `<snapshot id="${snapshot.id}"/>`));
        return send(req, res, 200, `<disks>${items.join('')}</disks>`);
      }
      if (!snapPath[2] && method === 'GET') return send(req, res, 200, snapshotXml(vm, snapshot, allContent));
      if (!snapPath[2] && method === 'DELETE') {
        if (attachedElsewhere(snapshot)) {
          return send(req, res, 409, faultXml('Operation Failed', `[Cannot remove Snapshot: The following disks snapshots are attached to other VMs. Please detach them from those VMs and try again.]`));
        }
        if (snapshot.status === 'locked') return send(req, res, 409, faultXml('Operation Failed', '[Cannot remove Snapshot. Snapshot is currently being created or removed.]'));
        snapshot.status = 'locked';
        snapshot.removing = true;
        later(lockMs, async () => {
          // The merge: the overlay's data goes down into the frozen image, which becomes active again.
          for (const [id, base] of snapshot.frozen) {
            const disk = disks.get(id)!;
            await tool('qemu-img', ['commit', '-q', '-f', 'qcow2', disk.image]);
            await rm(disk.image, { force: true });
            disk.image = base;
          }
          vm.snapshots.delete(snapshot.id);
        });
        return send(req, res, 200, '<action><status>complete</status></action>');
      }
    }

    if (rest === '/checkpoints' && method === 'GET') {
      const items = vm.checkpoints.map((c) => `<checkpoint href="${API}/vms/${vm.id}/checkpoints/${c.id}" id="${c.id}">${c.parentId ? `<parent_id>${c.parentId}</parent_id>` : ''}<state>${c.state}</state><vm id="${vm.id}"/></checkpoint>`);
      return send(req, res, 200, `<checkpoints>${items.join('')}</checkpoints>`);
    }
    const checkpointPath = /^\/checkpoints\/([^/]+)$/.exec(rest);
    if (checkpointPath && method === 'DELETE') {
      const checkpoint = vm.checkpoints.find((c) => c.id === checkpointPath[1]);
      if (!checkpoint) return notFound(req, res, checkpointPath[1]!);
      for (const id of vm.disks) await tool('qemu-img', ['bitmap', '--remove', disks.get(id)!.image, `sim-${checkpoint.id}`]).catch(() => undefined);
      vm.checkpoints = vm.checkpoints.filter((c) => c !== checkpoint);
      return send(req, res, 200, '<action><status>complete</status></action>');
    }
    if (rest === '/backups' && method === 'POST') {
      const body = await readBody(req);
      const from = tagText(body, 'from_checkpoint_id');
      if ([...backups.values()].some((b) => b.vmId === vm.id && (b.phase === 'initializing' || b.phase === 'ready' || b.phase === 'finalizing'))) {
        return send(req, res, 409, faultXml('Operation Failed', '[Cannot backup VM. The VM is during a backup operation.]'));
      }
      if (from) {
        const checkpoint = vm.checkpoints.find((c) => c.id === from);
        if (!checkpoint) return send(req, res, 400, faultXml('Operation Failed', `[Cannot backup VM. Checkpoint ID ${from} doesn't exist.]`));
        if (checkpoint.state === 'invalid') return send(req, res, 400, faultXml('Operation Failed', `[Cannot backup VM. Checkpoint ID ${from} is invalid and should be removed.]`));
      }
      const wanted = [...body.matchAll(/<disk id="([^"]+)"/g)].map((m) => m[1]!);
      const backup: SimBackup = { id: randomUUID(), vmId: vm.id, phase: 'initializing', from, to: randomUUID(), disks: wanted.length > 0 ? wanted : [...vm.disks], modes: new Map(), exports: new Map() };
      backups.set(backup.id, backup);
      later(lockMs, async () => {
        // Cold backup: a bitmap per disk for the new checkpoint, a read-only qemu-nbd per disk.
        for (const id of backup.disks) {
          const disk = disks.get(id)!;
          const info = JSON.parse(await tool('qemu-img', ['info', '--output=json', disk.image])) as { 'format-specific'?: { data?: { bitmaps?: { name: string }[] } } };
          const hasBase = from !== undefined && (info['format-specific']?.data?.bitmaps ?? []).some((b) => b.name === `sim-${from}`);
          backup.modes.set(id, hasBase ? 'incremental' : 'full');
          await tool('qemu-img', ['bitmap', '--add', '--enable', disk.image, `sim-${backup.to}`]);
          const socket = join(options.dir, `nbd-${backup.id.slice(0, 8)}-${id.slice(0, 8)}.sock`);
          const pidFile = `${socket}.pid`;
          await tool('qemu-nbd', ['-r', '-f', 'qcow2', '--socket', socket, '--persistent', '--shared', '8', '--fork', '--pid-file', pidFile, ...(hasBase ? ['-B', `sim-${from}`] : []), disk.image]);
          const pid = Number((await (await import('node:fs/promises')).readFile(pidFile, 'utf8')).trim());
          backup.exports.set(id, { socket, pid });
        }
        vm.checkpoints.push({ id: backup.to, parentId: vm.checkpoints.at(-1)?.id, state: 'created' });
        if (backup.phase === 'initializing') backup.phase = 'ready';
      });
      return send(req, res, 202, backupXml(vm, backup));
    }
    const backupPath = /^\/backups\/([^/]+)(\/disks|\/finalize)?$/.exec(rest);
    if (backupPath) {
      const backup = backups.get(backupPath[1]!);
      if (!backup || backup.vmId !== vm.id) return notFound(req, res, backupPath[1]!);
      if (!backupPath[2] && method === 'GET') return send(req, res, 200, backupXml(vm, backup));
      if (backupPath[2] === '/disks' && method === 'GET') {
        return send(req, res, 200, `<disks>${backup.disks.map((id) => diskXml(disks.get(id)!, backup.modes.has(id) ? `<backup_mode>${backup.modes.get(id)}</backup_mode>` : '')).join('')}</disks>`);
      }
      if (backupPath[2] === '/finalize' && method === 'POST') {
        if ([...transfers.values()].some((t) => t.backupId === backup.id && (t.phase === 'transferring' || t.phase === 'initializing' || t.phase === 'paused_system'))) {
          return send(req, res, 409, faultXml('Operation Failed', '[Cannot stop VM backup. There is an active image transfer for VM backup]'));
        }
        const failed = backup.phase === 'failed';
        backup.phase = 'finalizing';
        later(lockMs, async () => {
          await stopExports(backup);
          backup.phase = failed ? 'failed' : 'succeeded';
        });
        return send(req, res, 200, '<action><status>complete</status></action>');
      }
    }

    if (rest === '/diskattachments' && method === 'GET') {
      // The VM's own disks, then disks attached to it (e.g. snapshot disks on the appliance).
      const own = vm.disks.filter((id) => !vm.attachments.has(id)).map((id) => ({ diskId: id, snapshotId: undefined, active: true, device: undefined, fuse: undefined }));
      const items = [...own, ...vm.attachments.values()].map((a) => attachmentXml(vm, a));
      return send(req, res, 200, `<disk_attachments>${items.join('')}</disk_attachments>`);
    }
    if (rest === '/diskattachments' && method === 'POST') {
      const body = await readBody(req);
      const diskId = /<disk id="([^"]+)"/.exec(body)?.[1];
      const snapshotId = /<snapshot id="([^"]+)"/.exec(body)?.[1];
      const active = tagText(body, 'active') === 'true';
      if (!diskId) return send(req, res, 400, faultXml('Incomplete parameters', 'Disk [id] required for add'));
      const disk = disks.get(diskId);
      if (!disk) return notFound(req, res, diskId);
      if (vm.attachments.has(diskId)) return send(req, res, 409, faultXml('Operation Failed', '[Cannot attach Virtual Disk. The disk is already attached to VM.]'));
      let image = disk.image;
      if (snapshotId) {
        const owner = [...vms.values()].find((v) => v.snapshots.has(snapshotId));
        const snapshot = owner?.snapshots.get(snapshotId);
        const frozen = snapshot?.frozen.get(diskId);
        if (!snapshot || !frozen || snapshot.status !== 'ok') return send(req, res, 400, faultXml('Operation Failed', `[Cannot attach Virtual Disk. Snapshot ${snapshotId} of disk ${diskId} is not available.]`));
        image = frozen;
      }
      if (!snapshotId && disk.status !== 'ok') return send(req, res, 409, faultXml('Operation Failed', '[Cannot attach Virtual Disk. Disk is locked.]'));
      if (!snapshotId && [...vms.values()].some((v) => v !== vm && (v.attachments.has(diskId) || v.disks.includes(diskId)))) {
        return send(req, res, 409, faultXml('Operation Failed', '[Cannot attach Virtual Disk. The disk is not shareable and is already attached to a VM.]'));
      }
      const attachment: SimAttachment = { diskId, snapshotId, active, device: undefined, fuse: undefined };
      vm.attachments.set(diskId, attachment);
      // A disk of a running VM is hot-plugged; a stopped VM only records the attachment.
      if (active && vm.status === 'up') await plug(attachment, image, snapshotId !== undefined);
      return send(req, res, 201, attachmentXml(vm, attachment));
    }
    const attachPath = /^\/diskattachments\/([^/]+)$/.exec(rest);
    if (attachPath) {
      const attachment = vm.attachments.get(attachPath[1]!);
      if (!attachment) return notFound(req, res, attachPath[1]!);
      if (method === 'GET') return send(req, res, 200, attachmentXml(vm, attachment));
      if (method === 'DELETE') {
        if (url.searchParams.get('detach_only') === 'false' && attachment.snapshotId) {
          return send(req, res, 400, faultXml('Operation Failed', '[Cannot remove a disk snapshot attachment with detach_only=false.]'));
        }
        await unplug(attachment);
        vm.attachments.delete(attachment.diskId);
        return send(req, res, 200, '<action><status>complete</status></action>');
      }
    }
    return send(req, res, 404, faultXml('Not Found', `${method} ${url.pathname}`));
  };

  const onRequest = (req: IncomingMessage, res: ServerResponse): void => {
    handle(req, res).catch((error: unknown) => send(req, res, 500, faultXml('Internal Server Error', String(error))));
  };
  const server: Server = options.tls ? createHttpsServer({ key: options.tls.key, cert: options.tls.cert }, onRequest) : createServer(onRequest);
  await new Promise<void>((resolve) => server.listen(options.port ?? 0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((resolve) => imageio.listen(0, '127.0.0.1', resolve));
  imageioUrl = `http://127.0.0.1:${(imageio.address() as AddressInfo).port}`;
  return {
    url: `${options.tls ? 'https' : 'http'}://127.0.0.1:${port}`,
    imageioUrl,
    backups,
    transfers,
    deviceRoot,
    vms,
    disks,
    requests,
    faults: {
      conflict: (method, path, count) => conflicts.push({ method, path, left: count }),
      expireTokens: () => tokens.clear(),
      failNextSnapshot: () => {
        failNextSnapshot = true;
      },
      expireTokensAfter: (count) => {
        expireAfter = count;
      },
      pauseNextTransfer: () => {
        pauseNextTransfer = true;
      },
      restartEngine: () => restart(),
      restartEngineAfter: (path, count) => {
        restartAfter = { path, left: count };
      },
    },
    async addDisk(vm, alias, size) {
      const id = randomUUID();
      const image = join(imagesDir, `${id}.qcow2`);
      await tool('qemu-img', ['create', '-q', '-f', 'qcow2', image, size]);
      const virtualSize = JSON.parse(await tool('qemu-img', ['info', '--output=json', image]))['virtual-size'] as number;
      const disk: SimDisk = { id, alias, size: virtualSize, image, status: 'ok', storageDomain: STORAGE_DOMAIN_ID };
      disks.set(id, disk);
      vm.disks.push(id);
      return disk;
    },
    async addVm(name, diskSpecs, status = 'up') {
      const vm: SimVm = { id: randomUUID(), name, status, cluster: CLUSTER_ID, importedOvf: undefined, disks: [], snapshots: new Map(), attachments: new Map(), checkpoints: [] };
      for (const spec of diskSpecs) {
        const id = randomUUID();
        const image = join(imagesDir, `${id}.qcow2`);
        await tool('qemu-img', ['create', '-q', '-f', 'qcow2', image, spec.size]);
        const size = JSON.parse(await tool('qemu-img', ['info', '--output=json', image]))['virtual-size'] as number;
        disks.set(id, { id, alias: spec.alias, size, image, status: 'ok', storageDomain: STORAGE_DOMAIN_ID });
        vm.disks.push(id);
      }
      vms.set(vm.id, vm);
      return vm;
    },
    stop: async () => {
      for (const timer of timers) clearTimeout(timer);
      for (const client of nbdClients.values()) await client.then((c) => c.close(), () => undefined);
      for (const backup of backups.values()) await stopExports(backup);
      await new Promise<void>((resolve) => imageio.close(() => resolve()));
      for (const vm of vms.values()) for (const a of vm.attachments.values()) await unplug(a);
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
