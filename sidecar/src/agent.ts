// The node agent: owns the data directory and its volumes, serves them over NBD, replicates
// them to and from peer agents, exposes the Agent control API and the Replication service over
// gRPC and metrics over HTTP. `stop()` drains and flushes everything.
import { mkdir } from 'node:fs/promises';
import type { KubeClient } from '../../lib/kube-rest/client';
import { packageVersion } from '../../lib/package-root';
import { NodeRegistration } from './k8s/node-registration';
import path from 'node:path';
import { LockstepError, errorMessage, isLockstepError } from '../../lib/errors';
import { splitHostPort } from '../../lib/host-port';
import type { Logger } from '../../lib/logger';
import { agentProto, replicationProto } from '../../proto';
import { agentHandlers } from './control/agent-service';
import { startGrpcServer, type BoundServer } from '../../lib/grpc-server';
import { ReplicatedVolume, type ReplicationContext } from './engine/replicated-volume';
import { PeerCredentials } from './replication/peer-credentials';
import type { TlsMaterial } from '../../lib/tls/tls-dir';
import type { ReplicationStatus } from './replication/replication-status';
import type { BlockDevice } from './block-device';
import { NbdServer, type ExportSource } from './frontend/nbd/server';
import { AgentMetrics } from './metrics';
import { DataListener } from './replication/data-listener';
import {
  attachLane,
  replicationCallCheck,
  replicationHandlers,
} from './replication/replica-service';
import { guardService } from '../../lib/tls/access-policy';
import { securityMetrics } from '../../lib/tls/security-metrics';
import { serverCredentials, type Transport } from '../../lib/tls/transport';
import { lockDataDir, type DataDirLock } from '../../lib/data-dir-lock';
import type { NewVolume, ReplicationMode } from './store/volume-metadata';
import { VolumeStore, type Volume } from './store/volume-store';
import { SnapshotDevice } from './snapshots/snapshot-device';
import { VERIFY_REGION, type SnapshotInfo } from './snapshots/snapshot-catalog';
import { ConsistencyGroups, type Group } from './snapshots/consistency-groups';
import { CloneBacking, cloneSourceOf, snapshotNeeded } from './snapshots/clone-backing';
import { refuseReserved, resyncProtection } from './snapshots/resync-protection';
import { DEFAULT_CUTOVER, type CutoverPolicy } from './replication/establishment';
import { handOver, snapshotAtOnePoint, type SnapshotCopy } from './engine/snapshot-barrier';
import { ZERO_GENERATION } from './replication/generations';
import { mediatorSettings } from './replication/mediator-settings';
import type { MediatorSettings__Output } from '../../proto/gen/lockstep/v1/MediatorSettings';

export interface AgentOptions {
  node: string;
  dataDir: string;
  /** gRPC control and replication API, HOST:PORT (port 0 picks a free one). */
  listen: string;
  /** The address peers dial to reach this agent; defaults to the bound --listen address. */
  advertise?: string;
  /** Replication data lanes, HOST:PORT; defaults to --listen's host and a port the OS picks. */
  dataListen?: string;
  /** The data address primaries dial; defaults to --advertise's host (else the bound one). */
  dataAdvertise?: string;
  nbdSocket?: string;
  /** Opt-in NBD over TCP, HOST:PORT. */
  nbdListen?: string;
  metricsListen?: string;
  /** A replicated op not acknowledged within this time fails the peer link. */
  peerTimeoutMs?: number;
  /** When establishing a replica gives way to live mirroring. */
  cutover?: CutoverPolicy;
  /** Register a LockstepNode and heartbeat through a Lease in this cluster. */
  register?: { kube: KubeClient; namespace: string };
  /** Mutual TLS for every listener and connection, or plaintext on purpose (--insecure). */
  transport: Transport;
  log: Logger;
}

export interface VolumeView {
  name: string;
  uuid: string;
  sizeBytes: number;
  allocatedBytes: number;
  readOnly: boolean;
  state: Volume['state'];
  error: string;
  clients: number;
  exportUri: string;
  role: string;
  replication: ReplicationStatus | undefined;
  dataPath: string;
  cloneOf: string;
  hydratedPercent: number;
}

/** What a promotion in the middle of a resync rolled the copy back to. */
export interface PromotionRollback {
  snapshot: string;
  snapshotCreatedAtMs: number;
  bytes: number;
}

export interface SnapshotView extends SnapshotInfo {
  volume: string;
  exportUri: string;
  /** Where each copy stands, for a snapshot just taken on a replicating primary. */
  copies?: SnapshotCopy[];
}

export interface CopyVerification {
  address: string;
  node: string;
  state: 'Identical' | 'Differs' | 'Missing';
  reason: string;
  differingOffsets: number[];
}

/** Writes held at most this long for a cut, unless the caller says otherwise. */
const DEFAULT_HOLD_TIMEOUT_MS = 1000;
/**
 * A peer that acknowledges nothing this long is lost. It bounds the stall a silent peer (a
 * partition, a power loss) causes before the mediator is asked (target: p99 ≤ 4 s), and stays
 * well above a loaded peer's slowest flush (~1.3 s measured).
 */
export const DEFAULT_PEER_TIMEOUT_MS = 3_000;

