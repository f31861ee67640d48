/** `npm run bench:primitives`: the engine's primitives micro-benchmark (same as `engine bench`). */
import { primitivesReport } from '../engine/index.js';

process.stdout.write((await primitivesReport()).markdown);
