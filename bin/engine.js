#!/usr/bin/env node
// The CLI lives in cli/main.ts, compiled to dist/ by `npm run build` (scripts/setup.sh runs it).
// `bin/engine` picks the runtime and starts this file; it can also be run as `node bin/engine.js`.
import { existsSync } from 'node:fs';

const [major, minor] = process.versions.node.split('.').map(Number);
if (major < 22 || (major === 22 && minor < 12)) {
  process.stderr.write(
    `engine: needs Node.js 22.12 or later (24 LTS recommended); this is ${process.version} at ${process.execPath}. ` +
      'Install the project with its optional dependencies (npm install), which brings Node 24 from the npm registry.\n',
  );
  process.exit(1);
}
// bin/engine tuned this process's malloc (glibc reads GLIBC_TUNABLES once, at start): what the engine runs gets the caller's own.
if (process.env.ENGINE_CALLER_GLIBC_TUNABLES !== undefined) {
  if (process.env.ENGINE_CALLER_GLIBC_TUNABLES === '') delete process.env.GLIBC_TUNABLES;
  else process.env.GLIBC_TUNABLES = process.env.ENGINE_CALLER_GLIBC_TUNABLES;
  delete process.env.ENGINE_CALLER_GLIBC_TUNABLES;
}
const entry = new URL('../dist/cli/main.js', import.meta.url);
if (!existsSync(entry)) {
  process.stderr.write('engine: not built yet; run `npm run build` (or `bash scripts/setup.sh`) in the project root\n');
  process.exit(1);
}
await import(entry.href);
