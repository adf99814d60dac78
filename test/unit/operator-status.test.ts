// Pure logic of the operator: conditions bookkeeping, where a PVC's data lives, and how the
// agents' per-peer states become a relationship's phase and conditions.
import type { V1PersistentVolume, V1PersistentVolumeClaim } from '@kubernetes/client-node';
import type { VolumeInfo } from '../../lib/agent-client';
import { locatePvc, parseQuantity } from '../../operator/src/resolve/pvc-location';
import type { Plan } from '../../operator/src/resolve/relationship-plan';
import { mergeConditions, sameJson } from '../../operator/src/status/conditions';
import { summarize } from '../../operator/src/status/relationship-status';
import { syncRelationship } from './relationship-fixture';

describe('conditions', () => {
  const t0 = new Date('2026-01-01T00:00:00Z');
  const t1 = new Date('2026-01-01T00:01:00Z');
  it('moves lastTransitionTime only when the status flips, and stamps the generation', () => {
    const first = mergeConditions(
      undefined,
      [{ type: 'Ready', status: 'True', reason: 'A', message: 'a' }],
      1,
      t0,
    );
    const same = mergeConditions(
      first,
      [{ type: 'Ready', status: 'True', reason: 'B', message: 'b' }],
      2,
      t1,
    );
    expect(same[0]).toMatchObject({
      lastTransitionTime: t0.toISOString(),
      reason: 'B',
      observedGeneration: 2,
    });
    const flipped = mergeConditions(
      same,
      [{ type: 'Ready', status: 'False', reason: 'C', message: 'c' }],
      2,
      t1,
    );
    expect(flipped[0]?.lastTransitionTime).toBe(t1.toISOString());
  });
  it('compares JSON regardless of key order, and tells differences apart', () => {
    expect(sameJson({ a: 1, b: [1, { c: 2, d: 3 }] }, { b: [1, { d: 3, c: 2 }], a: 1 })).toBe(true);
    expect(sameJson({ a: 1 }, { a: 1, b: undefined })).toBe(true);
    expect(sameJson({ a: [1, 2] }, { a: [2, 1] })).toBe(false);
    expect(sameJson({ a: 1 }, { a: '1' })).toBe(false);
  });
});

describe('locating a PVC', () => {
  const claim = (phase: string, volumeName = 'pv1'): V1PersistentVolumeClaim => ({
    metadata: { name: 'c' },
    spec: { volumeName },
    status: { phase },
  });
  const local = (node?: string): V1PersistentVolume => ({
    metadata: { name: 'pv1' },
    spec: {
      capacity: { storage: '64Mi' },
      local: { path: '/disks/pv1' },
      nodeAffinity: node
        ? {
            required: {
              nodeSelectorTerms: [
                {
                  matchExpressions: [
                    { key: 'kubernetes.io/hostname', operator: 'In', values: [node] },
                  ],
                },
              ],
            },
          }
        : undefined,
    },
  });
  it.each([
    ['a missing PVC', undefined, 'pv1', local('n1'), 'PVCNotFound'],
    ['an unbound PVC', claim('Pending', ''), '', undefined, 'PVCNotBound'],
    ['a missing PV', claim('Bound'), 'pv1', undefined, 'PVNotFound'],
    [
      'a network volume',
      claim('Bound'),
      'pv1',
      { metadata: { name: 'pv1' }, spec: { csi: { driver: 'x', volumeHandle: 'h' } } },
      'UnsupportedVolumeKind',
    ],
  ])('refuses %s with a reason', (_what, pvc, pvName, pv, reason) => {
    expect(locatePvc(pvc, pvName, pv, 'c')).toMatchObject({
      ok: false,
      reason,
    });
  });
  it('finds a local PV’s node and path, and a hostPath PV’s path', () => {
    expect(locatePvc(claim('Bound'), 'pv1', local('n1'), 'c')).toEqual({
      ok: true,
      node: 'n1',
      path: '/disks/pv1',
      capacityBytes: 64 * 1024 * 1024,
    });
    const hostPath: V1PersistentVolume = {
      spec: { hostPath: { path: '/h' }, capacity: { storage: '1Gi' } },
    };
    expect(locatePvc(claim('Bound'), 'pv1', hostPath, 'c')).toMatchObject({
      ok: true,
      node: undefined,
      path: '/h',
    });
  });
  it('reads storage quantities', () => {
    expect(parseQuantity('64Mi')).toBe(64 * 2 ** 20);
    expect(parseQuantity('1G')).toBe(1e9);
    expect(parseQuantity('1.5Gi')).toBe(1.5 * 2 ** 30);
    expect(parseQuantity('12')).toBe(12);
    expect(parseQuantity('lots')).toBe(0);
  });
});