/** The label of the snapshot a move's switchover takes (the replicas' common base). */
export const MOVE_LABEL = 'move';

/** Snapshots are exported as VOLUME@SNAPSHOT; neither name may contain '@'. */
const SNAPSHOT_SEPARATOR = '@';

export class Agent implements ExportSource {
  readonly startedAtMs = Date.now();
  /** Start-up is over: volumes resumed, NBD listening (see GetInfoResponse.serving). */
  serving = false;
  grpcAddress = '';
  /** Where primaries open data lanes to this agent, as they should dial it. */
  dataAddress = '';
  nbdTcpAddress = '';
  metricsAddress = '';
  readonly nbd: NbdServer;
  readonly metrics: AgentMetrics;
  readonly log: Logger;
  /** Every open volume's engine, primaries and secondaries alike. */
  private readonly engines = new Map<string, ReplicatedVolume>();
  private readonly ctx: ReplicationContext;
  private grpc: BoundServer | undefined;
  private data: DataListener | undefined;
  private metricsServer: { close(): Promise<void> } | undefined;
  private stopping: Promise<void> | undefined;
  private registration: NodeRegistration | undefined;
  /** Clones still reading from their snapshot, by clone volume. */
  private readonly clones = new Map<string, CloneBacking>();
  /** Volumes being handed over to a new primary: no new NBD client until they are demoted. */
  private readonly handingOver = new Set<string>();
  /** Volumes being rolled back: not exported until it is over. */
  private readonly rollingBack = new Map<string, 'running' | 'unfinished'>();

  private constructor(
    readonly options: AgentOptions,
    readonly nbdSocket: string,
    private readonly lock: DataDirLock,
    readonly store: VolumeStore,
    private readonly groups: ConsistencyGroups,
    private readonly peerCredentials: PeerCredentials,
  ) {
    this.log = options.log;
    this.metrics = new AgentMetrics(store, options.node, () =>
      [...this.engines].map(([volume, rv]) => ({
        volume,
        role: rv.meta.role,
        replication: rv.meta.replication ? rv.status() : undefined,
        snapshots: rv.snapshots.list(),
      })),
    );
    this.nbd = new NbdServer(
      this,
      this.log.child({ subsystem: 'nbd' }),
      this.metrics.observeRequest,
      (name, n) => this.metrics.setClients(name, n),
    );
    this.ctx = {
      node: options.node,
      address: '',
      store,
      log: this.log.child({ subsystem: 'replication' }),
      ackTimeoutMs: options.peerTimeoutMs ?? DEFAULT_PEER_TIMEOUT_MS,
      transport: options.transport,
      peerTransport: (address) => peerCredentials.transportFor(address, options.transport),
      cutover: options.cutover ?? DEFAULT_CUTOVER,
      takeOver: async (volume, epoch) => {
        await this.promote(volume, true, undefined, epoch);
      },
      primaryGone: (volume) => void this.nbd.disconnectExport(volume),
      observeLeg: (volume) => this.metrics.legObserver(volume),
    };
  }

  get node(): string {
    return this.options.node;
  }

  /** The address peers reach this agent at. */
  get address(): string {
    return this.ctx.address;
  }

