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

function follow(row) {
  const id = row.dataset.job;
  const bar = row.querySelector('progress');
  const text = row.querySelector('.progress-text');
  const state = row.querySelector('td.state');
  const source = new EventSource(`/api/v1/jobs/${encodeURIComponent(id)}/events`);
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
    source.close();
  });
  // The server ends the stream after `end`; a stream cut otherwise is not retried forever.
  source.addEventListener('error', () => {
    if (row.dataset.state === 'succeeded' || row.dataset.state === 'failed' || row.dataset.state === 'cancelled') source.close();
  });
}

for (const row of rows()) {
  if (row.dataset.state === 'running' || row.dataset.state === 'queued') follow(row);
}