describe('relationship status from the agents’ view', () => {
  const rel = syncRelationship({ generation: 3 });
  const a = { node: 'a', endpoint: 'a:1', ready: true };
  const b = { node: 'b', endpoint: 'b:1', ready: true };
  const plan: Plan = {
    source: a,
    targets: [b],
    primary: a,
    volumes: [
      {
        name: 'v',
        pvc: 'v',
        agentName: 'ns.g.v',
        dataPath: '/d',
        sizeBytes: 4096,
        targetPaths: new Map(),
      },
    ],
  };
  const volume = (
    state: string,
    dirtyBytes = 0,
    resync?: { kind: string; doneBytes: number; totalBytes: number; etaSeconds: number },
  ) =>
    ({
      name: 'ns.g.v',
      replication: {
        peers: [
          {
            address: 'b:1',
            state,
            dirtyBytes,
            reason: '',
            resync,
            lastInSyncMs: state === 'InSync' ? 1_700_000_000_000 : 0,
          },
        ],
      },
    }) as unknown as VolumeInfo;
  const phaseOf = (v: VolumeInfo[], unreachable?: string) =>
    summarize(rel, plan, { volumes: v, unreachable }).phase;

  it.each([
    ['InSync', 0, 'InSync'],
    ['InSync', 4096, 'Resyncing'], // an async peer's backlog: catching up, not in sync
    ['Baselining', 0, 'Baselining'],
    ['Resyncing', 0, 'Resyncing'],
    ['OutOfSync', 0, 'Degraded'],
    ['Disconnected', 0, 'Degraded'],
    ['SplitBrain', 0, 'SplitBrain'],
    ['PeerIsNewer', 0, 'SplitBrain'],
  ])('a peer %s with %d dirty bytes → %s', (state, dirty, phase) => {
    expect(phaseOf([volume(state, dirty)])).toBe(phase);
  });

  it('counts a peer connecting for the first time as setting up, one that was in sync as down', () => {
    expect(phaseOf([volume('Connecting')])).toBe('Baselining');
    const reconnecting = volume('Connecting');
    const peer = (reconnecting.replication?.peers ?? [])[0] as { lastInSyncMs: number };
    peer.lastInSyncMs = 1_700_000_000_000;
    expect(phaseOf([reconnecting])).toBe('Degraded');
  });

  it('is Degraded with the reason when the primary agent cannot be reached', () => {
    const s = summarize(rel, plan, { volumes: [], unreachable: 'peer a:1 is unavailable' });
    expect(s.phase).toBe('Degraded');
    expect(s.conditions?.find((c) => c.type === 'Ready')).toMatchObject({
      status: 'False',
      reason: 'PrimaryUnreachable',
    });
  });

  it.each([
    ['Baselining', 'baseline', 'Baseline'],
    ['Baselining', 'incremental', 'Incremental'],
    ['Resyncing', 'cutover', 'CuttingOver'],
  ])('a replica being established (%s, %s) is at step %s', (state, kind, step) => {
    const s = summarize(rel, plan, {
      volumes: [volume(state, 0, { kind, doneBytes: 1, totalBytes: 2, etaSeconds: 1 })],
    });
    expect(s).toMatchObject({ phase: 'Baselining', progression: step });
  });

  it('reports baseline progress, dirty bytes and the last in-sync time', () => {
    const s = summarize(rel, plan, {
      volumes: [
        volume('Baselining', 1000, {
          kind: 'baseline',
          doneBytes: 10,
          totalBytes: 40,
          etaSeconds: 3,
        }),
      ],
    });
    expect(s).toMatchObject({
      baseline: { doneBytes: 10, totalBytes: 40, etaSeconds: 3 },
      dirtyBytes: 1000,
      observedGeneration: 3,
    });
    expect(s.conditions?.find((c) => c.type === 'Resyncing')?.status).toBe('True');
    const done = summarize(rel, plan, { volumes: [volume('InSync')] });
    expect(done.baseline).toBeUndefined();
    expect(done.lastInSyncTime).toBe(new Date(1_700_000_000_000).toISOString());
    expect(done.conditions?.map((c) => [c.type, c.status])).toEqual([
      ['Ready', 'True'],
      ['InSync', 'True'],
      ['Degraded', 'False'],
      ['Resyncing', 'False'],
      ['SplitBrain', 'False'],
    ]);
  });

  it('reports each replica node: its furthest-behind volume’s state, what it misses and catches up', () => {
    const two = (first: VolumeInfo, second: VolumeInfo) => [first, { ...second, name: 'ns.g.w' }];
    const resync = { kind: 'bitmap', doneBytes: 100, totalBytes: 400, etaSeconds: 6 };
    expect(
      summarize(rel, plan, { volumes: two(volume('InSync'), volume('Resyncing', 300, resync)) })
        .copies,
    ).toEqual([
      {
        node: 'b',
        state: 'Resyncing',
        dirtyBytes: 300,
        doneBytes: 100,
        totalBytes: 400,
        etaSeconds: 6,
      },
    ]);
    expect(
      summarize(rel, plan, { volumes: two(volume('Disconnected', 50), volume('PeerIsNewer')) })
        .copies,
    ).toEqual([{ node: 'b', state: 'SplitBrain', dirtyBytes: 50 }]);
    expect(summarize(rel, plan, { volumes: [volume('InSync')] }).copies).toEqual([
      { node: 'b', state: 'InSync', dirtyBytes: 0 },
    ]);
  });

  it('names each replica’s last consistent snapshot while it catches up, in a field and the Resyncing condition', () => {
    const resyncing = volume('Resyncing', 8192, {
      kind: 'snapshot',
      doneBytes: 0,
      totalBytes: 8192,
      etaSeconds: -1,
    });
    Object.assign(resyncing.replication?.peers[0] ?? {}, {
      consistentSnapshot: 'before-resync',
      consistentSnapshotAtMs: 1_700_000_000_000,
    });
    const s = summarize(rel, plan, { volumes: [resyncing] });
    const time = new Date(1_700_000_000_000).toISOString();
    expect(s.lastConsistentSnapshots).toEqual([
      { node: 'b', volume: 'v', snapshot: 'before-resync', time },
    ]);
    expect(s.conditions?.find((c) => c.type === 'Resyncing')?.message).toBe(
      `1 replica volume(s) catching up; b v is protected by snapshot before-resync (${time})`,
    );
    expect(summarize(rel, plan, { volumes: [volume('InSync')] }).lastConsistentSnapshots).toBe(
      undefined,
    );
  });

  it('reports the epoch and exports, and the monitor’s failover once the new primary accepts writes', () => {
    const protection = (acceptsWrites: boolean) =>
      ({
        ...volume('Disconnected'),
        exportUri: 'nbd://b/ns.g.v',
        replication: {
          ...volume('Disconnected').replication,
          protection: { epoch: 7, acceptsWrites },
        },
      }) as unknown as VolumeInfo;
    const started = new Date(Date.now() - 2_000).toISOString();
    const failedOver = syncRelationship({
      generation: 4,
      annotations: {
        'lockstep.dev/failover': JSON.stringify({
          fromNode: 'b',
          toNode: 'a',
          epoch: 0,
          startTime: started,
          reason: 'b lost',
        }),
      },
    });
    const seeking = summarize(failedOver, plan, { volumes: [protection(false)] });
    expect(seeking.failover).toMatchObject({
      epoch: 7,
      exports: [{ volume: 'v', uri: 'nbd://b/ns.g.v' }],
      lastFailover: { toNode: 'a', epoch: 7 },
    });
    expect(seeking.failover?.lastFailover?.durationSeconds).toBeUndefined();
    const done = summarize(failedOver, plan, { volumes: [protection(true)] });
    expect(done.failover?.lastFailover?.durationSeconds).toBeGreaterThanOrEqual(2);
    // An annotation that does not parse is ignored, not fatal.
    const garbled = syncRelationship({ annotations: { 'lockstep.dev/failover': '{not json' } });
    expect(summarize(garbled, plan, { volumes: [protection(true)] }).failover?.lastFailover).toBe(
      undefined,
    );
  });

  it('reports a move under way: the node answering as primary, and the move’s phase', () => {
    const move = {
      fromNode: 'old',
      toNode: 'a',
      phase: 'Establishing' as const,
      startTime: new Date(0).toISOString(),
      doneBytes: 1,
      totalBytes: 2,
      etaSeconds: 1,
    };
    const s = summarize(rel, plan, { volumes: [volume('InSync')], primaryNode: 'old', move });
    expect(s).toMatchObject({ primaryNode: 'old', move });
    expect(s.conditions?.find((c) => c.type === 'Ready')?.message).toBe(
      'replicating 1 volume(s) from old to a, b',
    );
  });
});
