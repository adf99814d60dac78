// The lockstep.dev/v1alpha1 API: one source of truth for the CustomResourceDefinitions that
// `npm run gen:crds` writes to deploy/crds/ (and that the tests apply to a real apiserver).
// Validation lives in the schema and in CEL rules, so bad specs are refused by the apiserver
// with a message, before any controller sees them.
import { arr, bool, conditions, int, num, obj, rule, str, type Schema } from './schema';

export const GROUP = 'lockstep.dev';
export const VERSION = 'v1alpha1';

const DNS_LABEL = '^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$';
/** A snapshot label, as the agents accept it (the same rule as their snapshot names). */
const SNAPSHOT_LABEL = '^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$';
const HOST_PORT = '^[A-Za-z0-9.:\\[\\]-]+:[0-9]{1,5}$';
/** Durations as lib/duration.ts reads them: 500ms, 5s, 1m30s. */
const DURATION = '^([0-9]+(ms|s|m|h))+$';

interface Kind {
  kind: string;
  plural: string;
  singular: string;
  shortNames: string[];
  scope: 'Namespaced' | 'Cluster';
  spec: Schema;
  status: Schema;
  printerColumns: Array<{ name: string; type: string; jsonPath: string; description?: string }>;
}

const consistencyGroup: Kind = {
  kind: 'ConsistencyGroup',
  plural: 'consistencygroups',
  singular: 'consistencygroup',
  shortNames: ['lcg'],
  scope: 'Namespaced',
  spec: obj(
    'Volumes that must stay write-order consistent together: listed by PVC, or selected by PVC labels.',
    {
      volumes: arr(
        'The volumes, each a block file inside a PVC.',
        obj(
          'One volume.',
          {
            name: str('Name of the volume within the group (used for the agent volume).', {
              pattern: DNS_LABEL,
            }),
            pvc: str('PersistentVolumeClaim in the same namespace.', { pattern: DNS_LABEL }),
            file: str('Path of the block file inside the PVC.', {
              default: 'disk.img',
              minLength: 1,
              maxLength: 255,
            }),
          },
          {
            required: ['name', 'pvc'],
            'x-kubernetes-validations': [
              rule(
                "!self.file.contains('..') && !self.file.startsWith('/')",
                'file must be a relative path inside the PVC',
              ),
            ],
          },
        ),
        {
          minItems: 1,
          maxItems: 64,
          'x-kubernetes-list-type': 'map',
          'x-kubernetes-list-map-keys': ['name'],
        },
      ),
      pvcSelector: obj(
        'Select PVCs by label instead of listing them; each selected PVC contributes `file`.',
        {
          matchLabels: {
            type: 'object',
            additionalProperties: { type: 'string' },
            description: 'Labels the PVCs must carry.',
          },
          file: str('Path of the block file inside each PVC.', { default: 'disk.img' }),
        },
        { required: ['matchLabels'] },
      ),
    },
    {
      'x-kubernetes-validations': [
        rule(
          'has(self.volumes) != has(self.pvcSelector)',
          'set exactly one of volumes or pvcSelector',
        ),
      ],
    },
  ),
  status: obj('Observed state.', {
    observedGeneration: int('Spec generation last acted on.'),
    phase: str('Pending, Ready or Failed.'),
    conditions,
  }),
  printerColumns: [
    { name: 'Phase', type: 'string', jsonPath: '.status.phase' },
    { name: 'Age', type: 'date', jsonPath: '.metadata.creationTimestamp' },
  ],
};

const target = obj(
  'Where a replica lives: a node of this cluster, or an agent in another cluster.',
  {
    node: str('A node of this cluster (its agent holds the replica).', {
      pattern: '^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$',
    }),
    endpoint: str('HOST:PORT of an agent in another cluster.', { pattern: HOST_PORT }),
    tlsSecretRef: str(
      'Secret in this namespace for a remote endpoint: ca.crt (the other cluster’s Lockstep CA), ' +
        'tls.crt and tls.key (a certificate that CA issued for this cluster, e.g. with ' +
        '`lockstep certs issue --peer-cluster NAME`).',
      {
        pattern: DNS_LABEL,
      },
    ),
    pvc: str(
      'Optional PVC on the target node to hold the replica files (otherwise the agent data dir).',
      { pattern: DNS_LABEL },
    ),
  },
  {
    'x-kubernetes-validations': [
      rule(
        'has(self.node) != has(self.endpoint)',
        'a target is either a node or a remote endpoint, not both',
      ),
      rule(
        '!has(self.endpoint) || has(self.tlsSecretRef)',
        'a remote endpoint needs tlsSecretRef (mTLS)',
      ),
    ],
  },
);

