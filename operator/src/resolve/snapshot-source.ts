// What a ReplicatedSnapshot needs, resolved from the informers' caches: the ConsistencyGroup
// its source names (directly, or as the group that has the PVC as a volume), the
// SyncRelationship that replicates that group, and from the relationship's plan the primary,
// every side holding a copy, and the volumes to snapshot. Pure: throws Blocked on the first
// thing missing.
import type { ConsistencyGroup, ReplicatedSnapshot, SyncRelationship } from '../api/types';
import { Blocked } from './blocked';
import { groupVolumes } from './group-volumes';
import { groupOwner, planRelationship, type PlanSources, type Side } from './relationship-plan';

export interface SnapshotVolume {
  name: string;
  pvc: string;
  agentName: string;
  sizeBytes: number;
}

export interface SnapshotSource {
  group: string;
  /** The group on the primary agent: `<namespace>.<group>`. */
  agentGroup: string;
  relationship: string;
  primary: Side;
  /** Every side holding a copy, the primary first. */
  sides: Side[];
  volumes: SnapshotVolume[];
  /** Every volume of the group (one cut through SnapshotGroup), or the one volume of a PVC. */
  wholeGroup: boolean;
}

export interface SnapshotSources extends PlanSources {
  groups: PlanSources['groups'] & { list(namespace: string): ConsistencyGroup[] };
}

/** The name of a ConsistencyGroup on the agents: unique per namespace. */
export function agentGroupName(namespace: string, group: string): string {
  return `${namespace}.${group}`;
}

/**
 * Relationship phases in which the copies exist and the replicas have been complete at least
 * once: a snapshot taken earlier could only ever be on the primary.
 */
const REPLICATING: ReadonlySet<string> = new Set(['InSync', 'Resyncing', 'Degraded', 'SplitBrain']);

/** Resolves where and what to snapshot; throws Blocked on the first thing missing. */
export function resolveSnapshotSource(
  snap: ReplicatedSnapshot,
  from: SnapshotSources,
  now: Date,
): SnapshotSource {
  const ns = snap.metadata.namespace ?? '';
  const { consistencyGroup, persistentVolumeClaimName: pvc } = snap.spec.source;
  const group = consistencyGroup ?? groupOfPvc(ns, pvc ?? '', from);
  if (!from.groups.get(group, ns)) {
    throw new Blocked('ConsistencyGroupNotFound', `ConsistencyGroup ${group} does not exist`);
  }
  const rel = replicating(ns, group, from);
  if (!rel) {
    throw new Blocked(
      'NotReplicated',
      `no SyncRelationship replicates ConsistencyGroup ${group}: a replicated snapshot needs one`,
    );
  }
  const plan = planRelationship(rel, from, now);
  if (!REPLICATING.has(rel.status?.phase ?? '')) {
    throw new Blocked(
      'WaitingForReplication',
      `SyncRelationship ${rel.metadata.name} is ${rel.status?.phase ?? 'new'}: the replicas are not complete yet`,
    );
  }
  if (rel.status?.primaryNode !== plan.primary.node) {
    throw new Blocked(
      'SwitchingPrimary',
      `SyncRelationship ${rel.metadata.name} is switching its primary to ${plan.primary.node}`,
    );
  }
  const volumes = plan.volumes
    .filter((v) => pvc === undefined || v.pvc === pvc)
    .map(({ name, pvc: claim, agentName, sizeBytes }) => ({
      name,
      pvc: claim,
      agentName,
      sizeBytes,
    }));
  return {
    group,
    agentGroup: agentGroupName(ns, group),
    relationship: rel.metadata.name,
    primary: plan.primary,
    sides: [plan.primary, ...[plan.source, ...plan.targets].filter((s) => s !== plan.primary)],
    volumes,
    wholeGroup: pvc === undefined,
  };
}

/** The one group that has the PVC as a volume and is replicated. */
function groupOfPvc(namespace: string, pvc: string, from: SnapshotSources): string {
  const having = from.groups
    .list(namespace)
    .filter((g) => groupVolumes(g, from.lookup).some((v) => v.pvc === pvc))
    .map((g) => g.metadata.name);
  const replicated = having.filter((g) => replicating(namespace, g, from));
  if (replicated.length === 1) return replicated[0] ?? '';
  if (replicated.length > 1) {
    throw new Blocked(
      'AmbiguousVolume',
      `PVC ${pvc} is a volume of several replicated ConsistencyGroups (${replicated.sort().join(', ')}): snapshot the group instead`,
    );
  }
  throw new Blocked(
    having.length ? 'NotReplicated' : 'VolumeNotInGroup',
    having.length
      ? `PVC ${pvc} is in ConsistencyGroup ${having.sort().join(', ')}, which no SyncRelationship replicates`
      : `PVC ${pvc} is not a volume of any ConsistencyGroup`,
  );
}

function replicating(
  namespace: string,
  group: string,
  from: SnapshotSources,
): SyncRelationship | undefined {
  const owner = groupOwner(from, namespace, group);
  return owner === undefined
    ? undefined
    : from.relationships.list(namespace).find((r) => r.metadata.name === owner);
}
