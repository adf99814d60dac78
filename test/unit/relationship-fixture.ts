// The SyncRelationship the operator's unit tests reason about: group g in namespace ns,
// replicated in sync mode from node a to node b, with the source as primary.
import type { SyncRelationship } from '../../operator/src/api/types';

export function syncRelationship(
  metadata: Partial<SyncRelationship['metadata']> = {},
  status?: SyncRelationship['status'],
): SyncRelationship {
  return {
    apiVersion: 'lockstep.dev/v1alpha1',
    kind: 'SyncRelationship',
    metadata: { name: 'r', namespace: 'ns', ...metadata },
    spec: {
      consistencyGroup: 'g',
      mode: 'Sync',
      source: { node: 'a' },
      targets: [{ node: 'b' }],
      primary: 'source',
    },
    ...(status ? { status } : {}),
  };
}
