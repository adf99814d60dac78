// The operator process: informers on the Lockstep kinds, PVCs, PVs and agent heartbeats; a
// watcher on the agents themselves; one work queue and reconciler per kind; leader election so
// only one replica acts. Event handlers only map an object to the keys it affects.
import { securityMetrics } from '../../lib/tls/security-metrics';
import type { Transport } from '../../lib/tls/transport';
import { hostname } from 'node:os';
import { randomBytes } from 'node:crypto';
import * as k8s from '@kubernetes/client-node';
import type { Logger } from '../../lib/logger';
import { GROUP, VERSION, isNotFound } from '../../lib/kube';
import { splitHostPort } from '../../lib/host-port';
import type {
  ConsistencyGroup,
  LockstepNode,
  ReplicatedSnapshot,
  SyncRelationship,
} from './api/types';
import { AgentPool } from './agents/agent-pool';
import { AgentWatcher } from './agents/agent-watcher';
import { CertificateSigner } from './certificates/certificate-signer';
import type { ClusterAuthority } from './certificates/cluster-authority';
import { SupervisedInformer } from './informers/supervised-informer';
import { FailoverMonitor } from './failover/failover-monitor';
import { LeaderElector } from './leader/lease-election';
import { ShardLeases } from './leader/shard-leases';
import { ControllerMetrics } from './metrics';
import { ConsistencyGroupReconciler } from './reconcilers/consistency-group';
import { LockstepNodeReconciler } from './reconcilers/lockstep-node';
import { ReplicatedSnapshotReconciler } from './reconcilers/replicated-snapshot';
import { SnapshotScheduleReconciler } from './reconcilers/snapshot-schedule';
import { SyncRelationshipReconciler } from './reconcilers/sync-relationship';
import { groupUsesPvc, type Lookup } from './resolve/group-volumes';
import { agentVolumeName } from './resolve/relationship-plan';
import { SCHEDULE_ANNOTATION } from './resolve/snapshot-schedule';
import { EventRecorder } from './status/event-recorder';
import { needsVerification } from './status/snapshot-status';
import { runControllerLoop, type ReconcileResult } from './workqueue/controller-loop';
import { WorkQueue } from './workqueue/work-queue';

export interface OperatorOptions {
  kc: k8s.KubeConfig;
  /** Where the leader-election Lease and the agents' heartbeat Leases live. */
  namespace: string;
  metricsListen?: string;
  leaderElect: boolean;
  /** Mutual TLS to the agents and mediators (an operator certificate), or --insecure. */
  transport: Transport;
  log: Logger;
  /** How often each agent's status is polled. */
  agentPollMs?: number;
  /** With leaderElect: shards of relationships the replicas' failover monitors share. */
  monitorShards?: number;
  /** With --manage-certificates: the cluster's CA, which signs the agents' certificates. */
  authority?: ClusterAuthority;
}

const LEADER_LEASE = 'lockstep-operator';

const keyOf = (o: k8s.KubernetesObject): string =>
  `${o.metadata?.namespace ?? ''}/${o.metadata?.name ?? ''}`;

export class Operator {
  readonly identity = `${hostname()}-${process.pid}-${randomBytes(3).toString('hex')}`;
  readonly metrics = new ControllerMetrics();
  metricsAddress = '';
  /** Its informers have listed everything once: it can act (readiness, whether it leads or not). */
  private synced = false;
  /** Resolves when this replica stops leading (the process should then exit). */
  lost: Promise<void> = new Promise(() => undefined);
  private readonly log: Logger;
  private readonly objects: k8s.CustomObjectsApi;
  private readonly core: k8s.CoreV1Api;
  private readonly pool: AgentPool;
  /** Short deadlines for the failover monitor's probes. */
  private readonly probes: AgentPool;
  private readonly queues = {
    relationships: new WorkQueue(),
    groups: new WorkQueue(),
    nodes: new WorkQueue(),
    snapshots: new WorkQueue(),
    schedules: new WorkQueue(),
    certificates: new WorkQueue(),
  };
  private readonly informers: SupervisedInformer<k8s.KubernetesObject>[] = [];
  private loops: Promise<void>[] = [];
  private watcher: AgentWatcher | undefined;
  private elector: LeaderElector | undefined;
  private shards: ShardLeases | undefined;
  private monitor: FailoverMonitor | undefined;
  private metricsServer: { close(): Promise<void> } | undefined;

