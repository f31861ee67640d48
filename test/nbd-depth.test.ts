/**
 * The request pattern of a backup from an NBD export (issue 15): the reader keeps a constant depth, 16 MiB of
 * 256 KiB requests in flight over the connections, and sends the next request as each reply lands, where runs
 * of 8 MiB, two at a time, each complete as a whole before the next run is sent.
 *
 * A real nbdkit (the eval plugin: each request runs a shell that logs its start and its end) serves a 40 MiB
 * disk of random bytes. Its first read, at offset 0, is held. Reads answer at once until 32 have ended; after
 * that a read is held too until 64 reads are in flight at nbdkit at once, the held one at 0 among them. A
 * reader that refills as replies land gets there (1 held + 63 sent as the others were answered); a reader of
 * runs does not: with the run of offset 0 stuck on one read, only one other run (32 requests) is in flight,
 * and nothing more is sent until the held read ends (nbdkit lets go after 60 s then, and the test fails).
 * No timing is asserted: the holds are released by counts.
 */
import { afterAll, beforeAll, expect, test } from 'vitest';
import { spawn } from 'node:child_process';
import { access, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { backUp, expectRestoreIdentical, initRepository, tempDir, waitFor, writeRegion } from './helpers.js';

const MiB = 1024 * 1024;
const DISK = 40 * MiB;
const REQUEST = 256 * 1024;
/** NBD_DEPTH_BYTES (engine/sources/nbd-source.ts) in requests of REQUEST bytes. */
const DEPTH_REQUESTS = (16 * MiB) / REQUEST;
/** Reads answered at once before the holds start. */
const FREE_READS = 32;

let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-nbd-depth-'));
});
afterAll(async () => cleanup());

test('a backup keeps 16 MiB of 256 KiB requests in flight at an NBD export, refilled as replies land while one read is held', async () => {
  const disk = join(dir, 'disk.raw');
  await writeRegion(disk, 0, DISK, 'random', 'nbd-depth');
  const log = join(dir, 'requests.log');
  await writeFile(log, '');
  // $3 = count, $4 = offset. `full` is made by the first held read that sees DEPTH_REQUESTS in flight.
  const pread = join(dir, 'pread.sh');
  const countInFlight = `$(( $(grep -c ^start ${log}) - $(grep -c ^end ${log}) ))`;
  await writeFile(
    pread,
    `echo "start $4 $3" >> ${log}
i=0
if [ "$4" = 0 ] && mkdir ${dir}/held 2>/dev/null; then
  while [ ! -e ${dir}/full ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i + 1)); done
elif [ ! -e ${dir}/full ] && [ "$(grep -c ^end ${log})" -ge ${FREE_READS} ]; then
  while [ ! -e ${dir}/full ] && [ $i -lt 1200 ]; do
    n=${countInFlight}
    if [ $n -ge ${DEPTH_REQUESTS} ] && mkdir ${dir}/full 2>/dev/null; then echo "full $n" >> ${log}; fi
    sleep 0.05; i=$((i + 1))
  done
fi
dd if=${disk} iflag=skip_bytes,count_bytes skip=$4 count=$3 status=none
echo "end $4 $3" >> ${log}
`,
  );
  const socket = join(dir, 'nbdkit.sock');
  // -t 256: nbdkit takes every request the client sends (its default, 16 threads per connection, would cap the depth it sees).
  const nbdkit = spawn(
    'nbdkit',
    ['-f', '--exit-with-parent', '-U', socket, '-t', '256', 'eval', 'thread_model=echo parallel', 'can_multi_conn=exit 0', `get_size=echo ${DISK}`, `pread=sh ${pread} "$@"`],
    { stdio: 'ignore' },
  );
  try {
    await waitFor('nbdkit listens', () => access(socket).then(() => true, () => false), { child: nbdkit });
    const repo = join(dir, 'repo');
    await initRepository(repo);
    const backup = await backUp(repo, ['--source', `nbd+unix:///?socket=${socket}`, '--name', 'held']);
    expect(backup.disks[0]!.bytesRead).toBe(DISK);
    await expectRestoreIdentical(repo, backup.id, disk, { dir });
  } finally {
    nbdkit.kill('SIGTERM');
  }

  const lines = (await readFile(log, 'utf8')).trim().split('\n');
  const reads = lines.filter((line) => line.startsWith('start ')).map((line) => line.split(' ').map(Number));
  // Every byte read once, in requests of 256 KiB.
  expect(reads.length).toBe(DISK / REQUEST);
  expect(reads.every(([, , count]) => count === REQUEST)).toBe(true);
  expect(new Set(reads.map(([, offset]) => offset)).size).toBe(DISK / REQUEST);
  // The depth was reached while the read at 0 was held, after FREE_READS had ended: the reader refilled.
  expect(lines.filter((line) => line.startsWith('full '))).toEqual([`full ${DEPTH_REQUESTS}`]);
  // Never more than the depth in flight (as nbdkit saw them: a request starts after it was sent and ends before
  // its reply goes out, so this undercounts what the client had in flight, never overcounts).
  let inFlight = 0;
  let most = 0;
  for (const line of lines) {
    if (line.startsWith('start ')) inFlight += 1;
    else if (line.startsWith('end ')) inFlight -= 1;
    most = Math.max(most, inFlight);
  }
  expect(most).toBeLessThanOrEqual(DEPTH_REQUESTS);
}, 180_000);