const syncRelationship: Kind = {
  kind: 'SyncRelationship',
  plural: 'syncrelationships',
  singular: 'syncrelationship',
  shortNames: ['lsr'],
  scope: 'Namespaced',
  spec: obj(
    'Replicate a consistency group from a source node to one or more targets.',
    {
      consistencyGroup: str('The ConsistencyGroup to replicate (same namespace).', {
        pattern: DNS_LABEL,
      }),
      mode: str(
        'Sync: acknowledged on every in-sync copy, a lost peer is tracked and resynced. StrictSync: a write that cannot reach every replica fails. Async: bounded lag.',
        {
          enum: ['Sync', 'StrictSync', 'Async'],
          default: 'Sync',
        },
      ),
      source: obj(
        'The node that serves the primary copies: at first the node of the group’s PVCs. ' +
          'Changing it moves the primary while the workload runs: a copy is established on the ' +
          'new node by snapshots (kept in its agent’s data dir), the primary is handed over, and ' +
          'the targets resync from the switchover’s snapshot (see status.move).',
        { node: str('Node name.', { minLength: 1 }) },
        { required: ['node'] },
      ),
      targets: arr('Replica locations.', target, { minItems: 1, maxItems: 4 }),
      primary: str(
        'Which side serves writes: "source", or the node of a target (a planned switchover).',
        { default: 'source', minLength: 1 },
      ),
      resync: obj('Resync and baseline limits.', {
        maxBytesPerSecond: int('Bandwidth cap for resync (0: unlimited).', {
          minimum: 0,
          default: 0,
        }),
        regionSize: int('Dirty-tracking granularity in bytes.', {
          enum: [4096, 16384, 65536, 262144, 1048576],
          default: 65536,
        }),
      }),
      failover: obj(
        'Split brain protection and what happens when the primary is lost. With a mediator, ' +
          'a primary that loses a replica continues only once the mediator grants it a new ' +
          'epoch, and every copy refuses writes of older epochs.',
        {
          policy: str(
            'Manual: the operator reports a lost primary and waits (set spec.primary, or ' +
              '`lockstep ctl failover`). Automatic: once the primary has been lost for the grace ' +
              'period, the operator asks the mediator to make an in-sync replica primary and ' +
              'writes it to spec.primary.',
            { enum: ['Manual', 'Automatic'], default: 'Manual' },
          ),
          mediator: str('HOST:PORT of a `lockstep mediator` in a third failure domain.', {
            pattern: HOST_PORT,
          }),
          grace: str('How long the primary must be lost before a failover (e.g. 5s).', {
            pattern: DURATION,
            default: '5s',
          }),
          suspendLimit: str(
            'How long a primary that lost a replica and cannot reach the mediator holds writes ' +
              'before failing them (e.g. 30s).',
            { pattern: DURATION, default: '30s' },
          ),
        },
      ),
      deleteDataOnRemoval: bool(
        'Delete replica files when the relationship is deleted (default: keep them).',
      ),
      snapshotSchedules: arr(
        'ReplicatedSnapshots of the group taken on a schedule, with retention per label.',
        obj(
          'One schedule: a snapshot every interval, aligned to the clock (UTC), the newest `keep` ready ones kept.',
          {
            label: str('The snapshots’ label; one schedule per label.', {
              pattern: SNAPSHOT_LABEL,
              maxLength: 63,
            }),
            intervalMinutes: int('Minutes between snapshots (60: on the hour, 1440: daily).', {
              minimum: 1,
              maximum: 525600,
            }),
            keep: int('How many ready snapshots of this label to keep; older ones are deleted.', {
              minimum: 1,
              maximum: 1000,
            }),
            verify: bool('Verify each snapshot’s copies once taken.'),
          },
          { required: ['label', 'intervalMinutes', 'keep'] },
        ),
        { maxItems: 8, 'x-kubernetes-list-type': 'map', 'x-kubernetes-list-map-keys': ['label'] },
      ),
    },
    {
      required: ['consistencyGroup', 'source', 'targets'],
      'x-kubernetes-validations': [
        rule(
          'self.consistencyGroup == oldSelf.consistencyGroup',
          'consistencyGroup is immutable; create a new relationship',
        ),
        rule(
          "self.primary == 'source' || self.targets.exists(t, has(t.node) && t.node == self.primary)",
          'primary must be "source" or the node of one of the targets',
        ),
        rule(
          "self.mode != 'StrictSync' || self.targets.all(t, has(t.node))",
          'StrictSync needs every target in this cluster: a remote endpoint can only be Sync or Async',
        ),
        rule(
          'self.targets.all(t, !has(t.node) || t.node != self.source.node)',
          'a target cannot be the source node',
        ),
        rule(
          "!has(self.failover) || self.failover.policy != 'Automatic' || has(self.failover.mediator)",
          'failover.policy Automatic needs failover.mediator: without one a lost primary cannot be told from a cut link',
        ),
      ],
    },
  ),
  status: obj('Observed state, for people and for alerts.', {
    observedGeneration: int('Spec generation last acted on.'),
    phase: str('Pending, Baselining, InSync, Resyncing, Degraded, SplitBrain or Failed.'),
    progression: str(
      'The step under way, e.g. CreatingReplicas; Baseline, Incremental, CuttingOver (a replica ' +
        'being established: a snapshot, diffs between snapshots, the live cutover); InSync; ' +
        'SwitchingPrimary.',
    ),
    primaryNode: str('Node currently serving writes.'),
    dirtyBytes: int('Bytes the replicas are known to miss, summed over peers.'),
    baseline: obj('Baseline progress.', {
      doneBytes: int('Bytes done.'),
      totalBytes: int('Bytes to do.'),
      etaSeconds: int('Estimated seconds left; -1 unknown.'),
    }),
    lastInSyncTime: str('When every replica was last in sync.', { format: 'date-time' }),
    copies: arr(
      'Each replica as its primary sees it, over the group’s volumes: the furthest behind ' +
        'volume’s state, the bytes missing, and the progress of what it is catching up.',
      obj('One replica node.', {
        node: str('The replica’s node (or endpoint, for one in another cluster).'),
        state: str(
          'InSync, Resyncing, Baselining, Connecting, OutOfSync, Disconnected or SplitBrain.',
        ),
        dirtyBytes: int('Bytes it is known to miss, over its volumes.'),
        doneBytes: int('Of the resync or establishment under way: bytes sent.'),
        totalBytes: int('Of the resync or establishment under way: bytes to send.'),
        etaSeconds: int('Estimated seconds until it is in sync; -1 unknown.'),
      }),
    ),
    lastConsistentSnapshots: arr(
      'Replica volumes not in sync, each with the snapshot of its last consistent state (taken ' +
        'before a resync began overwriting it, or the last committed round of its ' +
        'establishment): promoting that replica rolls it back there.',
      obj('One replica volume.', {
        node: str('The replica’s node.'),
        volume: str('The group’s volume.'),
        snapshot: str('The snapshot on the replica.'),
        time: str('When it was taken.', { format: 'date-time' }),
      }),
    ),
    failover: obj('Split brain protection: the epoch, and the last failover.', {
      mediator: str('The mediator; empty: split brain protection is off.'),
      epoch: int('The epoch the primary writes in (every promotion starts a new one).'),
      exports: arr(
        'Where the workload must connect: each volume’s NBD export on the primary. After a ' +
          'failover, restart the workload against them.',
        obj('One volume’s export.', { volume: str('The group’s volume.'), uri: str('NBD URI.') }),
      ),
      primaryLostSeconds: int('While the primary is lost: for how long, as its replicas see it.'),
      lastForcedPromotion: obj(
        'The last `promote --force` of the copy now primary (made outside the operator: it may ' +
          'have cost acknowledged writes, and a copy that wrote meanwhile shows as a split brain).',
        {
          node: str('The node promoted.'),
          epoch: int('The epoch it took.'),
          time: str('When.', { format: 'date-time' }),
        },
      ),
      lastFailover: obj('The last failover the operator made.', {
        fromNode: str('The primary that was lost.'),
        toNode: str('The replica made primary.'),
        epoch: int('The epoch the mediator granted it.'),
        startTime: str('When the operator asked the mediator.', { format: 'date-time' }),
        durationSeconds: num('From the request to the new primary accepting writes.'),
        reason: str('Why: what the operator saw.'),
      }),
    }),
    move: obj('A move of the primary to a new source node, while it is under way.', {
      fromNode: str('The node that was primary when the move began.'),
      toNode: str('The new source node.'),
      phase: str(
        'Establishing (a copy on the new node, by snapshots, while writes go on) or Repointing ' +
          '(the new primary resyncs the targets from the switchover’s snapshot).',
      ),
      startTime: str('When the move began.', { format: 'date-time' }),
      doneBytes: int('Bytes copied in this phase.'),
      totalBytes: int('Bytes to copy in this phase.'),
      etaSeconds: int('Estimated seconds left in this phase; -1 unknown.'),
    }),
    conditions,
  }),
  printerColumns: [
    { name: 'Phase', type: 'string', jsonPath: '.status.phase' },
    { name: 'Mode', type: 'string', jsonPath: '.spec.mode' },
    { name: 'Primary', type: 'string', jsonPath: '.status.primaryNode' },
    { name: 'Dirty', type: 'integer', jsonPath: '.status.dirtyBytes' },
    { name: 'Age', type: 'date', jsonPath: '.metadata.creationTimestamp' },
  ],
};

