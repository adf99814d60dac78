// The Grafana dashboard the chart ships (a ConfigMap labelled grafana_dashboard: "1", which
// Grafana's dashboard sidecar loads). scripts/gen-chart.js writes it to
// charts/lockstep/files/dashboard.json; a test parses every query and checks each metric it
// reads against what the agent and the operator register.

interface Target {
  expr: string;
  legendFormat: string;
  refId: string;
  instant?: boolean;
  format?: 'table' | 'time_series';
}

interface Panel {
  id: number;
  type: string;
  title: string;
  description?: string;
  gridPos: { x: number; y: number; w: number; h: number };
  datasource?: { type: string; uid: string };
  targets?: Target[];
  fieldConfig?: object;
  options?: object;
  collapsed?: boolean;
  panels?: Panel[];
  transformations?: object[];
}

const DATASOURCE = { type: 'prometheus', uid: '${datasource}' };
/** Agent series of the node and volume picked at the top. */
const SEL = 'node=~"$node", volume=~"$volume"';

type Unit = 'bytes' | 'Bps' | 's' | 'percentunit' | 'short' | 'ops' | 'none';

interface PanelSpec {
  title: string;
  description: string;
  type?: 'timeseries' | 'stat' | 'table' | 'state-timeline' | 'bargauge';
  unit?: Unit;
  w?: number;
  h?: number;
  targets: Array<[expr: string, legend: string]>;
  instant?: boolean;
  /** Stat panels: thresholds from green, each [value, color]. */
  thresholds?: Array<[number, string]>;
  mappings?: object[];
}

/** Lays out rows of panels, 24 columns wide, numbering them. */
class Layout {
  readonly panels: Panel[] = [];
  private y = 0;
  private x = 0;
  private rowHeight = 0;
  private id = 1;

  row(title: string): this {
    this.newLine();
    this.panels.push({
      id: this.id++,
      type: 'row',
      title,
      collapsed: false,
      gridPos: { x: 0, y: this.y, w: 24, h: 1 },
      panels: [],
    });
    this.y += 1;
    return this;
  }

  panel(spec: PanelSpec): this {
    const w = spec.w ?? 12;
    const h = spec.h ?? 8;
    if (this.x + w > 24) this.newLine();
    const type = spec.type ?? 'timeseries';
    this.panels.push({
      id: this.id++,
      type,
      title: spec.title,
      description: spec.description,
      gridPos: { x: this.x, y: this.y, w, h },
      datasource: DATASOURCE,
      targets: spec.targets.map(([expr, legendFormat], i) => ({
        expr,
        legendFormat,
        refId: String.fromCharCode(65 + i),
        ...(spec.instant ? { instant: true, format: 'table' as const } : {}),
      })),
      fieldConfig: {
        defaults: {
          unit: spec.unit ?? 'short',
          ...(spec.thresholds
            ? {
                thresholds: {
                  mode: 'absolute',
                  steps: [
                    { color: 'green', value: null },
                    ...spec.thresholds.map(([value, color]) => ({ color, value })),
                  ],
                },
              }
            : {}),
          ...(spec.mappings ? { mappings: spec.mappings } : {}),
        },
        overrides: [],
      },
      options:
        type === 'timeseries'
          ? { legend: { displayMode: 'table', placement: 'bottom', calcs: ['lastNotNull', 'max'] } }
          : type === 'stat'
            ? { colorMode: 'background', graphMode: 'none', reduceOptions: { calcs: ['lastNotNull'] } }
            : {},
      ...(type === 'table' ? { transformations: [{ id: 'merge', options: {} }] } : {}),
    });
    this.x += w;
    this.rowHeight = Math.max(this.rowHeight, h);
    return this;
  }

  private newLine(): void {
    if (this.x > 0) this.y += this.rowHeight;
    this.x = 0;
    this.rowHeight = 0;
  }
}

const peerStateColors = [
  {
    type: 'value',
    options: {
      InSync: { color: 'green', index: 0 },
      Resyncing: { color: 'yellow', index: 1 },
      Baselining: { color: 'blue', index: 2 },
      Connecting: { color: 'yellow', index: 3 },
      OutOfSync: { color: 'orange', index: 4 },
      Disconnected: { color: 'red', index: 5 },
      SplitBrain: { color: 'dark-red', index: 6 },
    },
  },
];

