// A primary's link to one secondary: handshake over gRPC, then the data lanes (raw TCP, see
// data-lane.ts) with sequence-numbered acks, failure detection (lane errors, keepalive pings,
// an ack deadline), reconnection with backoff, and the catch-up that follows every connect
// (baseline, bitmap or checksum resync).
import { channelCredentials, channelOptions, type Transport } from '../../../lib/tls/transport';
import * as grpc from '@grpc/grpc-js';
import { LockstepError, errorMessage } from '../../../lib/errors';
import { carriedError } from '../../../lib/grpc-errors';
import type { Logger } from '../../../lib/logger';
import { replicationProto, type ReplicationClient } from '../../../proto';
import type { ChangedSinceCommonResponse__Output } from '../../../proto/gen/lockstep/v1/ChangedSinceCommonResponse';
import type { HandshakeResponse__Output } from '../../../proto/gen/lockstep/v1/HandshakeResponse';
import type { RegionChecksumsResponse__Output } from '../../../proto/gen/lockstep/v1/RegionChecksumsResponse';
import type { SnapshotDigestsResponse__Output } from '../../../proto/gen/lockstep/v1/SnapshotDigestsResponse';
import { DataLane, type LaneOwner } from './data-lane';
import { AckErrno, OpFlag, OpKind, isToken } from './frames';
import { decideResync, type Generations } from './generations';
import {
  markDifferingRegions,
  resyncDirtyRegions,
  type ResyncOptions,
  type ScanSource,
} from './resync';
import type { PeerHost } from './peer-host';
import { STREAMING_STATES, type PeerState, type ResyncProgress } from './replication-status';
import type { SendBatch } from './send-batch';
import { Establishment, type CutoverPolicy, type EstablishTarget } from './establishment';
import type { SnapshotInfo } from '../snapshots/snapshot-catalog';
import { changedRegions, newestCommon, snapshotUids } from '../snapshots/common-snapshot';

/**
 * How an op travels: `spread` over the lanes (the secondary applies ops concurrently; they never
 * overlap), or `ordered` on lane 0, applied in the order sent (see OpFlag.ORDERED).
 */
export type Route = 'spread' | 'ordered';

/** Writes larger than this travel as several ops, spread over the lanes. */
const MAX_OP_DATA = 1024 * 1024;
const RPC_DEADLINE_MS = 5_000;
const RETRY_MIN_MS = 200;
const RETRY_MAX_MS = 5_000;
const REFUSED_RETRY_MS = 5_000;

/**
 * Data connections per link. Large writes are spread over them so the secondary's kernel and
 * event loop see several in flight.
 */
const LANES = 4;
/** Ops appended to one lane in a turn of the event loop before the next lane takes over. */
const LANE_BATCH_BYTES = 512 * 1024;

/** Settings for the control channel (handshake and other unary calls). */
const CONTROL_CHANNEL_OPTIONS: grpc.ChannelOptions = {
  'grpc.keepalive_time_ms': 2_000,
  'grpc.keepalive_timeout_ms': 2_000,
  'grpc.keepalive_permit_without_calls': 1,
  'grpc.http2.min_time_between_pings_ms': 1_000,
  'grpc.initial_reconnect_backoff_ms': 200,
  'grpc.max_reconnect_backoff_ms': 2_000,
};

interface Pending {
  resolve: () => void;
  reject: (err: Error) => void;
  sentAt: number;
}

export interface PeerLinkOptions {
  /**
   * TLS (or --insecure) for the link's gRPC channel and data lanes, asked for at each attempt
   * to connect: credentials set for the peer later are used from the next one.
   */
  transport: () => Transport;
  /** An op not acknowledged within this time fails the link (a half-open peer). */
  ackTimeoutMs: number;
  /** The volume's batch of this turn's sends, shared by its links. */
  batch: SendBatch;
  /** When a new replica's rounds of snapshots give way to the live cutover. */
  cutover?: CutoverPolicy;
}

/** The node a link speaks as: the one its certificate names (its own node, with its own). */
function speaksAs(transport: Transport, localNode: string): string {
  return transport.secure ? transport.dir.identity.name : localNode;
}

export class PeerUnavailable extends LockstepError {
  constructor(address: string, why: string) {
    super('LOCKSTEP_ERR_UNAVAILABLE', `peer ${address} is unavailable: ${why}`);
  }
}

