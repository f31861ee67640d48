import { readFileSync } from 'node:fs';

/**
 * The package's root folder: this module is one folder below it in dist/ (dist/engine/) and in the bundle
 * (dist/bundle/), so files shipped beside the sources (engine/server/openapi.json) are found from both.
 */
export const PACKAGE_ROOT: URL = new URL('../../', import.meta.url);

/** The engine's version, from package.json (recorded in every backup). */
export const ENGINE_VERSION: string = (
  JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }
).version;
