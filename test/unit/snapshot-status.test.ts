// A ReplicatedSnapshot's status from what the primary's agent reports: the stable ids a CSI
// layer reads, each copy's state, readyToUse and creationTime from a GroupSnapshot, the
// verification result from VerifySnapshot, the conditions, and which Events a change deserves.
import type { SnapshotInfo, Verification } from '../../lib/agent-client';
import type { ReplicatedSnapshot, ReplicatedSnapshotStatus } from '../../operator/src/api/types';
import { Blocked } from '../../operator/src/resolve/blocked';
import type { SnapshotSource } from '../../operator/src/resolve/snapshot-source';
import {
  needsVerification,
  pendingStatus,
  restated,
  snapshotEvents,
  snapshotId,
  takenStatus,
  verifiedStatus,
} from '../../operator/src/status/snapshot-status';

const NOW = new Date('2026-03-01T12:00:00.000Z');
const CUT = Date.parse('2026-03-01T11:59:59.250Z');
const UID = '0b7c6f0e-1d2a-4c3b-9e8f-a1b2c3d4e5f6';
const ID = `rs-${UID}`;
const MiB = 2 ** 20;

const a = { node: 'a', endpoint: 'a:7400', ready: true };
const b = { node: 'b', endpoint: 'b:7400', ready: true };

const source: SnapshotSource = {
  group: 'db',
  agentGroup: 'ns.db',
  relationship: 'db-sync',
  primary: a,
  sides: [a, b],
  volumes: [
    { name: 'data', pvc: 'db-data', agentName: 'ns.db.data', sizeBytes: 64 * MiB },
    { name: 'log', pvc: 'db-log', agentName: 'ns.db.log', sizeBytes: 32 * MiB },
  ],
  wholeGroup: true,
};

function snapshot(
  spec: Partial<ReplicatedSnapshot['spec']> = {},
  status?: ReplicatedSnapshotStatus,
  generation = 1,
): ReplicatedSnapshot {
  return {
    apiVersion: 'lockstep.dev/v1alpha1',
    kind: 'ReplicatedSnapshot',
    metadata: { name: 'nightly', namespace: 'ns', uid: UID, generation },
    spec: { source: { consistencyGroup: 'db' }, label: 'nightly', ...spec },
    ...(status ? { status } : {}),
  };
}

/** One member of a GroupSnapshot as the primary reports it. */
function member(volume: string, copies: Array<[string, string, string?]>): SnapshotInfo {
  return {
    volume,
    name: ID,
    label: 'nightly',
    createdAtMs: CUT,
    savedBytes: 0,
    exportUri: `nbd+unix:///${volume}@${ID}?socket=/x`,
    holdMs: 0,
    uid: `uid-${volume}`,
    copies: copies.map(([node, state, reason]) => ({
      address: `${node}:7400`,
      node,
      state,
      reason: reason ?? '',
    })),
  };
}

const bothTaken = (): SnapshotInfo[] => [
  member('ns.db.data', [
    ['a', 'Taken'],
    ['b', 'Taken'],
  ]),
  member('ns.db.log', [
    ['a', 'Taken'],
    ['b', 'Taken'],
  ]),
];

const conditions = (s: ReplicatedSnapshotStatus) =>
  s.conditions?.map((c) => [c.type, c.status, c.reason]);

describe('a replicated snapshot’s id', () => {
  it('comes from the uid and is a valid agent snapshot name', () => {
    expect(snapshotId(snapshot())).toBe(ID);
    expect(ID).toMatch(/^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$/);
  });
});