export class PeerLink implements EstablishTarget {
  state: PeerState = 'Connecting';
  /** Why the link is not in sync (last failure or refusal), for status. */
  reason = '';
  node = '';
  /** Bytes sent by resync and baseline (not live writes), over the link's life. */
  resyncBytesSent = 0;
  liveBytesSent = 0;
  resync: ResyncProgress | undefined;
  lastInSyncAt = 0;
  /**
   * The peer's last consistent state while it is not in sync (what promoting it would roll
   * back to): its snapshot from before a resync, or the establishment round it last committed.
   */
  consistent: { name: string; createdAtMs: number } | undefined;
  /** Times the link failed, over the link's life. */
  failures = 0;
  /** Set by an operator to resolve a split brain in our favour: the next connect overwrites the peer. */
  discardPeerData = false;

  private channel!: grpc.Channel;
  private rpc!: ReplicationClient;
  private lanes: DataLane[] = [];
  /** The lane this turn of the event loop appends to. */
  private current = 0;
  private epoch = 0;
  private nextSeq = 1;
  private readonly pending = new Map<number, Pending>();
  /** The connection failed and a retry is scheduled: it fails once until the next attempt. */
  private failed = false;
  /** The relationship's nodes as the peer last heard them in this connection; none before. */
  private toldMembers: string[] | undefined;
  private retryMs = RETRY_MIN_MS;
  private retryTimer: NodeJS.Timeout | undefined;
  private readonly sweeper: NodeJS.Timeout;
  private readonly keepaliveMs: number;
  private stopped = false;
  private readonly log: Logger;
  /** A new replica's rounds, kept across reconnects so that a broken-off one resumes. */
  private readonly establishment: Establishment;
  private readonly flushLanes = () => {
    for (const lane of this.lanes) lane.flush();
    // The next turn's batch starts on another lane, so batches spread over all of them.
    if (this.lanes.length > 0) this.current = (this.current + 1) % this.lanes.length;
  };

  constructor(
    readonly address: string,
    private readonly host: PeerHost,
    private readonly opts: PeerLinkOptions,
  ) {
    this.log = host.log.child({ peer: address });
    this.establishment = new Establishment(host, address, opts.cutover);
    this.openChannel();
    // Idle lanes are pinged well within the ack deadline, so a silent peer fails the link in time.
    this.keepaliveMs = Math.max(50, Math.min(1_000, Math.floor(opts.ackTimeoutMs / 3)));
    this.sweeper = setInterval(() => this.sweep(), Math.min(250, opts.ackTimeoutMs / 4));
    this.sweeper.unref();
  }

  start(): void {
    void this.connect();
  }

  private openChannel(): void {
    const transport = this.opts.transport();
    const credentials = channelCredentials(transport, ['agent']);
    this.channel = new grpc.Channel(this.address, credentials, {
      ...CONTROL_CHANNEL_OPTIONS,
      ...channelOptions(transport),
    });
    this.rpc = new (replicationProto().Replication)(this.address, credentials, {
      channelOverride: this.channel,
    });
  }

  /**
   * A connection attempt made during a partition can hang in its HTTP/2 handshake long after
   * the partition heals (grpc-js keeps waiting on it: "Waiting for LB pick"); a failed
   * handshake therefore starts the next attempt on a new channel.
   */
  private renewChannel(): void {
    this.rpc.close();
    this.channel.close();
    this.openChannel();
  }

  /** Live writes go to the peer (it is connected, catching up or in sync). */
  get streaming(): boolean {
    return STREAMING_STATES.has(this.state) && this.lanes.length > 0;
  }

  /** Ops may go over the lanes: live writes, or a new replica's snapshots and diffs. */
  private get lanesOpen(): boolean {
    return (this.streaming || this.state === 'Baselining') && this.lanes.length > 0;
  }

  // ---- the data lanes ----------------------------------------------------------------------

