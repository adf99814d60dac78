// What a SyncRelationship needs, resolved from the informers' caches: the agent of each side,
// and for every volume of its ConsistencyGroup the file it serves on the source and the replica
// files on target PVCs (PVC → PV → node and path). Pure: it reads, never writes, and throws
// Blocked on the first prerequisite that is missing.
import type { V1Lease } from '@kubernetes/client-node';
import type { ConsistencyGroup, LockstepNode, SyncRelationship } from '../api/types';
import { agentReady } from '../agents/heartbeat';
import { Blocked } from './blocked';
import { groupVolumes, locate, type Lookup } from './group-volumes';

export interface Side {
  node: string;
  endpoint: string;
  /**
   * Its agent's heartbeat is fresh. Only the primary must be ready: a lost replica is tracked
   * by the primary, and a lost source that is no longer primary (after a failover) waits.
   */
  ready: boolean;
  /**
   * An agent in another cluster (a target's `endpoint`), reached with the certificate in this
   * Secret of the relationship's namespace. Its name is its endpoint; its readiness is unknown
   * here, so it counts as ready and the primary's link says how it is.
   */
  remote?: { secret: string };
}

export interface VolumePlan {
  /** The volume within the group, and the PVC that holds it on the source. */
  name: string;
  pvc: string;
  agentName: string;
  dataPath: string;
  sizeBytes: number;
  /** Replica files on target PVCs; a target without a PVC keeps its copy in its data dir. */
  targetPaths: Map<string, string>;
}

export interface Plan {
  source: Side;
  targets: Side[];
  /** The side that serves writes (spec.primary); the others are its secondaries. */
  primary: Side;
  /**
   * The node still primary while the source moves to another node (spec.source.node changed):
   * it stays primary until the new node's copies are established and it hands over.
   */
  moveFrom?: Side;
  volumes: VolumePlan[];
}

/** What the plan reads: the informers' caches, narrowed to the calls it makes. */
export interface PlanSources {
  relationships: { list(namespace: string): SyncRelationship[] };
  groups: { get(name: string, namespace: string): ConsistencyGroup | undefined };
  nodes: { get(name: string): LockstepNode | undefined };
  leaseOf: (node: string) => V1Lease | undefined;
  lookup: Lookup;
}

/** The name of a group volume on the agents: unique per namespace and group. */
export function agentVolumeName(namespace: string, group: string, volume: string): string {
  return `${namespace}.${group}.${volume}`;
}