const snapshotCopy = obj(
  'One copy of a volume’s snapshot: on the primary or on a replica.',
  {
    node: str('The node whose agent holds the copy.'),
    state: str(
      'Pending (not taken yet), Taken, or Missing (then `reason` says why: out of sync, unreachable...).',
      { enum: ['Pending', 'Taken', 'Missing'] },
    ),
    reason: str('Why the copy is missing.'),
    verification: str('Identical, Differs or Missing, compared with the primary’s copy.', {
      enum: ['Identical', 'Differs', 'Missing'],
    }),
    differingRegions: int('Regions whose contents differ from the primary’s copy.'),
  },
  { required: ['node', 'state'] },
);

const replicatedSnapshot: Kind = {
  kind: 'ReplicatedSnapshot',
  plural: 'replicatedsnapshots',
  singular: 'replicatedsnapshot',
  shortNames: ['lrs'],
  scope: 'Namespaced',
  spec: obj(
    'A snapshot taken on every copy of replicated volumes at one write-order point.',
    {
      source: obj(
        'What to snapshot: every volume of a ConsistencyGroup (crash-consistent across them), or the one volume on a PVC. Its SyncRelationship must replicate it.',
        {
          consistencyGroup: str('A ConsistencyGroup in the same namespace.', {
            pattern: DNS_LABEL,
          }),
          persistentVolumeClaimName: str(
            'A PVC in the same namespace that is a volume of a replicated ConsistencyGroup.',
            { pattern: DNS_LABEL },
          ),
        },
        {
          'x-kubernetes-validations': [
            rule(
              'has(self.consistencyGroup) != has(self.persistentVolumeClaimName)',
              'set exactly one of source.consistencyGroup or source.persistentVolumeClaimName',
            ),
          ],
        },
      ),
      label: str(
        'A label carried by the snapshot on every copy (e.g. hourly, pre-upgrade): 1-63 lowercase letters, digits, "-", "_", ".", starting and ending with a letter or digit.',
        { pattern: SNAPSHOT_LABEL, maxLength: 63 },
      ),
      verify: bool(
        'Once taken, compare the copies’ per-region hashes and report the result in status.verification.',
      ),
    },
    {
      required: ['source'],
      'x-kubernetes-validations': [
        rule('self.source == oldSelf.source', 'source is immutable; create a new snapshot'),
        rule(
          "(has(self.label) ? self.label : '') == (has(oldSelf.label) ? oldSelf.label : '')",
          'label is immutable; create a new snapshot',
        ),
      ],
    },
  ),
  status: obj('Observed state; the fields a CSI snapshot layer reads are stable once set.', {
    observedGeneration: int('Spec generation last acted on.'),
    phase: str(
      'Pending (waiting for prerequisites), Ready (on every copy), Degraded (taken, some copy missing).',
    ),
    snapshotID: str(
      'The name of the snapshot on every copy of every volume; derived from the object’s uid, never reused.',
    ),
    readyToUse: bool('True once the snapshot is cut on the primary copy of every volume.'),
    creationTime: str('The write-order point: when the snapshot was cut on the primary.', {
      format: 'date-time',
    }),
    consistencyGroup: str('The ConsistencyGroup the source resolved to.'),
    primaryNode: str('The node whose agent took the snapshot (the primary at that time).'),
    restoreSizeBytes: int('Bytes needed to restore it: the sum of the volumes’ sizes.'),
    holdMs: num('How long writes were held (or their acknowledgements delayed) for the cut.'),
    copiesTaken: str('Copies holding every volume’s snapshot, of all copies, e.g. 2/2.'),
    volumes: arr(
      'Per volume: where its snapshot lives and the state of each copy.',
      obj(
        'One volume’s snapshot.',
        {
          name: str('The volume within the ConsistencyGroup.'),
          persistentVolumeClaimName: str('The source PVC.'),
          volumeHandle: str('The volume on the agents (<namespace>.<group>.<volume>).'),
          snapshotHandle: str(
            'The snapshot on the agents, VOLUME@SNAPSHOT: also its read-only NBD export on each copy.',
          ),
          sizeBytes: int('The volume’s size.'),
          copies: arr('Each copy of this volume’s snapshot.', snapshotCopy, {
            'x-kubernetes-list-type': 'map',
            'x-kubernetes-list-map-keys': ['node'],
          }),
        },
        { required: ['name', 'volumeHandle', 'snapshotHandle', 'copies'] },
      ),
      { 'x-kubernetes-list-type': 'map', 'x-kubernetes-list-map-keys': ['name'] },
    ),
    verification: obj('The result of comparing the copies (spec.verify).', {
      generation: int(
        'The spec generation it was run for; turning verify off and on again runs it again.',
      ),
      result: str('Identical, Differs, or Incomplete (a copy was missing or unreachable).', {
        enum: ['Identical', 'Differs', 'Incomplete'],
      }),
      completionTime: str('When the comparison finished.', { format: 'date-time' }),
      regionSize: int('Bytes per compared region.'),
      differingRegions: int('Regions that differ, summed over volumes and copies.'),
      message: str('What differs or what was missing.'),
    }),
    conditions,
  }),
  printerColumns: [
    { name: 'Ready', type: 'boolean', jsonPath: '.status.readyToUse' },
    { name: 'Phase', type: 'string', jsonPath: '.status.phase' },
    { name: 'Group', type: 'string', jsonPath: '.status.consistencyGroup' },
    { name: 'Label', type: 'string', jsonPath: '.spec.label' },
    { name: 'Copies', type: 'string', jsonPath: '.status.copiesTaken' },
    { name: 'Verified', type: 'string', jsonPath: '.status.verification.result' },
    { name: 'Created', type: 'date', jsonPath: '.status.creationTime' },
    { name: 'Age', type: 'date', jsonPath: '.metadata.creationTimestamp' },
  ],
};

