// The operator's failover monitor: every second, for each relationship with a mediator in the
// shards this replica holds (leader/shard-leases.ts), it asks every side's agent about each
// volume and the mediator about each volume's record, and acts on the verdict
// (primary-judgement.ts). A failover is written as intent first, spec.primary and an
// annotation naming the lost primary, conditioned on the resourceVersion read; then the chosen
// replica is promoted, which is the mediator's compare-and-swap. Whoever dies in between, the
// SyncRelationship reconciler promotes the copy spec.primary names, through the same
// compare-and-swap: the failover completes once, and at most one copy is ever granted the epoch.
import type { Transport } from '../../../lib/tls/transport';
import type * as k8s from '@kubernetes/client-node';
import type { VolumeInfo } from '../../../lib/agent-client';
import { errorMessage } from '../../../lib/errors';
import { parseDuration } from '../../../lib/duration';
import { GROUP, VERSION, apiErrorMessage, mergePatch } from '../../../lib/kube';
import type { Logger } from '../../../lib/logger';
import { MediatorClient, type MediatorRecord } from '../../../lib/mediator-client';
import type { AgentPool } from '../agents/agent-pool';
import {
  FAILOVER_ANNOTATION,
  type ConsistencyGroup,
  type LastFailover,
  type LockstepNode,
  type SyncRelationship,
} from '../api/types';
import type { SupervisedInformer } from '../informers/supervised-informer';
import type { ControllerMetrics } from '../metrics';
import { groupVolumes, type Lookup } from '../resolve/group-volumes';
import { agentVolumeName } from '../resolve/relationship-plan';
import type { EventRecorder } from '../status/event-recorder';
import { judge, type SideView, type Verdict } from './primary-judgement';

const TICK_MS = 1_000;
/** The mediator's deadline: as short as the probes'. */
const PROBE_TIMEOUT_MS = 2_000;

export interface MonitorDeps {
  /** For the mediator clients. */
  transport: Transport;
  relationships: SupervisedInformer<SyncRelationship>;
  groups: SupervisedInformer<ConsistencyGroup>;
  nodes: SupervisedInformer<LockstepNode>;
  lookup: Lookup;
  agents: AgentPool;
  /** Clients with a short deadline: a lost agent must not hold up the verdict on the others. */
  probes: AgentPool;
  objects: k8s.CustomObjectsApi;
  events: EventRecorder;
  shards: { owns(key: string): boolean };
  metrics: ControllerMetrics;
  log: Logger;
}

export function graceOf(rel: SyncRelationship): number {
  return parseDuration(rel.spec.failover?.grace ?? '5s', 'failover.grace');
}

/** The spec.primary value that names `node`. */
function primaryValue(rel: SyncRelationship, node: string): string {
  return node === rel.spec.source.node ? 'source' : node;
}

export class FailoverMonitor {
  private readonly busy = new Set<string>();
  private readonly mediators = new Map<string, MediatorClient>();
  private timer: NodeJS.Timeout | undefined;

  constructor(private readonly deps: MonitorDeps) {}

  start(): void {
    this.timer = setInterval(() => this.tick(), TICK_MS);
  }

  stop(): void {
    clearInterval(this.timer);
    for (const m of this.mediators.values()) m.close();
    this.mediators.clear();
  }

  private tick(): void {
    for (const rel of this.deps.relationships.list()) {
      const key = `${rel.metadata.namespace ?? ''}/${rel.metadata.name}`;
      const watched =
        !!rel.spec.failover?.mediator &&
        !rel.metadata.deletionTimestamp &&
        !rel.status?.move &&
        this.deps.shards.owns(key);
      if (!watched) {
        this.deps.metrics.primaryLost.remove({ relationship: key });
        continue;
      }
      if (this.busy.has(key)) continue;
      this.busy.add(key);
      void this.check(rel, key)
        .catch((err: unknown) =>
          this.deps.log.warn({ relationship: key, err: errorMessage(err) }, 'monitor pass failed'),
        )
        .finally(() => this.busy.delete(key));
    }
  }

  private async check(rel: SyncRelationship, key: string): Promise<void> {
    const view = await this.observe(rel);
    if (!view) return;
    const verdict = judge(view);
    this.deps.metrics.primaryLost.set(
      { relationship: key },
      verdict.kind === 'waiting' || verdict.kind === 'fail-over' ? verdict.lostMs / 1000 : 0,
    );
    if (verdict.kind === 'adopt' || verdict.kind === 'fail-over')
      await this.act(rel, key, view.primary, verdict);
  }

