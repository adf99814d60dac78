// Whether a relationship's primary is lost and what the operator may do about it, judged from
// state alone: what each side's agent answers for each volume now, and the mediator's record
// of each volume. Nothing is remembered between passes, so a monitor that took over a shard a
// moment ago reaches the same verdict as the one that died (level-triggered). Pure.
//
// The operator never decides who may write: a failover it starts is the mediator's
// compare-and-swap, asked of a replica the record counts as in sync, only after that replica
// has had no primary for the grace period (the primary's head start: a primary that merely lost
// its link asks first and gets a record without the replica).
import type { VolumeInfo } from '../../../lib/agent-client';
import type { MediatorRecord } from '../../../lib/mediator-client';

export interface SideView {
  node: string;
  endpoint: string;
  /** The agent's answer for each volume, undefined where it did not answer. */
  volumes: (VolumeInfo | undefined)[];
}

export interface JudgementInput {
  policy: 'Manual' | 'Automatic';
  graceMs: number;
  /** The side spec.primary names. */
  primary: SideView;
  others: SideView[];
  /** The mediator's record of each volume's group; undefined where it did not answer. */
  records: Map<string, MediatorRecord | undefined>;
}

export type Verdict =
  | { kind: 'healthy' }
  /** The primary is lost and nobody may take over yet; `why` says what is missing. */
  | { kind: 'waiting'; lostMs: number; why: string }
  /** Another copy already holds every volume's epoch as primary (a failover done elsewhere). */
  | { kind: 'adopt'; to: SideView; epoch: number }
  | { kind: 'fail-over'; to: SideView; lostMs: number; reason: string };

const groupOf = (v: VolumeInfo): string => v.replication?.protection?.group ?? '';

function answersAsPrimary(side: SideView): boolean {
  return side.volumes.every(
    (v) => v?.role === 'primary' && v.replication?.protection?.state !== 'fenced',
  );
}

export function judge(input: JudgementInput): Verdict {
  const { primary, others, records } = input;
  if (answersAsPrimary(primary)) return { kind: 'healthy' };

  const recordOf = (v: VolumeInfo | undefined) => (v ? records.get(groupOf(v)) : undefined);
  // Granted elsewhere (a `ctl failover`, or a pass of ours whose spec write was lost).
  for (const side of others) {
    if (!answersAsPrimary(side)) continue;
    const recs = side.volumes.map(recordOf);
    if (recs.every((r) => r?.primary === side.endpoint))
      return { kind: 'adopt', to: side, epoch: Math.max(...recs.map((r) => Number(r?.epoch))) };
  }

  const absent = others.flatMap((s) =>
    s.volumes.map((v) => Number(v?.replication?.protection?.primaryAbsentMs ?? 0)),
  );
  const lostMs = absent.length ? Math.max(...absent) : 0;
  if (lostMs === 0)
    return { kind: 'waiting', lostMs, why: 'the replicas still hear from a primary' };
  let why = `no replica the mediator counts as in sync with ${primary.node} answers`;
  for (const side of others) {
    const vols = side.volumes;
    if (!vols.every((v) => v?.role === 'secondary')) continue;
    const recs = vols.map(recordOf);
    if (!recs.every((r) => r && r.primary === primary.endpoint && r.inSync.includes(side.endpoint)))
      continue;
    const sideLost = Math.min(
      ...vols.map((v) => Number(v?.replication?.protection?.primaryAbsentMs ?? 0)),
    );
    if (sideLost < input.graceMs) {
      why = `${side.node} has had no primary for ${secs(sideLost)} s of the ${secs(input.graceMs)} s grace period`;
      continue;
    }
    if (input.policy !== 'Automatic') {
      why = `failover is Manual: set spec.primary to ${side.node} (in sync at epoch ${Number(recs[0]?.epoch)}) to fail over`;
      continue;
    }
    return {
      kind: 'fail-over',
      to: side,
      lostMs: sideLost,
      reason: `${primary.node} lost for ${secs(sideLost)} s; ${side.node} was in sync at epoch ${Number(recs[0]?.epoch)}`,
    };
  }
  return { kind: 'waiting', lostMs, why };
}

const secs = (ms: number): string => (ms / 1000).toFixed(1);