describe('the status before the snapshot is taken', () => {
  it('says what blocks it, message included, when that is a Blocked error', () => {
    const blocked = new Blocked(
      'VolumeNotInGroup',
      'PVC db-data is not a volume of any ConsistencyGroup',
    );
    const s = pendingStatus(snapshot(), undefined, blocked, NOW);
    expect(s.conditions?.find((c) => c.type === 'Ready')).toMatchObject({
      status: 'False',
      reason: 'VolumeNotInGroup',
      message: 'PVC db-data is not a volume of any ConsistencyGroup',
    });
  });

  it('records the intent: id, handles, sizes and every copy Pending', () => {
    const s = pendingStatus(snapshot(), source, { reason: 'Taking', message: 'on a' }, NOW);
    expect(s).toMatchObject({
      observedGeneration: 1,
      phase: 'Pending',
      readyToUse: false,
      snapshotID: ID,
      consistencyGroup: 'db',
      primaryNode: 'a',
      restoreSizeBytes: 96 * MiB,
    });
    expect(s.volumes).toEqual([
      {
        name: 'data',
        persistentVolumeClaimName: 'db-data',
        volumeHandle: 'ns.db.data',
        snapshotHandle: `ns.db.data@${ID}`,
        sizeBytes: 64 * MiB,
        copies: [
          { node: 'a', state: 'Pending' },
          { node: 'b', state: 'Pending' },
        ],
      },
      expect.objectContaining({ name: 'log', snapshotHandle: `ns.db.log@${ID}` }),
    ]);
    expect(conditions(s)).toEqual([
      ['Ready', 'False', 'Taking'],
      ['Replicated', 'Unknown', 'NotTaken'],
      ['Verified', 'Unknown', 'NotRequested'],
    ]);
  });

  it('keeps what it recorded while blocked', () => {
    const intent = pendingStatus(snapshot(), source, { reason: 'Taking', message: '' }, NOW);
    const s = pendingStatus(
      snapshot({}, intent),
      undefined,
      { reason: 'AgentNotReady', message: 'the agent of a is not ready' },
      NOW,
    );
    expect(s.volumes).toEqual(intent.volumes);
    expect(s.conditions?.[0]).toMatchObject({ status: 'False', reason: 'AgentNotReady' });
  });
});