  static async start(options: AgentOptions): Promise<Agent> {
    const { log } = options;
    const [grpcHost] = splitHostPort(options.listen, '--listen');
    await mkdir(options.dataDir, { recursive: true, mode: 0o700 });
    const lock = await lockDataDir(options.dataDir);
    let agent: Agent | undefined;
    try {
      const store = await VolumeStore.open(options.dataDir, log.child({ subsystem: 'snapshots' }));
      for (const v of store.list()) {
        if (v.state === 'Failed')
          log.error(
            { volume: v.name, code: v.error.code, err: v.error.message },
            'volume not served',
          );
      }
      agent = new Agent(
        options,
        options.nbdSocket ?? path.join(options.dataDir, 'nbd.sock'),
        lock,
        store,
        ConsistencyGroups.load(options.dataDir),
        await PeerCredentials.load(options.dataDir, log.child({ subsystem: 'peer-credentials' })),
      );
      for (const v of store.list()) {
        if (v.state === 'Ready') agent.engines.set(v.name, new ReplicatedVolume(agent.ctx, v));
      }
      await agent.attachClones();
      // The data port is bound first: handshakes answered over gRPC advertise it.
      const [dataHost, dataPort] = options.dataListen
        ? splitHostPort(options.dataListen, '--data-listen')
        : [grpcHost, 0];
      const replicaHost = agent;
      const refused = securityMetrics(agent.metrics.registry, options.transport, log);
      agent.data = await DataListener.listen(
        dataHost,
        dataPort,
        (hello, lane) => {
          try {
            return attachLane(replicaHost, hello, lane);
          } catch (err) {
            if (isLockstepError(err, 'LOCKSTEP_ERR_PERMISSION_DENIED'))
              refused({
                service: 'data-lane',
                what: `open a data lane to ${hello.volume}`,
                caller: lane.peer,
                reason: err.message,
              });
            throw err;
          }
        },
        agent.ctx.log.child({ subsystem: 'data-lanes' }),
        options.transport,
        refused,
      );
      const [, boundDataPort] = splitHostPort(agent.data.address, 'data address');
      const advertisedHost = options.advertise
        ? splitHostPort(options.advertise, '--advertise')[0]
        : dataHost;
      agent.dataAddress =
        options.dataAdvertise ??
        `${advertisedHost.includes(':') ? `[${advertisedHost}]` : advertisedHost}:${boundDataPort}`;
      const t = options.transport;
      agent.grpc = await startGrpcServer(
        options.listen,
        [
          [agentProto().Agent.service, guardService('control', agentHandlers(agent), t, refused)],
          [
            replicationProto().Replication.service,
            guardService(
              'replication',
              replicationHandlers(agent),
              t,
              refused,
              replicationCallCheck(agent),
            ),
          ],
        ],
        serverCredentials(t),
      );
      agent.grpcAddress = agent.grpc.address.replace(/^[^:]*(?=:\d+$)/, grpcHost);
      // Peers learn our address in the handshake, so links start once it is bound.
      agent.ctx.address = options.advertise ?? agent.grpcAddress;
      for (const rv of agent.engines.values()) await rv.resume();
      await agent.resumeRollbacks();
      await agent.nbd.listenUnix(agent.nbdSocket);
      if (options.nbdListen) {
        agent.nbdTcpAddress = await agent.nbd.listenTcp(
          ...splitHostPort(options.nbdListen, '--nbd-listen'),
          options.transport,
        );
      }
      if (options.metricsListen) {
        const served = await agent.metrics.serve(
          ...splitHostPort(options.metricsListen, '--metrics-listen'),
          () => agent?.serving ?? false,
        );
        agent.metricsServer = served;
        agent.metricsAddress = served.address;
      }
      if (options.register) {
        const registration = new NodeRegistration({
          ...options.register,
          node: options.node,
          endpoint: agent.ctx.address,
          version: packageVersion,
          dataDir: options.dataDir,
          log: log.child({ subsystem: 'registration' }),
        });
        registration.start();
        agent.registration = registration;
      }
      agent.serving = true;
      log.info(
        {
          node: options.node,
          dataDir: options.dataDir,
          grpc: agent.grpcAddress,
          advertise: agent.ctx.address,
          data: agent.data.address,
          dataAdvertise: agent.dataAddress,
          nbdSocket: agent.nbdSocket,
          nbdTcp: agent.nbdTcpAddress || undefined,
          metrics: agent.metricsAddress || undefined,
          volumes: store.list().length,
        },
        'agent ready',
      );
      return agent;
    } catch (err) {
      if (agent) await agent.stop().catch(() => undefined);
      else await lock.release();
      throw err;
    }
  }

  // ---- ExportSource (NBD) and ReplicaHost (replication service) ------------------------------

  exportNames(): string[] {
    const snapshots = this.listSnapshots().map((s) => `${s.volume}${SNAPSHOT_SEPARATOR}${s.name}`);
    return [...this.engines.keys(), ...snapshots].sort();
  }

  exportDevice(name: string): BlockDevice {
    const at = name.indexOf(SNAPSHOT_SEPARATOR);
    if (at >= 0) {
      const volume = this.store.ready(name.slice(0, at));
      const snapshot = volume.snapshots.get(name.slice(at + 1)).name;
      return new SnapshotDevice(volume.snapshots, snapshot, volume.meta.sizeBytes);
    }
    if (this.rollingBack.has(name))
      throw new LockstepError(
        'LOCKSTEP_ERR_UNAVAILABLE',
        `volume ${name} is being rolled back to a snapshot`,
      );
    // A client that connected now would be taken for a writer of the old primary.
    if (this.handingOver.has(name))
      throw new LockstepError(
        'LOCKSTEP_ERR_UNAVAILABLE',
        `volume ${name} is being handed over to a new primary`,
      );
    const rv = this.engines.get(name);
    if (rv) return rv;
    this.store.ready(name); // throws the reason: unknown, or failed with its file named
    throw new LockstepError('LOCKSTEP_ERR_VOLUME_FAILED', `volume ${name} is not open`);
  }

  replicated(name: string): ReplicatedVolume | undefined {
    return this.engines.get(name);
  }

  async createReplica(spec: NewVolume): Promise<ReplicatedVolume> {
    const volume = await this.store.create(spec);
    if (volume.state !== 'Ready') throw volume.error;
    const rv = new ReplicatedVolume(this.ctx, volume);
    this.engines.set(spec.name, rv);
    return rv;
  }

  // ---- the control API -------------------------------------------------------------------

  exportUri(name: string): string {
    return `nbd+unix:///${name}?socket=${this.nbdSocket}`;
  }

  view(volume: Volume): VolumeView {
    const ready = volume.state === 'Ready';
    const rv = this.engines.get(volume.name);
    return {
      name: volume.name,
      uuid: ready ? volume.meta.uuid : '',
      sizeBytes: ready ? volume.meta.sizeBytes : 0,
      allocatedBytes: this.store.allocatedBytes(volume),
      readOnly: rv ? rv.readOnly : false,
      state: volume.state,
      error: ready ? '' : volume.error.message,
      clients: this.nbd.clientsOf(volume.name),
      exportUri: ready ? this.exportUri(volume.name) : '',
      role: ready ? volume.meta.role : '',
      replication: rv?.meta.replication ? rv.status() : undefined,
      dataPath: ready ? (volume.meta.dataPath ?? '') : '',
      ...this.cloneView(volume.name),
    };
  }

