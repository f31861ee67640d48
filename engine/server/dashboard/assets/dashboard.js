// The dashboard's only script: it follows each running or queued job's event stream (GET /api/v1/jobs/{id}/events,
// Server-Sent Events, sent with the session cookie) and updates the job's row: state, progress bar and text, and at
// the end its error. The page is complete without it; nothing else here changes anything on the server.

const rows = () => document.querySelectorAll('tr[data-job]');

function mib(bytes) {
  return `${(bytes / 1048576).toFixed(1)} MiB`;
}

function progressText(p) {
  const pct = p.total > 0 ? Math.floor((p.done * 100) / p.total) : 0;
  return p.unit === 'bytes' ? `${pct}% (${mib(p.done)} of ${mib(p.total)}) ${p.phase}` : `${pct}% (${p.done} of ${p.total} ${p.unit}) ${p.phase}`;
}

function follow(row, onClose) {
  const id = row.dataset.job;
  const bar = row.querySelector('progress');
  const text = row.querySelector('.progress-text');
  const state = row.querySelector('td.state');
  const source = new EventSource(`/api/v1/jobs/${encodeURIComponent(id)}/events`);
  let closed = false;
  const close = () => {
    if (closed) return;
    closed = true;
    source.close();
    onClose();
  };
  const setState = (value) => {
    row.dataset.state = value;
    state.textContent = value;
  };
  source.addEventListener('state', (event) => setState(JSON.parse(event.data).state));
  source.addEventListener('progress', (event) => {
    const p = JSON.parse(event.data);
    bar.max = Math.max(p.total, 1);
    bar.value = p.done;
    text.textContent = progressText(p);
  });
  source.addEventListener('end', (event) => {
    const job = JSON.parse(event.data).job;
    setState(job.state);
    if (job.progress) {
      bar.max = Math.max(job.progress.total, 1);
      bar.value = job.progress.done;
      text.textContent = progressText(job.progress);
    }
    if (job.error) text.textContent = `${job.error.code}: ${job.error.message}`;
    close();
  });
  // The server ends the stream after `end`; a stream cut otherwise is not retried forever.
  source.addEventListener('error', () => {
    if (row.dataset.state === 'succeeded' || row.dataset.state === 'failed' || row.dataset.state === 'cancelled') close();
  });
}

// A browser opens at most 6 HTTP/1.1 connections to a server: an event stream per job for many queued jobs
// would leave none for the page's own requests. So at most MAX_STREAMS at once, running jobs first, the next
// one followed when a stream ends.
const MAX_STREAMS = 3;
const waiting = [...rows()].filter((row) => row.dataset.state === 'running' || row.dataset.state === 'queued');
waiting.sort((a, b) => (a.dataset.state === 'running' ? 0 : 1) - (b.dataset.state === 'running' ? 0 : 1));
let open = 0;

function next() {
  while (open < MAX_STREAMS && waiting.length > 0) {
    open++;
    follow(waiting.shift(), () => {
      open--;
      next();
    });
  }
}
next();