  /**
   * Sends one op (`flags`: OpFlag bits) the way `route` says; resolves when the peer
   * acknowledged it, rejects if the peer failed it or the link failed first. `data` must stay
   * unchanged until then (small payloads are copied, large ones are not).
   */
  send(
    kind: OpKind,
    offset: number,
    length: number,
    data: Buffer | undefined,
    flags: number,
    route: Route,
  ): Promise<void> {
    if (!this.lanesOpen) return Promise.reject(new PeerUnavailable(this.address, this.state));
    if (data && data.length > MAX_OP_DATA) {
      const parts: Promise<void>[] = [];
      for (let at = 0; at < data.length; at += MAX_OP_DATA) {
        const piece = data.subarray(at, at + MAX_OP_DATA);
        parts.push(this.send(kind, offset + at, piece.length, piece, flags, route));
      }
      return Promise.all(parts).then(() => undefined);
    }
    if (kind === OpKind.FLUSH) {
      // One lane carries it, so the peer syncs once per flush (the contract is in frames.ts).
      // It must cover every write the client saw acknowledged. Ordered writes may still be on
      // their way (async mode answers before the peer has them): they travel on lane 0, and
      // the FLUSH follows them there. Spread writes were acknowledged (= applied) by the peer
      // before the client heard back, so they are done before this FLUSH arrives, whatever
      // lane they took: it goes out with this turn's batch.
      const lane = route === 'ordered' ? this.lanes[0] : this.lanes[this.current];
      return this.enqueue(lane, kind, 0, 0, 0);
    }
    if (data) this.liveBytesSent += data.length;
    if (route === 'ordered')
      return this.enqueue(this.lanes[0], kind, flags | OpFlag.ORDERED, length, offset, data);
    let lane = this.lanes[this.current];
    if (lane.batchBytes >= LANE_BATCH_BYTES) {
      this.current = (this.current + 1) % this.lanes.length;
      lane = this.lanes[this.current];
    }
    return this.enqueue(lane, kind, flags, length, offset, data);
  }

  private enqueue(
    lane: DataLane,
    kind: OpKind,
    flags: number,
    length: number,
    offset: number,
    data?: Buffer,
  ): Promise<void> {
    const seq = this.nextSeq++;
    lane.append(kind, flags, length, seq, offset, this.host.epoch, data);
    this.opts.batch.send(this.flushLanes);
    return new Promise((resolve, reject) =>
      this.pending.set(seq, { resolve, reject, sentAt: performance.now() }),
    );
  }

  private onAck(seq: number, errno: number): void {
    const p = this.pending.get(seq);
    if (!p) return;
    this.pending.delete(seq);
    if (errno === 0) p.resolve();
    else if (errno === AckErrno.ESTALE) {
      const why = `peer ${this.address} has seen a newer epoch than ${this.host.epoch} (ESTALE): this copy was replaced`;
      p.reject(new LockstepError('LOCKSTEP_ERR_IO', why));
      this.host.replaced(why);
    } else if (errno === AckErrno.ENOSPC)
      p.reject(
        new LockstepError(
          'LOCKSTEP_ERR_NO_SPACE',
          `peer ${this.address} has no space left on its disk (ENOSPC): free space there, or give the volume a larger disk`,
        ),
      );
    else
      p.reject(
        new LockstepError(
          'LOCKSTEP_ERR_IO',
          `peer ${this.address} failed op ${seq} with errno ${errno} (an I/O error on its disk)`,
        ),
      );
  }

  /** The ack deadline, and pings on idle lanes so a half-open peer is noticed without writes. */
  private sweep(): void {
    const now = performance.now();
    const oldest = this.pending.values().next();
    if (!oldest.done && now - oldest.value.sentAt > this.opts.ackTimeoutMs) {
      return this.fail(`no acknowledgement for ${Math.round(now - oldest.value.sentAt)} ms`);
    }
    if (!this.lanesOpen) return;
    for (const lane of this.lanes) {
      if (now - lane.lastSentAt >= this.keepaliveMs)
        this.enqueue(lane, OpKind.PING, 0, 0, 0).catch(() => undefined);
    }
  }

  // ---- connection lifecycle ----------------------------------------------------------------

  /**
   * Drops the connection: pending ops fail (the host marks them dirty), reconnect follows. Once
   * per connection attempt: the ops it fails come back to the host, which may report them again.
   */
  fail(reason: string): void {
    if (this.stopped || this.failed) return;
    this.failed = true;
    this.failures++;
    const wasStreaming = this.lanes.length > 0;
    this.teardown(reason);
    if (!wasStreaming) this.renewChannel();
    if (wasStreaming || this.state === 'Connecting') {
      this.log.warn({ reason, retryInMs: this.retryMs }, 'peer link failed');
    } else {
      this.log.debug({ reason, retryInMs: this.retryMs }, 'peer link failed again');
    }
    this.reason = reason;
    this.setState(
      this.host.tracking.bitmap(this.address).dirtyRegions > 0 ? 'OutOfSync' : 'Disconnected',
    );
    this.scheduleRetry(this.retryMs);
    this.retryMs = Math.min(this.retryMs * 2, RETRY_MAX_MS);
  }