  volumes(): VolumeView[] {
    return this.store.list().map((v) => this.view(v));
  }

  volume(name: string): VolumeView {
    return this.view(this.store.get(name));
  }

  private replicaOf(name: string): ReplicatedVolume {
    const rv = this.engines.get(name);
    if (rv) return rv;
    this.store.ready(name);
    throw new LockstepError('LOCKSTEP_ERR_VOLUME_FAILED', `volume ${name} is not open`);
  }

  async createVolume(spec: {
    name: string;
    sizeBytes?: number;
    readOnly: boolean;
    dataPath?: string;
    secondaryOfUuid?: string;
    members?: readonly string[];
  }): Promise<VolumeView> {
    const { name, dataPath, secondaryOfUuid } = spec;
    const members = secondaryOfUuid === undefined ? [] : [...(spec.members ?? [])];
    const existing = dataPath === undefined ? undefined : this.engines.get(name);
    if (existing) {
      // The operator repeats its requests: the same file (and identity) is the same volume.
      const same =
        existing.meta.dataPath === dataPath &&
        (secondaryOfUuid === undefined || existing.uuid === secondaryOfUuid);
      if (same) return this.volume(name);
      throw new LockstepError(
        'LOCKSTEP_ERR_VOLUME_EXISTS',
        `volume ${name} already exists here with data file ${existing.meta.dataPath ?? '(in the data dir)'} and UUID ${existing.uuid}`,
      );
    }
    const rv = await this.createReplica({
      name,
      sizeBytes: spec.sizeBytes,
      readOnly: spec.readOnly,
      dataPath,
      ...(secondaryOfUuid === undefined
        ? {}
        : { uuid: secondaryOfUuid, role: 'secondary', generation: ZERO_GENERATION }),
      ...(members.length > 0 ? { members } : {}),
    });
    this.log.info(
      {
        volume: name,
        sizeBytes: rv.sizeBytes,
        readOnly: spec.readOnly,
        uuid: rv.uuid,
        dataPath,
        role: rv.meta.role,
      },
      'volume created',
    );
    return this.volume(name);
  }

  async replicate(
    name: string,
    targets: string[],
    mode: ReplicationMode,
    regionSize: number,
    maxResyncBytesPerSecond: number,
    replaceTargets = false,
    mediator?: MediatorSettings__Output | null,
  ): Promise<VolumeView> {
    if (targets.length === 0)
      throw new LockstepError(
        'LOCKSTEP_ERR_INVALID_ARGUMENT',
        'replicate needs at least one --to HOST:PORT',
      );
    for (const t of targets) splitHostPort(t, '--to');
    const rv = this.replicaOf(name);
    const mediatorConfig = mediatorSettings(mediator, rv.uuid);
    await rv.configure(
      targets,
      mode,
      regionSize,
      maxResyncBytesPerSecond,
      replaceTargets,
      mediatorConfig,
    );
    this.log.info(
      {
        volume: name,
        targets,
        mode,
        regionSize,
        maxResyncBytesPerSecond,
        replaceTargets,
        mediator: mediatorConfig,
      },
      'replication configured',
    );
    return this.volume(name);
  }

  async stopReplication(name: string): Promise<VolumeView> {
    await this.replicaOf(name).stopReplication();
    return this.volume(name);
  }

  /**
   * Makes the copy the primary. One that a resync was catching up holds a mix of old and new
   * regions; it is rolled back to the snapshot it took before the resync began, so that what
   * is promoted is a state the primary really had.
   */
  async promote(
    name: string,
    force: boolean,
    replicateTo?: string[],
    /** The epoch an automatic failover was granted (otherwise the promotion asks for one). */
    grantedEpoch?: number,
  ): Promise<{ volume: VolumeView; rolledBack?: PromotionRollback }> {
    const rv = this.replicaOf(name);
    const { snapshots } = this.store.ready(name);
    const protection = rv.role === 'secondary' ? resyncProtection(snapshots) : undefined;
    for (const t of replicateTo ?? []) splitHostPort(t, 'replicate_to');
    if (!protection) {
      await rv.promote(force, false, replicateTo, grantedEpoch);
      return { volume: this.volume(name) };
    }
    // The intent first. A crash before the promotion leaves a secondary that nothing wrote to
    // (the intent is dropped on restart); after it, a primary whose rollback is finished
    // before it is served.
    await snapshots.beginRollback(protection.name);
    this.rollingBack.set(name, 'running');
    try {
      await rv.promote(force, true, replicateTo, grantedEpoch);
    } catch (err) {
      this.rollingBack.delete(name);
      await snapshots.endRollback();
      throw err;
    }
    const bytes = await this.rollBack(name, protection.name);
    await snapshots.delete(protection.name);
    const rolledBack = {
      snapshot: protection.name,
      snapshotCreatedAtMs: protection.createdAtMs,
      bytes,
    };
    this.log.warn(
      { volume: name, ...rolledBack },
      'promoted in the middle of a resync: rolled back to the snapshot taken before it began',
    );
    return { volume: this.volume(name), rolledBack };
  }

