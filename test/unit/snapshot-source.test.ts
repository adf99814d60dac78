// Resolving what a ReplicatedSnapshot needs from the informers' caches: the group its source
// names (directly or by a PVC), the relationship that replicates it, the primary and every copy,
// and the reason it waits when something is missing.
import type { V1PersistentVolume, V1PersistentVolumeClaim } from '@kubernetes/client-node';
import type {
  ConsistencyGroup,
  LockstepNode,
  ReplicatedSnapshot,
  SyncRelationship,
} from '../../operator/src/api/types';
import { Blocked } from '../../operator/src/resolve/blocked';
import {
  resolveSnapshotSource,
  type SnapshotSources,
} from '../../operator/src/resolve/snapshot-source';

const NOW = new Date('2026-01-01T00:00:00Z');
const MiB = 2 ** 20;

const group = (name: string, pvcs: string[]): ConsistencyGroup => ({
  metadata: { name, namespace: 'ns' },
  spec: { volumes: pvcs.map((p) => ({ name: p.replace(/^db-/, ''), pvc: p, file: 'disk.img' })) },
});

const relationship = (
  name: string,
  consistencyGroup: string,
  status: SyncRelationship['status'] = { phase: 'InSync', primaryNode: 'a' },
): SyncRelationship => ({
  metadata: { name, namespace: 'ns', creationTimestamp: NOW },
  spec: {
    consistencyGroup,
    mode: 'Sync',
    source: { node: 'a' },
    targets: [{ node: 'b' }],
    primary: 'source',
  },
  status,
});

const pvc = (name: string): V1PersistentVolumeClaim => ({
  metadata: { name, namespace: 'ns' },
  spec: { volumeName: `pv-${name}` },
  status: { phase: 'Bound' },
});

const pv = (claim: string): V1PersistentVolume => ({
  metadata: { name: `pv-${claim}` },
  spec: { capacity: { storage: '64Mi' }, local: { path: `/disks/${claim}` } },
});

const snapshot = (source: ReplicatedSnapshot['spec']['source']): ReplicatedSnapshot => ({
  metadata: { name: 's', namespace: 'ns', uid: 'u' },
  spec: { source },
});

function world() {
  const state = {
    groups: [group('db', ['db-data', 'db-log'])],
    relationships: [relationship('db-sync', 'db')],
    nodes: new Map<string, LockstepNode>(
      ['a', 'b'].map((n) => [n, { metadata: { name: n }, spec: { endpoint: `${n}:7400` } }]),
    ),
  };
  const claims = ['db-data', 'db-log', 'other'];
  const sources: SnapshotSources = {
    relationships: { list: () => state.relationships },
    groups: {
      get: (name) => state.groups.find((g) => g.metadata.name === name),
      list: () => state.groups,
    },
    nodes: { get: (name) => state.nodes.get(name) },
    leaseOf: () => ({ spec: { renewTime: NOW, leaseDurationSeconds: 40 } }),
    lookup: {
      pvc: (_ns, name) => (claims.includes(name) ? pvc(name) : undefined),
      pvcs: () => claims.map(pvc),
      pv: (name) => pv(name.replace(/^pv-/, '')),
    },
  };
  return { state, sources };
}

function blocked(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    if (err instanceof Blocked) return err.reason;
    throw err;
  }
  throw new Error('not blocked');
}

describe('resolving a replicated snapshot’s source', () => {
  it('takes every volume of a group on the relationship’s primary, with every side a copy', () => {
    const { sources } = world();
    const s = resolveSnapshotSource(snapshot({ consistencyGroup: 'db' }), sources, NOW);
    expect(s).toEqual({
      group: 'db',
      agentGroup: 'ns.db',
      relationship: 'db-sync',
      primary: { node: 'a', endpoint: 'a:7400', ready: true },
      sides: [
        { node: 'a', endpoint: 'a:7400', ready: true },
        { node: 'b', endpoint: 'b:7400', ready: true },
      ],
      volumes: [
        { name: 'data', pvc: 'db-data', agentName: 'ns.db.data', sizeBytes: 64 * MiB },
        { name: 'log', pvc: 'db-log', agentName: 'ns.db.log', sizeBytes: 64 * MiB },
      ],
      wholeGroup: true,
    });
  });

  it('finds the one volume of a PVC in its replicated group', () => {
    const { sources } = world();
    const s = resolveSnapshotSource(
      snapshot({ persistentVolumeClaimName: 'db-log' }),
      sources,
      NOW,
    );
    expect(s.wholeGroup).toBe(false);
    expect(s.volumes.map((v) => v.agentName)).toEqual(['ns.db.log']);
  });

  it('lists the primary first after a switchover', () => {
    const { state, sources } = world();
    state.relationships = [
      {
        ...relationship('db-sync', 'db', { phase: 'InSync', primaryNode: 'b' }),
        spec: { ...relationship('db-sync', 'db').spec, primary: 'b' },
      },
    ];
    const s = resolveSnapshotSource(snapshot({ consistencyGroup: 'db' }), sources, NOW);
    expect(s.sides.map((x) => x.node)).toEqual(['b', 'a']);
  });

  it.each([
    ['a group that does not exist', { consistencyGroup: 'nope' }, 'ConsistencyGroupNotFound'],
    ['a PVC in no group', { persistentVolumeClaimName: 'other' }, 'VolumeNotInGroup'],
  ])('waits for %s', (_what, source, reason) => {
    const { sources } = world();
    expect(blocked(() => resolveSnapshotSource(snapshot(source), sources, NOW))).toBe(reason);
  });

  it('waits until a relationship replicates the group and its replicas are complete', () => {
    const { state, sources } = world();
    const take = () => resolveSnapshotSource(snapshot({ consistencyGroup: 'db' }), sources, NOW);
    state.relationships = [];
    expect(blocked(take)).toBe('NotReplicated');
    state.relationships = [
      relationship('db-sync', 'db', { phase: 'Baselining', primaryNode: 'a' }),
    ];
    expect(blocked(take)).toBe('WaitingForReplication');
    state.relationships = [relationship('db-sync', 'db', { phase: 'Degraded', primaryNode: 'a' })];
    expect(take().primary.node).toBe('a');
    state.relationships = [
      {
        ...relationship('db-sync', 'db'),
        spec: { ...relationship('db-sync', 'db').spec, primary: 'b' },
      },
    ];
    expect(blocked(take)).toBe('SwitchingPrimary');
  });

  it('refuses a PVC that two replicated groups share', () => {
    const { state, sources } = world();
    state.groups.push(group('db2', ['db-log']));
    state.relationships.push(relationship('db2-sync', 'db2'));
    expect(
      blocked(() =>
        resolveSnapshotSource(snapshot({ persistentVolumeClaimName: 'db-log' }), sources, NOW),
      ),
    ).toBe('AmbiguousVolume');
    // Only one of them replicated: that one.
    state.relationships.pop();
    const s = resolveSnapshotSource(
      snapshot({ persistentVolumeClaimName: 'db-log' }),
      sources,
      NOW,
    );
    expect(s.group).toBe('db');
  });
});
