/**
 * The serial console of a VM, captured by QEMU into a file and followed here: every complete line goes
 * to `onLine` (terminal escapes and carriage returns removed), and the last bytes are kept for a record.
 * Polled: a file QEMU appends to has no portable change notification that survives its truncation.
 */
import { open, type FileHandle } from 'node:fs/promises';

const POLL_MS = 100;
const READ_BYTES = 64 * 1024;
/** The longest line matched: a guest printing without newlines is matched in pieces of this size. */
const MAX_LINE_CHARS = 16 * 1024;

export class ConsoleFollower {
  private offset = 0;
  private partial = '';
  private timer: NodeJS.Timeout | undefined;
  private handle: FileHandle | undefined;
  private reading: Promise<void> | undefined;

  constructor(
    readonly path: string,
    private readonly onLine: (line: string) => void,
  ) {}

  start(): void {
    this.timer = setInterval(() => {
      this.reading ??= this.readMore().finally(() => (this.reading = undefined));
    }, POLL_MS);
  }

  /** Reads what the file holds now (a VM that just stopped: its last words). */
  async flush(): Promise<void> {
    await this.reading;
    await this.readMore();
  }

  /** Reads what is left (the last line, even without its newline) and stops following. */
  async stop(): Promise<void> {
    clearInterval(this.timer);
    await this.reading;
    await this.readMore();
    if (this.partial !== '') this.emit(this.partial);
    this.partial = '';
    await this.handle?.close().catch(() => undefined);
    this.handle = undefined;
  }

  private async readMore(): Promise<void> {
    this.handle ??= await open(this.path, 'r').catch(() => undefined);
    if (!this.handle) return;
    const buffer = Buffer.alloc(READ_BYTES);
    for (;;) {
      const { bytesRead } = await this.handle.read(buffer, 0, READ_BYTES, this.offset);
      if (bytesRead === 0) return;
      this.offset += bytesRead;
      this.partial += buffer.subarray(0, bytesRead).toString('latin1');
      let end: number;
      while ((end = this.partial.indexOf('\n')) >= 0) {
        this.emit(this.partial.slice(0, end));
        this.partial = this.partial.slice(end + 1);
      }
      while (this.partial.length > MAX_LINE_CHARS) {
        this.emit(this.partial.slice(0, MAX_LINE_CHARS));
        this.partial = this.partial.slice(MAX_LINE_CHARS);
      }
    }
  }

  private emit(raw: string): void {
    this.onLine(cleanLine(raw));
  }
}

/** A console line as a person reads it: ANSI escape sequences, carriage returns and other controls removed. */
export function cleanLine(raw: string): string {
  return raw
    .replace(/\x1b\[[0-9;?]*[ -/]*[@-~]/g, '')
    .replace(/\x1b[ -/]*[0-~]/g, '') // the other escapes: ESC c (reset, what SeaBIOS starts with), ESC 7, ESC ( B …
    .replace(/[\x00-\x08\x0b-\x1f\x7f]/g, '')
    .trimEnd();
}

/** The last `maxBytes` of a file (a console log kept with a record), cut at a line start when it was cut. */
export async function fileTail(path: string, maxBytes: number): Promise<{ text: string; cut: boolean; size: number }> {
  const handle = await open(path, 'r').catch(() => undefined);
  if (!handle) return { text: '', cut: false, size: 0 };
  try {
    const { size } = await handle.stat();
    const start = Math.max(0, size - maxBytes);
    const buffer = Buffer.alloc(size - start);
    await handle.read(buffer, 0, buffer.length, start);
    let text = buffer.toString('latin1');
    if (start > 0) text = text.slice(text.indexOf('\n') + 1);
    return { text, cut: start > 0, size };
  } finally {
    await handle.close();
  }
}
