// The Grafana dashboard the chart ships (charts/lockstep/files/dashboard.json): every query
// parses as PromQL and reads only metrics the agent and the operator register, so the dashboard
// cannot drift from the code; every panel is laid out on the grid without overlap, and the
// views an operator needs are there.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { packageRoot } from '../../lib/package-root';
import { metricNamesIn, registeredMetricNames } from '../harness/metric-names';

interface Panel {
  id: number;
  type: string;
  title: string;
  gridPos: { x: number; y: number; w: number; h: number };
  datasource?: { uid: string };
  targets?: { expr: string; refId: string }[];
}
interface Dashboard {
  uid: string;
  panels: Panel[];
  templating: { list: { name: string; definition?: string }[] };
}

const dashboard = JSON.parse(
  readFileSync(path.join(packageRoot, 'charts', 'lockstep', 'files', 'dashboard.json'), 'utf8'),
) as Dashboard;
const panels = dashboard.panels.filter((p) => p.type !== 'row');

describe('the Grafana dashboard', () => {
  it('queries only metrics the agent and the operator register, in valid PromQL', () => {
    const registered = registeredMetricNames();
    const read = new Set<string>();
    for (const p of panels) {
      expect(p.targets?.length).toBeGreaterThan(0);
      for (const t of p.targets ?? []) {
        const names = metricNamesIn(t.expr);
        expect(names.length).toBeGreaterThan(0);
        for (const n of names) read.add(n);
        const unknown = names.filter((n) => !registered.has(n));
        expect({ panel: p.title, unknown }).toEqual({ panel: p.title, unknown: [] });
      }
    }
    // The variables' label_values() name metrics too.
    for (const v of dashboard.templating.list) {
      const metric = /^label_values\(([a-z_]+)/.exec(v.definition ?? '')?.[1];
      if (metric) expect(registered.has(metric)).toBe(true);
    }
    expect(read.size).toBeGreaterThanOrEqual(15);
  });

  it('has the views an operator needs', () => {
    expect(panels.map((p) => p.title)).toEqual(
      expect.arrayContaining([
        'Relationship phase',
        'Dirty bytes per peer',
        'Lag',
        'Resync and establishment progress',
        'Resync ETA and rate',
        'Write latency: local, remote, total (p99)',
        'Throughput',
        'Failovers',
        'Epoch',
        'Snapshots',
      ]),
    );
    const legs = panels.find((p) => p.title.startsWith('Write latency'));
    expect(legs?.targets?.map((t) => t.expr).join('\n')).toMatch(
      /lockstep_write_leg_duration_seconds_bucket[\s\S]*lockstep_nbd_request_duration_seconds_bucket/,
    );
  });

  it('lays every panel on the 24-column grid without overlap, each with its own id and the chosen data source', () => {
    const ids = dashboard.panels.map((p) => p.id);
    expect(new Set(ids).size).toBe(ids.length);
    const cells = new Set<string>();
    for (const p of dashboard.panels) {
      const { x, y, w, h } = p.gridPos;
      expect(x + w).toBeLessThanOrEqual(24);
      for (let i = x; i < x + w; i++)
        for (let j = y; j < y + h; j++) {
          expect(cells.has(`${i},${j}`)).toBe(false);
          cells.add(`${i},${j}`);
        }
    }
    for (const p of panels) expect(p.datasource?.uid).toBe('${datasource}');
    expect(dashboard.uid).toBe('lockstep-overview');
  });
});