  discardPeer(name: string, peer: string): VolumeView {
    this.replicaOf(name).discardPeer(peer);
    return this.volume(name);
  }

  async demote(name: string): Promise<VolumeView> {
    await this.replicaOf(name).demote();
    return this.volume(name);
  }

  /**
   * The switchover of a move (lib/group-move.ts): with their writes held, the volumes still
   * primary here are handed over if `to` holds every acknowledged write — clients cut off (a
   * held write is sent again to `to`), a snapshot on every in-sync copy (what the other
   * replicas resync from once `to` is their primary), demoted (engine/snapshot-barrier.ts).
   */
  async handover(
    volumes: string[],
    to: string,
    snapshot: string,
  ): Promise<{ volumes: VolumeView[]; holdMs: number }> {
    const members = volumes.map((v) => this.replicaOf(v)).filter((rv) => rv.role === 'primary');
    let holdMs = 0;
    let stepsMs = {};
    if (members.length > 0) {
      for (const rv of members) this.handingOver.add(rv.volumeName);
      try {
        const taken = await handOver(members, snapshot, MOVE_LABEL, {
          to,
          holdTimeoutMs: DEFAULT_HOLD_TIMEOUT_MS,
          // Not awaited: the requests those clients have in flight wait for the demotion.
          cutClients: (rv) => void this.nbd.disconnectExport(rv.volumeName),
        });
        holdMs = taken.holdMs;
        stepsMs = taken.stepsMs;
      } finally {
        for (const rv of members) this.handingOver.delete(rv.volumeName);
      }
    }
    this.log.info({ volumes, to, snapshot, holdMs, stepsMs }, 'handed over to the new primary');
    return { volumes: volumes.map((v) => this.volume(v)), holdMs };
  }

  // ---- snapshots -------------------------------------------------------------------------

  private snapshotView(volume: string, s: SnapshotInfo): SnapshotView {
    return { ...s, volume, exportUri: this.exportUri(`${volume}${SNAPSHOT_SEPARATOR}${s.name}`) };
  }

  /**
   * Takes a snapshot at one write-order point: on this copy and, if it is a replicating
   * primary, on every peer copy in sync (the others are listed as lacking it).
   */
  async createSnapshot(
    volume: string,
    name: string,
    label: string,
    retain = 0,
  ): Promise<SnapshotView & { holdMs: number }> {
    const rv = this.replicaOf(volume);
    const { snapshots, holdMs } = await snapshotAtOnePoint([rv], name, label, {
      hold: true,
      holdTimeoutMs: DEFAULT_HOLD_TIMEOUT_MS,
    });
    const [taken] = snapshots;
    this.log.info(
      {
        volume,
        snapshot: name,
        label,
        holdMs,
        copies: taken.copies.map((c) => `${c.node || c.address}:${c.state}`),
      },
      'snapshot created',
    );
    await this.retain(volume, label, retain);
    return { ...this.snapshotView(volume, taken), copies: taken.copies, holdMs };
  }

  /**
   * Keeps the newest `keep` snapshots labelled `label`, deleting older ones (on every copy, as
   * any delete on a primary). One a clone still reads from is kept, and said so.
   */
  private async retain(volume: string, label: string, keep: number): Promise<void> {
    if (!label || keep <= 0) return;
    const labelled = this.store
      .ready(volume)
      .snapshots.list()
      .filter((s) => s.label === label);
    for (const old of labelled.slice(0, Math.max(0, labelled.length - keep))) {
      try {
        await this.deleteSnapshot(volume, old.name, true);
      } catch (err) {
        this.log.warn(
          { volume, snapshot: old.name, label, err: errorMessage(err) },
          'snapshot past its retention kept',
        );
      }
    }
  }

  // ---- clones -----------------------------------------------------------------------------

  private cloneView(name: string): { cloneOf: string; hydratedPercent: number } {
    const backing = this.clones.get(name);
    if (!backing) return { cloneOf: '', hydratedPercent: 100 };
    const { present, blocks } = backing.progress;
    return {
      cloneOf: `${backing.source.volume}${SNAPSHOT_SEPARATOR}${backing.source.snapshot}`,
      hydratedPercent: Math.floor((1000 * present) / blocks) / 10,
    };
  }

  /**
   * A new volume from a snapshot, usable at once, hydrated in the background. A clone of a
   * replicating primary's volume is replicated to the same peers, each of which builds its copy
   * from its own copy of the snapshot: no data crosses the network (a peer that lacks the
   * snapshot gets a baseline instead).
   */
  async cloneSnapshot(volume: string, snapshot: string, newVolume: string): Promise<VolumeView> {
    const source = this.store.ready(volume);
    const snap = source.snapshots.get(snapshot);
    await this.makeClone(volume, snapshot, {
      name: newVolume,
      sizeBytes: source.meta.sizeBytes,
      readOnly: false,
    });
    this.log.info({ volume: newVolume, source: `${volume}@${snapshot}` }, 'clone created');
    const rv = this.replicaOf(volume);
    const repl = rv.meta.replication;
    if (rv.role === 'primary' && repl && repl.peers.length > 0) {
      const clone = this.replicaOf(newVolume);
      const built = await Promise.allSettled(
        rv
          .snapshotPeers()
          .ready.map((link) => link.cloneSnapshot(snap, newVolume, clone.uuid, clone.generation)),
      );
      for (const r of built) {
        if (r.status === 'rejected')
          this.log.warn(
            { volume: newVolume, err: errorMessage(r.reason) },
            'a peer could not build the clone from its snapshot: it gets a baseline',
          );
      }
      await this.replicate(
        newVolume,
        repl.peers.map((p) => p.address),
        repl.mode,
        repl.regionSize,
        repl.maxResyncBytesPerSecond,
      );
    }
    return this.volume(newVolume);
  }

