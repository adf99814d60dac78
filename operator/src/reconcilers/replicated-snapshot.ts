// The ReplicatedSnapshot reconciler: it takes the snapshot once, on the primary of the
// relationship that replicates the source (every in-sync copy cuts at the same write-order
// point), reports each copy, verifies the copies if asked, and deletes the snapshot on every
// copy before the object goes (finalizer). One step per pass: the finalizer, then the intent
// (id, volumes, copies) recorded in status, then the take, then the verification; each
// status write's own watch event brings the next pass. A settled snapshot costs nothing.
import type * as k8s from '@kubernetes/client-node';
import type { AgentClient, SnapshotInfo } from '../../../lib/agent-client';
import { errorMessage, isLockstepError } from '../../../lib/errors';
import type { Logger } from '../../../lib/logger';
import type {
  ConsistencyGroup,
  LockstepNode,
  ReplicatedSnapshot,
  ReplicatedSnapshotStatus,
  SyncRelationship,
} from '../api/types';
import type { AgentPool } from '../agents/agent-pool';
import { agentReady } from '../agents/heartbeat';
import type { SupervisedInformer } from '../informers/supervised-informer';
import { Blocked } from '../resolve/blocked';
import type { Lookup } from '../resolve/group-volumes';
import {
  resolveSnapshotSource,
  type SnapshotSource,
  type SnapshotSources,
} from '../resolve/snapshot-source';
import { sameJson } from '../status/conditions';
import type { EventRecorder } from '../status/event-recorder';
import {
  needsVerification,
  pendingStatus,
  restated,
  snapshotEvents,
  snapshotId,
  takenStatus,
  verifiedStatus,
  type Why,
} from '../status/snapshot-status';
import { withFinalizer } from '../status/finalizer';
import { writeStatusIfChanged } from '../status/status-writer';
import type { ReconcileResult } from '../workqueue/controller-loop';

const FINALIZER = 'lockstep.dev/snapshots';
const PLURAL = 'replicatedsnapshots';
/** How often a blocked snapshot looks again, besides the events that wake it. */
const BLOCKED_POLL_MS = 10_000;

export interface SnapshotDeps {
  snapshots: SupervisedInformer<ReplicatedSnapshot>;
  relationships: SupervisedInformer<SyncRelationship>;
  groups: SupervisedInformer<ConsistencyGroup>;
  nodes: SupervisedInformer<LockstepNode>;
  lookup: Lookup;
  leaseOf: (node: string) => k8s.V1Lease | undefined;
  agents: AgentPool;
  objects: k8s.CustomObjectsApi;
  events: EventRecorder;
  log: Logger;
}

export class ReplicatedSnapshotReconciler {
  constructor(private readonly deps: SnapshotDeps) {}

  async reconcile(key: string): Promise<ReconcileResult> {
    const [namespace, name] = key.split('/') as [string, string];
    let snap = this.deps.snapshots.get(name, namespace);
    if (!snap) return;
    snap = await withFinalizer(this.deps.objects, PLURAL, FINALIZER, snap, (o) => this.teardown(o));
    if (!snap) return;
    if (!snap.status?.readyToUse) return this.take(snap);
    if (needsVerification(snap)) return this.verify(snap);
    // Settled; only a change of spec.verify (turned off) is left to acknowledge.
    if (snap.status.observedGeneration !== snap.metadata.generation) {
      await this.writeStatus(snap, restated(snap, snap.status, undefined, new Date()));
    }
  }

  // ---- taking ---------------------------------------------------------------------------------

  private async take(snap: ReplicatedSnapshot): Promise<ReconcileResult> {
    const now = new Date();
    let source: SnapshotSource;
    try {
      source = resolveSnapshotSource(snap, this.sources, now);
    } catch (err) {
      if (!(err instanceof Blocked)) throw err;
      await this.writeStatus(snap, pendingStatus(snap, undefined, err, now));
      return { requeueAfterMs: BLOCKED_POLL_MS };
    }
    const intent = pendingStatus(snap, source, takingWhy(source), now);
    if (!sameIntent(snap.status, intent)) {
      // Recorded before the agents are asked, so a deletion knows every copy to clean up.
      // Its watch event brings the next pass, which takes the snapshot.
      await this.writeStatus(snap, intent);
      return;
    }
    let taken: { snapshots: SnapshotInfo[]; holdMs: number };
    try {
      taken = await this.takeOnPrimary(snap, source);
    } catch (err) {
      const unreachable = isLockstepError(err, 'LOCKSTEP_ERR_UNAVAILABLE');
      const why: Why = {
        reason: unreachable ? 'PrimaryUnreachable' : 'SnapshotFailed',
        message: errorMessage(err),
      };
      await this.writeStatus(snap, pendingStatus(snap, source, why, now));
      if (unreachable) return { requeueAfterMs: BLOCKED_POLL_MS };
      throw err;
    }
    const status = takenStatus(snap, source, taken, new Date());
    this.deps.log.info(
      {
        snapshot: `${snap.metadata.namespace}/${snap.metadata.name}`,
        id: status.snapshotID,
        copies: status.copiesTaken,
        holdMs: status.holdMs,
      },
      'snapshot taken',
    );
    await this.writeStatus(snap, status);
  }

