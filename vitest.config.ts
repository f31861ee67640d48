import { defineConfig } from 'vitest/config';
import { BaseSequencer, type TestSpecification } from 'vitest/node';

/**
 * Files whose single tests run longest (the fault campaign's files hold tests of 1-2 minutes each; the
 * libvirt, S3 (format 3's backup, faults, gc, repair) and fixture files a few minutes in all): started first,
 * so that the run does not end with one worker on a long file and the other idle. Vitest orders by the
 * durations of the previous run when it has them (node_modules/.vite); a fresh clone, as in CI, has none and
 * would order by file size, which puts these small files last.
 */
const LONG_FILES = /\/(crash-[^/]*|cbt-libvirt|v3-(backup|faults|gc|gaps|repair)|spec-reader|fixtures|cbt-image|pack-loss|roundtrip)\.test\.ts$/;

class LongFilesFirst extends BaseSequencer {
  override async sort(files: TestSpecification[]): Promise<TestSpecification[]> {
    const sorted = await super.sort(files);
    if (files.every((file) => this.ctx.cache.getTestSpecificationResult(file) !== undefined)) return sorted;
    return [...sorted.filter((file) => LONG_FILES.test(file.moduleId)), ...sorted.filter((file) => !LONG_FILES.test(file.moduleId))];
  }
}

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    globalSetup: ['test/global-setup.ts'],
    // Tests spawn the CLI, qemu tools and worker pools; files run in parallel, tests within a file in order.
    // Three files at once on the 2-core machine: the long format-3 files spend much of their time waiting
    // (lease expiry, retries, RGW), and with two the clean clone used 150% of the CPU in all.
    testTimeout: 120_000,
    hookTimeout: 120_000,
    pool: 'forks',
    maxWorkers: 3,
    // The engine's compiled modules (dist/, tsc's output, which 93 files import) are loaded by Node itself, as the
    // CLI loads them, not transformed by Vite and run through its module runner in each file's fresh fork (Vite
    // inlines every module outside node_modules). Measured (vitest run, 3 sets of 10-20 light files, load 13-21):
    // 62.8 -> 58.8 CPU-s in all, -6%.
    // Packages' own dist/ folders keep Vite's rules.
    server: { deps: { external: [/^(?!.*\/node_modules\/).*\/dist\/.*\.js$/] } },
    sequence: { sequencer: LongFilesFirst },
  },
});