describe('the status from a GroupSnapshot', () => {
  it('is Ready to use with both copies Taken, the cut time and the hold', () => {
    const s = takenStatus(snapshot(), source, { snapshots: bothTaken(), holdMs: 1.23456 }, NOW);
    expect(s).toMatchObject({
      phase: 'Ready',
      readyToUse: true,
      creationTime: '2026-03-01T11:59:59.250Z',
      holdMs: 1.235,
      copiesTaken: '2/2',
      snapshotID: ID,
      restoreSizeBytes: 96 * MiB,
    });
    expect(s.volumes?.map((v) => [v.name, v.copies])).toEqual([
      [
        'data',
        [
          { node: 'a', state: 'Taken' },
          { node: 'b', state: 'Taken' },
        ],
      ],
      [
        'log',
        [
          { node: 'a', state: 'Taken' },
          { node: 'b', state: 'Taken' },
        ],
      ],
    ]);
    expect(conditions(s)).toEqual([
      ['Ready', 'True', 'SnapshotTaken'],
      ['Replicated', 'True', 'AllCopiesTaken'],
      ['Verified', 'Unknown', 'NotRequested'],
    ]);
  });

  it('is Degraded but usable when a replica missed it, naming the copy and why', () => {
    const snaps = [
      member('ns.db.data', [
        ['a', 'Taken'],
        ['b', 'Missing', 'peer OutOfSync'],
      ]),
      member('ns.db.log', [
        ['a', 'Taken'],
        ['b', 'Missing', 'peer OutOfSync'],
      ]),
    ];
    const s = takenStatus(snapshot(), source, { snapshots: snaps, holdMs: 0 }, NOW);
    expect(s).toMatchObject({ phase: 'Degraded', readyToUse: true, copiesTaken: '1/2' });
    expect(s.volumes?.[0]?.copies[1]).toEqual({
      node: 'b',
      state: 'Missing',
      reason: 'peer OutOfSync',
    });
    const replicated = s.conditions?.find((c) => c.type === 'Replicated');
    expect(replicated).toMatchObject({ status: 'False', reason: 'CopiesMissing' });
    expect(replicated?.message).toContain('data on b: peer OutOfSync');
  });

  it('counts a side the primary did not report as Missing, and its own copy as taken', () => {
    const snaps = [member('ns.db.data', []), member('ns.db.log', [['a', 'Taken']])];
    const s = takenStatus(snapshot(), source, { snapshots: snaps, holdMs: 0 }, NOW);
    expect(s.volumes?.[0]?.copies).toEqual([
      { node: 'a', state: 'Taken' },
      { node: 'b', state: 'Missing', reason: 'not a replica of the primary' },
    ]);
    expect(s.readyToUse).toBe(true);
  });

  it('matches copies by address when the agent does not know the peer’s node', () => {
    const info = member('ns.db.data', [['a', 'Taken']]);
    info.copies.push({ address: 'b:7400', node: '', state: 'Taken', reason: '' });
    const one = { ...source, volumes: source.volumes.slice(0, 1), wholeGroup: false };
    const s = takenStatus(snapshot(), one, { snapshots: [info], holdMs: 0 }, NOW);
    expect(s.copiesTaken).toBe('2/2');
  });

  it('is not ready to use while the primary lacks a volume’s snapshot', () => {
    const s = takenStatus(
      snapshot(),
      source,
      { snapshots: bothTaken().slice(0, 1), holdMs: 0 },
      NOW,
    );
    expect(s.readyToUse).toBe(false);
    expect(s.conditions?.[0]).toMatchObject({ status: 'False', reason: 'PrimaryCopyMissing' });
  });

  it('announces the take once: SnapshotTaken, or CopiesMissing as a warning', () => {
    const before = pendingStatus(snapshot(), source, { reason: 'Taking', message: '' }, NOW);
    const ready = takenStatus(
      snapshot({}, before),
      source,
      { snapshots: bothTaken(), holdMs: 0 },
      NOW,
    );
    expect(snapshotEvents(before, ready)).toEqual([
      expect.objectContaining({ type: 'Normal', reason: 'SnapshotTaken' }),
    ]);
    expect(snapshotEvents(ready, ready)).toEqual([]);
    const degraded = takenStatus(
      snapshot({}, before),
      source,
      {
        snapshots: [member('ns.db.data', [['a', 'Taken']]), member('ns.db.log', [['a', 'Taken']])],
        holdMs: 0,
      },
      NOW,
    );
    expect(snapshotEvents(before, degraded)).toEqual([
      expect.objectContaining({ type: 'Warning', reason: 'CopiesMissing' }),
    ]);
  });

  it('warns once when the take fails, not on every retry, nor while waiting for replication', () => {
    const failed = pendingStatus(
      snapshot(),
      source,
      { reason: 'SnapshotFailed', message: 'hold timed out' },
      NOW,
    );
    const waiting = pendingStatus(
      snapshot(),
      undefined,
      { reason: 'WaitingForReplication', message: 'Baselining' },
      NOW,
    );
    expect(snapshotEvents(undefined, waiting)).toEqual([]);
    expect(snapshotEvents(waiting, failed)).toEqual([
      { type: 'Warning', reason: 'SnapshotFailed', message: 'hold timed out' },
    ]);
    expect(snapshotEvents(failed, failed)).toEqual([]);
  });
});