  /** The snapshot on the primary (and through it on every in-sync copy). */
  private async takeOnPrimary(
    snap: ReplicatedSnapshot,
    source: SnapshotSource,
  ): Promise<{ snapshots: SnapshotInfo[]; holdMs: number }> {
    const id = snapshotId(snap);
    const label = snap.spec.label ?? '';
    const primary = this.deps.agents.get(source.primary.endpoint);
    try {
      if (source.wholeGroup) {
        await ensureGroup(primary, source);
        const g = await primary.snapshotGroup(source.agentGroup, id, { label });
        return { snapshots: g.snapshots, holdMs: g.holdMs };
      }
      const [volume] = source.volumes;
      if (!volume) throw new Error(`no volume to snapshot in ${source.group}`);
      const s = await primary.createSnapshot(volume.agentName, id, label);
      return { snapshots: [s], holdMs: s.holdMs };
    } catch (err) {
      // Taken by an earlier pass whose status write did not happen: read it back.
      if (!isLockstepError(err, 'LOCKSTEP_ERR_SNAPSHOT_EXISTS')) throw err;
      return { snapshots: await this.readBack(source, id), holdMs: 0 };
    }
  }

  /** A snapshot that exists already, as the primary reports it, with each side's copy. */
  private async readBack(source: SnapshotSource, id: string): Promise<SnapshotInfo[]> {
    const out: SnapshotInfo[] = [];
    for (const v of source.volumes) {
      let own: SnapshotInfo | undefined;
      const copies: SnapshotInfo['copies'] = [];
      for (const side of source.sides) {
        let found: SnapshotInfo | undefined;
        let reason = `no snapshot ${id}`;
        try {
          found = await findSnapshot(this.deps.agents.get(side.endpoint), v.agentName, id);
        } catch (err) {
          if (side === source.primary) throw err;
          reason = errorMessage(err);
        }
        if (side === source.primary) own = found;
        copies.push({
          address: side.endpoint,
          node: side.node,
          state: found ? 'Taken' : 'Missing',
          reason: found ? '' : reason,
        });
      }
      if (own) out.push({ ...own, copies });
    }
    return out;
  }

  // ---- verifying ------------------------------------------------------------------------------

  private async verify(snap: ReplicatedSnapshot): Promise<ReconcileResult> {
    const now = new Date();
    const taken = snap.status ?? {};
    let source: SnapshotSource;
    try {
      source = resolveSnapshotSource(snap, this.sources, now);
    } catch (err) {
      if (!(err instanceof Blocked)) throw err;
      await this.writeStatus(snap, restated(snap, taken, err, now));
      return { requeueAfterMs: BLOCKED_POLL_MS };
    }
    const primary = this.deps.agents.get(source.primary.endpoint);
    const id = snapshotId(snap);
    try {
      const results = [];
      for (const v of taken.volumes ?? [])
        results.push(await primary.verifySnapshot(v.volumeHandle, id));
      await this.writeStatus(snap, verifiedStatus(snap, taken, results, source, new Date()));
    } catch (err) {
      const unreachable = isLockstepError(err, 'LOCKSTEP_ERR_UNAVAILABLE');
      const why: Why = {
        reason: unreachable ? 'PrimaryUnreachable' : 'VerificationError',
        message: errorMessage(err),
      };
      await this.writeStatus(snap, restated(snap, taken, why, now));
      if (unreachable) return { requeueAfterMs: BLOCKED_POLL_MS };
      throw err;
    }
  }

  // ---- deleting -------------------------------------------------------------------------------

