// A SyncRelationship's status, summarized from what the agents report: the phase and
// progression, the Ready/InSync/Degraded/Resyncing/SplitBrain conditions, dirty bytes and
// baseline progress; and the Event a change of phase deserves. Pure: the reconciler writes.
import type { VolumeInfo } from '../../../lib/agent-client';
import {
  FAILOVER_ANNOTATION,
  type CopyStatus,
  type FailoverStatus,
  type LastFailover,
  type MoveStatus,
  type RelationshipPhase,
  type SyncRelationship,
  type SyncRelationshipStatus,
} from '../api/types';
import type { Blocked } from '../resolve/blocked';
import type { Plan } from '../resolve/relationship-plan';
import { mergeConditions, type DesiredCondition } from './conditions';
import type { EventType } from './event-recorder';

/** The primary's view of each volume, or why the primary could not be asked. */
export interface Observed {
  volumes: VolumeInfo[];
  unreachable?: string;
  /** The node that answered as primary, when it is not the plan's (a move under way). */
  primaryNode?: string;
  move?: MoveStatus;
}

const SPLIT: ReadonlySet<string> = new Set(['SplitBrain', 'PeerIsPrimary', 'PeerIsNewer']);
const DOWN: ReadonlySet<string> = new Set(['OutOfSync', 'Disconnected', 'Connecting']);

/** Phases that need someone's attention are announced as warnings. */
const PHASE_EVENT_TYPE: Record<RelationshipPhase, EventType> = {
  Pending: 'Warning',
  Baselining: 'Normal',
  InSync: 'Normal',
  Resyncing: 'Normal',
  Degraded: 'Warning',
  SplitBrain: 'Warning',
  Failed: 'Warning',
};

/** The relationship's status from the primary's view of each volume. */
/** A peer's resync kind while it is being established, and the step it names in status. */
const ESTABLISHMENT_STEPS = new Map([
  ['baseline', 'Baseline'],
  ['incremental', 'Incremental'],
  ['cutover', 'CuttingOver'],
]);

/** The earliest step any replica volume is at: the relationship is no further along than it. */
function establishmentStep(peers: { resync?: { kind: string } | null }[]): string {
  const steps = [...ESTABLISHMENT_STEPS.values()];
  const at = peers.map((p) => steps.indexOf(ESTABLISHMENT_STEPS.get(p.resync?.kind ?? '') ?? ''));
  const earliest = Math.min(...at.map((i) => (i === -1 ? 0 : i)));
  return steps[earliest];
}

