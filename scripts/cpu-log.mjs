// Sums the lines ENGINE_TEST_CPU_LOG=FILE (bin/engine.js) wrote: engine processes and their CPU by command, and
// how much of it went before the command's action began (start-up: Node, the launcher, loading the bundle, parsing).
// Usage: node scripts/cpu-log.mjs FILE
import { readFileSync } from 'node:fs';

const lines = readFileSync(process.argv[2], 'utf8').split('\n').filter(Boolean).map((line) => JSON.parse(line));
const groups = new Map();
const total = { n: 0, cpu: 0, children: 0, workers: 0, wall: 0, toAction: 0, withAction: 0, cpuToAction: 0, workersCpuBase: 0 };
for (const line of lines) {
  const name = line.argv[0] === 'ovirt' || line.argv[0] === 'files' || line.argv[0] === 'server' ? line.argv.join(' ') : line.argv[0] ?? '';
  const group = groups.get(name) ?? { n: 0, cpu: 0, children: 0, workers: 0, wall: 0, toAction: 0, withAction: 0, cpuToAction: 0 };
  groups.set(name, group);
  const cpu = (line.userMs + line.systemMs) / 1000;
  for (const g of [group, total]) {
    g.n++;
    g.cpu += cpu;
    g.children += line.childrenS ?? 0;
    g.workers += line.workers;
    g.wall += line.wallMs / 1000;
    if (line.actionMs !== null) {
      g.toAction += line.actionMs / 1000;
      g.cpuToAction += (line.actionCpuMs ?? 0) / 1000;
      g.withAction++;
    }
  }
}
const rows = [...groups.entries()].sort((a, b) => b[1].cpu - a[1].cpu);
const fmt = (x, d = 2) => x.toFixed(d);
console.log('command              procs   CPU-s  CPU-s/proc  children-CPU-s  workers  wall-s/proc  ms-to-action  CPU-s-to-action');
for (const [name, g] of [...rows, ['ALL', total]]) {
  console.log(
    `${name.padEnd(20)} ${String(g.n).padStart(5)} ${fmt(g.cpu, 1).padStart(7)} ${fmt(g.cpu / g.n, 3).padStart(11)} ${fmt(g.children, 1).padStart(15)} ${String(g.workers).padStart(8)} ${fmt(g.wall / g.n, 3).padStart(12)} ${g.withAction ? fmt((1000 * g.toAction) / g.withAction, 0).padStart(13) : '            -'} ${g.withAction ? fmt(g.cpuToAction / g.withAction, 3).padStart(15) : '              -'}`,
  );
}
