// Resolving what a SyncRelationship needs from the informers' caches: the sides' agents, each
// group volume's file on the source and its replica files on target PVCs, and the reason it is
// blocked when something is missing.
import type { V1Lease, V1PersistentVolume, V1PersistentVolumeClaim } from '@kubernetes/client-node';
import type {
  ConsistencyGroup,
  LockstepNode,
  SyncRelationship,
} from '../../operator/src/api/types';
import { Blocked } from '../../operator/src/resolve/blocked';
import {
  planRelationship,
  type PlanSources,
  type Plan,
} from '../../operator/src/resolve/relationship-plan';

const NOW = new Date('2026-01-01T00:00:00Z');
const moveStatus = {
  fromNode: 'a',
  toNode: 'c',
  phase: 'Establishing' as const,
  startTime: '2026-01-01T00:00:00Z',
  doneBytes: 0,
  totalBytes: 0,
  etaSeconds: -1,
};
const MiB = 2 ** 20;

function pvc(name: string, phase = 'Bound'): V1PersistentVolumeClaim {
  return {
    metadata: { name, namespace: 'ns' },
    spec: { volumeName: `pv-${name}` },
    status: { phase },
  };
}

function localPv(claim: string, node: string, storage: string): V1PersistentVolume {
  return {
    metadata: { name: `pv-${claim}` },
    spec: {
      capacity: { storage },
      local: { path: `/disks/${claim}` },
      nodeAffinity: {
        required: {
          nodeSelectorTerms: [
            {
              matchExpressions: [{ key: 'kubernetes.io/hostname', operator: 'In', values: [node] }],
            },
          ],
        },
      },
    },
  };
}

function lease(renewed: Date): V1Lease {
  return { spec: { renewTime: renewed, leaseDurationSeconds: 40 } };
}

function relationship(
  name: string,
  spec: Partial<SyncRelationship['spec']> = {},
): SyncRelationship {
  return {
    apiVersion: 'lockstep.dev/v1alpha1',
    kind: 'SyncRelationship',
    metadata: { name, namespace: 'ns', creationTimestamp: new Date('2026-01-01T00:00:00Z') },
    spec: {
      consistencyGroup: 'db',
      mode: 'Sync',
      source: { node: 'a' },
      targets: [{ node: 'b', pvc: 'replica' }],
      primary: 'source',
      ...spec,
    },
  };
}

/** A cluster where everything `db-sync` needs is in place; each test takes one piece away. */
function world() {
  const group: ConsistencyGroup = {
    metadata: { name: 'db', namespace: 'ns' },
    spec: {
      volumes: [
        { name: 'data', pvc: 'data', file: 'disk.img' },
        { name: 'log', pvc: 'log', file: 'disk.img' },
      ],
    },
  };
  const node = (name: string): LockstepNode => ({
    metadata: { name },
    spec: { endpoint: `${name}:7400` },
  });
  const state = {
    group,
    groups: new Map([['db', group]]),
    relationships: [relationship('db-sync')],
    nodes: new Map([
      ['a', node('a')],
      ['b', node('b')],
      ['c', node('c')],
    ]),
    leases: new Map([
      ['a', lease(new Date(NOW.getTime() - 5_000))],
      ['b', lease(new Date(NOW.getTime() - 5_000))],
      ['c', lease(new Date(NOW.getTime() - 5_000))],
    ]),
    pvcs: new Map([
      ['data', pvc('data')],
      ['log', pvc('log')],
      ['replica', pvc('replica')],
    ]),
    pvs: new Map([
      ['pv-data', localPv('data', 'a', '64Mi')],
      // Not a multiple of 4 KiB: the volume is rounded down to whole blocks.
      ['pv-log', localPv('log', 'a', '33554433')],
      ['pv-replica', localPv('replica', 'b', '256Mi')],
    ]),
  };
  const sources: PlanSources = {
    relationships: { list: () => state.relationships },
    groups: { get: (name) => state.groups.get(name) },
    nodes: { get: (name) => state.nodes.get(name) },
    leaseOf: (name) => state.leases.get(name),
    lookup: {
      pvc: (_ns, name) => state.pvcs.get(name),
      pvcs: () => [...state.pvcs.values()],
      pv: (name) => state.pvs.get(name),
    },
  };
  return { state, sources };
}

