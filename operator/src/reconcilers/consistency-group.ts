// The ConsistencyGroup reconciler: reports whether every volume of the group can be served
// (PVC bound to a node-local PV), so a user sees what is missing before any replication.
import type * as k8s from '@kubernetes/client-node';
import type { ConsistencyGroup } from '../api/types';
import type { SupervisedInformer } from '../informers/supervised-informer';
import { groupVolumes, locate, type Lookup } from '../resolve/group-volumes';
import { mergeConditions, type DesiredCondition } from '../status/conditions';
import { writeStatusIfChanged } from '../status/status-writer';
import type { ReconcileResult } from '../workqueue/controller-loop';

export interface GroupDeps {
  groups: SupervisedInformer<ConsistencyGroup>;
  lookup: Lookup;
  objects: k8s.CustomObjectsApi;
}

export class ConsistencyGroupReconciler {
  constructor(private readonly deps: GroupDeps) {}

  async reconcile(key: string): Promise<ReconcileResult> {
    const [namespace, name] = key.split('/') as [string, string];
    const group = this.deps.groups.get(name, namespace);
    if (!group) return;
    const volumes = groupVolumes(group, this.deps.lookup);
    const problems = volumes.flatMap((v) => {
      const where = locate(namespace, v.pvc, this.deps.lookup);
      return where.ok ? [] : [where];
    });
    const desired: DesiredCondition =
      volumes.length === 0
        ? {
            type: 'Ready',
            status: 'False',
            reason: 'NoVolumes',
            message: 'the group selects no PVCs',
          }
        : problems.length > 0
          ? {
              type: 'Ready',
              status: 'False',
              reason: problems[0]?.reason ?? 'Unknown',
              message: problems.map((p) => p.message).join('; '),
            }
          : {
              type: 'Ready',
              status: 'True',
              reason: 'VolumesBound',
              message: `${volumes.length} volume(s) on node-local PVs`,
            };
    const gen = group.metadata.generation ?? 0;
    const status = {
      observedGeneration: gen,
      phase: desired.status === 'True' ? 'Ready' : 'Pending',
      conditions: mergeConditions(group.status?.conditions, [desired], gen, new Date()),
    };
    await writeStatusIfChanged(this.deps.objects, 'consistencygroups', group, status);
  }
}