  /** What the judgement needs, read now; undefined if the relationship cannot be resolved. */
  private async observe(rel: SyncRelationship) {
    const ns = rel.metadata.namespace ?? '';
    const group = this.deps.groups.get(rel.spec.consistencyGroup, ns);
    if (!group) return undefined;
    const names = groupVolumes(group, this.deps.lookup).map((v) =>
      agentVolumeName(ns, group.metadata.name, v.name),
    );
    const primaryNode = rel.spec.primary === 'source' ? rel.spec.source.node : rel.spec.primary;
    const nodes = [rel.spec.source.node, ...rel.spec.targets.flatMap((t) => t.node ?? [])];
    const sides = await Promise.all(
      nodes.flatMap((node) => {
        const endpoint = this.deps.nodes.get(node)?.spec.endpoint;
        return endpoint ? [this.probe(node, endpoint, names)] : [];
      }),
    );
    const primary = sides.find((s) => s.node === primaryNode);
    if (!primary || names.length === 0) return undefined;
    const address = rel.spec.failover?.mediator ?? '';
    const groups = new Set(
      sides.flatMap((s) =>
        s.volumes.flatMap((v) =>
          v?.replication?.protection?.group ? [v.replication.protection.group] : [],
        ),
      ),
    );
    const records = new Map<string, MediatorRecord | undefined>();
    await Promise.all(
      [...groups].map(async (g) =>
        records.set(
          g,
          await this.mediator(address)
            .record(g)
            .catch(() => undefined),
        ),
      ),
    );
    return {
      policy: rel.spec.failover?.policy ?? 'Manual',
      graceMs: graceOf(rel),
      primary,
      others: sides.filter((s) => s !== primary),
      records,
    };
  }

  private async probe(node: string, endpoint: string, names: string[]): Promise<SideView> {
    const agent = this.deps.probes.get(endpoint);
    const volumes = await Promise.all(
      names.map((n) => agent.getVolume(n).catch(() => undefined as VolumeInfo | undefined)),
    );
    return { node, endpoint, volumes };
  }

  private mediator(address: string): MediatorClient {
    let m = this.mediators.get(address);
    if (!m) {
      m = new MediatorClient(address, this.deps.transport, PROBE_TIMEOUT_MS);
      this.mediators.set(address, m);
    }
    return m;
  }

  /**
   * Writes the intent (spec.primary and the annotation, conditioned on the version judged),
   * then, for a failover, promotes the replica through the mediator.
   */
  private async act(
    rel: SyncRelationship,
    key: string,
    from: SideView,
    verdict: Extract<Verdict, { kind: 'adopt' | 'fail-over' }>,
  ): Promise<void> {
    const { log, events, metrics } = this.deps;
    const to = verdict.to;
    const record: LastFailover = {
      fromNode: from.node,
      toNode: to.node,
      epoch: 0,
      startTime: new Date().toISOString(),
      reason:
        verdict.kind === 'adopt'
          ? `the mediator granted ${to.node} epoch ${verdict.epoch} (a failover made outside the operator)`
          : verdict.reason,
    };
    try {
      await this.deps.objects.patchNamespacedCustomObject(
        {
          group: GROUP,
          version: VERSION,
          namespace: rel.metadata.namespace ?? '',
          plural: 'syncrelationships',
          name: rel.metadata.name,
          body: {
            metadata: {
              resourceVersion: rel.metadata.resourceVersion,
              annotations: { [FAILOVER_ANNOTATION]: JSON.stringify(record) },
            },
            spec: { primary: primaryValue(rel, to.node) },
          },
        },
        mergePatch,
      );
    } catch (err) {
      // A conflict: the object changed since it was judged; the next pass judges it again.
      log.info({ relationship: key, err: apiErrorMessage(err) }, 'failover intent not written');
      return;
    }
    metrics.failovers.inc({
      relationship: key,
      kind: verdict.kind === 'adopt' ? 'adopted' : 'failover',
    });
    log.warn(
      { relationship: key, from: from.node, to: to.node, reason: record.reason },
      verdict.kind,
    );
    await events.record(
      rel,
      'Warning',
      verdict.kind === 'adopt' ? 'AdoptedPrimary' : 'FailingOver',
      verdict.kind === 'adopt'
        ? `${to.node} is primary: ${record.reason}`
        : `failing over from ${from.node} to ${to.node}: ${record.reason}`,
    );
    if (verdict.kind !== 'fail-over') return;
    const agent = this.deps.agents.get(to.endpoint);
    for (const name of to.volumes.map((v) => v?.name ?? '')) {
      // Refused means another copy was granted meanwhile; the reconciler reports what stands.
      await agent
        .promote(name, false)
        .catch((err: unknown) =>
          log.warn(
            { relationship: key, volume: name, err: errorMessage(err) },
            'promotion refused',
          ),
        );
    }
  }
}