  /** A secondary copy of a primary's clone, built from this agent's copy of the snapshot. */
  async cloneReplica(source: string, snapshot: string, spec: NewVolume): Promise<void> {
    await this.makeClone(source, snapshot, spec);
  }

  private async makeClone(source: string, snapshot: string, spec: NewVolume): Promise<void> {
    this.store.ready(source).snapshots.get(snapshot);
    const created = await this.store.create(spec);
    if (created.state !== 'Ready') throw created.error;
    await CloneBacking.create(created.dir, { volume: source, snapshot });
    await this.attachClone(spec.name);
    this.engines.set(spec.name, new ReplicatedVolume(this.ctx, created));
  }

  /** Resumes the clones that were not hydrated when the agent stopped. */
  private async attachClones(): Promise<void> {
    for (const v of this.store.list()) {
      if (v.state !== 'Ready' || !cloneSourceOf(v.dir)) continue;
      try {
        await this.attachClone(v.name);
      } catch (err) {
        // Without its snapshot a clone has no data to serve: not exported, and said why.
        this.engines.delete(v.name);
        this.log.error({ volume: v.name, err: errorMessage(err) }, 'clone cannot be served');
      }
    }
  }

  private async attachClone(name: string): Promise<void> {
    const clone = this.store.ready(name);
    const from = cloneSourceOf(clone.dir);
    if (!from) return;
    const source = this.store.ready(from.volume);
    const device = clone.device;
    const backing = await CloneBacking.open(
      clone.dir,
      from,
      source.snapshots,
      clone.meta.sizeBytes,
      (offset, data) => device.writeBelow(offset, data),
      () => device.flush(),
      this.log.child({ volume: name }),
      () => {
        device.setBacking(undefined);
        this.clones.delete(name);
      },
    );
    // Every block may hold the snapshot's data: scans and block status must not skip any.
    device.allocation.markWritten(0, clone.meta.sizeBytes);
    device.setBacking(backing);
    this.clones.set(name, backing);
    backing.startHydration();
  }

  /** Refuses to let go of a snapshot (or a whole volume) that an unhydrated clone reads from. */
  refuseIfCloned(volume: string, snapshot?: string): void {
    for (const [clone, backing] of this.clones) {
      const s = backing.source;
      if (s.volume === volume && (snapshot === undefined || s.snapshot === snapshot))
        throw snapshotNeeded(s.volume, s.snapshot, clone);
    }
  }

  // ---- consistency groups ---------------------------------------------------------------------

  async createGroup(name: string, volumes: string[]): Promise<Group> {
    for (const v of volumes) this.store.ready(v);
    const group = await this.groups.create(name, volumes);
    this.log.info({ group: name, volumes }, 'consistency group created');
    return group;
  }

  listGroups(): Group[] {
    return this.groups.list();
  }

  async deleteGroup(name: string): Promise<void> {
    await this.groups.delete(name);
  }

  /** Snapshots every member of a group at one write-order point (see snapshot-barrier.ts). */
  async snapshotGroup(
    group: string,
    name: string,
    label: string,
    opts: { hold: boolean; holdTimeoutMs?: number; retain?: number },
  ): Promise<{ group: string; name: string; snapshots: SnapshotView[]; holdMs: number }> {
    const members = this.groups.get(group).volumes.map((v) => this.replicaOf(v));
    const taken = await snapshotAtOnePoint(members, name, label, {
      hold: opts.hold,
      holdTimeoutMs: opts.holdTimeoutMs || DEFAULT_HOLD_TIMEOUT_MS,
    });
    this.log.info(
      { group, snapshot: name, label, hold: opts.hold, holdMs: taken.holdMs },
      'group snapshot created',
    );
    for (const s of taken.snapshots) await this.retain(s.volume, label, opts.retain ?? 0);
    return {
      group,
      name,
      holdMs: taken.holdMs,
      snapshots: taken.snapshots.map((s) => ({
        ...this.snapshotView(s.volume, s),
        copies: s.copies,
      })),
    };
  }

