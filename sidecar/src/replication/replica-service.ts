// The secondary's control side of replication: answers a primary's handshake (creating the copy
// on first contact, opening a session for its data lanes), serves region checksums for
// checksum-based resync, and takes generation changes. The data lanes themselves arrive on the
// data port (data-listener.ts) and are bound to the session by `attachLane`.
import { LockstepError } from '../../../lib/errors';
import { unary } from '../../../lib/grpc-errors';
import type { Logger } from '../../../lib/logger';
import type { CallCheck } from '../../../lib/tls/access-policy';
import type { ReplicationHandlers } from '../../../proto';
import type { FileBlockDevice } from '../store/file-device';
import { changedRegions, newestCommon } from '../snapshots/common-snapshot';
import { commitEstablished, resyncProtection } from '../snapshots/resync-protection';
import { VERIFY_REGION, type SnapshotCatalog } from '../snapshots/snapshot-catalog';
import {
  REPLICATION_MODES,
  type NewVolume,
  type ReplicationMode,
  type Role,
} from '../store/volume-metadata';
import { validateVolumeName } from '../store/volume-store';
import { DirtyBitmap } from '../tracking/dirty-bitmap';
import type { Hello } from './frames';
import { ZERO_GENERATION, type Generations } from './generations';
import type { LaneBinding, ReplicaLane } from './replica-lane';
import { mediatorSettings } from './mediator-settings';
import { CHECKSUM_SPAN, listRegionDigests } from './resync';
import type { PrimaryHello } from './secondary-session';

/** A volume as a primary's calls reach it on this agent (the engine implements it). */
export interface ReplicaVolume {
  readonly uuid: string;
  readonly sizeBytes: number;
  readonly role: Role;
  /** A secondary's primary, by node. */
  readonly primaryNode: string | undefined;
  /** A primary's replicas, by node (as their certificates named them when they answered). */
  readonly peerNodes: readonly string[];
  /** A secondary's list of the relationship's nodes (see VolumeMetadata.members). */
  readonly listedNodes: readonly string[];
  readonly generation: Generations;
  /** The newest epoch this copy has seen. */
  readonly epoch: number;
  /** The local copy, read by checksum scans. */
  readonly local: FileBlockDevice;
  /** The copy's snapshots: replicated ones are taken and dropped at the primary's request. */
  readonly snapshots: SnapshotCatalog;
  /** A session for the primary's data lanes (empty if this copy is a primary), and its view. */
  acceptPrimary(primary: PrimaryHello): Promise<{ differs: Buffer; session: string }>;
  adoptGeneration(gen: Generations, epoch: number): Promise<void>;
  /** A primary with a newer epoch reached this one: it stops being a primary. */
  stepDown(reason: string): Promise<void>;
  primaryLeaving(): void;
  adoptMembers(members: readonly string[]): Promise<void>;
  attachLane(token: string, index: number, epoch: number, lane: ReplicaLane): LaneBinding;
}

export interface ReplicaHost {
  readonly node: string;
  /** Where primaries open data lanes to this agent, as they should dial it. */
  readonly dataAddress: string;
  readonly log: Logger;
  replicated(name: string): ReplicaVolume | undefined;
  createReplica(spec: NewVolume): Promise<ReplicaVolume>;
  /** A secondary copy of a clone, made of this agent's copy of the snapshot. */
  cloneReplica(source: string, snapshot: string, spec: NewVolume): Promise<void>;
  /** Throws if a clone here still reads from the snapshot (it must not go under it). */
  refuseIfCloned(volume: string, snapshot: string): void;
}

function needVolume(host: ReplicaHost, name: string): ReplicaVolume {
  const rv = host.replicated(name);
  if (!rv)
    throw new LockstepError(
      'LOCKSTEP_ERR_VOLUME_NOT_FOUND',
      `volume ${JSON.stringify(name)} does not exist on node ${host.node}`,
    );
  return rv;
}

/** The volume, if it is a copy of the primary's (same UUID). */
function sameVolume(host: ReplicaHost, name: string, uuid: string): ReplicaVolume {
  const rv = needVolume(host, name);
  if (rv.uuid !== uuid)
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      `volume ${name} on node ${host.node} has UUID ${rv.uuid}, not the primary's ${uuid}`,
    );
  return rv;
}

