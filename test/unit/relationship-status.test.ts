// The parts of a relationship's status that are not the agents' view: what it says while
// blocked, and which Event a change of phase deserves.
import type {
  Condition,
  SyncRelationship,
  SyncRelationshipStatus,
} from '../../operator/src/api/types';
import { Blocked } from '../../operator/src/resolve/blocked';
import { blockedStatus, phaseEvent } from '../../operator/src/status/relationship-status';
import { syncRelationship } from './relationship-fixture';

const EARLIER = '2026-01-01T00:00:00.000Z';

const ready: Condition = {
  type: 'Ready',
  status: 'True',
  observedGeneration: 1,
  lastTransitionTime: EARLIER,
  reason: 'Replicating',
  message: 'replicating 1 volume(s) from a to b',
};
const healthy: Condition = {
  type: 'Degraded',
  status: 'False',
  observedGeneration: 1,
  lastTransitionTime: EARLIER,
  reason: 'AllPeersHealthy',
  message: 'no replica is behind',
};
const inSync: SyncRelationshipStatus = {
  observedGeneration: 1,
  phase: 'InSync',
  progression: 'InSync',
  primaryNode: 'a',
  dirtyBytes: 0,
  lastInSyncTime: EARLIER,
  conditions: [ready, healthy],
};

const rel = (status?: SyncRelationshipStatus): SyncRelationship =>
  syncRelationship({ generation: 2 }, status);

describe('the status of a blocked relationship', () => {
  const blocked = new Blocked('AgentNotReady', 'the Lockstep agent of node b is not ready');

  it('is Pending with Ready=False for the reason, and the replication conditions Unknown', () => {
    const s = blockedStatus(rel(), blocked);
    expect(s).toMatchObject({
      observedGeneration: 2,
      phase: 'Pending',
      progression: 'WaitingForPrerequisites',
    });
    expect(s.conditions?.map((c) => [c.type, c.status, c.reason])).toEqual([
      ['Ready', 'False', 'AgentNotReady'],
      ['InSync', 'Unknown', 'NotReplicating'],
      ['Degraded', 'Unknown', 'NotReplicating'],
      ['Resyncing', 'Unknown', 'NotReplicating'],
      ['SplitBrain', 'Unknown', 'NotReplicating'],
    ]);
    expect(s.conditions?.[0]?.message).toBe(blocked.message);
  });

  it('keeps what was reported before, and moves only the conditions that flipped', () => {
    const s = blockedStatus(rel(inSync), blocked);
    expect(s).toMatchObject({ primaryNode: 'a', lastInSyncTime: EARLIER, dirtyBytes: 0 });
    expect(s.conditions?.find((c) => c.type === 'Ready')?.lastTransitionTime).not.toBe(EARLIER);
    // Blocked twice in a row: nothing flips, so the second status is the same JSON.
    const again = blockedStatus(rel(s), blocked);
    expect(again).toEqual(s);
  });
});

describe('the Event for a change of phase', () => {
  it('announces nothing when the phase stays', () => {
    expect(phaseEvent(inSync, { ...inSync, dirtyBytes: 4096 })).toBeUndefined();
  });

  it('warns about a degraded relationship with what degrades it', () => {
    const degraded: SyncRelationshipStatus = {
      ...inSync,
      phase: 'Degraded',
      conditions: [
        ready,
        { ...healthy, status: 'True', reason: 'PeerOutOfSync', message: 'b Disconnected' },
      ],
    };
    expect(phaseEvent(inSync, degraded)).toEqual({
      type: 'Warning',
      reason: 'Degraded',
      message: 'InSync → Degraded: b Disconnected',
    });
  });

  it('reports a first phase as coming from new, with the Ready message when nothing is wrong', () => {
    expect(phaseEvent(undefined, inSync)).toEqual({
      type: 'Normal',
      reason: 'InSync',
      message: 'new → InSync: replicating 1 volume(s) from a to b',
    });
    expect(phaseEvent({}, { ...inSync, phase: 'Pending' })?.type).toBe('Warning');
  });
});
