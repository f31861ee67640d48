#!/usr/bin/env node
// The CLI lives in cli/main.ts, compiled to dist/ by `npm run build` (scripts/setup.sh runs it).
import { existsSync } from 'node:fs';

const entry = new URL('../dist/cli/main.js', import.meta.url);
if (!existsSync(entry)) {
  process.stderr.write('engine: not built yet; run `npm run build` (or `bash scripts/setup.sh`) in the project root\n');
  process.exit(1);
}
await import(entry.href);
