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

export interface FailoverSpec {
  policy?: 'Manual' | 'Automatic';
  mediator?: string;
  grace?: string;
  suspendLimit?: string;
}

export interface LastFailover {
  fromNode: string;
  toNode: string;
  epoch: number;
  startTime: string;
  durationSeconds?: number;
  reason: string;
}

/**
 * A person's choice after a split brain: the node whose diverging writes are thrown away (its
 * copies are overwritten from the primary's). The operator acts on it once and removes it.
 */
export const DISCARD_ANNOTATION = 'lockstep.dev/discard-diverged';

/** The annotation the failover monitor writes with spec.primary: a LastFailover, as JSON. */
export const FAILOVER_ANNOTATION = 'lockstep.dev/failover';

export interface FailoverStatus {
  mediator: string;
  epoch: number;
  exports: { volume: string; uri: string }[];
  primaryLostSeconds?: number;
  lastFailover?: LastFailover;
  /** When a copy now primary was promoted with --force (by a person, outside the operator). */
  lastForcedPromotion?: { node: string; epoch: number; time: string };
}

export const RELATIONSHIP_PHASES = [
  'Pending',
  'Baselining',
  'InSync',
  'Resyncing',
  'Degraded',
  'SplitBrain',
  'Failed',
] as const;
export type RelationshipPhase = (typeof RELATIONSHIP_PHASES)[number];

export interface SyncRelationshipStatus {
  observedGeneration?: number;
  phase?: RelationshipPhase;
  progression?: string;
  primaryNode?: string;
  dirtyBytes?: number;
  baseline?: { doneBytes: number; totalBytes: number; etaSeconds: number };
  lastInSyncTime?: string;
  copies?: CopyStatus[];
  lastConsistentSnapshots?: ConsistentSnapshot[];
  move?: MoveStatus;
  failover?: FailoverStatus;
  conditions?: Condition[];
}

export interface CopyStatus {
  node: string;
  state: string;
  dirtyBytes: number;
  doneBytes?: number;
  totalBytes?: number;
  etaSeconds?: number;
}

export interface ConsistentSnapshot {
  node: string;
  volume: string;
  snapshot: string;
  time: string;
}

export interface MoveStatus {
  fromNode: string;
  toNode: string;
  phase: 'Establishing' | 'Repointing';
  startTime: string;
  doneBytes: number;
  totalBytes: number;
  etaSeconds: number;
}

export interface SnapshotSchedule {
  label: string;
  intervalMinutes: number;
  keep: number;
  verify?: boolean;
}

export type SyncRelationship = Resource<
  {
    consistencyGroup: string;
    mode: SyncMode;
    source: { node: string };
    targets: Target[];
    primary: string;
    resync?: { maxBytesPerSecond?: number; regionSize?: number };
    failover?: FailoverSpec;
    deleteDataOnRemoval?: boolean;
    snapshotSchedules?: SnapshotSchedule[];
  },
  SyncRelationshipStatus
>;

export type LockstepNode = Resource<
  { endpoint: string; version?: string; capacityBytes?: number },
  { conditions?: Condition[] }
>;

export type SnapshotPhase = 'Pending' | 'Ready' | 'Degraded';
export type CopyState = 'Pending' | 'Taken' | 'Missing';
export type CopyVerificationState = 'Identical' | 'Differs' | 'Missing';
export type VerificationResult = 'Identical' | 'Differs' | 'Incomplete';

export interface SnapshotCopyStatus {
  node: string;
  state: CopyState;
  reason?: string;
  verification?: CopyVerificationState;
  differingRegions?: number;
}

export interface SnapshotVolumeStatus {
  name: string;
  persistentVolumeClaimName: string;
  volumeHandle: string;
  snapshotHandle: string;
  sizeBytes: number;
  copies: SnapshotCopyStatus[];
}

export interface ReplicatedSnapshotStatus {
  observedGeneration?: number;
  phase?: SnapshotPhase;
  snapshotID?: string;
  readyToUse?: boolean;
  creationTime?: string;
  consistencyGroup?: string;
  primaryNode?: string;
  restoreSizeBytes?: number;
  holdMs?: number;
  copiesTaken?: string;
  volumes?: SnapshotVolumeStatus[];
  verification?: {
    /** The spec generation it was run for: turning verify off and on again runs it again. */
    generation: number;
    result: VerificationResult;
    completionTime: string;
    regionSize: number;
    differingRegions: number;
    message: string;
  };
  conditions?: Condition[];
}

export type ReplicatedSnapshot = Resource<
  {
    source: { consistencyGroup?: string; persistentVolumeClaimName?: string };
    label?: string;
    verify?: boolean;
  },
  ReplicatedSnapshotStatus
>;
