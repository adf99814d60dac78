// The SyncRelationship reconciler: from a relationship, its ConsistencyGroup, the PVCs' volumes
// and the registered agents, it opens each volume on the source agent, prepares replicas on
// target PVCs, configures replication on the primary, and reports what the agents say.
// Level-triggered: every pass re-reads the world, takes the steps still missing, and writes
// status only when it changed; an idle, in-sync relationship costs no API writes.
import type * as k8s from '@kubernetes/client-node';
import type { AgentClient, VolumeInfo } from '../../../lib/agent-client';
import { errorMessage, isLockstepError } from '../../../lib/errors';
import { ServerUnreachable } from '../../../lib/grpc-errors';
import { explainUnreachable } from '../../../lib/tls/handshake-diagnosis';
import type { Logger } from '../../../lib/logger';
import {
  DISCARD_ANNOTATION,
  type ConsistencyGroup,
  type LockstepNode,
  type SyncMode,
  type SyncRelationship,
  type SyncRelationshipStatus,
} from '../api/types';
import { GROUP, VERSION, mergePatch } from '../../../lib/kube';
import type { AgentPool } from '../agents/agent-pool';
import type { SupervisedInformer } from '../informers/supervised-informer';
import { Blocked } from '../resolve/blocked';
import type { Lookup } from '../resolve/group-volumes';
import {
  agentVolumeName,
  planRelationship,
  type Plan,
  type Side,
} from '../resolve/relationship-plan';
import { agentGroupName } from '../resolve/snapshot-source';
import { stepMove } from '../../../lib/group-move';
import { sameJson } from '../status/conditions';
import type { EventRecorder } from '../status/event-recorder';
import {
  blockedStatus,
  failoverEvent,
  forcedPromotionEvent,
  phaseEvent,
  summarize,
  type Observed,
} from '../status/relationship-status';
import { graceOf } from '../failover/failover-monitor';
import { parseDuration } from '../../../lib/duration';
import { withFinalizer } from '../status/finalizer';
import { writeStatusIfChanged } from '../status/status-writer';
import type { ReconcileResult } from '../workqueue/controller-loop';

const FINALIZER = 'lockstep.dev/teardown';
/** A peer's states after a split brain (generations.ts decides them). */
const DIVERGED: ReadonlySet<string> = new Set(['SplitBrain', 'PeerIsNewer']);
const PLURAL = 'syncrelationships';
/** How often progress is read back while something is in motion. */
const PROGRESS_POLL_MS = 1_000;
/** How often a blocked relationship looks again, besides the events that wake it. */
const BLOCKED_POLL_MS = 10_000;
const DEFAULT_REGION_SIZE = 65536;

const AGENT_MODE: Record<SyncMode, string> = {
  Sync: 'sync',
  StrictSync: 'strict-sync',
  Async: 'async',
};

export interface RelationshipDeps {
  relationships: SupervisedInformer<SyncRelationship>;
  groups: SupervisedInformer<ConsistencyGroup>;
  nodes: SupervisedInformer<LockstepNode>;
  lookup: Lookup;
  leaseOf: (node: string) => k8s.V1Lease | undefined;
  agents: AgentPool;
  objects: k8s.CustomObjectsApi;
  /** A Secret of a relationship's namespace (a remote target's tlsSecretRef), if it exists. */
  secret: (namespace: string, name: string) => Promise<k8s.V1Secret | undefined>;
  events: EventRecorder;
  log: Logger;
}

/** How often a relationship with targets in other clusters hands their credentials over again. */
const REMOTE_CREDENTIALS_POLL_MS = 60_000;

export class SyncRelationshipReconciler {
  constructor(private readonly deps: RelationshipDeps) {}

  async reconcile(key: string): Promise<ReconcileResult> {
    const [namespace, name] = key.split('/') as [string, string];
    let rel = this.deps.relationships.get(name, namespace);
    if (!rel) return;
    rel = await withFinalizer(this.deps.objects, PLURAL, FINALIZER, rel, (o) => this.teardown(o));
    if (!rel) return;

    let status: SyncRelationshipStatus;
    try {
      const plan = planRelationship(rel, this.deps, new Date());
      status = summarize(rel, plan, await this.observe(rel, plan));
    } catch (err) {
      if (!(err instanceof Blocked)) throw err;
      await this.writeStatus(rel, blockedStatus(rel, err));
      return { requeueAfterMs: BLOCKED_POLL_MS };
    }
    await this.writeStatus(rel, status);
    if (status.phase !== 'InSync') return { requeueAfterMs: PROGRESS_POLL_MS };
    // A rotated tlsSecretRef is not watched for: it is read again now and then.
    if (rel.spec.targets.some((t) => t.endpoint))
      return { requeueAfterMs: REMOTE_CREDENTIALS_POLL_MS };
  }