function panels(): Panel[] {
  return new Layout()
    .row('Overview')
    .panel({
      title: 'Relationships in sync',
      description: 'SyncRelationships whose phase is InSync, of all.',
      type: 'stat',
      w: 4,
      h: 4,
      targets: [
        ['count(max by (namespace, relationship) (lockstep_operator_relationship_phase{phase="InSync"}) == 1)', 'in sync'],
      ],
    })
    .panel({
      title: 'Relationships degraded',
      description: 'SyncRelationships in Degraded or Failed.',
      type: 'stat',
      w: 4,
      h: 4,
      thresholds: [[1, 'orange']],
      targets: [
        [
          'count(max by (namespace, relationship) (lockstep_operator_relationship_phase{phase=~"Degraded|Failed"}) == 1) or vector(0)',
          'degraded',
        ],
      ],
    })
    .panel({
      title: 'Split brain',
      description: 'Volumes in split brain (a peer in SplitBrain, or two copies accepting writes).',
      type: 'stat',
      w: 4,
      h: 4,
      thresholds: [[1, 'red']],
      targets: [
        [
          'count(max by (volume) (lockstep_replication_peer_state{state="SplitBrain"}) == 1 or count by (volume) (lockstep_replication_accepts_writes == 1) > 1) or vector(0)',
          'split brain',
        ],
      ],
    })
    .panel({
      title: 'Volumes without an in-sync replica',
      description: 'Primaries whose writes are on one copy only right now (RPO is not 0).',
      type: 'stat',
      w: 4,
      h: 4,
      thresholds: [[1, 'red']],
      targets: [
        [
          'count(max by (node, volume) (lockstep_replication_peer_state{state="InSync"}) == 0 and on (node, volume) lockstep_volume_role{role="primary"} == 1) or vector(0)',
          'unprotected',
        ],
      ],
    })
    .panel({
      title: 'Dirty bytes',
      description: 'Bytes the replicas are missing, in all.',
      type: 'stat',
      unit: 'bytes',
      w: 4,
      h: 4,
      thresholds: [[1, 'yellow']],
      targets: [['sum(lockstep_replication_peer_dirty_bytes) or vector(0)', 'dirty']],
    })
    .panel({
      title: 'Agents up',
      description: 'Agents answering scrapes, and the version each runs.',
      type: 'stat',
      w: 4,
      h: 4,
      targets: [['count by (version) (lockstep_build_info{node!=""})', '{{version}}']],
    })
    .row('Relationships')
    .panel({
      title: 'Relationship phase',
      description: 'Each SyncRelationship’s phase over time (the operator’s view).',
      type: 'state-timeline',
      w: 24,
      h: 7,
      targets: [
        [
          'max by (namespace, relationship, phase) (lockstep_operator_relationship_phase == 1)',
          '{{namespace}}/{{relationship}} {{phase}}',
        ],
      ],
    })
    .panel({
      title: 'Dirty bytes per relationship',
      description: 'What each relationship’s copies are missing, as its status says.',
      unit: 'bytes',
      targets: [
        [
          'max by (namespace, relationship) (lockstep_operator_relationship_dirty_bytes)',
          '{{namespace}}/{{relationship}}',
        ],
      ],
    })
    .panel({
      title: 'Failovers',
      description: 'Failovers the operator started or adopted, and how long a primary has been lost.',
      targets: [
        ['sum by (relationship, kind) (increase(lockstep_operator_failovers_total[1h]))', '{{relationship}} {{kind}} (1h)'],
        ['max by (relationship) (lockstep_operator_primary_lost_seconds)', '{{relationship}} primary lost (s)'],
      ],
    })
    .row('Replication')
    .panel({
      title: 'Peer state',
      description: 'The state of each replica as its primary sees it.',
      type: 'state-timeline',
      w: 24,
      h: 7,
      mappings: peerStateColors,
      targets: [
        [
          `max by (node, volume, peer, state) (lockstep_replication_peer_state{${SEL}} == 1)`,
          '{{volume}} → {{peer}} {{state}}',
        ],
      ],
    })
    .panel({
      title: 'Dirty bytes per peer',
      description: 'Bytes each replica is missing (its dirty bitmap): what a resync will send.',
      unit: 'bytes',
      targets: [
        [`lockstep_replication_peer_dirty_bytes{${SEL}}`, '{{volume}} → {{peer}}'],
      ],
    })
    .panel({
      title: 'Lag',
      description: 'Time since each replica was last in sync (0 while it is).',
      unit: 's',
      targets: [
        [
          `(time() - lockstep_replication_peer_last_in_sync_timestamp_seconds{${SEL}}) * ignoring (state) (1 - lockstep_replication_peer_state{${SEL}, state="InSync"})`,
          '{{volume}} → {{peer}}',
        ],
      ],
    })
    .panel({
      title: 'Resync and establishment progress',
      description: 'The share sent of each resync or establishment under way.',
      unit: 'percentunit',
      type: 'bargauge',
      instant: true,
      targets: [
        [
          `lockstep_replication_resync_done_bytes{${SEL}} / lockstep_replication_resync_total_bytes{${SEL}}`,
          '{{volume}} → {{peer}} ({{kind}})',
        ],
      ],
    })
    .panel({
      title: 'Resync ETA and rate',
      description: 'Time left at the rate so far, and bytes per second sent by resync.',
      targets: [
        [`lockstep_replication_resync_eta_seconds{${SEL}}`, '{{volume}} → {{peer}} ETA (s)'],
        [
          `sum by (volume, peer) (rate(lockstep_replication_sent_bytes_total{${SEL}, kind="resync"}[1m]))`,
          '{{volume}} → {{peer}} B/s',
        ],
      ],
    })
    .row('Writes')
    .panel({
      title: 'Write latency: local, remote, total (p99)',
      description:
        'The local write, the slowest peer’s acknowledgement (sampled writes), and the whole NBD request.',
      unit: 's',
      w: 24,
      targets: [
        [
          `histogram_quantile(0.99, sum by (le, leg) (rate(lockstep_write_leg_duration_seconds_bucket{${SEL}}[5m])))`,
          '{{leg}} p99',
        ],
        [
          `histogram_quantile(0.99, sum by (le) (rate(lockstep_nbd_request_duration_seconds_bucket{${SEL}, op="write"}[5m])))`,
          'total p99',
        ],
        [
          `histogram_quantile(0.5, sum by (le) (rate(lockstep_nbd_request_duration_seconds_bucket{${SEL}, op="write"}[5m])))`,
          'total p50',
        ],
      ],
    })
    .panel({
      title: 'Throughput',
      description: 'Bytes through NBD per operation, and bytes replicated live to the peers.',
      unit: 'Bps',
      targets: [
        [`sum by (op) (rate(lockstep_nbd_bytes_total{${SEL}}[1m]))`, '{{op}}'],
        [
          `sum(rate(lockstep_replication_sent_bytes_total{${SEL}, kind="live"}[1m]))`,
          'replicated',
        ],
      ],
    })
    .panel({
      title: 'Operations',
      description: 'NBD requests per second, by operation and result.',
      unit: 'ops',
      targets: [
        [`sum by (op, result) (rate(lockstep_nbd_requests_total{${SEL}}[1m]))`, '{{op}} {{result}}'],
      ],
    })
    .row('Failover and epochs')
    .panel({
      title: 'Epoch',
      description: 'The newest epoch each copy has seen; it rises with every failover.',
      targets: [[`lockstep_replication_epoch{${SEL}}`, '{{volume}} on {{node}}']],
    })
    .panel({
      title: 'Accepts writes',
      description: 'Copies that may acknowledge writes: one per volume; two is a split brain.',
      targets: [[`sum by (volume) (lockstep_replication_accepts_writes{${SEL}})`, '{{volume}}']],
    })
    .panel({
      title: 'Mediator reachable',
      description: 'Whether each copy’s last call to its mediator was answered.',
      type: 'state-timeline',
      targets: [[`lockstep_replication_mediator_reachable{${SEL}}`, '{{volume}} on {{node}}']],
    })
    .panel({
      title: 'Link failures',
      description: 'Peer links that failed (lost, timed out, or the peer failed an op).',
      targets: [
        [
          `sum by (volume, peer) (increase(lockstep_replication_peer_link_failures_total{${SEL}}[10m]))`,
          '{{volume}} → {{peer}}',
        ],
      ],
    })
    .row('Snapshots')
    .panel({
      title: 'Snapshots',
      description: 'Snapshots of each volume on each copy.',
      targets: [[`lockstep_snapshots{${SEL}}`, '{{volume}} on {{node}}']],
    })
    .panel({
      title: 'Space held by snapshots',
      description: 'Old blocks saved by copy-before-write, per volume.',
      unit: 'bytes',
      targets: [[`lockstep_snapshot_saved_bytes{${SEL}}`, '{{volume}} on {{node}}']],
    }).panels;
}

const variable = (name: string, label: string, query: string) => ({
  name,
  label,
  type: 'query',
  datasource: DATASOURCE,
  query: { query, refId: name },
  definition: query,
  includeAll: true,
  multi: true,
  current: { text: 'All', value: '$__all' },
  allValue: '.*',
  refresh: 2,
  sort: 1,
});

export function grafanaDashboard(version: string): object {
  return {
    uid: 'lockstep-overview',
    title: 'Lockstep',
    description: `Synchronous replication: relationships, replicas, writes, failover, snapshots (Lockstep ${version}).`,
    tags: ['lockstep', 'storage', 'replication'],
    editable: true,
    schemaVersion: 39,
    version: 1,
    refresh: '30s',
    time: { from: 'now-6h', to: 'now' },
    timezone: 'browser',
    graphTooltip: 1,
    templating: {
      list: [
        {
          name: 'datasource',
          label: 'Data source',
          type: 'datasource',
          query: 'prometheus',
          current: {},
        },
        variable('node', 'Node', 'label_values(lockstep_volume_role, node)'),
        variable('volume', 'Volume', 'label_values(lockstep_volume_role{node=~"$node"}, volume)'),
      ],
    },
    annotations: { list: [] },
    links: [],
    panels: panels(),
  };
}