  /**
   * Compares the snapshot's per-region digests on this copy with every peer copy's: identical,
   * or exactly which regions differ on which copy.
   */
  async verifySnapshot(
    volume: string,
    name: string,
  ): Promise<{
    volume: string;
    name: string;
    identical: boolean;
    regionSize: number;
    copies: CopyVerification[];
  }> {
    const rv = this.replicaOf(volume);
    const local = await rv.snapshots.digests(name);
    const copies: CopyVerification[] = [
      {
        address: rv.localAddress,
        node: rv.localNode,
        state: 'Identical',
        reason: '',
        differingOffsets: [],
      },
    ];
    for (const link of rv.peerLinks()) {
      const base = { address: link.address, node: link.node, differingOffsets: [] as number[] };
      try {
        const remote = await link.snapshotDigests(name, rv.snapshots.get(name).uid);
        const differing: number[] = [];
        for (let at = 0; at < local.length; at += 16) {
          if (local.compare(remote.digests, at, at + 16, at, at + 16) !== 0)
            differing.push((at / 16) * remote.regionSize);
        }
        copies.push({
          ...base,
          state:
            differing.length === 0 && remote.digests.length === local.length
              ? 'Identical'
              : 'Differs',
          reason: differing.length === 0 ? '' : `${differing.length} region(s) differ`,
          differingOffsets: differing,
        });
      } catch (err) {
        copies.push({ ...base, state: 'Missing', reason: errorMessage(err) });
      }
    }
    const identical = copies.every((c) => c.state === 'Identical');
    this.log.info(
      { volume, snapshot: name, identical, copies: copies.length },
      'snapshot verified',
    );
    return { volume, name, identical, regionSize: VERIFY_REGION, copies };
  }

  listSnapshots(volume?: string): SnapshotView[] {
    const volumes = volume ? [this.store.ready(volume)] : this.store.list();
    return volumes.flatMap((v) =>
      v.state === 'Ready' ? v.snapshots.list().map((s) => this.snapshotView(v.name, s)) : [],
    );
  }

  async deleteSnapshot(volume: string, name: string, force: boolean): Promise<void> {
    const { snapshots } = this.store.ready(volume);
    refuseReserved(volume, snapshots.get(name), true);
    this.refuseIfCloned(volume, name);
    // A rollback in progress or left unfinished (resumed on restart) still reads it.
    if (snapshots.interruptedRollback() === name)
      throw new LockstepError(
        'LOCKSTEP_ERR_SNAPSHOT_IN_USE',
        `volume ${volume} is being rolled back to snapshot ${name}; finish the rollback ` +
          `(lockstep ctl snapshot rollback ${volume} ${name}) before deleting it`,
      );
    const clients = await this.detachClients(
      `${volume}${SNAPSHOT_SEPARATOR}${name}`,
      force,
      'LOCKSTEP_ERR_SNAPSHOT_IN_USE',
      'snapshot',
    );
    // A replicated snapshot goes from every copy, all at once: the call waits for the slowest
    // disk, not for the sum of them. A copy that cannot be told now keeps its copy until the
    // next snapshot of the same name replaces it; if this copy's delete fails, the caller is
    // told and may repeat it (dropping a snapshot a copy no longer has is a no-op).
    const links = this.engines.get(volume)?.peerLinks() ?? [];
    const [here, ...dropped] = await Promise.allSettled([
      snapshots.delete(name),
      ...links.map((l) => l.dropSnapshot(name)),
    ]);
    const failed = dropped.flatMap((r, i) =>
      r.status === 'rejected' ? [`${links[i].address}: ${errorMessage(r.reason)}`] : [],
    );
    if (here.status === 'rejected') throw here.reason;
    if (failed.length > 0)
      this.log.warn({ volume, snapshot: name, failed }, 'snapshot not deleted on some copies');
    this.log.info({ volume, snapshot: name, disconnectedClients: clients }, 'snapshot deleted');
  }

  /**
   * Writes the snapshot's contents back over every block changed since it, through the
   * volume's engine: replicated like any write, and saved for newer snapshots. Resumable: the
   * intent is recorded first, and an agent restarted mid-way finishes it before serving.
   */
  async rollbackSnapshot(volume: string, name: string): Promise<VolumeView> {
    const rv = this.replicaOf(volume);
    const { snapshots } = this.store.ready(volume);
    snapshots.get(name);
    if (rv.meta.role === 'secondary')
      throw new LockstepError(
        'LOCKSTEP_ERR_NOT_ALLOWED',
        `volume ${volume} is a secondary copy; roll back its primary, which replicates the result`,
      );
    const clients = this.nbd.clientsOf(volume);
    if (clients > 0)
      throw new LockstepError(
        'LOCKSTEP_ERR_VOLUME_IN_USE',
        `volume ${volume} has ${clients} NBD client(s) attached; detach them before rolling it back`,
      );
    if (this.rollingBack.get(volume) === 'running')
      throw new LockstepError(
        'LOCKSTEP_ERR_VOLUME_IN_USE',
        `volume ${volume} is already being rolled back`,
      );
    const unfinished = snapshots.interruptedRollback();
    if (unfinished !== undefined && unfinished !== name)
      throw new LockstepError(
        'LOCKSTEP_ERR_VOLUME_IN_USE',
        `volume ${volume} has an unfinished rollback to snapshot ${unfinished}; run it again first`,
      );
    await snapshots.beginRollback(name);
    await this.rollBack(volume, name);
    return this.volume(volume);
  }

