// The operator end to end on a real control plane (etcd, kube-apiserver, the PV controller):
// agents as separate processes standing in for two nodes, local PVs in temp dirs bound through
// the real PV controller, operator replicas running with the ServiceAccount tokens of
// deploy/rbac. A SyncRelationship walks through baseline to InSync; losing the replica shows
// as Degraded with an Event; ReplicatedSnapshots of the group and of one volume are taken on
// both copies, verified, and deleted on both with their objects (one taken while the replica
// is down shows the missing copy), and on a schedule with retention; the standby operator
// takes over; at rest the operator writes nothing; deleting the relationship stops
// replication and keeps the files.
import { existsSync, mkdtempSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { AgentProcess } from '../harness/agent-process';
import {
  fioVerify,
  run as runTool,
  startAckWriter,
  verifyAckedWrites,
} from '../harness/agent-process';
import { ackedCount } from '../harness/follow-writer';
import { MediatorProcess } from '../harness/mediator-process';
import { shardOf } from '../../operator/src/leader/shard-leases';
import { RELATIONSHIP_PHASES } from '../../operator/src/api/types';
import {
  NAMESPACE,
  OperatorProcess,
  adminKubeconfig,
  apply,
  clusterAgent,
  getJson,
  installLockstep,
  localPv,
  nodeDisk,
  oneVolumeGroup,
  pvc,
  removeDir,
  serviceAccountKubeconfig,
  syncRelationship,
  waitBound,
} from '../harness/cluster';
import { kubectl } from '../harness/control-plane';
import { parseSamples, promtool, samplesOf } from '../harness/promtool';
import { waitFor } from '../harness/processes';
import { expectSameImages } from '../harness/replication';

const MiB = 1024 * 1024;
const NS = 'shop';
const OPERATOR_USER = `system:serviceaccount:${NAMESPACE}:lockstep-operator`;
const AGENT_USER = `system:serviceaccount:${NAMESPACE}:lockstep-agent`;

interface Condition {
  type: string;
  status: string;
  reason: string;
  message: string;
  observedGeneration: number;
}
interface RelationshipJson {
  metadata: { finalizers?: string[]; generation: number; annotations?: Record<string, string> };
  spec: { primary: string };
  status?: {
    phase?: string;
    progression?: string;
    primaryNode?: string;
    dirtyBytes?: number;
    baseline?: { doneBytes: number; totalBytes: number; etaSeconds: number };
    lastInSyncTime?: string;
    observedGeneration?: number;
    move?: { fromNode: string; toNode: string; phase: string; totalBytes: number };
    failover?: {
      mediator: string;
      epoch: number;
      exports: Array<{ volume: string; uri: string }>;
      lastForcedPromotion?: { node: string; epoch: number; time: string };
      lastFailover?: {
        fromNode: string;
        toNode: string;
        epoch: number;
        startTime: string;
        durationSeconds?: number;
        reason: string;
      };
    };
    conditions?: Condition[];
  };
}
interface SnapshotJson {
  metadata: { uid: string; generation: number; finalizers?: string[] };
  status?: {
    observedGeneration?: number;
    phase?: string;
    snapshotID?: string;
    readyToUse?: boolean;
    creationTime?: string;
    consistencyGroup?: string;
    primaryNode?: string;
    restoreSizeBytes?: number;
    copiesTaken?: string;
    volumes?: Array<{
      name: string;
      persistentVolumeClaimName: string;
      volumeHandle: string;
      snapshotHandle: string;
      sizeBytes: number;
      copies: Array<{ node: string; state: string; verification?: string }>;
    }>;
    verification?: { result: string; regionSize: number; differingRegions: number };
    conditions?: Condition[];
  };
}
interface AuditEvent {
  verb: string;
  stage: string;
  user: { username: string };
  objectRef?: { resource?: string; subresource?: string; name?: string; namespace?: string };
}

const relationship = (name: string): RelationshipJson => getJson('lsr', name, '-n', NS);
const snapshot = (name: string): SnapshotJson => getJson('lrs', name, '-n', NS);
const replicatedSnapshot = (name: string, spec: object) => ({
  apiVersion: 'lockstep.dev/v1alpha1',
  kind: 'ReplicatedSnapshot',
  metadata: { name, namespace: NS },
  spec,
});
const condition = (r: RelationshipJson, type: string) =>
  r.status?.conditions?.find((c) => c.type === type);

/**
 * A ConsistencyGroup `group` of one volume (`data`, on PVC `pvc`) and a SyncRelationship
 * `<group>-sync` of it from node-a to node-b, with `spec` on top; returns the relationship.
 */
function oneVolumeRelationship(group: string, pvc: string, spec: object = {}) {
  apply(oneVolumeGroup(group, NS, pvc));
  const rel = syncRelationship(`${group}-sync`, NS, group, 'k8s-node-a', ['k8s-node-b'], spec);
  apply(rel);
  return rel;
}

function patterned(file: string, sizeBytes: number, dataBytes: number, seed: number): void {
  const buf = Buffer.alloc(sizeBytes);
  for (let i = 0; i < dataBytes; i += 4) buf.writeUInt32LE((i * 2654435761 + seed) >>> 0, i);
  writeFileSync(file, buf);
}

function eventsOf(name: string): Array<{ type: string; reason: string; message: string }> {
  const list = getJson<{ items: Array<{ type: string; reason: string; message: string }> }>(
    'events',
    '-n',
    NS,
    '--field-selector',
    `involvedObject.name=${name}`,
  );
  return list.items;
}

async function phase(name: string, want: string, timeoutMs = 60_000): Promise<RelationshipJson> {
  return waitFor(
    `${name} ${want}`,
    () => {
      const r = relationship(name);
      return Promise.resolve(r.status?.phase === want ? r : undefined);
    },
    timeoutMs,
    100,
  );
}

function auditEntries(from: number): AuditEvent[] {
  const file = path.join(process.env.LOCKSTEP_TEST_CP_DIR ?? '', 'audit.log');
  return readFileSync(file)
    .subarray(from)
    .toString('utf8')
    .split('\n')
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l) as AuditEvent)
    .filter((e) => e.stage === 'ResponseComplete');
}
const auditSize = () =>
  statSync(path.join(process.env.LOCKSTEP_TEST_CP_DIR ?? '', 'audit.log')).size;