/** Resolves everything the relationship needs; throws Blocked on the first thing missing. */
export function planRelationship(rel: SyncRelationship, from: PlanSources, now: Date): Plan {
  const ns = rel.metadata.namespace ?? '';
  const { spec } = rel;
  const group = from.groups.get(spec.consistencyGroup, ns);
  if (!group) {
    throw new Blocked(
      'ConsistencyGroupNotFound',
      `ConsistencyGroup ${spec.consistencyGroup} does not exist`,
    );
  }
  const owner = groupOwner(from, ns, spec.consistencyGroup);
  if (owner && owner !== rel.metadata.name) {
    throw new Blocked(
      'ConsistencyGroupInUse',
      `ConsistencyGroup ${spec.consistencyGroup} is already replicated by SyncRelationship ${owner}`,
    );
  }
  const remoteWithPvc = spec.targets.find((t) => t.endpoint && t.pvc);
  if (remoteWithPvc) {
    throw new Blocked(
      'RemoteTargetPvc',
      `target ${remoteWithPvc.endpoint}: an agent in another cluster keeps its replica in its own data dir; pvc is for targets in this cluster`,
    );
  }
  const source = side(from, spec.source.node, now);
  const targets = spec.targets.map((t) =>
    t.endpoint
      ? {
          node: t.endpoint,
          endpoint: t.endpoint,
          ready: true,
          remote: { secret: t.tlsSecretRef ?? '' },
        }
      : side(from, t.node ?? '', now),
  );
  // The primary last seen, when it is on none of the sides now: the source node was changed.
  const was = rel.status?.move?.fromNode ?? rel.status?.primaryNode;
  const moveFrom =
    spec.primary === 'source' &&
    was &&
    ![spec.source.node, ...targets.map((t) => t.node)].includes(was)
      ? side(from, was, now)
      : undefined;
  const members = groupVolumes(group, from.lookup);
  if (members.length === 0) {
    throw new Blocked('NoVolumes', `ConsistencyGroup ${group.metadata.name} selects no PVCs`);
  }
  const volumes = members.map((v): VolumePlan => {
    const where = locate(ns, v.pvc, from.lookup);
    if (!where.ok) throw new Blocked(where.reason, where.message);
    // A source node that is not the PVC's was moved to (or is being): its copy lives in its
    // agent's data dir. For a relationship that never ran, that is a mistake.
    const onSource = where.node === undefined || where.node === spec.source.node;
    if (!onSource && !rel.status?.primaryNode) {
      throw new Blocked(
        'VolumeNotOnSource',
        `PVC ${v.pvc} lives on node ${where.node}, not on the source node ${spec.source.node}`,
      );
    }
    const targetPaths = new Map<string, string>();
    for (const t of spec.targets) {
      if (!t.pvc || !t.node) continue;
      const at = locate(ns, t.pvc, from.lookup);
      if (!at.ok) throw new Blocked(at.reason, `target ${t.node}: ${at.message}`);
      if (at.node !== undefined && at.node !== t.node) {
        throw new Blocked(
          'VolumeNotOnTarget',
          `PVC ${t.pvc} lives on node ${at.node}, not on the target node ${t.node}`,
        );
      }
      // One target PVC holds the replicas of every volume of the group, one directory each.
      targetPaths.set(t.node, `${at.path}/${v.name}/${v.file}`);
    }
    return {
      name: v.name,
      pvc: v.pvc,
      agentName: agentVolumeName(ns, group.metadata.name, v.name),
      dataPath: onSource ? `${where.path}/${v.file}` : '',
      sizeBytes: Math.floor(where.capacityBytes / 4096) * 4096,
      targetPaths,
    };
  });
  const primary = spec.primary === 'source' ? source : targets.find((t) => t.node === spec.primary);
  if (!primary) {
    throw new Blocked(
      'PrimaryNotATarget',
      `primary ${spec.primary} is neither "source" nor a target node`,
    );
  }
  for (const s of [primary, ...(moveFrom ? [moveFrom] : [])]) {
    if (!s.ready)
      throw new Blocked(
        'AgentNotReady',
        `the Lockstep agent of node ${s.node} is not ready (its heartbeat lapsed)` +
          (s === primary ? `; ${whatNow(rel)}` : ''),
      );
  }
  return { source, targets, primary, moveFrom, volumes };
}

/** What happens to a relationship whose primary is lost, for its status. */
function whatNow(rel: SyncRelationship): string {
  const f = rel.spec.failover;
  if (!f?.mediator)
    return 'without a mediator a lost primary needs a person: `lockstep ctl promote --force` on a target, then set spec.primary to it';
  if (f.policy === 'Automatic')
    return 'the failover monitor promotes an in-sync target once it has had no primary for the grace period';
  return 'failover is Manual: set spec.primary to an in-sync target (the mediator grants it only if it holds every acknowledged write)';
}

/** A node as a side of the relationship: its agent must be registered. */
function side(from: PlanSources, node: string, now: Date): Side {
  const n = from.nodes.get(node);
  if (!n) {
    throw new Blocked('AgentNotRegistered', `no Lockstep agent is registered for node ${node}`);
  }
  return { node, endpoint: n.spec.endpoint, ready: agentReady(from.leaseOf(node), now) };
}

/** The oldest relationship that names the group owns it; others are refused. */
export function groupOwner(
  from: PlanSources,
  namespace: string,
  group: string,
): string | undefined {
  const claimants = from.relationships
    .list(namespace)
    .filter((r) => r.spec.consistencyGroup === group && !r.metadata.deletionTimestamp)
    // Timestamps arrive as strings from watches and as Dates from lists: compare instants.
    .sort((a, b) => created(a) - created(b) || a.metadata.name.localeCompare(b.metadata.name));
  return claimants[0]?.metadata.name;
}

function created(o: SyncRelationship): number {
  return new Date(o.metadata.creationTimestamp ?? 0).getTime();
}
