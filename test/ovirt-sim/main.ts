/** `npm run ovirt-sim`: the simulator on its own, for trying the engine by hand. */
import { startOvirtSim } from './server.js';

const port = Number(process.env.OVIRT_SIM_PORT ?? 8443);
const sim = await startOvirtSim({ port });
sim.addVm('vm1');
sim.addVm('backup-appliance');
process.stdout.write(`oVirt simulator at ${sim.url}/ovirt-engine/api (user admin@internal, password secret); Ctrl-C stops it\n`);