export function summarize(
  rel: SyncRelationship,
  plan: Plan,
  observed: Observed,
): SyncRelationshipStatus {
  const gen = rel.metadata.generation ?? 0;
  const now = new Date();
  const primaryNode = observed.primaryNode ?? plan.primary.node;
  const nodeOf = new Map([plan.source, ...plan.targets].map((t) => [t.endpoint, t.node]));
  const peers = observed.volumes.flatMap((v) =>
    (v.replication?.peers ?? []).map((p) => ({ volume: v.name, ...p })),
  );
  const describePeer = (p: (typeof peers)[number]) =>
    `${nodeOf.get(p.address) ?? p.address} ${p.state}${p.reason ? ` (${p.reason})` : ''}`;
  const split = peers.filter((p) => SPLIT.has(p.state)).map(describePeer);
  // A peer connecting for the first time is not down: it has simply not been in sync yet.
  const down = peers
    .filter((p) => DOWN.has(p.state) && !(p.state === 'Connecting' && !Number(p.lastInSyncMs)))
    .map(describePeer);
  // A new replica is established in steps (a baseline snapshot, diffs, the live cutover):
  // still setting up until it is in sync.
  const establishing = (p: (typeof peers)[number]) =>
    p.state === 'Baselining' || ESTABLISHMENT_STEPS.has(p.resync?.kind ?? '');
  const baselining = peers.filter(establishing);
  // An in-sync peer with dirty bytes is catching up on a backlog (async mode's lag).
  const resyncing = peers.filter(
    (p) => p.state === 'Resyncing' || (p.state === 'InSync' && Number(p.dirtyBytes) > 0),
  );
  // Every side but the primary is a peer of each volume.
  const expected = plan.volumes.length * plan.targets.length;
  const allInSync =
    peers.length === expected &&
    peers.every((p) => p.state === 'InSync' && Number(p.dirtyBytes) === 0);

  let phase: RelationshipPhase;
  let progression: string;
  if (observed.unreachable) [phase, progression] = ['Degraded', 'WaitingForPrimary'];
  else if (split.length) [phase, progression] = ['SplitBrain', 'WaitingForResolution'];
  else if (allInSync) [phase, progression] = ['InSync', 'InSync'];
  else if (baselining.length) [phase, progression] = ['Baselining', establishmentStep(baselining)];
  else if (resyncing.length) [phase, progression] = ['Resyncing', 'Resyncing'];
  else if (down.length) [phase, progression] = ['Degraded', 'WaitingForPeers'];
  else [phase, progression] = ['Baselining', 'CreatingReplicas'];

  // Replicas not in sync, and the consistent state each would be promoted to meanwhile.
  const consistent = peers
    .filter((p) => p.consistentSnapshot)
    .map((p) => ({
      node: nodeOf.get(p.address) ?? p.address,
      volume: plan.volumes.find((v) => v.agentName === p.volume)?.name ?? p.volume,
      snapshot: p.consistentSnapshot,
      time: new Date(Number(p.consistentSnapshotAtMs)).toISOString(),
    }));
  const cond = (type: string, on: boolean, reason: string, message: string): DesiredCondition => ({
    type,
    status: on ? 'True' : 'False',
    reason,
    message,
  });
  const desired: DesiredCondition[] = [
    observed.unreachable
      ? cond('Ready', false, 'PrimaryUnreachable', observed.unreachable)
      : cond(
          'Ready',
          true,
          'Replicating',
          `replicating ${plan.volumes.length} volume(s) from ${primaryNode} to ${[
            plan.source,
            ...plan.targets,
          ]
            .filter((t) => t.node !== primaryNode)
            .map((t) => t.node)
            .join(', ')}`,
        ),
    cond(
      'InSync',
      phase === 'InSync',
      phase === 'InSync' ? 'AllPeersInSync' : phase,
      phase === 'InSync' ? 'every replica holds every acknowledged write' : `phase ${phase}`,
    ),
    cond(
      'Degraded',
      phase === 'Degraded' || phase === 'SplitBrain',
      observed.unreachable
        ? 'PrimaryUnreachable'
        : split.length
          ? 'SplitBrain'
          : down.length
            ? 'PeerOutOfSync'
            : 'AllPeersHealthy',
      observed.unreachable ?? ([...split, ...down].join('; ') || 'no replica is behind'),
    ),
    cond(
      'Resyncing',
      phase === 'Baselining' || phase === 'Resyncing',
      baselining.length ? 'Baseline' : resyncing.length ? 'Resync' : 'Idle',
      baselining.length || resyncing.length
        ? `${baselining.length + resyncing.length} replica volume(s) catching up` +
            consistent
              .map(
                (c) => `; ${c.node} ${c.volume} is protected by snapshot ${c.snapshot} (${c.time})`,
              )
              .join('')
        : 'nothing to copy',
    ),
    cond(
      'SplitBrain',
      split.length > 0,
      split.length ? 'Diverged' : 'NoSplitBrain',
      split.join('; ') || 'no divergence',
    ),
  ];

  const base = baselining.filter((p) => p.resync);
  const status: SyncRelationshipStatus = {
    observedGeneration: gen,
    phase,
    progression,
    primaryNode,
    dirtyBytes: peers.reduce((n, p) => n + Number(p.dirtyBytes), 0),
    conditions: mergeConditions(rel.status?.conditions, desired, gen, now),
  };
  if (peers.length) status.copies = copies(peers, nodeOf);
  if (consistent.length) status.lastConsistentSnapshots = consistent;
  const failover = failoverStatus(rel, plan, observed, primaryNode, now);
  if (failover) status.failover = failover;
  if (observed.move) status.move = observed.move;
  if (base.length) {
    const eta = base.map((p) => Number(p.resync?.etaSeconds ?? -1));
    status.baseline = {
      doneBytes: base.reduce((n, p) => n + Number(p.resync?.doneBytes ?? 0), 0),
      totalBytes: base.reduce((n, p) => n + Number(p.resync?.totalBytes ?? 0), 0),
      etaSeconds: eta.includes(-1) ? -1 : Math.max(...eta),
    };
  }
  const lastInSync = allInSync ? Math.max(...peers.map((p) => Number(p.lastInSyncMs))) : 0;
  status.lastInSyncTime =
    lastInSync > 0 ? new Date(lastInSync).toISOString() : rel.status?.lastInSyncTime;
  if (!status.lastInSyncTime) delete status.lastInSyncTime;
  return status;
}