/** Throws unless this copy's snapshot of that name is the primary's (same uid). */
function sameSnapshot(
  host: ReplicaHost,
  snapshots: SnapshotCatalog,
  volume: string,
  name: string,
  uid: string,
): void {
  const snapshot = snapshots.get(name);
  if (snapshot.uid !== uid)
    throw new LockstepError(
      'LOCKSTEP_ERR_SNAPSHOT_NOT_FOUND',
      `snapshot ${volume}@${name} on node ${host.node} is another snapshot of that name ` +
        `(${snapshot.uid || 'local'}, not ${uid}): this copy never took the primary's`,
    );
}

/**
 * The replication service's rules per request, for an agent's certificate (access-policy.ts
 * has already let only agents in): an agent speaks only for its own node, and a secondary takes
 * its primary's calls only from that primary's node.
 */
export function replicationCallCheck(host: ReplicaHost): CallCheck {
  return (method, caller, request) => {
    const req = request as { volume?: string; primaryNode?: string };
    if (method !== 'Handshake') return refusedPeer(host, req.volume ?? '', caller.name);
    if (req.primaryNode !== caller.name)
      return `its certificate is node ${caller.name}'s, and it may not speak for node ${req.primaryNode}`;
    // A newer primary replaces a primary copy (a failover, a move): only one of its own replicas
    // can have become that, so no other node may make it step down.
    const copy = host.replicated(req.volume ?? '');
    if (copy?.role === 'primary' && !copy.peerNodes.includes(caller.name))
      return (
        `volume ${req.volume} on node ${host.node} is a primary and node ${caller.name} is not ` +
        `one of its replicas (${copy.peerNodes.join(', ') || 'it has none'})`
      );
    // A secondary takes a new primary (a failover, a move) only from its relationship's nodes:
    // a valid agent certificate alone must not let another node take over its copy.
    if (copy?.role === 'secondary') return refusedNewPrimary(host, req.volume!, copy, caller.name);
    return undefined;
  };
}

function refusedNewPrimary(
  host: ReplicaHost,
  volume: string,
  copy: ReplicaVolume,
  node: string,
): string | undefined {
  const primary = copy.primaryNode;
  if (node === primary || copy.listedNodes.includes(node)) return undefined;
  // A copy created ahead with no list takes its first primary from anyone: the control plane
  // created it, and whoever first handshakes is the one it was created for.
  if (primary === undefined && copy.listedNodes.length === 0) return undefined;
  const from = primary === undefined ? 'has no primary yet' : `replicates from node ${primary}`;
  const members = copy.listedNodes.length > 0 ? copy.listedNodes.join(', ') : (primary ?? '');
  return (
    `volume ${volume} on node ${host.node} ${from}, and node ${node} is not a node of its ` +
    `relationship (${members}): its primary adds a node before that node may take over`
  );
}

/**
 * Why `node` may not act as the primary of this agent's copy of `volume`, if it may not. Only
 * a primary calls a copy (a new one through its handshake first), so a primary takes no calls.
 */
export function refusedPeer(host: ReplicaHost, volume: string, node: string): string | undefined {
  const copy = host.replicated(volume);
  if (!copy) return undefined;
  if (copy.role === 'primary')
    return `volume ${volume} on node ${host.node} is a primary: it takes no primary's calls`;
  const primary = copy.primaryNode;
  if (primary === undefined || primary === node) return undefined;
  return `volume ${volume} on node ${host.node} replicates from node ${primary}, not from node ${node}`;
}

