// Bundles tsc's output (dist/) into dist/bundle/: the CLI and the files the CLI starts by path (the block
// worker, the MD5 thread, mount's serve daemon), one file each plus the chunks they share, so that a command
// loads a handful of files instead of ~150 modules (measured in bench/fixed-costs.ts: CPU per call).
// The lazy imports (import() of a command's module, of S3, NBD, qcow2, libvirt, classic-level) stay lazy: each
// becomes a chunk of its own, loaded when the command needs it. Packages in node_modules stay outside (native
// addons, WebAssembly). bin/engine.js runs the bundle only when it is at least as new as dist/cli/main.js, so a
// plain `tsc` after a change never runs stale code. Run by `npm run build` and scripts/setup.sh, after tsc.
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { rolldown } from 'rolldown';

const root = fileURLToPath(new URL('..', import.meta.url));
const out = `${root}dist/bundle`;
// The entries keep their folder depth (dist/bundle/ is as deep as dist/engine/): version.js's
// '../../package.json' and block-pool's './block-worker.js' resolve to the same files from any chunk.
const input = {
  main: `${root}dist/cli/main.js`,
  'block-worker': `${root}dist/engine/pipeline/block-worker.js`,
  'md5-thread': `${root}dist/repo-format/storage/md5-thread.js`,
  'serve-daemon': `${root}dist/engine/mount/serve-daemon.js`,
};
rmSync(out, { recursive: true, force: true });
const build = await rolldown({
  input,
  platform: 'node',
  // A bare specifier is a package (or node:): loaded from node_modules as before.
  external: (id) => !id.startsWith('.') && !id.startsWith('/'),
  treeshake: true,
  // Each module comes with tsc's source map, so the bundle's maps lead back to the TypeScript sources.
  plugins: [
    {
      name: 'tsc-source-maps',
      load(id) {
        if (!id.endsWith('.js') || !existsSync(`${id}.map`)) return null;
        const code = readFileSync(id, 'utf8').replace(/\n\/\/# sourceMappingURL=\S+\s*$/, '\n');
        return { code, map: readFileSync(`${id}.map`, 'utf8') };
      },
    },
  ],
  logLevel: 'warn',
});
await build.write({ dir: out, format: 'esm', sourcemap: true, entryFileNames: '[name].js', chunkFileNames: '[name]-[hash].js' });
await build.close();
writeFileSync(`${out}/package.json`, '{ "type": "module" }\n');
