// TypeScript shapes of the lockstep.dev/v1alpha1 objects, as the CRDs in crds.ts define them
// (after the apiserver applied defaults).
import type { KubernetesObject, V1ObjectMeta } from '@kubernetes/client-node';

export interface Condition {
  type: string;
  status: 'True' | 'False' | 'Unknown';
  observedGeneration?: number;
  lastTransitionTime: string;
  reason: string;
  message: string;
}

interface Resource<Spec, Status> extends KubernetesObject {
  metadata: V1ObjectMeta & { name: string };
  spec: Spec;
  status?: Status;
}

export interface GroupVolume {
  name: string;
  pvc: string;
  file: string;
}

export type ConsistencyGroup = Resource<
  {
    volumes?: GroupVolume[];
    pvcSelector?: { matchLabels: Record<string, string>; file: string };
  },
  { observedGeneration?: number; phase?: string; conditions?: Condition[] }
>;

export type SyncMode = 'Sync' | 'StrictSync' | 'Async';

export interface Target {
  node?: string;
  endpoint?: string;
  tlsSecretRef?: string;
  pvc?: string;
}

export type RelationshipPhase =
  'Pending' | 'Baselining' | 'InSync' | 'Resyncing' | 'Degraded' | 'SplitBrain' | 'Failed';

export interface SyncRelationshipStatus {
  observedGeneration?: number;
  phase?: RelationshipPhase;
  progression?: string;
  primaryNode?: string;
  dirtyBytes?: number;
  baseline?: { doneBytes: number; totalBytes: number; etaSeconds: number };
  lastInSyncTime?: string;
  conditions?: Condition[];
}

export type SyncRelationship = Resource<
  {
    consistencyGroup: string;
    mode: SyncMode;
    source: { node: string };
    targets: Target[];
    primary: string;
    resync?: { maxBytesPerSecond?: number; regionSize?: number };
    failover?: { policy?: 'Manual' | 'Automatic' };
    deleteDataOnRemoval?: boolean;
  },
  SyncRelationshipStatus
>;

export type LockstepNode = Resource<
  { endpoint: string; version?: string; capacityBytes?: number },
  { conditions?: Condition[] }
>;
