// The snapshot schedules of a SyncRelationship (spec.snapshotSchedules): for each label, a
// ReplicatedSnapshot of the group every interval and the older ones past retention deleted
// (their own finalizer removes them from the agents). Keyed by relationship; it looks again
// when the next slot starts, or when one of its snapshots changes (e.g. becomes ready).
import type * as k8s from '@kubernetes/client-node';
import { GROUP, VERSION, apiErrorMessage, isAlreadyExists, isNotFound } from '../../../lib/kube';
import type { Logger } from '../../../lib/logger';
import type { ReplicatedSnapshot, SyncRelationship } from '../api/types';
import type { SupervisedInformer } from '../informers/supervised-informer';
import { scheduleStep, scheduledBy } from '../resolve/snapshot-schedule';
import type { EventRecorder } from '../status/event-recorder';
import type { ReconcileResult } from '../workqueue/controller-loop';

const PLURAL = 'replicatedsnapshots';

export interface ScheduleDeps {
  relationships: SupervisedInformer<SyncRelationship>;
  snapshots: SupervisedInformer<ReplicatedSnapshot>;
  objects: k8s.CustomObjectsApi;
  events: EventRecorder;
  log: Logger;
}

export class SnapshotScheduleReconciler {
  constructor(private readonly deps: ScheduleDeps) {}

  async reconcile(key: string): Promise<ReconcileResult> {
    const [namespace, name] = key.split('/') as [string, string];
    const rel = this.deps.relationships.get(name, namespace);
    const schedules = rel?.spec.snapshotSchedules ?? [];
    if (!rel || rel.metadata.deletionTimestamp || schedules.length === 0) return;
    const now = new Date();
    const all = this.deps.snapshots.list(namespace);
    let next = Infinity;
    for (const schedule of schedules) {
      const step = scheduleStep(rel, schedule, scheduledBy(rel, schedule, all), now);
      if (step.create) await this.create(rel, step.create);
      for (const old of step.prune) await this.delete(namespace, old);
      next = Math.min(next, step.nextAt.getTime());
    }
    return { requeueAfterMs: Math.max(0, next - Date.now()) };
  }

  private async create(rel: SyncRelationship, snap: ReplicatedSnapshot): Promise<void> {
    try {
      await this.deps.objects.createNamespacedCustomObject({
        group: GROUP,
        version: VERSION,
        namespace: rel.metadata.namespace ?? '',
        plural: PLURAL,
        body: snap,
      });
    } catch (err) {
      if (isAlreadyExists(err)) return; // this slot's, created by an earlier pass
      throw new Error(`creating ${snap.metadata.name}: ${apiErrorMessage(err)}`, { cause: err });
    }
    this.deps.log.info(
      { relationship: rel.metadata.name, snapshot: snap.metadata.name },
      'scheduled snapshot',
    );
    await this.deps.events.record(
      rel,
      'Normal',
      'SnapshotScheduled',
      `ReplicatedSnapshot ${snap.metadata.name} (label ${snap.spec.label ?? ''})`,
    );
  }

  private async delete(namespace: string, name: string): Promise<void> {
    try {
      await this.deps.objects.deleteNamespacedCustomObject({
        group: GROUP,
        version: VERSION,
        namespace,
        plural: PLURAL,
        name,
      });
      this.deps.log.info({ namespace, snapshot: name }, 'snapshot past retention deleted');
    } catch (err) {
      if (!isNotFound(err)) {
        throw new Error(`deleting ${name}: ${apiErrorMessage(err)}`, { cause: err });
      }
    }
  }
}