  readonly relationships: SupervisedInformer<SyncRelationship>;
  readonly groups: SupervisedInformer<ConsistencyGroup>;
  readonly nodes: SupervisedInformer<LockstepNode>;
  readonly snapshots: SupervisedInformer<ReplicatedSnapshot>;
  private readonly leases: SupervisedInformer<k8s.V1Lease>;
  private readonly pvcs: SupervisedInformer<k8s.V1PersistentVolumeClaim>;
  private readonly pvs: SupervisedInformer<k8s.V1PersistentVolume>;
  private readonly certificateRequests:
    SupervisedInformer<k8s.V1CertificateSigningRequest> | undefined;

  constructor(private readonly options: OperatorOptions) {
    const { kc, namespace } = options;
    this.log = options.log;
    this.pool = new AgentPool(options.transport);
    this.probes = new AgentPool(options.transport, 2_000);
    securityMetrics(this.metrics.registry, options.transport, this.log);
    this.objects = kc.makeApiClient(k8s.CustomObjectsApi);
    this.core = kc.makeApiClient(k8s.CoreV1Api);
    const coordination = kc.makeApiClient(k8s.CoordinationV1Api);
    const custom = <T extends k8s.KubernetesObject>(
      plural: string,
      onChange: (o: T) => void,
    ): SupervisedInformer<T> =>
      this.informer<T>(
        plural,
        `/apis/${GROUP}/${VERSION}/${plural}`,
        () =>
          this.objects.listCustomObjectForAllNamespaces({
            group: GROUP,
            version: VERSION,
            plural,
          }) as Promise<k8s.KubernetesListObject<T>>,
        onChange,
      );

    this.relationships = custom<SyncRelationship>('syncrelationships', (r) => {
      this.queues.relationships.add(keyOf(r));
      if (r.spec.snapshotSchedules?.length) this.queues.schedules.add(keyOf(r));
      this.enqueueUnsettledSnapshots(r.metadata.namespace);
    });
    this.metrics.watchRelationships(() => this.relationships.list());
    this.groups = custom<ConsistencyGroup>('consistencygroups', (g) => {
      this.queues.groups.add(keyOf(g));
      this.enqueueUnsettledSnapshots(g.metadata.namespace);
      this.enqueueRelationships(
        (r) =>
          r.metadata.namespace === g.metadata.namespace &&
          r.spec.consistencyGroup === g.metadata.name,
      );
    });
    this.nodes = custom<LockstepNode>('lockstepnodes', (n) => {
      this.queues.nodes.add(n.metadata.name);
      this.enqueueRelationships((r) => usesNode(r, n.metadata.name));
    });
    this.snapshots = custom<ReplicatedSnapshot>('replicatedsnapshots', (s) => {
      this.queues.snapshots.add(keyOf(s));
      // A scheduled snapshot that became ready (or went) may put an older one past retention.
      const schedule = s.metadata.annotations?.[SCHEDULE_ANNOTATION];
      if (schedule) this.queues.schedules.add(`${s.metadata.namespace}/${schedule.split('/')[0]}`);
    });
    this.leases = this.informer<k8s.V1Lease>(
      'leases',
      `/apis/coordination.k8s.io/v1/namespaces/${namespace}/leases`,
      () => coordination.listNamespacedLease({ namespace }),
      (l) => {
        const name = l.metadata?.name ?? '';
        if (this.nodes.get(name)) this.queues.nodes.add(name);
      },
    );
    this.pvcs = this.informer<k8s.V1PersistentVolumeClaim>(
      'persistentvolumeclaims',
      '/api/v1/persistentvolumeclaims',
      () => this.core.listPersistentVolumeClaimForAllNamespaces(),
      (pvc) => this.pvcChanged(pvc),
    );
    this.pvs = this.informer<k8s.V1PersistentVolume>(
      'persistentvolumes',
      '/api/v1/persistentvolumes',
      () => this.core.listPersistentVolume(),
      (pv) => {
        const claim = pv.spec?.claimRef;
        const pvc = claim && this.pvcs.get(claim.name ?? '', claim.namespace);
        if (pvc) this.pvcChanged(pvc);
      },
    );
    if (options.authority) {
      const certificates = kc.makeApiClient(k8s.CertificatesV1Api);
      this.certificateRequests = this.informer<k8s.V1CertificateSigningRequest>(
        'certificatesigningrequests',
        '/apis/certificates.k8s.io/v1/certificatesigningrequests',
        () => certificates.listCertificateSigningRequest(),
        (csr) => {
          if (CertificateSigner.isOurs(csr)) this.queues.certificates.add(csr.metadata?.name ?? '');
        },
      );
    }
  }

