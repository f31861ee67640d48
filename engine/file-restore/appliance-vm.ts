/**
 * The throw-away QEMU VM of a file restore, and its agent's port (SPEC 16.3), on engine/vm/ (the machinery
 * `verify --boot` runs its VMs with: the command line, the launch under pdeathsig, QMP, KVM's failure).
 *
 * The VM: the appliance's kernel and initramfs, the backup's disks as read-only virtio disks over NBD (the
 * caller's in-process server on a private Unix socket), serial numbers d0, d1, … in the backup's disk order,
 * one virtio-serial port (org.engine.files.0) whose host end is a Unix socket this process listens on, so the
 * connection exists before the guest runs. No network, no display, no disk of its own.
 */
import { createServer, type Server, type Socket } from 'node:net';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { EngineError } from '../../repo-format/errors.js';
import { KvmFailedError } from '../vm/accelerator.js';
import { findQemu, VirtualMachine, type StartedProcess } from '../vm/qemu.js';
import type { Appliance } from './appliance.js';

export const AGENT_PORT = 'org.engine.files.0';

export interface ApplianceDisk {
  /** The NBD export's name on `nbdSocket`. */
  exportName: string;
}

export interface ApplianceVmOptions {
  appliance: Appliance;
  nbdSocket: string;
  disks: ApplianceDisk[];
  /** The run's private folder (vm/journal.ts): the agent's socket, QMP's, the console and QEMU's log. */
  dir: string;
  memoryMiB?: number | undefined;
  /** What vm/accelerator.ts chose for this attempt. */
  accel: 'kvm' | 'tcg';
  /** Told the QEMU process as soon as it exists (the run's journal). */
  started: (process: StartedProcess) => Promise<void>;
  readyTimeoutMs?: number | undefined;
  signal?: AbortSignal | undefined;
}

/** One reply frame of the agent: type and payload. */
export interface Frame {
  type: string;
  payload: Buffer;
}

/** Reads frames (type byte, u32 big-endian length, payload) off the agent's connection, in order. */
class FrameReader {
  private buffered: Buffer[] = [];
  private length = 0;
  private waiting: (() => void) | undefined;
  private ended: Error | undefined;

  constructor(private readonly socket: Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.buffered.push(chunk);
      this.length += chunk.length;
      // A reader that is behind stops the socket: the appliance then waits on its virtio port.
      if (this.length > 4 * 1024 * 1024) socket.pause();
      this.wake();
    });
    socket.on('close', () => {
      this.ended ??= new EngineError('ENGINE_TOOL_FAILED', 'the file-restore appliance closed its agent port');
      this.wake();
    });
    socket.on('error', (error) => {
      this.ended ??= new EngineError('ENGINE_TOOL_FAILED', `the file-restore appliance's agent port failed: ${error.message}`);
      this.wake();
    });
  }

  fail(error: Error): void {
    this.ended ??= error;
    this.wake();
  }

  private wake(): void {
    const waiting = this.waiting;
    this.waiting = undefined;
    waiting?.();
  }

  /** The first n bytes, copying only them (not everything buffered, up to 4 MiB, for a 5-byte header). */
  private take(n: number): Buffer {
    const first = this.buffered[0];
    let taken: Buffer;
    if (first !== undefined && first.length >= n) {
      taken = first.subarray(0, n);
      if (first.length === n) this.buffered.shift();
      else this.buffered[0] = first.subarray(n);
    } else {
      const pieces: Buffer[] = [];
      let left = n;
      while (left > 0) {
        const head = this.buffered[0]!;
        if (head.length <= left) {
          pieces.push(head);
          this.buffered.shift();
          left -= head.length;
        } else {
          pieces.push(head.subarray(0, left));
          this.buffered[0] = head.subarray(left);
          left = 0;
        }
      }
      taken = Buffer.concat(pieces, n);
    }
    this.length -= n;
    if (this.length <= 1024 * 1024 && this.socket.isPaused()) this.socket.resume();
    return taken;
  }

  private async need(n: number): Promise<void> {
    while (this.length < n) {
      if (this.ended) throw this.ended;
      await new Promise<void>((resolve) => {
        this.waiting = resolve;
      });
    }
  }

  async next(): Promise<Frame> {
    await this.need(5);
    const header = this.take(5);
    const size = header.readUInt32BE(1);
    await this.need(size);
    return { type: String.fromCharCode(header[0]!), payload: Buffer.from(this.take(size)) };
  }
}

