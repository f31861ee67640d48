/**
 * The OpenAPI 3.1 document of the service API, checked in beside this module (engine/server/openapi.json) and
 * served as it is, read from the package (never a copy that can drift from the file the tests check).
 */
import { readFile } from 'node:fs/promises';
import { PACKAGE_ROOT } from '../version.js';

let document: Promise<unknown> | undefined;

export function openApiDocument(): Promise<unknown> {
  document ??= readFile(new URL('engine/server/openapi.json', PACKAGE_ROOT), 'utf8').then((text) => JSON.parse(text) as unknown);
  return document;
}