  private informer<T extends k8s.KubernetesObject>(
    resource: string,
    path: string,
    list: () => Promise<k8s.KubernetesListObject<T>>,
    onChange: (o: T) => void,
  ): SupervisedInformer<T> {
    const informer = new SupervisedInformer<T>({
      kc: this.options.kc,
      resource,
      path,
      list,
      onChange,
      log: this.log.child({ informer: resource }),
      metrics: this.metrics,
    });
    this.informers.push(informer as unknown as SupervisedInformer<k8s.KubernetesObject>);
    return informer;
  }

  private enqueueRelationships(pred: (r: SyncRelationship) => boolean): void {
    for (const r of this.relationships.list()) if (pred(r)) this.queues.relationships.add(keyOf(r));
  }

  /**
   * Snapshots still waiting to be taken or verified, which a change of their relationship or
   * group may unblock; settled ones are left alone.
   */
  private enqueueUnsettledSnapshots(namespace: string | undefined): void {
    for (const s of this.snapshots.list(namespace)) {
      if (s.metadata.deletionTimestamp || !s.status?.readyToUse || needsVerification(s)) {
        this.queues.snapshots.add(keyOf(s));
      }
    }
  }

  private pvcChanged(pvc: k8s.V1PersistentVolumeClaim): void {
    const ns = pvc.metadata?.namespace;
    const groups = this.groups.list(ns).filter((g) => groupUsesPvc(g, pvc));
    for (const g of groups) this.queues.groups.add(keyOf(g));
    const names = new Set(groups.map((g) => g.metadata.name));
    this.enqueueRelationships(
      (r) =>
        r.metadata.namespace === ns &&
        (names.has(r.spec.consistencyGroup) ||
          r.spec.targets.some((t) => t.pvc === pvc.metadata?.name)),
    );
  }

  private get lookup(): Lookup {
    return {
      pvc: (namespace, name) => this.pvcs.get(name, namespace),
      pvcs: (namespace) => this.pvcs.list(namespace),
      pv: (name) => this.pvs.get(name),
    };
  }

  private leaseOf = (node: string): k8s.V1Lease | undefined =>
    this.leases.get(node, this.options.namespace);

