/**
 * Progress on stderr: a redrawn bar with rate and ETA on a terminal, a plain line every few seconds
 * otherwise (logs), nothing at all with --json.
 */
import { formatBytes } from '../engine/common/units.js';

export interface ProgressSink {
  update(label: string, done: number, total: number, unit?: 'bytes' | 'items'): void;
  done(): void;
}

const silent: ProgressSink = { update: () => undefined, done: () => undefined };

function duration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '--:--';
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const mm = String(m).padStart(2, '0');
  const ss = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}

export function createProgress(options: { json: boolean; stream?: NodeJS.WriteStream }): ProgressSink {
  if (options.json) return silent;
  const stream = options.stream ?? process.stderr;
  const tty = stream.isTTY === true;
  const started = Date.now();
  let lastDraw = started;
  let drewBar = false;
  return {
    update(label, done, total, unit = 'bytes') {
      const now = Date.now();
      // A terminal redraws often and shows 100%; a log gets a line every 5 s, and the result says the rest.
      if (tty ? now - lastDraw < 100 && done < total : now - lastDraw < 5000) return;
      lastDraw = now;
      const elapsed = (now - started) / 1000;
      const rate = elapsed > 0 ? done / elapsed : 0;
      const fraction = total > 0 ? done / total : 1;
      const eta = rate > 0 ? (total - done) / rate : Number.NaN;
      const amount = unit === 'bytes' ? `${formatBytes(done)}/${formatBytes(total)}` : `${done}/${total}`;
      const speed = unit === 'bytes' ? ` ${formatBytes(rate)}/s` : '';
      const text = `${label} ${amount} ${(fraction * 100).toFixed(1)}%${speed} ETA ${duration(eta)}`;
      if (tty) {
        const width = 24;
        const filled = Math.round(fraction * width);
        stream.write(`\r\x1b[K[${'#'.repeat(filled)}${'-'.repeat(width - filled)}] ${text}`);
        drewBar = true;
      } else {
        stream.write(`${text}\n`);
      }
    },
    done() {
      if (tty && drewBar) stream.write('\r\x1b[K');
      drewBar = false;
    },
  };
}
