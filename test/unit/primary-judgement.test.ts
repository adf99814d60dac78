// The failover monitor's verdict from what the agents and the mediator answer: healthy while
// the primary answers as one; a failover only to a replica the record counts as in sync, after
// the grace period, under policy Automatic; adoption of a copy granted elsewhere.
import type { VolumeInfo } from '../../lib/agent-client';
import type { MediatorRecord } from '../../lib/mediator-client';
import {
  judge,
  type JudgementInput,
  type SideView,
} from '../../operator/src/failover/primary-judgement';

function volume(role: string, opts: { state?: string; absentMs?: number; group?: string } = {}) {
  return {
    name: 'ns.db.data',
    role,
    replication: {
      protection: {
        group: opts.group ?? 'g1',
        state: opts.state ?? (role === 'primary' ? 'holding' : 'manual'),
        primaryAbsentMs: opts.absentMs ?? 0,
      },
    },
  } as unknown as VolumeInfo;
}

function record(primary: string, inSync: string[], epoch = 4): MediatorRecord {
  return { group: 'g1', epoch, primary, inSync, grantedAtMs: 0 };
}

const side = (node: string, volumes: (VolumeInfo | undefined)[]): SideView => ({
  node,
  endpoint: `${node}:7400`,
  volumes,
});

function input(over: Partial<JudgementInput>): JudgementInput {
  return {
    policy: 'Automatic',
    graceMs: 5_000,
    primary: side('a', [undefined]),
    others: [side('b', [volume('secondary', { absentMs: 6_000 })])],
    records: new Map([['g1', record('a:7400', ['a:7400', 'b:7400'])]]),
    ...over,
  };
}

describe('judging a relationship’s primary', () => {
  it('is healthy while the primary answers as primary, even while it seeks an epoch', () => {
    expect(judge(input({ primary: side('a', [volume('primary', { state: 'seeking' })]) }))).toEqual(
      {
        kind: 'healthy',
      },
    );
  });

  it('fails over to the in-sync replica once it has had no primary for the grace period', () => {
    const v = judge(input({}));
    expect(v).toMatchObject({ kind: 'fail-over', to: { node: 'b' }, lostMs: 6_000 });
  });

  it('counts a fenced primary as lost', () => {
    const v = judge(input({ primary: side('a', [volume('primary', { state: 'fenced' })]) }));
    expect(v.kind).toBe('fail-over');
  });

  it('waits out the grace period: the primary gets its head start', () => {
    const v = judge(input({ others: [side('b', [volume('secondary', { absentMs: 2_000 })])] }));
    expect(v).toMatchObject({ kind: 'waiting', lostMs: 2_000 });
  });

  it('waits while the replicas still hear from a primary the operator cannot reach', () => {
    const v = judge(input({ others: [side('b', [volume('secondary', { absentMs: 0 })])] }));
    expect(v).toMatchObject({ kind: 'waiting', lostMs: 0 });
  });

  it('never picks a replica the record does not count as in sync', () => {
    const v = judge(input({ records: new Map([['g1', record('a:7400', ['a:7400'])]]) }));
    expect(v.kind).toBe('waiting');
  });

  it('never picks a replica when the mediator does not answer', () => {
    const v = judge(input({ records: new Map([['g1', undefined]]) }));
    expect(v.kind).toBe('waiting');
  });

  it('needs every volume of the group on the replica to qualify', () => {
    const v = judge(
      input({
        others: [side('b', [volume('secondary', { absentMs: 6_000 }), undefined])],
      }),
    );
    expect(v.kind).toBe('waiting');
  });

  it('only reports under policy Manual, naming the replica to choose', () => {
    const v = judge(input({ policy: 'Manual' }));
    expect(v).toMatchObject({ kind: 'waiting' });
    expect(v.kind === 'waiting' && v.why).toContain('spec.primary to b');
  });

  it('adopts a copy the mediator granted elsewhere and that answers as primary', () => {
    const v = judge(
      input({
        others: [side('b', [volume('primary')])],
        records: new Map([['g1', record('b:7400', ['b:7400'], 5)]]),
      }),
    );
    expect(v).toMatchObject({ kind: 'adopt', to: { node: 'b' }, epoch: 5 });
  });

  it('does not adopt a copy that says it is primary without the mediator’s grant', () => {
    const v = judge(input({ others: [side('b', [volume('primary')])] }));
    expect(v.kind).toBe('waiting');
  });
});
