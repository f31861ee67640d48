/** `npm run ovirt-sim`: the simulator on its own, for trying the engine by hand. */
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startOvirtSim } from './server.js';

const dir = process.env.OVIRT_SIM_DIR ?? (await mkdtemp(join(tmpdir(), 'ovirt-sim-')));
const port = Number(process.env.OVIRT_SIM_PORT ?? 8080);
const sim = await startOvirtSim({ dir, port });
await sim.addVm('vm1', [{ alias: 'vm1_Disk1', size: '1G' }, { alias: 'vm1_Disk2', size: '256M' }]);
await sim.addVm('backup-appliance', []);
process.stdout.write(
  `oVirt simulator at ${sim.url}/ovirt-engine/api (user admin@internal, password secret)\n` +
    `images under ${dir}/images, appliance devices under ${sim.deviceRoot}; Ctrl-C stops it\n`,
);
process.on('SIGINT', () => void sim.stop().then(() => process.exit(0)));
