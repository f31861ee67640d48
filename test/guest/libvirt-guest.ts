/**
 * The libvirt domain XML of the tests' tiny guest (tiny-guest.ts) with a QEMU guest agent channel: TCG, q35, 256 MiB,
 * its qcow2 disk as virtio vda. One definition for test/quiesce-libvirt.test.ts and bench/quiesce.ts (bench may
 * import from test/, as it does test/rgw.ts; compiled into dist/ by tsconfig.json for the bench).
 */
export function agentGuestXml(options: { name: string; image: string; agentPort?: string; consoleLog?: string; ports?: string[] }): string {
  const serial = options.consoleLog === undefined ? '' : `\n<serial type='file'><source path='${options.consoleLog}'/><target port='0'/></serial>`;
  // More virtio-serial ports (libvirt makes each one's Unix socket on the host: `virsh dumpxml` names it), which the
  // guest finds as /dev/virtio-ports/NAME: the host's way to wake a script in the guest while its agent is stopped.
  const ports = (options.ports ?? []).map((port) => `\n<channel type='unix'><target type='virtio' name='${port}'/></channel>`).join('');
  return `<domain type='qemu'><name>${options.name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${options.image}'/><target dev='vda' bus='virtio'/></disk>
<channel type='unix'><target type='virtio' name='${options.agentPort ?? 'org.qemu.guest_agent.0'}'/></channel>${ports}${serial}
<video><model type='none'/></video><memballoon model='none'/></devices></domain>`;
}
