/**
 * The fault campaign in an encrypted repository (test/fault-campaign.ts): a ciphertext byte changed with
 * its checksum recomputed, so that only the GCM tag tells; flipped bits and a cut in packs. After each:
 * verify names the damage, repair sets it aside, the next backup heals it; every committed backup restores
 * byte for byte.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readFile, stat, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseJson, runEngine, tempDir } from './helpers.js';
import { campaign, CampaignRepo, recordCampaign } from './fault-campaign.js';
import { KIND_DATA, scanPack, SeededRandom } from '../dist/engine/index.js';
import { checksum64, initChecksum } from '../dist/repo-format/checksum.js';

let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-crash-encrypted-'));
});
afterAll(async () => {
  await recordCampaign('crash-damage-encrypted');
  await cleanup();
});

describe('fault campaign, encrypted repository', () => {
  let c: CampaignRepo;

  beforeAll(async () => {
    await initChecksum();
    const passwordFile = join(dir, 'campaign-password');
    await writeFile(passwordFile, 'campaign passphrase\n');
    c = new CampaignRepo(join(dir, 'repo-campaign-encrypted'), dir, new SeededRandom('fault-campaign-encrypted'), ['--password-file', passwordFile]);
    // Format 2, the encrypted one-writer format (format 3 encrypted: crash-v3, v3-repair).
    expect((await runEngine(['init', c.repo, '--format', '2', '--encrypt', '--password-file', passwordFile])).code).toBe(0);
    await c.backupOf(await c.randomImage('enc-a', 4), 'enc-a');
    await c.backupOf(await c.randomImage('enc-b', 3), 'enc-b');
  });

  test('a ciphertext byte changed and the checksum recomputed: only the GCM tag tells; verify names it, repair sets it aside, the next backup heals it', async () => {
    const packs = await c.undamagedPacks();
    let target: { path: string; pack: string; offset: number; length: number } | undefined;
    for (const path of packs) {
      const pack = path.split('/').pop()!;
      const frame = (await scanPack(c.repo, pack, true)).frames.find((f) => f.header.kind === KIND_DATA);
      if (frame) target = { path, pack, offset: frame.offset, length: frame.length };
    }
    expect(target).toBeDefined();
    const { path, pack, offset, length } = target!;
    const bytes = await readFile(path);
    const frame = bytes.subarray(offset, offset + length);
    frame[48 + 12 + c.random.below(length - 48 - 12 - 16 - 8)]! ^= 0x20; // inside the ciphertext: after the nonce, before tag and checksum
    frame.writeBigUInt64LE(checksum64(frame.subarray(0, length - 8)), length - 8);
    await writeFile(path, bytes);
    c.count('damage');

    const verified = await c.run(['verify', '--read-data', '--json']);
    expect(verified.code).toBe(4);
    const problems = parseJson<{ problems: { code: string; message: string; pack?: string; packOffset?: number; backup?: string }[] }>(verified.stdout).problems;
    expect(problems.filter((p) => p.code === 'FRAME_DAMAGED')).toEqual([expect.objectContaining({ pack, packOffset: offset, message: expect.stringContaining('authentication failed (AES-256-GCM tag)') })]);
    const hurt = problems.filter((p) => p.code === 'CHUNK_DAMAGED').map((p) => p.backup!);
    expect(hurt.length).toBeGreaterThan(0);
    campaign.detected += 1;

    const repaired = await c.run(['repair', '--json']);
    expect(repaired.code).toBe(4);
    const report = parseJson<{ quarantined: { pack: string; offset: number; why: string }[]; damaged: { backup: string }[] }>(repaired.stdout);
    expect(report.quarantined).toEqual([expect.objectContaining({ pack, offset, why: expect.stringContaining('authentication failed (AES-256-GCM tag)') })]);
    expect([...new Set(report.damaged.map((d) => d.backup))].sort()).toEqual([...new Set(hurt)].sort());
    campaign.repaired += 1;
    // The next backup of the damaged backup's source stores a good copy; the damaged backup restores again.
    for (const id of new Set(hurt)) {
      const damaged = c.committed.find((b) => b.id === id)!;
      await c.backupOf(damaged.source, damaged.name);
    }
    await c.restoresAll();
    await c.verifies();
  });

  test('flipped bits and a cut in packs of an encrypted repository: detected, repaired, healed', async () => {
    for (let round = 0; round < 3; round += 1) {
      const packs = await c.undamagedPacks();
      const pack = packs[c.random.below(packs.length)]!;
      if (round < 2) await c.flipBit(pack, c.random.below((await stat(pack)).size));
      else await truncate(pack, c.random.below((await stat(pack)).size));
      await c.afterFault('damage', true);
    }
  });
});