export interface AgentReply {
  /** The data frames' payloads as they arrive; the end frame ends the iteration (see `status`). */
  data: AsyncIterable<Buffer>;
}

export class ApplianceVm {
  private busy: Promise<void> = Promise.resolve();

  private constructor(
    private readonly vm: VirtualMachine,
    private readonly socket: Socket,
    private readonly server: Server,
    private readonly reader: FrameReader,
    readonly consoleLog: string,
    readonly accel: 'kvm' | 'tcg',
    private readonly signal: AbortSignal | undefined,
    private readonly onAbort: () => void,
  ) {}

  /**
   * Starts the VM and resolves once its agent said it is ready (all volumes mounted). A KVM that cannot run
   * the appliance is KvmFailedError, the VM gone (vm/accelerator.ts starts it again under TCG).
   */
  static async start(options: ApplianceVmOptions): Promise<ApplianceVm> {
    const accel = options.accel;
    const agentSocket = join(options.dir, 'agent.sock');
    const consoleLog = join(options.dir, 'console.log');
    const server = createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(agentSocket, () => resolve());
    });
    const connected = new Promise<Socket>((resolve) => server.once('connection', resolve));
    let vm: VirtualMachine | undefined;
    let timer: NodeJS.Timeout | undefined;
    try {
      vm = await VirtualMachine.start(
        await findQemu(),
        {
          machine: 'q35',
          firmware: 'bios',
          // Enough for the kernel, the unpacked initramfs (~25 MB) and the page cache of what is read. QEMU's own
          // peak RSS was 403 MB with 256 (674 MB with 512) extracting 782 MB under TCG (measured; not bounded further).
          memoryBytes: (options.memoryMiB ?? 256) * 1024 * 1024,
          cpus: 1,
          accelerator: accel,
          // An export name is the backup's disk name, and may hold commas: qemu-args.ts writes JSON -blockdev.
          disks: options.disks.map((disk, index) => ({ kind: 'nbd', socket: options.nbdSocket, exportName: disk.exportName, readOnly: true, serial: `d${index}` })),
          kernel: { path: options.appliance.kernel, initrd: options.appliance.initrd, append: 'console=ttyS0 quiet panic=-1' },
          serialPorts: [{ name: AGENT_PORT, socket: agentSocket, qemuConnects: true }],
          consoleFile: consoleLog,
          qmpSocket: join(options.dir, 'qmp.sock'),
          logFile: join(options.dir, 'qemu.log'),
        },
        options.started,
      );
      const running = vm;
      // An interruption kills the VM at once, whatever is under way (nothing in it needs a clean shutdown).
      const onAbort = (): void => running.kill();
      options.signal?.addEventListener('abort', onAbort, { once: true });
      const exited = running.exited.then((e) => new EngineError('ENGINE_TOOL_FAILED', `the file-restore appliance (QEMU) exited (${e.signal ?? e.code}): ${e.stderr.trim().slice(-600) || 'see its console'}`, { tool: 'qemu-system-x86_64', consoleLog }));
      const timeoutMs = options.readyTimeoutMs ?? (accel === 'kvm' ? 60_000 : 180_000);
      const timedOut = new Promise<Error>((resolve) => {
        timer = setTimeout(() => resolve(new EngineError('ENGINE_TIMEOUT', `the file-restore appliance was not ready within ${timeoutMs / 1000} s`, { what: 'appliance ready', consoleLog })), timeoutMs);
      });
      const aborted = new Promise<Error>((resolve) => {
        if (options.signal?.aborted) resolve(new EngineError('ENGINE_INTERRUPTED', 'the file restore was interrupted'));
        options.signal?.addEventListener('abort', () => resolve(new EngineError('ENGINE_INTERRUPTED', 'the file restore was interrupted')), { once: true });
      });
      // KVM's failure is the better error than the exit it causes: it is raced first.
      const failed = Promise.race([running.kvmFailure, exited]);
      const first = await Promise.race([running.kvmFailure, connected, failed, timedOut, aborted]);
      if (first instanceof Error) throw first;
      const socket = first;
      const reader = new FrameReader(socket);
      void failed.then((error) => reader.fail(error));
      // A VM that dies closes the port first: its exit (with QEMU's own words) is the better error.
      const ready = await Promise.race([reader.next().catch(async (error: unknown) => {
        let grace: NodeJS.Timeout | undefined;
        const exit = await Promise.race([failed, new Promise<undefined>((resolve) => {
          grace = setTimeout(() => resolve(undefined), 1000);
        })]);
        // Cleared, or the pending timer alone keeps an interrupted command alive for its second.
        clearTimeout(grace);
        throw exit ?? error;
      }), running.kvmFailure, failed, timedOut, aborted]);
      if (ready instanceof Error) throw ready;
      if (ready.type !== 'R') throw new EngineError('ENGINE_TOOL_FAILED', `the file-restore appliance's agent began with frame ${JSON.stringify(ready.type)}, not R`);
      return new ApplianceVm(running, socket, server, reader, consoleLog, accel, options.signal, onAbort);
    } catch (error) {
      await vm?.destroy();
      server.close();
      if (error instanceof EngineError && error.code === 'ENGINE_TOOL_FAILED' && !(error instanceof KvmFailedError)) {
        const tail = await readFile(consoleLog, 'utf8').catch(() => '');
        if (tail) error.message += `; console: ${tail.slice(-600).replace(/\s+/g, ' ').trim()}`;
      }
      throw error;
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * One request (VERB and its arguments, hex-encoded on the wire): yields the data frames' payloads and
   * throws, after them, if the end frame's exit code is not 0. Requests run one after the other.
   */
  async *request(verb: string, ...args: string[]): AsyncGenerator<Buffer> {
    let release!: () => void;
    const previous = this.busy;
    this.busy = new Promise<void>((resolve) => {
      release = resolve;
    });
    await previous;
    try {
      this.socket.write(`${[verb, ...args.map((arg) => Buffer.from(arg, 'utf8').toString('hex'))].join(' ')}\n`);
      for (;;) {
        const frame = await this.reader.next();
        if (frame.type === 'D') {
          yield frame.payload;
          continue;
        }
        if (frame.type !== 'E') throw new EngineError('ENGINE_TOOL_FAILED', `unexpected frame ${JSON.stringify(frame.type)} from the file-restore appliance`);
        const text = frame.payload.toString('utf8');
        const space = text.indexOf(' ');
        const code = Number(space < 0 ? text : text.slice(0, space));
        const message = space < 0 ? '' : text.slice(space + 1).trim();
        if (code !== 0) throw new AgentError(verb, code, message);
        return;
      }
    } finally {
      release();
    }
  }

  /** Kills the VM (nothing in it is worth a clean shutdown: every disk is read-only) and closes the port. */
  async close(): Promise<void> {
    this.signal?.removeEventListener('abort', this.onAbort);
    await this.vm.destroy();
    this.socket.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

/** The agent answered a request with a non-zero exit code (a missing path, tar's complaint). */
export class AgentError extends EngineError {
  constructor(verb: string, readonly exitCode: number, readonly agentMessage: string) {
    super('ENGINE_TOOL_FAILED', `the file-restore appliance failed ${verb} (${exitCode}): ${agentMessage || 'no message'}`, { tool: 'appliance agent', verb, exitCode, agentMessage });
  }
}
