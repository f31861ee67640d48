/**
 * The definition of a live restore's new domain, made from the one a `backup --libvirt` kept (the record's
 * `libvirt-domain` attachment, `dumpxml --inactive`): a new name, no uuid (libvirt makes one), no MAC addresses
 * (libvirt makes new ones: the original VM may still run on the same network), no NVRAM file of the original
 * (libvirt makes one from its template), the agent channels' sockets left to libvirt, and every disk pointed at
 * its new qcow2 target, whose backing file (the NBD export) libvirt reads from the image itself.
 */
import { InvalidArgumentError } from '../../repo-format/errors.js';

export function xmlEscape(text: string): string {
  return text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/'/g, '&apos;').replace(/"/g, '&quot;');
}

/** The `<target dev=…>` of each `device='disk'` disk of a domain definition, in order. */
export function domainDiskTargets(xml: string): string[] {
  const targets: string[] = [];
  for (const disk of xml.match(/<disk\b[^>]*>[\s\S]*?<\/disk\s*>/g) ?? []) {
    if (!/\bdevice=['"]disk['"]/.test(disk.slice(0, disk.indexOf('>')))) continue;
    const dev = /<target\b[^>]*\bdev=['"]([^'"]+)['"]/.exec(disk)?.[1];
    if (dev !== undefined) targets.push(dev);
  }
  return targets;
}

/** `targets`: the new image of each disk, by its target device (vda …); every disk of the domain must have one. */
export function liveDomainXml(xml: string, name: string, targets: ReadonlyMap<string, string>): string {
  if (!/<domain\b/.test(xml)) throw new InvalidArgumentError('the backup\'s libvirt-domain attachment holds no <domain> definition');
  let out = xml
    // The first <name> is the domain's (it comes right after <domain>; <metadata> may hold others later).
    .replace(/<name>[\s\S]*?<\/name>/, `<name>${xmlEscape(name)}</name>`)
    .replace(/[ \t]*<uuid>[\s\S]*?<\/uuid>\n?/, '')
    .replace(/[ \t]*<mac\b[^>]*\/>\n?/g, '')
    .replace(/[ \t]*<nvram\b[^>]*\/>\n?|[ \t]*<nvram\b[^>]*>[\s\S]*?<\/nvram\s*>\n?/g, '')
    // An agent channel's socket under the original domain's folder: libvirt makes one for the new domain.
    .replace(/(<source\b[^>]*?)\s+path=['"]\/var\/lib\/libvirt\/qemu\/channel\/[^'"]*['"]/g, '$1');
  const seen = new Set<string>();
  out = out.replace(/<disk\b[^>]*>[\s\S]*?<\/disk\s*>/g, (disk) => {
    const head = disk.slice(0, disk.indexOf('>') + 1);
    if (!/\bdevice=['"]disk['"]/.test(head)) return disk;
    const dev = /<target\b[^>]*\bdev=['"]([^'"]+)['"]/.exec(disk)?.[1];
    const image = dev === undefined ? undefined : targets.get(dev);
    if (dev === undefined || image === undefined) throw new InvalidArgumentError(`disk ${dev ?? '(without a target)'} of the backup's domain has no restored disk: a live restore into a new domain restores every disk`);
    seen.add(dev);
    const driver = /<driver\b[^>]*\/>/.exec(disk)?.[0];
    const newDriver = driver === undefined ? `<driver name='qemu' type='qcow2'/>` : /\btype=['"][^'"]*['"]/.test(driver) ? driver.replace(/\btype=['"][^'"]*['"]/, `type='qcow2'`) : driver.replace(/\/>$/, ` type='qcow2'/>`);
    let body = disk
      .slice(head.length)
      // The original's source, its backing chain and its driver: the new image's come instead.
      .replace(/[ \t]*<source\b[^>]*\/>\n?|[ \t]*<source\b[^>]*>[\s\S]*?<\/source\s*>\n?/, '')
      .replace(/[ \t]*<backingStore\b[^>]*\/>\n?|[ \t]*<backingStore\b[^>]*>[\s\S]*?<\/backingStore\s*>\n?/g, '')
      .replace(/[ \t]*<driver\b[^>]*\/>\n?/, '');
    body = `\n      ${newDriver}\n      <source file='${xmlEscape(image)}'/>${body.startsWith('\n') ? '' : '\n'}${body}`;
    return `${head.replace(/\btype=['"][^'"]*['"]/, `type='file'`)}${body}`;
  });
  for (const dev of targets.keys()) {
    if (!seen.has(dev)) throw new InvalidArgumentError(`the backup's domain has no disk ${dev}`);
  }
  return out;
}
