// The lockstep.dev CRDs on a real apiserver: they install with kubectl, refuse invalid specs
// with a message people can act on, enforce immutable fields, and print useful columns.
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { kubectl } from '../harness/control-plane';
import { waitFor } from '../harness/processes';

const kubeconfig = process.env.LOCKSTEP_TEST_KUBECONFIG!;
const root = path.resolve(__dirname, '..', '..');

function apply(manifest: object): string {
  return kubectl(kubeconfig, ['apply', '-f', '-'], JSON.stringify(manifest));
}

function rejection(manifest: object): string {
  try {
    apply(manifest);
  } catch (err) {
    return String((err as { stderr?: string }).stderr ?? err);
  }
  throw new Error('the apiserver accepted an invalid object');
}

const relationship = (name: string, spec: Record<string, unknown>) => ({
  apiVersion: 'lockstep.dev/v1alpha1',
  kind: 'SyncRelationship',
  metadata: { name, namespace: 'default' },
  spec: {
    consistencyGroup: 'db',
    source: { node: 'node-a' },
    targets: [{ node: 'node-b' }],
    ...spec,
  },
});

describe('lockstep.dev CRDs', () => {
  beforeAll(async () => {
    kubectl(kubeconfig, ['apply', '-f', path.join(root, 'deploy', 'crds')]);
    await waitFor(
      'CRDs established',
      () =>
        Promise.resolve(
          kubectl(kubeconfig, [
            'wait',
            '--for=condition=Established',
            '--timeout=20s',
            'crd',
            'syncrelationships.lockstep.dev',
            'consistencygroups.lockstep.dev',
            'lockstepnodes.lockstep.dev',
            'replicatedsnapshots.lockstep.dev',
          ])
            ? true
            : undefined,
        ),
      30_000,
    );
  });

  it('are generated from the API source (deploy/crds is up to date)', () => {
    expect(() =>
      execFileSync(process.execPath, [path.join(root, 'scripts', 'gen-crds.js'), '--check'], {
        stdio: 'pipe',
      }),
    ).not.toThrow();
  });

  it.each([
    [
      'no targets',
      { targets: [] },
      /spec.targets: Invalid value: 0: spec.targets in body should have at least 1 items/,
    ],
    ['an unknown mode', { mode: 'Sometimes' }, /spec.mode: Unsupported value: "Sometimes"/],
    [
      'a target that is both node and endpoint',
      { targets: [{ node: 'node-b', endpoint: '10.0.0.1:7400', tlsSecretRef: 's' }] },
      /a target is either a node or a remote endpoint/,
    ],
    [
      'a remote endpoint without TLS',
      { targets: [{ endpoint: 'agent.example:7400' }] },
      /a remote endpoint needs tlsSecretRef/,
    ],
    [
      'StrictSync to a remote endpoint',
      { mode: 'StrictSync', targets: [{ endpoint: 'agent.example:7400', tlsSecretRef: 's' }] },
      /StrictSync needs every target in this cluster/,
    ],
    [
      'a primary that is not a side',
      { primary: 'node-z' },
      /primary must be "source" or the node of one of the targets/,
    ],
    [
      'a target on the source node',
      { targets: [{ node: 'node-a' }] },
      /a target cannot be the source node/,
    ],
    [
      'a snapshot schedule that keeps nothing',
      { snapshotSchedules: [{ label: 'hourly', intervalMinutes: 60, keep: 0 }] },
      /spec.snapshotSchedules\[0\].keep: Invalid value: 0/,
    ],
    [
      'two snapshot schedules of one label',
      {
        snapshotSchedules: [
          { label: 'hourly', intervalMinutes: 60, keep: 24 },
          { label: 'hourly', intervalMinutes: 30, keep: 4 },
        ],
      },
      /spec.snapshotSchedules\[1\]: Duplicate value/,
    ],
    [
      'a region size that is not offered',
      { resync: { regionSize: 1000 } },
      /spec.resync.regionSize: Unsupported value: 1000/,
    ],
    [
      'automatic failover without a mediator',
      { failover: { policy: 'Automatic' } },
      /failover.policy Automatic needs failover.mediator/,
    ],
    [
      'a mediator that is not HOST:PORT',
      { failover: { mediator: 'mediator.example' } },
      /spec.failover.mediator in body should match/,
    ],
    [
      'a grace period that is not a duration',
      { failover: { mediator: 'm.example:7450', grace: 'soon' } },
      /spec.failover.grace in body should match/,
    ],
    [
      'an unknown failover policy',
      { failover: { mediator: 'm.example:7450', policy: 'Sometimes' } },
      /spec.failover.policy: Unsupported value: "Sometimes"/,
    ],
  ])('refuse %s with a clear message', (_what, spec, message) => {
    expect(rejection(relationship('bad', spec))).toMatch(message);
  });

  it('accept a valid relationship, default its fields, keep the group immutable and let the source move', () => {
    apply(relationship('good', {}));
    const got = JSON.parse(kubectl(kubeconfig, ['get', 'lsr', 'good', '-o', 'json'])) as {
      spec: Record<string, unknown>;
    };
    expect(got.spec).toMatchObject({ mode: 'Sync', primary: 'source' });
    expect(rejection(relationship('good', { consistencyGroup: 'other' }))).toMatch(
      /consistencyGroup is immutable/,
    );
    // A move of the primary (source → another node) and a switchover (primary → a target node)
    // are allowed changes.
    apply(relationship('good', { source: { node: 'node-c' } }));
    expect(kubectl(kubeconfig, ['get', 'lsr', 'good', '-o', 'jsonpath={.spec.source.node}'])).toBe(
      'node-c',
    );
    apply(relationship('good', { primary: 'node-b' }));
    const table = kubectl(kubeconfig, ['get', 'lsr']);
    expect(table.split('\n')[0]).toMatch(/^NAME\s+PHASE\s+MODE\s+PRIMARY\s+DIRTY\s+AGE$/);
    // The phase is empty, or Pending if an operator of another test file (the suites share the
    // apiserver) has looked at it meanwhile.
    expect(table).toMatch(/^good\s+(Pending\s+)?Sync\s+/m);
  });

  it('require exactly one way of naming a group’s volumes, and a relative file path', () => {
    const group = (spec: object) => ({
      apiVersion: 'lockstep.dev/v1alpha1',
      kind: 'ConsistencyGroup',
      metadata: { name: 'db', namespace: 'default' },
      spec,
    });
    expect(rejection(group({}))).toMatch(/set exactly one of volumes or pvcSelector/);
    expect(
      rejection(group({ volumes: [{ name: 'data', pvc: 'data', file: '../etc/passwd' }] })),
    ).toMatch(/file must be a relative path inside the PVC/);
    apply(
      group({
        volumes: [
          { name: 'data', pvc: 'data-pvc' },
          { name: 'log', pvc: 'log-pvc', file: 'log.img' },
        ],
      }),
    );
    const got = JSON.parse(kubectl(kubeconfig, ['get', 'lcg', 'db', '-o', 'json'])) as {
      spec: { volumes: { file: string }[] };
    };
    expect(got.spec.volumes.map((v) => v.file)).toEqual(['disk.img', 'log.img']);
  });

  describe('ReplicatedSnapshot', () => {
    const snapshot = (name: string, spec: Record<string, unknown>) => ({
      apiVersion: 'lockstep.dev/v1alpha1',
      kind: 'ReplicatedSnapshot',
      metadata: { name, namespace: 'default' },
      spec,
    });

    it.each([
      ['no source', {}, /spec.source: Required value/],
      [
        'a source naming neither a group nor a volume',
        { source: {} },
        /set exactly one of source.consistencyGroup or source.persistentVolumeClaimName/,
      ],
      [
        'a source naming both a group and a volume',
        { source: { consistencyGroup: 'db', persistentVolumeClaimName: 'db-data' } },
        /set exactly one of source.consistencyGroup or source.persistentVolumeClaimName/,
      ],
      [
        'a label with spaces',
        { source: { consistencyGroup: 'db' }, label: 'before upgrade' },
        /spec.label in body should match/,
      ],
      [
        'a label with capitals (the agents take lowercase only)',
        { source: { consistencyGroup: 'db' }, label: 'Nightly' },
        /spec.label in body should match/,
      ],
      [
        'a label that ends in a dash',
        { source: { consistencyGroup: 'db' }, label: 'nightly-' },
        /spec.label in body should match/,
      ],
      [
        'a label longer than 63 characters',
        { source: { consistencyGroup: 'db' }, label: 'x'.repeat(64) },
        /spec.label: Too long/,
      ],
      [
        'a group name that is not a DNS label',
        { source: { consistencyGroup: 'DB_1' } },
        /spec.source.consistencyGroup in body should match/,
      ],
    ])('refuse %s', (_what, spec, message) => {
      expect(rejection(snapshot('bad', spec))).toMatch(message);
    });

    it('accept a valid one, keep its source and label immutable, and let verify change', () => {
      apply(snapshot('nightly', { source: { consistencyGroup: 'db' }, label: 'nightly' }));
      expect(
        rejection(snapshot('nightly', { source: { consistencyGroup: 'db2' }, label: 'nightly' })),
      ).toMatch(/source is immutable/);
      expect(
        rejection(snapshot('nightly', { source: { consistencyGroup: 'db' }, label: 'weekly' })),
      ).toMatch(/label is immutable/);
      expect(rejection(snapshot('nightly', { source: { consistencyGroup: 'db' } }))).toMatch(
        /label is immutable/,
      );
      apply(
        snapshot('nightly', { source: { consistencyGroup: 'db' }, label: 'nightly', verify: true }),
      );
      apply(snapshot('one', { source: { persistentVolumeClaimName: 'db-data' } }));
      const table = kubectl(kubeconfig, ['get', 'lrs']);
      expect(table.split('\n')[0]).toMatch(
        /^NAME\s+READY\s+PHASE\s+GROUP\s+LABEL\s+COPIES\s+VERIFIED\s+CREATED\s+AGE$/,
      );
      // The label under its heading. (READY and PHASE may be filled by now: the suite's control
      // plane is shared, and another file's operator may already be reconciling this object.)
      const [heading, ...rows] = table.split('\n');
      const nightly = rows.find((r) => r.startsWith('nightly '));
      expect(nightly?.slice(heading.indexOf('LABEL')).split(/\s+/)[0]).toBe('nightly');
    });
  });
});