/** From the healthiest state to the furthest behind: a copy is as far behind as its worst volume. */
const BEHIND = ['InSync', 'Resyncing', 'Baselining', 'Connecting', 'OutOfSync', 'Disconnected'];
const behind = (state: string) => (SPLIT.has(state) ? BEHIND.length : BEHIND.indexOf(state));

/** One entry per replica node: its worst volume's state, and what it misses and catches up. */
function copies(
  peers: Array<{
    address: string;
    state: string;
    dirtyBytes: unknown;
    resync?: { doneBytes: unknown; totalBytes: unknown; etaSeconds: unknown } | null;
  }>,
  nodeOf: Map<string, string>,
): CopyStatus[] {
  const byNode = new Map<string, CopyStatus>();
  for (const p of peers) {
    const node = nodeOf.get(p.address) ?? p.address;
    const c = byNode.get(node) ?? { node, state: 'InSync', dirtyBytes: 0 };
    if (behind(p.state) > behind(c.state)) c.state = SPLIT.has(p.state) ? 'SplitBrain' : p.state;
    c.dirtyBytes += Number(p.dirtyBytes);
    if (p.resync) {
      c.doneBytes = (c.doneBytes ?? 0) + Number(p.resync.doneBytes);
      c.totalBytes = (c.totalBytes ?? 0) + Number(p.resync.totalBytes);
      const eta = Number(p.resync.etaSeconds);
      c.etaSeconds = c.etaSeconds === -1 || eta === -1 ? -1 : Math.max(c.etaSeconds ?? 0, eta);
    }
    byNode.set(node, c);
  }
  return [...byNode.values()].sort((a, b) => a.node.localeCompare(b.node));
}

/**
 * The epoch the primary writes in, where the workload connects, and the last failover the
 * monitor started: its duration is set once the new primary accepts writes on every volume.
 */
function failoverStatus(
  rel: SyncRelationship,
  plan: Plan,
  observed: Observed,
  primaryNode: string,
  now: Date,
): FailoverStatus | undefined {
  if (observed.unreachable || observed.volumes.length === 0) return rel.status?.failover;
  const protections = observed.volumes.map((v) => v.replication?.protection);
  const status: FailoverStatus = {
    mediator: rel.spec.failover?.mediator ?? '',
    epoch: Math.max(...protections.map((p) => Number(p?.epoch ?? 0))),
    exports: observed.volumes.map((v) => ({
      volume: plan.volumes.find((p) => p.agentName === v.name)?.name ?? v.name,
      uri: v.exportUri,
    })),
  };
  const forcedAt = Math.max(...protections.map((p) => Number(p?.forcedPromotionAtMs ?? 0)));
  if (forcedAt > 0) {
    // As first seen: the epoch it took, not the later ones of the same primary.
    const time = new Date(forcedAt).toISOString();
    const seen = rel.status?.failover?.lastForcedPromotion;
    status.lastForcedPromotion =
      seen?.time === time ? seen : { node: primaryNode, epoch: status.epoch, time };
  }
  const last = lastFailover(rel);
  if (last && last.toNode === primaryNode) {
    const before = rel.status?.failover?.lastFailover;
    const done =
      before?.startTime === last.startTime && before.durationSeconds !== undefined
        ? before
        : protections.every((p) => p?.acceptsWrites)
          ? {
              ...last,
              epoch: status.epoch,
              durationSeconds: (now.getTime() - Date.parse(last.startTime)) / 1000,
            }
          : { ...last, epoch: status.epoch };
    status.lastFailover = done;
  } else if (rel.status?.failover?.lastFailover) {
    status.lastFailover = rel.status.failover.lastFailover;
  }
  return status;
}