  // ---- acting on the agents ---------------------------------------------------------------

  /** The primary's view of each volume after apply, or why the primary could not be reached. */
  private async observe(rel: SyncRelationship, plan: Plan): Promise<Observed> {
    try {
      if (plan.moveFrom) {
        const moving = await this.move(rel, plan, plan.moveFrom);
        if (moving) return moving;
      }
      const volumes = await this.apply(rel, plan);
      const discard = rel.metadata.annotations?.[DISCARD_ANNOTATION];
      if (discard !== undefined) await this.discardDiverged(rel, plan, discard, volumes);
      return { volumes };
    } catch (err) {
      if (!isLockstepError(err, 'LOCKSTEP_ERR_UNAVAILABLE')) throw err;
      // gRPC says only "failed to connect"; a refused TLS handshake is worth saying as such.
      const why =
        err instanceof ServerUnreachable
          ? await explainUnreachable(err, err.target, 'agent', this.deps.agents.transport)
          : err;
      return { volumes: [], unreachable: errorMessage(why) };
    }
  }

  /** Takes the steps still missing on the agents; returns the primary's view of each volume. */
  private async apply(rel: SyncRelationship, plan: Plan): Promise<VolumeInfo[]> {
    const source = this.deps.agents.get(plan.source.endpoint);
    const mode = AGENT_MODE[rel.spec.mode];
    const regionSize = rel.spec.resync?.regionSize ?? DEFAULT_REGION_SIZE;
    const rate = rel.spec.resync?.maxBytesPerSecond ?? 0;
    const mediator = mediatorOf(rel);
    for (const t of plan.targets) if (t.remote) await this.handOverCredentials(rel, plan, t);
    const members = relationshipNodes(plan);
    const out: VolumeInfo[] = [];
    for (const v of plan.volumes) {
      // The source's copy is the origin (the PVC's file, adopted). While a lost source is not
      // the primary (after a failover), the primary's copy stands in for it.
      const onSource = await this.onSide(plan, plan.source, () =>
        getOrCreate(source, v.agentName, () =>
          source.createVolume(v.agentName, v.sizeBytes, { dataPath: v.dataPath }),
        ),
      );
      const origin =
        onSource ?? (await this.deps.agents.get(plan.primary.endpoint).getVolume(v.agentName));
      if (onSource && onSource.dataPath !== v.dataPath) {
        throw new Blocked(
          'VolumeConflict',
          `agent ${plan.source.node} already has a volume ${v.agentName} on ${origin.dataPath || 'its data dir'}, not ${v.dataPath}`,
        );
      }
      for (const t of plan.targets) {
        const path = v.targetPaths.get(t.node);
        if (!path) continue;
        const agent = this.deps.agents.get(t.endpoint);
        await this.onSide(plan, t, () =>
          getOrCreate(agent, v.agentName, () =>
            agent.createVolume(v.agentName, origin.sizeBytes, {
              dataPath: path,
              secondaryOfUuid: origin.uuid,
              members,
            }),
          ),
        );
      }
      let vol = origin;
      if (plan.primary !== plan.source || vol.role !== 'primary') {
        vol = await this.switchPrimary(rel, plan, v.agentName);
      }
      const primary = this.deps.agents.get(plan.primary.endpoint);
      // Lost sides stay peers: the primary tracks what they miss.
      const want = [plan.source, ...plan.targets]
        .filter((s) => s !== plan.primary)
        .map((s) => s.endpoint)
        .sort();
      const r = vol.replication;
      const have = (r?.peers ?? []).map((p) => p.address).sort();
      if (
        !r ||
        r.mode !== mode ||
        r.regionSize !== regionSize ||
        !sameJson(have, want) ||
        r.maxResyncBytesPerSecond !== rate ||
        !sameProtection(r.protection, mediator)
      ) {
        vol = await primary.replicate({
          name: v.agentName,
          targets: want,
          mode,
          regionSize,
          maxResyncBytesPerSecond: rate,
          replaceTargets: true,
          ...(mediator ? { mediator } : {}),
        });
        this.deps.log.info(
          { relationship: rel.metadata.name, volume: v.agentName, targets: want, mode },
          'replication configured',
        );
      }
      out.push(vol);
    }
    return out;
  }

