/**
 * The independent reader from the command line (built to dist/test/spec-reader/cli.js):
 *   node dist/test/spec-reader/cli.js list REPO
 *   node dist/test/spec-reader/cli.js restore REPO BACKUP_ID OUT_DIR     (every disk, as OUT_DIR/<disk name>)
 * An encrypted repository's passphrase is read from $ENGINE_PASSWORD (its bytes as given).
 */
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { Repository } from './reader.js';

function main(argv: string[]): void {
  const [command, repoPath, backupId, outDir] = argv;
  if (command === undefined || repoPath === undefined) throw new Error('usage: cli.js list REPO | restore REPO BACKUP_ID OUT_DIR');
  const passphrase = process.env.ENGINE_PASSWORD;
  const repo = Repository.open(repoPath, passphrase !== undefined ? { passphrase } : {});
  try {
    if (command === 'list') {
      console.log(JSON.stringify({ config: repo.config, index: repo.report, backups: repo.listBackups() }, null, 2));
      return;
    }
    if (command === 'restore' && backupId !== undefined && outDir !== undefined) {
      const record = repo.readRecord(backupId);
      mkdirSync(outDir, { recursive: true, mode: 0o700 });
      for (const disk of record.disks) console.log(JSON.stringify({ disk: disk.name, ...repo.restoreDisk(record, disk.name, join(outDir, disk.name)) }));
      return;
    }
    throw new Error(`unknown command ${command}`);
  } finally {
    repo.close();
  }
}

try {
  main(process.argv.slice(2));
} catch (error) {
  console.error((error as Error).message);
  process.exit(1);
}