/** The failover the monitor recorded with spec.primary, if it left one that parses. */
function lastFailover(rel: SyncRelationship): LastFailover | undefined {
  const text = rel.metadata.annotations?.[FAILOVER_ANNOTATION];
  if (!text) return undefined;
  try {
    const f = JSON.parse(text) as LastFailover;
    return typeof f.toNode === 'string' && typeof f.startTime === 'string' ? f : undefined;
  } catch {
    return undefined;
  }
}

/** The Event a forced promotion deserves when status first shows it. */
export function forcedPromotionEvent(
  previous: SyncRelationshipStatus | undefined,
  next: SyncRelationshipStatus,
): string | undefined {
  const f = next.failover?.lastForcedPromotion;
  if (!f || previous?.failover?.lastForcedPromotion?.time === f.time) return undefined;
  return (
    `${f.node} was promoted with --force at ${f.time} (epoch ${f.epoch}): writes acknowledged ` +
    'by the copy it replaced may be missing, and a copy that wrote meanwhile shows as a split brain'
  );
}

/** The Event a failover deserves once it completed (its duration was first recorded). */
export function failoverEvent(
  previous: SyncRelationshipStatus | undefined,
  next: SyncRelationshipStatus,
): string | undefined {
  const f = next.failover?.lastFailover;
  const before = previous?.failover?.lastFailover;
  if (!f || f.durationSeconds === undefined) return undefined;
  if (before?.startTime === f.startTime && before.durationSeconds !== undefined) return undefined;
  return (
    `${f.toNode} is primary in epoch ${f.epoch} (was ${f.fromNode}), accepting writes ` +
    `${f.durationSeconds.toFixed(1)} s after the failover began: ${f.reason}. ` +
    `Restart the workload against ${next.failover?.exports.map((e) => e.uri).join(', ')}`
  );
}

/**
 * The status of a relationship held back by `b`: Pending, Ready=False with its reason, and the
 * replication conditions Unknown; what was reported before (primary, last in-sync time) stays.
 */
export function blockedStatus(rel: SyncRelationship, b: Blocked): SyncRelationshipStatus {
  const gen = rel.metadata.generation ?? 0;
  const now = new Date();
  return {
    ...rel.status,
    observedGeneration: gen,
    phase: 'Pending',
    progression: 'WaitingForPrerequisites',
    conditions: mergeConditions(
      rel.status?.conditions,
      [
        { type: 'Ready', status: 'False', reason: b.reason, message: b.message },
        ...unknownConditions(),
      ],
      gen,
      now,
    ),
  };
}

/** The Event for a change of phase (the reason is the new phase), or none if it did not move. */
export function phaseEvent(
  previous: SyncRelationshipStatus | undefined,
  next: SyncRelationshipStatus,
): { type: EventType; reason: RelationshipPhase; message: string } | undefined {
  if (previous?.phase === next.phase) return undefined;
  const phase = next.phase ?? 'Pending';
  const ready = next.conditions?.find((c) => c.type === 'Ready');
  return {
    type: PHASE_EVENT_TYPE[phase],
    reason: phase,
    message: `${previous?.phase ?? 'new'} → ${next.phase}: ${describe(next) || ready?.message || ''}`,
  };
}

/** What is wrong, if anything: a split brain first, then whatever degrades it. */
function describe(status: SyncRelationshipStatus): string {
  const d = status.conditions?.find((c) => c.type === 'Degraded' && c.status === 'True');
  const s = status.conditions?.find((c) => c.type === 'SplitBrain' && c.status === 'True');
  return (s ?? d)?.message ?? '';
}

function unknownConditions(): DesiredCondition[] {
  return ['InSync', 'Degraded', 'Resyncing', 'SplitBrain'].map((type) => ({
    type,
    status: 'Unknown',
    reason: 'NotReplicating',
    message: 'replication is not set up',
  }));
}
