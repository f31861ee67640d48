#!/usr/bin/env node
/**
 * Where a test run's CPU goes, by Node process (measurement only; nothing in the suite depends on it).
 *
 * As a preload: every Node process of the run (vitest, its workers, each `engine` command the tests start)
 * appends one line when it exits: its own CPU seconds (all its threads), pid, parent pid, start and end (epoch
 * ms), and what it was (`engine <command>`, `vitest …`). Processes killed by a signal write nothing.
 *
 *   ENGINE_CPU_ACCOUNT=/tmp/acct.tsv NODE_OPTIONS="--import $PWD/scripts/cpu-account.mjs" \
 *     /usr/bin/time -v node_modules/.bin/vitest run --reporter=default --reporter=json --outputFile.json=/tmp/vitest.json
 *
 * As a command: `node scripts/cpu-account.mjs /tmp/acct.tsv [/tmp/vitest.json]` prints the CPU by command and,
 * with vitest's JSON report, by test file: each engine process is charged to the file whose worker started it (its
 * parent's pid), the worker found by the time span of its children. What is not Node (Ceph, qemu-img, cmp, a killed
 * process) is the run's total (/usr/bin/time) minus these sums.
 */
import { appendFileSync, readFileSync } from 'node:fs';
import { isMainThread } from 'node:worker_threads';
import { fileURLToPath } from 'node:url';

const output = process.env.ENGINE_CPU_ACCOUNT;
if (output && isMainThread) {
  process.on('exit', () => {
    const usage = process.resourceUsage();
    const args = process.argv.slice(1);
    let what = args.join(' ').slice(0, 80);
    if (/bin\/engine\.js$/.test(args[0] ?? '')) what = `engine ${args[1] ?? ''}`;
    else if (/vitest/.test(args[0] ?? '')) what = `vitest ${args[0].split('/').pop()}`;
    const cpu = (usage.userCPUTime + usage.systemCPUTime) / 1e6;
    appendFileSync(output, `${cpu.toFixed(3)}\t${process.pid}\t${process.ppid}\t${Math.round(performance.timeOrigin)}\t${Date.now()}\t${what}\n`);
  });
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const [accountFile, reportFile] = process.argv.slice(2);
  if (!accountFile) {
    console.error('usage: node scripts/cpu-account.mjs ACCOUNT.tsv [vitest.json]');
    process.exit(2);
  }
  const rows = readFileSync(accountFile, 'utf8').trim().split('\n').map((line) => {
    const [cpu, pid, ppid, start, end, what] = line.split('\t');
    return { cpu: Number(cpu), pid: Number(pid), ppid: Number(ppid), start: Number(start), end: Number(end), what: what ?? '' };
  });
  const sum = (list) => list.reduce((total, row) => total + row.cpu, 0);
  const engine = rows.filter((row) => row.what.startsWith('engine'));
  console.log(`Node processes ${rows.length}, ${sum(rows).toFixed(1)} CPU-s; engine commands ${engine.length}, ${sum(engine).toFixed(1)} CPU-s`);
  const byWhat = new Map();
  for (const row of rows) byWhat.set(row.what, [...(byWhat.get(row.what) ?? []), row]);
  console.log('\n  CPU-s  count  each  what');
  for (const [what, list] of [...byWhat].sort((a, b) => sum(b[1]) - sum(a[1])).slice(0, 25)) {
    console.log(`${sum(list).toFixed(1).padStart(7)} ${String(list.length).padStart(6)} ${(sum(list) / list.length).toFixed(3)}  ${what}`);
  }
  if (reportFile) {
    const report = JSON.parse(readFileSync(reportFile, 'utf8'));
    const files = report.testResults.map((file) => ({ name: file.name.replace(/^.*\/test\//, 'test/'), start: file.startTime, end: file.endTime, tests: file.assertionResults.length }));
    const byParent = new Map();
    for (const row of engine) byParent.set(row.ppid, [...(byParent.get(row.ppid) ?? []), row]);
    // A parent's children a minute or more apart are another worker's: pids come round again (pid_max 32768 here).
    const groups = [];
    for (const list of byParent.values()) {
      let group;
      let groupEnd = -Infinity;
      for (const row of list.sort((a, b) => a.start - b.start)) {
        if (group === undefined || row.start - groupEnd > 60_000) groups.push((group = []));
        group.push(row);
        groupEnd = Math.max(groupEnd, row.end);
      }
    }
    const perFile = new Map(files.map((file) => [file.name, { file, rows: [] }]));
    for (const list of groups) {
      const first = Math.min(...list.map((row) => row.start));
      const last = Math.max(...list.map((row) => row.end));
      // The file whose run covers the children's span best (one worker per file: isolate).
      let best;
      let bestOverlap = -Infinity;
      for (const file of files) {
        // Most of the span covered; of files that cover it alike (run alongside), the shortest.
        const overlap = Math.min(last, file.end) - Math.max(first, file.start) - (file.end - file.start) / 1e6;
        if (overlap > bestOverlap) [best, bestOverlap] = [file, overlap];
      }
      if (best) perFile.get(best.name).rows.push(...list);
    }
    console.log('\n engine CPU-s  commands  file s  tests  file');
    for (const { file, rows: list } of [...perFile.values()].sort((a, b) => sum(b.rows) - sum(a.rows))) {
      console.log(`${sum(list).toFixed(1).padStart(12)} ${String(list.length).padStart(9)} ${((file.end - file.start) / 1000).toFixed(1).padStart(7)} ${String(file.tests).padStart(6)}  ${file.name}`);
    }
  }
}