  /**
   * Deletes the snapshot on every copy the status recorded: on the primary first (which drops
   * it on the replicas it reaches), then whatever a side still lists. A side without a ready
   * agent cannot be asked; it is named in a Warning rather than holding the deletion forever.
   */
  private async teardown(snap: ReplicatedSnapshot): Promise<void> {
    const id = snap.status?.snapshotID;
    const volumes = snap.status?.volumes ?? [];
    if (!id || volumes.length === 0) return; // nothing was ever asked of the agents
    let primary = snap.status?.primaryNode;
    try {
      primary = resolveSnapshotSource(snap, this.sources, new Date()).primary.node;
    } catch (err) {
      if (!(err instanceof Blocked)) throw err;
    }
    const nodes = new Set(volumes.flatMap((v) => v.copies.map((c) => c.node)));
    const order = [...nodes].sort((x, y) => Number(y === primary) - Number(x === primary));
    const deleted: string[] = [];
    const skipped: string[] = [];
    const now = new Date();
    for (const node of order) {
      const n = this.deps.nodes.get(node);
      if (!n || !agentReady(this.deps.leaseOf(node), now)) {
        skipped.push(`${node} (${n ? 'agent not ready' : 'no agent registered'})`);
        continue;
      }
      const agent = this.deps.agents.get(n.spec.endpoint);
      for (const v of volumes) {
        if (!(await findSnapshot(agent, v.volumeHandle, id))) continue;
        try {
          await agent.deleteSnapshot(v.volumeHandle, id, true);
        } catch (err) {
          if (!isLockstepError(err, 'LOCKSTEP_ERR_SNAPSHOT_NOT_FOUND')) throw err;
        }
        deleted.push(`${v.name} on ${node}`);
      }
    }
    const ref = `${snap.metadata.namespace}/${snap.metadata.name}`;
    this.deps.log.info({ snapshot: ref, id, deleted, skipped }, 'snapshot deleted');
    await this.deps.events.record(
      snap,
      'Normal',
      'SnapshotDeleted',
      `${id} deleted${deleted.length ? `: ${deleted.join(', ')}` : ' (no copy held it any more)'}`,
    );
    if (skipped.length) {
      await this.deps.events.record(
        snap,
        'Warning',
        'CopiesLeft',
        `${id} could not be deleted on ${skipped.join(', ')}; delete it there with lockstep ctl`,
      );
    }
  }

  // ---- writing back ---------------------------------------------------------------------------

  private get sources(): SnapshotSources {
    return this.deps;
  }

  /** Returns the updated object, or undefined if it is gone. */
  /** Writes the status if it changed, with the Events its changes deserve. */
  private async writeStatus(
    snap: ReplicatedSnapshot,
    status: ReplicatedSnapshotStatus,
  ): Promise<void> {
    const events = snapshotEvents(snap.status, status);
    if (!(await writeStatusIfChanged(this.deps.objects, PLURAL, snap, status))) return;
    for (const e of events) await this.deps.events.record(snap, e.type, e.reason, e.message);
  }
}

function takingWhy(source: SnapshotSource): Why {
  return {
    reason: 'Taking',
    message: `taking it on ${source.primary.node}, the primary of SyncRelationship ${source.relationship}`,
  };
}

/** Whether the stored status already records this intent (id, volumes, copies). */
function sameIntent(
  stored: ReplicatedSnapshotStatus | undefined,
  intent: ReplicatedSnapshotStatus,
): boolean {
  const where = (s: ReplicatedSnapshotStatus | undefined) => ({
    id: s?.snapshotID,
    volumes: (s?.volumes ?? []).map((v) => [v.volumeHandle, v.copies.map((c) => c.node)]),
  });
  return sameJson(where(stored), where(intent));
}

/**
 * The group on the primary agent with exactly the source's volumes: created if missing,
 * recreated if the ConsistencyGroup's volumes changed since.
 */
async function ensureGroup(agent: AgentClient, source: SnapshotSource): Promise<void> {
  const volumes = source.volumes.map((v) => v.agentName);
  try {
    await agent.createGroup(source.agentGroup, volumes);
  } catch (err) {
    if (!isLockstepError(err, 'LOCKSTEP_ERR_GROUP_EXISTS')) throw err;
    await agent.deleteGroup(source.agentGroup);
    await agent.createGroup(source.agentGroup, volumes);
  }
}

/** The snapshot `name` of `volume` on an agent, if it has both. */
async function findSnapshot(
  agent: AgentClient,
  volume: string,
  name: string,
): Promise<SnapshotInfo | undefined> {
  try {
    return (await agent.listSnapshots(volume)).find((s) => s.name === name);
  } catch (err) {
    if (isLockstepError(err, 'LOCKSTEP_ERR_VOLUME_NOT_FOUND')) return undefined;
    throw err;
  }
}