  /**
   * Gives the primary the certificate its tlsSecretRef holds for a target in another cluster:
   * a certificate that cluster's CA issued for this side, and that CA. The agent keeps it and
   * changes nothing when it already has it.
   */
  private async handOverCredentials(rel: SyncRelationship, plan: Plan, t: Side): Promise<void> {
    const name = t.remote?.secret ?? '';
    const secret = await this.deps.secret(rel.metadata.namespace ?? '', name);
    if (!secret)
      throw new Blocked('TlsSecretNotFound', `target ${t.endpoint}: Secret ${name} does not exist`);
    const field = (k: string) => Buffer.from(secret.data?.[k] ?? '', 'base64').toString();
    const pem = { ca: field('ca.crt'), cert: field('tls.crt'), key: field('tls.key') };
    if (!pem.ca || !pem.cert || !pem.key)
      throw new Blocked(
        'TlsSecretInvalid',
        `target ${t.endpoint}: Secret ${name} needs ca.crt (the other cluster’s Lockstep CA), ` +
          'tls.crt and tls.key (a certificate that CA issued for this cluster)',
      );
    try {
      await this.deps.agents.get(plan.primary.endpoint).setPeerCredentials(t.endpoint, pem);
    } catch (err) {
      if (!isLockstepError(err, 'LOCKSTEP_ERR_INVALID_ARGUMENT')) throw err;
      throw new Blocked(
        'TlsSecretInvalid',
        `target ${t.endpoint}: Secret ${name}: ${errorMessage(err)}`,
      );
    }
  }

  /**
   * The explicit choice that resolves a split brain (DISCARD_ANNOTATION): the named node's
   * diverging copies are overwritten from the primary's, then the annotation goes. Only a node
   * whose copies have diverged is touched; anything else is refused with a Warning.
   */
  private async discardDiverged(
    rel: SyncRelationship,
    plan: Plan,
    node: string,
    volumes: VolumeInfo[],
  ): Promise<void> {
    const side = [plan.source, ...plan.targets].find((s) => s.node === node);
    const diverged = side
      ? volumes.filter((v) =>
          v.replication?.peers.some((p) => p.address === side.endpoint && DIVERGED.has(p.state)),
        )
      : [];
    let why = '';
    if (!side) why = `${node} is not a node of this relationship`;
    else if (side === plan.primary)
      why = `${node} is the primary: set spec.primary to the copy that survives first`;
    else if (diverged.length === 0) why = `no copy on ${node} has diverged from the primary's`;
    const primary = this.deps.agents.get(plan.primary.endpoint);
    if (!why) for (const v of diverged) await primary.discardPeer(v.name, side!.endpoint);
    await this.deps.objects.patchNamespacedCustomObject(
      {
        group: GROUP,
        version: VERSION,
        namespace: rel.metadata.namespace ?? '',
        plural: PLURAL,
        name: rel.metadata.name,
        body: { metadata: { annotations: { [DISCARD_ANNOTATION]: null } } },
      },
      mergePatch,
    );
    if (why) {
      await this.deps.events.record(rel, 'Warning', 'DiscardRefused', `nothing discarded: ${why}`);
      return;
    }
    this.deps.log.warn({ relationship: rel.metadata.name, node }, 'discarding diverged writes');
    await this.deps.events.record(
      rel,
      'Warning',
      'DivergedWritesDiscarded',
      `as asked, ${node}'s diverging writes to ${diverged.map((v) => v.name).join(', ')} are ` +
        `discarded: its copies resync from ${plan.primary.node}`,
    );
  }

  /**
   * `step` on a side's agent; undefined if the side is lost and not the primary (its heartbeat
   * lapsed or it does not answer): the primary tracks what it misses, and it is set up again
   * when it is back.
   */
  private async onSide<T>(plan: Plan, side: Side, step: () => Promise<T>): Promise<T | undefined> {
    if (side === plan.primary) return step();
    if (!side.ready) return undefined;
    try {
      return await step();
    } catch (err) {
      if (isLockstepError(err, 'LOCKSTEP_ERR_UNAVAILABLE')) return undefined;
      throw err;
    }
  }