function blockedReason(plan: () => Plan): string {
  try {
    plan();
  } catch (err) {
    if (err instanceof Blocked) return err.reason;
    throw err;
  }
  throw new Error('the plan was not blocked');
}

describe('planning a relationship', () => {
  it('resolves the sides, each volume’s file on the source and its replica on the target PVC', () => {
    const { sources } = world();
    const plan = planRelationship(relationship('db-sync'), sources, NOW);
    const a = { node: 'a', endpoint: 'a:7400', ready: true };
    const b = { node: 'b', endpoint: 'b:7400', ready: true };
    expect(plan).toEqual({
      source: a,
      targets: [b],
      primary: a,
      volumes: [
        {
          name: 'data',
          pvc: 'data',
          agentName: 'ns.db.data',
          dataPath: '/disks/data/disk.img',
          sizeBytes: 64 * MiB,
          targetPaths: new Map([['b', '/disks/replica/data/disk.img']]),
        },
        {
          name: 'log',
          pvc: 'log',
          agentName: 'ns.db.log',
          dataPath: '/disks/log/disk.img',
          sizeBytes: 32 * MiB,
          targetPaths: new Map([['b', '/disks/replica/log/disk.img']]),
        },
      ],
    });
    expect(plan.primary).toBe(plan.source);
  });

  it('makes the target spec.primary names the primary, and keeps a target without a PVC in its data dir', () => {
    const { sources } = world();
    const plan = planRelationship(
      relationship('db-sync', { targets: [{ node: 'b' }], primary: 'b' }),
      sources,
      NOW,
    );
    expect(plan.primary).toBe(plan.targets[0]);
    expect(plan.volumes.map((v) => v.targetPaths.size)).toEqual([0, 0]);
  });

  it('plans a target in another cluster by its endpoint, with the Secret to reach it with', () => {
    const { sources } = world();
    const plan = planRelationship(
      relationship('db-sync', {
        targets: [{ endpoint: 'far.example:7400', tlsSecretRef: 'far-tls' }],
      }),
      sources,
      NOW,
    );
    expect(plan.targets).toEqual([
      {
        node: 'far.example:7400',
        endpoint: 'far.example:7400',
        ready: true,
        remote: { secret: 'far-tls' },
      },
    ]);
    expect(plan.volumes.map((v) => v.targetPaths.size)).toEqual([0, 0]);
  });

  it('plans a move when the source node changed: the node last primary until it hands over, the copies in the new node’s data dir', () => {
    const { sources } = world();
    const moved = relationship('db-sync', { source: { node: 'c' } });
    // A relationship that never ran cannot start on a node its PVCs are not on.
    expect(blockedReason(() => planRelationship(moved, sources, NOW))).toBe('VolumeNotOnSource');

    moved.status = { primaryNode: 'a' };
    const plan = planRelationship(moved, sources, NOW);
    expect(plan.source).toEqual({ node: 'c', endpoint: 'c:7400', ready: true });
    expect(plan.moveFrom).toEqual({ node: 'a', endpoint: 'a:7400', ready: true });
    expect(plan.volumes.map((v) => v.dataPath)).toEqual(['', '']);
    // Under way, the move's own record names the node it started from.
    moved.status = { primaryNode: 'a', move: { ...moveStatus, fromNode: 'a' } };
    expect(planRelationship(moved, sources, NOW).moveFrom?.node).toBe('a');
    // Done: the new source is the primary; no move, its copies still in its data dir.
    moved.status = { primaryNode: 'c' };
    const after = planRelationship(moved, sources, NOW);
    expect(after.moveFrom).toBeUndefined();
    expect(after.volumes.map((v) => v.dataPath)).toEqual(['', '']);
    // Switching the primary to a target is not a move.
    const switched = relationship('db-sync', { primary: 'b' });
    switched.status = { primaryNode: 'b' };
    expect(planRelationship(switched, sources, NOW).moveFrom).toBeUndefined();
  });

  it.each<
    [string, (w: ReturnType<typeof world>['state']) => void, Partial<SyncRelationship['spec']>]
  >([
    ['ConsistencyGroupNotFound', (s) => s.groups.clear(), {}],
    [
      'ConsistencyGroupInUse',
      (s) => {
        const older = relationship('aaa-sync');
        older.metadata.creationTimestamp = new Date('2025-12-31T00:00:00Z');
        s.relationships.push(older);
      },
      {},
    ],
    [
      'RemoteTargetPvc',
      () => undefined,
      { targets: [{ endpoint: 'far:7400', tlsSecretRef: 'tls', pvc: 'replica' }] },
    ],
    ['AgentNotRegistered', (s) => s.nodes.delete('b'), {}],
    ['AgentNotReady', (s) => s.leases.set('a', lease(new Date(NOW.getTime() - 60_000))), {}],
    ['AgentNotReady', (s) => s.leases.delete('b'), { primary: 'b' }], // never heartbeated
    ['NoVolumes', (s) => (s.group.spec.volumes = []), {}],
    ['PVCNotBound', (s) => s.pvcs.set('log', pvc('log', 'Pending')), {}],
    ['VolumeNotOnSource', (s) => s.pvs.set('pv-log', localPv('log', 'b', '32Mi')), {}],
    ['PVNotFound', (s) => s.pvs.delete('pv-replica'), {}],
    ['VolumeNotOnTarget', (s) => s.pvs.set('pv-replica', localPv('replica', 'a', '1Gi')), {}],
    ['PrimaryNotATarget', () => undefined, { primary: 'c' }],
  ])('is blocked with %s', (reason, change, spec) => {
    const { state, sources } = world();
    change(state);
    expect(blockedReason(() => planRelationship(relationship('db-sync', spec), sources, NOW))).toBe(
      reason,
    );
  });

  it('plans around a lost replica or a lost source that is no longer primary, marked not ready', () => {
    const { state, sources } = world();
    state.leases.delete('b');
    const plan = planRelationship(relationship('db-sync'), sources, NOW);
    expect(plan.targets.map((t) => [t.node, t.ready])).toEqual([['b', false]]);
    expect(plan.primary).toMatchObject({ node: 'a', ready: true });

    state.leases.set('b', lease(NOW));
    state.leases.set('a', lease(new Date(NOW.getTime() - 60_000)));
    const failedOver = planRelationship(relationship('db-sync', { primary: 'b' }), sources, NOW);
    expect(failedOver.source).toMatchObject({ node: 'a', ready: false });
    expect(failedOver.primary).toMatchObject({ node: 'b', ready: true });
  });

  it('says what happens next when the primary is lost, by failover policy', () => {
    const { state, sources } = world();
    state.leases.set('a', lease(new Date(NOW.getTime() - 60_000)));
    const message = (failover?: object) => {
      try {
        planRelationship(relationship('db-sync', failover ? { failover } : {}), sources, NOW);
      } catch (err) {
        return (err as Error).message;
      }
      throw new Error('the plan was not blocked');
    };
    expect(message()).toMatch(/without a mediator .* promote --force/);
    expect(message({ policy: 'Manual', mediator: 'm:7450' })).toMatch(/Manual: set spec.primary/);
    expect(message({ policy: 'Automatic', mediator: 'm:7450' })).toMatch(
      /failover monitor promotes an in-sync target/,
    );
  });

  it('gives the group to the oldest live relationship, by name on a tie, whatever the timestamps’ form', () => {
    const { state, sources } = world();
    const deleting = relationship('aaa-sync');
    deleting.metadata.creationTimestamp = new Date('2025-12-31T00:00:00Z');
    deleting.metadata.deletionTimestamp = new Date('2026-01-01T00:00:00Z');
    state.relationships.push(deleting);
    expect(planRelationship(relationship('db-sync'), sources, NOW).volumes).toHaveLength(2);

    // A watch delivers timestamps as strings: the same instant, a name earlier in order.
    const twin = relationship('cc-sync');
    twin.metadata.creationTimestamp = '2026-01-01T00:00:00Z' as unknown as Date;
    state.relationships.push(twin);
    expect(blockedReason(() => planRelationship(relationship('db-sync'), sources, NOW))).toBe(
      'ConsistencyGroupInUse',
    );
    expect(planRelationship(twin, sources, NOW).volumes).toHaveLength(2);
  });
});