describe('verification', () => {
  const taken = takenStatus(
    snapshot({ verify: true }),
    source,
    { snapshots: bothTaken(), holdMs: 0 },
    NOW,
  );
  const verification = (
    volume: string,
    state: string,
    differingOffsets: number[] = [],
  ): Verification => ({
    volume,
    name: ID,
    identical: state === 'Identical',
    regionSize: 65536,
    copies: [
      { address: 'a:7400', node: 'a', state: 'Identical', reason: '', differingOffsets: [] },
      {
        address: 'b:7400',
        node: 'b',
        state,
        reason: state === 'Missing' ? 'unreachable' : '',
        differingOffsets,
      },
    ],
  });

  it('is needed once taken with verify on, and again only at a new generation', () => {
    expect(needsVerification(snapshot({ verify: true }, taken))).toBe(true);
    expect(needsVerification(snapshot({ verify: false }, taken))).toBe(false);
    const done = verifiedStatus(
      snapshot({ verify: true }, taken),
      taken,
      [verification('ns.db.data', 'Identical'), verification('ns.db.log', 'Identical')],
      source,
      NOW,
    );
    expect(needsVerification(snapshot({ verify: true }, done))).toBe(false);
    expect(needsVerification(snapshot({ verify: true }, done, 3))).toBe(true);
  });

  it('reports Identical per copy, with the primary as the reference, and Verified=True', () => {
    const s = verifiedStatus(
      snapshot({ verify: true }, taken),
      taken,
      [verification('ns.db.data', 'Identical'), verification('ns.db.log', 'Identical')],
      source,
      NOW,
    );
    expect(s.verification).toEqual({
      generation: 1,
      result: 'Identical',
      completionTime: NOW.toISOString(),
      regionSize: 65536,
      differingRegions: 0,
      message: 'every copy identical (2 volume(s) on 2 copies)',
    });
    expect(s.volumes?.[0]?.copies).toEqual([
      { node: 'a', state: 'Taken' },
      { node: 'b', state: 'Taken', verification: 'Identical' },
    ]);
    expect(s.conditions?.find((c) => c.type === 'Verified')).toMatchObject({
      status: 'True',
      reason: 'Identical',
    });
    expect(snapshotEvents(taken, s)).toEqual([
      expect.objectContaining({ type: 'Normal', reason: 'Verified' }),
    ]);
  });

  it('reports the regions that differ, and a copy it could not compare as Incomplete', () => {
    const differs = verifiedStatus(
      snapshot({ verify: true }, taken),
      taken,
      [
        verification('ns.db.data', 'Differs', [0, 65536, 131072]),
        verification('ns.db.log', 'Identical'),
      ],
      source,
      NOW,
    );
    expect(differs.verification).toMatchObject({
      result: 'Differs',
      differingRegions: 3,
      message: 'data on b: 3 region(s) differ',
    });
    expect(differs.volumes?.[0]?.copies[1]).toMatchObject({
      verification: 'Differs',
      differingRegions: 3,
    });
    expect(snapshotEvents(taken, differs)).toEqual([
      expect.objectContaining({ type: 'Warning', reason: 'VerificationDiffers' }),
    ]);
    const incomplete = verifiedStatus(
      snapshot({ verify: true }, taken),
      taken,
      [verification('ns.db.data', 'Identical'), verification('ns.db.log', 'Missing')],
      source,
      NOW,
    );
    expect(incomplete.verification).toMatchObject({
      result: 'Incomplete',
      message: 'log on b: unreachable',
    });
    expect(incomplete.conditions?.find((c) => c.type === 'Verified')).toMatchObject({
      status: 'False',
      reason: 'Incomplete',
    });
  });

  it('says why it waits, and moves only observedGeneration when verify is turned off', () => {
    const waiting = restated(
      snapshot({ verify: true }, taken),
      taken,
      { reason: 'PrimaryUnreachable', message: 'cannot reach a:7400' },
      NOW,
    );
    expect(waiting.conditions?.find((c) => c.type === 'Verified')).toMatchObject({
      status: 'Unknown',
      reason: 'PrimaryUnreachable',
    });
    const off = restated(snapshot({ verify: false }, taken, 2), taken, undefined, NOW);
    expect(off.observedGeneration).toBe(2);
    expect(off.conditions?.find((c) => c.type === 'Verified')).toMatchObject({
      reason: 'NotRequested',
    });
    expect(off.conditions?.find((c) => c.type === 'Ready')?.lastTransitionTime).toBe(
      taken.conditions?.find((c) => c.type === 'Ready')?.lastTransitionTime,
    );
  });
});
