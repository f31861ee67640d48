/**
 * gc's phase 2, copy (SPEC.md 10.2), without the lock: the live frames of each pack to rewrite, read at
 * their index locations, checked in full and appended byte for byte to new packs under tmp/<token>.*,
 * made durable there (not published: nothing visible changes, and backups run meanwhile). A pack holding
 * a damaged live frame is not rewritten (repair first). A full disk rewrites nothing this time: the dead
 * packs are still deleted in phase 3, and the next gc rewrites with the room this one frees.
 */
import type { RepositoryKeys } from '../../repo-format/crypto.js';
import { NoSpaceError } from '../../repo-format/errors.js';
import { PackWriter, type PackTarget, type StoreHandle } from '../../repo-format/pack-file.js';
import { openBlob } from '../../repo-format/blob-codec.js';
import type { IndexEntry } from '../../repo-format/index-entry.js';
import { PACK_TARGET_SIZE } from '../../repo-format/constants.js';
import type { Interruption } from '../host/interrupt.js';
import { liveBytesOf, type PackPlan } from './plan.js';
import type { GcReport } from './report.js';

/** What phase 2 hands to phase 3. */
export interface GcCopies {
  /** The new packs, durable under tmp/; phase 3 publishes those it indexes, the caller drops the rest. */
  packs: PackWriter[];
  /** Old pack → the entries of its live frames in the new packs, in the order of its plan's `live` (sorted by offset). */
  moved: Map<string, IndexEntry[]>;
}

export interface CopyArgs {
  /** The repository's store, held between the two holds of the lock. */
  store: StoreHandle;
  keys: RepositoryKeys | undefined;
  /** The registered writer's token: the new packs are tmp/<token>.<pack id>.pack, which no lock holder removes. */
  token: string;
  notice: (message: string) => void;
  interruption: Interruption;
}

/** Copies the live frames of `rewrite`; a pack left as it is goes into `report.packs.kept`, with why. */
export async function copyLiveFrames(rewrite: readonly PackPlan[], args: CopyArgs, report: GcReport): Promise<GcCopies> {
  const target = new NewPacks(args.store.packTarget, args.token);
  const moved = new Map<string, IndexEntry[]>();
  try {
    for (const plan of rewrite) {
      plan.live.sort((a, b) => a.offset - b.offset); // phase 3 pairs plan.live[i] with moved[i]
      const frames = await readLiveFrames(plan, args);
      if (typeof frames === 'string') {
        // Copying would leave the damaged blob behind; verify and repair deal with it first.
        report.packs.kept.push({ pack: plan.packId, why: `not rewritten: ${frames}; run engine repair` });
        continue;
      }
      const entries: IndexEntry[] = [];
      moved.set(plan.packId, entries);
      for (const { entry, bytes } of frames) {
        await args.interruption.tick();
        entries.push(await target.append(bytes, entry));
      }
    }
    await target.finish();
    return { packs: target.packs, moved };
  } catch (error) {
    for (const pack of target.packs) await pack.abort().catch(() => undefined);
    if (!(error instanceof NoSpaceError)) throw error;
    keepForNextGc(rewrite, report);
    args.notice(`the repository's filesystem is full: no pack is rewritten this time; dead packs are still deleted`);
    return { packs: [], moved: new Map() };
  }
}

/** A full disk: every pack to rewrite stays (but those already kept for damage), with the room it needs. */
function keepForNextGc(rewrite: readonly PackPlan[], report: GcReport): void {
  for (const plan of rewrite) {
    if (report.packs.kept.some((k) => k.pack === plan.packId)) continue;
    report.packs.kept.push({ pack: plan.packId, why: `not rewritten: no space left for its ${liveBytesOf(plan)} live bytes; the next gc rewrites it with the room this one frees` });
  }
}

/** The live frames of one pack, each checked in full; or why the pack cannot be rewritten (a damaged frame). */
async function readLiveFrames(plan: PackPlan, args: CopyArgs): Promise<{ entry: IndexEntry; bytes: Buffer }[] | string> {
  const frames: { entry: IndexEntry; bytes: Buffer }[] = [];
  for (const entry of plan.live) {
    await args.interruption.tick();
    try {
      const bytes = await args.store.readFrame(entry);
      const opened = openBlob(bytes, entry.id, args.keys);
      if (typeof opened === 'string') return `the frame of blob ${entry.id.toString('hex').slice(0, 16)}… at offset ${entry.offset} is damaged (${opened})`;
      frames.push({ entry, bytes });
    } catch (error) {
      return (error as Error).message;
    }
  }
  return frames;
}

/** The new packs of one gc run: filled one after the other, each finished (durable under tmp/) once it reaches its target size. */
class NewPacks {
  readonly packs: PackWriter[] = [];
  private current: PackWriter | undefined;

  constructor(
    private readonly target: PackTarget,
    private readonly token: string,
  ) {}

  /** Appends a frame, byte for byte; returns its entry in the new pack. */
  async append(bytes: Buffer, entry: IndexEntry): Promise<IndexEntry> {
    if (!this.current) {
      this.current = new PackWriter(this.target, { tempPrefix: `${this.token}.` });
      this.packs.push(this.current);
    }
    const pack = this.current;
    const at = pack.entries.length;
    await pack.append(bytes, { kind: entry.kind, flags: entry.flags, rawLength: entry.rawLength, id: entry.id });
    if (pack.byteSize >= PACK_TARGET_SIZE) await this.finish();
    return pack.entries[at]!;
  }

  async finish(): Promise<void> {
    const pack = this.current;
    this.current = undefined;
    await pack?.finish();
  }
}