  /** Writes the snapshot back over what changed since it; the bytes written. */
  private async rollBack(volume: string, name: string): Promise<number> {
    const rv = this.replicaOf(volume);
    const { snapshots } = this.store.ready(volume);
    this.rollingBack.set(volume, 'running');
    const started = performance.now();
    let done = false;
    try {
      let bytes = 0;
      // Contiguous blocks, up to 1 MiB, in one read and one write.
      for (const [block, count] of snapshots.changedBlocks(name).pieces(256)) {
        const data = Buffer.allocUnsafe(count * 4096);
        await snapshots.read(name, block * 4096, data);
        await rv.write(block * 4096, data, false);
        bytes += data.length;
      }
      await rv.flush();
      await snapshots.endRollback();
      done = true;
      this.log.info(
        { volume, snapshot: name, bytes, ms: Math.round(performance.now() - started) },
        'volume rolled back to snapshot',
      );
      return bytes;
    } finally {
      // Half rolled back, the volume is neither the snapshot nor what it was: not served
      // until the rollback is run again to its end (and never finished later over new writes).
      if (done) this.rollingBack.delete(volume);
      else this.rollingBack.set(volume, 'unfinished');
    }
  }

  /** Finishes rollbacks (and promotions' rollbacks) a crash interrupted, before serving. */
  private async resumeRollbacks(): Promise<void> {
    for (const v of this.store.list()) {
      if (v.state !== 'Ready') continue;
      const snapshot = v.snapshots.interruptedRollback();
      const protection = resyncProtection(v.snapshots);
      try {
        if (snapshot !== undefined && v.meta.role === 'secondary') {
          // On a secondary it can only be a promotion's, which never began writing (its writes
          // come after the promotion): nothing to finish.
          await v.snapshots.endRollback();
          continue;
        }
        if (snapshot !== undefined) {
          this.log.warn({ volume: v.name, snapshot }, 'finishing an interrupted rollback');
          await this.rollBack(v.name, snapshot);
        }
        // A primary's protection is one its promotion rolled back to, then crashed.
        if (protection && v.meta.role === 'primary') await v.snapshots.delete(protection.name);
      } catch (err) {
        // One volume's failure does not keep the agent (and its other volumes) down.
        this.log.error(
          { volume: v.name, snapshot, err: errorMessage(err) },
          'rollback not finished; the volume is not served until it is run again',
        );
      }
    }
  }

  async deleteVolume(name: string, force: boolean): Promise<void> {
    this.refuseIfCloned(name);
    const clients = await this.closeVolume(name, force);
    await this.store.delete(name);
    this.log.info({ volume: name, force, disconnectedClients: clients }, 'volume deleted');
  }

  async releaseVolume(name: string, force: boolean): Promise<void> {
    const volume = this.store.releasable(name);
    const clients = await this.closeVolume(name, force);
    await this.store.release(name);
    this.log.info(
      { volume: name, force, disconnectedClients: clients, dataFile: volume.dataFile },
      'volume released; data file kept',
    );
  }

  /** Disconnects an export's NBD clients (with force) or refuses; how many there were. */
  private async detachClients(
    exportName: string,
    force: boolean,
    code: 'LOCKSTEP_ERR_VOLUME_IN_USE' | 'LOCKSTEP_ERR_SNAPSHOT_IN_USE',
    what: string,
  ): Promise<number> {
    const clients = this.nbd.clientsOf(exportName);
    if (clients > 0) {
      if (!force) {
        throw new LockstepError(
          code,
          `${what} ${exportName} has ${clients} NBD client(s) attached; disconnect them or use --force`,
        );
      }
      await this.nbd.disconnectExport(exportName);
    }
    return clients;
  }

  /** Disconnects (with force) or refuses NBD clients, and stops the volume's replication engine. */
  private async closeVolume(name: string, force: boolean): Promise<number> {
    this.store.get(name);
    const clients = await this.detachClients(name, force, 'LOCKSTEP_ERR_VOLUME_IN_USE', 'volume');
    const rv = this.engines.get(name);
    this.engines.delete(name);
    await rv?.close();
    await this.clones.get(name)?.close();
    this.clones.delete(name);
    this.metrics.forgetVolume(name);
    return clients;
  }

  /** See PeerCredentials.set. */
  setPeerCredentials(
    address: string,
    material: TlsMaterial,
  ): Promise<{ identity: string; notAfter: Date; changed: boolean }> {
    if (!this.options.transport.secure)
      throw new LockstepError(
        'LOCKSTEP_ERR_NOT_ALLOWED',
        'this agent runs without TLS (--insecure): it cannot use peer credentials',
      );
    return this.peerCredentials.set(address, material);
  }

  /** Drains NBD requests in flight, stops replication cleanly, flushes, closes. Idempotent. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      this.log.info('agent stopping: draining NBD requests');
      this.registration?.stop();
      await this.nbd.shutdown();
      await this.data?.close();
      for (const rv of this.engines.values()) await rv.close();
      for (const backing of this.clones.values()) await backing.close();
      await this.store.flushAll();
      await this.store.saveAllocationMaps();
      await this.grpc?.close();
      await this.metricsServer?.close();
      await this.store.close();
      this.peerCredentials.close();
      await this.lock.release();
      this.log.info('agent stopped; all volumes flushed');
    })();
    return this.stopping;
  }
}