  /**
   * The source node changed: the next step of moving the primary there (lib/group-move.ts),
   * and the primary's view while it is under way; undefined once it is done, the old
   * primary's copies released (or deleted, with deleteDataOnRemoval).
   */
  private async move(rel: SyncRelationship, plan: Plan, from: Side): Promise<Observed | undefined> {
    const ns = rel.metadata.namespace ?? '';
    const fromAgent = this.deps.agents.get(from.endpoint);
    const to = plan.source;
    const volumes = plan.volumes.map((v) => v.agentName);
    const previous = rel.status?.move;
    const startTime = previous?.toNode === to.node ? previous.startTime : new Date().toISOString();
    if (!previous)
      await this.deps.events.record(
        rel,
        'Normal',
        'Moving',
        `moving the primary from ${from.node} to ${to.node}: establishing copies there`,
      );
    const p = await stepMove({
      volumes,
      group: agentGroupName(ns, rel.spec.consistencyGroup),
      from: fromAgent,
      fromAddress: from.endpoint,
      to: this.deps.agents.get(to.endpoint),
      toAddress: to.endpoint,
      keepSource: false,
    });
    if (p.switchedOver)
      await this.deps.events.record(
        rel,
        'Normal',
        'SwitchedPrimary',
        `node ${to.node} is now primary (writes held ${p.switchedOver.holdMs.toFixed(1)} ms); ` +
          `the targets resync from the switchover's snapshot`,
      );
    if (p.phase === 'Done') {
      for (const name of volumes) {
        const v = await fromAgent.getVolume(name);
        if (rel.spec.deleteDataOnRemoval) await fromAgent.deleteVolume(name, true);
        else if (v.dataPath) await fromAgent.releaseVolume(name, true);
      }
      this.deps.log.info(
        { relationship: rel.metadata.name, from: from.node, to: to.node },
        'moved the primary',
      );
      await this.deps.events.record(
        rel,
        'Normal',
        'Moved',
        `the primary moved from ${from.node} to ${to.node}; ${from.node}'s copies were ` +
          (rel.spec.deleteDataOnRemoval ? 'deleted' : 'released (files kept)'),
      );
      return undefined;
    }
    const primary = p.phase === 'Establishing' ? fromAgent : this.deps.agents.get(to.endpoint);
    return {
      volumes: await Promise.all(volumes.map((v) => primary.getVolume(v))),
      primaryNode: p.phase === 'Establishing' ? from.node : to.node,
      move: {
        fromNode: from.node,
        toNode: to.node,
        phase: p.phase,
        startTime,
        doneBytes: p.doneBytes,
        totalBytes: p.totalBytes,
        etaSeconds: p.etaSeconds,
      },
    };
  }

  /**
   * A planned switchover to the side spec.primary names: any other side that is primary is
   * demoted first (it drains, flushes and tells its secondaries it is leaving), then the chosen
   * copy is promoted, so there is never a moment with two primaries. Returns the new primary's
   * view of the volume.
   */
  private async switchPrimary(
    rel: SyncRelationship,
    plan: Plan,
    name: string,
  ): Promise<VolumeInfo> {
    const chosen = this.deps.agents.get(plan.primary.endpoint);
    let vol: VolumeInfo;
    try {
      vol = await chosen.getVolume(name);
    } catch (err) {
      if (!isLockstepError(err, 'LOCKSTEP_ERR_VOLUME_NOT_FOUND')) throw err;
      throw new Blocked(
        'NoCopyOnPrimary',
        `node ${plan.primary.node} has no copy of ${name} yet; it can become primary once it has been baselined`,
      );
    }
    if (vol.role === 'primary') return vol;
    for (const side of [plan.source, ...plan.targets]) {
      if (side === plan.primary) continue;
      const agent = this.deps.agents.get(side.endpoint);
      const other = await agent.getVolume(name).catch(() => undefined);
      if (other?.role === 'primary') await agent.demote(name);
    }
    const promoted = await chosen.promote(name, false);
    vol = promoted.volume;
    this.deps.log.info(
      { relationship: rel.metadata.name, volume: name, primary: plan.primary.node },
      'switched primary',
    );
    const back = promoted.rolledBack;
    if (back)
      await this.deps.events.record(
        rel,
        'Warning',
        'RolledBackToBeforeResync',
        `${name}: node ${plan.primary.node} was being resynced; it was rolled back to its snapshot ` +
          `${back.snapshot} of ${new Date(Number(back.snapshotCreatedAtMs)).toISOString()} ` +
          `(${Number(back.bytes)} bytes restored) before becoming primary`,
      );
    await this.deps.events.record(
      rel,
      'Normal',
      'SwitchedPrimary',
      `${name}: node ${plan.primary.node} is now primary`,
    );
    return vol;
  }

