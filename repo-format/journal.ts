/**
 * Journals: a durable list of things a run created outside the repository (snapshots, attachments on a
 * hypervisor…) and has not cleaned up yet, so that a later run can finish the cleanup after a crash.
 * Storage only: entries are opaque string maps.
 *
 *   journal/<id>.json = {"id", "created", "context": {…}, "entries": [{"kind": …, …}, …]}
 *
 * Each change rewrites the file durably (temp, fsync, rename, fsync dir); a journal with no entries left is
 * deleted.
 */
import { readdir, rm } from 'node:fs/promises';
import { readBoundedFile } from './bounded-read.js';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { writeFileDurably } from './durable-file.js';
import { CorruptMetadataError } from './errors.js';
import { ensurePrivateDirectory, MUTABLE_FILE_MODE } from './file-modes.js';
import { SMALL_FILE_LIMIT } from './constants.js';

export type JournalEntry = Record<string, string> & { kind: string };

interface JournalFile {
  id: string;
  created: string;
  context: Record<string, string>;
  entries: JournalEntry[];
}

const DIR = 'journal';

export class Journal {
  private constructor(
    private readonly path: string,
    private readonly file: JournalFile,
  ) {}

  get id(): string {
    return this.file.id;
  }

  get context(): Readonly<Record<string, string>> {
    return this.file.context;
  }

  get entries(): readonly JournalEntry[] {
    return this.file.entries;
  }

  static async create(root: string, context: Record<string, string>): Promise<Journal> {
    await ensurePrivateDirectory(join(root, DIR));
    const id = randomBytes(8).toString('hex');
    const journal = new Journal(join(root, DIR, `${id}.json`), { id, created: new Date().toISOString(), context, entries: [] });
    await journal.save();
    return journal;
  }

  /** Every journal left in the repository, oldest first. */
  static async list(root: string): Promise<Journal[]> {
    const names = await readdir(join(root, DIR)).catch(() => [] as string[]);
    const journals: Journal[] = [];
    for (const name of names.filter((n) => /^[0-9a-f]{16}\.json$/.test(n)).sort()) {
      const path = join(root, DIR, name);
      let file: Partial<JournalFile> | null;
      try {
        file = JSON.parse((await readBoundedFile(path, SMALL_FILE_LIMIT)).toString('utf8')) as Partial<JournalFile> | null;
      } catch (error) {
        throw new CorruptMetadataError(`journal ${name}`, (error as Error).message);
      }
      // What clean-up walks must be there: a journal that parses but lacks it is as damaged as one that does not parse.
      const entries = file?.entries;
      if (typeof file?.created !== 'string' || !Array.isArray(entries) || !entries.every((e: Partial<JournalEntry> | null) => typeof e?.kind === 'string')) {
        throw new CorruptMetadataError(`journal ${name}`, 'it lacks its creation time or a list of entries with a kind');
      }
      journals.push(new Journal(path, file as JournalFile));
    }
    return journals.sort((a, b) => a.file.created.localeCompare(b.file.created));
  }

  /** Records a resource before (or as) it is created: a crash after this point leaves it listed. */
  async add(entry: JournalEntry): Promise<void> {
    this.file.entries.push(entry);
    await this.save();
  }

  /** Forgets resources that are gone; deletes the journal when nothing is left. */
  async remove(match: (entry: JournalEntry) => boolean): Promise<void> {
    this.file.entries = this.file.entries.filter((e) => !match(e));
    if (this.file.entries.length === 0) await rm(this.path, { force: true });
    else await this.save();
  }

  private async save(): Promise<void> {
    await writeFileDurably(this.path, Buffer.from(`${JSON.stringify(this.file, null, 2)}\n`), { mode: MUTABLE_FILE_MODE });
  }
}