const lockstepNode: Kind = {
  kind: 'LockstepNode',
  plural: 'lockstepnodes',
  singular: 'lockstepnode',
  shortNames: ['lsn'],
  scope: 'Cluster',
  spec: obj(
    'An agent’s registration; its heartbeat is a coordination Lease of the same name.',
    {
      endpoint: str('HOST:PORT of the agent’s gRPC API.', { pattern: HOST_PORT }),
      version: str('Agent version.'),
      capacityBytes: int('Bytes available for volumes.', { minimum: 0 }),
    },
    { required: ['endpoint'] },
  ),
  status: obj('Observed state.', { conditions }),
  printerColumns: [
    { name: 'Endpoint', type: 'string', jsonPath: '.spec.endpoint' },
    { name: 'Version', type: 'string', jsonPath: '.spec.version' },
    { name: 'Ready', type: 'string', jsonPath: ".status.conditions[?(@.type=='Ready')].status" },
    { name: 'Age', type: 'date', jsonPath: '.metadata.creationTimestamp' },
  ],
};

export const KINDS: readonly Kind[] = [
  consistencyGroup,
  syncRelationship,
  replicatedSnapshot,
  lockstepNode,
];

export function customResourceDefinition(k: Kind): Record<string, unknown> {
  return {
    apiVersion: 'apiextensions.k8s.io/v1',
    kind: 'CustomResourceDefinition',
    metadata: { name: `${k.plural}.${GROUP}` },
    spec: {
      group: GROUP,
      scope: k.scope,
      names: {
        kind: k.kind,
        plural: k.plural,
        singular: k.singular,
        shortNames: k.shortNames,
        categories: ['lockstep'],
      },
      versions: [
        {
          name: VERSION,
          served: true,
          storage: true,
          subresources: { status: {} },
          additionalPrinterColumns: k.printerColumns,
          schema: {
            openAPIV3Schema: {
              type: 'object',
              description: `${k.kind} (${GROUP}/${VERSION}).`,
              properties: {
                apiVersion: { type: 'string' },
                kind: { type: 'string' },
                metadata: { type: 'object' },
                spec: k.spec,
                status: k.status,
              },
              required: ['spec'],
            },
          },
        },
      ],
    },
  };
}
