import { readFileSync } from 'node:fs';

/** The engine's version, from package.json (recorded in every backup). */
export const ENGINE_VERSION: string = (
  JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }
).version;