export function replicationHandlers(host: ReplicaHost): ReplicationHandlers {
  return {
    Handshake: unary(async (req) => {
      validateVolumeName(req.volume);
      const mode = req.mode as ReplicationMode;
      if (!REPLICATION_MODES.includes(mode)) {
        throw new LockstepError(
          'LOCKSTEP_ERR_INVALID_ARGUMENT',
          `unknown replication mode ${JSON.stringify(req.mode)}`,
        );
      }
      DirtyBitmap.regionCountOf(req.sizeBytes, req.regionSize); // rejects a bad geometry clearly
      let rv = host.replicated(req.volume);
      if (!rv) {
        if (!req.createIfMissing) needVolume(host, req.volume);
        rv = await host.createReplica({
          name: req.volume,
          sizeBytes: req.sizeBytes,
          uuid: req.uuid,
          role: 'secondary',
          generation: ZERO_GENERATION,
          replication: {
            mode,
            regionSize: req.regionSize,
            maxResyncBytesPerSecond: 0,
            peers: [{ address: req.primaryAddress, node: req.primaryNode, bitmapUuid: null }],
          },
        });
        host.log.info(
          { volume: req.volume, primary: req.primaryAddress, sizeBytes: req.sizeBytes },
          'replica created',
        );
      }
      if (rv.uuid !== req.uuid) {
        throw new LockstepError(
          'LOCKSTEP_ERR_INVALID_ARGUMENT',
          `volume ${req.volume} on node ${host.node} has UUID ${rv.uuid} but the primary's is ${req.uuid}: ` +
            'a different volume with the same name; delete one or use another name',
        );
      }
      if (rv.sizeBytes !== req.sizeBytes) {
        throw new LockstepError(
          'LOCKSTEP_ERR_INVALID_ARGUMENT',
          `volume ${req.volume} on node ${host.node} is ${rv.sizeBytes} bytes, the primary's ${req.sizeBytes}`,
        );
      }
      if (req.epoch < rv.epoch) {
        throw new LockstepError(
          'LOCKSTEP_ERR_STALE_EPOCH',
          `volume ${req.volume} on node ${host.node} has seen epoch ${rv.epoch}; ` +
            `${req.primaryAddress} writes in epoch ${req.epoch}: it was replaced and must not write`,
        );
      }
      if (rv.role === 'primary' && req.epoch > rv.epoch) {
        await rv.stepDown(
          `${req.primaryAddress} is primary in epoch ${req.epoch}, newer than this copy's ${rv.epoch}`,
        );
      }
      const { differs, session } = await rv.acceptPrimary({
        address: req.primaryAddress,
        node: req.primaryNode,
        mode,
        regionSize: req.regionSize,
        generation: req.generation?.current ?? '',
        epoch: req.epoch,
        self: req.peerAddress,
        mediator: mediatorSettings(req.mediator, req.uuid),
        members: req.members,
      });
      const protection = resyncProtection(rv.snapshots);
      return {
        node: host.node,
        role: rv.role,
        generation: rv.generation,
        differs,
        // Created just now, or created ahead (the operator makes a target's copy first) and never
        // written since: a baseline need not send the primary's zeroes, terabytes of them perhaps.
        fresh: !rv.local.allocation.mayHoldData(0, rv.sizeBytes),
        session,
        dataAddress: host.dataAddress,
        committedUid: rv.generation.current === ZERO_GENERATION ? (protection?.uid ?? '') : '',
        consistentSnapshot: protection?.name ?? '',
        consistentSnapshotAtMs: protection?.createdAtMs ?? 0,
        epoch: rv.epoch,
      };
    }),
    RegionChecksums: unary(async (req) => {
      const rv = needVolume(host, req.volume);
      const regions = DirtyBitmap.regionCountOf(rv.sizeBytes, req.regionSize);
      if (req.count === 0 || req.count > CHECKSUM_SPAN || req.firstRegion + req.count > regions) {
        throw new LockstepError(
          'LOCKSTEP_ERR_OUT_OF_RANGE',
          `checksum request for regions ${req.firstRegion}+${req.count} is out of range ` +
            `(the volume has ${regions}; at most ${CHECKSUM_SPAN} per call)`,
        );
      }
      return listRegionDigests(rv.local, req.regionSize, req.firstRegion, req.count);
    }),
    SetGeneration: unary(async (req) => {
      const rv = needVolume(host, req.volume);
      await rv.adoptGeneration(
        {
          current: req.generation?.current ?? '',
          history: req.generation?.history ?? [],
        },
        req.epoch,
      );
      return {};
    }),
    SetMembers: unary(async (req) => {
      await sameVolume(host, req.volume, req.uuid).adoptMembers(req.members);
      return {};
    }),
    PrimaryLeaving: unary((req) => {
      needVolume(host, req.volume).primaryLeaving();
      return {};
    }),
    TakeSnapshot: unary(async (req) => {
      const { snapshots } = sameVolume(host, req.volume, req.uuid);
      // A copy left over from an earlier snapshot of this name (one whose drop never arrived)
      // would not hold what the primary's holds: replaced, never kept under the name.
      if (snapshots.list().some((s) => s.name === req.name)) {
        host.refuseIfCloned(req.volume, req.name);
        await snapshots.delete(req.name);
      }
      const taken = await snapshots.take(req.name, req.label, req.uid);
      host.log.info(
        { volume: req.volume, snapshot: req.name, label: req.label, holdMs: taken.holdMs },
        'replicated snapshot taken',
      );
      return {};
    }),
    PrepareSnapshot: unary(async (req) => {
      const { snapshots } = sameVolume(host, req.volume, req.uuid);
      if (snapshots.list().some((s) => s.name === req.name)) {
        host.refuseIfCloned(req.volume, req.name);
        await snapshots.delete(req.name);
      }
      await snapshots.reserve(req.name, req.label, req.uid);
      return {};
    }),
    DropSnapshot: unary(async (req) => {
      const { snapshots } = sameVolume(host, req.volume, req.uuid);
      if (!snapshots.list().some((s) => s.name === req.name)) return {};
      // This copy's clone of it is not hydrated yet: kept here (the primary is told why).
      host.refuseIfCloned(req.volume, req.name);
      await snapshots.delete(req.name);
      return {};
    }),
    CloneSnapshot: unary(async (req) => {
      const source = sameVolume(host, req.volume, req.uuid);
      sameSnapshot(host, source.snapshots, req.volume, req.name, req.snapshotUid);
      const existing = host.replicated(req.newVolume);
      if (existing) {
        if (existing.uuid === req.newUuid) return {}; // the primary repeats itself
        throw new LockstepError(
          'LOCKSTEP_ERR_VOLUME_EXISTS',
          `volume ${req.newVolume} already exists on node ${host.node} with another UUID`,
        );
      }
      await host.cloneReplica(req.volume, req.name, {
        name: req.newVolume,
        sizeBytes: source.sizeBytes,
        uuid: req.newUuid,
        role: 'secondary',
        generation: req.generation?.current ?? ZERO_GENERATION,
      });
      host.log.info(
        { volume: req.newVolume, source: `${req.volume}@${req.name}` },
        'replica of a clone created from the local snapshot',
      );
      return {};
    }),
    CommitEstablished: unary(async (req) => {
      const rv = sameVolume(host, req.volume, req.uuid);
      if (rv.role !== 'secondary')
        throw new LockstepError(
          'LOCKSTEP_ERR_NOT_ALLOWED',
          `volume ${req.volume} on node ${host.node} is a primary; it is not being established`,
        );
      await commitEstablished(rv.snapshots, rv.local, req.name, req.uid);
      return {};
    }),
    ChangedSinceCommon: unary((req) => {
      const rv = sameVolume(host, req.volume, req.uuid);
      const common = newestCommon(rv.snapshots, req.uids);
      if (!common) return { uid: '', name: '', changed: Buffer.alloc(0) };
      const changed = changedRegions(rv.snapshots, common.name, rv.sizeBytes, req.regionSize);
      return { uid: common.uid, name: common.name, changed: changed.toBuffer() };
    }),
    SnapshotDigests: unary(async (req) => {
      const { snapshots } = sameVolume(host, req.volume, req.uuid);
      sameSnapshot(host, snapshots, req.volume, req.name, req.uid);
      return { regionSize: VERIFY_REGION, digests: await snapshots.digests(req.name) };
    }),
  };
}

/** Binds a data lane to the session its hello names, or throws why not. */
export function attachLane(host: ReplicaHost, hello: Hello, lane: ReplicaLane): LaneBinding {
  const rv = host.replicated(hello.volume);
  if (!rv) {
    throw new LockstepError(
      'LOCKSTEP_ERR_VOLUME_NOT_FOUND',
      `volume ${JSON.stringify(hello.volume)} does not exist on node ${host.node} (handshake first)`,
    );
  }
  if (lane.secure && !lane.peer)
    throw new LockstepError(
      'LOCKSTEP_ERR_PERMISSION_DENIED',
      'a data lane whose certificate is not verified may not attach',
    );
  const refused = lane.peer && refusedPeer(host, hello.volume, lane.peer.name);
  if (refused)
    throw new LockstepError(
      'LOCKSTEP_ERR_PERMISSION_DENIED',
      `agent ${lane.peer!.name} may not open a data lane: ${refused}`,
    );
  return rv.attachLane(hello.token, hello.lane, hello.epoch, lane);
}