  scanned(bytes: number): void {
    if (this.resync) this.resync.doneBytes += bytes;
  }

  sentData(bytes: number): void {
    this.resyncBytesSent += bytes;
  }

  /** The host recorded writes this peer missed: a disconnected peer is now out of sync. */
  missedWrites(): void {
    if (this.state === 'Disconnected') this.setState('OutOfSync');
  }

  private teardown(reason: string): void {
    this.epoch++;
    this.toldMembers = undefined;
    const lanes = this.lanes;
    this.lanes = [];
    this.current = 0;
    for (const l of lanes) l.close();
    const err = new PeerUnavailable(this.address, reason);
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) p.reject(err);
  }

  private scheduleRetry(ms: number): void {
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => void this.connect(), ms);
    this.retryTimer.unref();
  }

  private setState(state: PeerState): void {
    if (state === this.state) return;
    const from = this.state;
    this.state = state;
    if (state === 'InSync') {
      this.lastInSyncAt = Date.now();
      this.consistent = undefined;
    }
    this.host.onPeerState(this, from, state);
  }

  /** A unary call on the peer with the RPC deadline; failures become PeerUnavailable. */
  private unary<Res>(
    invoke: (
      options: grpc.CallOptions,
      cb: (err: grpc.ServiceError | null, res?: Res) => void,
    ) => unknown,
  ): Promise<Res> {
    return new Promise((resolve, reject) =>
      invoke({ deadline: Date.now() + RPC_DEADLINE_MS }, (err, res) => {
        if (!err) return resolve(res!);
        const carried = carriedError(err);
        if (carried?.code === 'LOCKSTEP_ERR_STALE_EPOCH') {
          // The peer knows a newer primary: this one must stop, not retry.
          this.host.replaced(carried.message);
          return reject(carried);
        }
        reject(new PeerUnavailable(this.address, err.details || err.message));
      }),
    );
  }

  regionChecksums(firstRegion: number, count: number): Promise<RegionChecksumsResponse__Output> {
    return this.unary<RegionChecksumsResponse__Output>((o, cb) =>
      this.rpc.RegionChecksums(
        {
          volume: this.host.volumeName,
          regionSize: this.host.regionSize,
          firstRegion,
          count,
        },
        o,
        cb,
      ),
    );
  }

  /** Takes the snapshot on the peer's copy; the caller holds the writes it must contain. */
  async takeSnapshot(name: string, label: string, uid: string): Promise<void> {
    await this.unary((o, cb) =>
      this.rpc.TakeSnapshot(
        { volume: this.host.volumeName, uuid: this.host.uuid, name, label, uid },
        o,
        cb,
      ),
    );
  }

  /** Prepares the peer's snapshot ahead of the hold (see TakeSnapshot). */
  async prepareSnapshot(name: string, label: string, uid: string): Promise<void> {
    await this.unary((o, cb) =>
      this.rpc.PrepareSnapshot(
        { volume: this.host.volumeName, uuid: this.host.uuid, name, label, uid },
        o,
        cb,
      ),
    );
  }

  async dropSnapshot(name: string): Promise<void> {
    await this.unary((o, cb) =>
      this.rpc.DropSnapshot({ volume: this.host.volumeName, uuid: this.host.uuid, name }, o, cb),
    );
  }

  /** Makes the peer build its copy of a clone from its own copy of the snapshot. */
  async cloneSnapshot(
    snapshot: { name: string; uid: string },
    newVolume: string,
    newUuid: string,
    generation: Generations,
  ): Promise<void> {
    const { name, uid: snapshotUid } = snapshot;
    await this.unary((o, cb) =>
      this.rpc.CloneSnapshot(
        {
          volume: this.host.volumeName,
          uuid: this.host.uuid,
          name,
          snapshotUid,
          newVolume,
          newUuid,
          generation,
        },
        o,
        cb,
      ),
    );
  }

  /** The peer's per-region digests of a snapshot (see SnapshotCatalog.digests). */
  snapshotDigests(name: string, uid: string): Promise<SnapshotDigestsResponse__Output> {
    return this.unary<SnapshotDigestsResponse__Output>((o, cb) =>
      this.rpc.SnapshotDigests(
        { volume: this.host.volumeName, uuid: this.host.uuid, name, uid },
        o,
        cb,
      ),
    );
  }

  /**
   * With no bitmap to trust: the peer's bitmap becomes what this copy and the peer each changed
   * since the newest snapshot they share (snapshots/common-snapshot.ts). False if none.
   */
  private async markChangedSinceCommon(): Promise<boolean> {
    const host = this.host;
    const uids = snapshotUids(host.snapshots);
    if (uids.length === 0) return false;
    const answer = await this.unary<ChangedSinceCommonResponse__Output>((o, cb) =>
      this.rpc.ChangedSinceCommon(
        { volume: host.volumeName, uuid: host.uuid, regionSize: host.regionSize, uids },
        o,
        cb,
      ),
    );
    const common = answer.uid ? newestCommon(host.snapshots, [answer.uid]) : undefined;
    if (!common) return false;
    // This copy's changes and the replacement in one step: a write after it is tracked as
    // usual, one before it is among the changes (its old data was saved before it was made).
    // That includes what the activity log and the peer's `differs` stood for, so they go.
    const own = changedRegions(host.snapshots, common.name, host.sizeBytes, host.regionSize);
    host.tracking.replace(this.address, [answer.changed, own.toBuffer()]);
    this.log.info(
      {
        snapshot: common.name,
        changedHere: own.dirtyBytes(),
        dirtyBytes: host.tracking.bitmap(this.address).dirtyBytes(),
      },
      'resync from the newest common snapshot',
    );
    return true;
  }

  private async connect(): Promise<void> {
    if (this.stopped) return;
    this.failed = false;
    const epoch = ++this.epoch;
    const host = this.host;
    const stale = () => this.stopped || epoch !== this.epoch;
    try {
      const gen = host.generations();
      const members = host.relationshipNodes();
      const hello = await this.unary<HandshakeResponse__Output>((o, cb) =>
        this.rpc.Handshake(
          {
            volume: host.volumeName,
            uuid: host.uuid,
            sizeBytes: host.sizeBytes,
            regionSize: host.regionSize,
            createIfMissing: true,
            // The node its certificate names: this one's, or, to a peer in another cluster,
            // the name that cluster's CA gave this side.
            primaryNode: speaksAs(this.opts.transport(), host.localNode),
            primaryAddress: host.localAddress,
            generation: gen,
            mode: host.mode,
            epoch: host.epoch,
            peerAddress: this.address,
            mediator: host.mediator ?? null,
            members,
          },
          o,
          cb,
        ),
      );
      if (stale()) return;
      this.node = hello.node;
      // A node named while the handshake was on its way (this one, say) is told now.
      this.toldMembers = members;
      this.announceMembers(host.relationshipNodes());
      this.consistent = hello.consistentSnapshot
        ? { name: hello.consistentSnapshot, createdAtMs: Number(hello.consistentSnapshotAtMs) }
        : undefined;
      const remote: Generations = {
        current: hello.generation?.current ?? '',
        history: hello.generation?.history ?? [],
      };
      let decision = decideResync(
        { ...gen, bitmapUuid: host.bitmapUuid(this.address) },
        { ...remote, role: hello.role === 'primary' ? 'primary' : 'secondary' },
      );
      if (
        decision.kind === 'refuse' &&
        decision.condition !== 'PeerIsPrimary' &&
        this.discardPeerData
      ) {
        this.log.warn(
          { condition: decision.condition },
          'discarding the peer’s diverging writes, as requested',
        );
        decision = {
          kind: 'full',
          reason: `${decision.condition} resolved by discarding the peer's writes`,
        };
      }
      if (decision.kind === 'refuse') {
        this.reason = decision.reason;
        this.log.error(
          { condition: decision.condition, reason: decision.reason, remote, local: gen },
          'peer refused',
        );
        this.setState(decision.condition);
        this.scheduleRetry(REFUSED_RETRY_MS);
        return;
      }
      const bitmap = host.tracking.bitmap(this.address);
      if (hello.differs.length > 0) host.tracking.merge(this.address, hello.differs);

      await this.openLanes(hello, epoch);
      if (stale()) return;
      this.setState(decision.kind === 'baseline' ? 'Baselining' : 'Resyncing');
      this.log.info(
        { decision: decision.kind, node: hello.node, dirtyBytes: bitmap.dirtyBytes() },
        'peer connected',
      );
      if (decision.kind === 'baseline') return await this.establish(hello, stale);

      let kind: ResyncProgress['kind'] = decision.kind === 'full' ? 'full' : 'bitmap';
      if (decision.kind === 'full' || host.tracking.isUntrusted(this.address)) {
        if (await this.markChangedSinceCommon()) {
          kind = 'snapshot';
        } else {
          if (stale()) return;
          this.resync = {
            kind: 'full',
            doneBytes: 0,
            totalBytes: host.sizeBytes,
            startedAt: Date.now(),
          };
          await markDifferingRegions(this, host, () => stale());
        }
        if (stale()) return;
        host.tracking.trust(this.address);
      }
      await this.catchUp(kind, { peerIsZero: false }, stale);
    } catch (err) {
      if (!stale()) this.fail(errorMessage(err));
    }
  }

  /**
   * A new replica: rounds of snapshots and diffs (establishment.ts), then the cutover: live
   * writes stream to the peer from this step on, and the resync copies what its bitmap marked
   * since the last committed snapshot.
   */
  private async establish(hello: HandshakeResponse__Output, stale: () => boolean): Promise<void> {
    const host = this.host;
    const base = await this.establishment.run(this, hello.committedUid, hello.fresh, stale);
    if (!base || stale()) return;
    // The cutover, at a point with no write in flight: every write before it is in the
    // snapshot logs since `base`, every write after it streams to the peer.
    const release = await host.holdWrites();
    let remainder: ScanSource;
    try {
      if (stale()) return;
      const tracked = host.tracking.bitmap(this.address);
      host.tracking.clearRange(this.address, 0, tracked.regionCount - 1);
      host.tracking.trust(this.address);
      remainder = this.establishment.remainder(base);
      this.begin('cutover', remainder.tracking.bitmap(this.address).dirtyBytes());
      this.setState('Resyncing');
    } finally {
      release();
    }
    await resyncDirtyRegions(this, remainder, stale, { peerIsZero: false });
    if (stale()) return;
    // What the peer missed since (a failed op), then the generation: InSync.
    await this.catchUp('cutover', { peerIsZero: false }, stale);
  }

  /** Starts a round of establishment: what `scanned` counts from now on. */
  begin(kind: ResyncProgress['kind'], totalBytes: number): void {
    this.resync = { kind, doneBytes: 0, totalBytes, startedAt: Date.now() };
  }

  /** Ends a round: the peer holds the snapshot whole, durably, and keeps it as its own. */
  async commit(snapshot: SnapshotInfo): Promise<void> {
    await this.unary<unknown>((o, cb) =>
      this.rpc.CommitEstablished(
        {
          volume: this.host.volumeName,
          uuid: this.host.uuid,
          name: snapshot.name,
          uid: snapshot.uid,
        },
        o,
        cb,
      ),
    );
    this.consistent = { name: snapshot.name, createdAtMs: snapshot.createdAtMs };
  }

  /**
   * Copies the dirty regions over the open lanes, then gives the peer this copy's generation:
   * it is in sync. Throws if the link fails meanwhile.
   */
  private async catchUp(
    kind: ResyncProgress['kind'],
    opts: ResyncOptions,
    stale: () => boolean,
  ): Promise<void> {
    const host = this.host;
    const bitmap = host.tracking.bitmap(this.address);
    this.resync = { kind, doneBytes: 0, totalBytes: bitmap.dirtyBytes(), startedAt: Date.now() };
    await resyncDirtyRegions(this, host, stale, opts);
    if (stale()) return;
    await this.pushGeneration();
    if (stale()) return;
    await host.onPeerCaughtUp(this);
    this.discardPeerData = false;
    this.resync = undefined;
    // In sync, by a cutover or otherwise: what establishing it kept here can go.
    await this.establishment
      .finish()
      .catch((err: unknown) =>
        this.log.warn({ err: errorMessage(err) }, 'establishment snapshots not deleted'),
      );
    // Backoff starts over only once the peer caught up: a peer that accepts the connection and
    // then fails every catch-up (its disk is full) is retried ever more slowly, not 5× a second.
    this.retryMs = RETRY_MIN_MS;
    this.reason = '';
    this.setState('InSync');
    this.log.info({ resyncBytesSent: this.resyncBytesSent }, 'peer in sync');
    // Regions that turned dirty after the scan's last pass (see resyncInPlace).
    if (bitmap.dirtyRegions > 0) this.resyncInPlace();
  }

  /**
   * Regions turned dirty while the peer is in sync, without the link failing: the local write
   * failed (a full disk) after the peer had taken it. They are copied again over the live
   * lanes, so the peer gets back what this copy holds, without dropping the connection.
   */
  resyncInPlace(): void {
    if (this.state !== 'InSync' || !this.streaming) return;
    const epoch = this.epoch;
    const stale = () => this.stopped || epoch !== this.epoch;
    this.setState('Resyncing');
    this.catchUp('bitmap', { peerIsZero: false }, stale).catch((err: unknown) => {
      if (!stale()) this.fail(errorMessage(err));
    });
  }

  /** Opens every data lane to the address and session the handshake gave; all or none. */
  private async openLanes(hello: HandshakeResponse__Output, epoch: number): Promise<void> {
    if (!hello.dataAddress || !isToken(hello.session)) {
      throw new PeerUnavailable(
        this.address,
        'it offers no data channel (an agent from before the raw data lanes? upgrade it)',
      );
    }
    const owner: LaneOwner = {
      onAck: (seq, errno) => {
        if (epoch === this.epoch) this.onAck(seq, errno);
      },
      onLaneFailed: (reason) => {
        if (epoch === this.epoch) this.fail(reason);
      },
    };
    const opened = await Promise.allSettled(
      Array.from({ length: LANES }, (_, lane) =>
        DataLane.open(
          hello.dataAddress,
          {
            lane,
            keepaliveMs: this.keepaliveMs,
            token: hello.session,
            epoch: this.host.epoch,
            volume: this.host.volumeName,
          },
          owner,
          RPC_DEADLINE_MS,
          this.opts.transport(),
        ),
      ),
    );
    const lanes = opened.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []));
    const failed = opened.find((r) => r.status === 'rejected');
    if (failed || epoch !== this.epoch) {
      for (const l of lanes) l.close();
      if (failed) throw new PeerUnavailable(this.address, errorMessage(failed.reason));
      return;
    }
    this.lanes = lanes;
  }

  /** Resolves a refusal (split brain, newer peer) by overwriting the peer on the next connect. */
  discardPeer(): void {
    this.discardPeerData = true;
    if (!this.streaming) this.scheduleRetry(0);
  }

  /** Tells the peer this primary steps down cleanly (so it may be promoted without --force). */
  async announceLeaving(): Promise<void> {
    await this.unary<unknown>((o, cb) =>
      this.rpc.PrimaryLeaving({ volume: this.host.volumeName }, o, cb),
    );
  }

  /**
   * Tells the peer the relationship's nodes if it has heard others in this connection. Before
   * its handshake it is told nothing here: the handshake, or the check after it, tells it. A
   * failure drops the connection, whose next handshake tells it: a copy that missed a newcomer
   * would refuse it as its primary after a failover or a move.
   */
  announceMembers(members: string[]): void {
    const told = this.toldMembers;
    if (told === undefined || sameNodes(told, members)) return;
    this.toldMembers = members;
    const epoch = this.epoch;
    this.unary<unknown>((o, cb) =>
      this.rpc.SetMembers({ volume: this.host.volumeName, uuid: this.host.uuid, members }, o, cb),
    ).catch((err: unknown) => {
      if (epoch === this.epoch)
        this.fail(`telling it the relationship’s nodes: ${errorMessage(err)}`);
    });
  }

  /** Sends a generation change to a peer that is in sync. */
  async pushGeneration(): Promise<void> {
    await this.unary<unknown>((o, cb) =>
      this.rpc.SetGeneration(
        {
          volume: this.host.volumeName,
          generation: this.host.generations(),
          epoch: this.host.epoch,
        },
        o,
        cb,
      ),
    );
  }

  stop(): void {
    if (this.stopped) return;
    this.teardown('link stopped');
    this.stopped = true;
    clearInterval(this.sweeper);
    clearTimeout(this.retryTimer);
    this.rpc.close();
    this.channel.close();
  }
}

function sameNodes(a: readonly string[], b: readonly string[]): boolean {
  return a.length === b.length && a.every((n, i) => n === b[i]);
}