  private async teardown(rel: SyncRelationship): Promise<void> {
    const ns = rel.metadata.namespace ?? '';
    const prefix = agentVolumeName(ns, rel.spec.consistencyGroup, '');
    const agentOf = (node: string): AgentClient | undefined => {
      const n = this.deps.nodes.get(node);
      return n ? this.deps.agents.get(n.spec.endpoint) : undefined;
    };
    const sides = [
      rel.spec.source.node,
      ...rel.spec.targets.flatMap((t) => (t.node ? [t.node] : [])),
    ];
    const held = new Map<string, VolumeInfo[]>();
    for (const node of sides) {
      const agent = agentOf(node);
      if (!agent) continue;
      const volumes = (await agent.listVolumes()).filter((v) => v.name.startsWith(prefix));
      held.set(node, volumes);
      // The primary copy stays served: it is the workload's disk; only protection stops.
      for (const v of volumes) {
        if (v.role === 'primary' && v.replication) await agent.stopReplication(v.name);
      }
    }
    for (const t of rel.spec.targets) {
      const agent = t.node ? agentOf(t.node) : undefined;
      if (!agent || !t.node) continue;
      for (const v of held.get(t.node) ?? []) {
        if (v.role === 'primary') continue; // never drop the copy that serves writes
        if (rel.spec.deleteDataOnRemoval) await agent.deleteVolume(v.name, true);
        else if (v.dataPath) await agent.releaseVolume(v.name, true);
      }
    }
    this.deps.log.info(
      { relationship: `${ns}/${rel.metadata.name}`, deleteData: !!rel.spec.deleteDataOnRemoval },
      'relationship torn down',
    );
    await this.deps.events.record(
      rel,
      'Normal',
      'TornDown',
      rel.spec.deleteDataOnRemoval
        ? 'replication stopped; replica files deleted'
        : 'replication stopped; replica files kept',
    );
  }

  // ---- writing back -------------------------------------------------------------------------

  /** Returns the updated object, or undefined if it is gone. */
  /** Writes the status if it changed, with an Event when the phase moved. */
  private async writeStatus(rel: SyncRelationship, status: SyncRelationshipStatus): Promise<void> {
    const event = phaseEvent(rel.status, status);
    const failedOver = failoverEvent(rel.status, status);
    const forced = forcedPromotionEvent(rel.status, status);
    if (!(await writeStatusIfChanged(this.deps.objects, PLURAL, rel, status))) return;
    if (failedOver) {
      this.deps.log.warn({ relationship: rel.metadata.name }, failedOver);
      await this.deps.events.record(rel, 'Warning', 'FailedOver', failedOver);
    }
    if (forced) await this.deps.events.record(rel, 'Warning', 'ForcedPromotion', forced);
    if (event) await this.deps.events.record(rel, event.type, event.reason, event.message);
  }
}

interface AgentMediator {
  address: string;
  failover: string;
  graceMs: number;
  suspendLimitMs: number;
}

/**
 * The agents' mediator settings for the relationship. Their own failover is manual: in a
 * cluster the operator's monitor decides when a primary is lost (failover/failover-monitor.ts).
 */
function mediatorOf(rel: SyncRelationship): AgentMediator | undefined {
  const f = rel.spec.failover;
  if (!f?.mediator) return undefined;
  return {
    address: f.mediator,
    failover: 'manual',
    graceMs: graceOf(rel),
    suspendLimitMs: parseDuration(f.suspendLimit ?? '30s', 'failover.suspendLimit'),
  };
}

/** A volume's protection already is what the relationship asks (a mediator is never removed). */
function sameProtection(
  p:
    | { mediator: string; failover: string; graceMs: number; suspendLimitMs: number }
    | null
    | undefined,
  want: AgentMediator | undefined,
): boolean {
  if (!want) return true;
  return (
    p?.mediator === want.address &&
    p.failover === want.failover &&
    Number(p.graceMs) === want.graceMs &&
    Number(p.suspendLimitMs) === want.suspendLimitMs
  );
}

async function getOrCreate(
  agent: AgentClient,
  name: string,
  create: () => Promise<VolumeInfo>,
): Promise<VolumeInfo> {
  try {
    return await agent.getVolume(name);
  } catch (err) {
    if (!isLockstepError(err, 'LOCKSTEP_ERR_VOLUME_NOT_FOUND')) throw err;
    return create();
  }
}

/**
 * The nodes a target's copy may take a primary from (its agent refuses any other): every side
 * of the relationship, and the node a move leaves. With a side in another cluster, whose CA
 * names this side's agents otherwise, none is listed and the primary lists them itself.
 */
function relationshipNodes(plan: Plan): string[] {
  const sides = [plan.source, ...plan.targets, ...(plan.moveFrom ? [plan.moveFrom] : [])];
  if (sides.some((s) => s.remote)) return [];
  return [...new Set(sides.map((s) => s.node))];
}
