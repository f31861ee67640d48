// Bundles tsc's output (dist/) into dist/bundle/: the CLI and the files the CLI starts by path (the block
// worker and the server's shared one, the MD5 thread, mount's serve daemon and the VM mount's FUSE daemon, the oVirt thaw watchdog, the live restore's guard), one file each plus the chunks they share, so that a command
// loads a handful of files instead of ~150 modules (measured in bench/fixed-costs.ts: CPU per call).
// The lazy imports (import() of a command's module, of S3, NBD, qcow2, libvirt, classic-level) stay lazy: each
// becomes a chunk of its own, loaded when the command needs it. Packages in node_modules stay outside (native
// addons, WebAssembly), but for LevelDB's JavaScript (INLINED_PACKAGES). The bundle's last file, inputs.json, names
// every module of dist/ (and of those packages) it was made from with its size and mtime as they were when it was read; bin/engine.js runs the bundle only while all of them are still so, so
// a `tsc` (or `tsc --watch`, which rewrites only the files that changed) after it never runs stale code.
// Run by `npm run build` and scripts/setup.sh, after tsc.
import { existsSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { isBuiltin } from 'node:module';
import { relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { rolldown } from 'rolldown';

const root = fileURLToPath(new URL('..', import.meta.url));
const out = `${root}dist/bundle`;
// The entries keep their folder depth (dist/bundle/ is as deep as dist/engine/): version.js's
// '../../package.json' and block-pool's './block-worker.js' resolve to the same files from any chunk.
const input = {
  main: `${root}dist/cli/main.js`,
  'block-worker': `${root}dist/engine/pipeline/block-worker.js`,
  'shared-worker': `${root}dist/engine/pipeline/shared-worker.js`,
  'md5-thread': `${root}dist/repo-format/storage/md5-thread.js`,
  'serve-daemon': `${root}dist/engine/mount/serve-daemon.js`,
  'fuse-daemon': `${root}dist/engine/file-restore/fuse-daemon.js`,
  'thaw-watchdog': `${root}dist/engine/quiesce/thaw-watchdog.js`,
  'live-guard': `${root}dist/engine/restore/live-guard.js`,
};
const dist = `${root}dist`;
/**
 * Packages of plain JavaScript taken into the bundle: classic-level's JavaScript and abstract-level's, ~20 small
 * CommonJS files that every command opening a LevelDB (each command on a format-3 repository: its host cache) found,
 * read and compiled one by one, ~10 ms of CPU per process; as one chunk ~2 (measured: require of abstract-level
 * as it is installed, and bundled, with the compile cache). classic-level's addon stays where npm put it: its
 * binding.js (node-gyp-build, which looks for the addon beside itself) is left outside, loaded from the package.
 * Node's built-in modules (abstract-level asks for `buffer`: Node's own, as it gets without a bundle) stay outside.
 */
const INLINED_PACKAGES = ['classic-level', 'abstract-level', 'level-transcoder', 'level-supports', 'module-error', 'maybe-combine-errors', 'is-buffer'];
const packageOf = (id) => (id.startsWith('@') ? id.split('/').slice(0, 2).join('/') : id.split('/')[0]);
// Wherever npm put them: the project's node_modules/, or a parent's where the engine is itself a dependency.
const inlinedPackage = (id) => INLINED_PACKAGES.some((name) => id.includes(`/node_modules/${name}/`));
rmSync(out, { recursive: true, force: true });
/** Each module read from dist/ (or an inlined package's, from node_modules), relative to dist/: [path, size, mtimeMs], stat'ed before it was read. */
const inputs = new Map();
const build = await rolldown({
  input,
  platform: 'node',
  // A bare specifier is a package (or node:): loaded from node_modules as before, but for INLINED_PACKAGES.
  external: (id) => !id.startsWith('.') && !id.startsWith('/') && (isBuiltin(id) || !INLINED_PACKAGES.includes(packageOf(id))),
  treeshake: true,
  // Each module comes with tsc's source map, so the bundle's maps lead back to the TypeScript sources.
  // Each module is stat'ed before it is read: a change while bundling leaves its recorded mtime behind, never ahead.
  plugins: [
    {
      name: 'classic-level-addon',
      resolveId(id, importer) {
        if (id === './binding' && importer !== undefined && importer.includes('/node_modules/classic-level/')) return { id: 'classic-level/binding.js', external: true };
        return null;
      },
    },
    {
      name: 'tsc-source-maps',
      load(id) {
        const path = relative(dist, id);
        if (path.startsWith('..') && !inlinedPackage(id)) throw new Error(`bundle: ${id} is outside dist/`);
        const { size, mtimeMs } = statSync(id);
        inputs.set(path, [path, size, mtimeMs]);
        const code = readFileSync(id, 'utf8');
        if (!id.endsWith('.js') || !existsSync(`${id}.map`)) return code;
        return { code: code.replace(/\n\/\/# sourceMappingURL=\S+\s*$/, '\n'), map: readFileSync(`${id}.map`, 'utf8') };
      },
    },
  ],
  logLevel: 'warn',
});
await build.write({ dir: out, format: 'esm', sourcemap: true, entryFileNames: '[name].js', chunkFileNames: '[name]-[hash].js' });
await build.close();
writeFileSync(`${out}/package.json`, '{ "type": "module" }\n');
// Last: a bundle cut short has no inputs.json, and is not run.
writeFileSync(`${out}/inputs.json`, `${JSON.stringify({ modules: [...inputs.values()].sort((a, b) => (a[0] < b[0] ? -1 : 1)) })}\n`);
