// The LockstepNode reconciler: an agent is Ready while its heartbeat Lease is fresh, as the
// node lifecycle controller judges kubelets. The condition is written only when it flips.
import type * as k8s from '@kubernetes/client-node';
import type { LockstepNode } from '../api/types';
import { agentReady, leaseExpiry } from '../agents/heartbeat';
import type { SupervisedInformer } from '../informers/supervised-informer';
import { mergeConditions, type DesiredCondition } from '../status/conditions';
import type { EventRecorder } from '../status/event-recorder';
import { writeStatusIfChanged } from '../status/status-writer';
import type { ReconcileResult } from '../workqueue/controller-loop';

export interface NodeDeps {
  nodes: SupervisedInformer<LockstepNode>;
  leaseOf: (node: string) => k8s.V1Lease | undefined;
  objects: k8s.CustomObjectsApi;
  events: EventRecorder;
}

export class LockstepNodeReconciler {
  constructor(private readonly deps: NodeDeps) {}

  async reconcile(name: string): Promise<ReconcileResult> {
    const node = this.deps.nodes.get(name);
    if (!node) return;
    const now = new Date();
    const lease = this.deps.leaseOf(name);
    const ready = agentReady(lease, now);
    const expiry = leaseExpiry(lease);
    const desired: DesiredCondition = ready
      ? {
          type: 'Ready',
          status: 'True',
          reason: 'HeartbeatFresh',
          message: 'the agent renews its lease',
        }
      : {
          type: 'Ready',
          status: 'False',
          reason: lease ? 'HeartbeatLapsed' : 'NoHeartbeat',
          message: lease
            ? `the agent's lease was last renewed at ${String(lease.spec?.renewTime)}`
            : 'the agent has not created its heartbeat lease',
        };
    const conditions = mergeConditions(
      node.status?.conditions,
      [desired],
      node.metadata.generation ?? 0,
      now,
    );
    const was = node.status?.conditions?.find((c) => c.type === 'Ready')?.status;
    const status = { ...node.status, conditions };
    const wrote = await writeStatusIfChanged(this.deps.objects, 'lockstepnodes', node, status);
    if (wrote && was !== desired.status) {
      await this.deps.events.record(
        node,
        ready ? 'Normal' : 'Warning',
        ready ? 'NodeReady' : 'NodeNotReady',
        desired.message,
      );
    }
    // Look again when the lease would lapse, unless it is renewed first (which wakes us too).
    return ready && expiry !== undefined
      ? { requeueAfterMs: expiry - now.getTime() + 100 }
      : undefined;
  }
}