  /** Starts the informers, waits for leadership if asked, then runs the controllers. */
  async start(): Promise<void> {
    const { options, log } = this;
    if (options.metricsListen) {
      const served = await this.metrics.serve(
        ...splitHostPort(options.metricsListen, '--metrics-listen'),
        () => this.synced,
      );
      this.metricsServer = served;
      this.metricsAddress = served.address;
    }
    await Promise.all(this.informers.map((i) => i.start()));
    this.synced = true;
    const events = new EventRecorder(options.kc, this.identity, log);
    // Every replica monitors its shards, leader or not: a failover must not wait for an
    // election.
    if (options.leaderElect) {
      this.shards = new ShardLeases({
        kc: options.kc,
        namespace: options.namespace,
        identity: this.identity,
        shards: options.monitorShards ?? 4,
        log: log.child({ subsystem: 'monitor-shards' }),
      });
      this.shards.start();
    }
    const shards = this.shards;
    this.monitor = new FailoverMonitor({
      relationships: this.relationships,
      groups: this.groups,
      nodes: this.nodes,
      lookup: this.lookup,
      agents: this.pool,
      probes: this.probes,
      transport: this.options.transport,
      objects: this.objects,
      events,
      shards: {
        owns: (key) => {
          if (!shards) return true;
          this.metrics.shardsHeld.set(shards.shards.length);
          return shards.owns(key);
        },
      },
      metrics: this.metrics,
      log: log.child({ subsystem: 'failover-monitor' }),
    });
    this.monitor.start();
    if (options.leaderElect) {
      this.elector = new LeaderElector({
        kc: options.kc,
        namespace: options.namespace,
        name: LEADER_LEASE,
        identity: this.identity,
        log: log.child({ subsystem: 'leader-election' }),
      });
      log.info({ identity: this.identity }, 'waiting for leadership');
      await this.elector.acquire();
      this.lost = this.elector.lost;
      log.info({ identity: this.identity }, 'leading');
    }
    // Everything known so far is looked at once; from then on, changes drive the queues.
    for (const r of this.relationships.list()) this.queues.relationships.add(keyOf(r));
    for (const g of this.groups.list()) this.queues.groups.add(keyOf(g));
    for (const n of this.nodes.list()) this.queues.nodes.add(n.metadata.name);
    for (const s of this.snapshots.list()) this.queues.snapshots.add(keyOf(s));
    for (const r of this.relationships.list()) {
      if (r.spec.snapshotSchedules?.length) this.queues.schedules.add(keyOf(r));
    }

    const rel = new SyncRelationshipReconciler({
      relationships: this.relationships,
      groups: this.groups,
      nodes: this.nodes,
      lookup: this.lookup,
      leaseOf: this.leaseOf,
      agents: this.pool,
      objects: this.objects,
      secret: async (namespace, name) => {
        try {
          return await this.core.readNamespacedSecret({ namespace, name });
        } catch (err) {
          if (isNotFound(err)) return undefined;
          throw err;
        }
      },
      events,
      log: log.child({ controller: 'syncrelationship' }),
    });
    const group = new ConsistencyGroupReconciler({
      groups: this.groups,
      lookup: this.lookup,
      objects: this.objects,
    });
    const node = new LockstepNodeReconciler({
      nodes: this.nodes,
      leaseOf: this.leaseOf,
      objects: this.objects,
      events,
    });
    const snapshots = new ReplicatedSnapshotReconciler({
      snapshots: this.snapshots,
      relationships: this.relationships,
      groups: this.groups,
      nodes: this.nodes,
      lookup: this.lookup,
      leaseOf: this.leaseOf,
      agents: this.pool,
      objects: this.objects,
      events,
      log: log.child({ controller: 'replicatedsnapshot' }),
    });
    const schedules = new SnapshotScheduleReconciler({
      relationships: this.relationships,
      snapshots: this.snapshots,
      objects: this.objects,
      events,
      log: log.child({ controller: 'snapshotschedule' }),
    });
    const loop = (
      name: string,
      queue: WorkQueue,
      fn: (key: string) => Promise<ReconcileResult>,
      workers: number,
    ) =>
      runControllerLoop(queue, fn, {
        name,
        workers,
        log,
        metrics: this.metrics,
      });
    const requests = this.certificateRequests;
    if (requests && options.authority) {
      const signer = new CertificateSigner({
        requests,
        authority: options.authority,
        kc: options.kc,
        namespace: options.namespace,
        metrics: this.metrics,
        log: log.child({ controller: 'certificatesigner' }),
      });
      for (const csr of requests.list())
        if (CertificateSigner.isOurs(csr)) this.queues.certificates.add(csr.metadata?.name ?? '');
      this.loops.push(
        loop('certificatesigner', this.queues.certificates, (k) => signer.reconcile(k), 2),
      );
    }
    this.loops.push(
      loop('syncrelationship', this.queues.relationships, (k) => rel.reconcile(k), 8),
      loop('consistencygroup', this.queues.groups, (k) => group.reconcile(k), 2),
      loop('lockstepnode', this.queues.nodes, (k) => node.reconcile(k), 2),
      loop('replicatedsnapshot', this.queues.snapshots, (k) => snapshots.reconcile(k), 4),
      loop('snapshotschedule', this.queues.schedules, (k) => schedules.reconcile(k), 1),
    );
    this.watcher = new AgentWatcher({
      pool: this.pool,
      agents: () =>
        this.nodes.list().map((n) => ({ node: n.metadata.name, endpoint: n.spec.endpoint })),
      onChange: (nodeName, volume) =>
        this.enqueueRelationships((r) =>
          volume === ''
            ? usesNode(r, nodeName)
            : volume.startsWith(
                agentVolumeName(r.metadata.namespace ?? '', r.spec.consistencyGroup, ''),
              ),
        ),
      intervalMs: options.agentPollMs,
      log: log.child({ subsystem: 'agent-watcher' }),
    });
    this.watcher.start();
    log.info('operator started');
  }

  async stop(): Promise<void> {
    this.monitor?.stop();
    await this.shards?.stop();
    this.watcher?.stop();
    for (const q of Object.values(this.queues)) q.shutDown();
    await Promise.all(this.loops);
    await this.elector?.release();
    await Promise.all(this.informers.map((i) => i.stop()));
    this.pool.close();
    this.probes.close();
    this.options.authority?.stop();
    await this.metricsServer?.close();
    this.log.info('operator stopped');
  }
}

function usesNode(r: SyncRelationship, node: string): boolean {
  return r.spec.source.node === node || r.spec.targets.some((t) => t.node === node);
}
