/** A horizontal bar chart in plain SVG: one group per scenario, one bar per tool, engine ratio on each bar. */
export interface ChartBar {
  scenario: string;
  tool: string;
  kind: 'engine' | 'peer' | 'ceiling';
  seconds: number;
  mbPerS: number;
}

const COLORS: Record<ChartBar['kind'], string> = { engine: '#2b6cb0', peer: '#dd6b20', ceiling: '#a0aec0' };

const escapeXml = (text: string): string => text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

/**
 * Bars are MB/s of disk size (higher is better). Each non-engine bar says how many times longer it took
 * than the engine's first bar of the same scenario ("engine 2.1× faster" / "engine 0.8×").
 */
export function svgBarChart(bars: ChartBar[], title: string): string {
  const width = 900;
  const barHeight = 20;
  const left = 330;
  const max = Math.max(...bars.map((b) => b.mbPerS), 1);
  const parts: string[] = [];
  let y = 40;
  let scenario: string | undefined;
  for (const bar of bars) {
    if (bar.scenario !== scenario) {
      scenario = bar.scenario;
      y += 8;
      parts.push(`<text x="10" y="${y + 14}" font-size="13" font-weight="bold">${escapeXml(scenario)}</text>`);
      y += 22;
    }
    const engine = bars.find((b) => b.scenario === bar.scenario && b.kind === 'engine');
    const ratio = engine && bar !== engine ? ` (engine ${(bar.seconds / engine.seconds).toFixed(2)}×)` : '';
    const w = Math.max(1, ((width - left - 230) * bar.mbPerS) / max);
    parts.push(
      `<text x="${left - 8}" y="${y + 14}" text-anchor="end" font-size="12">${escapeXml(bar.tool)}</text>` +
        `<rect x="${left}" y="${y}" width="${w.toFixed(1)}" height="${barHeight}" fill="${COLORS[bar.kind]}"/>` +
        `<text x="${(left + w + 6).toFixed(1)}" y="${y + 14}" font-size="12">${bar.mbPerS.toFixed(0)} MB/s${ratio}</text>`,
    );
    y += barHeight + 6;
  }
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${y + 20}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="15" font-weight="bold">${escapeXml(title)}</text>${parts.join('')}</svg>\n`;
}