const WRITES = new Set(['create', 'update', 'patch', 'delete', 'deletecollection']);

describe('operator on a real control plane', () => {
  let root: string;
  let operatorKc: string;
  let agentKc: string;
  let a: AgentProcess;
  let b: AgentProcess;
  const operators: OperatorProcess[] = [];
  const disks: Record<string, string> = {};

  beforeAll(async () => {
    root = mkdtempSync(path.join(os.tmpdir(), 'lockstep-cluster-'));
    installLockstep();
    operatorKc = serviceAccountKubeconfig(root, 'lockstep-operator');
    agentKc = serviceAccountKubeconfig(root, 'lockstep-agent');
    a = await clusterAgent('k8s-node-a', agentKc).start();
    b = await clusterAgent('k8s-node-b', agentKc).start();
    kubectl(adminKubeconfig(), ['create', 'namespace', NS]);
    const volumes: Array<[string, string, string]> = [
      ['data', 'k8s-node-a', '64Mi'],
      ['log', 'k8s-node-a', '32Mi'],
      ['data2', 'k8s-node-a', '64Mi'],
      ['moved', 'k8s-node-a', '32Mi'],
      ['fo1', 'k8s-node-a', '32Mi'],
      ['fo2', 'k8s-node-a', '32Mi'],
      ['sb', 'k8s-node-a', '32Mi'],
      ['replica', 'k8s-node-b', '256Mi'],
    ];
    for (const [name, node, size] of volumes) {
      disks[name] = nodeDisk(root, node, `pv-${name}`);
      apply(localPv(`pv-${NS}-${name}`, node, disks[name] ?? '', size));
      apply(pvc(name, NS, `pv-${NS}-${name}`, size));
    }
    // The workload's data is already there: the volume is adopted, not created.
    patterned(path.join(disks.data ?? '', 'disk.img'), 64 * MiB, 24 * MiB, 1);
    patterned(path.join(disks.data2 ?? '', 'disk.img'), 64 * MiB, 40 * MiB, 2);
    patterned(path.join(disks.moved ?? '', 'disk.img'), 32 * MiB, 24 * MiB, 3);
    await waitBound(NS, ['data', 'log', 'data2', 'moved', 'fo1', 'fo2', 'sb', 'replica']);
    const first = await new OperatorProcess('operator-1', operatorKc).start();
    operators.push(first);
    await first.leading();
  });

  afterAll(async () => {
    for (const o of operators) await o.dispose();
    await a?.dispose();
    await b?.dispose();
    if (root) removeDir(root);
  });

  it('registers the agents as LockstepNodes with heartbeat leases, Ready', async () => {
    await waitFor(
      'both LockstepNodes Ready',
      () => {
        const nodes = getJson<{
          items: Array<{
            metadata: { name: string };
            spec: { endpoint: string };
            status?: { conditions?: Condition[] };
          }>;
        }>('lsn');
        const ready = nodes.items.filter((n) =>
          n.status?.conditions?.some((c) => c.type === 'Ready' && c.status === 'True'),
        );
        return Promise.resolve(ready.length >= 2 ? nodes : undefined);
      },
      30_000,
      100,
    );
    const node = getJson<{ spec: { endpoint: string; version: string; capacityBytes: number } }>(
      'lsn',
      'k8s-node-a',
    );
    expect(node.spec.endpoint).toBe(a.grpcAddress);
    expect(node.spec.capacityBytes).toBeGreaterThan(0);
    const lease = getJson<{ spec: { holderIdentity: string; leaseDurationSeconds: number } }>(
      'lease',
      'k8s-node-a',
      '-n',
      NAMESPACE,
    );
    expect(lease.spec.holderIdentity).toBe('k8s-node-a');
  });

  it('marks a node Ready=False with an Event when its heartbeat lease lapses', async () => {
    apply({
      apiVersion: 'lockstep.dev/v1alpha1',
      kind: 'LockstepNode',
      metadata: { name: 'ghost' },
      spec: { endpoint: '127.0.0.1:9', version: 'test' },
    });
    // A lease renewed just now for 3 s: Ready, then not, without anyone touching anything.
    apply({
      apiVersion: 'coordination.k8s.io/v1',
      kind: 'Lease',
      metadata: { name: 'ghost', namespace: NAMESPACE },
      spec: {
        holderIdentity: 'ghost',
        leaseDurationSeconds: 3,
        renewTime: new Date().toISOString().replace('Z', '000Z'),
      },
    });
    const ready = (status: string) =>
      waitFor(
        `ghost Ready=${status}`,
        () => {
          const n = getJson<{ status?: { conditions?: Condition[] } }>('lsn', 'ghost');
          const c = n.status?.conditions?.find((x) => x.type === 'Ready');
          return Promise.resolve(c?.status === status ? c : undefined);
        },
        15_000,
        100,
      );
    await ready('True');
    const lapsed = await ready('False');
    expect(lapsed.reason).toBe('HeartbeatLapsed');
    const events = getJson<{ items: Array<{ reason: string; type: string }> }>(
      'events',
      '-n',
      'default',
      '--field-selector',
      'involvedObject.name=ghost',
    ).items;
    expect(events).toContainEqual(
      expect.objectContaining({ reason: 'NodeNotReady', type: 'Warning' }),
    );
    kubectl(adminKubeconfig(), ['delete', 'lsn', 'ghost']);
  });

  it('walks a relationship of a two-volume group through baseline to InSync, replicas identical', async () => {
    apply({
      apiVersion: 'lockstep.dev/v1alpha1',
      kind: 'ConsistencyGroup',
      metadata: { name: 'db', namespace: NS },
      spec: {
        volumes: [
          { name: 'data', pvc: 'data' },
          { name: 'log', pvc: 'log' },
        ],
      },
    });
    apply({
      apiVersion: 'lockstep.dev/v1alpha1',
      kind: 'SyncRelationship',
      metadata: { name: 'db-sync', namespace: NS },
      spec: {
        consistencyGroup: 'db',
        source: { node: 'k8s-node-a' },
        targets: [{ node: 'k8s-node-b', pvc: 'replica' }],
        // Slow enough to watch the baseline progress.
        resync: { maxBytesPerSecond: 8 * MiB },
      },
    });
    const seen = new Set<string>();
    let progress: { doneBytes: number; totalBytes: number } | undefined;
    const final = await waitFor(
      'db-sync InSync',
      () => {
        const r = relationship('db-sync');
        if (r.status?.phase) seen.add(r.status.phase);
        const bl = r.status?.baseline;
        if (bl && bl.doneBytes > 0 && bl.doneBytes < bl.totalBytes) progress = bl;
        return Promise.resolve(r.status?.phase === 'InSync' ? r : undefined);
      },
      60_000,
      100,
    );
    expect(seen.has('Baselining')).toBe(true);
    expect(progress).toBeDefined();
    expect(final.metadata.finalizers).toContain('lockstep.dev/teardown');
    expect(final.status).toMatchObject({
      primaryNode: 'k8s-node-a',
      dirtyBytes: 0,
      observedGeneration: final.metadata.generation,
    });
    expect(final.status?.lastInSyncTime).toBeTruthy();
    expect(condition(final, 'InSync')).toMatchObject({ status: 'True' });
    expect(condition(final, 'Ready')).toMatchObject({ status: 'True' });
    expect(condition(final, 'Degraded')).toMatchObject({ status: 'False' });
    const group = getJson<{ status?: { phase?: string } }>('lcg', 'db', '-n', NS);
    expect(group.status?.phase).toBe('Ready');
    expect(eventsOf('db-sync').map((e) => e.reason)).toEqual(
      expect.arrayContaining(['Baselining', 'InSync']),
    );
    const metrics = await operators[0]?.scrape();
    expect(metrics).toMatch(
      /lockstep_operator_reconcile_total\{controller="syncrelationship",result="(success|requeue_after)"\} [1-9]/,
    );
    expect(metrics).toMatch(
      /lockstep_operator_informer_events_total\{resource="syncrelationships"/,
    );
    // Linted as Prometheus would have it; the phase is one 0/1 series per phase.
    expect(await promtool(['check', 'metrics'], metrics)).toEqual({
      code: 0,
      stdout: '',
      stderr: '',
    });
    const phases = samplesOf(parseSamples(metrics ?? ''), 'lockstep_operator_relationship_phase', {
      namespace: NS,
      relationship: 'db-sync',
    });
    expect(phases.map((p) => p.labels.phase).sort()).toEqual([...RELATIONSHIP_PHASES].sort());
    expect(phases.filter((p) => p.value === 1).map((p) => p.labels.phase)).toEqual(['InSync']);
    expect(metrics).toMatch(/^lockstep_build_info\{version="[^"]+",runtime="v24\.[^"]*"\} 1$/m);

    // Writes through the primary's NBD export reach the replica file on the target PVC.
    await fioVerify(a.uri(`${NS}.db.data`), '16M');
    await waitFor(
      'dirty bytes drained',
      () => Promise.resolve(relationship('db-sync').status?.phase === 'InSync' || undefined),
      30_000,
      100,
    );
    await expectSameImages(
      path.join(disks.data ?? '', 'disk.img'),
      path.join(disks.replica ?? '', 'data', 'disk.img'),
    );
    await expectSameImages(
      path.join(disks.log ?? '', 'disk.img'),
      path.join(disks.replica ?? '', 'log', 'disk.img'),
    );
    expect(statSync(path.join(disks.log ?? '', 'disk.img')).size).toBe(32 * MiB);
    expect(kubectl(adminKubeconfig(), ['get', 'lsr', '-n', NS])).toMatch(
      /db-sync\s+InSync\s+Sync\s+k8s-node-a\s+0/,
    );
  });

  it('shows Degraded with an Event within seconds of losing the replica agent, and heals', async () => {
    await b.kill('SIGKILL');
    const t0 = Date.now();
    const degraded = await phase('db-sync', 'Degraded', 20_000);
    expect(Date.now() - t0).toBeLessThan(10_000);
    expect(condition(degraded, 'Degraded')).toMatchObject({ status: 'True' });
    expect(condition(degraded, 'InSync')).toMatchObject({ status: 'False' });
    await waitFor(
      'a Degraded warning event',
      () =>
        Promise.resolve(
          eventsOf('db-sync').find((e) => e.reason === 'Degraded' && e.type === 'Warning'),
        ),
      10_000,
      100,
    );
    await run(a, `${NS}.db.data`);
    await b.start();
    await phase('db-sync', 'InSync', 60_000);
    await expectSameImages(
      path.join(disks.data ?? '', 'disk.img'),
      path.join(disks.replica ?? '', 'data', 'disk.img'),
    );
  });

  it('takes a ReplicatedSnapshot of the group on both copies at one point, verifies it, with Events', async () => {
    await phase('db-sync', 'InSync');
    const asked = Date.now();
    apply(
      replicatedSnapshot('db-nightly', {
        source: { consistencyGroup: 'db' },
        label: 'nightly',
        verify: true,
      }),
    );
    const snap = await waitFor(
      'db-nightly taken and verified',
      () => {
        const s = snapshot('db-nightly');
        return Promise.resolve(s.status?.verification ? s : undefined);
      },
      60_000,
      100,
    );
    const id = `rs-${snap.metadata.uid}`;
    expect(snap.metadata.finalizers).toContain('lockstep.dev/snapshots');
    expect(snap.status).toMatchObject({
      observedGeneration: snap.metadata.generation,
      phase: 'Ready',
      readyToUse: true,
      snapshotID: id,
      consistencyGroup: 'db',
      primaryNode: 'k8s-node-a',
      restoreSizeBytes: 96 * MiB,
      copiesTaken: '2/2',
      verification: { result: 'Identical', differingRegions: 0 },
    });
    const cut = Date.parse(snap.status?.creationTime ?? '');
    expect(cut).toBeGreaterThanOrEqual(asked - 1_000);
    expect(cut).toBeLessThanOrEqual(Date.now());
    expect(snap.status?.volumes).toEqual([
      {
        name: 'data',
        persistentVolumeClaimName: 'data',
        volumeHandle: `${NS}.db.data`,
        snapshotHandle: `${NS}.db.data@${id}`,
        sizeBytes: 64 * MiB,
        copies: [
          { node: 'k8s-node-a', state: 'Taken' },
          { node: 'k8s-node-b', state: 'Taken', verification: 'Identical' },
        ],
      },
      expect.objectContaining({
        name: 'log',
        snapshotHandle: `${NS}.db.log@${id}`,
        copies: [
          { node: 'k8s-node-a', state: 'Taken' },
          { node: 'k8s-node-b', state: 'Taken', verification: 'Identical' },
        ],
      }),
    ]);
    for (const [type, status] of [
      ['Ready', 'True'],
      ['Replicated', 'True'],
      ['Verified', 'True'],
    ]) {
      expect(snap.status?.conditions?.find((c) => c.type === type)).toMatchObject({ status });
    }
    // Both copies of both volumes hold it, under the same name and label.
    for (const agent of [a, b]) {
      for (const volume of ['data', 'log']) {
        const held = await snapshotsOn(agent, `${NS}.db.${volume}`);
        expect(held).toContainEqual(expect.objectContaining({ name: id, label: 'nightly' }));
      }
    }
    await waitFor(
      'SnapshotTaken and Verified events',
      () => {
        const reasons = eventsOf('db-nightly').map((e) => e.reason);
        return Promise.resolve(
          (reasons.includes('SnapshotTaken') && reasons.includes('Verified')) || undefined,
        );
      },
      10_000,
      100,
    );
    expect(kubectl(adminKubeconfig(), ['get', 'lrs', '-n', NS])).toMatch(
      /db-nightly\s+true\s+Ready\s+db\s+nightly\s+2\/2\s+Identical\s+/,
    );
  });

  it('takes a ReplicatedSnapshot of one volume named by its PVC', async () => {
    apply(replicatedSnapshot('log-only', { source: { persistentVolumeClaimName: 'log' } }));
    const snap = await waitFor(
      'log-only ready',
      () => {
        const s = snapshot('log-only');
        return Promise.resolve(s.status?.readyToUse ? s : undefined);
      },
      30_000,
      100,
    );
    const id = `rs-${snap.metadata.uid}`;
    expect(snap.status).toMatchObject({
      phase: 'Ready',
      copiesTaken: '2/2',
      restoreSizeBytes: 32 * MiB,
    });
    expect(
      snap.status?.volumes?.map((v) => [v.volumeHandle, v.copies.map((c) => c.state)]),
    ).toEqual([[`${NS}.db.log`, ['Taken', 'Taken']]]);
    expect(snap.status?.verification).toBeUndefined();
    expect(snap.status?.conditions?.find((c) => c.type === 'Verified')).toMatchObject({
      status: 'Unknown',
      reason: 'NotRequested',
    });
    for (const agent of [a, b]) {
      expect((await snapshotsOn(agent, `${NS}.db.log`)).map((s) => s.name)).toContain(id);
      expect((await snapshotsOn(agent, `${NS}.db.data`)).map((s) => s.name)).not.toContain(id);
    }
  });

  it('takes scheduled snapshots of the group and deletes those past retention', async () => {
    const patchSchedules = (schedules: object[] | null) =>
      kubectl(adminKubeconfig(), [
        'patch',
        'lsr',
        'db-sync',
        '-n',
        NS,
        '--type=merge',
        '-p',
        JSON.stringify({ spec: { snapshotSchedules: schedules } }),
      ]);
    const scheduled = () =>
      getJson<{
        items: Array<SnapshotJson & { metadata: { name: string; annotations?: object } }>;
      }>('lrs', '-n', NS).items.filter(
        (s) =>
          (s.metadata.annotations as Record<string, string> | undefined)?.[
            'lockstep.dev/schedule'
          ] === 'db-sync/daily',
      );
    patchSchedules([{ label: 'daily', intervalMinutes: 1440, keep: 1 }]);
    // Today's slot (UTC midnight) has no snapshot yet: one is taken at once.
    const first = await waitFor(
      "today's scheduled snapshot ready",
      () => Promise.resolve(scheduled().find((s) => s.status?.readyToUse)),
      30_000,
      100,
    );
    expect(first.metadata.name).toMatch(/^db-sync-daily-\d{8}-0000$/);
    expect(first.status).toMatchObject({ phase: 'Ready', copiesTaken: '2/2' });
    expect(eventsOf('db-sync').map((e) => e.reason)).toContain('SnapshotScheduled');
    const firstId = `rs-${first.metadata.uid}`;

    // A newer one of the same schedule: once it is ready, keep 1 puts the first past retention.
    apply({
      ...replicatedSnapshot('db-sync-daily-extra', {
        source: { consistencyGroup: 'db' },
        label: 'daily',
      }),
      metadata: {
        name: 'db-sync-daily-extra',
        namespace: NS,
        annotations: { 'lockstep.dev/schedule': 'db-sync/daily' },
      },
    });
    await waitFor(
      'the first scheduled snapshot pruned',
      () => {
        const names = scheduled().map((s) => s.metadata.name);
        return Promise.resolve(
          (names.length === 1 && names[0] === 'db-sync-daily-extra') || undefined,
        );
      },
      30_000,
      100,
    );
    for (const agent of [a, b]) {
      const held = (await snapshotsOn(agent, `${NS}.db.data`)).map((s) => s.name);
      expect(held).not.toContain(firstId);
    }
    patchSchedules(null);
  });

  it('takes a snapshot while the replica is down: usable on the primary, Degraded, the missing copy named', async () => {
    await b.kill('SIGKILL');
    await phase('db-sync', 'Degraded', 20_000);
    apply(replicatedSnapshot('db-alone', { source: { consistencyGroup: 'db' } }));
    const snap = await waitFor(
      'db-alone taken',
      () => {
        const s = snapshot('db-alone');
        return Promise.resolve(s.status?.readyToUse ? s : undefined);
      },
      30_000,
      100,
    );
    expect(snap.status).toMatchObject({ phase: 'Degraded', readyToUse: true, copiesTaken: '1/2' });
    for (const v of snap.status?.volumes ?? []) {
      expect(v.copies.map((c) => [c.node, c.state])).toEqual([
        ['k8s-node-a', 'Taken'],
        ['k8s-node-b', 'Missing'],
      ]);
    }
    expect(snap.status?.conditions?.find((c) => c.type === 'Replicated')).toMatchObject({
      status: 'False',
      reason: 'CopiesMissing',
    });
    await waitFor(
      'a CopiesMissing warning',
      () =>
        Promise.resolve(
          eventsOf('db-alone').find((e) => e.reason === 'CopiesMissing' && e.type === 'Warning'),
        ),
      10_000,
      100,
    );
    await b.start();
    await phase('db-sync', 'InSync', 60_000);
  });

  it('makes no API writes at rest for 60 s (agents and operators only renew their leases)', async () => {
    await phase('db-sync', 'InSync');
    await new Promise((r) => setTimeout(r, 3_000));
    const from = auditSize();
    await new Promise((r) => setTimeout(r, 60_000));
    const entries = auditEntries(from);
    // Other files of the suite share the control plane (crds.test.ts writes objects in
    // `default`): the operator answering those is not a write at rest.
    const ours = (e: AuditEvent) => [undefined, NS, NAMESPACE].includes(e.objectRef?.namespace);
    const writes = entries.filter((e) => WRITES.has(e.verb) && ours(e));
    const byOperator = writes.filter((e) => e.user.username === OPERATOR_USER);
    const leaderRenewals = byOperator.filter(
      (e) => e.objectRef?.resource === 'leases' && e.objectRef.name === 'lockstep-operator',
    );
    // The failover monitors' shard and member Leases, renewed in place.
    const monitorRenewals = byOperator.filter(
      (e) =>
        e.objectRef?.resource === 'leases' &&
        e.verb === 'update' &&
        e.objectRef.name?.startsWith('lockstep-monitor-'),
    );
    // Counting works: the leader's own lease renewals are there, and nothing else is.
    expect(leaderRenewals.length).toBeGreaterThan(0);
    expect(monitorRenewals.length).toBeGreaterThan(0);
    expect(
      byOperator.filter((e) => !leaderRenewals.includes(e) && !monitorRenewals.includes(e)),
    ).toEqual([]);
    const byAgents = writes.filter((e) => e.user.username === AGENT_USER);
    expect(byAgents.length).toBeGreaterThan(0);
    expect(byAgents.filter((e) => e.objectRef?.resource !== 'leases')).toEqual([]);
  }, 120_000);

  it('runs with the deploy/ RBAC and is refused outside it', () => {
    const refused = (args: string[]) => {
      try {
        kubectl(operatorKc, args);
      } catch (err) {
        return String((err as { stderr?: string }).stderr);
      }
      throw new Error(`the operator's ServiceAccount may ${args.join(' ')}`);
    };
    expect(refused(['get', 'secrets', '-n', 'kube-system'])).toMatch(/forbidden/i);
    expect(refused(['delete', 'pvc', 'data', '-n', NS])).toMatch(/forbidden/i);
    expect(
      kubectl(operatorKc, ['auth', 'can-i', 'patch', 'syncrelationships/status', '-n', NS]).trim(),
    ).toBe('yes');
    expect(
      kubectl(operatorKc, [
        'auth',
        'can-i',
        'update',
        'replicatedsnapshots/status',
        '-n',
        NS,
      ]).trim(),
    ).toBe('yes');
    expect(
      kubectl(operatorKc, ['auth', 'can-i', 'create', 'replicatedsnapshots', '-n', NS]).trim(),
    ).toBe('yes');
  });

  it('fails over to the standby operator, which finishes a reconcile in progress', async () => {
    const standby = await new OperatorProcess('operator-2', operatorKc).start();
    operators.push(standby);
    await new Promise((r) => setTimeout(r, 2_000));
    expect(standby.proc.log()).not.toContain('"msg":"leading"');
    oneVolumeRelationship('db2', 'data2', { resync: { maxBytesPerSecond: 4 * MiB } });
    await phase('db2-sync', 'Baselining', 30_000);
    await operators[0]?.proc.kill('SIGKILL');
    await standby.leading(60_000);
    const done = await phase('db2-sync', 'InSync', 60_000);
    expect(condition(done, 'InSync')).toMatchObject({ status: 'True' });
    // The standby's own pass wrote the final status.
    expect(standby.proc.log()).toContain('"msg":"leading"');
  }, 150_000);

  it('switches the primary to the target and back when spec.primary says so', async () => {
    const patchPrimary = (primary: string) =>
      kubectl(adminKubeconfig(), [
        'patch',
        'lsr',
        'db-sync',
        '-n',
        NS,
        '--type=merge',
        '-p',
        JSON.stringify({ spec: { primary } }),
      ]);
    const role = async (agent: AgentProcess) =>
      (JSON.parse(await agent.ctl('status', `${NS}.db.data`, '-o', 'json')) as { role: string })
        .role;
    patchPrimary('k8s-node-b');
    const switched = await waitFor(
      'node-b primary and in sync',
      () => {
        const r = relationship('db-sync');
        const s = r.status;
        return Promise.resolve(
          s?.primaryNode === 'k8s-node-b' &&
            s.phase === 'InSync' &&
            s.observedGeneration === r.metadata.generation
            ? r
            : undefined,
        );
      },
      60_000,
      100,
    );
    expect(condition(switched, 'InSync')).toMatchObject({ status: 'True' });
    expect(await role(b)).toBe('primary');
    expect(await role(a)).toBe('secondary');
    // The workload now writes on node-b; node-a's PVC file follows.
    await fioVerify(b.uri(`${NS}.db.data`), '8M');
    await phase('db-sync', 'InSync');
    await waitFor(
      'node-a caught up',
      async () => {
        try {
          await expectSameImages(
            path.join(disks.data ?? '', 'disk.img'),
            path.join(disks.replica ?? '', 'data', 'disk.img'),
          );
          return true;
        } catch {
          return undefined;
        }
      },
      20_000,
      200,
    );
    expect(eventsOf('db-sync').map((e) => e.reason)).toContain('SwitchedPrimary');

    patchPrimary('source');
    await waitFor(
      'node-a primary again',
      () => {
        const s = relationship('db-sync').status;
        return Promise.resolve(
          (s?.primaryNode === 'k8s-node-a' && s.phase === 'InSync') || undefined,
        );
      },
      60_000,
      100,
    );
    expect(await role(a)).toBe('primary');
    expect(await role(b)).toBe('secondary');
  });

  it('deletes the snapshots on both copies when the ReplicatedSnapshots are deleted', async () => {
    const names = ['db-nightly', 'log-only', 'db-alone', 'db-sync-daily-extra'];
    const ids = names.map((n) => `rs-${snapshot(n).metadata.uid}`);
    kubectl(adminKubeconfig(), ['delete', 'lrs', ...names, '-n', NS, '--timeout=30s']);
    expect(kubectl(adminKubeconfig(), ['get', 'lrs', '-n', NS, '-o', 'name'])).toBe('');
    for (const agent of [a, b]) {
      for (const volume of ['data', 'log']) {
        const left = (await snapshotsOn(agent, `${NS}.db.${volume}`)).map((s) => s.name);
        expect(left.filter((n) => ids.includes(n))).toEqual([]);
      }
    }
    expect(eventsOf('db-nightly').map((e) => e.reason)).toContain('SnapshotDeleted');
  });

  it('stops replicating and keeps the files when the relationship is deleted', async () => {
    const before = readFileSync(path.join(disks.replica ?? '', 'data', 'disk.img'));
    kubectl(adminKubeconfig(), ['delete', 'lsr', 'db-sync', '-n', NS, '--timeout=30s']);
    expect(kubectl(adminKubeconfig(), ['get', 'lsr', '-n', NS, '-o', 'name'])).not.toContain(
      'db-sync',
    );
    const source = JSON.parse(await a.ctl('status', `${NS}.db.data`, '-o', 'json')) as {
      role: string;
      replication: unknown;
    };
    expect(source).toMatchObject({ role: 'primary', replication: null });
    const onB = JSON.parse(await b.ctl('volume', 'list', '-o', 'json')) as {
      volumes: Array<{ name: string }>;
    };
    expect(onB.volumes.map((v) => v.name).filter((n) => n.startsWith(`${NS}.db.`))).toEqual([]);
    const kept = path.join(disks.replica ?? '', 'data', 'disk.img');
    expect(existsSync(kept)).toBe(true);
    expect(readFileSync(kept).equals(before)).toBe(true);
    expect(eventsOf('db-sync').map((e) => e.reason)).toContain('TornDown');
  });

  it('moves the primary to a third node when spec.source.node changes, progress in status', async () => {
    const c = await clusterAgent('k8s-node-c', agentKc).start();
    try {
      // Slow enough to watch the move's establishment.
      const rel = oneVolumeRelationship('mv', 'moved', { resync: { maxBytesPerSecond: 8 * MiB } });
      await phase('mv-sync', 'InSync', 60_000);
      const volume = `${NS}.mv.data`;
      await fioVerify(a.uri(volume), '4M');
      apply({ ...rel, spec: { ...rel.spec, source: { node: 'k8s-node-c' } } });

      const seen = new Set<string>();
      let establishing: RelationshipJson['status'] | undefined;
      const moved = await waitFor(
        'mv-sync moved to node-c and in sync',
        () => {
          const s = relationship('mv-sync').status;
          if (s?.move) seen.add(`${s.move.phase}/${s.primaryNode}`);
          if (s?.move?.phase === 'Establishing' && s.move.totalBytes > 0) establishing = s;
          return Promise.resolve(
            s?.primaryNode === 'k8s-node-c' && s.phase === 'InSync' && !s.move ? s : undefined,
          );
        },
        // 15 s alone; once, with the whole suite on two busy cores, more than 90 s.
        180_000,
        100,
      );
      // Established while node-a stayed primary, then the targets were re-pointed.
      expect(seen.has('Establishing/k8s-node-a')).toBe(true);
      expect(establishing?.move).toMatchObject({ fromNode: 'k8s-node-a', toNode: 'k8s-node-c' });
      expect(establishing?.phase).toBe('Baselining');
      expect(moved.dirtyBytes).toBe(0);
      expect(eventsOf('mv-sync').map((e) => e.reason)).toEqual(
        expect.arrayContaining(['Moving', 'SwitchedPrimary', 'Moved']),
      );
      const role = async (agent: AgentProcess) =>
        (JSON.parse(await agent.ctl('status', volume, '-o', 'json')) as { role: string }).role;
      expect(await role(c)).toBe('primary');
      expect(await role(b)).toBe('secondary');
      // node-a's copy (the PVC's file) is released, not deleted.
      const onA = JSON.parse(await a.ctl('volume', 'list', '-o', 'json')) as {
        volumes: Array<{ name: string }>;
      };
      expect(onA.volumes.map((v) => v.name)).not.toContain(volume);
      expect(existsSync(path.join(disks.moved ?? '', 'disk.img'))).toBe(true);
      // The workload writes on node-c now; node-b follows.
      await fioVerify(c.uri(volume), '4M');
      await phase('mv-sync', 'InSync');
      await expectSameImages(c.uri(volume), b.uri(volume));
      kubectl(adminKubeconfig(), ['delete', 'lsr', 'mv-sync', '-n', NS, '--timeout=30s']);
      expect(kubectl(adminKubeconfig(), ['get', 'lsr', '-n', NS, '-o', 'name'])).not.toContain(
        'mv-sync',
      );
    } finally {
      await c.dispose();
    }
  }, 300_000);

  describe('failover through a mediator', () => {
    let mediator: MediatorProcess;
    const role = async (agent: AgentProcess, volume: string) =>
      (JSON.parse(await agent.ctl('status', volume, '-o', 'json')) as { role: string }).role;
    const failedOver = (name: string, toNode: string, timeoutMs: number) =>
      waitFor(
        `${name} failed over to ${toNode}`,
        () => {
          const r = relationship(name);
          const f = r.status?.failover?.lastFailover;
          return Promise.resolve(
            r.spec.primary !== 'source' &&
              f?.toNode === toNode &&
              f.durationSeconds !== undefined &&
              r.status?.primaryNode === toNode
              ? r
              : undefined,
          );
        },
        timeoutMs,
        100,
      );

    beforeAll(async () => {
      mediator = await new MediatorProcess().start();
    });
    afterAll(async () => {
      await mediator?.dispose();
    });

    /** The mediator's record of a volume once it counts node-b in sync (asked through b). */
    const recordWithB = (volume: string) =>
      waitFor(
        'the mediator to count node-b in sync',
        async () => {
          const r = (
            JSON.parse(await b.ctl('epoch', volume, '-o', 'json')) as {
              record: { epoch: number; primary: string; inSync: string[] };
            }
          ).record;
          return r.primary === a.grpcAddress && r.inSync.includes(b.grpcAddress) ? r : undefined;
        },
        30_000,
        200,
      );

    /** A relationship with automatic failover (grace 2 s), once in sync with an epoch. */
    async function failoverRelationship(name: string): Promise<RelationshipJson> {
      oneVolumeRelationship(name, name, {
        failover: { policy: 'Automatic', mediator: mediator.address, grace: '2s' },
      });
      return waitFor(
        `${name}-sync in sync with a mediator epoch`,
        () => {
          const r = relationship(`${name}-sync`);
          return Promise.resolve(
            r.status?.phase === 'InSync' && (r.status.failover?.epoch ?? 0) >= 1 ? r : undefined,
          );
        },
        60_000,
        100,
      );
    }

    /** An ack-recording writer on node-a's export, once it has 300 writes acknowledged. */
    async function writingOnA(volume: string, log: string) {
      const writer = startAckWriter(a.uri(volume), log, 1_000_000, 8, 2048);
      await waitFor(
        'writes acknowledged',
        () => Promise.resolve(ackedCount(log) >= 300 || undefined),
        30_000,
        20,
      );
      // Wrapped: an async function returning the promise would wait for the writer to end.
      return { writer };
    }

    it('refuses Automatic failover without a mediator', () => {
      expect(() =>
        apply({
          apiVersion: 'lockstep.dev/v1alpha1',
          kind: 'SyncRelationship',
          metadata: { name: 'no-mediator', namespace: NS },
          spec: {
            consistencyGroup: 'none',
            source: { node: 'k8s-node-a' },
            targets: [{ node: 'k8s-node-b' }],
            failover: { policy: 'Automatic' },
          },
        }),
      ).toThrow(/failover.policy Automatic needs failover.mediator/);
    });

    it('fails over when the primary’s agent is SIGKILLed: the replica is granted the next epoch, spec.primary and status name it, nothing acknowledged is lost; the old primary rejoins as a replica', async () => {
      const ready = await failoverRelationship('fo1');
      const volume = `${NS}.fo1.data`;
      expect(ready.status?.failover).toMatchObject({
        mediator: mediator.address,
        exports: [{ volume: 'data', uri: a.uri(volume) }],
      });
      const { epoch } = await recordWithB(volume);

      const log = path.join(root, 'fo1-acked.log');
      const { writer } = await writingOnA(volume, log);
      const killedAt = Date.now();
      await a.kill('SIGKILL');
      await writer.catch(() => undefined);

      const done = await failedOver('fo1-sync', 'k8s-node-b', 30_000);
      expect(Date.now() - killedAt).toBeLessThan(15_000);
      expect(done.spec.primary).toBe('k8s-node-b');
      expect(done.status?.failover?.lastFailover).toMatchObject({
        fromNode: 'k8s-node-a',
        toNode: 'k8s-node-b',
        epoch: epoch + 1,
      });
      expect(done.status?.failover?.exports).toEqual([{ volume: 'data', uri: b.uri(volume) }]);
      expect(await role(b, volume)).toBe('primary');
      expect(await verifyAckedWrites(b.uri(volume), log)).toBeGreaterThan(0);
      const reasons = eventsOf('fo1-sync').map((e) => e.reason);
      expect(reasons.filter((r) => r === 'FailingOver')).toHaveLength(1);
      expect(reasons.filter((r) => r === 'FailedOver')).toHaveLength(1);
      const metrics = await operators[1]?.scrape();
      expect(metrics).toMatch(/lockstep_operator_monitor_shards \d/);

      // node-a comes back: its copy was replaced, it follows node-b; nobody switches back.
      await b.ctl('status', volume);
      await fioVerify(b.uri(volume), '2M');
      await a.start();
      const rejoined = await waitFor(
        'fo1-sync in sync again with node-b primary',
        () => {
          const r = relationship('fo1-sync');
          return Promise.resolve(
            r.status?.phase === 'InSync' && r.status.primaryNode === 'k8s-node-b' ? r : undefined,
          );
        },
        60_000,
        100,
      );
      // node-b's catch-up of node-a is recorded at the mediator in a further epoch.
      expect(rejoined.status?.failover?.epoch).toBeGreaterThanOrEqual(epoch + 1);
      const record = JSON.parse(await b.ctl('epoch', volume, '-o', 'json')) as {
        record: { primary: string; inSync: string[] };
      };
      expect(record.record.primary).toBe(b.grpcAddress);
      expect(await role(a, volume)).toBe('secondary');
      expect(await role(b, volume)).toBe('primary');
      await expectSameImages(a.uri(volume), b.uri(volume));
    }, 150_000);

    it('completes a failover once when the operator monitoring it is SIGKILLed in the middle', async () => {
      const third = await new OperatorProcess('operator-3', operatorKc).start();
      operators.push(third);
      const ready = await failoverRelationship('fo2');
      const volume = `${NS}.fo2.data`;
      expect(ready.status?.failover?.mediator).toBe(mediator.address);
      const { epoch } = await recordWithB(volume);
      // Which replica holds the relationship's shard: the shards are spread over both.
      const lease = `lockstep-monitor-shard-${shardOf(`${NS}/fo2-sync`, 4)}`;
      const holders = await waitFor(
        'the shards spread over the two live operators',
        () => {
          const leases = getJson<{
            items: Array<{ metadata: { name: string }; spec: { holderIdentity?: string } }>;
          }>('leases', '-n', NAMESPACE, '-l', 'lockstep.dev/monitor=shard');
          const by = new Map(
            leases.items.map((l) => [l.metadata.name, l.spec.holderIdentity ?? '']),
          );
          const live = operators.filter(
            (o) => o.proc.child.exitCode === null && o.proc.child.signalCode === null,
          );
          const spread = live.every((o) =>
            [...by.values()].some((h) => o.proc.log().includes(h) && h),
          );
          return Promise.resolve(spread && by.get(lease) ? { by, live } : undefined);
        },
        60_000,
        200,
      );
      const holder = holders.by.get(lease) ?? '';
      const monitoring = holders.live.find((o) => o.proc.log().includes(holder));
      const other = holders.live.find((o) => o !== monitoring);
      expect(monitoring).toBeDefined();
      expect(other).toBeDefined();

      const log = path.join(root, 'fo2-acked.log');
      const { writer } = await writingOnA(volume, log);
      // The primary is lost and, before its grace period is out, so is the operator that
      // watches it: the other replica takes the shard over and finishes the failover.
      await a.kill('SIGKILL');
      await writer.catch(() => undefined);
      await new Promise((r) => setTimeout(r, 1_000));
      await monitoring?.proc.kill('SIGKILL');

      const done = await failedOver('fo2-sync', 'k8s-node-b', 60_000);
      expect(done.status?.failover?.lastFailover?.epoch).toBe(epoch + 1);
      // The surviving replica acted, once (its metrics; logs are written asynchronously).
      const metrics = (await other?.scrape()) ?? '';
      expect(metrics).toContain(
        `lockstep_operator_failovers_total{relationship="${NS}/fo2-sync",kind="failover"} 1`,
      );
      expect(await role(b, volume)).toBe('primary');
      expect(await verifyAckedWrites(b.uri(volume), log)).toBeGreaterThan(0);
      // Exactly once: one intent, one grant.
      const reasons = eventsOf('fo2-sync').map((e) => e.reason);
      expect(reasons.filter((r) => r === 'FailingOver')).toHaveLength(1);
      const record = JSON.parse(await b.ctl('epoch', volume, '-o', 'json')) as {
        record: { epoch: number; primary: string };
      };
      expect(record.record).toMatchObject({ epoch: epoch + 1, primary: b.grpcAddress });
      await a.start();
      await phase('fo2-sync', 'InSync', 60_000);
      expect(await role(a, volume)).toBe('secondary');
    }, 180_000);
  });

  it('shows a split brain (both copies wrote) as a condition and a warning within 10 s, and resolves it only when told which copy loses', async () => {
    const rel = oneVolumeRelationship('sb', 'sb');
    await phase('sb-sync', 'InSync', 60_000);
    const volume = `${NS}.sb.data`;
    const write = (agent: AgentProcess, pattern: string, at: string) =>
      runTool('qemu-io', ['-f', 'raw', '-c', `write -P ${pattern} ${at} 1m`, agent.uri(volume)]);
    // node-a writes alone, then node-b is forced up without it (no mediator) and writes too.
    await b.kill('SIGKILL');
    await write(a, '0x11', '0');
    await a.kill('SIGKILL');
    await b.start();
    await b.ctl('promote', volume, '--force');
    await write(b, '0x22', '1m');
    apply({ ...rel, spec: { ...rel.spec, primary: 'k8s-node-b' } });
    await a.start();
    const t0 = Date.now();
    const split = await phase('sb-sync', 'SplitBrain', 30_000);
    expect(Date.now() - t0).toBeLessThan(10_000);
    expect(condition(split, 'SplitBrain')).toMatchObject({ status: 'True', reason: 'Diverged' });
    await waitFor(
      'a SplitBrain warning',
      () =>
        Promise.resolve(
          eventsOf('sb-sync').find((e) => e.reason === 'SplitBrain' && e.type === 'Warning'),
        ),
      10_000,
      100,
    );
    const discard = (node: string) =>
      kubectl(adminKubeconfig(), [
        'annotate',
        'lsr',
        'sb-sync',
        '-n',
        NS,
        `lockstep.dev/discard-diverged=${node}`,
      ]);
    // The forced promotion, made outside the operator, is on record.
    expect(relationship('sb-sync').status?.failover?.lastForcedPromotion).toMatchObject({
      node: 'k8s-node-b',
    });
    expect(eventsOf('sb-sync').map((e) => e.reason)).toContain('ForcedPromotion');
    // Nothing is resolved silently.
    await new Promise((r) => setTimeout(r, 3_000));
    expect(relationship('sb-sync').status?.phase).toBe('SplitBrain');
    // A wrong choice is refused and changes nothing.
    discard('k8s-node-b');
    await waitFor(
      'the refusal',
      () => Promise.resolve(eventsOf('sb-sync').find((e) => e.reason === 'DiscardRefused')),
      10_000,
      100,
    );
    expect(
      relationship('sb-sync').metadata.annotations?.['lockstep.dev/discard-diverged'],
    ).toBeUndefined();
    expect(relationship('sb-sync').status?.phase).toBe('SplitBrain');
    // The choice: node-a's diverging writes go; it resyncs from node-b.
    discard('k8s-node-a');
    await phase('sb-sync', 'InSync', 60_000);
    expect(eventsOf('sb-sync').map((e) => e.reason)).toContain('DivergedWritesDiscarded');
    await expectSameImages(a.uri(volume), b.uri(volume));
    await runTool('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x22 1m 1m', b.uri(volume)]);
  }, 150_000);
});

/** The snapshots of a volume, as the agent lists them. */
async function snapshotsOn(agent: AgentProcess, volume: string) {
  const client = agent.client();
  try {
    return await client.listSnapshots(volume);
  } finally {
    client.close();
  }
}

/** A few writes while the replica is away, so there is something to resync. */
async function run(agent: AgentProcess, volume: string): Promise<void> {
  await fioVerify(agent.uri(volume), '4M');
}
